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


def agreeing_for(model: Any, tokens: int, prompt_length: int) -> Any:
    """A draft that proposes the target's own greedy token for the first ``tokens`` new tokens of a prompt of
    ``prompt_length`` tokens, and a wrong one (the contrarian roll) for every token after: greedy verification
    must accept exactly ``tokens`` of its drafts. Which token a logit predicts is read from what the forward
    call is given: its position ids, else a 2-D attention mask over past + current tokens, else the length
    of the cache after the call (batch 1, no padding: assisted decoding's case)."""
    draft = build(model, "self")
    forward = draft.forward
    first_wrong = prompt_length + tokens  # index (in the whole sequence) of the first token to get wrong

    def agreeing_forward(*args: Any, **kwargs: Any) -> Any:
        out = forward(*args, **kwargs)
        length = out.logits.shape[1]
        total = _sequence_length(kwargs, out)
        predicts = torch.arange(total - length + 1, total + 1, device=out.logits.device)
        wrong = (predicts >= first_wrong).view(1, -1, 1)
        out.logits = torch.where(wrong, torch.roll(out.logits, shifts=1, dims=-1), out.logits)
        return out

    draft.forward = agreeing_forward
    return draft


def _sequence_length(kwargs: dict[str, Any], out: Any) -> int:
    """Tokens in the sequence once this forward call's are in (past + current)."""
    positions = kwargs.get("position_ids")
    if positions is not None:
        return int(positions.reshape(-1)[-1]) + 1
    mask = kwargs.get("attention_mask")
    if isinstance(mask, torch.Tensor) and mask.dim() == 2:
        return int(mask.shape[-1])
    cache = kwargs.get("cache", kwargs.get("past_key_values", getattr(out, "past_key_values", None)))
    if cache is None or not hasattr(cache, "get_seq_length"):
        raise RuntimeError("agreeing draft: the forward call got no position ids, 2-D attention mask or cache, so the position of each logit is unknown")
    return int(cache.get_seq_length())
