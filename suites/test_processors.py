"""Real generation settings: greedy paths under the logits processors users set.

generate() runs with the model's own generation_config plus ``repetition_penalty=1.3`` and
``no_repeat_ngram_size=3`` (the other suites switch both off to compare raw paths). Every path equals plain
greedy under the same settings (tie-aware, as elsewhere), and its processed scores (``output_scores``) are
compared with the plain path's, not only its raw logits (pytest_llmopt.verdicts.scores): the same tokens banned at
every step, and no processed score further off than the penalty times its raw logit's difference. A path
that hands a processor the wrong ids (a draft's wrong slice, a stale length) shows there even where the
greedy choice happens to survive. Paths: static cache and StaticCache object on the padded batch,
generate()'s auto-compile, and (dynamic cache, batch 1, every prompt) a self draft, a contrarian draft and
prompt lookup, whose verification applies the processors once per draft position. Sampling under users'
warpers is checked in test_speculative.py (tempered draft, temperature 0.7, top-p 0.9).
"""

from __future__ import annotations

import pytest

from pytest_llmopt.api import LOOKUP, assistants, compare_scores, not_exercised, track_drafts

PENALTY = 1.3
SETTINGS = {"repetition_penalty": PENALTY, "no_repeat_ngram_size": 3, "output_scores": True}
SAID = f"repetition_penalty {PENALTY}, no_repeat_ngram_size 3"
PLAIN = {"cache": "dynamic", "compile": "off"}


def _compare(case, ids, mask, what: str, **extra) -> None:
    reference, target = case.reference, case.target
    with case.explain(f"{what}, plain path"):
        plain = reference.generate(ids, mask, case.new_tokens, **SETTINGS)
    with case.explain(what):
        got = target.generate(ids, mask, case.new_tokens, **SETTINGS, **extra)
    case.check_greedy(plain, got, what=f"{what}, {SAID}")
    problem = compare_scores(plain, got, PENALTY)
    if problem is not None:
        pytest.fail(f"{case.label} ({what}, {SAID}): processed scores (output_scores): {problem}", pytrace=False)


def _batch(case, what: str) -> None:
    ids, mask = case.target.encode([p.text for p in case.prompts])
    _compare(case, ids, mask, what)


@pytest.mark.llmopt(cache=["static", "static-object"], reference=PLAIN)
def test_static_cache_under_processors_matches_plain(llmopt_case):
    """A static cache on the padded batch, under users' processors: tokens and processed scores."""
    _batch(llmopt_case, "padded batch")


@pytest.mark.llmopt(cache="static", compile="auto", reference=PLAIN)
def test_compiled_under_processors_matches_plain(llmopt_case):
    """generate()'s auto-compile on the padded batch, under users' processors."""
    _batch(llmopt_case, "padded batch")


@pytest.mark.llmopt(reference=PLAIN, known_issues=["sliding-cache-shifts-one-slot"])
def test_drafts_under_processors_match_plain(llmopt_case):
    """Self draft, contrarian draft and prompt lookup under users' processors (batch 1, every prompt):
    verification applies the processors to each draft position with that position's ids."""
    case = llmopt_case
    target = case.target
    with track_drafts() as drafts:
        for prompt in case.prompts:
            ids, mask = target.encode(prompt.text)
            _compare(case, ids, mask, f"self draft, prompt {prompt.name!r}", assistant_model=assistants.build(target.model, "self"))
    for prompt in case.prompts:
        ids, mask = target.encode(prompt.text)
        _compare(case, ids, mask, f"contrarian draft, prompt {prompt.name!r}", assistant_model=assistants.build(target.model, "contrarian"))
        _compare(case, ids, mask, f"prompt lookup, prompt {prompt.name!r}", **LOOKUP)
    case.record(**drafts.figures())
    if drafts.accepted == 0:
        not_exercised(f"the self draft had 0 of {drafts.proposed} draft tokens accepted under the processors: no draft position was verified")
