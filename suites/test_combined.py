"""Axes combined: every attention implementation x cache kind x compile mode at once, on a padded batch that
generates past the sliding window of the models that have one.

The other suites vary one axis from the plain path; bugs live where axes meet (a static sliding-window
layer rolling over under flex attention, a compiled decode step over a padded row past its window). Each
combination runs the left-padded batch of the built-in prompts for enough new tokens that every row ends
at least WINDOW_MARGIN tokens past the window (the usual new-token count for a model without one), and is
judged against the plain path (dynamic cache, eager attention, no compile) on its rounding-noise floor,
tie-aware (equivalence.py). Compile modes on a padded batch: off and generate()'s auto-compile (the
hand-written decode loop takes no padding: test_compile.py).
"""

from __future__ import annotations

import pytest

from pytest_llmopt.api import cache_layout, not_run

CACHES = ["dynamic", "static", "static-object"]
ATTENTIONS = ["eager", "sdpa", "flash_attention_2", "flex_attention"]
PLAIN = {"cache": "dynamic", "compile": "off", "attention": "eager"}
# Upstream issues these combinations meet (pytest_llmopt.running.known_issues names the models and releases).
KNOWN = ["torch-flex-attention-cpu-codegen", "torch-flex-attention-cpu-decode", "sdpa-ignores-attention-softcap", "gemma2-flex-4d-mask-in-generate",
         "gptneo-flash-attention-ignores-local-window", "gptneo-flash-attention-4d-mask-slice", "gpt2-flash-attention-not-causal-with-mask"]
WINDOW_MARGIN = 8


@pytest.mark.llmopt(cache=CACHES, attention=ATTENTIONS, compile=["off", "auto"], reference=PLAIN, known_issues=KNOWN)
def test_padded_batch_past_the_window_matches_plain(llmopt_case):
    """The padded batch on this attention x cache x compile combination: tokens and logits equal the plain
    path's, past the sliding window where the model has one."""
    case = llmopt_case
    reference, target = case.reference, case.target
    ids, mask = target.encode([p.text for p in case.prompts])
    if bool(mask.all()):
        not_run("the prompts tokenize to equal lengths: no padded batch")
    window = cache_layout(target.model.config).window
    new_tokens = case.new_tokens
    if window is not None:
        shortest = int(mask.sum(1).min())
        new_tokens = max(new_tokens, window + WINDOW_MARGIN - shortest)
        if case.max_positions is not None and ids.shape[1] + new_tokens > case.max_positions:
            not_run(f"the model takes {case.max_positions} positions: too few to generate past its window of {window}")
    what = f"padded batch, {new_tokens} new tokens" + (f", every row past the sliding window of {window}" if window else "")
    with case.explain(f"{what}, plain path"):
        plain = reference.generate(ids, mask, new_tokens)
    with case.explain(what):
        got = target.generate(ids, mask, new_tokens)
    case.record(window=window, new_tokens=new_tokens)
    case.check_greedy(plain, got, what=what)
