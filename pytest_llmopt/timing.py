"""Timing generate(): prefill and decode apart, compile time apart, repeated runs with their spread.

Why this shape:
- GPU work is asynchronous, so a wall clock around generate() measures the launch queue unless the
  device is synchronized. Here every step is marked with a CUDA event recorded on the stream right
  after its forward (a logits processor runs once per generated token, after that token's forward),
  and the first mark splits prefill (time to first token) from decode. On CPU, marks are
  ``time.perf_counter()`` (the CPU is synchronous).
- The first calls of a compiled path compile (30-45 s on an H100) and record CUDA graphs: warm-up runs
  use the exact shapes measured, and the first one's excess over a warm run is reported as compile time.
- A generate() that stops early measures fewer tokens: the count is checked on every run.
- Repeated runs give a median and a spread, interquartile range over median; a spread above
  SPREAD_LIMIT makes the figure inconclusive (neither pass nor fail).

Nothing here imports pytest: the functions are plain and usable from scripts.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

# Bound on the interquartile range over median of the repeated runs' end-to-end time. On an H100 warm runs of the
# 1B and 7B shapes differ by < 2 %; a spread past these bounds means something else shares the device
# (or the CPU), and a verdict from such figures would be noise.
SPREAD_LIMIT = {"cuda": 0.10, "cpu": 0.25}


@dataclass(frozen=True)
class Run:
    """One timed generate() call."""

    ttft_ms: float  # start of the call -> end of the first token's forward
    decode_ms: float  # (end of the call - end of the first token's forward) / (new tokens - 1)
    total_ms: float
    new_tokens: int


@dataclass
class Timing:
    """Warm-up wall times and the timed runs of one path, summarized by medians."""

    runs: list[Run]
    warmup_ms: list[float] = field(default_factory=list)
    peak_memory_bytes: int | None = None  # above the level before the warm-ups (perf adds the weights)
    cudagraph_skips: int | None = None
    cudagraphs_recorded: int | None = None
    cudagraph_replays: int | None = None
    skip_reasons: list[str] = field(default_factory=list)

    @property
    def total_ms(self) -> float:
        return statistics.median(r.total_ms for r in self.runs)

    @property
    def ttft_ms(self) -> float:
        return statistics.median(r.ttft_ms for r in self.runs)

    @property
    def decode_ms(self) -> float:
        return statistics.median(r.decode_ms for r in self.runs)

    @property
    def new_tokens(self) -> int:
        return self.runs[0].new_tokens

    @property
    def tokens_per_s(self) -> float:
        """End-to-end generate() throughput (new tokens / call time), as a user sees it."""
        return self.new_tokens / (self.total_ms / 1000.0)

    @property
    def spread(self) -> float:
        """Interquartile range over median of the runs' end-to-end times (one outlier run, e.g. another
        process taking the CPU for a moment, does not move it; a drifting or bimodal device does)."""
        return relative_spread([r.total_ms for r in self.runs])

    @property
    def compile_s(self) -> float:
        """How much longer the first warm-up call took than a warm call: compilation and graph capture."""
        return max(0.0, (self.warmup_ms[0] - self.total_ms) / 1000.0) if self.warmup_ms else 0.0

    def metrics(self) -> dict[str, float | int]:
        out: dict[str, float | int] = {
            "ttft_ms": self.ttft_ms,
            "decode_ms": self.decode_ms,
            "total_ms": self.total_ms,
            "tokens_per_s": self.tokens_per_s,
            "spread": self.spread,
            "compile_s": self.compile_s,
            "runs": len(self.runs),
        }
        if self.peak_memory_bytes is not None:
            out["peak_memory_bytes"] = self.peak_memory_bytes
        if self.cudagraph_skips is not None:
            out["cudagraph_skips"] = self.cudagraph_skips
        if self.cudagraphs_recorded is not None:
            out["cudagraphs_recorded"] = self.cudagraphs_recorded
        if self.cudagraph_replays is not None:
            out["cudagraph_replays"] = self.cudagraph_replays
        return out


def relative_spread(values: list[float]) -> float:
    """(Q3 - Q1) / median, quartiles by the inclusive method; 0 for fewer than 2 values."""
    if len(values) < 2:
        return 0.0
    q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return (q3 - q1) / statistics.median(values)


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
    start = clock.mark()
    sequences = generate([processor])
    end = clock.mark()
    if clock.cuda:
        end.synchronize()
    produced = int(sequences.shape[-1]) - prompt_len
    if produced != new_tokens:
        raise ShortOutputError(f"generate() returned {produced} new tokens instead of the forced {new_tokens}: not comparable")
    if not clock.marks:
        raise ShortOutputError("the step clock never ran: generate() ignored logits_processor")
    first = clock.marks[0]
    total = clock.ms(start, end)
    ttft = clock.ms(start, first)
    decode = clock.ms(first, end) / max(1, new_tokens - 1)
    return Run(ttft, decode, total, produced)


def _as_processor(clock: StepClock) -> Any:
    """Wrap the clock in transformers' LogitsProcessor class (generate() checks the type in some releases)."""
    from transformers import LogitsProcessor

    class _Clock(LogitsProcessor):
        def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
            return clock(input_ids, scores)

    return _Clock()


def measure(
    generate: Callable[[list[Any]], torch.Tensor],
    device: torch.device,
    prompt_len: int,
    new_tokens: int,
    repeats: int,
    warmups: int,
    timed: Callable[[Callable[[], Run], int], list[Run]] | None = None,
) -> Timing:
    """Warm up, then time ``repeats`` calls; with CUDA, also peak memory and CUDA-graph activity.

    ``timed(one_run, repeats)`` may take over the repetition loop (pytest-benchmark's pedantic mode);
    it must call ``one_run`` ``repeats`` times and return the runs.
    """
    cuda = device.type == "cuda"
    warm: list[float] = []
    base = torch.cuda.memory_allocated(device) if cuda else 0
    with cudagraph_activity() as graphs:
        for _ in range(warmups):
            warm.append(timed_call(generate, device, prompt_len, new_tokens).total_ms)
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)

        def one_run() -> Run:
            return timed_call(generate, device, prompt_len, new_tokens)

        runs = timed(one_run, repeats) if timed is not None else [one_run() for _ in range(repeats)]
    timing = Timing(runs, warm)
    if cuda:
        # Above the level before the first warm-up: what this path adds to its weights (cache, activations,
        # graph pools), whatever else the session keeps on the card.
        timing.peak_memory_bytes = max(0, int(torch.cuda.max_memory_allocated(device)) - base)
        timing.cudagraph_skips = graphs["skips"]
        timing.cudagraphs_recorded = graphs["recorded"]
        timing.cudagraph_replays = graphs["replayed"]
        timing.skip_reasons = list(dict.fromkeys(graphs["reasons"]))
    return timing


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
