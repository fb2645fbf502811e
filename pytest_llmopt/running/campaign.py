"""One interleaved speed campaign: the reference path and every speed variant of one model timed in the same
rounds, in a random order per round, so that each variant's figure is a ratio paired within a round.

Why (../shared/design/speed-measurement.md): a reference timed once and variants minutes later carries every
drift of the host between the two into every speedup (a 1B speedup moved from 4.44 to 6.11 that way). Here
every round runs the reference twice (R and its twin R', whose own ratio is an A/A test of the machine
measured all along) and each variant still being timed once, in a seeded random order (random order cancels
order and carry-over effects on average; a fixed ABAB would not). Per round the variant's ratio to the
geometric mean of R and R' is one paired value (stats.trimmed_estimate pools them).

The campaign's rules:
- Every path warms before the first round; a compiled path until its compile counters settle (2 to 4
  calls; compile time is the first call beyond a warm one, reported apart). One burn-in round is timed and
  not used. A compile or a CUDA-graph recording during the rounds is recorded against its path and its round
  is left out; once is a late warm-up (seen on an H100: inductor's CUDA-graph tree recorded the compiled decode
  once more in the first rounds of an interleaved campaign), twice is a finding ("recompiled while timing").
- Rounds continue until every variant's 95 % interval is within ``plan.target`` (stopping on precision,
  never on significance, does not inflate false alarms), or the time budget or the round cap is reached; at
  least ``plan.min_rounds`` kept rounds and ``plan.min_timed_s`` of timed calls, even past the budget (up to
  HARD_CAP times it).
- On CUDA a round in which a call was descheduled for more than 10 % of its wall time is kept in the record
  and left out of the estimates (not judged for a request mix, which generates on threads of its own); more
  than a third of the rounds dropped makes the campaign "too noisy".
- The garbage collector is frozen after the warm-ups and off during every timed call.
- On CUDA each path also makes ``plan.profiled_calls`` profiled calls (gpuwork.py) outside the rounds: the
  GPU's own work per token.

The campaign sees only callables (``generate(processors) -> sequences``), so it is independent of how paths are
built and can be tested on any clock. ``CURRENT`` names the path being run (fault plugins read it).
"""

from __future__ import annotations

import contextvars
import gc
import math
import random
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..common import stats
from .timing import Run, cudagraph_activity, timed_call, timed_whole

CURRENT: contextvars.ContextVar[str | None] = contextvars.ContextVar("llmopt_speed_path", default=None)
TWIN = "'"  # the reference's twin slot is its key with this suffix
DESCHEDULED_LIMIT = 0.10
HARD_CAP = 3  # the minimum rounds may overrun the budget up to this factor, no further


@dataclass(frozen=True)
class Plan:
    new_tokens: int
    budget_s: float  # timed rounds (warm-ups, compiles and profiled calls apart)
    min_rounds: int = 6
    max_rounds: int = 40
    target: float = 0.03  # relative half-width of the 95 % interval at which a variant leaves the rounds
    min_timed_s: float = 2.0
    profiled_calls: int = 2
    seed: int = 0


@dataclass
class Path:
    """One generate() configuration of the campaign."""

    key: str
    generate: Callable[[list[Any]], Any]  # (logits processors) -> sequences
    compiled: bool = False
    per_step: bool = True  # one logits-processor call per token (False for draft paths)
    tokens: int | None = None  # a whole-call path (a request mix): generate() returns the tokens it made, this many


@dataclass
class PathRecord:
    key: str
    warmups_ms: list[float] = field(default_factory=list)
    burn_in: Run | None = None
    runs: dict[int, Run] = field(default_factory=dict)  # round index -> the call of that round
    twin_runs: dict[int, Run] = field(default_factory=dict)  # the reference's twin calls
    gpu_ms: list[float] = field(default_factory=list)  # GPU busy ms per decode step (or per token) from profiled calls
    gpu_error: str | None = None
    recompiled: list[str] = field(default_factory=list)  # one text per timed round in which this path compiled or recorded
    peak_bytes: int | None = None  # above the allocation before each call (CUDA)
    graphs: dict[str, int] = field(default_factory=lambda: {"skips": 0, "recorded": 0, "replayed": 0})
    skip_reasons: list[str] = field(default_factory=list)

    @property
    def compile_s(self) -> float:
        if not self.warmups_ms or not self.runs:
            return 0.0
        warm = statistics.median(r.total_ms for r in self.runs.values())
        return max(0.0, (self.warmups_ms[0] - warm) / 1000.0)


@dataclass
class Result:
    reference: str
    paths: dict[str, PathRecord]
    orders: list[list[str]]  # per round (burn-in first), the order the slots ran in
    dropped: list[int]  # rounds left out for a descheduled call (the machine's noise)
    stopped: str  # "precision" | "budget" | "rounds"
    seconds: float  # the whole campaign
    timed_seconds: float  # the rounds' calls
    waited_s: float = 0.0  # waiting for the device's timing lock
    seed: int = 0
    errors: dict[str, BaseException] = field(default_factory=dict)  # paths that raised while warming up, left out
    late: list[int] = field(default_factory=list)  # rounds left out because a path compiled or recorded in them

    @property
    def kept(self) -> list[int]:
        rounds = self.paths[self.reference].runs
        return [r for r in sorted(rounds) if r not in self.dropped and r not in self.late and r in self.paths[self.reference].twin_runs]

    @property
    def too_noisy(self) -> bool:
        total = len(self.orders) - 1 - len(self.late)
        return total > 0 and len(self.dropped) > total / 3

    def reference_ms(self, r: int, figure: str = "step_ms") -> float:
        """The round's reference: the geometric mean of R and R'."""
        ref = self.paths[self.reference]
        return math.sqrt(getattr(ref.runs[r], figure) * getattr(ref.twin_runs[r], figure))

    def paired(self, key: str, figure: str = "step_ms") -> stats.Estimate | None:
        """The paired speedup of ``key`` over the reference (reference time / path time per round), or None
        with fewer than 2 kept rounds."""
        record = self.paths[key]
        logs = [math.log(self.reference_ms(r, figure)) - math.log(getattr(record.runs[r], figure)) for r in self.kept if r in record.runs]
        return stats.trimmed_estimate(logs) if len(logs) >= 2 else None

    def aa(self, figure: str = "step_ms") -> stats.Estimate | None:
        """R against R' in every kept round: no change expected; its spread is the machine's noise."""
        ref = self.paths[self.reference]
        logs = [math.log(getattr(ref.runs[r], figure)) - math.log(getattr(ref.twin_runs[r], figure)) for r in self.kept]
        return stats.trimmed_estimate(logs) if len(logs) >= 2 else None

    def noise_per_call(self) -> float | None:
        """The relative noise of one call: the A/A values' standard deviation over sqrt 2 (a difference of two calls)."""
        est = self.aa()
        if est is None or not math.isfinite(est.se):
            return None
        return est.se * math.sqrt(est.n) / math.sqrt(2)

    def gpu_estimate(self, key: str) -> stats.Estimate | None:
        values = self.paths[key].gpu_ms
        if len(values) < 2 or min(values) <= 0:
            return None
        return stats.trimmed_estimate([math.log(v) for v in values])

    def median(self, key: str, figure: str) -> float:
        runs = list(self.paths[key].runs.values())
        return statistics.median(getattr(r, figure) for r in runs)


class Campaign:
    """Runs paths against a reference on one device (see the module docstring)."""

    def __init__(self, device: Any, prompt_len: int, plan: Plan, clock: Callable[[], float] = time.monotonic) -> None:
        self.device = device
        self.cuda = getattr(device, "type", str(device)) == "cuda"
        self.prompt_len = prompt_len
        self.plan = plan
        self.clock = clock
        self._late = False  # a path compiled or recorded in the round being run
        self._graphs: dict[str, Any] = {}

    def run(self, reference: Path, variants: list[Path]) -> Result:
        start = self.clock()
        paths = {p.key: p for p in [reference, *variants]}
        records = {key: PathRecord(key) for key in paths}
        rng = random.Random(self.plan.seed)
        errors: dict[str, BaseException] = {}
        with cudagraph_activity() as graphs:
            self._graphs = graphs
            for path in list(paths.values()):
                try:
                    self._warm(path, records[path.key])
                except (KeyboardInterrupt, SystemExit):
                    raise
                except BaseException as exc:  # pytest's outcomes too: the path's own check raises it again
                    if path is reference:
                        raise
                    errors[path.key] = exc
                    del paths[path.key], records[path.key]
            variants = [v for v in variants if v.key in paths]
            gc.collect()
            gc.freeze()
            try:
                orders, dropped, late, stopped, timed = self._rounds(reference, variants, records, rng)
                if self.cuda:
                    for path in paths.values():
                        self._profile(path, records[path.key])
            finally:
                gc.unfreeze()
        return Result(reference.key, records, orders, dropped, stopped, self.clock() - start, timed, seed=self.plan.seed, errors=errors, late=late)

    # --- the parts ------------------------------------------------------------------------------------------

    def _call(self, path: Path, record: PathRecord, timing: int) -> Run:
        """One call; ``timing`` is the round's index (0: not a timed round). A compile or a recording in a timed
        round is noted against the path, and ``self._late`` says the round saw one."""
        token = CURRENT.set(path.key)
        graphs, seen = _unique_graphs(), dict(self._graphs)
        skips, reasons = _skips(), len(self._graphs["reasons"])
        base = _allocated(self.device) if self.cuda else 0
        if self.cuda:
            import torch

            torch.cuda.reset_peak_memory_stats(self.device)
        gc.disable()
        try:
            if path.tokens is not None:
                run = timed_whole(path.generate, self.device, path.tokens)
            else:
                run = timed_call(path.generate, self.device, self.prompt_len, self.plan.new_tokens)
        finally:
            gc.enable()
            CURRENT.reset(token)
        if self.cuda:
            import torch

            peak = max(0, int(torch.cuda.max_memory_allocated(self.device)) - base)
            record.peak_bytes = max(record.peak_bytes or 0, peak)
        recorded = self._graphs["recorded"] - seen["recorded"]
        record.graphs["recorded"] += recorded
        record.graphs["replayed"] += self._graphs["replayed"] - seen["replayed"]
        record.graphs["skips"] += _skips() - skips
        record.skip_reasons += [r for r in self._graphs["reasons"][reasons:] if r not in record.skip_reasons]
        compiled = _unique_graphs() - graphs
        if timing and (compiled or recorded):
            record.recompiled.append(f"round {timing}: {compiled} new compiled graph(s) and {recorded} CUDA graph recording(s)")
            self._late = True
        return run

    def _warm(self, path: Path, record: PathRecord) -> None:
        """Warm-up calls: one for an eager path; a compiled one until its compile counters stop moving."""
        calls = 0
        while True:
            before = (_unique_graphs(), self._graphs["recorded"])
            record.warmups_ms.append(self._call(path, record, timing=0).total_ms)
            calls += 1
            settled = (_unique_graphs(), self._graphs["recorded"]) == before
            if not path.compiled or calls >= 4 or (calls >= 2 and settled):
                break

    def _rounds(
        self, reference: Path, variants: list[Path], records: dict[str, PathRecord], rng: random.Random
    ) -> tuple[list[list[str]], list[int], list[int], str, float]:
        plan = self.plan
        active = [v.key for v in variants]
        paths = {p.key: p for p in [reference, *variants]}
        orders: list[list[str]] = []
        dropped: list[int] = []
        late: list[int] = []
        timed = 0.0
        began = self.clock()
        stopped = "rounds"
        ref = records[reference.key]
        for index in range(plan.max_rounds + 1):  # round 0 is the burn-in
            slots = [reference.key, reference.key + TWIN, *active]
            rng.shuffle(slots)
            orders.append(slots)
            worst = 0.0
            self._late = False
            for slot in slots:
                key = slot.removesuffix(TWIN)
                run = self._call(paths[key], records[key], timing=index)
                timed += run.wall_ms / 1000.0
                if paths[key].tokens is None:  # a request mix runs on threads of its own: its caller's CPU time says nothing
                    worst = max(worst, run.descheduled)
                if index == 0:
                    records[key].burn_in = records[key].burn_in or run
                elif slot.endswith(TWIN):
                    ref.twin_runs[index] = run
                else:
                    records[key].runs[index] = run
            if index == 0:
                continue
            if self._late:
                late.append(index)
            elif self.cuda and worst > DESCHEDULED_LIMIT:
                dropped.append(index)
            kept = index - len(dropped) - len(late)
            elapsed = self.clock() - began
            if kept < plan.min_rounds or timed < plan.min_timed_s:
                if elapsed >= HARD_CAP * plan.budget_s:  # a machine so slow that the minimum does not fit
                    stopped = "budget"
                    break
                continue
            partial = Result(reference.key, records, orders, dropped, "", 0.0, timed, late=late)
            active = [key for key in active if not _precise(partial.paired(key), plan.target)]
            if not active and (variants or _precise(partial.aa(), plan.target)):
                stopped = "precision"
                break
            if elapsed >= plan.budget_s:
                stopped = "budget"
                break
        return orders, dropped, late, stopped, timed

    def _profile(self, path: Path, record: PathRecord) -> None:
        from .gpuwork import profiled, profiled_whole

        token = CURRENT.set(path.key)
        try:
            for _ in range(self.plan.profiled_calls):
                if path.tokens is not None:
                    record.gpu_ms += profiled_whole(path.generate, self.device, path.tokens)
                else:
                    record.gpu_ms += profiled(path.generate, self.device, self.plan.new_tokens, path.per_step)
        except Exception as exc:  # a trace without kernels (a profiler that cannot see this device): said, not hidden
            record.gpu_error = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        finally:
            CURRENT.reset(token)


def _precise(estimate: stats.Estimate | None, target: float) -> bool:
    return estimate is not None and math.isfinite(estimate.se) and estimate.half_width <= target


def _unique_graphs() -> int:
    try:
        from torch._dynamo.utils import counters
    except Exception:
        return 0
    return int(counters["stats"]["unique_graphs"])


def _skips() -> int:
    try:
        from torch._dynamo.utils import counters
    except Exception:
        return 0
    return int(counters["inductor"]["cudagraph_skips"])


def _allocated(device: Any) -> int:
    import torch

    return int(torch.cuda.memory_allocated(device))
