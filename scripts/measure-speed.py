#!/usr/bin/env python3
"""Independent speed measurement: plain transformers + torch.cuda.Event, sharing no code with the plugin.

Builds the same random-weight Llama shapes as the plugin's built-ins (configs copied here on purpose),
and times whole generate() calls: dynamic cache eager vs static cache with generate()'s auto-compile,
batch 1, bf16, SDPA, a prompt of random token ids, exactly N new tokens (min_new_tokens = max_new_tokens).
Its speedup is the check on the suite's `speedup` figure of test_generate_speed[static+compile/...].

    python scripts/measure-speed.py --shape llama-1b-shape --shape llama-7b-shape --new-tokens 64 \
        --repeats 5 --out independent.json
"""

from __future__ import annotations

import argparse
import json
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


def time_generate(model: Any, ids: torch.Tensor, new_tokens: int, repeats: int, warmups: int, **kwargs: Any) -> dict[str, Any]:
    """Median and spread of whole generate() calls timed with CUDA events; warm-up times apart."""
    args = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, attention_mask=torch.ones_like(ids), **kwargs)

    def once() -> float:
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        with torch.no_grad():
            out = model.generate(ids, **args)
        end.record()
        end.synchronize()
        assert out.shape[1] - ids.shape[1] == new_tokens, f"got {out.shape[1] - ids.shape[1]} tokens, not {new_tokens}"
        return start.elapsed_time(end)

    wall = time.perf_counter()
    warm = [once() for _ in range(warmups)]
    times = [once() for _ in range(repeats)]
    median = statistics.median(times)
    return {
        "median_ms": median,
        "min_ms": min(times),
        "max_ms": max(times),
        "times_ms": times,
        "warmup_ms": warm,
        "tokens_per_s": new_tokens / (median / 1000),
        "seconds": time.perf_counter() - wall,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", action="append", choices=sorted(SHAPES), required=True)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
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
        "repeats": args.repeats,
        "shapes": {},
    }
    for shape in args.shape:
        model = build(shape)
        ids = torch.randint(100, model.config.vocab_size, (1, args.prompt_tokens), device="cuda", generator=None)
        dynamic = time_generate(model, ids, args.new_tokens, args.repeats, 1, disable_compile=True)
        static = time_generate(model, ids, args.new_tokens, args.repeats, 2, cache_implementation="static")
        result["shapes"][shape] = {
            "dynamic_eager": dynamic,
            "static_auto_compile": static,
            "speedup": dynamic["median_ms"] / static["median_ms"],
        }
        print(f"{shape}: dynamic eager {dynamic['median_ms']:.1f} ms ({dynamic['tokens_per_s']:.0f} tok/s), "
              f"static+compile {static['median_ms']:.1f} ms ({static['tokens_per_s']:.0f} tok/s), "
              f"speedup {dynamic['median_ms'] / static['median_ms']:.2f}x", flush=True)
        del model
        torch.cuda.empty_cache()
    with open(args.out, "w", encoding="utf-8") as handle:
        json.dump(result, handle, indent=1)


if __name__ == "__main__":
    main()
