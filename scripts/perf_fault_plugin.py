"""A pytest plugin that slows generate() on purpose, to show the baseline check failing on a real GPU.

    PYTHONPATH=scripts:$PYTHONPATH LLMOPT_PERF_FAULT=compile-off pytest suites/test_performance.py -p perf_fault_plugin ...
    LLMOPT_PERF_FAULT=decode-delay:5   (5 ms of host time in every decoding step, outside the compiled region)

compile-off: generate()'s auto-compile criteria answer no, so a static cache decodes eagerly, silently.
decode-delay: prepare_inputs_for_generation (run by generate() before each forward, never compiled)
sleeps, as a slow Python-side change in a release would.
"""

from __future__ import annotations

import functools
import os
import time
from typing import Any

import pytest


def pytest_configure(config: pytest.Config) -> None:
    fault = os.environ.get("LLMOPT_PERF_FAULT", "")
    from transformers.generation.utils import GenerationMixin

    if fault == "compile-off":
        GenerationMixin._valid_auto_compile_criteria = lambda self, *args, **kwargs: False  # type: ignore[method-assign]
    elif fault.startswith("decode-delay"):
        seconds = float(fault.partition(":")[2] or 5) / 1000.0
        original = GenerationMixin.prepare_inputs_for_generation

        @functools.wraps(original)
        def slow(self: Any, *args: Any, **kwargs: Any) -> Any:
            time.sleep(seconds)
            return original(self, *args, **kwargs)

        GenerationMixin.prepare_inputs_for_generation = slow  # type: ignore[method-assign]
    elif fault:
        raise pytest.UsageError(f"LLMOPT_PERF_FAULT={fault!r}: expected compile-off or decode-delay[:MS]")
