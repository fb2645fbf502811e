"""--llmopt-expect: a combination that ran in an earlier report and is refused as unsupported now fails the
run ("lost support"), unless the refusal is listed as expected for the installed release."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from conftest import SUITES
from pytest_llmopt.wiring.report import SCHEMA

SELF_DRAFT = ("test_self_draft_is_always_accepted", "speculative")
KEY = "speculative::test_self_draft_is_always_accepted[[]{variant}@tiny-llama]"  # fnmatch: [[] is a bracket


def _report(path: Path, variant: str, status: str, transformers: str = "4.52.4") -> Path:
    result = {"suite": "speculative", "check": SELF_DRAFT[0], "model": "tiny-llama", "variant": variant, "status": status, "reason": None}
    path.write_text(json.dumps({"schema": SCHEMA, "environment": {"versions": {"transformers": transformers}}, "results": [result]}))
    return path


def _run(pytester: pytest.Pytester, *args: str) -> pytest.RunResult:
    return pytester.runpytest(str(SUITES / "test_speculative.py"), "-k", f"{SELF_DRAFT[0]} and dynamic", "-p", "no:cacheprovider", *args)


def _refuse_assisted_decoding(mp: pytest.MonkeyPatch) -> None:
    """A release that refuses assisted decoding on every cache, with transformers' own refusal message."""
    from transformers.generation.utils import GenerationMixin

    def refuse(self: Any, *args: Any, **kwargs: Any) -> Any:
        raise ValueError("`assisted generate` is not supported with Static cache classes`")

    mp.setattr(GenerationMixin, "_assisted_decoding", refuse)


def test_a_refusal_of_what_ran_before_fails(pytester: pytest.Pytester, clean_env: pytest.MonkeyPatch) -> None:
    """Proof of power: the self draft ran (dynamic cache) in the expected report; a fault that makes
    transformers refuse it now fails with 'lost support', naming the combination, both releases and the
    refusal."""
    expected = _report(pytester.path / "expected.json", "dynamic/sdpa/fp32", "passed")
    _refuse_assisted_decoding(clean_env)
    result = _run(pytester, f"--llmopt-expect={expected}")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(
        [f"*lost support: {KEY.format(variant='dynamic/sdpa/fp32')} ran in expected.json (transformers 4.52.4: passed) and is now refused (transformers *): unsupported by transformers *not supported with Static cache*"]
    )


def test_control_without_the_fault_passes(pytester: pytest.Pytester, clean_env: pytest.MonkeyPatch) -> None:
    expected = _report(pytester.path / "expected.json", "dynamic/sdpa/fp32", "passed")
    _run(pytester, f"--llmopt-expect={expected}").assert_outcomes(passed=1)


def test_a_refusal_listed_for_this_release_is_accepted(pytester: pytest.Pytester, clean_env: pytest.MonkeyPatch) -> None:
    expected = _report(pytester.path / "expected.json", "dynamic/sdpa/fp32", "passed")
    _refuse_assisted_decoding(clean_env)
    accepted = _run(pytester, f"--llmopt-expect={expected}", "--llmopt-expected-refusal=transformers>=4.0: NOT SUPPORTED with static cache")
    accepted.assert_outcomes(skipped=1)
    other_release = _run(pytester, f"--llmopt-expect={expected}", "--llmopt-expected-refusal=transformers<4.0: not supported with Static cache")
    other_release.assert_outcomes(failed=1)


def test_refused_in_both_runs_stays_a_skip(pytester: pytest.Pytester, clean_env: pytest.MonkeyPatch) -> None:
    expected = _report(pytester.path / "expected.json", "dynamic/sdpa/fp32", "unsupported")
    _refuse_assisted_decoding(clean_env)
    _run(pytester, f"--llmopt-expect={expected}").assert_outcomes(skipped=1)


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--llmopt-expect=missing.json"], "*bad value*--llmopt-expect*no such file*missing.json*"),
        (["--llmopt-expect=bad.json"], "*--llmopt-expect:*bad.json: not a pytest-llmopt JSON report*"),
        (["--llmopt-expected-refusal=not supported"], "*--llmopt-expected-refusal*expected 'PACKAGE SPECIFIER: text of the refusal'*"),
        (["--llmopt-expected-refusal=trans formers!!: x"], "*--llmopt-expected-refusal*is not a package requirement*"),
    ],
)
def test_bad_input_is_one_clear_usage_error(pytester: pytest.Pytester, clean_env: pytest.MonkeyPatch, args: list[str], says: str) -> None:
    (pytester.path / "bad.json").write_text('{"results": []}')
    result = _run(pytester, *args)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([says])
