"""Where a check's time goes: wall seconds per phase, per check (in its record, ``phases``) and summed
over the run (the terminal summary), so that what makes a matrix slow is known before anything is changed.

Phases: ``load`` (models and tokenizers), ``reference`` (the cache-free forwards a verdict is judged against: the
higher-precision logits, the exact sampling distributions), ``compile`` (torch.compile's own compile time, from
dynamo's accounting, taken out of the phase it happened in), ``generate`` (the paths under test and the plain path:
generate(), decode loops, forwards, continuous batching), ``verdict`` (comparing what they gave), ``speed`` (a speed
campaign), ``wait`` (for the device's timing lock: another worker's speed campaign, or a campaign waiting for the
other workers' checks to end, gpulock.py); ``other`` is the rest of the check's setup and call.
Phases nest: the innermost open one gets the time (a reference forward inside a verdict is ``reference``).
"""

from __future__ import annotations

import contextlib
import functools
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

PHASES = ("load", "reference", "compile", "generate", "verdict", "speed", "wait", "other")


@dataclass
class _Frame:
    name: str
    wall: float
    compiling: float
    child_wall: float = 0.0
    child_compiling: float = 0.0


@dataclass
class Clock:
    """The phases of one check, measured while it runs."""

    totals: dict[str, float] = field(default_factory=lambda: dict.fromkeys(PHASES, 0.0))
    frames: list[_Frame] = field(default_factory=list)
    started: float = field(default_factory=time.perf_counter)

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        frame = _Frame(name, time.perf_counter(), compile_seconds())
        self.frames.append(frame)
        try:
            yield
        finally:
            self.frames.pop()
            wall = time.perf_counter() - frame.wall
            compiling = max(0.0, compile_seconds() - frame.compiling)
            own_compile = max(0.0, compiling - frame.child_compiling)
            self.totals["compile"] += own_compile
            self.totals[name] += max(0.0, wall - frame.child_wall - own_compile)
            if self.frames:
                self.frames[-1].child_wall += wall
                self.frames[-1].child_compiling += compiling

    def finish(self) -> dict[str, float]:
        """The check's phases in seconds, ``other`` being what no phase claimed."""
        elapsed = time.perf_counter() - self.started
        out = {name: round(value, 3) for name, value in self.totals.items() if name != "other"}
        out["other"] = round(max(0.0, elapsed - sum(self.totals.values())), 3)
        return out


_current: Clock | None = None


def start() -> Clock:
    global _current
    _current = Clock()
    return _current


def stop() -> dict[str, float] | None:
    global _current
    clock, _current = _current, None
    return clock.finish() if clock is not None else None


@contextlib.contextmanager
def phase(name: str) -> Iterator[None]:
    """Time the block as ``name`` in the running check's clock (nothing outside a check)."""
    if _current is None:
        yield
        return
    with _current.phase(name):
        yield


def timed(name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """A function's calls timed as phase ``name``."""

    def wrap(function: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(function)
        def timed_call(*args: Any, **kwargs: Any) -> Any:
            with phase(name):
                return function(*args, **kwargs)

        return timed_call

    return wrap


def compile_seconds() -> float:
    """torch.compile's compile time so far in this process (dynamo's own accounting; 0 where torch has none)."""
    import sys

    utils = sys.modules.get("torch._dynamo.utils")  # never imports torch: a process that has not compiled has none
    metrics: Any = getattr(utils, "compilation_time_metrics", None) if utils is not None else None
    if not isinstance(metrics, dict):
        return 0.0
    return float(sum(metrics.get("_compile.compile_inner", ()) or ()))


def summary_lines(results: list[Any], top: int = 5) -> list[str]:
    """The run's time per phase, and the checks that took longest with theirs (from the results' records)."""
    timed = [(r, r.phases) for r in results if r.phases]
    if not timed:
        return []
    sums = dict.fromkeys(PHASES, 0.0)
    for _, phases in timed:
        for name in PHASES:
            sums[name] += float(phases.get(name, 0.0))
    total = sum(sums.values()) or 1.0
    lines = [f"{len(timed)} check(s), {total:.1f} s: " + ", ".join(f"{name} {sums[name]:.1f} s ({sums[name] / total:.0%})" for name in PHASES if sums[name] >= 0.05)]
    longest = sorted(timed, key=lambda pair: -sum(pair[1].values()))[:top]
    for result, phases in longest:
        split = ", ".join(f"{name} {phases[name]:.1f}" for name in PHASES if phases.get(name, 0.0) >= 0.05)
        lines.append(f"  {sum(phases.values()):6.1f} s  {result.key}: {split}")
    return lines
