"""The higher-precision reference copy loads the run model's own weights only: a 4.x kv-cache kept on the model
as a submodule (generate() keeps its static cache in ``model._cache``) must not reach the copy."""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache

from pytest_llmopt.running.reference import _weights


class _ModuleCache(torch.nn.Module, Cache):  # what a 4.x Cache is: an nn.Module with its tensors as buffers
    def __init__(self) -> None:
        torch.nn.Module.__init__(self)
        self.register_buffer("key_cache_0", torch.zeros(2, 3))


def test_a_cache_kept_on_the_model_is_left_out_of_the_weights() -> None:
    model = torch.nn.Module()
    model.lm_head = torch.nn.Linear(3, 4)
    model._cache = _ModuleCache()
    assert "_cache.key_cache_0" in model.state_dict()
    assert set(_weights(model)) == {"lm_head.weight", "lm_head.bias"}


def test_without_a_cache_every_weight_is_kept() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4))
    assert set(_weights(model)) == set(model.state_dict())
