"""The performance suite's wiring and its power, on CPU: baselines written on request, a malformed or
missing file reported clearly, and two injected slowdowns caught by the baseline check.

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

    from pytest_llmopt import timing

    clock = VirtualClock()
    mp.setattr(timing, "time", types.SimpleNamespace(perf_counter=clock.perf_counter))
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
        str(SUITES / "test_performance.py"), "-k", select, f"--llmopt-baselines={baselines}",
        "-p", "no:logging", "-p", "no:cacheprovider", "-p", "no:benchmark", "-rfsxX", *args,
    )


def baseline_file(baselines: Path) -> Path:
    files = list(baselines.glob("cpu-*/tiny-llama.json"))
    assert len(files) == 1, files
    return files[0]


def test_missing_baseline_is_reported_then_written_on_request(pytester: pytest.Pytester, clean_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    simulated_device(clean_env)
    result = run(pytester, tmp_path, "test_generate_speed and dynamic")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["*no baseline for 1 check(s) in *tiny-llama.json*rerun with --llmopt-update-baselines to write it*"])
    assert not list(tmp_path.rglob("*.json"))
    result = run(pytester, tmp_path, "test_generate_speed and dynamic", "--llmopt-update-baselines")
    result.assert_outcomes(passed=1)
    path = baseline_file(tmp_path)
    result.stdout.fnmatch_lines([f"written: {path}"])
    doc = json.loads(path.read_text())
    assert doc["schema"] == 1 and doc["model"] == "tiny-llama" and doc["environment"]["torch"]
    figures = doc["checks"]["performance::test_generate_speed[dynamic/sdpa/fp32]"]
    # the reference itself: absolute figures only (a speedup over itself would be 1 by construction)
    assert set(figures) == {"decode_ms", "ttft_ms", "tokens_per_s"}
    assert figures["decode_ms"]["value"] >= EAGER_STEP_S * 1000 and figures["decode_ms"]["kind"] == "absolute"
    result = run(pytester, tmp_path, "test_generate_speed and dynamic")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["*1 check(s) compared*"])


def test_a_slower_decode_step_fails_naming_metric_baseline_value_and_tolerance(
    pytester: pytest.Pytester, clean_env: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    with pytest.MonkeyPatch.context() as mp:
        simulated_device(mp)
        run(pytester, tmp_path, "test_generate_speed and dynamic", "--llmopt-update-baselines").assert_outcomes(passed=1)
    simulated_device(clean_env, extra_decode_s=DELAY_S)
    result = run(pytester, tmp_path, "test_generate_speed and dynamic")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(
        [
            "*figure(s) left their baseline:*",
            "*tokens_per_s: measured *, baseline * (-*%; tolerance 10% absolute, higher is better)*",
            "*decode_ms: measured *, baseline * (+*%; tolerance 10% absolute, lower is better) from *tiny-llama.json*",
        ]
    )


def test_compile_silently_disabled_fails_the_speedup_baseline(pytester: pytest.Pytester, clean_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    select = "test_generate_speed and (dynamic or compile)"
    with pytest.MonkeyPatch.context() as mp:
        simulated_device(mp)
        run(pytester, tmp_path, select, "--llmopt-update-baselines").assert_outcomes(passed=2)
    stored = json.loads(baseline_file(tmp_path).read_text())["checks"]["performance::test_generate_speed[static+compile/sdpa/fp32]"]
    assert stored["speedup"]["value"] > 1.5 and stored["speedup"]["kind"] == "ratio"
    simulated_device(clean_env)
    auto_compile_stays_eager(clean_env)
    result = run(pytester, tmp_path, select)
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(
        [
            "*auto-compile did not trigger*",
            "*speedup: measured *, baseline * (-*%; tolerance 10% ratio, higher is better)*",
            "*decode_ms: measured *, baseline * (+*%; tolerance 10% absolute, lower is better)*",
        ]
    )


def test_a_malformed_baseline_is_one_error_naming_the_file(pytester: pytest.Pytester, clean_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    bad = tmp_path / "cpu-x86_64" / "tiny-llama.json"
    bad.parent.mkdir()
    bad.write_text('{"schema": 1, "hardware": "cpu-x86_64", "model": "tiny-llama", "checks": {"c": {"speedup": {"value": 1}}}}')
    result = run(pytester, tmp_path, "test_generate_speed")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([f"ERROR: pytest-llmopt: malformed baseline file {bad}: c / speedup: 'tolerance' must be a number >= 0, not None"])
    assert "Traceback" not in result.stdout.str() + result.stderr.str()


def test_a_wide_spread_is_inconclusive_and_not_written(pytester: pytest.Pytester, clean_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A device that is alternately fast and slow (another job sharing it) gives no verdict and no baseline."""
    calls = {"prefills": 0}

    def cost(decode: bool) -> float:
        if not decode:
            calls["prefills"] += 1  # one prefill per generate() call: every other call is 4x slower
            return PREFILL_S
        return EAGER_STEP_S * (4 if calls["prefills"] % 2 else 1)

    simulated_device(clean_env, cost=cost)
    result = run(pytester, tmp_path, "test_generate_speed and dynamic", "--llmopt-update-baselines")
    result.assert_outcomes(skipped=1)
    result.stdout.fnmatch_lines(["*performance*1 inconclusive*", "*inconclusive: the runs spread *% (interquartile range over median of 5 runs; bound 25%)*"])
    assert not list(tmp_path.rglob("*.json"))


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
    assert doc["checks"] == {
        "memory_like::test_cache_size[static/sdpa/fp32]": {
            "static_cache_bytes": {"value": 4096.0, "tolerance": 0.0, "direction": "lower", "kind": "absolute"}
        }
    }
    pytester.runpytest(f"--llmopt-baselines={tmp_path}", "-p", "no:cacheprovider").assert_outcomes(passed=1)
    clean_env.setenv("CACHE_BYTES", "8192")
    result = pytester.runpytest(f"--llmopt-baselines={tmp_path}", "-p", "no:cacheprovider")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*static_cache_bytes: measured 8192, baseline 4096 (+100.0%; tolerance 0% absolute, lower is better)*"])


def test_a_baseline_of_another_timing_setup_is_not_compared(pytester: pytest.Pytester, clean_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    simulated_device(clean_env)
    run(pytester, tmp_path, "test_generate_speed and dynamic", "--llmopt-update-baselines").assert_outcomes(passed=1)
    path = baseline_file(tmp_path)
    doc = json.loads(path.read_text())
    doc["environment"]["setup"]["new_tokens"] = 128
    path.write_text(json.dumps(doc))
    result = run(pytester, tmp_path, "test_generate_speed and dynamic")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*was measured with {*'new_tokens': 128*}, this run with {*'new_tokens': 16*}: not comparable*"])
