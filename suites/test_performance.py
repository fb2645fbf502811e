"""Speed: every optimization that applies, timed against the plain path in the same session, and
compared with the stored baseline of this hardware and model (pytest_llmopt/perf.py says how).

Figures per check: ttft_ms (prefill), decode_ms (per token), tokens_per_s (end to end), speedup
(reference time / variant time, end to end) and decode_speedup, compile_s, spread; on CUDA also
peak_memory_bytes, the decode roofline (bytes read per token over the card's copy bandwidth:
roofline_floor_ms, roofline_pct) and CUDA-graph activity; acceptance_rate for prompt lookup.
A spread above the bound is "inconclusive"; a figure worse than its baseline beyond its tolerance fails.
"""

from __future__ import annotations

import pytest

PLAIN = {"cache": "dynamic", "compile": "off", "attention": "sdpa", "quant": "none"}


@pytest.mark.llmopt(cache=["dynamic", "static"], compile=["off", "auto"], reference=PLAIN)
def test_generate_speed(llmopt_case, llmopt_speed):
    """Dynamic cache (the reference itself: absolute figures), static cache eager, static cache with
    generate()'s auto-compile (CUDA graphs on CUDA): the guide's "up to 4x"."""
    llmopt_speed.check(llmopt_case)


@pytest.mark.llmopt(attention=["eager", "flash_attention_2"], reference=PLAIN)
def test_attention_speed(llmopt_case, llmopt_speed):
    """Attention implementations against SDPA, on the dynamic-cache path."""
    llmopt_speed.check(llmopt_case)


@pytest.mark.llmopt(reference=PLAIN)
def test_prompt_lookup_speed(llmopt_case, llmopt_speed):
    """Prompt-lookup decoding: per-token latency and the acceptance rate of its drafts."""
    llmopt_speed.check(llmopt_case, drafts=True, prompt_lookup_num_tokens=10)


@pytest.mark.llmopt(quant=["int8", "nf4"], reference=PLAIN)
def test_quantized_speed(llmopt_case, llmopt_speed):
    """bitsandbytes weights: slower per token than bf16 at batch 1, by how much is what the baseline keeps."""
    llmopt_speed.check(llmopt_case)
