"""The performance suite's wiring and its power, on CPU: one interleaved campaign per model, baselines appended
on request and pooled, a malformed or missing file reported clearly, injected slowdowns caught by the interval
verdicts, an unchanged device never flagged, a jittery one inconclusive, and the campaign kept on one xdist worker.

CPU timings of a tiny model on a shared 2-core machine swing several-fold with the neighbours' load, so
these runs time a simulated device on a virtual clock: the suite's CPU clock (timing.time.perf_counter)
reads a counter that advances by READ_S per reading and by the model's forward: PREFILL_S for a prefill and EAGER_STEP_S for an
eager decode step (like a GPU's kernel-launch overhead); compiled code advances nothing (dynamo drops the
branch while tracing, as CUDA graphs drop launch overhead). Everything else is real: generate(), the
compile, the step marks, the medians, the baseline files and the verdicts. The faults change real code
paths: generate() silently not compiling, or a decode step that sleeps longer.
"""

from __future__ import annotations

import functools
import json
import types
from pathlib import Path
from typing import Any

import pytest
import torch
from faults import auto_compile_stays_eager

from conftest import SUITES

PREFILL_S = 0.005
EAGER_STEP_S = 0.008
DELAY_S = 0.03
READ_S = 0.001


class VirtualClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def thread_time(self) -> float:
        return self.now

    def process_time(self) -> float:
        return self.now

    def perf_counter(self) -> float:
        """Each reading costs READ_S: the suite reads once per generated token, so every step, compiled or
        not, takes at least that (the sampling around the forward)."""
        self.now += READ_S
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def simulated_device(mp: pytest.MonkeyPatch, extra_decode_s: float = 0.0, cost: Any = None) -> VirtualClock:
    """Llama forwards cost virtual time on the suite's clock: PREFILL_S per prefill, EAGER_STEP_S
    (+ ``extra_decode_s``, the injected delay) per eager decode step, nothing when compiled."""
    from transformers import LlamaForCausalLM

    from pytest_llmopt.running import timing

    clock = VirtualClock()
    mp.setattr(timing, "time", types.SimpleNamespace(perf_counter=clock.perf_counter, thread_time=clock.thread_time, process_time=clock.process_time))
    original = LlamaForCausalLM.forward

    @functools.wraps(original)
    def forward(self: Any, input_ids: Any = None, *args: Any, **kwargs: Any) -> Any:
        if not torch.compiler.is_compiling() and input_ids is not None:
            decode = input_ids.shape[-1] == 1
            clock.sleep(cost(decode) if cost else (EAGER_STEP_S + extra_decode_s if decode else PREFILL_S))
        return original(self, input_ids, *args, **kwargs)

    mp.setattr(LlamaForCausalLM, "forward", forward)
    return clock


def run(pytester: pytest.Pytester, baselines: Path, select: str, *args: str) -> pytest.RunResult:
    return pytester.runpytest(
        str(SUITES / "test_performance.py"), "-k", select, f"--llmopt-baselines={baselines}", "--llmopt-speed-budget=60",
        "-p", "no:logging", "-p", "no:cacheprovider", "-p", "no:benchmark", "-rfsxX", *args,
    )


def only_in(path_part: str, extra_s: float) -> Any:
    """A cost function: the simulated device, plus ``extra_s`` per decode step of the campaign path whose key
    holds ``path_part`` (a slower host-side step of that path alone)."""
    from pytest_llmopt.running import campaign

    def cost(decode: bool) -> float:
        if not decode:
            return PREFILL_S
        current = campaign.CURRENT.get() or ""
        return EAGER_STEP_S + (extra_s if path_part in current else 0.0)

    return cost


def baseline_file(baselines: Path) -> Path:
    files = list(baselines.glob("cpu-*/tiny-llama.json"))
    assert len(files) == 1, files
    return files[0]


GENERATE = "test_generate_speed and (dynamic or static)"
STATIC = "performance::test_generate_speed[static/sdpa/fp32]"
COMPILED = "performance::test_generate_speed[static+compile/sdpa/fp32]"


def test_missing_baseline_is_reported_then_sessions_are_appended_and_pooled(pytester: pytest.Pytester, clean_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    simulated_device(clean_env)
    select = "test_generate_speed and (dynamic or static) and not compile"
    result = run(pytester, tmp_path, select)
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines(
        [
            "*llmopt: speed campaigns*",
            "tiny-llama (none): 1 variant(s) x * rounds (0 dropped, 0 late warm-up), stopped on *; A/A noise per call *",
            "*no baseline for 1 check(s) in *tiny-llama.json*rerun with --llmopt-update-baselines to write it*",
        ]
    )
    assert not list(tmp_path.rglob("*.json"))
    for _ in range(3):
        result = run(pytester, tmp_path, select, "--llmopt-update-baselines")
        result.assert_outcomes(passed=2)
    path = baseline_file(tmp_path)
    result.stdout.fnmatch_lines([f"written: {path}"])
    doc = json.loads(path.read_text())
    assert doc["schema"] == 2 and doc["model"] == "tiny-llama" and doc["environment"]["setup"]["estimator"] == 2
    figures = doc["checks"][STATIC]
    assert set(figures) == {"decode_speedup", "speedup"}  # on CPU: no GPU work; the wall-time ratios, paired
    sessions = figures["decode_speedup"]["sessions"]
    assert len(sessions) == 3 and figures["decode_speedup"]["band"] == "cpu" and sessions[0]["n"] >= 6
    assert sessions[0]["value"] == pytest.approx(1.0, abs=0.05)  # eager static steps cost what dynamic ones do
    # three sessions pooled: the between-session spread is measured (here none), no longer CPU's provisional 25 %
    result = run(pytester, tmp_path, select)
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines(["*1 check(s) compared*"])


def test_a_slower_step_of_one_path_is_a_regression_naming_figure_interval_and_baseline(
    pytester: pytest.Pytester, clean_env: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    select = "test_generate_speed and (dynamic or static) and not compile"
    with pytest.MonkeyPatch.context() as mp:
        simulated_device(mp)
        run(pytester, tmp_path, select, "--llmopt-update-baselines").assert_outcomes(passed=2)
    simulated_device(clean_env, cost=only_in("[static/", DELAY_S))
    result = run(pytester, tmp_path, select)
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(
        [
            "*figure(s) left their baseline:*",
            "*decode_speedup: measured 0.2*x, baseline 1.0*x: regression: -7*% [[]-*, -*[]] (1 session, provisional, between-session sd 25.0%, band cpu) from *tiny-llama.json*",
        ]
    )


def test_compile_silently_disabled_fails_at_once_and_against_the_baseline(pytester: pytest.Pytester, clean_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    select = "test_generate_speed and (dynamic or compile)"
    with pytest.MonkeyPatch.context() as mp:
        simulated_device(mp)
        run(pytester, tmp_path, select, "--llmopt-update-baselines").assert_outcomes(passed=2)
    stored = json.loads(baseline_file(tmp_path).read_text())["checks"][COMPILED]
    assert stored["decode_speedup"]["sessions"][0]["value"] > 4
    simulated_device(clean_env)
    auto_compile_stays_eager(clean_env)
    result = run(pytester, tmp_path, select)
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(["*auto-compile did not trigger*", "*decode_speedup: measured 1.0*x, baseline *x: regression*"])


def test_an_unchanged_device_is_never_a_regression_and_a_jittery_one_is_inconclusive(
    pytester: pytest.Pytester, clean_env: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A/A: the same simulated device with 3 % jitter per call, three sessions pooled into the baseline, then three
    more judged against it: none is a regression. Then every other call 4x slower: the interval cannot decide."""
    import random

    select = "test_generate_speed and (dynamic or static) and not compile"
    rng = random.Random(3)
    state = {"jitter": 1.0, "prefills": 0}

    def cost(decode: bool) -> float:
        if not decode:
            state["jitter"] = random.Random(rng.random()).gauss(1.0, 0.03)
            state["prefills"] += 1
            return PREFILL_S
        return EAGER_STEP_S * state["jitter"] * (4 if state.get("bimodal") and state["prefills"] % 2 else 1)

    simulated_device(clean_env, cost=cost)
    for _ in range(3):
        run(pytester, tmp_path, select, "--llmopt-update-baselines").assert_outcomes(passed=2)
    assert len(json.loads(baseline_file(tmp_path).read_text())["checks"][STATIC]["speedup"]["sessions"]) == 3
    for _ in range(3):
        result = run(pytester, tmp_path, select)
        assert result.parseoutcomes().get("failed", 0) == 0, result.stdout.str()
    state["bimodal"] = True
    result = run(pytester, tmp_path, select)
    result.assert_outcomes(passed=1, skipped=1)
    result.stdout.fnmatch_lines(["*inconclusive against the baseline: decode_speedup inconclusive: *could detect a slowdown of *"])


def test_a_malformed_baseline_is_one_error_naming_the_file(pytester: pytest.Pytester, clean_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    bad = tmp_path / "cpu-x86_64" / "tiny-llama.json"
    bad.parent.mkdir()
    bad.write_text('{"schema": 2, "hardware": "cpu-x86_64", "model": "tiny-llama", "checks": {"c": {"speedup": {"band": "cpu", "sessions": [{"value": 1}]}}}}')
    result = run(pytester, tmp_path, "test_generate_speed")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([f"ERROR: pytest-llmopt: malformed baseline file {bad}: c / speedup: session 0: 'se' must be a number >= 0, not None"])
    assert "Traceback" not in result.stdout.str() + result.stderr.str()


def test_memory_figures_of_other_suites_are_kept_and_judged(pytester: pytest.Pytester, clean_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A memory suite's recorded figure (here a static-cache size) is written with the others, and a
    larger one later fails its check, naming the figure, the baseline, the value and the tolerance."""
    pytester.makepyfile(
        test_memory_like="""
        import os
        import pytest

        @pytest.mark.llmopt(cache="static")
        def test_cache_size(llmopt_case):
            llmopt_case.record(static_cache_bytes=int(os.environ["CACHE_BYTES"]), unrelated_figure=1)
        """
    )
    clean_env.setenv("CACHE_BYTES", "4096")
    pytester.runpytest(f"--llmopt-baselines={tmp_path}", "--llmopt-update-baselines", "-p", "no:cacheprovider").assert_outcomes(passed=1)
    doc = json.loads(baseline_file(tmp_path).read_text())
    assert doc["checks"] == {"memory_like::test_cache_size[static/sdpa/fp32]": {"static_cache_bytes": {"value": 4096.0}}}
    pytester.runpytest(f"--llmopt-baselines={tmp_path}", "-p", "no:cacheprovider").assert_outcomes(passed=1)
    clean_env.setenv("CACHE_BYTES", "8192")
    result = pytester.runpytest(f"--llmopt-baselines={tmp_path}", "-p", "no:cacheprovider")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*static_cache_bytes: measured 8.0 KiB, baseline 4.0 KiB: regression (+100.0%; tolerance 0%, lower is better) from *"])


def test_a_baseline_of_another_timing_setup_is_not_compared(pytester: pytest.Pytester, clean_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    simulated_device(clean_env)
    select = "test_generate_speed and (dynamic or static) and not compile"
    run(pytester, tmp_path, select, "--llmopt-update-baselines").assert_outcomes(passed=2)
    path = baseline_file(tmp_path)
    doc = json.loads(path.read_text())
    doc["environment"]["setup"]["new_tokens"] = 128
    path.write_text(json.dumps(doc))
    result = run(pytester, tmp_path, select)
    result.assert_outcomes(failed=2)  # the reference's own check too: nothing in that file is comparable
    result.stdout.fnmatch_lines(["*was measured with {*'new_tokens': 128*}, this run with {*'new_tokens': 16*}: not comparable*"])


def test_a_models_campaign_runs_once_across_xdist_workers(pytester: pytest.Pytester, clean_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Under -n 2 the checks of one model land on both workers; the campaign runs once (the first worker to need it
    times every path, the other reads its figures), so the summary shows one campaign (real CPU timing here: the
    workers are processes of their own)."""
    result = pytester.runpytest_subprocess(
        str(SUITES / "test_performance.py"), "-k", "test_generate_speed and not compile", "-n", "2", "-v",
        f"--llmopt-baselines={tmp_path}", "--llmopt-speed-budget=1", "-p", "no:cacheprovider", "-p", "no:benchmark",
        f"--llmopt-report={tmp_path / 'r.json'}",
    )
    result.assert_outcomes(passed=2)
    workers = {line.split("]")[0] for line in result.stdout.lines if "PASSED" in line and "test_generate_speed" in line}
    assert workers <= {"[gw0", "[gw1"}, result.stdout.str()  # dealt one each (as a rule: load scheduling splits two items)
    doc = json.loads((tmp_path / "r.json").read_text())
    runs = {json.dumps(r["metrics"]["campaign"], sort_keys=True) for r in doc["results"]}
    assert len(runs) == 1  # both checks read the same campaign


def test_request_mix_throughput_is_paired_against_one_by_one_and_a_slower_serving_path_is_a_regression(
    pytester: pytest.Pytester, clean_env: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The request mix (throughput.py): one left-padded batch and continuous batching's generate_batch against the
    requests one by one, in one campaign of their own. On the simulated device a forward costs the same at any
    batch, so the padded batch's 8 requests come close to 8x; then generate_batch made slower per call (a serving
    path's host-side regression) fails its check against the baseline, and only its check."""
    from transformers.generation.continuous_batching import ContinuousMixin

    select = "throughput"
    with pytest.MonkeyPatch.context() as mp:
        simulated_device(mp)
        result = run(pytester, tmp_path, select, "--llmopt-update-baselines")
        result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines(["tiny-llama (none, request mix): 2 variant(s) x * rounds*"])
    doc = json.loads(baseline_file(tmp_path).read_text())
    batched = doc["checks"]["performance::test_batched_throughput[dynamic/sdpa/fp32]"]
    assert set(batched) == {"speedup"}  # no decode_speedup: a mix has no one decode loop
    assert 5 < batched["speedup"]["sessions"][0]["value"] < 8.5
    clock = simulated_device(clean_env)
    original = ContinuousMixin.generate_batch

    @functools.wraps(original)
    def slower(self: Any, *args: Any, **kwargs: Any) -> Any:
        clock.sleep(0.5)
        return original(self, *args, **kwargs)

    clean_env.setattr(ContinuousMixin, "generate_batch", slower)
    result = run(pytester, tmp_path, select)
    assert result.parseoutcomes().get("failed") == 1  # the batched check: ok, or inconclusive against one provisional session
    result.stdout.fnmatch_lines(["*test_continuous_batching_throughput*", "*speedup: measured *x, baseline *x: regression*"])
    assert not [line for line in result.stdout.lines if line.startswith("FAILED") and "test_batched_throughput" in line]
