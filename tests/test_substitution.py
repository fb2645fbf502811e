"""A path transformers silently swapped for another is never reported passed: generate() asked for a static cache
that runs a dynamic one is "unsupported", in transformers' words where it said any (instrumentation.cache_substitution)."""

from __future__ import annotations

from types import SimpleNamespace

import faults
import pytest
from transformers import DynamicCache, StaticCache

from conftest import SUITES
from pytest_llmopt.running import instrumentation
from pytest_llmopt.running.zoo import builtin_config


def _static() -> StaticCache:
    from pytest_llmopt.running import compat

    model = SimpleNamespace(config=builtin_config("tiny-llama"), device="cpu", dtype=None)
    return compat.make_static_cache(model, 1, 8)


def test_the_cache_that_ran_is_read_from_what_generate_returns(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(instrumentation, "_SAID", [])
    static, dynamic = _static(), DynamicCache()
    assert instrumentation.cache_substitution("static", None, SimpleNamespace(cache=static), []) is None
    assert instrumentation.cache_substitution("dynamic", None, SimpleNamespace(cache=dynamic), []) is None
    assert instrumentation.cache_substitution("static-object", static, SimpleNamespace(past_key_values=static), []) is None
    said = ["An assistant model is provided, using a dynamic cache instead of a cache of type='static'."]
    why = instrumentation.cache_substitution("static", None, SimpleNamespace(cache=dynamic), said)
    assert why == f"asked for a static cache, generate() ran a DynamicCache; transformers says: {said[0]}"
    # transformers says it once per process (warning_once): a later call still cites it
    assert instrumentation.cache_substitution("static", None, SimpleNamespace(cache=dynamic), []) == why
    other = _static()
    assert "asked for the StaticCache object it was given, generate() ran a StaticCache" in str(
        instrumentation.cache_substitution("static-object", static, SimpleNamespace(cache=other), [])
    )
    assert instrumentation.cache_substitution("static", None, SimpleNamespace(cache=None), []) is None


SELECT = ("-k", "test_matches_dynamic and static and not object", "-p", "no:cacheprovider", "-rs")


def test_a_static_cache_swapped_for_a_dynamic_one_is_unsupported(pytester: pytest.Pytester, clean_env: pytest.MonkeyPatch) -> None:
    faults.static_cache_silently_dynamic(clean_env)
    result = pytester.runpytest(str(SUITES / "test_static_cache.py"), *SELECT)
    outcomes = result.parseoutcomes()
    assert outcomes.get("skipped", 0) >= 1 and not outcomes.get("passed") and not outcomes.get("failed"), result.stdout.str()[-3000:]
    result.stdout.fnmatch_lines(["*unsupported by transformers *: asked for a static cache, generate() ran a DynamicCache; transformers says: An assistant model is provided, using a dynamic cache instead of*"])


def test_the_same_selection_passes_on_a_real_static_cache(pytester: pytest.Pytester, clean_env: pytest.MonkeyPatch) -> None:
    result = pytester.runpytest(str(SUITES / "test_static_cache.py"), *SELECT)
    outcomes = result.parseoutcomes()
    assert outcomes.get("passed", 0) >= 1 and not outcomes.get("failed") and not outcomes.get("skipped"), result.stdout.str()[-3000:]
