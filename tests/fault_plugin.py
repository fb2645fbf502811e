"""Inject one fault of faults.py into a whole pytest run, e.g. on a GPU machine:

    LLMOPT_INJECT_FAULT=sdpa_scale_off PYTHONPATH=tests pytest suites/test_attention.py -p fault_plugin ...

so that the proof of power (tests/test_faults.py, CPU) can be repeated on any model, dtype and device.
"""

from __future__ import annotations

import os

import faults
import pytest


def pytest_configure(config: pytest.Config) -> None:
    name = os.environ.get("LLMOPT_INJECT_FAULT")
    if not name:
        return
    inject = getattr(faults, name, None)
    if inject is None:
        raise pytest.UsageError(f"LLMOPT_INJECT_FAULT={name}: no such fault in tests/faults.py")
    patch = pytest.MonkeyPatch()
    inject(patch)
    config.add_cleanup(patch.undo)
