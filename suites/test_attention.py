"""Attention implementations and SDPA backends against eager attention, the reference.

On logits (every real position of a left-padded batch) and on generation, each judged against the
model's own rounding-noise floor (equivalence.py), with an attention mask, and on a long prompt (past the sliding window of the models that
have one). Implementations the model does not declare, or the machine cannot run, are skipped.
"""

from __future__ import annotations

import pytest

from pytest_llmopt.api import ATTENTIONS, greedy_each_prompt, long_prompt, not_run

CANDIDATES = [name for name in ATTENTIONS if name != "eager"]
TO_EAGER = {"attention": "eager"}
FLEX_CPU = ["torch-flex-attention-cpu-codegen"]
FLEX_CPU_UNPADDED = ["torch-flex-attention-cpu-codegen:unpadded"]  # a prompt alone: only where its mask is beyond causal
# Upstream bugs of one architecture (known_issues: each names the models it hits): Gemma2 in 4.x.
SOFTCAP = ["sdpa-ignores-attention-softcap"]
GEMMA2_FLEX_FORWARD = ["gemma2-flex-mask-as-tensor"]
# GPT-Neo and GPT-2 with flash_attention_2 (one window ignored, a 4D slice of a 2D mask, is_causal dropped with a mask);
# GPT-2's needs padding: a prompt alone passes (4.57.6, H100).
FLASH_GPTNEO = ["gptneo-flash-attention-ignores-local-window", "gptneo-flash-attention-4d-mask-slice"]
FLASH = [*FLASH_GPTNEO, "gpt2-flash-attention-not-causal-with-mask"]
LONG_TOKENS = {"cpu": 384, "cuda": 2048}


def _batch(case, runner):
    ids, mask = runner.encode([p.text for p in case.prompts])
    if bool(mask.all()):
        not_run("the prompts tokenize to equal lengths: no padding to check")
    return ids, mask


@pytest.mark.llmopt(attention=CANDIDATES, reference=TO_EAGER, known_issues=[*SOFTCAP, *GEMMA2_FLEX_FORWARD, *FLASH])
def test_logits_match_eager(llmopt_case):
    """One forward pass over a left-padded batch: logits at every real position match eager's."""
    case = llmopt_case
    reference, target = case.reference, case.target
    ids, mask = _batch(case, target)
    case.check_logits(reference.forward_logits(ids, mask), target.forward_logits(ids, mask), ids, mask, what="padded batch")


@pytest.mark.llmopt(attention=CANDIDATES, reference=TO_EAGER, known_issues=[*FLEX_CPU_UNPADDED, *SOFTCAP, *GEMMA2_FLEX_FORWARD, *FLASH_GPTNEO])
def test_single_prompt_matches_eager(llmopt_case):
    """Each prompt alone (no padding, so no mask: the case every SDPA kernel, flash included, supports):
    logits of the prompt and the greedy continuation match eager's."""
    case = llmopt_case
    reference, target = case.reference, case.target

    def logits(prompt, ids, mask):
        case.check_logits(reference.forward_logits(ids, mask), target.forward_logits(ids, mask), ids, mask, what=f"prompt {prompt.name!r}")

    greedy_each_prompt(case, each=logits)


@pytest.mark.llmopt(attention=CANDIDATES, reference=TO_EAGER, known_issues=[*FLEX_CPU, *SOFTCAP, "gemma2-flex-4d-mask-in-generate", *FLASH])
def test_generation_matches_eager(llmopt_case):
    """Greedy generation of a left-padded batch equals eager's, up to near-ties."""
    case = llmopt_case
    reference, target = case.reference, case.target
    ids, mask = _batch(case, target)
    case.check_greedy(reference.generate(ids, mask, case.new_tokens), target.generate(ids, mask, case.new_tokens))


@pytest.mark.llmopt(attention=CANDIDATES, reference=TO_EAGER, known_issues=[*FLEX_CPU, *SOFTCAP, *GEMMA2_FLEX_FORWARD, *FLASH])
def test_long_prompt_matches_eager(llmopt_case):
    """A long prompt next to a shorter one (so, padded): logits and generation match eager's."""
    case = llmopt_case
    reference, target = case.reference, case.target
    limit = case.max_positions or 4096
    length = min(LONG_TOKENS[case.device_type], limit - case.new_tokens - 8)
    text = long_prompt(target.tokenizer, length)
    ids, mask = target.encode([text, long_prompt(target.tokenizer, length // 2)])
    case.check_logits(reference.forward_logits(ids, mask), target.forward_logits(ids, mask), ids, mask, what=f"prompt of {ids.shape[1]} tokens")
    case.check_greedy(
        reference.generate(ids, mask, case.new_tokens),
        target.generate(ids, mask, case.new_tokens),
        what=f"prompt of {ids.shape[1]} tokens",
    )

