"""Processed scores compared beside raw logits (pytest_llmopt.verdicts.scores): the bound comes from the penalty alone."""

from __future__ import annotations

import torch

from pytest_llmopt.verdicts.equivalence import Generation
from pytest_llmopt.verdicts.scores import compare_scores


def _generation(tokens: list[int], logits: torch.Tensor, scores: torch.Tensor) -> Generation:
    prompt = torch.tensor([[1, 2]])
    return Generation(prompt, torch.cat([prompt, torch.tensor([tokens])], dim=1), logits, scores=scores)


def test_within_the_penalty_of_the_raw_difference_passes() -> None:
    logits = torch.tensor([[[2.0, 1.0, -1.0], [0.5, 3.0, 1.0]]])
    moved = logits + 1e-3
    scores = logits.clone()
    scores[0, 1, 0] = 0.5 / 1.3  # token 0 penalized on both sides
    moved_scores = moved.clone()
    moved_scores[0, 1, 0] = moved[0, 1, 0] / 1.3
    assert compare_scores(_generation([0, 1], logits, scores), _generation([0, 1], moved, moved_scores), 1.3) is None


def test_a_penalty_applied_on_one_side_only_is_named() -> None:
    logits = torch.tensor([[[2.0, 1.0, -1.0], [0.5, 3.0, 1.0]]])
    penalized = logits.clone()
    penalized[0, 1, 0] = 0.5 / 1.3
    problem = compare_scores(_generation([0, 1], logits, penalized), _generation([0, 1], logits, logits.clone()), 1.3)
    assert problem is not None and problem.startswith("row 0, new token 1: processed score of token 0")


def test_banned_tokens_that_differ_are_named() -> None:
    logits = torch.tensor([[[2.0, 1.0, -1.0]]])
    banned = logits.clone()
    banned[0, 0, 2] = float("-inf")
    problem = compare_scores(_generation([0], logits, logits.clone()), _generation([0], logits, banned), 1.3)
    assert problem == "row 0, new token 0: the banned tokens differ: 2 banned only on this path, none only on the plain path (a processor saw other input ids)"
