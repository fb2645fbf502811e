"""Instrumentation of transformers' generate(): proof that a path did its work (compiled forward calls,
draft tokens proposed and accepted, the cache kind that really ran). The checks use these to refuse a pass
earned by a path that never ran."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from transformers import GenerationMixin

from .compat import _instance_override


@contextlib.contextmanager
def count_compiled_calls(model: Any) -> Iterator[dict[str, int]]:
    """Count forward calls that generate() routes through its compiled callable (``get_compiled_call``),
    so a check of 'compiled == eager' can prove that compiled code ran at all."""
    counter = {"calls": 0}
    original = model.get_compiled_call

    def wrapped(compile_config: Any) -> Any:
        compiled = original(compile_config)

        def call(*args: Any, **kwargs: Any) -> Any:
            counter["calls"] += 1
            return compiled(*args, **kwargs)

        return call

    with _instance_override(model, "get_compiled_call", wrapped):
        yield counter


def dynamo_backend(device_type: str) -> str:
    """The backend of the compiled-forward checks: inductor on CUDA, as users run it; dynamo's eager backend on
    CPU, where inductor's compile of each graph costs seconds (its code is checked by the auto-compile and
    decode-loop checks) and what is judged is dynamo's part: what it guards on, when it recompiles or gives up."""
    return "inductor" if device_type == "cuda" else "eager"


@contextlib.contextmanager
def compiled_forward(model: Any, backend: str) -> Iterator[dict[str, int]]:
    """The model's forward compiled as users do it (``model.forward = torch.compile(model.forward)``),
    counting its calls; the instance attribute is removed afterwards (the compiled function is kept and reused)."""
    cached = model.__dict__.setdefault("_llmopt_compiled_forward", {})
    if backend not in cached:
        cached[backend] = torch.compile(type(model).forward.__get__(model), backend=backend)
    compiled = cached[backend]
    counter = {"calls": 0}

    # generate() reads forward's signature to decide which inputs to build (position_ids among them: without
    # them a left-padded row of a model with learned positions is shifted), so the counter keeps it.
    @functools.wraps(compiled)
    def forward(*args: Any, **kwargs: Any) -> Any:
        counter["calls"] += 1
        return compiled(*args, **kwargs)

    model.forward = forward
    try:
        yield counter
    finally:
        del model.forward


@dataclass
class DraftStats:
    """Draft tokens proposed and accepted over one or more assisted generate() calls."""

    proposed: int = 0
    accepted: int = 0
    steps: int = 0

    @property
    def acceptance_rate(self) -> float | None:
        return self.accepted / self.proposed if self.proposed else None

    def figures(self) -> dict[str, Any]:
        """What a check records of its drafts for the report."""
        return {"draft_tokens": self.proposed, "accepted_tokens": self.accepted, "acceptance_rate": self.acceptance_rate}


_UNCOUNTED = {"depth": 0}


@contextlib.contextmanager
def uncounted() -> Iterator[None]:
    """Generations meanwhile do not count in ``track_drafts`` (a teacher-forced replay steers the draft too,
    so its acceptance says nothing about the path)."""
    _UNCOUNTED["depth"] += 1
    try:
        yield
    finally:
        _UNCOUNTED["depth"] -= 1


@contextlib.contextmanager
def track_drafts() -> Iterator[DraftStats]:
    """Count proposed and accepted draft tokens of every candidate generator built meanwhile.

    Wraps ``GenerationMixin._get_candidate_generator`` (present since 4.3x) and, on each generator it
    returns, ``get_candidates`` (how many tokens were proposed) and ``update_candidate_strategy``
    (how many of them the target accepted).
    """
    stats = DraftStats()
    original = GenerationMixin._get_candidate_generator

    def patched(self: Any, *args: Any, **kwargs: Any) -> Any:
        generator: Any = original(self, *args, **kwargs)
        get_candidates = generator.get_candidates
        update = generator.update_candidate_strategy
        pending = {"n": 0}

        def counted_candidates(input_ids: torch.Tensor, *a: Any, **kw: Any) -> Any:
            candidate_ids, logits = get_candidates(input_ids, *a, **kw)
            pending["n"] = int(candidate_ids.shape[-1] - input_ids.shape[-1])
            return candidate_ids, logits

        def counted_update(input_ids: torch.Tensor, scores: torch.Tensor, num_matches: Any) -> Any:
            if _UNCOUNTED["depth"]:
                return update(input_ids, scores, num_matches)
            stats.proposed += pending["n"]
            stats.accepted += min(int(num_matches), pending["n"])
            stats.steps += 1
            return update(input_ids, scores, num_matches)

        generator.get_candidates = counted_candidates
        generator.update_candidate_strategy = counted_update
        return generator

    GenerationMixin._get_candidate_generator = patched  # type: ignore[method-assign]
    try:
        yield stats
    finally:
        GenerationMixin._get_candidate_generator = original  # type: ignore[method-assign]



# transformers' own words where it replaced what was asked for ("using a dynamic cache instead of a cache of type=
# 'static'"). It logs them once per process (warning_once), so the first time is kept for every later check.
_SAID: list[str] = []
_SUBSTITUTION_WORDS = ("instead of", "will be ignored", "falling back")


@contextlib.contextmanager
def transformers_log() -> Iterator[list[str]]:
    """What transformers logs at warning level meanwhile (its logging module, not Python's warnings)."""
    import logging

    seen: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record.getMessage())

    handler = Keep(logging.WARNING)
    logger = logging.getLogger("transformers")
    logger.addHandler(handler)
    try:
        yield seen
    finally:
        logger.removeHandler(handler)


def is_static_cache(cache: Any) -> bool:
    """A cache of fixed size: what ``cache_implementation="static"`` asks for (5.x StaticCache; 4.x also its
    HybridCache and SlidingWindowCache, the static caches of sliding-window models)."""
    from transformers import cache_utils

    kinds = tuple(c for c in (getattr(cache_utils, n, None) for n in ("StaticCache", "HybridCache", "SlidingWindowCache", "HybridChunkedCache")) if isinstance(c, type))
    return isinstance(cache, kinds)


def cache_substitution(asked: str, handed: Any, out: Any, said: list[str]) -> str | None:
    """Why the cache generate() ran is not the one ``asked`` for (the variant's cache kind; ``handed``: the cache
    object given to it, if any), with transformers' words where it said any; None where it is. Read from what
    generate() returns (``cache`` from 5.2x, ``past_key_values`` before)."""
    _SAID.extend(m for m in said if any(w in m for w in _SUBSTITUTION_WORDS) and m not in _SAID)
    if asked not in ("static", "static-object"):
        return None
    ran = next((c for c in (getattr(out, name, None) for name in ("cache", "past_key_values")) if c is not None), None)
    if ran is None:
        return None  # nothing returned (use_cache off, or a release that returns no cache): nothing to tell
    if handed is not None and ran is handed:
        return None
    if handed is None and is_static_cache(ran):
        return None
    what = "the StaticCache object it was given" if handed is not None else "a static cache"
    words = [m for m in _SAID if "cache" in m]
    told = f"; transformers says: {' '.join(words)}" if words else " (transformers said nothing)"
    return f"asked for {what}, generate() ran a {type(ran).__name__}{told}"


class StateLeftBehindError(AssertionError):
    """generate() returned with the model changed: its config, generation_config or attention implementation."""


def model_state(model: Any) -> dict[str, Any]:
    """What generate() must leave as it found it: the model's config and generation_config (as dicts) and
    its attention implementation. Read before and after every call; the plugin repairs nothing."""
    config = model.config
    return {
        "config": config.to_dict(),
        "generation_config": model.generation_config.to_dict() if getattr(model, "generation_config", None) else {},
        "attention": getattr(config, "_attn_implementation", None),
    }


def state_changes(before: dict[str, Any], after: dict[str, Any]) -> list[str]:
    """'generation_config.cache_implementation: None -> 'static'' for each entry that differs."""
    out = []
    for part in before:
        old, new = before[part], after.get(part)
        if isinstance(old, dict) and isinstance(new, dict):
            for key in sorted(set(old) | set(new)):
                if old.get(key, "<absent>") != new.get(key, "<absent>"):
                    out.append(f"{part}.{key}: {old.get(key, '<absent>')!r} -> {new.get(key, '<absent>')!r}")
        elif old != new:
            out.append(f"{part}: {old!r} -> {new!r}")
    return out
