"""The GPU's own work per generated token, read from a CUDA activity trace (torch.profiler / CUPTI).

Why: at batch 1 most decode paths leave the GPU idle between kernels while the host prepares the next step, so
their wall time moves with the host (a shared machine's host moves by tens of percent from call to call). The
time the GPU spends in kernels and copies per token does not: it is what a slower kernel, a lost fusion or a
fallback changes, and it can be gated tightly where wall time cannot.

How: a profiled call runs the same generate() with a marker at every step: the stream is synchronized, then a
zero-length ``record_function`` range is recorded, so every kernel launched for step k starts after marker k
on the trace's (host-aligned) timeline. The union of kernel, copy and fill intervals between two markers is
that step's GPU work; a step's busy time never counts overlapping kernels twice. A draft path calls the
processors once per verified position, so there the figure is the call's decode work over its tokens.
Profiled calls are never timed for wall figures (the markers and CUPTI cost host time).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

MARKER = "llmopt::step"


def busy_ms(intervals: Sequence[tuple[float, float]]) -> float:
    """Length of the union of [start, end) intervals (any unit in, same unit out)."""
    total = 0.0
    current_start = current_end = None
    for start, end in sorted(intervals):
        if current_end is None or start > current_end:
            if current_end is not None:
                total += current_end - current_start  # type: ignore[operator]
            current_start, current_end = start, end
        else:
            current_end = max(current_end, end)
    if current_end is not None:
        total += current_end - current_start  # type: ignore[operator]
    return total


def split_steps(markers: Sequence[float], kernels: Sequence[tuple[float, float]]) -> list[float]:
    """Busy time of each decode step: the kernels starting between marker k and marker k + 1. Marker 0 ends
    the prefill, so kernels before it are left out, and so is what follows the last marker (the last token's
    sampling and generate()'s epilogue, not a whole step)."""
    bounds = sorted(markers)
    return [busy_ms([(s, e) for s, e in kernels if low <= s < high]) for low, high in zip(bounds, bounds[1:])]


def decode_busy(markers: Sequence[float], kernels: Sequence[tuple[float, float]]) -> float:
    """Busy time of everything after the prefill (from marker 0 on)."""
    first = min(markers)
    return busy_ms([(s, e) for s, e in kernels if s >= first])


def profiled(generate: Callable[[list[Any]], Any], device: Any, tokens: int, per_step: bool) -> list[float]:
    """Run ``generate(processors)`` once under the CUDA profiler. Returns the GPU busy milliseconds of each
    decode step (``per_step``), else one value: the decode's busy time over its ``tokens - 1`` tokens."""
    import torch
    from torch.profiler import ProfilerActivity, profile, record_function
    from transformers import LogitsProcessor

    class Marker(LogitsProcessor):
        def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
            torch.cuda.synchronize(device)
            with record_function(MARKER):
                pass
            return scores

    torch.cuda.synchronize(device)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        generate([Marker()])
        torch.cuda.synchronize(device)
    markers, kernels = _events(prof)
    if len(markers) < 2 or not kernels:
        raise RuntimeError(f"the CUDA trace holds {len(markers)} step markers and {len(kernels)} kernels: no GPU work per token can be read from it")
    if per_step:
        return [x / 1e6 for x in split_steps(markers, kernels)]
    return [decode_busy(markers, kernels) / 1e6 / max(1, tokens - 1)]


def profiled_whole(serve: Callable[[list[Any]], int], device: Any, tokens: int) -> list[float]:
    """A whole-call path (a request mix) under the CUDA profiler: every kernel of the call, prefills included,
    over the tokens it produced (one value)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize(device)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        serve([])
        torch.cuda.synchronize(device)
    _, kernels = _events(prof)
    if not kernels:
        raise RuntimeError("the CUDA trace of the request mix holds no kernels: no GPU work per token can be read from it")
    return [busy_ms(kernels) / 1e6 / max(1, tokens)]


def _events(prof: Any) -> tuple[list[float], list[tuple[float, float]]]:
    """(marker start times, device activity intervals) in nanoseconds on the trace's host-aligned clock: the
    profiler's raw events (its post-processed event list is slower and may time out on long traces)."""
    from torch.autograd import DeviceType

    raw = getattr(getattr(prof, "profiler", None), "kineto_results", None)
    markers: list[float] = []
    kernels: list[tuple[float, float]] = []
    if raw is not None:
        for event in raw.events():
            start = float(event.start_ns())
            if event.device_type() == DeviceType.CUDA:
                duration = float(event.duration_ns())
                if duration > 0:
                    kernels.append((start, start + duration))
            elif event.name() == MARKER:
                markers.append(start)
        return sorted(markers), kernels
    for fe in prof.events():  # older profilers: microseconds, scaled to nanoseconds
        lo, hi = float(fe.time_range.start) * 1000.0, float(fe.time_range.end) * 1000.0
        if fe.device_type == DeviceType.CUDA:
            if hi > lo:
                kernels.append((lo, hi))
        elif fe.name == MARKER:
            markers.append(lo)
    return sorted(markers), kernels
