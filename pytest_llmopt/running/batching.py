"""Continuous batching, transformers' serving path: requests through a ``ContinuousBatchingManager`` over a paged
kv-cache, each request's answer gathered by its id, and the cache the manager allocated.

Kept apart from compat.py because the API is young and moves between releases (``block_size`` became
``page_size`` in 5.24, the cache went from one tensor per layer to one byte pool): what a release lacks is one
reason (``unsupported``), never a crash in a suite.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from ..common.phases import timed
from . import compat
from .instrumentation import StateLeftBehindError, model_state, state_changes
from .measure import cache_layout

RESULT_TIMEOUT = 120.0  # seconds without any finished request before a run is declared stuck


@dataclass(frozen=True)
class Request:
    """One request: its id (what messages name), prompt token ids and how many tokens it may generate."""

    name: str
    prompt: tuple[int, ...]
    new_tokens: int


@dataclass(frozen=True)
class Answer:
    """What the manager gave back for one request."""

    tokens: tuple[int, ...]
    logprobs: tuple[float, ...] | None  # the chosen tokens' log-probabilities, where the release returns them
    error: str | None


@dataclass(frozen=True)
class Served:
    """A run of requests: the answers by request id, the attention the manager ran with, its cache's size."""

    answers: dict[str, Answer]
    attention: str  # the implementation the manager switched the model to for the run
    cache: CacheSize | None


@dataclass(frozen=True)
class CacheSize:
    """The paged cache: the blocks it says it holds and the bytes of its tensors."""

    blocks: int
    page_size: int
    allocated: int  # bytes of every tensor the cache holds (data, trash pages and index tables)
    kv_bytes: int  # blocks x page size x layers x kv heads x head dim x 2 (keys, values) x bytes per element


class StuckError(RuntimeError):
    """The manager stopped answering: no request finished within RESULT_TIMEOUT seconds."""


def unsupported_reason() -> str | None:
    """Why this transformers cannot run continuous batching, or None."""
    try:
        from transformers import ContinuousBatchingConfig  # noqa: F401
        from transformers.generation.continuous_batching import ContinuousBatchingManager  # noqa: F401
    except ImportError as exc:
        return f"transformers {compat.TRANSFORMERS} has no continuous batching with a ContinuousBatchingConfig ({exc})"
    return None


def config(
    page_size: int | None, num_blocks: int | None = None, max_batch_tokens: int | None = None, keep_attention: bool = False, **extra: Any
) -> Any:
    """A ContinuousBatchingConfig of this release: ``page_size`` is ``block_size`` before 5.24 (None: the release's
    default); keys a release does not know are left out (CUDA-graph and compile settings default there); None values
    are left to the release's defaults and inference. ``keep_attention``: the manager runs the model's own attention
    instead of switching a half-precision model to FlashAttention (``auto_switch_to_flash=False`` where the release
    has it; before, ``kept_attention`` pins it)."""
    from transformers import ContinuousBatchingConfig

    known = {f.name for f in dataclasses.fields(ContinuousBatchingConfig)} if dataclasses.is_dataclass(ContinuousBatchingConfig) else set()
    size_key = "page_size" if "page_size" in known or not known else "block_size"
    wanted = {size_key: page_size, "num_blocks": num_blocks, "max_batch_tokens": max_batch_tokens, "return_logprobs": True, **extra}
    if keep_attention and SWITCH in known:
        wanted[SWITCH] = False
    made = ContinuousBatchingConfig(**{k: v for k, v in wanted.items() if v is not None and (not known or k in known)})
    if keep_attention and SWITCH not in known:
        setattr(made, KEEP, True)
    return made


SWITCH = "auto_switch_to_flash"  # 5.2x: whether the manager moves a half-precision model to FlashAttention
KEEP = "llmopt_keep_attention"  # on a config of a release without SWITCH: kept_attention pins the attention
FLASH_PAGE = 256  # flash_attn_with_kvcache takes a page table only with pages of a multiple of this many tokens


@contextmanager
def kept_attention(model: Any, cb_config: Any) -> Iterator[None]:
    """Where ``cb_config`` asks to keep the model's attention and the release has no ``auto_switch_to_flash`` (5.17:
    every model not yet paged is switched to FlashAttention when it is installed), the model runs as
    ``paged|<its attention>``, which the release leaves alone; its attention is restored afterwards."""
    original = str(model.config._attn_implementation)
    if not getattr(cb_config, KEEP, False) or original.startswith("paged|") or "flash" in original:
        yield
        return
    model.set_attn_implementation(f"paged|{original}")
    try:
        yield
    finally:
        model.set_attn_implementation(original)


def page_size(model: Any, wanted: int) -> int:
    """``wanted`` tokens a page, or the next multiple of 256 where the model runs FlashAttention on CUDA: its paged
    kernel refuses other pages ("Paged KV cache block size must be divisible by 256", flash-attn 2.8)."""
    if "flash" in str(model.config._attn_implementation) and model.device.type == "cuda":
        return -(-wanted // FLASH_PAGE) * FLASH_PAGE
    return wanted


def generation_config(model: Any, eos: int | Sequence[int] | None = None, **extra: Any) -> Any:
    """Greedy by default; ``eos`` None disables stopping (-1: the manager's own "no EOS"), so every request makes
    exactly its ``new_tokens``."""
    from transformers import GenerationConfig

    settings: dict[str, Any] = {"do_sample": False, "eos_token_id": -1 if eos is None else eos, "pad_token_id": pad_id(model)}
    settings.update(extra)
    return GenerationConfig(**settings)


def pad_id(model: Any) -> int:
    """The model's pad token, or 0 where its config names none (random-weight models)."""
    pad = getattr(model.config, "pad_token_id", None)
    return int(pad) if pad is not None else 0


def _eos_list(eos: int | Sequence[int] | None) -> int | list[int]:
    return -1 if eos is None else eos if isinstance(eos, int) else list(eos)


# transformers' words where continuous batching refuses a model's attention (5.2x; 5.17)
REFUSALS = ("not supported for continuous batching", "is not supported. The only possible arguments are")


def refused(exc: BaseException) -> bool:
    """Whether ``exc`` is continuous batching refusing the model's attention: unsupported, not a failure."""
    return isinstance(exc, ValueError) and any(words in str(exc) for words in REFUSALS)


@contextmanager
def manager(model: Any, gen_config: Any, cb_config: Any, persistent: bool = False) -> Iterator[Any]:
    """A started manager; stopped (and, unless ``persistent``, destroyed) afterwards, whatever happened. A manager
    that failed gives the model its attention back (5.17 left it switched to a paged one, which breaks every later
    generate() of the session's shared model); one that ran leaves it for the caller's state check."""
    original = str(model.config._attn_implementation)
    try:
        with kept_attention(model, cb_config), model.continuous_batching_context_manager(
            generation_config=gen_config, continuous_batching_config=cb_config, block=True, timeout=30, persistent_manager=persistent
        ) as running:
            yield running
    except BaseException:
        if str(model.config._attn_implementation) != original:
            model.set_attn_implementation(original)
        raise


def serve(
    running: Any,
    requests: Sequence[Request],
    later: Sequence[Request] = (),
    eos: int | Sequence[int] | None = None,
) -> dict[str, Answer]:
    """Each request added to a running manager, in order; ``later`` ones added once the first answer is back
    (while the others are still generating). Every answer is waited for."""
    def add(request: Request) -> None:
        running.add_request(list(request.prompt), request_id=request.name, max_new_tokens=request.new_tokens, eos_token_id=_eos_list(eos))

    for request in requests:
        add(request)
    waiting = {r.name for r in (*requests, *later)}
    pending_later = list(later)
    answers: dict[str, Answer] = {}
    last = time.monotonic()
    while waiting:
        result = running.get_result(timeout=1)
        if result is None:
            if time.monotonic() - last > RESULT_TIMEOUT or not running.is_running():
                raise StuckError(f"continuous batching stopped answering: {sorted(waiting)} never finished")
            continue
        if not result.is_finished() or result.request_id not in waiting:
            continue
        last = time.monotonic()
        waiting.discard(result.request_id)
        logprobs = tuple(float(x) for x in result.logprobs) if getattr(result, "logprobs", None) else None
        answers[result.request_id] = Answer(tuple(int(t) for t in result.generated_tokens), logprobs, result.error)
        for request in pending_later:
            add(request)
        pending_later = []
    return answers


@timed("generate")
def run(
    model: Any,
    requests: Sequence[Request],
    cb_config: Any,
    later: Sequence[Request] = (),
    eos: int | Sequence[int] | None = None,
    **generation: Any,
) -> Served:
    """Requests through a fresh manager; the model must be left as it was (instrumentation.model_state)."""
    before = model_state(model)
    with manager(model, generation_config(model, eos, **generation), cb_config) as running:
        attention = str(model.config._attn_implementation)
        answers = serve(running, requests, later, eos)
        size = cache_size(running, model)
    changed = state_changes(before, model_state(model))
    if changed:
        raise StateLeftBehindError(f"no state left behind: continuous batching left the model changed: {'; '.join(changed)}")
    return Served(answers, attention, size)


def _tensors(obj: Any, seen: set[int], depth: int = 0) -> Iterator[torch.Tensor]:
    """Every tensor an object holds in its attributes, lists, tuples and dicts (each storage once)."""
    if depth > 3:
        return
    if isinstance(obj, torch.Tensor):
        key = obj.untyped_storage().data_ptr()
        if key not in seen:
            seen.add(key)
            yield obj
        return
    children: Any
    if isinstance(obj, dict):
        children = obj.values()
    elif isinstance(obj, (list, tuple)):
        children = obj
    elif hasattr(obj, "__dict__") and type(obj).__module__.startswith("transformers.generation.continuous_batching"):
        children = vars(obj).values()
    else:
        return
    for child in children:
        yield from _tensors(child, seen, depth + 1)


def cache_size(running: Any, model: Any) -> CacheSize | None:
    """The paged cache of a running manager, or None where this release keeps it elsewhere."""
    processor = getattr(running, "batch_processor", None)
    cache = getattr(processor, "cache", None)
    blocks = getattr(cache, "num_blocks", None)
    if cache is None or blocks is None:
        return None
    page = getattr(cache, "page_size", None) or getattr(cache, "block_size", None)
    if page is None:
        cb = running.continuous_batching_config
        page = getattr(cb, "page_size", None) or cb.block_size
    layout = cache_layout(model.config)
    itemsize = torch.empty((), dtype=model.dtype).element_size()
    kv = int(blocks) * int(page) * layout.layers * layout.kv_heads * layout.head_dim * 2 * itemsize
    allocated = sum(t.untyped_storage().nbytes() for t in _tensors(cache, set()))
    return CacheSize(int(blocks), int(page), allocated, kv)
