"""One real A/B run on CPU between two transformers releases: tox builds both stacks, runs the suites on
the built-in model under each, and `llmopt compare` judges (tox.ini's current, candidate and gate envs)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from conftest import ROOT


@pytest.mark.skipif(shutil.which("tox") is None and subprocess.run([sys.executable, "-m", "tox", "--version"], capture_output=True).returncode != 0, reason="needs tox: pip install -e '.[test]'")
def test_upgrade_gate_between_two_transformers_releases() -> None:
    reports = ROOT / "reports"
    for name in ("current.json", "candidate.json", "gate.md"):
        (reports / name).unlink(missing_ok=True)
    run = subprocess.run(
        [sys.executable, "-m", "tox", "-e", "current,candidate,gate", "--", "-n", "2"], cwd=ROOT, capture_output=True, text=True, timeout=2700
    )
    log = run.stdout[-6000:] + run.stderr[-2000:]
    current = json.loads((reports / "current.json").read_text())
    candidate = json.loads((reports / "candidate.json").read_text())
    old, new = current["environment"]["versions"]["transformers"], candidate["environment"]["versions"]["transformers"]
    assert old.startswith("4.46") and new.split(".")[0] == "5", (old, new)
    assert current["results"] and candidate["results"]
    # Features the old release lacks are reported unsupported there, not failed.
    old_status = {(r["check"], r["variant"]): r["status"] for r in current["results"]}
    assert old_status[("test_auto_compile_matches_eager", "static+compile/sdpa/fp32")] == "unsupported"
    assert old_status[("test_early_exit_self_speculation", "dynamic/sdpa/fp32")] == "unsupported"
    gate = (reports / "gate.md").read_text()
    regressions = sum(1 for line in gate.splitlines() if line.startswith("| ❌ regression"))
    assert ("## llmopt compare: FAIL" in gate) == (regressions > 0)
    assert (run.returncode != 0) == (regressions > 0), log
    assert "check(s) unchanged" in gate
