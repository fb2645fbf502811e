"""The statistics of the speed verdicts (stats.py) and the interleaved campaign (campaign.py), without a model:
the estimator against known values, the verdict rule's false-alarm rate and power by simulation, and the
campaign's pairing on a simulated device whose host drifts and jitters."""

from __future__ import annotations

import math
import random
import statistics
import types
from typing import Any

import pytest
import torch

from pytest_llmopt.common import stats
from pytest_llmopt.running import campaign as cp


def test_trimmed_estimate_matches_yuen_by_hand() -> None:
    values = [0.10, 0.11, 0.09, 0.10, 0.12, 0.08, 0.10, 0.11, 0.09, 0.90]  # one wild round
    est = stats.trimmed_estimate(values)
    kept = sorted(values)[2:8]
    assert est.log == pytest.approx(statistics.fmean(kept))
    winsorized = [kept[0]] * 2 + kept + [kept[-1]] * 2
    assert est.se == pytest.approx(statistics.stdev(winsorized) / (0.6 * math.sqrt(10)))
    assert est.df == 5
    assert abs(est.log - 0.10) < 0.005  # the wild round moved nothing
    assert stats.trimmed_estimate([0.3]).se == math.inf


@pytest.mark.parametrize(("p", "df", "table"), [(0.975, 1, 12.706), (0.975, 2, 4.303), (0.975, 5, 2.571), (0.975, 10, 2.228), (0.995, 5, 4.032), (0.995, 30, 2.750)])
def test_t_quantile_matches_the_table(p: float, df: int, table: float) -> None:
    assert stats.t_quantile(p, df) == pytest.approx(table, rel=0.01)


def _pooled(value: float, se: float, sigma: float = 0.0, sessions: int = 3) -> stats.Pooled:
    return stats.Pooled(math.log(value), se, sigma, sessions, sessions < 3)


@pytest.mark.parametrize(
    ("now", "se", "kind"),
    [
        (4.0, 0.01, "ok"),  # no change
        (3.6, 0.01, "regression"),  # 10 % slower, tight
        (3.9, 0.005, "ok"),  # 2.5 % slower: significant but below the 5 % magnitude, and a 10 % loss is excluded
        (3.6, 0.10, "inconclusive"),  # 10 % slower, too noisy to tell
        (4.6, 0.01, "improvement"),
    ],
)
def test_verdicts_need_significance_and_magnitude(now: float, se: float, kind: str) -> None:
    v = stats.judge(stats.Estimate(math.log(now), se, 12, 9), _pooled(4.0, 0.01), +1)
    assert v.kind == kind
    if kind == "inconclusive":
        assert "could detect a slowdown of" in v.text and v.mde > 0.10


def test_direction_lower_is_better() -> None:
    slower = stats.judge(stats.Estimate(math.log(1.2), 0.01, 12, 9), _pooled(1.0, 0.01), -1)
    assert slower.kind == "regression" and slower.change == pytest.approx(-0.2 / 1.2, rel=0.05)


def test_pooling_measures_the_between_session_spread() -> None:
    sessions = [(math.log(4.0 * f), 0.01) for f in (0.9, 1.0, 1.1, 0.95, 1.05)]
    pooled = stats.pool(sessions, "mixed")
    assert not pooled.provisional and 0.05 < pooled.sigma_between < 0.09
    few = stats.pool(sessions[:2], "host")
    assert few.provisional and few.sigma_between >= stats.DEFAULT_SIGMA_BETWEEN["host"]


def test_false_alarm_rate_and_power_by_simulation() -> None:
    """Sessions of 12 paired rounds with 5 % noise per call and a 1.5 % between-session spread, judged against a
    baseline pooled from 3 such sessions: no change is a regression in at most 1 % of 400 tries; a 10 % slowdown
    is one in at least 95 % of the tries whose combined standard error is within 2.5 % (the documented promise)."""
    rng = random.Random(7)

    def session(shift: float) -> stats.Estimate:
        level = rng.gauss(0, 0.015) + shift
        return stats.trimmed_estimate([math.log(4.0) + level + rng.gauss(0, 0.05) for _ in range(12)])

    def baseline() -> stats.Pooled:
        return stats.pool([(e.log, e.se) for e in (session(0.0) for _ in range(3))], "mixed")

    alarms = sum(stats.judge(session(0.0), baseline(), +1).kind == "regression" for _ in range(400))
    assert alarms <= 4
    slowed = [stats.judge(session(math.log(0.9)), baseline(), +1) for _ in range(400)]
    precise = [v for v in slowed if v.se <= 0.025]
    assert len(precise) >= 200
    assert sum(v.kind == "regression" for v in precise) >= 0.95 * len(precise)
    assert sum(v.kind == "ok" for v in slowed) <= 8  # a slowdown passed as "ok" only by a rare sampling fluke


# --- the campaign on a simulated device ---------------------------------------------------------------------


class Clock:
    """A virtual perf_counter: calls cost what the simulated paths say, nothing else moves it."""

    def __init__(self) -> None:
        self.now = 100.0

    def perf_counter(self) -> float:
        return self.now

    def thread_time(self) -> float:
        return self.now


def simulated(monkeypatch: pytest.MonkeyPatch, clock: Clock) -> None:
    from pytest_llmopt.running import timing

    monkeypatch.setattr(timing, "time", types.SimpleNamespace(perf_counter=clock.perf_counter, thread_time=clock.thread_time))


def path(key: str, clock: Clock, step_s: float, host: dict[str, float], noise: random.Random, tokens: int = 8, on_call: Any = None) -> cp.Path:
    """generate(processors): a prefill and ``tokens - 1`` steps of ``step_s`` each, every one scaled by the host's
    current speed and by per-call jitter (5 %); the processors mark each token as generate() would."""

    def generate(processors: list[Any]) -> torch.Tensor:
        if on_call:
            on_call()
        jitter = math.exp(noise.gauss(0, 0.05))
        scores = torch.zeros(1, 4)
        for i in range(tokens):
            clock.now += (0.002 if i == 0 else step_s) * host["factor"] * jitter
            host["factor"] *= host.get("drift", 1.0)
            for p in processors:
                p(torch.zeros(1, 1, dtype=torch.long), scores)
        return torch.zeros(1, 32 + tokens, dtype=torch.long)

    return cp.Path(key, generate)


def test_pairing_keeps_a_speedup_true_while_the_host_slows_down(monkeypatch: pytest.MonkeyPatch) -> None:
    """The host gets 3x slower over the campaign: unpaired, the first half's reference against the second half's
    variant would say 1.5x; paired within rounds the speedup stays 4x, the A/A stays 1."""
    clock = Clock()
    simulated(monkeypatch, clock)
    host = {"factor": 1.0, "drift": 1.0021}
    noise = random.Random(1)
    plan = cp.Plan(8, budget_s=1e9, min_rounds=20, max_rounds=20, min_timed_s=0, profiled_calls=0)
    result = cp.Campaign(torch.device("cpu"), 32, plan, clock=lambda: clock.now).run(
        path("R", clock, 0.008, host, noise), [path("fast", clock, 0.002, host, noise)]
    )
    assert host["factor"] > 2.5
    speedup, aa = result.paired("fast"), result.aa()
    assert speedup is not None and aa is not None
    low, high = speedup.interval()
    assert low < 4.0 < high and speedup.half_width < 0.05
    assert aa.interval()[0] < 1.0 < aa.interval()[1]
    assert len(result.kept) == 20 and result.stopped == "rounds"
    orders = {tuple(o) for o in result.orders}
    assert len(orders) > 3 and all(sorted(o) == ["R", "R'", "fast"] for o in orders)  # every round all slots, in varied orders


def test_rounds_stop_on_precision_and_variants_leave_when_precise(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = Clock()
    simulated(monkeypatch, clock)
    host = {"factor": 1.0}
    quiet, noisy = random.Random(2), random.Random(3)
    plan = cp.Plan(8, budget_s=1e9, min_rounds=6, max_rounds=40, min_timed_s=0, profiled_calls=0)
    result = cp.Campaign(torch.device("cpu"), 32, plan, clock=lambda: clock.now).run(path("R", clock, 0.008, host, quiet), [path("V", clock, 0.004, host, quiet)])
    assert result.stopped == "precision" and len(result.kept) < 40
    budget = cp.Plan(8, budget_s=0.5, min_rounds=6, max_rounds=400, min_timed_s=0, profiled_calls=0)

    def jittery() -> None:
        clock.now += abs(noisy.gauss(0, 0.05))  # bursts the step marks see

    result = cp.Campaign(torch.device("cpu"), 32, budget, clock=lambda: clock.now).run(
        path("R", clock, 0.008, {"factor": 1.0}, noisy, on_call=jittery), [path("V", clock, 0.004, {"factor": 1.0}, noisy)]
    )
    assert result.stopped in ("budget", "precision") and len(result.kept) >= 6


@pytest.mark.parametrize("compiles_at", [(3,), (3, 6)])
def test_a_compile_while_timing_leaves_its_round_out_and_twice_is_a_finding(monkeypatch: pytest.MonkeyPatch, compiles_at: tuple[int, ...]) -> None:
    from torch._dynamo.utils import counters

    from pytest_llmopt.running.speedrun import problems

    clock = Clock()
    simulated(monkeypatch, clock)
    host = {"factor": 1.0}
    rng = random.Random(4)
    calls = {"n": 0}

    def recompile() -> None:
        calls["n"] += 1
        if calls["n"] in compiles_at:  # the path's call 3 is in timed round 1 (1 warm-up, 1 burn-in), call 6 in round 4
            counters["stats"]["unique_graphs"] += 1

    plan = cp.Plan(8, budget_s=1e9, min_rounds=6, max_rounds=8, min_timed_s=0, profiled_calls=0)
    result = cp.Campaign(torch.device("cpu"), 32, plan, clock=lambda: clock.now).run(
        path("R", clock, 0.008, host, rng), [path("V", clock, 0.004, host, rng, on_call=recompile)]
    )
    record = result.paths["V"]
    assert len(record.recompiled) == len(compiles_at) and "1 new compiled graph(s)" in record.recompiled[0]
    assert len(result.late) == len(compiles_at) and not set(result.late) & set(result.kept)  # those rounds are left out
    assert not result.paths["R"].recompiled
    variant = types.SimpleNamespace(compile="off")
    found = problems("V vs R", variant, 0, record, cuda=False)
    assert (found == []) if len(compiles_at) == 1 else ("recompiled while timing, in 2 rounds" in found[0])


def test_a_path_that_raises_while_warming_is_left_out_with_its_error(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = Clock()
    simulated(monkeypatch, clock)
    rng = random.Random(5)

    def broken(processors: list[Any]) -> torch.Tensor:
        raise RuntimeError("cannot reshape tensor of 0 elements")

    plan = cp.Plan(8, budget_s=1e9, min_rounds=6, max_rounds=6, min_timed_s=0, profiled_calls=0)
    result = cp.Campaign(torch.device("cpu"), 32, plan, clock=lambda: clock.now).run(
        path("R", clock, 0.008, {"factor": 1.0}, rng), [cp.Path("broken", broken), path("V", clock, 0.004, {"factor": 1.0}, rng)]
    )
    assert isinstance(result.errors["broken"], RuntimeError) and "broken" not in result.paths
    assert result.paired("V") is not None
