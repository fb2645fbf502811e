#!/usr/bin/env python3
"""Measure the rounding-noise floor of a model in a low precision, and how attention kernels and injected
faults compare with it (the data behind equivalence.FLOOR_FACTOR; see baselines/*/NOTES.md).

For each model and dtype: the same weights in float32 (float64 for a float32 run; eager, no cache, each prompt
alone without padding) are the reference. Each path's
logits over a left-padded batch are compared with it; the plain path (eager attention in the run dtype) gives
the floor. Printed per path: several statistics of |Δlogit| against float32 and their ratio to the plain
path's, so that the statistic and the factor can be chosen from data.

Usage: python scripts/calibrate-floor.py --model llama-1b-shape --dtype bfloat16 [--device cpu] [--out DIR]
(--model also takes any model the plugin does: a folder, a GGUF file, smollm2-135m.)
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import time
from pathlib import Path

import torch

from pytest_llmopt.running import compat, models, zoo
from pytest_llmopt.verdicts.equivalence import error_stats
from pytest_llmopt.running.prompts import BUILTIN, long_prompt


def attention_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    return [m for m in model.modules() if hasattr(m, "scaling") and hasattr(m, "q_proj")]


@contextlib.contextmanager
def scaled_attention(model: torch.nn.Module, factor: float):
    mods = attention_modules(model)
    for m in mods:
        m.scaling *= factor
    try:
        yield
    finally:
        for m in mods:
            m.scaling /= factor


def logits(model, ids, mask, attention: str, backend: str | None = None, drop_mask: bool = False) -> torch.Tensor:
    model.set_attn_implementation(attention)
    with compat.sdpa_backend(backend), torch.no_grad():
        out = model(input_ids=ids, attention_mask=None if drop_mask else mask, position_ids=positions(mask), use_cache=False)
    return out.logits.float()


def unpadded_logits(model, ids, mask) -> torch.Tensor:
    """The reference row by row on its own tokens (no padding, no mask), laid out like the padded batch: a padded
    float64 batch through eager attention gives NaN (a pad query row masked everywhere overflows to -inf, and
    0 x NaN carries it into the real rows), and a reference should share no padding code with the paths it judges."""
    out = None
    with torch.no_grad():
        for row in range(ids.shape[0]):
            keep = mask[row].bool()
            got = model(input_ids=ids[row, keep][None], use_cache=False).logits.float()[0]
            if out is None:
                out = torch.zeros(ids.shape[0], ids.shape[1], got.shape[-1], device=got.device)
            out[row, keep] = got
    assert out is not None
    return out


def positions(mask: torch.Tensor) -> torch.Tensor:
    """Left padding: real tokens at 0, 1, ...; pads before them at -k..-1. Monotone, so transformers' packed-sequence
    detection (which treats a position reset as a new sequence when no mask is given) never triggers."""
    return torch.arange(mask.shape[1], device=mask.device) - (mask.shape[1] - mask.long().sum(-1, keepdim=True))


def load(name: str, dtype: torch.dtype, device: str) -> tuple[torch.nn.Module, object]:
    """A built-in shape by name, or any model the plugin accepts (a folder, a GGUF file, smollm2-135m)."""
    if zoo.is_builtin(name):
        return zoo.build_builtin(name, 0, dtype, device, compat.from_config, "eager"), zoo.builtin_tokenizer(name)
    spec = models.resolve(name)
    return compat.from_pretrained(spec.source, dtype, device, "eager").eval(), models.load_tokenizer(spec, False)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", action="append", required=True)
    parser.add_argument("--dtype", action="append", default=None)
    parser.add_argument("--out", default=None)
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()
    results = []
    for name in args.model:
        for dtype_name in args.dtype or ["bfloat16"]:
            dtype = getattr(torch, dtype_name)
            started = time.perf_counter()
            model, tok = load(name, dtype, args.device)
            # float32 runs are judged against float64, as the suites' reference does (reference.PRECISE_DTYPE)
            reference = copy.deepcopy(model).to(torch.float64 if dtype == torch.float32 else torch.float32)
            batches = {
                "padded batch": tok([p.text for p in BUILTIN], return_tensors="pt", padding=True),
                "long padded": tok([long_prompt(tok, 1024), long_prompt(tok, 512)], return_tensors="pt", padding=True),
            }
            for batch_name, enc in batches.items():
                ids, mask = enc["input_ids"].to(args.device), enc["attention_mask"].to(args.device)
                reference.set_attn_implementation("eager")
                ref = unpadded_logits(reference, ids, mask)
                valid = mask.bool()
                plain = error_stats(logits(model, ids, mask, "eager"), ref, valid)
                paths = {
                    "sdpa": ("sdpa", None, {}),
                    "sdpa:math": ("sdpa", "math", {}),
                    "sdpa:efficient": ("sdpa", "efficient", {}),
                    "sdpa:cudnn": ("sdpa", "cudnn", {}),
                    "flash_attention_2": ("flash_attention_2", None, {}),
                    "fault: scale x1.02 (eager)": ("eager", None, {"scale": 1.02}),
                    "fault: scale x1.01 (eager)": ("eager", None, {"scale": 1.01}),
                    "fault: padding mask dropped (eager)": ("eager", None, {"drop_mask": True}),
                }
                row = {"model": name, "dtype": dtype_name, "batch": batch_name, "plain": plain.as_dict(), "paths": {}}
                for label, (attention, backend, fault) in paths.items():
                    try:
                        with scaled_attention(model, fault.get("scale", 1.0)):
                            got = logits(model, ids, mask, attention, backend, fault.get("drop_mask", False))
                    except Exception as exc:  # a backend without a kernel for this input
                        row["paths"][label] = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"}
                        continue
                    stats = error_stats(got, ref, valid)
                    row["paths"][label] = {**stats.as_dict(), "ratio": stats.ratios(plain)}
                results.append(row)
                print(f"\n== {name} {dtype_name} {batch_name} {tuple(ids.shape)}; plain {dtype_name} eager vs float32: {plain.as_dict()}")
                for label, figures in row["paths"].items():
                    print(f"  {label:<38} {figures.get('ratio') or figures.get('error')}")
            del model, reference
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            print(f"  ({time.perf_counter() - started:.0f} s)")
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "floor.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
