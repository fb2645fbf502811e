"""A speed check (the ``llmopt_speed`` fixture): the figures of its path from its model's campaign, run once per
session (speedrun.py) whichever worker gets there first; their verdicts against the baseline; the record."""

from __future__ import annotations

import contextlib
from typing import Any

import pytest

from ..common import metrics as mx
from ..common import outcomes
from ..common.phases import phase
from ..running.speedplan import Group, Planned, check_key, group_key, workload
from ..running.speedrun import Figures, Outcome, load_shared, run, save_shared, shared_path
from ..verdicts import baselines as bl


class SpeedCheck:
    def __init__(self, plugin: Any, request: pytest.FixtureRequest) -> None:
        self.plugin = plugin
        self.request = request

    def check(self, case: Any) -> dict[str, Any]:
        """Time ``case`` in its model's campaign; record, judge against the baseline. Returns the recorded figures."""
        plugin = self.plugin
        key = check_key(case.node, case.variant.id)
        marker = case.node.get_closest_marker("llmopt_speed")
        extra = dict(marker.kwargs) if marker else {}
        group = plugin.groups.get(group_key(case.spec.name, case.variant.quant, extra))
        if group is None or key not in group.planned:
            # not planned at collection (a test outside the suites' markers): a campaign of its own
            group = Group(case.spec.name, case.variant.quant, workload(extra))
            group.planned[key] = Planned(key, case.param, extra)
        outcome = self._outcome(group, case)
        if key in outcome.raised:
            with case.explain("timing"):
                raise outcome.raised[key].rebuild()
        figures = outcome.figures[key]
        case.record(**figures.metrics)
        self._to_benchmark(case, figures)
        return self._verdict(case, key, figures)

    def _outcome(self, group: Group, case: Any) -> Outcome:
        """The group's outcome: this process's, another worker's (shared file), or a campaign run now."""
        if isinstance(group.outcome, Outcome):
            return group.outcome
        if isinstance(group.outcome, BaseException):
            with case.explain("timing the reference"):
                raise group.outcome
        plugin = self.plugin
        run_id = _run_id(self.request.config)
        path = shared_path(run_id, group) if run_id else None
        # another worker's figures are read without the lock (the file is written whole, atomically): only the
        # campaign itself waits for the device, not each of its checks (on CPU those waits were most of CI's main job)
        ready = load_shared(path) if path is not None else None
        with contextlib.nullcontext() if ready is not None else plugin.lock.exclusive():
            found = ready or (load_shared(path) if path is not None else None)
            if found is None:
                try:
                    with phase("speed"):
                        found = run(plugin, group, case)
                except (KeyboardInterrupt, SystemExit):
                    raise
                except BaseException as exc:
                    group.outcome = exc
                    with case.explain("timing the reference"):
                        raise
                if path is not None:
                    save_shared(path, found)
                plugin.campaign_lines.append(found.summary)
            elif plugin.calibration is None:
                plugin.calibration = found.calibration
        group.outcome = found
        return found

    def _verdict(self, case: Any, key: str, figures: Figures) -> dict[str, Any]:
        plugin = self.plugin
        problems = figures.problems
        if problems and plugin.update:
            pytest.fail("\n".join(problems) + "\n(figures not written to the baseline)", pytrace=False)
        stored = plugin.stored_setup(case.spec.name)
        current = plugin.environment()["setup"]
        if stored is not None and stored != current and not plugin.update:
            pytest.fail(
                f"{case.label}: the baseline {plugin.baseline_path(case.spec.name)} was measured with {stored}, "
                f"this run with {current}: not comparable; rerun with --llmopt-update-baselines",
                pytrace=False,
            )
        findings, note = plugin.judge(case.spec.name, key, figures.measured)
        verdicts = {f.metric: {"verdict": f.verdict, "text": f.detail or f.verdict, "baseline": f.baseline, "band": list(f.band) if f.band else None} for f in findings}
        case.record(**note, verdicts=verdicts)
        bad = [f for f in findings if f.verdict == "regression"]
        if problems or bad:
            text = "\n".join(problems)
            if bad:
                text += ("\n" if text else "") + bl.failure_text(case.label, findings)
            pytest.fail(text, pytrace=False)
        timed = [f for f in findings if f.metric in mx.TIMED and f.baseline is not None]
        if timed and all(f.verdict == "inconclusive" for f in timed):
            outcomes.inconclusive(f"inconclusive against the baseline: {'; '.join(f'{f.metric} {f.detail}' for f in timed)}")
        return figures.metrics

    def _to_benchmark(self, case: Any, figures: Figures) -> None:
        """pytest-benchmark as an export: this path's timed calls as its rounds, the figures in extra_info (its
        own fixture cannot interleave or pair, so it times nothing itself)."""
        if not self.request.config.pluginmanager.has_plugin("benchmark"):
            return
        bench = self.request.getfixturevalue("benchmark")
        bench._mode = "llmopt campaign (exported)"  # used, by the export below (or disabled, e.g. under xdist): no "not used" warning
        if getattr(bench, "disabled", True) or not hasattr(bench, "_make_stats"):
            return
        meta = bench._make_stats(1)
        for seconds in figures.call_seconds:
            meta.stats.update(seconds)
        bench.group = f"llmopt {case.spec.name}"
        bench.extra_info.update({k: v for k, v in figures.metrics.items() if isinstance(v, (int, float, str))})
        bench.extra_info["variant"] = case.variant.id


def _run_id(config: pytest.Config) -> str | None:
    """This run's id where several pytest-xdist workers share it (their campaigns are shared), else None. Only a
    worker's own input counts: the environment's PYTEST_XDIST_TESTRUNUID is inherited by any pytest session a worker
    starts, which would then read another session's campaign as its own."""
    workerinput = getattr(config, "workerinput", None)
    if isinstance(workerinput, dict) and workerinput.get("testrunuid"):
        return str(workerinput["testrunuid"])
    return None
