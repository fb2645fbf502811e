"""Reports: what a run records, the same through xdist, rendered for people, and the upgrade gate."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pytest_llmopt.cli import compare, main
from pytest_llmopt.common.outcomes import Status
from pytest_llmopt.wiring.render import markdown
from pytest_llmopt.wiring.report import ReportError, Result, load

SUITE = """
import pytest

from pytest_llmopt.common import outcomes

@pytest.mark.llmopt(cache=["dynamic", "static"], reference={"cache": "dynamic"})
def test_passes(llmopt_case):
    llmopt_case.record(acceptance_rate=0.75, max_delta_logit=1.5e-5)

@pytest.mark.llmopt(attention=["eager", "sdpa:flash"])
def test_fails(llmopt_case):
    llmopt_case.record(recompiles=3)
    pytest.fail("generations differ beyond a near-tie", pytrace=False)

@pytest.mark.llmopt()
def test_unsupported(llmopt_case):
    outcomes.unsupported("unsupported by the model: TinyForCausalLM does not declare _supports_x")

@pytest.mark.llmopt()
def test_prose_is_not_parsed(llmopt_case):
    pytest.skip("unsupported by the model, says a plain skip")

@pytest.mark.llmopt()
@pytest.mark.parametrize("kind", ["a", "b"])
def test_inconclusive(llmopt_case, kind):
    outcomes.inconclusive("inconclusive: nothing to compare")

@pytest.mark.llmopt()
def test_not_exercised(llmopt_case):
    llmopt_case.record(draft_tokens=12, accepted_tokens=0)
    outcomes.not_exercised("prompt lookup: 0 of 12 draft tokens accepted")

def test_not_a_suite_test():
    pass
"""


@pytest.fixture
def suite(pytester: pytest.Pytester, clean_env: pytest.MonkeyPatch) -> pytest.Pytester:
    pytester.makepyfile(test_optim=SUITE)
    return pytester


def _results(path: Path) -> dict[str, Result]:
    results, _ = load(path)
    return {r.key: r for r in results}


def test_json_report_records_status_reason_and_figures(suite: pytest.Pytester) -> None:
    result = suite.runpytest("--llmopt-report=out/r.json")
    result.assert_outcomes(passed=3, failed=1, skipped=6)
    result.stdout.fnmatch_lines(["*llmopt: model x optimization*", "tiny-llama  optim          FAIL 2/3 *1 not exercised*", "report written to *r.json"])
    found = _results(suite.path / "out" / "r.json")
    assert found["optim::test_passes[static/sdpa/fp32@tiny-llama]"].status == "passed"
    assert found["optim::test_passes[static/sdpa/fp32@tiny-llama]"].metrics == {"acceptance_rate": 0.75, "max_delta_logit": 1.5e-5}
    failed = found["optim::test_fails[dynamic/eager/fp32@tiny-llama]"]
    assert failed.status == "failed" and failed.reason == "generations differ beyond a near-tie" and failed.metrics == {"recompiles": 3}
    skipped = found["optim::test_fails[dynamic/sdpa:flash/fp32@tiny-llama]"]
    assert skipped.status == "skipped" and skipped.reason.startswith("needs CUDA")
    assert found["optim::test_unsupported[dynamic/sdpa/fp32@tiny-llama]"].status == "unsupported"
    assert found["optim::test_inconclusive[dynamic/sdpa/fp32@tiny-llama-b]"].status == Status.INCONCLUSIVE
    # Only the outcomes helpers say "unsupported": a plain skip is "not run", whatever its words.
    assert found["optim::test_prose_is_not_parsed[dynamic/sdpa/fp32@tiny-llama]"].status == Status.NOT_RUN
    exercised = found["optim::test_not_exercised[dynamic/sdpa/fp32@tiny-llama]"]
    assert exercised.status == Status.NOT_EXERCISED and exercised.metrics == {"draft_tokens": 12, "accepted_tokens": 0}
    assert len(found) == 9  # the plain test is not an llmopt check
    doc = json.loads((suite.path / "out" / "r.json").read_text())
    assert doc["environment"]["versions"]["transformers"] and doc["environment"]["device"] == "cpu"
    assert doc["summary"]["failed"] == 1 and doc["summary"]["passed"] == 2


def _comparable(path: Path) -> list[tuple]:
    results, _ = load(path)
    return [(r.key, r.status, r.reason, sorted(r.metrics.items())) for r in results]


def test_xdist_gives_the_same_report_as_a_serial_run(suite: pytest.Pytester) -> None:
    suite.runpytest("--llmopt-report=serial.json")
    parallel = suite.runpytest_subprocess("-n", "2", "--llmopt-report=parallel.json", "-p", "xdist")
    parallel.assert_outcomes(passed=3, failed=1, skipped=6)
    assert _comparable(suite.path / "serial.json") == _comparable(suite.path / "parallel.json")


def test_markdown_and_html_reports(suite: pytest.Pytester) -> None:
    suite.runpytest("--llmopt-report=r.md")
    text = (suite.path / "r.md").read_text()
    assert "| model | optim |" in text and "| **tiny-llama** | ❌ 2/3" in text
    assert "### ❌ Failures (1)" in text and "generations differ beyond a near-tie" in text
    assert "⚪ Unsupported (1)" in text and "does not declare _supports_x" in text
    suite.runpytest("--llmopt-report=r.html")
    page = (suite.path / "r.html").read_text()
    assert "<td class='cell fail'" in page and "generations differ beyond a near-tie" in page


def _result(status: str = "passed", **metrics: float) -> Result:
    return Result("speculative", "test_x", "m", "dynamic/sdpa/bf16", status, metrics=dict(metrics))


def _timed(value: float, se: float, band: str = "gpu") -> Result:
    import math

    interval = {"log": math.log(value), "se": se, "low": value * math.exp(-2 * se), "high": value * math.exp(2 * se), "band": band}
    return _result(decode_speedup=value, intervals={"decode_speedup": interval})  # type: ignore[arg-type]


def test_compare_shows_a_changed_timed_figure_with_both_intervals() -> None:
    changes, _ = compare([_timed(4.0, 0.005)], [_timed(3.6, 0.005)])
    (change,) = changes
    assert change.base == "4.00x [3.96x, 4.04x]" and change.candidate == "3.60x [3.56x, 3.64x]"
    assert change.note.startswith("regression: -10.0% [") and "(band gpu)" in change.note


@pytest.mark.parametrize(
    ("base", "candidate", "kind"),
    [
        (_result(), _result("failed"), "regression"),
        (_result(), _result("unsupported"), "regression"),
        (_result("failed"), _result(), "improvement"),
        (_result(), _result("skipped"), "change"),
        (_result(), _result("not-exercised"), "regression"),
        (_result(acceptance_rate=0.90), _result(acceptance_rate=0.85), "regression"),
        (_result(acceptance_rate=0.90), _result(acceptance_rate=0.89), None),
        (_result(speedup=4.0), _result(speedup=3.6), "change"),  # no intervals: undecided within a one-session band (10 %)
        (_result(speedup=4.0), _result(speedup=2.0), "regression"),
        (_timed(4.0, 0.005), _timed(3.6, 0.005), "regression"),  # with intervals: 10 % slower, both tight
        (_timed(4.0, 0.005), _timed(3.6, 0.2), "change"),  # a noisy candidate: inconclusive, shown, not failing
        (_timed(4.0, 0.005), _timed(3.96, 0.005), None),
        (_result(peak_memory_bytes=100), _result(peak_memory_bytes=110), "regression"),
        (_result(peak_memory_bytes=100), _result(peak_memory_bytes=80), "improvement"),
        (_result(recompiles=0), _result(recompiles=1), "regression"),
        (_result(max_delta_logit=1e-5), _result(max_delta_logit=2e-5), None),
    ],
)
def test_compare_classifies_changes(base, candidate, kind):
    changes, unchanged = compare([base], [candidate])
    assert [c.kind for c in changes] == ([kind] if kind else [])
    assert unchanged == (0 if kind else 1)


def test_compare_flags_a_missing_check():
    changes, _ = compare([_result()], [])
    assert changes[0].kind == "regression" and "missing" in changes[0].note


def _write(path: Path, results: list[Result]) -> Path:
    from pytest_llmopt.wiring.report import to_document

    path.write_text(json.dumps(to_document(results, {"versions": {"transformers": "x"}, "device": "cpu"})))
    return path


def test_cli_exit_status_and_table(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    fixed = Result("attention", "test_z", "m", "v", "failed", reason="old bug")
    base = _write(tmp_path / "a.json", [_result(acceptance_rate=0.9), Result("attention", "test_y", "m", "v", "passed"), fixed])
    same = _write(tmp_path / "b.json", [_result(acceptance_rate=0.9), Result("attention", "test_y", "m", "v", "passed"), fixed])
    worse = _write(
        tmp_path / "c.json",
        [_result(acceptance_rate=0.5), Result("attention", "test_y", "m", "v", "failed", reason="boom"), Result("attention", "test_z", "m", "v", "passed")],
    )
    assert main(["compare", str(base), str(same)]) == 0
    assert "PASS" in capsys.readouterr().out
    summary = tmp_path / "summary.md"
    assert main(["compare", str(base), str(worse), "-o", str(summary)]) == 1
    out = capsys.readouterr().out
    rows = [line.split(" | ")[0] for line in out.splitlines() if line.startswith(("| ❌", "| ✅", "| ·"))]
    assert rows == ["| ❌ regression", "| ❌ regression", "| ✅ improvement"]  # regressions first
    assert "new failure" in out and "acceptance_rate" in out and "now passes" in out
    assert summary.read_text() == out


@pytest.mark.parametrize(("content", "message"), [(None, "no such file"), ("{", "not JSON"), ('{"schema": 9}', "not a pytest-llmopt JSON report")])
def test_cli_bad_report_is_one_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str], content, message) -> None:
    good = _write(tmp_path / "good.json", [_result()])
    bad = tmp_path / "bad.json"
    if content is not None:
        bad.write_text(content)
    assert main(["compare", str(bad), str(good)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"llmopt: {bad}: {message}") and err.count("\n") == 1


def test_report_merges_runs_of_several_models(tmp_path: Path) -> None:
    a = _write(tmp_path / "a.json", [Result("static_cache", "test_x", "model-a", "static/sdpa/fp32", "passed")])
    b = _write(tmp_path / "b.json", [Result("static_cache", "test_x", "model-b", "static/sdpa/fp32", "failed", reason="r")])
    assert main(["report", str(a), str(b), "-o", str(tmp_path / "compat.md")]) == 0
    text = (tmp_path / "compat.md").read_text()
    assert "| **model-a** | ✅ 1/1 |" in text and "| **model-b** | ❌ 0/1 |" in text


def test_markdown_fits_a_pr_comment():
    results = [Result("attention", f"test_{i}", f"m{i % 7}", "dynamic/sdpa/bf16", "passed", metrics={"max_delta_logit": 0.1}) for i in range(3000)]
    assert len(markdown(results, [{}])) < 65_000  # GitHub's comment limit is 65,536 characters


def test_reports_keep_their_status_strings(tmp_path: Path) -> None:
    """Status is a str-valued enum: JSON holds the same strings as before it existed, and reports
    written then still load; an unknown status is one clear error."""
    path = _write(tmp_path / "r.json", [_result("known-issue"), _result("skipped")])
    assert [r["status"] for r in json.loads(path.read_text())["results"]] == ["known-issue", "skipped"]
    assert [r.status for r in load(path)[0]] == [Status.KNOWN_ISSUE, Status.NOT_RUN]
    doc = json.loads(path.read_text())
    doc["results"][0]["status"] = "exploded"
    path.write_text(json.dumps(doc))
    with pytest.raises(ReportError, match="unknown status 'exploded'"):
        load(path)


def test_compare_needs_neither_pytest_nor_torch(tmp_path: Path) -> None:
    """The tox gate env installs the package with --no-deps: `llmopt compare` must import nothing else."""
    import subprocess
    import sys

    from conftest import ROOT

    report = _write(tmp_path / "r.json", [_result()])
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('pytest', '_pytest', 'pluggy', 'torch', 'transformers', 'packaging'):\n"
        "            raise ImportError('blocked ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "from pytest_llmopt.cli import main\n"
        f"sys.exit(main(['compare', {str(report)!r}, {str(report)!r}]))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "## llmopt compare: PASS" in done.stdout


def test_two_models_of_one_name_are_never_compared_or_merged(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Two checkpoints called "final" with different configs: their reports say so (model_keys) and the gate
    refuses to compare or merge them, with one line naming both."""
    from pytest_llmopt.wiring.report import to_document

    def report(path: Path, key: str) -> Path:
        env = {"versions": {"transformers": "x"}, "device": "cpu", "model_keys": {"final": key}}
        path.write_text(json.dumps(to_document([Result("static_cache", "test_x", "final", "static/sdpa/fp32", "passed")], env)))
        return path

    a, b, a2 = report(tmp_path / "a.json", "final-1111aaaa"), report(tmp_path / "b.json", "final-2222bbbb"), report(tmp_path / "a2.json", "final-1111aaaa")
    assert main(["compare", str(a), str(a2)]) == 0
    capsys.readouterr()
    for command in (["compare", str(a), str(b)], ["report", str(a), str(b), "-o", str(tmp_path / "m.md")]):
        assert main(command) == 2
        err = capsys.readouterr().err
        assert err == f"llmopt: {a} and {b} name different models 'final' (final-1111aaaa and final-2222bbbb: their configs differ); not one model\n"
