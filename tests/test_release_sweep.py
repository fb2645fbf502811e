"""The release sweep's write-up (scripts/release_sweep.py): its section per release and its place in the write-up."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from conftest import ROOT
from pytest_llmopt.wiring.report import Result

_spec = importlib.util.spec_from_file_location("release_sweep", ROOT / "scripts" / "release_sweep.py")
assert _spec is not None and _spec.loader is not None
sweep = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(sweep)


def _result(check: str, status: str, model: str = "tiny-llama", issues: tuple[str, ...] = (), reason: str | None = None) -> Result:
    return Result(suite="speculative", check=check, model=model, variant="dynamic/sdpa/fp32", status=status, reason=reason, known_issues=list(issues))  # type: ignore[arg-type]


def test_the_section_counts_per_architecture_and_names_failures_issues_and_xpass() -> None:
    results = [
        _result("test_a", "passed"),
        _result("test_b", "failed", reason="RuntimeError: boom"),
        _result("test_c", "known-issue", issues=("universal-draft-cache-rolled-back-by-target-length",)),
        _result("test_d", "known-issue-passed", model="tiny-qwen2", issues=("torch-flex-attention-cpu-codegen",)),
    ]
    baseline = [_result("test_a", "passed"), _result("test_b", "passed")]
    text = sweep.section("9.9.9", results, {"versions": {"torch": "2.13.0"}, "dtype": "float32", "device": "cpu"}, None, baseline, "transformers 9.9.8", "cmd")
    assert "| tiny-llama | 1 | 1 | 1 | 0 | 0 | 0 | 0 | 0 |" in text
    assert "| tiny-qwen2 | 0 | 0 | 0 | 1 | 0 | 0 | 0 | 0 |" in text
    assert "`speculative::test_b[dynamic/sdpa/fp32@tiny-llama]`: RuntimeError: boom" in text
    assert "`universal-draft-cache-rolled-back-by-target-length` (1): tiny-llama speculative::test_c[dynamic/sdpa/fp32]" in text
    assert "XPASS)** (1):" in text and "`torch-flex-attention-cpu-codegen` (1): tiny-qwen2 speculative::test_d" in text
    assert "**New against transformers 9.9.8**: failures: `speculative::test_b[dynamic/sdpa/fp32@tiny-llama]`; known issues: `universal-draft-cache-rolled-back-by-target-length`" in text


def test_a_section_replaces_the_earlier_one_of_its_release(tmp_path: Path) -> None:
    doc = tmp_path / "releases.md"
    doc.write_text("# releases\n")
    sweep.write("9.9.9", "first\n", doc)
    sweep.write("9.9.8", "other\n", doc)
    sweep.write("9.9.9", "second\n", doc)
    text = doc.read_text()
    assert "first" not in text and text.count("second") == 1 and "other" in text
    assert text.index("second") < text.index("other")  # in place, not appended again
