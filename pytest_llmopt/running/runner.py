"""How a variant is run: generate() with the variant's cache, compile mode, attention and SDPA backend,
or the hand-written static-cache decode loop of the transformers guide.

Every run forces its output length (EOS kept defined but suppressed at every step) and returns the
raw logits of each new token, so two runs can be compared token by token. Every generate() call must
leave the model's config, generation_config and attention implementation as it found them
(StateLeftBehindError otherwise): the plugin repairs nothing between calls.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..common import outcomes
from ..common.phases import timed
from ..verdicts.equivalence import Generation
from . import compat, hybrid
from .instrumentation import StateLeftBehindError, cache_substitution, model_state, state_changes, transformers_log
from .machine import Machine
from .models import Loaded, ModelSpec, ModelStore
from .variants import Variant


@dataclass
class Runner:
    """One model under one variant. Attention and SDPA backend are (re)applied on every call, because
    the model object is shared with other variants of the session."""

    store: ModelStore
    spec: ModelSpec
    variant: Variant
    machine: Machine

    @property
    def loaded(self) -> Loaded:
        return self.store.load(self.spec, self.variant.attn_implementation, self.variant.quant)

    @property
    def model(self) -> Any:
        return self.loaded.model

    @property
    def tokenizer(self) -> Any:
        return self.store.tokenizer(self.spec)

    @property
    def eos_ids(self) -> list[int]:
        eos = self.model.generation_config.eos_token_id
        if eos is None:
            eos = self.tokenizer.eos_token_id
        return [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos]) if e is not None]

    @property
    def textless_ids(self) -> list[int]:
        """Ids past the tokenizer (a random shape's embedding is padded beyond it): they have no text, so no
        re-tokenization can carry them and no stop string can be made of them."""
        return list(range(len(self.tokenizer), self.model.config.get_text_config().vocab_size))

    @contextlib.contextmanager
    def active(self) -> Iterator[Any]:
        """The model with this variant's attention in effect, under torch.no_grad (inference tensors could not be reset by the caller)."""
        model = self.model
        with compat.sdpa_backend(self.variant.sdpa_backend), torch.no_grad():
            yield model

    @contextlib.contextmanager
    def refusals_skip(self) -> Iterator[None]:
        """A combination that transformers or torch refuses outright is skipped as unsupported."""
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            try:
                yield
            except (ValueError, RuntimeError) as exc:
                reason = outcomes.refusal(exc, self.variant.sdpa_backend)
                if reason is None:
                    raise
                said = [str(w.message).split(" (Triggered internally")[0] for w in seen if "kernel" in str(w.message) or "support" in str(w.message)]
                outcomes.unsupported(reason + (f"; torch says: {'; '.join(dict.fromkeys(said))}" if said else ""))
        for w in seen:  # not a refusal: hand the warnings on as pytest would have seen them
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)

    def encode(self, texts: Sequence[str] | str) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids and attention mask, left-padded, on the model's device."""
        batch = [texts] if isinstance(texts, str) else list(texts)
        enc = self.tokenizer(batch, return_tensors="pt", padding=True)
        device = self.model.device
        return enc["input_ids"].to(device), enc["attention_mask"].to(device)

    @timed("generate")
    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        new_tokens: int,
        do_sample: bool = False,
        force: torch.Tensor | None = None,
        **extra: Any,
    ) -> Generation:
        """Generate exactly ``new_tokens`` tokens on this variant's path; with ``force`` [B, N], each step's
        choice is forced to those tokens (teacher forcing) while its raw logits are kept. The result can
        ``replay`` itself teacher-forced (see equivalence.Generation)."""
        if self.variant.compile in ("default", "reduce-overhead"):
            if do_sample or extra:
                raise ValueError("the hand-written compiled decode loop is greedy and takes no extra arguments")
            return self.decode_loop(input_ids, new_tokens, compile_mode=self.variant.compile, force=force)
        # A cache object handed in was filled by this call: a replay gets a fresh one, made the same way.
        replay_extra = {k: v for k, v in extra.items() if k != "cache_object"}
        kwargs = compat.generate_kwargs(
            new_tokens=new_tokens,
            cache=self.variant.cache,
            compile_mode=self.variant.compile,
            device_type=self.machine.device_type,
            do_sample=do_sample,
            eos_ids=self.eos_ids,
            model=self.model,
        )
        if self.variant.cache == "static-object" and "cache_object" not in extra:
            cache = compat.make_static_cache(self.model, input_ids.shape[0], input_ids.shape[1] + new_tokens)
            kwargs[compat.cache_keyword(self.model)] = cache
        if "cache_object" in extra:
            kwargs[compat.cache_keyword(self.model)] = extra.pop("cache_object")
        if compat.cache_keyword(self.model) in kwargs:
            kwargs.update(hybrid.cache_object_kwargs(self.model))
        kwargs.update(extra)
        if force is not None:
            from transformers import LogitsProcessorList

            kwargs["logits_processor"] = LogitsProcessorList([ForceTokens(force.to(input_ids.device), input_ids.shape[1])])
        with self.active() as model, self.refusals_skip(), transformers_log() as said:
            eager = compat.eager_generate(model) if self.variant.compile == "off" else contextlib.nullcontext()
            before = model_state(model)
            with eager:
                out = model.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
            changed = state_changes(before, model_state(model))
            if changed:
                raise StateLeftBehindError(f"no state left behind: generate() on {self.variant.id} left the model changed: {'; '.join(changed)}")
        # A path transformers silently swapped for another never ran: the check must not pass on it.
        substituted = cache_substitution(self.variant.cache, kwargs.get(compat.cache_keyword(self.model)), out, said)
        if substituted is not None:
            outcomes.unsupported(f"unsupported by transformers {compat.TRANSFORMERS}: {substituted}")
        logits = torch.stack(out.logits, dim=1).float().cpu() if out.logits else None
        mask = None if attention_mask is None else attention_mask.cpu()

        @timed("generate")
        def replay(tokens: torch.Tensor) -> Generation:
            return self.generate(input_ids, attention_mask, new_tokens, do_sample, force=tokens, **replay_extra)

        suppressed = tuple(int(i) for i in kwargs.get("suppress_tokens") or ())
        scores = torch.stack(out.scores, dim=1).float().cpu() if getattr(out, "scores", None) else None
        return Generation(input_ids.cpu(), out.sequences.cpu(), logits, mask, None if do_sample else replay, suppressed, scores)

    @timed("generate")
    def decode_loop(
        self,
        input_ids: torch.Tensor,
        new_tokens: int,
        compile_mode: str = "off",
        cache: Any = None,
        force: torch.Tensor | None = None,
    ) -> Generation:
        """The guide's pattern: eager prefill into a StaticCache, then one (compiled) forward per token.

        Greedy, no padding. EOS is masked as generate_kwargs suppresses it. With CUDA graphs the output
        buffer is reused by the next replay, so each step's logits are cloned. ``force`` [B, N]: teacher forcing.
        """
        batch, prompt_len = input_ids.shape
        total = prompt_len + new_tokens
        with self.active() as model:
            if cache is None:
                cache = compat.make_static_cache(model, batch, total)
            step = self._step_function(compile_mode)
            out = compat.forward_step(model, input_ids, cache, 0)
            logits = [out.logits[:, -1].float()]
            tokens = [self._pick(logits[-1], force, 0)]
            for position in range(prompt_len, total - 1):
                if compile_mode == "reduce-overhead":
                    torch.compiler.cudagraph_mark_step_begin()
                out = step(**compat.step_kwargs(model, tokens[-1], cache, position))
                logits.append(out.logits[:, -1].float().clone())
                tokens.append(self._pick(logits[-1], force, len(tokens)))
        sequences = torch.cat([input_ids, *tokens], dim=1).cpu()

        @timed("generate")
        def replay(forced: torch.Tensor) -> Generation:
            return self.decode_loop(input_ids, new_tokens, compile_mode, force=forced)

        return Generation(input_ids.cpu(), sequences, torch.stack(logits, dim=1).cpu(), replay=replay)

    def _pick(self, logits: torch.Tensor, force: torch.Tensor | None = None, step: int = 0) -> torch.Tensor:
        if force is not None:
            return force[:, step : step + 1].to(logits.device)
        masked = logits.clone()
        masked[:, self.eos_ids] = float("-inf")
        return masked.argmax(dim=-1, keepdim=True)

    def _step_function(self, compile_mode: str) -> Any:
        model = self.model
        if compile_mode == "off":
            return model
        # Kept on the model so that it lives and dies with it; warm-up happens once per session.
        compiled = model.__dict__.setdefault("_llmopt_compiled", {})
        if compile_mode not in compiled:
            compiled[compile_mode] = torch.compile(model.forward, mode=compile_mode, fullgraph=True)
        return compiled[compile_mode]

    @timed("generate")
    def forward_logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """Logits of every position of one forward pass (float32, CPU)."""
        with self.active() as model, self.refusals_skip():
            out = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        return out.logits.float().cpu()

    @timed("generate")
    def sample(self, input_ids: torch.Tensor, samples: int, new_tokens: int, seed: int, **extra: Any) -> torch.Tensor:
        """``samples`` independent sampled continuations of one prompt (batch 1: assisted decoding needs it).
        The mask is explicit: ids built from generated text may hold the pad id, which generate() would
        otherwise mask out of the prompt (while the cache-free reference attends it)."""
        torch.manual_seed(seed)
        mask = torch.ones_like(input_ids)
        rows = [self.generate(input_ids, mask, new_tokens, do_sample=True, **extra).new_tokens for _ in range(samples)]
        return torch.cat(rows, dim=0)

    @timed("reference")
    def exact_probs(
        self, full_ids: torch.Tensor, prompt_len: int, chunk: int = 64, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0, repetition_penalty: float = 1.0
    ) -> torch.Tensor:
        """The distribution each generated token was drawn from under plain sampling with these settings
        (EOS masked as generate_kwargs suppresses it), by teacher forcing: [n, L, V] float64. The processors
        and warpers are computed here, in transformers' order (repetition penalty over every earlier token of
        the row, temperature, top-k keeping ties, top-p), not by transformers' own code, so a fault there shows."""
        out = []
        for start in range(0, full_ids.shape[0], chunk):
            ids = full_ids[start : start + chunk].to(self.model.device)
            logits = self.processed(self.forward_logits(ids, None), ids, prompt_len, temperature, repetition_penalty)
            if top_k > 0:
                kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            out.append(nucleus(torch.softmax(logits, dim=-1), top_p))
        return torch.cat(out, dim=0)

    def processed(self, logits: torch.Tensor, ids: torch.Tensor, prompt_len: int, temperature: float = 1.0, repetition_penalty: float = 1.0) -> torch.Tensor:
        """Logits [n, T, V] of a forward over ``ids`` at the generated positions [n, L], float64, after the
        repetition penalty, the EOS mask and the temperature (what top-k then cuts)."""
        out = logits[:, prompt_len - 1 : -1].to(device="cpu", dtype=torch.float64, copy=True)  # float64 logits stay the caller's
        if repetition_penalty != 1.0:
            out = penalized(out, ids.cpu(), prompt_len, repetition_penalty)
        out[..., self.eos_ids] = float("-inf")
        return out / temperature


def penalized(logits: torch.Tensor, ids: torch.Tensor, prompt_len: int, penalty: float) -> torch.Tensor:
    """transformers' repetition penalty at each generated position (logits [n, L, V] predicting ids[:,
    prompt_len:]): every token seen earlier in the row (prompt included) has its logit divided by the
    penalty where positive, multiplied where negative."""
    out = logits.clone()
    seen = torch.zeros(logits.shape[0], logits.shape[-1], dtype=torch.bool)
    seen.scatter_(1, ids[:, :prompt_len].long(), True)
    for step in range(logits.shape[1]):
        row = out[:, step]
        out[:, step] = torch.where(seen, torch.where(row < 0, row * penalty, row / penalty), row)
        seen.scatter_(1, ids[:, prompt_len + step : prompt_len + step + 1].long(), True)
    return out


def nucleus(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Top-p filtering as transformers defines it: drop the least likely tokens whose probabilities sum to at
    most 1 - top_p (at least one token kept), renormalized."""
    if top_p >= 1.0:
        return probs
    ascending, order = probs.sort(dim=-1)
    drop_sorted = ascending.cumsum(-1) <= 1 - top_p
    drop_sorted[..., -1] = False
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    kept = probs.masked_fill(drop, 0.0)
    return kept / kept.sum(-1, keepdim=True)


class ForceTokens:
    """A logits processor that forces step i's choice to ``tokens[:, i]`` (teacher forcing inside generate()).

    The raw logits (``output_logits``) are those of the path itself; only the choice is forced. The step is
    read from the length of ``input_ids``, so assisted decoding, which calls processors once per candidate
    position with growing ids, is forced the same way.
    """

    def __init__(self, tokens: torch.Tensor, prompt_length: int) -> None:
        self.tokens = tokens
        self.prompt_length = prompt_length

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        step = input_ids.shape[1] - self.prompt_length
        if step >= self.tokens.shape[1]:
            return scores
        forced = torch.full_like(scores, float("-inf"))
        return forced.scatter(1, self.tokens[:, step : step + 1].to(scores.device), 0.0)
