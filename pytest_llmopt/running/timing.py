"""Timing one generate() call: prefill and decode apart, every step marked; CUDA-graph activity; the roofline.

Why this shape:
- GPU work is asynchronous, so a wall clock around generate() measures the launch queue unless the
  device is synchronized. Here every step is marked with a CUDA event recorded on the stream right
  after its forward (a logits processor runs once per generated token, after that token's forward),
  and the first mark splits prefill (time to first token) from decode. On CPU, marks are
  ``time.perf_counter()`` (the CPU is synchronous).
- A generate() that stops early measures fewer tokens: the count is checked on every run.
- Beside the stream's time, the host's wall clock and the calling thread's CPU time around the call (how much
  of it the thread was descheduled). Repetition, interleaving and warm-ups are campaign.py's.

Nothing here imports pytest: the functions are plain and usable from scripts.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class Run:
    """One timed generate() call."""

    ttft_ms: float  # start of the call -> end of the first token's forward
    decode_ms: float  # (end of the call - end of the first token's forward) / (new tokens - 1)
    total_ms: float
    new_tokens: int
    steps_ms: tuple[float, ...] = ()  # between consecutive step marks (one per logits-processor call)
    wall_ms: float = 0.0  # the host's clock around the call (perf_counter)
    cpu_ms: float = 0.0  # the calling thread's CPU time meanwhile (thread_time)

    @property
    def step_ms(self) -> float:
        """The decode figure: the median step (a step hit by a preemption burst does not move it), or, where
        the marks are not one per token (a draft path calls the processors once per verified position), the
        decode time per emitted token."""
        if len(self.steps_ms) == self.new_tokens - 1 and self.steps_ms:
            return statistics.median(self.steps_ms)
        return self.decode_ms

    @property
    def descheduled(self) -> float:
        """Share of the call's wall time the calling thread was not on a CPU (CUDA waits spin, so on a GPU
        this is preemption or steal; on CPU, torch's worker threads do the work and this means nothing)."""
        return max(0.0, 1.0 - self.cpu_ms / self.wall_ms) if self.wall_ms > 0 else 0.0


class ShortOutputError(AssertionError):
    """generate() returned fewer or more tokens than forced: the timing would compare different work."""


class StepClock:
    """A logits processor that marks the end of every step's forward (a CUDA event, or perf_counter on CPU).

    Registered through ``logits_processor=[clock]``; it returns the scores untouched."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.marks: list[Any] = []

    def mark(self) -> Any:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def ms(self, start: Any, end: Any) -> float:
        return float(start.elapsed_time(end)) if self.cuda else (end - start) * 1000.0

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self.marks.append(self.mark())
        return scores


def timed_call(generate: Callable[[list[Any]], torch.Tensor], device: torch.device, prompt_len: int, new_tokens: int) -> Run:
    """Run ``generate(logits_processors)`` once (it must return the sequences) and time it by steps."""
    clock = StepClock(device)
    processor = _as_processor(clock)
    if clock.cuda:
        torch.cuda.synchronize(device)
    wall, cpu = time.perf_counter(), time.thread_time()
    start = clock.mark()
    sequences = generate([processor])
    end = clock.mark()
    if clock.cuda:
        end.synchronize()
    wall, cpu = (time.perf_counter() - wall) * 1000.0, (time.thread_time() - cpu) * 1000.0
    produced = int(sequences.shape[-1]) - prompt_len
    if produced != new_tokens:
        raise ShortOutputError(f"generate() returned {produced} new tokens instead of the forced {new_tokens}: not comparable")
    if not clock.marks:
        raise ShortOutputError("the step clock never ran: generate() ignored logits_processor")
    first = clock.marks[0]
    total = clock.ms(start, end)
    ttft = clock.ms(start, first)
    decode = clock.ms(first, end) / max(1, new_tokens - 1)
    steps = tuple(clock.ms(a, b) for a, b in zip(clock.marks, clock.marks[1:]))
    return Run(ttft, decode, total, produced, steps, wall, cpu)


def timed_whole(serve: Callable[[list[Any]], int], device: torch.device, tokens: int) -> Run:
    """Time a whole-call path end to end: ``serve([])`` runs every request of a mix and returns the tokens it
    produced (it must be ``tokens``). No step marks: a mix has no one decode loop to split (requests join and
    leave it), so the figure is the call, and ``decode_ms`` is its time per produced token. The CPU time is the
    process's: continuous batching generates on a thread of its own while the caller waits."""
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
    wall, cpu = time.perf_counter(), time.process_time()
    produced = serve([])
    if cuda:
        torch.cuda.synchronize(device)
    wall, cpu = (time.perf_counter() - wall) * 1000.0, (time.process_time() - cpu) * 1000.0
    if produced != tokens:
        raise ShortOutputError(f"the request mix produced {produced} tokens instead of the forced {tokens}: not comparable")
    return Run(float("nan"), wall / tokens, wall, tokens, (), wall, cpu)


def _as_processor(clock: StepClock) -> Any:
    """Wrap the clock in transformers' LogitsProcessor class (generate() checks the type in some releases)."""
    from transformers import LogitsProcessor

    class _Clock(LogitsProcessor):
        def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
            return clock(input_ids, scores)

    return _Clock()


@contextlib.contextmanager
def cudagraph_activity() -> Iterator[dict[str, Any]]:
    """Count CUDA graphs inductor recorded and replayed meanwhile, and graphs it skipped (its
    ``cudagraph_skips`` counter) with the reasons it logged. A compiled decode whose graphs were skipped
    runs kernel by kernel: slower, and silently so. Replays are counted too, because a graph recorded by
    an earlier test of the session (same model, same shapes) is only replayed here."""
    seen: dict[str, Any] = {"skips": 0, "recorded": 0, "replayed": 0, "reasons": []}
    try:
        from torch._dynamo.utils import counters
        from torch._inductor import cudagraph_trees
    except Exception:
        yield seen
        return
    import logging

    before = counters["inductor"]["cudagraph_skips"]
    patches = []
    for owner, name, key in (("CUDAGraphTreeManager", "record_function", "recorded"), ("CUDAGraphNode", "run", "replayed")):
        cls = getattr(cudagraph_trees, owner, None)
        original = getattr(cls, name, None)
        if cls is None or original is None:
            continue

        def counting(self: Any, *args: Any, _original: Any = original, _key: str = key, **kwargs: Any) -> Any:
            seen[_key] += 1
            return _original(self, *args, **kwargs)

        setattr(cls, name, counting)
        patches.append((cls, name, original))

    handled: set[int] = set()

    class Reasons(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if id(record) in handled:  # a record propagates to each parent logger holding the handler
                return
            handled.add(id(record))
            text = record.getMessage()
            if "cudagraph" in text.lower() and "skip" in text.lower():
                seen["reasons"].append(text.splitlines()[0][:300])

    handler = Reasons(logging.DEBUG)
    loggers = [logging.getLogger(name) for name in ("torch._inductor", "torch._inductor.cudagraph_utils", "torch._inductor.output_code")]
    for log in loggers:
        log.addHandler(handler)
    try:
        yield seen
    finally:
        for cls, name, original in patches:
            setattr(cls, name, original)
        for log in loggers:
            log.removeHandler(handler)
        seen["skips"] = counters["inductor"]["cudagraph_skips"] - before


# --- roofline -----------------------------------------------------------------------------------------------


def copy_bandwidth(device: torch.device, nbytes: int = 1 << 30, repeats: int = 10) -> float:
    """Device-to-device copy bandwidth in bytes/s, counting bytes read plus bytes written (the convention
    of the 2.99 TB/s H100 figure). The achievable ceiling, not the datasheet's."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    for _ in range(2):
        dst.copy_(src)
    torch.cuda.synchronize(device)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        dst.copy_(src)
    end.record()
    end.synchronize()
    seconds = start.elapsed_time(end) / 1000.0
    del src, dst
    torch.cuda.empty_cache()
    return 2 * nbytes * repeats / seconds


def weight_bytes_per_token(model: Any) -> int:
    """Parameter bytes one decode step reads: every parameter once, except the input embedding table, of
    which a step reads one row (unless it is tied to the output head, which reads all of it)."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    embed = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    weight = getattr(embed, "weight", None)
    if weight is not None and (out is None or getattr(out, "weight", None) is not weight):
        total -= weight.numel() * weight.element_size()
    return int(total)


def kv_bytes_per_token(config: Any, context: int, dtype_bytes: int) -> int:
    """Key and value bytes attention must read at ``context`` positions (sliding layers hold at most the window)."""
    from .measure import cache_layout

    layout = cache_layout(config)
    positions = (layout.layers - layout.sliding_layers) * context
    if layout.sliding_layers:
        positions += layout.sliding_layers * min(layout.window or context, context)
    return 2 * layout.kv_heads * layout.head_dim * dtype_bytes * positions


def roofline(model: Any, prompt_len: int, new_tokens: int, bandwidth: float, decode_ms: float) -> dict[str, float]:
    """The decode floor at batch 1: bytes read per token (weights + kv cache at the mean decode length)
    over the measured bandwidth; and how close the measured decode step comes to it (100 % = at the floor)."""
    dtype_bytes = next(model.parameters()).element_size()
    context = prompt_len + new_tokens // 2
    nbytes = weight_bytes_per_token(model) + kv_bytes_per_token(model.config, context, dtype_bytes)
    floor_ms = nbytes / bandwidth * 1000.0
    return {
        "bytes_per_token": float(nbytes),
        "bandwidth_gbps": bandwidth / 1e9,
        "roofline_floor_ms": floor_ms,
        "roofline_pct": 100.0 * floor_ms / decode_ms if decode_ms > 0 else 0.0,
    }
