#!/usr/bin/env python3
"""Figures of the quantization layer rule (pytest_llmopt/running/qlayers.py), for setting its bounds.

    measure-quant-layers.py --model tiny-llama --model ../shared/models/stories-260k [--schemes int8,nf4] [--device cpu]
    measure-quant-layers.py --report report.json     # what the quantization suite recorded (one GPU run, no second load)

Loads each model unquantized and under each bitsandbytes scheme (compute dtype bfloat16; bitsandbytes 0.50 runs every
scheme on CPU) and prints, per (model, scheme), the layers, their error against the unquantized layer, the scheme's own
error (the emulation's) and the gap between bitsandbytes and the emulation: one JSON line each, then a table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SCHEMES = ("int8", "nf4", "fp4", "nf4-dq")
KEYS = ("layers", "layer_error_median", "layer_error_max", "layer_gap_median", "layer_gap_max", "layer_gap_worst")


def _load(name: str, device: str):
    import torch
    from transformers import AutoModelForCausalLM

    from pytest_llmopt.running import compat, zoo

    if zoo.is_builtin(name):
        plain = zoo.build_builtin(name, 0, torch.bfloat16, device, compat.from_config, "eager")  # attention does not enter a linear layer
        folder = tempfile.mkdtemp()
        plain.save_pretrained(folder)
        return plain, folder
    return AutoModelForCausalLM.from_pretrained(name, dtype=torch.bfloat16).to(device).eval(), name


def measure(models: list[str], schemes: list[str], device: str) -> list[dict]:
    import torch
    from transformers import AutoModelForCausalLM

    from pytest_llmopt.running import qlayers, quantize

    rows = []
    for name in models:
        plain, folder = _load(name, device)
        for scheme in schemes:
            quantized = AutoModelForCausalLM.from_pretrained(
                folder, quantization_config=quantize.bnb_config(scheme, torch.bfloat16), dtype=torch.bfloat16, device_map=device
            ).eval()
            try:
                layers = qlayers.measure(plain, quantized, scheme)
            except (AssertionError, RuntimeError) as exc:  # bitsandbytes' CPU 4-bit kernels want dimensions it can tile
                print(f"# {name} {scheme}: bitsandbytes raised {type(exc).__name__}: {exc}", flush=True)
                continue
            rows.append({"model": Path(name).name, "scheme": scheme, "device": device, **qlayers.figures(layers)})
            print(json.dumps(rows[-1]), flush=True)
            del quantized
    return rows


def from_report(path: Path) -> list[dict]:
    doc = json.loads(path.read_text())
    return [
        {"model": r["model"], "scheme": r["variant"].split("/")[2], "device": doc["environment"].get("gpu") or "cpu", **{k: r["metrics"].get(k) for k in KEYS}}
        for r in doc["results"]
        if r["check"] == "test_layers" and r["metrics"].get("layers")
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", action="append", default=[])
    parser.add_argument("--schemes", default=",".join(SCHEMES))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--report", type=Path)
    args = parser.parse_args()
    rows = from_report(args.report) if args.report else measure(args.model, args.schemes.split(","), args.device)
    print("\n| model | scheme | layers | error (median / max) | gap (median / max) | worst layer |\n|---|---|---:|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['scheme']} | {r['layers']} | {r['layer_error_median']:.4f} / {r['layer_error_max']:.4f} | "
              f"{r['layer_gap_median']:.3f} / {r['layer_gap_max']:.3f} | {r['layer_gap_worst']} |")
    by_scheme: dict[str, list[float]] = {}
    for r in rows:
        by_scheme.setdefault(r["scheme"], []).append(r["layer_gap_max"])
    for scheme, gaps in by_scheme.items():
        print(f"{scheme}: largest gap {max(gaps):.3f} over {len(gaps)} model(s); median of maxima {statistics.median(gaps):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
