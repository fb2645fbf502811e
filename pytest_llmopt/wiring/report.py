"""Results of a session: one structured record per (model, variant, check), with what it measured.

Each suite test carries a ``llmopt`` user property: its model, variant and check are set at collection
(so a test skipped before it runs still says what it was), and figures are merged in while it runs
(``record``). pytest-xdist ships user properties with every report, so the controller builds the
results of the whole run from the reports alone. The status (outcomes.Status) is read from the report:
passed, failed (also errors), known-issue (xfail), known-issue-passed (xpass); a skip is what the test
said with the outcomes helpers (unsupported, not run, inconclusive: a user property of the report) or,
skipped at collection, what the plugin decided then (the ``skipped_as`` label); any other skip is
"not run". No reason text is parsed.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import re
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..common.outcomes import PROPERTY as STATUS_PROPERTY
from ..common.outcomes import Status, status_from

if TYPE_CHECKING:  # `llmopt compare` runs without pytest installed (the tox gate env)
    import pytest

PROPERTY = "llmopt"
SCHEMA = 1
STATUSES = tuple(Status)  # the order of the summary


def record(node: pytest.Item, **metrics: Any) -> None:
    """Merge ``metrics`` into the item's llmopt property (one dict per test)."""
    for name, value in node.user_properties:
        if name == PROPERTY and isinstance(value, dict):
            value.setdefault("metrics", {}).update(metrics)
            return
    node.user_properties.append((PROPERTY, {"metrics": dict(metrics)}))


def record_phases(node: pytest.Item, phases: dict[str, float]) -> None:
    """Where the test's time went (phases.py): kept beside its figures, like its duration, not among them."""
    for name, value in node.user_properties:
        if name == PROPERTY and isinstance(value, dict):
            value["phases"] = dict(phases)
            return


def describe_item(
    node: pytest.Item, model: str, variant: str, extra: str | None, skipped_as: Status | None = None, known_issues: tuple[str, ...] = ()
) -> None:
    """Label a collected suite test with what it checks (before it runs, so skips are labelled too), the status of a
    skip decided at collection, and the ids of the known issues declared for it that apply here."""
    suite = Path(str(node.fspath)).stem.removeprefix("test_")
    check = getattr(node, "originalname", node.name)
    label = {"suite": suite, "check": check, "model": model, "variant": variant, "extra": extra, "skipped_as": skipped_as.value if skipped_as else None}
    if known_issues:
        label["known_issues"] = list(known_issues)
    for name, value in node.user_properties:
        if name == PROPERTY and isinstance(value, dict):
            value.update(label)
            return
    node.user_properties.append((PROPERTY, {**label, "metrics": {}}))


@dataclass
class Result:
    suite: str
    check: str
    model: str
    variant: str
    status: Status
    extra: str | None = None
    reason: str | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    nodeid: str = ""
    seconds: float = 0.0
    known_issues: list[str] = field(default_factory=list)  # ids of the declared issues that applied
    phases: dict[str, float] = field(default_factory=dict)  # wall seconds per phase (phases.py), like ``seconds``

    def __post_init__(self) -> None:
        self.status = Status(self.status)  # also from the plain strings of a JSON report

    @property
    def key(self) -> str:
        """Stable identity across runs and machines (the nodeid without its file path)."""
        return f"{self.suite}::{self.check}[{self.variant}@{self.model}{'-' + self.extra if self.extra else ''}]"


def status_of(report: pytest.TestReport, skipped_as: Status | None = None) -> tuple[Status, str | None]:
    """Outcome and one-line reason of a report (the phase that decided it); ``skipped_as``: the status of
    a skip decided at collection."""
    if hasattr(report, "wasxfail"):
        if report.skipped:
            return Status.KNOWN_ISSUE, str(report.wasxfail) or None
        return Status.KNOWN_ISSUE_PASSED, str(report.wasxfail) or None
    if report.skipped:
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        reason = reason.removeprefix("Skipped: ")
        said = next((status_from(value) for name, value in report.user_properties if name == STATUS_PROPERTY), None)
        return said or skipped_as or Status.NOT_RUN, reason
    if report.failed:
        text = getattr(report, "longreprtext", "") or str(report.longrepr)
        # xdist prefixes the worker ("[gw1] linux -- Python 3.11 ...") to a failure's text
        lines = [line for line in text.splitlines() if line.strip() and not re.match(r"^\[gw\d+\] ", line)]
        first = next((line for line in lines if line.startswith("E ")), lines[0] if lines else "")
        return Status.FAILED, first.removeprefix("E").strip()[:500]
    return Status.PASSED, None


class Collector:
    """Builds Results from the reports the controller sees (its own, or those xdist workers send)."""

    def __init__(self) -> None:
        self.results: dict[str, Result] = {}

    def add(self, report: pytest.TestReport) -> None:
        props = next((value for name, value in report.user_properties if name == PROPERTY and isinstance(value, dict)), None)
        if props is None or "suite" not in props:
            return
        decided = report.when == "call" or (report.when == "setup" and not report.passed) or (report.when == "teardown" and report.failed)
        if not decided:
            return
        status, reason = status_of(report, status_from(props.get("skipped_as")))
        existing = self.results.get(report.nodeid)
        if existing is not None and existing.status == Status.FAILED:
            return  # a teardown never turns a failure into something else
        self.results[report.nodeid] = Result(
            suite=props["suite"],
            check=props["check"],
            model=props["model"],
            variant=props["variant"],
            extra=props.get("extra"),
            status=status,
            reason=reason,
            metrics=_plain(props.get("metrics", {})),
            nodeid=report.nodeid,
            seconds=round(report.duration, 3) if report.when == "call" else 0.0,
            known_issues=list(props.get("known_issues", [])),
            phases=dict(props.get("phases") or {}) if report.when == "call" else {},
        )

    def sorted(self) -> list[Result]:
        return sorted(self.results.values(), key=lambda r: (r.model, r.suite, r.check, r.variant, r.extra or ""))


def _plain(metrics: dict[str, Any]) -> dict[str, Any]:
    """JSON-safe figures: floats rounded to 6 significant digits (runs differ below that); nested figures (a
    figure's interval, its verdict) kept as objects and lists."""
    return {str(key): _plain_value(value) for key, value in metrics.items()}


def _plain_value(value: Any) -> Any:
    if isinstance(value, float):
        return float(f"{value:.6g}") if value == value and abs(value) != float("inf") else str(value)
    if isinstance(value, (int, str, bool)) or value is None:
        return value
    if isinstance(value, dict):
        return _plain(value)
    if isinstance(value, (list, tuple)):
        return [_plain_value(v) for v in value]
    return str(value)


def environment(session: Any) -> dict[str, Any]:
    """What a reader needs to trust the numbers: hardware, versions, options."""
    from .. import __version__

    machine = session.machine
    s = session.settings
    return {
        "pytest_llmopt": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "host": platform.node(),
        "platform": platform.platform(),
        "device": machine.device,
        "gpu": machine.gpu_name,
        "hardware": machine.hardware_id,
        "dtype": machine.dtype,
        "versions": dict(machine.versions),
        "models": [spec.name for spec in session.models],
        "model_keys": {spec.name: spec.baseline_name for spec in session.models},  # a folder's name with its config's digest
        "assistant": session.assistant.name if session.assistant else None,
        "variants": str(s.variants),
        "seed": s.seed,
        "new_tokens": s.new_tokens,
        "workers": int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0") or 0) or 1,
    }


def to_document(results: list[Result], env: dict[str, Any]) -> dict[str, Any]:
    return {"schema": SCHEMA, "environment": env, "summary": summary(results), "results": [asdict(r) for r in results]}


def summary(results: list[Result]) -> dict[str, int]:
    counts = {status.value: 0 for status in STATUSES}
    for r in results:
        counts[r.status.value] += 1
    return counts


class ReportError(ValueError):
    """A report file that cannot be read; the message names the file and what is wrong."""


def load(path: Path) -> tuple[list[Result], dict[str, Any]]:
    """Read a JSON report written by --llmopt-report (raises ReportError with one clear message)."""
    try:
        doc = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ReportError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ReportError(f"{path}: cannot read it ({exc})") from None
    except json.JSONDecodeError as exc:
        raise ReportError(f"{path}: not JSON ({exc})") from None
    if not isinstance(doc, dict) or doc.get("schema") != SCHEMA or not isinstance(doc.get("results"), list):
        raise ReportError(f"{path}: not a pytest-llmopt JSON report (schema {SCHEMA}); write one with --llmopt-report=FILE.json")
    fields = set(Result.__dataclass_fields__)
    results = []
    for number, item in enumerate(doc["results"], 1):
        if not isinstance(item, dict) or not {"suite", "check", "model", "variant", "status"} <= set(item):
            raise ReportError(f"{path}: result {number} lacks suite/check/model/variant/status")
        status = status_from(item["status"])
        if status is None:
            raise ReportError(f"{path}: result {number} has an unknown status {item['status']!r} (known: {', '.join(s.value for s in Status)})")
        results.append(Result(**{**{k: v for k, v in item.items() if k in fields}, "status": status}))
    return results, doc.get("environment", {})


@contextlib.contextmanager
def track_peak(node: Any) -> Iterator[None]:
    """Record the CUDA peak memory of a test as ``peak_memory_bytes`` (nothing on CPU)."""
    import torch

    if not torch.cuda.is_available():
        yield
        return
    torch.cuda.reset_peak_memory_stats()
    try:
        yield
    finally:
        record(node, peak_memory_bytes=int(torch.cuda.max_memory_allocated()))
