"""The copying prompt rests on prompts.lookup_draft predicting transformers' own prompt-lookup draft: checked
against the installed PromptLookupCandidateGenerator on random token streams, then copy_point on streams
whose repeats are known."""

from __future__ import annotations

import random

import pytest
import torch

from pytest_llmopt.running.prompts import copy_point, lookup_draft


def _transformers_draft(tokens: list[int], ngram: int, span: int) -> list[int]:
    from transformers.generation.candidate_generator import PromptLookupCandidateGenerator

    generator = PromptLookupCandidateGenerator(num_output_tokens=span, max_matching_ngram_size=ngram, max_length=10_000)
    ids = torch.tensor([tokens])
    candidates, _ = generator.get_candidates(ids)
    return candidates[0, len(tokens) :].tolist()


@pytest.mark.parametrize("seed", range(40))
def test_lookup_draft_is_what_transformers_drafts(seed: int) -> None:
    rng = random.Random(seed)
    tokens = [rng.randrange(1, 6 + seed % 10) for _ in range(rng.randrange(3, 40))]
    ngram, span = rng.choice([1, 2, 3]), rng.choice([1, 4, 10])
    assert lookup_draft(tokens, ngram, span) == _transformers_draft(tokens, ngram, span)


def test_copy_point_finds_the_first_full_repeat() -> None:
    prompt = [100, 101, 102]
    said = [5, 6, 7, 8, 9, 5, 6, 7, 8, 9, 5, 6]
    # After [5, 6, 7, 8, 9, 5] no 2-gram recurs, the 1-gram 5 does: the draft 6, 7, 8, 9 is what follows.
    assert copy_point(prompt, said, ngram=2, span=4) == (6, 4)


def test_copy_point_keeps_the_longest_partial_agreement() -> None:
    # Token 3 recurs once: after [.., 3] the draft is [4, 9, ...] and the model said [4, 7, ...]: one token agrees.
    assert copy_point([1, 2], [3, 4, 9, 6, 3, 4, 7, 8], ngram=2, span=4) == (5, 1)


def test_copy_point_none_when_nothing_repeats() -> None:
    assert copy_point([1, 2], [3, 4, 5, 6, 7], ngram=2, span=4) is None
