"""The sampling checks' reference applies users' settings with the plugin's own code (runner.penalized, the
top-k and top-p of Runner.exact_probs): it must equal transformers' processors, or the KS test judges
against the wrong distribution."""

from __future__ import annotations

import torch
from transformers import RepetitionPenaltyLogitsProcessor, TopKLogitsWarper, TopPLogitsWarper

from pytest_llmopt.running.runner import nucleus, penalized


def test_repetition_penalty_equals_transformers_at_every_position() -> None:
    torch.manual_seed(0)
    ids = torch.randint(0, 12, (3, 9))
    logits = torch.randn(3, 4, 12, dtype=torch.float64)  # predicting ids[:, 5:]
    ours = penalized(logits, ids, 5, 1.2)
    theirs = RepetitionPenaltyLogitsProcessor(1.2)
    for step in range(4):
        expected = theirs(ids[:, : 5 + step], logits[:, step].clone())
        assert torch.allclose(ours[:, step], expected)


def test_top_k_then_top_p_equal_transformers() -> None:
    torch.manual_seed(1)
    logits = torch.randn(5, 50, dtype=torch.float64)
    logits[0, 3] = logits[0, 4]  # a tie at the k-th value is kept by both
    kth = logits.topk(7, dim=-1).values[..., -1:]
    ours = nucleus(torch.softmax(logits.masked_fill(logits < kth, float("-inf")), dim=-1), 0.9)
    warped = TopPLogitsWarper(0.9)(None, TopKLogitsWarper(7)(None, logits.clone()))
    assert torch.allclose(ours, torch.softmax(warped, dim=-1))
