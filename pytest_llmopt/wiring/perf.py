"""The performance suite's machinery: one interleaved campaign per model and weights (campaign.py), the figures
each speed check reads from it, their verdicts against stored baselines (baselines.py, stats.py), and the
device's timing lock. Registered by plugin.py as one more plugin object.

What a speed check does (suites/test_performance.py):
1. At collection every speed check of a model is planned into its campaign (one per model and quantization;
   the reference is the plain path on the unquantized weights).
2. The first speed check of a campaign runs it, holding the device's lock exclusive (no other llmopt test of
   any worker runs on the device meanwhile), and shares the figures with the other pytest-xdist workers
   (speedrun.py); every check of the campaign then reads its own figures:
   paired speedups over the reference with their intervals, on CUDA the GPU's own work per token and how busy
   the GPU was, the acceptance rate of draft paths, compile time, peak memory.
3. Fails at once on a compiled path that did not run compiled (auto-compile silently off, CUDA graphs skipped
   or never recorded) or compiled again while being timed.
4. Against a stored baseline of this card and stack each gated figure is regression / ok / improvement /
   inconclusive by stats.judge; a regression fails. A check none of whose gated figures could decide, or of a
   campaign too noisy to use, is "inconclusive", with the smallest slowdown it could have detected.
   --llmopt-update-baselines appends this session to the baseline instead.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from ..common import metrics as mx
from ..running.speedplan import PROMPT_TOKENS, Group, Planned, check_key, group_key, workload
from ..verdicts import baselines as bl

ESTIMATOR = 2  # how figures are estimated; baselines of another estimator are not comparable


@dataclass(frozen=True)
class Setup:
    """How much is timed. Fixed per device type (baselines are only comparable with the same setup)."""

    new_tokens: int
    budget_s: float
    min_rounds: int
    max_rounds: int


SETUPS = {"cuda": Setup(32, 100.0, 6, 40), "cpu": Setup(16, 20.0, 6, 16)}


class PerfPlugin:
    """Session state of the speed checks: the baseline store, the planned campaigns, the device lock."""

    def __init__(self, config: pytest.Config, settings: Any, session: Any) -> None:
        self.config = config
        self._session = session  # builds the llmopt session on first need (plugin.session_of)
        self.settings = settings
        self.root = settings.baselines or Path(config.rootpath) / "baselines"
        self.store = bl.Store(self.root)
        self.update = settings.update_baselines
        self.groups: dict[tuple[str, str, str], Group] = {}
        self.missing: dict[Path, list[str]] = {}
        self.written: set[Path] = set()
        self.compared = 0
        self.campaign_lines: list[str] = []
        self.calibration: Any = None
        self._lock: Any = None

    @property
    def llmopt(self) -> Any:
        return self._session()

    @property
    def machine(self) -> Any:
        return self.llmopt.machine

    @property
    def setup(self) -> Setup:
        base = SETUPS["cuda" if self.machine.device_type == "cuda" else "cpu"]
        budget = self.settings.speed_budget
        return base if budget is None else Setup(base.new_tokens, budget, base.min_rounds, base.max_rounds)

    @property
    def lock(self) -> Any:
        if self._lock is None:
            from ..common.gpulock import DeviceLock, device_key

            self._lock = DeviceLock(device_key(self.machine.device))
        return self._lock

    def environment(self) -> dict[str, Any]:
        m = self.machine
        v = m.versions
        s = self.setup
        return {
            "gpu": m.gpu_name,
            "driver": _driver_version() if m.device_type == "cuda" else None,
            "cuda": v.get("cuda"),
            "torch": v.get("torch"),
            "transformers": v.get("transformers"),
            "bitsandbytes": v.get("bitsandbytes"),
            "flash-attn": v.get("flash-attn"),
            "python": v.get("python"),
            "dtype": m.dtype,
            "setup": {"prompt_tokens": PROMPT_TOKENS, "new_tokens": s.new_tokens, "batch": 1, "estimator": ESTIMATOR},
            "updated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }

    def judge(self, model: str, check: str, measured: dict[str, bl.Measured]) -> tuple[list[bl.Finding], dict[str, Any]]:
        """Compare ``measured`` with the stored baseline (or append it, with --llmopt-update-baselines).
        Returns the findings (none when writing) and what to record about the baseline used."""
        from ..running.noise import host_class

        if not any((f := mx.figure(name)) is not None and f.judged for name in measured):
            return [], {}  # nothing this check measures is judged here (the reference's own check on CPU)
        model = self.baseline_name(model)
        hardware = self.machine.hardware_id
        same = self.store.get(hardware, model)
        other = None if same is not None else self.store.other_hardware(hardware, model, self.machine.device_type)
        findings = bl.compare(check, measured, same, other, host_class())
        compared = [f for f in findings if f.baseline is not None]
        note: dict[str, Any] = {}
        if compared:
            self.compared += 1
            note = {"baseline": compared[0].source, "baseline_regressions": sum(f.verdict == "regression" for f in findings)}
        if self.update:
            self.written.add(self.store.update(hardware, model, self.environment(), check, measured, host_class()))
            return [], note  # written on purpose: this session joins the baseline
        if not compared:
            self.missing.setdefault(self.store.path(hardware, model), []).append(check)
            note["baseline"] = "missing"
        return findings, note

    def baseline_name(self, model: str) -> str:
        """The baseline key of the session's model named ``model`` (models.ModelSpec.baseline_name)."""
        spec = next((s for s in self.llmopt.models if s.name == model), None)
        return spec.baseline_name if spec is not None else model

    def baseline_path(self, model: str) -> Path:
        return self.store.path(self.machine.hardware_id, self.baseline_name(model))

    def stored_setup(self, model: str) -> dict[str, Any] | None:
        same = self.store.get(self.machine.hardware_id, self.baseline_name(model))
        return (same.environment.get("setup") if same else None) or None

    @pytest.hookimpl
    def pytest_collection_finish(self, session: pytest.Session) -> None:
        """A malformed baseline file is one usage error naming it, before any test runs; the campaigns are planned."""
        items = [i for i in session.items if "llmopt_case" in getattr(i, "fixturenames", ())]
        if not items:
            return
        try:
            self.store.validate(self.machine.hardware_id, [spec.baseline_name for spec in self.llmopt.models])
        except bl.BaselineError as exc:
            raise pytest.UsageError(f"pytest-llmopt: malformed baseline file {exc}") from None
        for item in items:
            param = _param(item)
            if param is not None and "llmopt_speed" in getattr(item, "fixturenames", ()) and param.skipped_as is None:
                self.plan(item, param)

    def plan(self, item: pytest.Item, param: Any) -> Planned:
        marker = item.get_closest_marker("llmopt_speed")
        extra = dict(marker.kwargs) if marker else {}
        name, quant = param.spec.name, param.variant.quant
        group = self.groups.setdefault(group_key(name, quant, extra), Group(name, quant, workload(extra)))
        key = check_key(item, param.variant.id)
        planned = Planned(key, param, extra)
        group.planned.setdefault(key, planned)
        return group.planned[key]

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_makereport(self, item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
        """Memory figures of the other suites (peak memory, footprints, cache sizes) are kept in the same
        baseline files and judged the same way: a passed check whose figure left its baseline fails."""
        report = yield
        if call.when != "call" or not report.passed or "llmopt_speed" in getattr(item, "fixturenames", ()):
            return report
        from .report import PROPERTY

        props = next((v for k, v in item.user_properties if k == PROPERTY and isinstance(v, dict)), None)
        figures = {k: bl.Measured(float(v)) for k, v in (props or {}).get("metrics", {}).items() if k in bl.MEMORY_METRICS and bl._number(v)}
        if not figures or "suite" not in props:  # type: ignore[operator]
            return report
        assert props is not None
        extra = f"-{props['extra']}" if props.get("extra") else ""
        check = f"{props['suite']}::{props['check']}[{props['variant']}{extra}]"
        findings, _ = self.judge(props["model"], check, figures)
        if any(f.verdict == "regression" for f in findings):
            report.outcome = "failed"
            report.longrepr = bl.failure_text(f"{props['variant']}@{props['model']}", findings)
        return report

    @pytest.hookimpl
    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        if self.calibration is not None or self.campaign_lines:
            terminalreporter.section("llmopt: speed campaigns")
            if self.calibration is not None:
                terminalreporter.write_line(f"calibration: {self.calibration.line()}")
            for line in self.campaign_lines:
                terminalreporter.write_line(line)
        if not (self.missing or self.written or self.compared):
            return
        terminalreporter.section("llmopt: baselines")
        terminalreporter.write_line(f"directory {self.root}; {self.compared} check(s) compared")
        for path in sorted(self.written):
            restarted = " (the stack changed: its timed figures started afresh)" if path in self.store.restarted else ""
            terminalreporter.write_line(f"written: {path}{restarted}")
        for path, checks in sorted(self.missing.items()):
            terminalreporter.write_line(
                f"no baseline for {len(checks)} check(s) in {path} (hardware {self.machine.hardware_id}): "
                "rerun with --llmopt-update-baselines to write it"
            )

    @pytest.fixture
    def llmopt_speed(self, request: pytest.FixtureRequest) -> Any:
        """Times a case in its model's campaign and judges its figures (see this module's docstring)."""
        from .speedcheck import SpeedCheck

        return SpeedCheck(self, request)

    def shared(self, item: pytest.Item) -> Any:
        """The device lock, shared, around every llmopt test (a campaign takes it exclusive, and so does a test marked
        llmopt_whole_device: one that sizes what it allocates to the device's free memory)."""
        names = getattr(item, "fixturenames", ())
        if "llmopt_case" not in names or "llmopt_speed" in names:
            return contextlib.nullcontext()
        if item.get_closest_marker("llmopt_whole_device") is not None:
            return self.lock.exclusive()
        return self.lock.shared()


def _param(item: pytest.Item) -> Any:
    from .cases import CaseParam

    callspec = getattr(item, "callspec", None)
    param = callspec.params.get("llmopt_case") if callspec else None
    return param if isinstance(param, CaseParam) else None


def _driver_version() -> str | None:
    """The NVIDIA driver version (nvidia-smi), which torch does not report."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    try:
        out = subprocess.run([exe, "--query-gpu=driver_version", "--format=csv,noheader"], check=False, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
