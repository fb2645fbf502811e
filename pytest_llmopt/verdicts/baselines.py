"""Stored baselines: per card and model, the figures of earlier sessions of one stack, judged by the metric
registry's rules (metrics.py).

Layout: ``<baselines dir>/<hardware slug>/<model>.json`` (the slug is machine.Machine.hardware_id, e.g.
``h200`` or ``cpu-x86_64``)::

    {"schema": 2, "hardware": "h200", "model": "llama-1b-shape",
     "environment": {"gpu": ..., "torch": ..., "transformers": ..., "setup": {...}, ...},
     "checks": {"performance::test_generate_speed[static+compile/sdpa/bf16]": {
         "decode_speedup": {"band": "mixed", "sessions": [
             {"value": 4.62, "se": 0.011, "n": 14, "busy": 0.41, "host": "...", "when": "..."}, ...]},
         "peak_memory_bytes": {"value": 2.6e9, "tolerance": 0.02}}}}

Rules (pure functions below, unit-tested in tests/test_baselines.py):
- A timed figure keeps every session it was written by (``--llmopt-update-baselines`` appends one; it never
  overwrites). Its baseline is those sessions pooled (stats.pool: between-session spread measured from three
  sessions on, a default per band class before), and a new session is judged by stats.judge.
- A fixed figure keeps one value and a tolerance (the registry's, or one tuned by hand and kept on update).
- One stack per file: sessions of another torch / transformers / CUDA / card / dtype / setup are not pooled
  with these. Updating under another stack starts the timed figures afresh (and says so); judging under
  another stack is what the gate is for, so it judges, and the report names both stacks.
- Where a stored value may judge another machine follows the registry's ``portable``: wall-time ratios only
  on the same card and host class, the GPU's work and memory on the same card, deterministic figures anywhere
  of the same device type.
- Files are replaced atomically, under a lock (pytest-xdist workers update the same file).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeGuard

from ..common import metrics as mx
from ..common import stats
from ..common.gpulock import file_lock

SCHEMA = 2
# The environment keys that make two sessions the same stack (what a timed figure may be pooled over).
STACK_KEYS = ("gpu", "cuda", "torch", "transformers", "bitsandbytes", "flash-attn", "dtype", "setup")
MEMORY_METRICS = mx.MEMORY


class BaselineError(ValueError):
    """A baseline file that cannot be used; the message starts with the file's path."""


@dataclass(frozen=True)
class Session:
    """One session's estimate of a timed figure."""

    value: float
    se: float  # of ln(value)
    n: int
    busy: float | None = None
    host: str = ""
    when: str = ""

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"value": float(f"{self.value:.6g}"), "se": float(f"{self.se:.4g}"), "n": self.n}
        if self.busy is not None:
            out["busy"] = round(self.busy, 4)
        return {**out, "host": self.host, "when": self.when}


@dataclass
class Stored:
    """One figure of one check: a fixed value with its tolerance, or the sessions of a timed figure."""

    value: float | None = None
    tolerance: float | None = None
    band: str = "mixed"
    sessions: list[Session] = field(default_factory=list)

    def pooled(self) -> stats.Pooled:
        return stats.pool([(math.log(s.value), s.se) for s in self.sessions], self.band)

    def to_json(self) -> dict[str, Any]:
        if self.sessions:
            return {"band": self.band, "sessions": [s.to_json() for s in self.sessions]}
        out: dict[str, Any] = {"value": self.value}
        if self.tolerance is not None:
            out["tolerance"] = self.tolerance
        return out


@dataclass
class BaselineFile:
    path: Path
    hardware: str
    model: str
    environment: dict[str, Any] = field(default_factory=dict)
    checks: dict[str, dict[str, Stored]] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA,
            "hardware": self.hardware,
            "model": self.model,
            "environment": self.environment,
            "checks": {key: {name: m.to_json() for name, m in sorted(figures.items())} for key, figures in sorted(self.checks.items())},
        }


@dataclass(frozen=True)
class Measured:
    """What this session measured of one figure: the value, and for timed figures its estimate and band."""

    value: float
    estimate: stats.Estimate | None = None
    band: str = "mixed"
    busy: float | None = None


@dataclass(frozen=True)
class Finding:
    """The verdict on one figure of one check."""

    check: str
    metric: str
    measured: float
    verdict: str  # "ok" | "regression" | "improvement" | "inconclusive" | "no baseline" | "other hardware" | "other host"
    baseline: float | None = None
    source: str = ""  # the baseline file it was compared with
    detail: str = ""  # the interval verdict, or the tolerance
    band: tuple[float, float] | None = None  # timed figures: where one more session of the baseline's stack would fall (95 %)

    @property
    def message(self) -> str:
        f = mx.FIGURES[self.metric]
        if self.baseline is None:
            return f"{self.metric}: measured {f.fmt(self.measured)}, {self.verdict}{' (' + self.source + ')' if self.source else ''}"
        return f"{self.metric}: measured {f.fmt(self.measured)}, baseline {f.fmt(self.baseline)}: {self.detail} from {self.source}"


def judge_fixed(check: str, name: str, measured: float, stored: Stored, source: str = "") -> Finding:
    """A deterministic figure against its value: worse by more than the tolerance is a regression."""
    f = mx.FIGURES[name]
    base = float(stored.value or 0.0)
    tolerance = f.tolerance if stored.tolerance is None else stored.tolerance
    delta = measured - base
    moved = abs(delta) if f.absolute or not base else abs(delta) / abs(base)
    beyond = moved > tolerance + 1e-12
    verdict = "ok" if not beyond else "regression" if delta * f.direction < 0 else "improvement"
    shown = f"{delta:+.4g}" if f.absolute or not base else f"{delta / base:+.1%}"
    allowed = f"{tolerance:g}" if f.absolute or not base else f"{tolerance:.0%}"
    better = "higher" if f.direction > 0 else "lower"
    return Finding(check, name, measured, verdict, base, source, f"{verdict} ({shown}; tolerance {allowed}, {better} is better)")


def judge_timed(check: str, name: str, now: Measured, stored: Stored, source: str = "") -> Finding:
    """A timed figure against the pooled sessions of its baseline (stats.judge)."""
    f = mx.FIGURES[name]
    band = f.band or _wider(now.band, stored.band)
    pooled = stats.pool([(math.log(s.value), s.se) for s in stored.sessions], band)
    estimate = now.estimate or stats.Estimate(math.log(now.value), math.inf, 1, 0)
    v = stats.judge(estimate, pooled, f.direction)
    sessions = f"{pooled.sessions} session{'s' if pooled.sessions != 1 else ''}" + (", provisional" if pooled.provisional else "")
    moved = f"; was {stored.band}-bound, now {now.band}-bound" if not f.band and stored.band != now.band else ""
    detail = f"{v.text} ({sessions}, between-session sd {pooled.sigma_between:.1%}, band {band}{moved})"
    spread = 1.96 * math.sqrt(pooled.se**2 + pooled.sigma_between**2)
    return Finding(check, name, now.value, v.kind, math.exp(pooled.log), source, detail, (math.exp(pooled.log - spread), math.exp(pooled.log + spread)))


def _wider(a: str, b: str) -> str:
    """Of two band classes, the one whose default between-session spread is wider."""
    return max((a, b), key=lambda c: stats.DEFAULT_SIGMA_BETWEEN.get(c, 0.10))


def compare(
    check: str,
    measured: Mapping[str, Measured],
    same_hardware: BaselineFile | None,
    other_hardware: BaselineFile | None = None,
    host: str = "",
) -> list[Finding]:
    """Every judged figure of ``measured`` against the same-hardware file; where it has none, figures portable
    to ``any`` machine against another machine's file. Timed figures portable only within a host class are
    judged only against sessions of ``host``."""
    out = []
    for name, now in measured.items():
        f = mx.figure(name)
        if f is None or not f.judged or not _number(now.value):
            continue
        own = same_hardware.checks.get(check, {}).get(name) if same_hardware else None
        if own is not None:
            source = str(same_hardware.path)  # type: ignore[union-attr]
            if own.sessions:
                sessions = [s for s in own.sessions if f.portable != "host" or not s.host or s.host == host]
                if not sessions:
                    out.append(Finding(check, name, now.value, "other host", None, f"baseline of host {own.sessions[-1].host} in {source}"))
                    continue
                out.append(judge_timed(check, name, now, Stored(band=own.band, sessions=sessions), source))
            elif own.value is not None:
                out.append(judge_fixed(check, name, now.value, own, source))
            continue
        other = other_hardware.checks.get(check, {}).get(name) if other_hardware else None
        if other is not None and f.portable == "any" and other.value is not None:
            out.append(judge_fixed(check, name, now.value, other, str(other_hardware.path)))  # type: ignore[union-attr]
        elif other is not None:
            out.append(Finding(check, name, now.value, "other hardware", None, str(other_hardware.path)))  # type: ignore[union-attr]
        else:
            out.append(Finding(check, name, now.value, "no baseline"))
    return out


def failure_text(check: str, findings: list[Finding]) -> str:
    """The failure message of a check: one line per regressed figure, then how to accept the new values."""
    order = list(mx.FIGURES)
    bad = sorted((f for f in findings if f.verdict == "regression"), key=lambda f: order.index(f.metric))
    lines = [f"{check}: {len(bad)} figure(s) left their baseline:"] + [f"  {f.message}" for f in bad]
    lines.append("  (if the change is intended, rerun with --llmopt-update-baselines and commit the file)")
    return "\n".join(lines)


def _number(value: Any) -> TypeGuard[float]:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def stack_of(environment: Mapping[str, Any]) -> dict[str, Any]:
    return {k: environment.get(k) for k in STACK_KEYS}


# --- files ----------------------------------------------------------------------------------------------------


def load(path: Path) -> BaselineFile:
    """Read and validate a baseline file; any problem is one BaselineError naming the file."""
    try:
        doc = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise BaselineError(f"{path}: cannot read it ({exc})") from None
    except json.JSONDecodeError as exc:
        raise BaselineError(f"{path}: not JSON ({exc})") from None
    if not isinstance(doc, dict):
        raise BaselineError(f"{path}: expected a JSON object with schema, hardware, model, checks")
    if doc.get("schema") != SCHEMA:
        old = " (schema 1 kept one session's values with fixed tolerances: rewrite it with --llmopt-update-baselines)" if doc.get("schema") == 1 else ""
        raise BaselineError(f"{path}: schema {doc.get('schema')!r} is not the supported {SCHEMA}{old}")
    for key in ("hardware", "model"):
        if not isinstance(doc.get(key), str):
            raise BaselineError(f"{path}: {key!r} must be a string")
    checks = doc.get("checks")
    if not isinstance(checks, dict):
        raise BaselineError(f"{path}: 'checks' must be an object of check -> figure -> {{value, tolerance}} or {{band, sessions}}")
    parsed: dict[str, dict[str, Stored]] = {}
    for check, figures in checks.items():
        if not isinstance(figures, dict):
            raise BaselineError(f"{path}: check {check!r} must be an object of figures")
        parsed[check] = {name: _stored(path, check, name, raw) for name, raw in figures.items()}
    env = doc.get("environment", {})
    return BaselineFile(Path(path), doc["hardware"], doc["model"], env if isinstance(env, dict) else {}, parsed)


def _stored(path: Path, check: str, name: str, raw: Any) -> Stored:
    where = f"{path}: {check} / {name}"
    f = mx.figure(name)
    if f is None or not f.judged:
        raise BaselineError(f"{where}: not a judged figure (judged: {', '.join(n for n, x in mx.FIGURES.items() if x.judged)})")
    if not isinstance(raw, dict):
        raise BaselineError(f"{where}: expected an object")
    if f.kind == "timed":
        band, sessions = raw.get("band"), raw.get("sessions")
        if band not in stats.BAND_CLASSES:
            raise BaselineError(f"{where}: 'band' must be one of {stats.BAND_CLASSES}, not {band!r}")
        if not isinstance(sessions, list) or not sessions:
            raise BaselineError(f"{where}: 'sessions' must be a non-empty list of {{value, se, n}}")
        return Stored(band=band, sessions=[_session(where, i, s) for i, s in enumerate(sessions)])
    value, tolerance = raw.get("value"), raw.get("tolerance")
    if not _number(value):
        raise BaselineError(f"{where}: 'value' must be a finite number, not {value!r}")
    if tolerance is not None and (not _number(tolerance) or float(tolerance) < 0):
        raise BaselineError(f"{where}: 'tolerance' must be a number >= 0, not {tolerance!r}")
    return Stored(float(value), None if tolerance is None else float(tolerance))


def _session(where: str, i: int, raw: Any) -> Session:
    if not isinstance(raw, dict):
        raise BaselineError(f"{where}: session {i} must be an object")
    value, se, n = raw.get("value"), raw.get("se"), raw.get("n")
    if not _number(value) or float(value) <= 0:
        raise BaselineError(f"{where}: session {i}: 'value' must be a positive number, not {value!r}")
    if not _number(se) or float(se) < 0:
        raise BaselineError(f"{where}: session {i}: 'se' must be a number >= 0, not {se!r}")
    if not isinstance(n, int) or n < 1:
        raise BaselineError(f"{where}: session {i}: 'n' must be a positive integer, not {n!r}")
    busy = raw.get("busy")
    busy_value = float(busy) if _number(busy) else None
    return Session(float(value), float(se), n, busy_value, str(raw.get("host", "")), str(raw.get("when", "")))


def merged(
    existing: BaselineFile | None, path: Path, hardware: str, model: str, environment: dict[str, Any], check: str, measured: Mapping[str, Measured], host: str = ""
) -> tuple[BaselineFile, bool]:
    """``existing`` with this session's figures of ``check`` written in: timed figures append a session, fixed
    ones replace their value (keeping a tuned tolerance). Returns the file and whether the stack changed (the
    timed figures of every check then start afresh: sessions of two stacks are never pooled)."""
    doc = existing or BaselineFile(path, hardware, model)
    restarted = existing is not None and stack_of(existing.environment) != stack_of(environment)
    if restarted:
        for figures in doc.checks.values():
            for name in [n for n, s in figures.items() if s.sessions]:
                del figures[name]
    doc.environment = dict(environment)
    figures = dict(doc.checks.get(check, {}))
    when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    for name, now in measured.items():
        f = mx.figure(name)
        if f is None or not f.judged or not _number(now.value):
            continue
        old = figures.get(name)
        if f.kind == "timed":
            if now.estimate is None or not math.isfinite(now.estimate.se):
                continue  # no interval, nothing to pool
            session = Session(now.value, now.estimate.se, now.estimate.n, now.busy, host if f.portable == "host" else "", when)
            figures[name] = Stored(band=f.band or now.band, sessions=[*(old.sessions if old else []), session])
        else:
            figures[name] = Stored(float(f"{now.value:.6g}"), old.tolerance if old is not None else None)
    doc.checks[check] = figures
    return doc, restarted


def write_atomic(path: Path, text: str | bytes) -> None:
    """Write through a temporary file in the same folder and rename it over the target: a reader (or a
    crash) never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(text.encode("utf-8") if isinstance(text, str) else text)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


class Store:
    """The baselines of one directory, read once each; updates go straight to disk."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self._cache: dict[Path, BaselineFile | None] = {}
        self.restarted: set[Path] = set()

    def path(self, hardware: str, model: str) -> Path:
        return self.root / hardware / f"{_safe(model)}.json"

    def get(self, hardware: str, model: str) -> BaselineFile | None:
        path = self.path(hardware, model)
        if path not in self._cache:
            self._cache[path] = load(path) if path.is_file() else None
        return self._cache[path]

    def other_hardware(self, hardware: str, model: str, device_type: str) -> BaselineFile | None:
        """A baseline of the model on another machine of the same device type (cpu or cuda), for the figures
        the registry lets travel."""
        if not self.root.is_dir():
            return None
        for folder in sorted(p for p in self.root.iterdir() if p.is_dir() and p.name != hardware):
            if (folder.name.startswith("cpu-")) != (device_type == "cpu"):
                continue
            found = self.get(folder.name, model)
            if found is not None:
                return found
        return None

    def validate(self, hardware: str, models: list[str]) -> None:
        """Read every file this session may use now, so a malformed one is one error before any test runs."""
        for model in models:
            self.get(hardware, model)
            if self.root.is_dir():
                for folder in self.root.iterdir():
                    if folder.is_dir():
                        self.get(folder.name, model)

    def update(self, hardware: str, model: str, environment: dict[str, Any], check: str, measured: Mapping[str, Measured], host: str = "") -> Path:
        path = self.path(hardware, model)
        with file_lock(path, "baseline"):
            existing = load(path) if path.is_file() else None
            doc, restarted = merged(existing, path, hardware, model, environment, check, measured, host)
            write_atomic(path, json.dumps(doc.to_json(), indent=1) + "\n")
        if restarted:
            self.restarted.add(path)
        self._cache[path] = doc
        return path


def _safe(model: str) -> str:
    """A file name for a model name (hub ids have a slash: ``org/name`` -> ``org--name``)."""
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in model.strip("/").replace("/", "--"))
