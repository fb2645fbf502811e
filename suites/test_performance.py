"""Speed: every optimization that applies, timed in one interleaved campaign per model against the plain path,
and judged against the stored baseline of this card and stack (pytest_llmopt/wiring/perf.py says how).

Two more checks time a request mix (throughput.py) instead of the one prompt: plain generate() on it as one
padded batch and continuous batching's generate_batch, each against the requests one by one (speedup is then
the throughput ratio; tokens_per_s and reference_tokens_per_s beside it).

Figures per check: decode_speedup and speedup (paired per round over the plain path, with their intervals), on
CUDA gpu_ms_per_token (the GPU's own work per token) and gpu_busy_pct (what bounds the path: the GPU or the
host), peak_memory_bytes and the decode roofline; acceptance_rate for prompt lookup; compile_s apart; step_ms,
ttft_ms and tokens_per_s for information. The plain path's own check gives its absolute figures and the A/A
noise of the session. A regression fails; a check none of whose figures could decide is "inconclusive" with
the smallest slowdown it could have detected.
"""

from __future__ import annotations

import pytest

PLAIN = {"cache": "dynamic", "compile": "off", "attention": "sdpa", "quant": "none"}


@pytest.mark.llmopt(cache=["dynamic", "static"], compile=["off", "auto"], reference=PLAIN)
def test_generate_speed(llmopt_case, llmopt_speed):
    """Dynamic cache (the reference itself: absolute figures and the A/A noise), static cache eager, static cache
    with generate()'s auto-compile (CUDA graphs on CUDA): the guide's "up to 4x"."""
    llmopt_speed.check(llmopt_case)


@pytest.mark.llmopt(attention=["eager", "flash_attention_2"], reference=PLAIN)
def test_attention_speed(llmopt_case, llmopt_speed):
    """Attention implementations against SDPA, on the dynamic-cache path."""
    llmopt_speed.check(llmopt_case)


@pytest.mark.llmopt(reference=PLAIN)
@pytest.mark.llmopt_speed(prompt_lookup_num_tokens=10)
def test_prompt_lookup_speed(llmopt_case, llmopt_speed):
    """Prompt-lookup decoding: per-token latency and the acceptance rate of its drafts."""
    llmopt_speed.check(llmopt_case)


@pytest.mark.llmopt(quant=["int8", "nf4"], reference=PLAIN)
def test_quantized_speed(llmopt_case, llmopt_speed):
    """bitsandbytes weights: slower per token than bf16 at batch 1, by how much is what the baseline keeps."""
    llmopt_speed.check(llmopt_case)


@pytest.mark.llmopt(reference=PLAIN)
@pytest.mark.llmopt_speed(requests="batched")
def test_batched_throughput(llmopt_case, llmopt_speed):
    """A request mix (prompts of several lengths, pytest_llmopt/running/throughput.py) as one left-padded batch through plain
    generate(), against the same requests one by one: throughput ratio."""
    llmopt_speed.check(llmopt_case)


@pytest.mark.llmopt(reference=PLAIN)
@pytest.mark.llmopt_speed(requests="continuous")
def test_continuous_batching_throughput(llmopt_case, llmopt_speed):
    """The same request mix through generate_batch (continuous batching over a paged cache, the release's defaults),
    against the requests one by one."""
    llmopt_speed.check(llmopt_case)
