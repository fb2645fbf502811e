"""Where a check's time goes (phases.py): nested phases give the time to the innermost, torch.compile's own time is
taken out of the phase it happened in, and a run's summary sums the checks' records."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from pytest_llmopt.common import phases
from pytest_llmopt.wiring.report import Result


def test_the_innermost_phase_gets_the_time_and_compile_time_is_its_own(monkeypatch: pytest.MonkeyPatch) -> None:
    compiled = {"s": 0.0}
    monkeypatch.setattr(phases, "compile_seconds", lambda: compiled["s"])
    phases.start()
    with phases.phase("verdict"):
        time.sleep(0.05)
        with phases.phase("reference"):
            time.sleep(0.1)
        with phases.phase("generate"):
            time.sleep(0.06)
            compiled["s"] += 0.04  # dynamo says 40 ms of this call were compiling
    time.sleep(0.02)
    spent = phases.stop()
    assert spent is not None and phases.stop() is None
    assert spent["reference"] == pytest.approx(0.1, abs=0.03)
    assert spent["verdict"] == pytest.approx(0.05, abs=0.03)
    assert spent["compile"] == pytest.approx(0.04, abs=0.001)
    assert spent["generate"] == pytest.approx(0.02, abs=0.03)
    assert spent["other"] == pytest.approx(0.02, abs=0.03)
    assert sum(spent.values()) == pytest.approx(0.23, abs=0.05)


def test_outside_a_check_a_phase_costs_nothing() -> None:
    assert phases.stop() is None
    with phases.phase("generate"):
        pass
    assert phases.timed("load")(lambda x: x + 1)(1) == 2


def test_the_summary_sums_the_records_and_names_the_longest_checks() -> None:
    results = [
        Result("attention", "test_a", "m", "v1", "passed", phases={"load": 2.0, "generate": 3.0, "other": 1.0}),
        Result("attention", "test_b", "m", "v2", "passed", phases={"compile": 10.0, "generate": 2.0}),
        Result("attention", "test_c", "m", "v3", "passed"),
    ]
    lines = phases.summary_lines(results)
    assert lines[0] == "2 check(s), 18.0 s: load 2.0 s (11%), compile 10.0 s (56%), generate 5.0 s (28%), other 1.0 s (6%)"
    assert lines[1].split() == ["12.0", "s", "attention::test_b[v2@m]:", "compile", "10.0,", "generate", "2.0"]
    assert phases.summary_lines([results[2]]) == []


def test_a_run_records_each_checks_phases_and_sums_them(pytester: pytest.Pytester, clean_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    pytester.makepyfile(
        test_timed="""
        import pytest

        @pytest.mark.llmopt(cache=["static"], reference={"cache": "dynamic"})
        def test_static(llmopt_case):
            ids, mask = llmopt_case.reference.encode("Once upon a time")
            llmopt_case.check_greedy(llmopt_case.reference.generate(ids, mask, 4), llmopt_case.target.generate(ids, mask, 4))
        """
    )
    result = pytester.runpytest("-p", "no:cacheprovider", f"--llmopt-report={tmp_path / 'r.json'}")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["*llmopt: where the time went*", "1 check(s), * s:*"])  # phases under 0.05 s are not shown
    record = json.loads((tmp_path / "r.json").read_text())["results"][0]
    spent = record["phases"]
    assert "phases" not in record["metrics"]  # beside the figures, like the duration: two runs' figures still compare
    assert set(spent) == set(phases.PHASES) and spent["generate"] > 0 and spent["reference"] > 0


def test_waiting_for_the_device_lock_is_its_own_phase() -> None:
    """A check that waits for another worker's speed campaign (here a second lock holder in a thread) says so."""
    import threading

    from pytest_llmopt.common.gpulock import DeviceLock

    key = f"phases-test-{time.time_ns()}"
    held, release = threading.Event(), threading.Event()

    def campaign() -> None:
        with DeviceLock(key).exclusive():
            held.set()
            release.wait(5)

    worker = threading.Thread(target=campaign)
    worker.start()
    held.wait(5)
    phases.start()
    threading.Timer(0.2, release.set).start()
    with DeviceLock(key).shared():
        pass
    spent = phases.stop()
    worker.join()
    assert spent is not None and spent["wait"] == pytest.approx(0.2, abs=0.1)
