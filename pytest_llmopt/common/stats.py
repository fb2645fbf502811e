"""Intervals and verdicts for timed figures: paired log-ratios, their robust estimate, and the rule that
turns a figure and its baseline into regression / ok / improvement / inconclusive.

Why this shape (../shared/design/speed-measurement.md, section E):
- Timing noise is positive, heavy-tailed and bursty, so a figure is a 20 %-trimmed mean of per-round
  log values with Yuen's standard error (robust to one bad round, valid from about 6 rounds), and its
  interval uses Student's t on the rounds left after trimming.
- Within one session the rounds cannot see how much a whole session moves (host speed, compile picks):
  a verdict against a baseline adds the baseline's between-session spread (or a default per band class
  while fewer than three sessions were pooled) to both standard errors.
- A verdict needs significance *and* magnitude (pyperf's --min-speed, Hunter): regression when the
  one-sided 99.5 % bound excludes no change and the estimate is at least 5 % worse. With up to ten gated
  figures a model, that keeps the family's false-alarm rate under 5 % when nothing changed; a 10 %
  slowdown is caught with >= 95 % probability whenever the combined standard error is <= 2.5 %. Anything
  the run could not decide says the smallest slowdown it could have detected.

Pure functions on floats; nothing here imports torch or pytest.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

ALPHA = 0.005  # one-sided, per gated figure
MIN_EFFECT = math.log(1 / 0.95)  # a regression is at least 5 % worse ...
GUARD = math.log(1 / 0.90)  # ... and "ok" excludes a 10 % loss
TRIM = 0.2
# z(1 - ALPHA) + z(0.95): the change detected with 95 % power at level ALPHA is this many standard errors
POWER_Z = 2.5758293035489 + 1.6448536269514722

# Between-session spread assumed while a baseline pools fewer than MIN_SESSIONS sessions (log units), by what
# bounds the figure: the GPU's own work repeats closely, a host-bound wall time moves with the host.
DEFAULT_SIGMA_BETWEEN = {"gpu-work": 0.02, "gpu": 0.03, "mixed": 0.10, "host": 0.25, "cpu": 0.25}
MIN_SESSIONS = 3
BAND_CLASSES = tuple(DEFAULT_SIGMA_BETWEEN)


@dataclass(frozen=True)
class Estimate:
    """A figure in log units: ``log`` (e.g. ln speedup), its standard error and degrees of freedom."""

    log: float
    se: float
    n: int  # values it was estimated from (rounds)
    df: int

    @property
    def value(self) -> float:
        return math.exp(self.log)

    def interval(self, level: float = 0.95) -> tuple[float, float]:
        """Two-sided interval of the figure itself (not its log)."""
        h = t_quantile(0.5 + level / 2, self.df) * self.se
        return math.exp(self.log - h), math.exp(self.log + h)

    @property
    def half_width(self) -> float:
        """Relative half-width of the 95 % interval (0.03 = +-3 %)."""
        low, high = self.interval()
        return (high - low) / 2 / self.value

    def to_json(self) -> dict[str, float | int]:
        low, high = self.interval()
        return {"value": self.value, "log": self.log, "se": self.se, "n": self.n, "df": self.df, "low": low, "high": high}


def trimmed_estimate(logs: Sequence[float], trim: float = TRIM) -> Estimate:
    """Trimmed mean of ``logs`` with Yuen's standard error (winsorized sd / ((1 - 2 trim) sqrt n)).

    Fewer than 2 values: the estimate with an infinite standard error (no interval can be given)."""
    values = sorted(float(x) for x in logs)
    n = len(values)
    if n == 0:
        raise ValueError("no values to estimate from")
    if n < 2:
        return Estimate(values[0], math.inf, n, 0)
    g = math.floor(trim * n)
    kept = values[g : n - g]
    mean = statistics.fmean(kept)
    winsorized = [values[g]] * g + kept + [values[n - g - 1]] * g
    sd = statistics.stdev(winsorized)
    se = sd / ((1 - 2 * g / n) * math.sqrt(n))
    return Estimate(mean, se, n, max(1, len(kept) - 1))


def t_quantile(p: float, df: int) -> float:
    """Student's t quantile (exact for 1 and 2 df, else the Cornish-Fisher expansion
    around the normal: within 1 % of the table from 3 df)."""
    if df <= 0:
        return math.inf
    if df == 1:
        return math.tan(math.pi * (p - 0.5))
    if df == 2:
        return (2 * p - 1) / math.sqrt(2 * p * (1 - p))
    z = statistics.NormalDist().inv_cdf(p)
    if df > 1000:
        return z
    g1 = (z**3 + z) / 4
    g2 = (5 * z**5 + 16 * z**3 + 3 * z) / 96
    g3 = (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / 384
    g4 = (79 * z**9 + 776 * z**7 + 1482 * z**5 - 1920 * z**3 - 945 * z) / 92160
    return z + g1 / df + g2 / df**2 + g3 / df**3 + g4 / df**4


@dataclass(frozen=True)
class Pooled:
    """Several sessions' estimates of one figure pooled: the baseline a new session is judged against."""

    log: float
    se: float  # of the pooled mean, between-session spread included
    sigma_between: float  # what one more session may move by, beyond its own interval
    sessions: int
    provisional: bool  # fewer than MIN_SESSIONS: sigma_between is at least the class's default


def pool(estimates: Sequence[tuple[float, float]], band: str) -> Pooled:
    """Random-effects pooling of (log, se) per session (Kalibera & Jones's execution level):
    sigma_B^2 = max(0, var(logs) - mean(se^2)); the value is the mean of the sessions."""
    if not estimates:
        raise ValueError("no sessions to pool")
    logs = [x for x, _ in estimates]
    ses = [s for _, s in estimates]
    k = len(estimates)
    within = statistics.fmean(s * s for s in ses)
    between = math.sqrt(max(0.0, statistics.variance(logs) - within)) if k >= 2 else 0.0
    provisional = k < MIN_SESSIONS
    if provisional:
        between = max(between, DEFAULT_SIGMA_BETWEEN[band])
    se = math.sqrt((within + between**2) / k)
    return Pooled(statistics.fmean(logs), se, between, k, provisional)


@dataclass(frozen=True)
class Verdict:
    """One timed figure against its baseline, in the "better is positive" direction."""

    kind: str  # "regression" | "ok" | "improvement" | "inconclusive"
    change: float  # relative change of the figure, better positive (-0.05 = 5 % worse)
    low: float  # 99 % two-sided interval of that change (its bounds are the one-sided 99.5 % bounds)
    high: float
    mde: float  # smallest slowdown detected with 95 % power at this run's precision (0.08 = 8 %)
    se: float  # combined standard error (log units)

    @property
    def text(self) -> str:
        interval = f"{self.change:+.1%} [{self.low:+.1%}, {self.high:+.1%}]"
        if self.kind == "inconclusive":
            return f"inconclusive: {interval}; this run could detect a slowdown of {self.mde:.0%} or more, not 10 %"
        return f"{self.kind}: {interval}"


def judge(now: Estimate, base: Pooled, direction: int) -> Verdict:
    """Regression / ok / improvement / inconclusive of ``now`` against the pooled baseline (``direction``
    +1 when higher is better)."""
    d = direction * (now.log - base.log)
    se = math.sqrt(now.se**2 + base.se**2 + base.sigma_between**2)
    z = statistics.NormalDist().inv_cdf(1 - ALPHA)
    low, high = d - z * se, d + z * se
    if high < 0 and d <= -MIN_EFFECT:
        kind = "regression"
    elif low > 0 and d >= MIN_EFFECT:
        kind = "improvement"
    elif low >= -GUARD:
        kind = "ok"
    else:
        kind = "inconclusive"
    mde = 1 - math.exp(-POWER_Z * se) if math.isfinite(se) else 1.0
    return Verdict(kind, math.expm1(d), math.expm1(low), math.expm1(high), mde, se)


def compare_sessions(a: tuple[float, float], b: tuple[float, float], band: str, direction: int) -> Verdict:
    """Two single sessions (e.g. two reports of `llmopt compare`), each (log, se), judged as a baseline of
    one session: the between-session spread is the class's default."""
    base = Pooled(a[0], a[1], DEFAULT_SIGMA_BETWEEN[band], 1, True)
    return judge(Estimate(b[0], b[1], 0, 0), base, direction)


def band_class(busy: float | None, device_type: str) -> str:
    """What bounds a wall-time figure: the GPU (busy >= 85 %), the host (<= 50 %), or both ("mixed");
    "cpu" on CPU; "mixed" when GPU busy time was not measured."""
    if device_type != "cuda":
        return "cpu"
    if busy is None:
        return "mixed"
    return "gpu" if busy >= 0.85 else "host" if busy <= 0.5 else "mixed"
