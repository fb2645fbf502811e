"""The product as a user gets it: the built wheel, installed (not editable) into a fresh virtual
environment, runs its suites from an empty directory with the documented command."""

from __future__ import annotations

import json
import os
import re
import shutil
import site
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT

# A quick check of each suite but compile (its first compiled call alone takes a minute on a CPU): the
# full `pytest suites` runs in CI from the clone.
SUBSET = "test_matches_dynamic or test_logits_match_eager or test_self_draft_is_always_accepted or test_greedy_matches_plain_greedy"
# The wheel must ship every suite of the checkout; the quick run covers those with a check in SUBSET.
SUITE_FILES = sorted(p.name for p in (ROOT / "suites").glob("test_*.py"))
EXPECTED_SUITES = {"static_cache", "attention", "speculative", "prompt_lookup"}


def _run(args: list[str], cwd: Path, env: dict[str, str] | None = None, timeout: int = 600) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{' '.join(args)} exited {done.returncode}\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
    return done


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv with the wheel installed; it sees this environment's torch and transformers through
    a .pth file (so nothing is downloaded), after its own site-packages (so the wheel wins)."""
    tmp = tmp_path_factory.mktemp("wheel")
    source = tmp / "source"  # build from a copy: no build/ or egg-info in the checkout
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    for name in ("pytest_llmopt", "suites"):
        shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(tmp / "dist"), str(source)], tmp)
    (wheel,) = (tmp / "dist").glob("pytest_llmopt-*.whl")
    venv = tmp / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], tmp)
    python = venv / "bin" / "python"
    purelib = _run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], tmp).stdout.strip()
    Path(purelib, "outer-environment.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    # --ignore-installed: the outer environment's pytest-llmopt (an editable install, same version) is
    # visible through the .pth file, and pip would call the wheel "already satisfied".
    _run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps", "--ignore-installed", str(wheel)], tmp)
    return python


def test_wheel_holds_the_suites_and_the_type_marker(installed: Path) -> None:
    code = (
        "import pytest_llmopt, pytest_llmopt.suites as s, pathlib; p = pathlib.Path(s.__file__).parent; print(pytest_llmopt.__file__); "
        "print(sorted(x.name for x in p.glob('test_*.py'))); print((p.parent / 'py.typed').is_file())"
    )
    out = _run([str(installed), "-c", code], installed.parent, env=_clean_env()).stdout.splitlines()
    assert out[0].startswith(str(installed.parent.parent)), f"imported {out[0]}, not the installed wheel"
    assert out[1] == str(SUITE_FILES)
    assert out[2] == "True"


def test_installed_suites_run_from_an_empty_directory(installed: Path, tmp_path: Path) -> None:
    empty = tmp_path / "project"
    empty.mkdir()
    done = _run(
        [str(installed), "-m", "pytest", "--pyargs", "pytest_llmopt.suites", "-p", "no:cacheprovider", "-q", "-k", SUBSET, "--llmopt-report=r.json"],
        empty,
        env=_clean_env(),
    )
    assert "passed" in done.stdout and not re.search(r"\b\d+ failed", done.stdout), done.stdout[-3000:]
    results = json.loads((empty / "r.json").read_text())["results"]
    assert {r["suite"] for r in results} == EXPECTED_SUITES
    assert not [r for r in results if r["status"] == "failed"]
    passed = {r["suite"] for r in results if r["status"] == "passed"}
    assert passed == EXPECTED_SUITES, [(r["check"], r["variant"], r["status"], r["reason"]) for r in results]
    # What did not pass on this CPU needs a GPU, or is a known upstream issue (compat.KNOWN_ISSUES).
    others = [(r["check"], r["variant"], r["status"], r["reason"]) for r in results if r["status"] != "passed"]
    assert [o for o in others if not (o[2].startswith("known-issue") or o[3].startswith("needs "))] == []
    assert {r["model"] for r in results} == {"tiny-llama"}


def test_llmopt_run_is_the_same_command(installed: Path, tmp_path: Path) -> None:
    done = _run([str(installed.parent / "llmopt"), "run", "--co", "-q", "-k", "test_matches_dynamic"], tmp_path, env=_clean_env())
    assert "test_static_cache.py::test_matches_dynamic[static/sdpa/fp32@tiny-llama]" in done.stdout


def _clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k != "PYTHONPATH" and not k.startswith(("LLMOPT_", "PYTEST_"))}
