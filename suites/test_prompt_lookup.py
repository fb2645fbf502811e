"""Prompt-lookup decoding: drafts copied from the prompt's n-grams; greedy output equals plain greedy,
and sampling with it draws from the model's own distribution.

Runs on grounded prompts (summaries, code: continuations that copy from the prompt) and on a prompt the
model provably copies from: a built-in prompt followed by the model's own greedy continuation, cut where
prompt lookup's draft is what the model says next (prompts.copy_point), so drafts are accepted and the code
that commits them runs. Each built-in grounded prompt ends with an n-gram that
occurs earlier in it, so a lookup that proposes nothing is a failure; one whose drafts are never accepted
is "not exercised", never a pass.
"""

from __future__ import annotations

import pytest
import torch

from pytest_llmopt.api import LOOKUP, copy_point, grounded, not_exercised, track_drafts

SAMPLES, SAMPLE_TOKENS = 50, 32  # 1,600 PIT values in 50 generate calls (each token of a continuation is its own value)
SEARCH_TOKENS = 256  # how far each prompt's plain greedy continuation is searched for a repeat
_COPYING: dict[tuple, tuple[torch.Tensor, str] | None] = {}  # per model and session settings: searched once


def copying_prompt(case, runner) -> tuple[torch.Tensor, str] | None:
    """Token ids [1, T] of a prompt the model copies from, and where it comes from: a built-in prompt and its
    own greedy continuation, cut where prompt lookup's draft is what the model says next (prompts.copy_point;
    the prompt whose cut accepts most). None when no continuation ever repeats itself that way."""
    key = (case.spec, runner.variant.attention, case.dtype, case.device_type, case.seed)
    if key in _COPYING:
        return _COPYING[key]
    best: tuple[int, torch.Tensor, str] | None = None
    for prompt in case.prompts:
        ids, _ = runner.encode(prompt.text)
        room = SEARCH_TOKENS if case.max_positions is None else case.max_positions - ids.shape[1] - case.new_tokens - 1
        if room < 8:
            continue
        with case.explain(f"plain greedy continuation of {prompt.name!r}"):
            said = runner.generate(ids, None, min(SEARCH_TOKENS, room)).new_tokens[0].tolist()
        found = copy_point(ids[0].tolist(), said, LOOKUP["max_matching_ngram_size"], LOOKUP["prompt_lookup_num_tokens"])
        if found is not None and (best is None or found[1] > best[0]):
            cut, accepted = found
            tail = torch.tensor([said[:cut]], dtype=ids.dtype, device=ids.device)
            best = (accepted, torch.cat([ids, tail], dim=1), f"{prompt.name!r} + its first {cut} greedy tokens, {accepted} copyable")
            if accepted == LOOKUP["prompt_lookup_num_tokens"]:
                break
    _COPYING[key] = None if best is None else (best[1], best[2])
    return _COPYING[key]


@pytest.mark.llmopt(cache=["dynamic", "static"], reference={"cache": "dynamic"}, known_issues=["prompt-lookup-overruns-static-cache"])
def test_greedy_matches_plain_greedy(llmopt_case):
    """Greedy with prompt lookup equals plain greedy on every grounded prompt and on a prompt the model
    copies from; drafts must be proposed, and accepted, or the path is not exercised."""
    case = llmopt_case
    reference, target = case.reference, case.target
    inputs = [target.encode(p.text) for p in grounded(case.prompts)]
    copying = copying_prompt(case, reference)
    if copying is not None:
        inputs.append((copying[0], torch.ones_like(copying[0])))
    plain, got = [], []
    with track_drafts() as drafts:
        for ids, mask in inputs:
            plain.append(reference.generate(ids, mask, case.new_tokens))
            got.append(target.generate(ids, mask, case.new_tokens, **LOOKUP))
        what = "the grounded ones" + (f", and the copying one: {copying[1]}" if copying else "")
        case.check_greedy(plain, got, what=f"prompt lookup, each prompt alone ({what})")
    case.record(**drafts.figures())
    assert drafts.proposed > 0, (
        f"{case.label}: prompt lookup proposed no draft token on grounded prompts, so nothing was verified "
        "(n-gram matching is broken, or the prompts repeat no n-gram)"
    )
    if drafts.accepted == 0:
        why = "no built-in prompt's greedy continuation repeats itself" if copying is None else f"not even on the copying prompt ({copying[1]})"
        not_exercised(f"prompt lookup: 0 of {drafts.proposed} draft tokens accepted ({why}): the commit of accepted drafts never ran")


@pytest.mark.llmopt(reference={})
def test_sampling_keeps_the_distribution(llmopt_case):
    """Sampling with prompt lookup (a draft is kept only where the sampled token equals it) draws from the
    model's own distribution: Kolmogorov-Smirnov on PIT values, alpha 1e-3. On the copying prompt, so
    drafts are accepted; a run where none is accepted is not exercised."""
    case = llmopt_case
    copying = copying_prompt(case, case.target)
    if copying is None:
        prompt = grounded(case.prompts)[0]
        ids, what = case.target.encode(prompt.text)[0], f"prompt {prompt.name!r}"
    else:
        ids, what = copying[0], f"copying prompt ({copying[1]})"
    with track_drafts() as drafts:
        case.check_distribution(case.target, ids, SAMPLES, SAMPLE_TOKENS, what=f"prompt lookup, {what}", **LOOKUP)
    case.record(**drafts.figures())
    if drafts.accepted == 0:
        not_exercised(f"prompt lookup sampling: 0 of {drafts.proposed} draft tokens accepted on the {what}")
