"""Draft models for speculative decoding, made from the target itself so that they work for any model.

* ``self``: the target as its own draft; every greedy draft token must be accepted.
* ``contrarian``: the target with its output logits rolled by one token; its greedy draft is never the
  target's choice, so every draft must be rejected (and its sampling distribution q differs from p
  everywhere, which exercises the residual max(p - q, 0) of speculative sampling).
* ``tempered``: the target with its logits halved (temperature 2): q overlaps p without equalling it, so
  sampling accepts some drafts and rejects others, where an error in the acceptance ratio min(1, p/q)
  shows (with the self draft every ratio is 1, with the contrarian one nearly 0).

Both share the target's weights (a shallow copy with its own head and generation config): no memory
is added, which matters for a 7B model on a GPU runner. Drafting is set to a constant 4 tokens with
no confidence cut-off, so every verification step checks several tokens.
"""

from __future__ import annotations

import copy
import functools
from typing import Any

import torch

KINDS = ("self", "contrarian", "tempered")
SAMPLING_KINDS = ("contrarian", "tempered")  # the self draft accepts everything: no ratio to get wrong
DRAFT_TOKENS = 4


class RolledHead(torch.nn.Module):
    """The wrapped head's logits, rolled by one position along the vocabulary (a derangement)."""

    def __init__(self, head: torch.nn.Module) -> None:
        super().__init__()
        self.head = head

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return torch.roll(self.head(hidden), shifts=1, dims=-1)


class TemperedHead(torch.nn.Module):
    """The wrapped head's logits times ``factor`` (0.5: the distribution at temperature 2)."""

    def __init__(self, head: torch.nn.Module, factor: float = 0.5) -> None:
        super().__init__()
        self.head = head
        self.factor = factor

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.head(hidden) * self.factor


def build(model: Any, kind: str, tokens: int | None = None) -> Any:
    """A draft model of ``kind`` sharing ``model``'s weights, proposing ``tokens`` (default DRAFT_TOKENS) at a time."""
    if kind not in KINDS:
        raise ValueError(f"unknown assistant kind {kind!r}; known: {KINDS}")
    draft = copy.copy(model)
    draft._modules = dict(model._modules)  # own module table: swapping the head leaves the target alone
    draft.generation_config = copy.deepcopy(model.generation_config)
    configure_drafting(draft, tokens or DRAFT_TOKENS)
    if kind in ("contrarian", "tempered"):
        head = model.get_output_embeddings()
        names = [name for name, module in model._modules.items() if module is head]
        if not names:
            raise ValueError(f"{type(model).__name__}: the output head is not a direct child; cannot build a {kind} draft")
        draft._modules[names[0]] = RolledHead(head) if kind == "contrarian" else TemperedHead(head)
    return draft


def configure_drafting(draft: Any, tokens: int = DRAFT_TOKENS) -> None:
    """Constant drafts of ``tokens`` tokens, never cut short by the draft's confidence."""
    config = draft.generation_config
    config.num_assistant_tokens = tokens
    config.num_assistant_tokens_schedule = "constant"
    if hasattr(config, "assistant_confidence_threshold"):
        config.assistant_confidence_threshold = 0.0


def agreeing_for(model: Any, tokens: int, prompt_length: int) -> Any:
    """A draft that proposes the target's own greedy token for the first ``tokens`` new tokens of a prompt of
    ``prompt_length`` tokens, and a wrong one (its least likely token) for every token after: greedy verification
    must accept exactly ``tokens`` of its drafts. Which token a logit predicts is read from what the forward
    call is given: its position ids, else a 2-D attention mask over past + current tokens, else the length
    of the cache after the call (batch 1, no padding: assisted decoding's case)."""
    draft = build(model, "self")
    forward = draft.forward
    first_wrong = prompt_length + tokens  # index (in the whole sequence) of the first token to get wrong

    # generate() reads forward's signature to decide which inputs to build (and whether to slice the ids its cache
    # holds): a bare (*args, **kwargs) makes the draft re-run its whole input every round.
    @functools.wraps(forward)
    def agreeing_forward(*args: Any, **kwargs: Any) -> Any:
        out = forward(*args, **kwargs)
        length = out.logits.shape[1]
        total = _sequence_length(kwargs, out)
        predicts = torch.arange(total - length + 1, total + 1, device=out.logits.device)
        wrong = (predicts >= first_wrong).view(1, -1, 1)
        # The wrong choice is the target's least likely token (negated logits), never its choice. A rolled
        # one (argmax id + 1, as the contrarian draft has) was accepted once on tiny-gptneo, seed 1 (4 where 3
        # agree): generate()'s processors act on the draft's logits too, and after them the rolled argmax can move.
        out.logits = torch.where(wrong, -out.logits, out.logits)
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


def renumbered_twin(model: Any, tokenizer: Any) -> tuple[Any, Any] | None:
    """The target under another tokenizer: the same BPE with every ordinary token's id moved (a rotation;
    special tokens keep theirs), and a draft that maps ids back before the target's forward and forward
    again on its logits. Its drafts are the target's own greedy choices wherever re-tokenizing the text
    gives the same tokens, so universal assisted decoding must accept them: a built-in pair of different
    vocabularies whose acceptance is known. None when the tokenizer is not a BPE ``tokenizers`` one."""
    import json

    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    doc = json.loads(backend.to_str())
    vocab = doc.get("model", {}).get("vocab")
    if doc.get("model", {}).get("type") != "BPE" or not isinstance(vocab, dict):
        return None
    special = {int(t["id"]) for t in doc.get("added_tokens", [])}
    ordinary = sorted(i for i in vocab.values() if i not in special)
    if len(ordinary) < 2:
        return None
    new_of_old = {old: ordinary[(k + 1) % len(ordinary)] for k, old in enumerate(ordinary)}
    doc["model"]["vocab"] = {token: new_of_old.get(i, i) for token, i in vocab.items()}
    twin_tokenizer = _fast_tokenizer(json.dumps(doc), tokenizer)

    size = model.config.get_text_config().vocab_size
    old_of_new = torch.arange(size)
    for old, new in new_of_old.items():
        old_of_new[new] = old
    draft = copy.copy(model)
    draft._modules = dict(model._modules)
    draft.generation_config = copy.deepcopy(model.generation_config)
    # transformers tells vocabularies apart by their size: one more id, never drawn (-inf), makes the twin "other".
    draft.config = copy.deepcopy(model.config)
    draft.config.get_text_config().vocab_size = size + 1
    configure_drafting(draft)
    forward = type(model).forward.__get__(draft)
    index = old_of_new.to(model.device)

    @functools.wraps(forward)  # generate() reads forward's signature to decide which inputs to build
    def renumbered_forward(input_ids: torch.Tensor | None = None, **kwargs: Any) -> Any:
        out = forward(input_ids=None if input_ids is None else index[input_ids.clamp(max=size - 1)], **kwargs)
        logits = out.logits.index_select(-1, index)
        out.logits = torch.cat([logits, torch.full_like(logits[..., :1], float("-inf"))], dim=-1)
        return out

    draft.forward = renumbered_forward
    return draft, twin_tokenizer


def _fast_tokenizer(serialized: str, like: Any) -> Any:
    """A PreTrainedTokenizerFast over ``serialized`` with the special tokens and padding side of ``like``."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    specials = {k: getattr(like, k) for k in ("bos_token", "eos_token", "unk_token", "pad_token") if getattr(like, k, None) is not None}
    fast = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(serialized), **specials)
    fast.padding_side = like.padding_side
    return fast
