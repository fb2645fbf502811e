"""Draft models for speculative decoding, made from the target itself so that they work for any model.

* ``self``: the target as its own draft; every greedy draft token must be accepted.
* ``contrarian``: the target with its output logits rolled by one token; its greedy draft is never the
  target's choice, so every draft must be rejected (and its sampling distribution q differs from p
  everywhere, which exercises the residual max(p - q, 0) of speculative sampling).

Both share the target's weights (a shallow copy with its own head and generation config): no memory
is added, which matters for a 7B model on a GPU runner. Drafting is set to a constant 4 tokens with
no confidence cut-off, so every verification step checks several tokens.
"""

from __future__ import annotations

import copy
from typing import Any

import torch

KINDS = ("self", "contrarian")
DRAFT_TOKENS = 4


class RolledHead(torch.nn.Module):
    """The wrapped head's logits, rolled by one position along the vocabulary (a derangement)."""

    def __init__(self, head: torch.nn.Module) -> None:
        super().__init__()
        self.head = head

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return torch.roll(self.head(hidden), shifts=1, dims=-1)


def build(model: Any, kind: str) -> Any:
    """A draft model of ``kind`` sharing ``model``'s weights."""
    if kind not in KINDS:
        raise ValueError(f"unknown assistant kind {kind!r}; known: {KINDS}")
    draft = copy.copy(model)
    draft._modules = dict(model._modules)  # own module table: swapping the head leaves the target alone
    draft.generation_config = copy.deepcopy(model.generation_config)
    configure_drafting(draft)
    if kind == "contrarian":
        head = model.get_output_embeddings()
        names = [name for name, module in model._modules.items() if module is head]
        if not names:
            raise ValueError(f"{type(model).__name__}: the output head is not a direct child; cannot build a contrarian draft")
        draft._modules[names[0]] = RolledHead(head)
    return draft


def configure_drafting(draft: Any) -> None:
    """Constant drafts of DRAFT_TOKENS tokens, never cut short by the draft's confidence."""
    config = draft.generation_config
    config.num_assistant_tokens = DRAFT_TOKENS
    config.num_assistant_tokens_schedule = "constant"
    if hasattr(config, "assistant_confidence_threshold"):
        config.assistant_confidence_threshold = 0.0
