"""Stored baselines: versioned files of measured figures, compared with per-metric tolerances.

Layout: ``<baselines dir>/<hardware slug>/<model>.json`` (the slug is machine.Machine.hardware_id, e.g.
``h100-80gb-hbm3`` or ``cpu-x86_64``)::

    {"schema": 1, "hardware": "h100-80gb-hbm3", "model": "llama-1b-shape",
     "environment": {"gpu": ..., "driver": ..., "cuda": ..., "torch": ..., "transformers": ..., ...},
     "checks": {"performance::test_generate_speed[static+compile/sdpa/bf16]": {
         "speedup": {"value": 4.1, "tolerance": 0.1, "direction": "higher", "kind": "ratio"}, ...}}}

Rules (pure functions below, unit-tested in tests/test_baselines.py):
- ``tolerance`` is relative: a figure may move the wrong way by that fraction of the baseline value
  (by that amount in absolute terms when the baseline is 0). Moving the right way never fails.
- ``kind: ratio`` figures (speedup over the reference measured in the same session, acceptance rate) do
  not depend much on the card: they are compared against a baseline of another machine of the same
  device type when this machine has none. ``kind: absolute`` figures (ms, tokens/s, bytes) are compared
  only against a baseline of the same hardware.
- Updating writes only the figures measured in this run (others in the file stay as they are), keeps
  a tolerance already in the file (it may have been tuned by hand), and replaces the file atomically.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SCHEMA = 1
DIRECTIONS = ("higher", "lower")
KINDS = ("ratio", "absolute")


@dataclass(frozen=True)
class Policy:
    direction: str
    kind: str
    tolerance: float


# The figures kept in baselines, and how they are judged. Tolerances: decode and end-to-end timings on an
# H100 repeat within ~2 % run to run; 10 % leaves room for another card of the same model and driver noise
# while still catching a lost CUDA graph (~2x) or a fallback kernel. Time to first token is a single
# short prefill, noisier: 15 %. Memory is deterministic up to allocator rounding: 2 %; cache sizes exactly.
POLICIES: Mapping[str, Policy] = {
    "speedup": Policy("higher", "ratio", 0.10),
    "decode_speedup": Policy("higher", "ratio", 0.10),
    "acceptance_rate": Policy("higher", "ratio", 0.05),
    "tokens_per_s": Policy("higher", "absolute", 0.10),
    "decode_ms": Policy("lower", "absolute", 0.10),
    "ttft_ms": Policy("lower", "absolute", 0.15),
    "roofline_pct": Policy("higher", "absolute", 0.10),
    "peak_memory_bytes": Policy("lower", "absolute", 0.02),
    "prefill_peak_bytes": Policy("lower", "absolute", 0.05),
    "footprint_bytes": Policy("lower", "absolute", 0.01),
    "static_cache_bytes": Policy("lower", "absolute", 0.0),
    "kv_cache_bytes": Policy("lower", "absolute", 0.0),
}
# Figures other suites record (memory, static cache, quantization) that are kept in the same files.
MEMORY_METRICS = ("peak_memory_bytes", "prefill_peak_bytes", "footprint_bytes", "static_cache_bytes", "kv_cache_bytes")


class BaselineError(ValueError):
    """A baseline file that cannot be used; the message starts with the file's path."""


@dataclass(frozen=True)
class Metric:
    value: float
    tolerance: float
    direction: str
    kind: str

    def to_json(self) -> dict[str, Any]:
        return {"value": self.value, "tolerance": self.tolerance, "direction": self.direction, "kind": self.kind}


@dataclass
class BaselineFile:
    path: Path
    hardware: str
    model: str
    environment: dict[str, Any] = field(default_factory=dict)
    checks: dict[str, dict[str, Metric]] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA,
            "hardware": self.hardware,
            "model": self.model,
            "environment": self.environment,
            "checks": {key: {name: m.to_json() for name, m in sorted(metrics.items())} for key, metrics in sorted(self.checks.items())},
        }


@dataclass(frozen=True)
class Finding:
    """The verdict on one figure of one check."""

    check: str
    metric: str
    measured: float
    baseline: Metric | None
    verdict: str  # "ok" | "regression" | "improvement" | "no baseline" | "other hardware"
    source: str = ""  # the baseline file it was compared with

    @property
    def change(self) -> float | None:
        if self.baseline is None:
            return None
        base = self.baseline.value
        return (self.measured - base) / abs(base) if base else self.measured - base

    @property
    def message(self) -> str:
        if self.baseline is None:
            return f"{self.metric}: measured {_fmt(self.measured)}, no baseline"
        b = self.baseline
        change = self.change
        moved = f"{change:+.1%}" if b.value else f"{change:+.4g}"
        return (
            f"{self.metric}: measured {_fmt(self.measured)}, baseline {_fmt(b.value)} ({moved}; "
            f"tolerance {b.tolerance:.0%} {b.kind}, {b.direction} is better) from {self.source}"
        )


def _fmt(value: float) -> str:
    if abs(value) >= 1e6:
        return f"{value:.4g}"
    return f"{value:.4g}" if value != int(value) else str(int(value))


def judge(check: str, metric: str, measured: float, baseline: Metric, source: str = "") -> Finding:
    """Compare one figure with its baseline: worse by more than the tolerance is a regression."""
    sign = 1.0 if baseline.direction == "higher" else -1.0
    base = baseline.value
    moved = (measured - base) / abs(base) if base else measured - base
    if moved * sign < 0 and abs(moved) > baseline.tolerance + 1e-12:
        verdict = "regression"
    elif moved * sign > 0 and abs(moved) > baseline.tolerance + 1e-12:
        verdict = "improvement"
    else:
        verdict = "ok"
    return Finding(check, metric, measured, baseline, verdict, source)


def compare(
    check: str,
    measured: Mapping[str, Any],
    same_hardware: BaselineFile | None,
    other_hardware: BaselineFile | None = None,
) -> list[Finding]:
    """Every baselined figure of ``measured`` judged against the same-hardware file, or, for ratio
    figures only, against a file of other hardware. Figures without a baseline are "no baseline"."""
    out = []
    for name, value in measured.items():
        if name not in POLICIES or not _number(value):
            continue
        own = same_hardware.checks.get(check, {}).get(name) if same_hardware else None
        if own is not None:
            out.append(judge(check, name, float(value), own, str(same_hardware.path)))  # type: ignore[union-attr]
            continue
        other = other_hardware.checks.get(check, {}).get(name) if other_hardware else None
        if other is not None and other.kind == "ratio":
            out.append(judge(check, name, float(value), other, str(other_hardware.path)))  # type: ignore[union-attr]
        elif other is not None:
            out.append(Finding(check, name, float(value), None, "other hardware", str(other_hardware.path)))  # type: ignore[union-attr]
        else:
            out.append(Finding(check, name, float(value), None, "no baseline"))
    return out


def failure_text(check: str, findings: list[Finding]) -> str:
    """The failure message of a check: one line per regressed figure, then how to accept the new values."""
    order = list(POLICIES)
    bad = sorted((f for f in findings if f.verdict == "regression"), key=lambda f: order.index(f.metric))
    lines = [f"{check}: {len(bad)} figure(s) left their baseline:"] + [f"  {f.message}" for f in bad]
    lines.append("  (if the change is intended, rerun with --llmopt-update-baselines and commit the file)")
    return "\n".join(lines)


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


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
        raise BaselineError(f"{path}: schema {doc.get('schema')!r} is not the supported {SCHEMA}")
    for key in ("hardware", "model"):
        if not isinstance(doc.get(key), str):
            raise BaselineError(f"{path}: {key!r} must be a string")
    checks = doc.get("checks")
    if not isinstance(checks, dict):
        raise BaselineError(f"{path}: 'checks' must be an object of check -> metric -> {{value, tolerance, direction, kind}}")
    parsed: dict[str, dict[str, Metric]] = {}
    for check, metrics in checks.items():
        if not isinstance(metrics, dict):
            raise BaselineError(f"{path}: check {check!r} must be an object of metrics")
        parsed[check] = {name: _metric(path, check, name, raw) for name, raw in metrics.items()}
    env = doc.get("environment", {})
    return BaselineFile(Path(path), doc["hardware"], doc["model"], env if isinstance(env, dict) else {}, parsed)


def _metric(path: Path, check: str, name: str, raw: Any) -> Metric:
    where = f"{path}: {check} / {name}"
    if not isinstance(raw, dict):
        raise BaselineError(f"{where}: expected {{value, tolerance, direction, kind}}")
    value, tolerance = raw.get("value"), raw.get("tolerance")
    if not _number(value):
        raise BaselineError(f"{where}: 'value' must be a finite number, not {value!r}")
    if not _number(tolerance) or float(tolerance) < 0:  # type: ignore[arg-type]
        raise BaselineError(f"{where}: 'tolerance' must be a number >= 0, not {tolerance!r}")
    if raw.get("direction") not in DIRECTIONS:
        raise BaselineError(f"{where}: 'direction' must be one of {DIRECTIONS}, not {raw.get('direction')!r}")
    if raw.get("kind") not in KINDS:
        raise BaselineError(f"{where}: 'kind' must be one of {KINDS}, not {raw.get('kind')!r}")
    return Metric(float(value), float(tolerance), raw["direction"], raw["kind"])  # type: ignore[arg-type]


def merged(existing: BaselineFile | None, path: Path, hardware: str, model: str, environment: dict[str, Any], check: str, measured: Mapping[str, Any]) -> BaselineFile:
    """``existing`` with this check's measured figures written in (and nothing else changed)."""
    doc = existing or BaselineFile(path, hardware, model)
    doc.environment = dict(environment)
    metrics = dict(doc.checks.get(check, {}))
    for name, value in measured.items():
        policy = POLICIES.get(name)
        if policy is None or not _number(value):
            continue
        old = metrics.get(name)
        tolerance = old.tolerance if old is not None else policy.tolerance
        metrics[name] = Metric(float(f"{float(value):.6g}"), tolerance, policy.direction, policy.kind)
    doc.checks[check] = metrics
    return doc


def write_atomic(path: Path, text: str) -> None:
    """Write through a temporary file in the same folder and rename it over the target: a reader (or a
    crash) never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Serialize read-merge-write of one file between processes (pytest-xdist workers), where fcntl exists."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows: one process updates at a time
        yield
        return
    import hashlib

    # The lock lives in the temporary folder, not beside the baselines (nothing to ignore in a repository).
    digest = hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:16]
    with open(Path(tempfile.gettempdir()) / f"llmopt-baseline-{digest}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


class Store:
    """The baselines of one directory, read once each; updates go straight to disk."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self._cache: dict[Path, BaselineFile | None] = {}

    def path(self, hardware: str, model: str) -> Path:
        return self.root / hardware / f"{_safe(model)}.json"

    def get(self, hardware: str, model: str) -> BaselineFile | None:
        path = self.path(hardware, model)
        if path not in self._cache:
            self._cache[path] = load(path) if path.is_file() else None
        return self._cache[path]

    def other_hardware(self, hardware: str, model: str, device_type: str) -> BaselineFile | None:
        """A baseline of the model on another machine of the same device type (cpu or cuda), for ratios."""
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

    def update(self, hardware: str, model: str, environment: dict[str, Any], check: str, measured: Mapping[str, Any]) -> Path:
        path = self.path(hardware, model)
        with _locked(path):
            existing = load(path) if path.is_file() else None
            doc = merged(existing, path, hardware, model, environment, check, measured)
            write_atomic(path, json.dumps(doc.to_json(), indent=1) + "\n")
        self._cache[path] = doc
        return path


def _safe(model: str) -> str:
    """A file name for a model name (hub ids have a slash: ``org/name`` -> ``org--name``)."""
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in model.strip("/").replace("/", "--"))
