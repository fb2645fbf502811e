"""Measuring: memory formulas and footprints (timing joins here with the performance suite).

The static kv-cache formula is the documented one: for every attention layer, keys and values of
shape [batch, kv_heads, length, head_dim], where a sliding-window layer holds min(window, max_len)
positions. Comparing it with what a StaticCache really allocates catches a cache that silently grows.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class CacheLayout:
    layers: int
    sliding_layers: int
    kv_heads: int
    head_dim: int
    window: int | None


def cache_layout(config: Any) -> CacheLayout:
    """Attention-cache shape parameters of a (text) config, across the naming schemes of transformers."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    layers = _first(text, "num_hidden_layers", "n_layer", "num_layers")
    heads = _first(text, "num_attention_heads", "n_head", "num_heads")
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    hidden = _first(text, "hidden_size", "n_embd", "d_model")
    head_dim = getattr(text, "head_dim", None) or hidden // heads
    window = getattr(text, "sliding_window", None) or getattr(text, "window_size", None)
    types = getattr(text, "layer_types", None) or getattr(text, "attention_layers", None)
    if types:
        sliding = sum(1 for t in types if t in ("sliding_attention", "local"))
    elif getattr(text, "cache_implementation", None) == "hybrid":  # 4.x Gemma2: no layer_types; HybridCache alternates
        pattern = getattr(text, "sliding_window_pattern", None) or 2
        sliding = sum(1 for i in range(layers) if (i + 1) % pattern)
    else:
        sliding = layers if getattr(text, "sliding_window", None) else 0
    return CacheLayout(layers, sliding, kv_heads, head_dim, window if sliding else None)


def caches_trim_sliding_layers(config: Any) -> bool:
    """Whether generate()'s StaticCache and DynamicCache keep a sliding-window layer to its window: per-layer caches
    do (4.56+, a StaticSlidingWindowLayer), and 4.x Gemma2's HybridCache; before 4.56 the others hold every position
    of every layer (only a SlidingWindowCache, asked for by name, trims), so that is their size there."""
    from transformers import cache_utils

    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return hasattr(cache_utils, "StaticSlidingWindowLayer") or getattr(text, "cache_implementation", None) == "hybrid"


def static_cache_bytes(config: Any, batch: int, max_len: int, dtype_bytes: int) -> int:
    """2 (keys, values) x batch x kv_heads x head_dim x bytes x (full layers x max_len + sliding layers x min(window, max_len)),
    sliding layers counted as full where the release's caches do not trim them (caches_trim_sliding_layers)."""
    layout = cache_layout(config)
    sliding = layout.sliding_layers if caches_trim_sliding_layers(config) else 0
    positions = (layout.layers - sliding) * max_len
    if sliding:
        positions += sliding * min(layout.window or max_len, max_len)
    return 2 * batch * layout.kv_heads * layout.head_dim * dtype_bytes * positions


def _first(config: Any, *names: str) -> int:
    for name in names:
        value = getattr(config, name, None)
        if isinstance(value, int):
            return value
    raise ValueError(f"{type(config).__name__} has none of {names}")


@dataclass
class CompileCount:
    """Graphs dynamo compiled inside a ``watch_compiles`` block, why it recompiled, and the functions
    that hit dynamo's recompile limit (from then on they run eager, silently but for one log line)."""

    graphs: int = 0
    reasons: list[str] | None = None
    limit_hits: list[str] = field(default_factory=list)


class _LimitHits(logging.Handler):
    """Collects dynamo's "hit config.recompile_limit" (older: cache_size_limit) warnings."""

    def __init__(self, into: list[str]) -> None:
        super().__init__(logging.WARNING)
        self.into = into

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if "torch._dynamo hit config." in message:
            self.into.append(" ".join(line.strip() for line in message.splitlines()[:3]))


class watch_compiles:  # noqa: N801 - used as a context manager, reads like one
    """Count graphs compiled meanwhile (dynamo's ``unique_graphs`` counter), collect the guard
    failures that caused recompiles, so a failure can say *why* it recompiled, and the recompile-limit
    hits (the fall back to eager that dynamo's default limit causes must not pass unseen)."""

    def __enter__(self) -> CompileCount:
        from torch._dynamo import utils

        self._utils = utils
        self._before = utils.counters["stats"]["unique_graphs"]
        self._failures_before = {code: len(f) for code, f in utils.guard_failures.items()}
        self.count = CompileCount()
        self._handler = _LimitHits(self.count.limit_hits)
        logging.getLogger("torch._dynamo").addHandler(self._handler)
        return self.count

    def __exit__(self, *exc: object) -> None:
        logging.getLogger("torch._dynamo").removeHandler(self._handler)
        utils = self._utils
        self.count.graphs = utils.counters["stats"]["unique_graphs"] - self._before
        reasons: list[str] = []
        for code, failures in utils.guard_failures.items():
            for failure in failures[self._failures_before.get(code, 0) :]:
                reasons.append(str(getattr(failure, "reason", failure)).splitlines()[0][:200])
        self.count.reasons = reasons
