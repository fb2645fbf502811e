"""Continuous batching's plumbing across releases (batching.py) and the verdict on token answers (choices.py)."""

from __future__ import annotations

import pytest
import torch

from pytest_llmopt.running import batching
from pytest_llmopt.verdicts.choices import Floor, judge_answer


def test_config_names_the_page_size_as_this_release_does_and_leaves_none_to_it() -> None:
    pytest.importorskip("transformers.generation.continuous_batching")
    made = batching.config(8, num_blocks=None, max_batch_tokens=24, keep_attention=True)
    size = getattr(made, "page_size", None) or made.block_size
    assert size == 8 and made.max_batch_tokens == 24 and made.return_logprobs is True
    assert made.num_blocks is None  # left to the release's inference
    assert getattr(made, batching.SWITCH, False) is False or getattr(made, batching.KEEP) is True  # kept, either way
    assert getattr(batching.config(8), batching.SWITCH, True) is True  # the release's default otherwise


class _Config:
    _attn_implementation = "sdpa"


class _Model:
    """What kept_attention and page_size read of a model: its attention and device."""

    def __init__(self, attention: str, device: str = "cpu") -> None:
        self.config = _Config()
        self.config._attn_implementation = attention
        self.device = torch.device(device)
        self.set: list[str] = []

    def set_attn_implementation(self, name: str) -> None:
        self.set.append(name)
        self.config._attn_implementation = name


def test_kept_attention_pins_the_attention_where_the_release_cannot_and_restores_it() -> None:
    """Before auto_switch_to_flash (5.17), a model not yet paged is switched to FlashAttention: it runs as
    paged|<its attention> instead, and gets its own back."""
    asked = type("Asked", (), {batching.KEEP: True})()
    model = _Model("sdpa")
    with batching.kept_attention(model, asked):
        assert model.config._attn_implementation == "paged|sdpa"
    assert model.config._attn_implementation == "sdpa" and model.set == ["paged|sdpa", "sdpa"]
    for attention, cb_config in (("sdpa", object()), ("flash_attention_2", asked), ("paged|eager", asked)):
        untouched = _Model(attention)
        with batching.kept_attention(untouched, cb_config):
            pass
        assert untouched.set == []


def test_flash_attention_on_cuda_gets_pages_its_kernel_takes() -> None:
    assert batching.page_size(_Model("sdpa", "cpu"), 16) == 16
    assert batching.page_size(_Model("flash_attention_2", "cpu"), 16) == 16
    assert batching.page_size(_Model("flash_attention_2", "meta"), 16) == 16
    cuda = _Model("flash_attention_2")
    cuda.device = type("Device", (), {"type": "cuda"})()
    assert batching.page_size(cuda, 16) == 256 and batching.page_size(cuda, 300) == 512


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
