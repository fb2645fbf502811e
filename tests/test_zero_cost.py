"""Installed but not asked for, the plugin costs nothing: no torch, no transformers, no hub, no probe."""

from __future__ import annotations

import json
import statistics
import time

import pytest

TRIVIAL = """
def test_one():
    assert 1 + 1 == 2
"""

# Writes what the session imported, at its very end (after every plugin hook of collection).
SPY = """
import json
import sys

def pytest_sessionfinish(session):
    heavy = sorted(m for m in ("torch", "transformers", "huggingface_hub", "tokenizers") if m in sys.modules)
    loaded = session.config.pluginmanager.has_plugin("llmopt")
    with open("modules.json", "w") as f:
        json.dump({"heavy": heavy, "llmopt_loaded": loaded}, f)
"""


@pytest.fixture
def trivial(pytester: pytest.Pytester, clean_env: pytest.MonkeyPatch) -> pytest.Pytester:
    pytester.makepyfile(test_trivial=TRIVIAL)
    pytester.makeconftest(SPY)
    return pytester


def _seen(pytester: pytest.Pytester) -> dict[str, object]:
    return json.loads((pytester.path / "modules.json").read_text())


def test_collect_only_on_a_trivial_project_imports_no_torch(trivial: pytest.Pytester) -> None:
    result = trivial.runpytest_subprocess("--co", "-q")
    result.stdout.fnmatch_lines(["test_trivial.py::test_one", "1 test collected*"])
    assert "llmopt:" not in result.stdout.str()
    assert _seen(trivial) == {"heavy": [], "llmopt_loaded": True}


def test_running_a_trivial_project_imports_no_torch(trivial: pytest.Pytester) -> None:
    result = trivial.runpytest_subprocess("-q")
    result.assert_outcomes(passed=1)
    assert _seen(trivial) == {"heavy": [], "llmopt_loaded": True}


def test_an_llmopt_option_builds_the_session(trivial: pytest.Pytester) -> None:
    """The control: asked for, the session is built at configure (header, torch imported)."""
    result = trivial.runpytest_subprocess("--co", "-q", "--llmopt-device=cpu")
    assert result.ret == 0
    assert "torch" in _seen(trivial)["heavy"]  # type: ignore[operator]


def test_an_llmopt_test_collected_builds_the_session(trivial: pytest.Pytester) -> None:
    """No option, but an llmopt test: the session is built on collection, and says so after it."""
    trivial.makepyfile(test_llm="import pytest\n\n@pytest.mark.llmopt()\ndef test_x(llmopt_case):\n    pass\n")
    result = trivial.runpytest_subprocess("--co")
    result.stdout.fnmatch_lines(["collected 2 items", "llmopt: models tiny-llama", "llmopt: device *"])
    assert "torch" in _seen(trivial)["heavy"]  # type: ignore[operator]


def test_collect_only_overhead(trivial: pytest.Pytester) -> None:
    """`pytest --co` with the plugin against `-p no:llmopt`: medians of 3 runs each (printed; the
    bound is generous, the point is that nothing heavy happens)."""

    def median_seconds(*args: str) -> float:
        times = []
        for _ in range(3):
            started = time.perf_counter()
            assert trivial.runpytest_subprocess("--co", "-q", *args).ret == 0
            times.append(time.perf_counter() - started)
        return statistics.median(times)

    without = median_seconds("-p", "no:llmopt")
    assert _seen(trivial)["llmopt_loaded"] is False
    with_plugin = median_seconds()
    print(f"pytest --co on a trivial project: {with_plugin:.3f} s with the plugin, {without:.3f} s without (+{with_plugin - without:.3f} s)")
    assert with_plugin - without < 1.0
