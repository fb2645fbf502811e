#!/usr/bin/env python3
"""Independent speed measurement: plain transformers + torch.cuda.Event, sharing no code with the plugin.

Builds the same random-weight Llama shapes as the plugin's built-ins (configs copied here on purpose),
and times whole generate() calls: dynamic cache eager vs static cache with generate()'s auto-compile,
batch 1, bf16, SDPA, a prompt of random token ids, exactly N new tokens (min_new_tokens = max_new_tokens).
Interleaved like the suite's campaign (the design it checks, written again here): after the warm-ups, each
round times the dynamic path twice (an A/A pair) and the static path once, in a random order; the speedup is
the 20 %-trimmed mean of the per-round log ratios with Yuen's standard error, and its 95 % interval.
Its speedup is the check on the suite's `speedup` figure of test_generate_speed[static+compile/...].

    python scripts/measure-speed.py --shape llama-1b-shape --shape llama-7b-shape --new-tokens 32 \
        --rounds 12 --out independent.json
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import time
from typing import Any

import torch
import transformers
from transformers import LlamaConfig, LlamaForCausalLM

SHAPES: dict[str, dict[str, Any]] = {
    "llama-1b-shape": {
        "vocab_size": 128256, "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32,
        "num_key_value_heads": 8, "head_dim": 64, "max_position_embeddings": 8192, "rope_theta": 500000.0, "tie_word_embeddings": True,
    },
    "llama-7b-shape": {
        "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32,
        "num_key_value_heads": 32, "max_position_embeddings": 4096, "tie_word_embeddings": False,
    },
}


def build(shape: str) -> Any:
    config = LlamaConfig(**SHAPES[shape])
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # initialize in bf16 on the card: a 7B fp32 init is 27 GB
    try:
        with torch.device("cuda"):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(default)
    return model.eval()


def call_ms(model: Any, ids: torch.Tensor, new_tokens: int, **kwargs: Any) -> float:
    """One whole generate() call timed with CUDA events."""
    args = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, attention_mask=torch.ones_like(ids), **kwargs)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    with torch.no_grad():
        out = model.generate(ids, **args)
    end.record()
    end.synchronize()
    assert out.shape[1] - ids.shape[1] == new_tokens, f"got {out.shape[1] - ids.shape[1]} tokens, not {new_tokens}"
    return start.elapsed_time(end)


def trimmed(logs: list[float]) -> dict[str, float]:
    """20 %-trimmed mean and Yuen's standard error of ``logs``; the ratio exp(mean) and its 95 % interval (t quantile
    from a small table: this script shares no code with the plugin)."""
    values = sorted(logs)
    n = len(values)
    g = int(0.2 * n)
    kept = values[g : n - g]
    mean = statistics.fmean(kept)
    winsorized = [values[g]] * g + kept + [values[n - g - 1]] * g
    se = statistics.stdev(winsorized) / ((1 - 2 * g / n) * math.sqrt(n))
    df = len(kept) - 1
    t = {1: 12.71, 2: 4.30, 3: 3.18, 4: 2.78, 5: 2.57, 6: 2.45, 7: 2.36, 8: 2.31, 9: 2.26, 10: 2.23, 12: 2.18, 15: 2.13, 20: 2.09, 30: 2.04}
    q = t[min(t, key=lambda k: (abs(k - df), k))] if df < 30 else 1.96
    return {"value": math.exp(mean), "low": math.exp(mean - q * se), "high": math.exp(mean + q * se), "log": mean, "se": se, "n": n}


def interleaved(model: Any, ids: torch.Tensor, new_tokens: int, rounds: int, seed: int) -> dict[str, Any]:
    """Warm both paths, then ``rounds`` rounds of dynamic, dynamic again and static in a random order."""
    paths = {"dynamic": {"disable_compile": True}, "static": {"cache_implementation": "static"}}
    warm = {"dynamic": [call_ms(model, ids, new_tokens, **paths["dynamic"])], "static": [call_ms(model, ids, new_tokens, **paths["static"]) for _ in range(3)]}
    rng = random.Random(seed)
    times: dict[str, list[float]] = {"dynamic": [], "dynamic'": [], "static": []}
    wall = time.perf_counter()
    for _ in range(rounds):
        slots = list(times)
        rng.shuffle(slots)
        for slot in slots:
            times[slot].append(call_ms(model, ids, new_tokens, **paths[slot.rstrip("'")]))
    speedup = trimmed([0.5 * (math.log(a) + math.log(b)) - math.log(c) for a, b, c in zip(times["dynamic"], times["dynamic'"], times["static"])])
    aa = trimmed([math.log(a) - math.log(b) for a, b in zip(times["dynamic"], times["dynamic'"])])
    return {
        "speedup": speedup,
        "aa": aa,
        "dynamic_median_ms": statistics.median(times["dynamic"] + times["dynamic'"]),
        "static_median_ms": statistics.median(times["static"]),
        "times_ms": times,
        "warmup_ms": warm,
        "seconds": time.perf_counter() - wall,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", action="append", choices=sorted(SHAPES), required=True)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    result: dict[str, Any] = {
        "environment": {
            "gpu": torch.cuda.get_device_name(0),
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "transformers": transformers.__version__,
        },
        "new_tokens": args.new_tokens,
        "prompt_tokens": args.prompt_tokens,
        "rounds": args.rounds,
        "shapes": {},
    }
    for shape in args.shape:
        model = build(shape)
        ids = torch.randint(100, model.config.vocab_size, (1, args.prompt_tokens), device="cuda", generator=None)
        found = interleaved(model, ids, args.new_tokens, args.rounds, args.seed)
        result["shapes"][shape] = found
        sp, aa = found["speedup"], found["aa"]
        print(f"{shape}: dynamic eager {found['dynamic_median_ms']:.1f} ms, static+compile {found['static_median_ms']:.1f} ms, "
              f"speedup {sp['value']:.2f}x [{sp['low']:.2f}, {sp['high']:.2f}] over {sp['n']} rounds; A/A {aa['value']:.3f} "
              f"[{aa['low']:.3f}, {aa['high']:.3f}]", flush=True)
        del model
        torch.cuda.empty_cache()
    with open(args.out, "w", encoding="utf-8") as handle:
        json.dump(result, handle, indent=1)


if __name__ == "__main__":
    main()
