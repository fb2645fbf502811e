"""The plugin seen from pytest: markers, parametrization ids, skip reasons, deselection, the header,
and the one clear error for a bad model."""

from __future__ import annotations

import sys
import time

import pytest

from conftest import shared_model
from pytest_llmopt.common.outcomes import Status
from pytest_llmopt.wiring.report import load

SUITE = """
import pytest

@pytest.mark.llmopt(cache=["dynamic", "static"], reference={"cache": "dynamic"})
def test_cache(llmopt_case):
    assert llmopt_case.variant.cache in ("dynamic", "static")
    assert llmopt_case.param.reference.cache == "dynamic"

@pytest.mark.llmopt(attention=["eager", "sdpa:flash", "flash_attention_2"], quant=["none", "nf4"])
def test_attention(llmopt_case):
    pass

@pytest.mark.llmopt(cache="static", compile=["auto", "reduce-overhead"])
def test_compile(llmopt_case):
    pass
"""


@pytest.fixture
def suite(pytester: pytest.Pytester, clean_env: pytest.MonkeyPatch) -> pytest.Pytester:
    pytester.makepyfile(test_suite=SUITE)
    return pytester


def test_markers_are_registered_with_their_signature(pytester: pytest.Pytester) -> None:
    result = pytester.runpytest("--markers")
    result.stdout.fnmatch_lines(
        [
            "@pytest.mark.llmopt(cache=..., compile=..., attention=..., quant=..., reference={axis: value}):*",
            "@pytest.mark.llmopt_cuda:*",
            "@pytest.mark.llmopt_bitsandbytes:*",
            "@pytest.mark.llmopt_flash_attn:*",
            "@pytest.mark.llmopt_compile:*",
        ]
    )


def test_ids_cross_models_and_variants(suite: pytest.Pytester) -> None:
    result = suite.runpytest("--collect-only", "-q", "--llmopt-model=tiny-llama", "--llmopt-model=tiny-gpt2", "--llmopt-dtype=float32")
    result.stdout.fnmatch_lines(
        [
            "test_suite.py::test_cache[[]dynamic/sdpa/fp32@tiny-llama[]]",
            "test_suite.py::test_cache[[]static/sdpa/fp32@tiny-llama[]]",
            "test_suite.py::test_cache[[]dynamic/sdpa/fp32@tiny-gpt2[]]",
            "test_suite.py::test_cache[[]static/sdpa/fp32@tiny-gpt2[]]",
            "test_suite.py::test_attention[[]dynamic/sdpa:flash/nf4/fp32@tiny-llama[]]",
            "test_suite.py::test_compile[[]static+compile/sdpa/fp32@tiny-llama[]]",
            "test_suite.py::test_compile[[]static+compile:reduce-overhead/sdpa/fp32@tiny-llama[]]",
        ]
    )


def test_machine_requirements_skip_with_how_to_enable(suite: pytest.Pytester) -> None:
    result = suite.runpytest("-rs", "--llmopt-device=cpu", "--llmopt-dtype=float32", "-k", "test_attention")
    result.stdout.fnmatch_lines(
        [
            "*needs CUDA: run on a GPU runner (--llmopt-device=cuda or auto)*",
        ]
    )
    result.assert_outcomes(passed=1, skipped=5)


def test_requirement_markers_are_applied(suite: pytest.Pytester) -> None:
    result = suite.runpytest("--collect-only", "-q", "-m", "llmopt_bitsandbytes")
    result.stdout.fnmatch_lines(["*test_attention[[]dynamic/eager/nf4/fp32@tiny-llama[]]*"])
    assert "nf4" in result.stdout.str() and "test_cache" not in result.stdout.str()
    compiled = suite.runpytest("--collect-only", "-q", "-m", "llmopt_compile")
    compiled.stdout.fnmatch_lines(["*test_compile*", "*2/10 tests collected*"])


def test_model_without_capability_is_unsupported_not_failed(suite: pytest.Pytester) -> None:
    result = suite.runpytest("-rs", "--llmopt-model=tiny-gptneo", "-k", "test_compile or test_cache", "--llmopt-report=r.json")
    result.stdout.fnmatch_lines(["*unsupported by the model: GPTNeoForCausalLM does not declare _can_compile_fullgraph*"])
    result.assert_outcomes(passed=1, skipped=3)
    statuses = {(r.check, r.variant): r.status for r in load(suite.path / "r.json")[0]}
    assert statuses == {
        ("test_cache", "dynamic/eager/fp32"): Status.PASSED,
        ("test_cache", "static/eager/fp32"): Status.UNSUPPORTED,
        ("test_compile", "static+compile/eager/fp32"): Status.UNSUPPORTED,
        ("test_compile", "static+compile:reduce-overhead/eager/fp32"): Status.NOT_RUN,  # needs CUDA, checked first
    }


def test_variant_selection_deselects(suite: pytest.Pytester) -> None:
    result = suite.runpytest("-q", "--llmopt-variants=cache=static attention!=flash*", "--llmopt-device=cpu")
    result.stdout.fnmatch_lines(["*deselected*"])
    # kept: test_cache[static], test_compile[auto] (passes), test_compile[reduce-overhead] (needs CUDA);
    # deselected: test_cache[dynamic] and the six dynamic-cache test_attention variants
    result.assert_outcomes(passed=2, skipped=1, deselected=7)


def test_report_header_names_models_device_dtype_and_versions(suite: pytest.Pytester) -> None:
    result = suite.runpytest("--llmopt-model=tiny-llama", "--llmopt-model=tiny-gpt2", "--llmopt-device=cpu", "-k", "nothing")
    result.stdout.fnmatch_lines(
        [
            "llmopt: models tiny-llama, tiny-gpt2",
            "llmopt: device cpu, dtype float32, variants all, seed 0",
            "llmopt: torch *, transformers *, bitsandbytes *, flash-attn *",
        ]
    )


@pytest.mark.parametrize(
    ("model", "fragment"),
    [
        ("does/not-exist", "--llmopt-model=does/not-exist: not a built-in model*"),
        ("./no/such/folder", "--llmopt-model=./no/such/folder: no such folder*"),
        ("not a name!", "--llmopt-model=not a name!: no such folder*"),
    ],
)
def test_bad_model_is_one_clear_error(suite: pytest.Pytester, model: str, fragment: str) -> None:
    started = time.monotonic()
    result = suite.runpytest_subprocess(f"--llmopt-model={model}", "--llmopt-model=tiny-llama")
    elapsed = time.monotonic() - started
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([f"ERROR: pytest-llmopt: {fragment}"])
    assert result.stderr.str().count("ERROR") == 1
    assert "Traceback" not in result.stderr.str() + result.stdout.str()
    assert "passed" not in result.stdout.str()
    assert elapsed < 30, f"took {elapsed:.1f}s"


def test_folder_without_config_is_rejected(suite: pytest.Pytester) -> None:
    (suite.path / "empty").mkdir()
    result = suite.runpytest("--llmopt-model=empty")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["ERROR: pytest-llmopt: --llmopt-model=*empty: the folder * has no config.json*"])


def test_bad_assistant_is_one_clear_error(suite: pytest.Pytester) -> None:
    result = suite.runpytest("--llmopt-assistant=./nowhere")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["ERROR: pytest-llmopt: --llmopt-assistant=./nowhere: no such folder*"])


def test_offline_hub_id_not_in_cache(suite: pytest.Pytester, clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("HF_HUB_OFFLINE", "1")
    result = suite.runpytest_subprocess("--llmopt-model=someone/some-model")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*not in the local cache and HF_HUB_OFFLINE is set*"])


def test_unloadable_model_fails_its_tests_once_each_and_the_session_goes_on(suite: pytest.Pytester) -> None:
    broken = suite.path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text('{"model_type": "llama", "vocab_size": 32, "hidden_size": 8, "num_attention_heads": 2, "num_hidden_layers": 1, "intermediate_size": 16}')
    suite.makepyfile(
        test_load="""
        import pytest

        @pytest.mark.llmopt(cache=["dynamic", "static"])
        def test_uses_model(llmopt_case):
            llmopt_case.target

        def test_other():
            pass
        """
    )
    result = suite.runpytest("test_load.py", "--llmopt-model=broken", "--llmopt-model=tiny-llama", "-rf")
    result.assert_outcomes(passed=3, failed=2)
    result.stdout.fnmatch_lines(["broken: could not load (OSError: *", "broken: could not load * (failed earlier in this session)"])
    assert "Traceback" not in result.stdout.str() and "During handling" not in result.stdout.str()


def test_out_of_memory_fails_one_test_with_one_line(suite: pytest.Pytester) -> None:
    suite.makepyfile(
        test_oom="""
        import torch

        def test_oom():
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 80.00 GiB")

        def test_after():
            pass
        """
    )
    result = suite.runpytest("test_oom.py", "-rf")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(["_*_ test_oom _*_", "out of GPU memory: CUDA out of memory. Tried to allocate 80.00 GiB", "=*short test summary*"])
    assert "Traceback" not in result.stdout.str()


def test_lost_cuda_context_stops_the_checks_after_it_with_one_reason(suite: pytest.Pytester) -> None:
    """A device-side assert poisons the process's CUDA context: the check it happened in fails and says so, the
    llmopt checks after it in that process are not run (each would fail for its cause, not theirs), the others run.
    The lost context is simulated: machine.cuda_context_error is what the plugin asks after each test."""
    suite.makeconftest(
        """
        import pytest_llmopt.running.machine as machine

        LOST = []
        ORIGINAL = machine.cuda_context_error
        machine.cuda_context_error = lambda: LOST[0] if LOST else None

        def pytest_unconfigure(config):
            machine.cuda_context_error = ORIGINAL  # pytester runs in this process: the outer session asks it too
        """
    )
    suite.makepyfile(
        test_lost="""
        import pytest
        import conftest

        @pytest.mark.llmopt(cache=["dynamic"])
        def test_a_breaks(llmopt_case):
            conftest.LOST.append("AcceleratorError: CUDA error: device-side assert triggered")
            raise RuntimeError("CUDA error: device-side assert triggered\\nCUDA kernel errors might be asynchronously reported")

        @pytest.mark.llmopt(cache=["dynamic", "static"])
        def test_b_after(llmopt_case):
            pass

        def test_c_plain():
            pass
        """
    )
    result = suite.runpytest("test_lost.py", "-p", "no:randomly", "-rfs", "--llmopt-report=lost.json")
    result.assert_outcomes(passed=1, failed=1, skipped=2)
    result.stdout.fnmatch_lines(
        [
            "RuntimeError: CUDA error: device-side assert triggered",
            "the CUDA context of this process was lost during this check (AcceleratorError: CUDA error: device-side assert triggered)*",
            "*the CUDA context of this process was lost in test_lost.py::test_a_breaks*run this check again on its own*",
        ]
    )
    statuses = {(r.check, r.variant): r.status for r in load(suite.path / "lost.json")[0]}
    assert sorted(statuses.values()) == sorted([Status.FAILED, Status.NOT_RUN, Status.NOT_RUN])
    assert {check for (check, _), status in statuses.items() if status == Status.NOT_RUN} == {"test_b_after"}


def test_a_test_marked_whole_device_holds_the_device_alone(suite: pytest.Pytester) -> None:
    """Every llmopt test shares the device's lock; one that sizes its allocation to the free memory (continuous
    batching's default cache) holds it exclusive, so no other worker's test runs beside it."""
    suite.makeconftest(
        """
        import contextlib
        from pytest_llmopt.common.gpulock import DeviceLock

        TAKEN = []
        ORIGINAL = DeviceLock.shared, DeviceLock.exclusive

        @contextlib.contextmanager
        def shared(self):
            TAKEN.append("shared")
            yield

        @contextlib.contextmanager
        def exclusive(self):
            TAKEN.append("exclusive")
            yield 0.0

        DeviceLock.shared, DeviceLock.exclusive = shared, exclusive

        def pytest_unconfigure(config):
            DeviceLock.shared, DeviceLock.exclusive = ORIGINAL
        """
    )
    suite.makepyfile(
        test_locks="""
        import pytest
        import conftest

        @pytest.mark.llmopt(cache=["dynamic"])
        def test_ordinary(llmopt_case):
            assert conftest.TAKEN == ["shared"]

        @pytest.mark.llmopt_whole_device
        @pytest.mark.llmopt(cache=["dynamic"])
        def test_whole_device(llmopt_case):
            assert conftest.TAKEN == ["shared", "exclusive"]
        """
    )
    suite.runpytest("test_locks.py", "-p", "no:randomly").assert_outcomes(passed=2)


def test_real_model_loads_through_the_local_folder_path(suite: pytest.Pytester) -> None:
    path = shared_model("tinystories-656k")
    result = suite.runpytest(f"--llmopt-model={path}", "-k", "test_cache")
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines(["llmopt: models tinystories-656k"])
    collected = suite.runpytest("--collect-only", "-q", f"--llmopt-model={path}", "-k", "test_cache")
    collected.stdout.fnmatch_lines(["*test_cache[[]dynamic/sdpa/fp32@tinystories-656k[]]"])


def test_test_without_marker_is_a_clear_usage_error(pytester: pytest.Pytester, clean_env: pytest.MonkeyPatch) -> None:
    pytester.makepyfile("def test_x(llmopt_case): pass")
    result = pytester.runpytest()
    assert result.ret != 0
    result.stdout.fnmatch_lines(["*a test using llmopt_case needs @pytest.mark.llmopt(...)*"])


def test_python_version_is_supported() -> None:
    assert sys.version_info >= (3, 9)


def test_a_users_suite_needs_only_the_public_api(pytester: pytest.Pytester, clean_env: pytest.MonkeyPatch) -> None:
    """The fixture's documented example, as a user would write it: it runs both paths on each prompt and decides."""
    pytester.makepyfile(
        test_mine="""
        import pytest
        from pytest_llmopt.api import greedy_each_prompt, not_run

        @pytest.mark.llmopt(cache=["static"], reference={"cache": "dynamic"})
        def test_static(llmopt_case):
            plain, got = greedy_each_prompt(llmopt_case)
            assert len(plain) == len(got) == len(llmopt_case.prompts)

        @pytest.mark.llmopt()
        def test_said(llmopt_case):
            not_run("nothing to decide here")
        """
    )
    result = pytester.runpytest("-p", "no:cacheprovider", "-rs")
    result.assert_outcomes(passed=1, skipped=1)
    result.stdout.fnmatch_lines(["*mine*pass 1/1 · 1 not run*", "SKIPPED*nothing to decide here"])
