#!/usr/bin/env python3
"""Figures of the quantization and memory suites, for setting their thresholds.

Two modes:

  measure-quant.py --report report.json
      print the figures the suites recorded (``pytest suites/test_quantization.py suites/test_memory.py
      --llmopt-report=report.json``): footprints, ratios, agreement, KL, latency cost, peak memories,
      cache sizes. This is how the H100 figures are collected: one pytest run, no second load.

  measure-quant.py --model tiny-llama --model /path/to/trained [--schemes int8,nf4] [--device cpu] [--latency]
      load each model unquantized and under each scheme (bitsandbytes, compute dtype bfloat16) and
      measure footprint (and the formula), top-1 agreement and KL on the built-in prompts, and optionally
      latency. bitsandbytes 0.50 runs int8 / nf4 / fp4 on CPU (slowly), so CPU figures are real bnb figures.

Both print one JSON line per (model, scheme) and a table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

REPORT_KEYS = (
    "footprint_bytes",
    "footprint_expected_bytes",
    "footprint_unquantized_bytes",
    "footprint_ratio",
    "top1_agreement",
    "kl_mean",
    "kl_max",
    "latency_ratio",
    "latency_ms_per_token",
    "latency_unquantized_ms_per_token",
    "max_delta_logit",
    "peak_memory_bytes",
    "prefill_peak_bytes",
    "eager_prefill_peak_bytes",
    "kv_cache_bytes",
    "kv_cache_formula_bytes",
    "kept_cache_bytes",
    "memory_before_bytes",
    "memory_after_bytes",
)


def from_report(path: Path) -> None:
    """One JSON line per quantization / memory result, then the quality bounds the figures suggest."""
    data = json.loads(path.read_text())
    results = data.get("results", []) if isinstance(data, dict) else data
    env = data.get("environment") if isinstance(data, dict) else None
    if env:
        print("# environment:", json.dumps(env)[:1000])
    worst: dict[str, tuple[float, float]] = {}
    for result in results:
        if result.get("suite") not in ("quantization", "memory"):
            continue
        found = result.get("metrics", {})
        metrics = {k: found[k] for k in REPORT_KEYS if found.get(k) is not None}
        row = {
            "model": result.get("model"),
            "check": result.get("check"),
            "variant": result.get("variant"),
            "status": result.get("status"),
            **metrics,
        }
        print(json.dumps(row))
        if result.get("check") == "test_model_quality" and "top1_agreement" in metrics:
            scheme = str(result.get("variant", "")).split("/")[2]
            top1, kl = worst.get(scheme, (1.0, 0.0))
            worst[scheme] = (min(top1, metrics["top1_agreement"]), max(kl, metrics["kl_mean"]))
    for scheme, (top1, kl) in worst.items():
        print(
            f"# suggested QUALITY[{scheme!r}] = QualityBound({round(top1 - 0.10, 2)}, "
            f"{float(f'{2 * kl:.2g}')}, ...)  # worst top-1 {top1:.4f}, worst mean KL {kl:.4g}"
        )


def _load(name: str, scheme: str, device: str, seed: int) -> Any:
    import torch

    from pytest_llmopt.running import compat, models, quantize, zoo

    spec = models.resolve(name)
    if spec.kind == "builtin" and scheme == "none":
        model = zoo.build_builtin(
            name, seed, torch.bfloat16, device, compat.from_config
        )
    else:
        source = (
            spec.ref
            if spec.kind != "builtin"
            else models._saved_builtin(name, seed, "bfloat16", device)
        )
        config = (
            quantize.bnb_config(scheme, torch.bfloat16) if scheme != "none" else None
        )
        attention = models.describe(spec, False).default_attention  # what from_pretrained picks (GPT-Neo: eager)
        model = compat.from_pretrained(
            source, torch.bfloat16, device, attention, config, False
        ).eval()
        if scheme == "none":
            model = model.to(device)
    return spec, model, models.load_tokenizer(spec, False)


def measure(
    names: list[str], schemes: list[str], device: str, latency: bool, seed: int
) -> None:
    import torch

    from pytest_llmopt.running import footprint, prompts, quantize

    texts = [p.text for p in prompts.load(None)]
    for name in names:
        spec, plain, tok = _load(name, "none", device, seed)
        enc = tok(texts, return_tensors="pt", padding=True)
        ids, mask = enc["input_ids"].to(device), enc["attention_mask"].to(device)
        with torch.no_grad():
            ref_logits = plain(input_ids=ids, attention_mask=mask).logits.float().cpu()
        plain_s = _latency(plain, ids[:1], mask[:1]) if latency else None
        for scheme in schemes:
            _, model, _ = _load(name, scheme, device, seed)
            want = footprint.expected(plain, scheme, 2)
            size = footprint.check(model, want)
            with torch.no_grad():
                logits = model(input_ids=ids, attention_mask=mask).logits.float().cpu()
            q = quantize.quality(ref_logits, logits, mask.cpu())
            row: dict[str, Any] = {
                "model": spec.name,
                "kind": quantize.model_kind(spec),
                "scheme": scheme,
                "device": device,
                "footprint_bytes": size.footprint,
                "footprint_expected_bytes": want.total_bytes,
                "footprint_unquantized_bytes": int(plain.get_memory_footprint()),
                "footprint_ratio": round(size.footprint / want.unquantized_bytes, 4),
                "footprint_ok": size.ok,
                "top1_agreement": round(q.top1, 4),
                "kl_mean": round(q.kl_mean, 5),
                "kl_max": round(q.kl_max, 4),
                "positions": q.positions,
            }
            if latency and plain_s:
                quant_s = _latency(model, ids[:1], mask[:1])
                row.update(
                    latency_ratio=round(quant_s / plain_s, 3),
                    latency_ms_per_token=round(1e3 * quant_s / 32, 2),
                )
            print(json.dumps(row), flush=True)
            del model
        del plain


def _latency(
    model: Any, ids: Any, mask: Any, tokens: int = 32, repeats: int = 3
) -> float:
    import torch

    def once() -> float:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.no_grad():
            model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=tokens,
                min_new_tokens=tokens,
                do_sample=False,
            )
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return time.perf_counter() - start

    once()
    return statistics.median(once() for _ in range(repeats))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--report", type=Path, help="print the figures of a --llmopt-report JSON"
    )
    parser.add_argument(
        "--model",
        action="append",
        default=[],
        help="built-in name or model folder (repeatable)",
    )
    parser.add_argument("--schemes", default="int8,nf4,fp4,nf4-dq")
    parser.add_argument("--device", default="cuda" if _cuda() else "cpu")
    parser.add_argument("--latency", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.report:
        from_report(args.report)
    if args.model:
        measure(
            args.model, args.schemes.split(","), args.device, args.latency, args.seed
        )


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":
    main()
