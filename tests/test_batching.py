"""Continuous batching's plumbing across releases (batching.py) and the verdict on token answers (choices.py)."""

from __future__ import annotations

import pytest
import torch

from pytest_llmopt import batching
from pytest_llmopt.choices import Floor, judge_answer


def test_config_names_the_page_size_as_this_release_does_and_leaves_none_to_it() -> None:
    pytest.importorskip("transformers.generation.continuous_batching")
    made = batching.config(8, num_blocks=None, max_batch_tokens=24, auto_switch_to_flash=False)
    size = getattr(made, "page_size", None) or made.block_size
    assert size == 8 and made.max_batch_tokens == 24 and made.return_logprobs is True
    assert made.num_blocks is None  # left to the release's inference


class _Tokenizer:
    def decode(self, ids: list[int], **kwargs: object) -> str:
        return " ".join(f"t{i}" for i in ids)


FLOOR = Floor(max_abs=0.01, logprob_max=0.001, logprob_rms=0.0005)


def _judge(tokens: list[int], logits: torch.Tensor, logprobs: list[float] | None = None, length: int | None = None) -> str:
    return judge_answer("r", [1, 2], tokens, logprobs, len(tokens) if length is None else length, logits, tokens, FLOOR, 2.0, _Tokenizer()).problem


def test_a_token_the_reference_ranks_below_its_best_by_more_than_the_noise_fails() -> None:
    logits = torch.tensor([[0.0, 1.0, 0.95], [2.0, 0.0, 0.0]])
    assert _judge([1, 0], logits) == ""
    near_tie = torch.tensor([[0.0, 1.0, 1.03], [2.0, 0.0, 0.0]])  # 0.03 below: within 2 x 2 x 0.01
    assert _judge([1, 0], near_tie) == ""
    problem = _judge([2, 0], logits.clone().index_fill_(1, torch.tensor([2]), 0.5))
    assert "new token 0 is 't2' (id 2), which the higher-precision reference puts 0.5 below its best, 't1' (id 1)" in problem


def test_log_probabilities_beyond_the_floor_fail_and_a_wrong_length_fails() -> None:
    logits = torch.tensor([[0.0, 1.0, 0.0]])
    exact = float(torch.log_softmax(logits.double(), -1)[0, 1])
    assert _judge([1], logits, [exact + 0.0009]) == ""  # within 2 x 0.001 (largest) and 2 x 0.0005 (RMS)
    assert "log-probabilities left the noise floor" in _judge([1], logits, [exact + 0.01])
    assert "answered 1 token(s), the request allows exactly 2 here" in _judge([1], logits, length=2)
