"""A pytest plugin that slows generate() on purpose, to show the speed verdicts catching it on a real GPU.

    PYTHONPATH=scripts:$PYTHONPATH LLMOPT_PERF_FAULT=compile-off pytest suites/test_performance.py -p perf_fault_plugin ...

LLMOPT_PERF_FAULT (one fault; ``@TEXT`` limits it to the campaign paths whose key holds TEXT, e.g.
``@[static+compile/``; without it every path, the plain reference included, is slowed):
  compile-off            generate()'s auto-compile criteria answer no: a static cache decodes eagerly, silently.
  decode-delay:MS[@TEXT] MS milliseconds of host time before every forward (prepare_inputs_for_generation, never
                         compiled), as a slow Python-side change in a release would.
  gpu-delay:US[@TEXT]    a spin kernel of US microseconds on the stream after every step's forward (in the logits
                         processors' call, outside any CUDA graph): more GPU work per token, the host untouched.
  gpu-work:PCT[@TEXT]    the same, sized per path to PCT % of that path's gpu_ms_per_token in the baseline file
                         LLMOPT_PERF_FAULT_BASELINE (a kernel made PCT % longer, in effect).
"""

from __future__ import annotations

import functools
import json
import os
import time
from typing import Any

import pytest


def pytest_configure(config: pytest.Config) -> None:
    fault = os.environ.get("LLMOPT_PERF_FAULT", "")
    if not fault:
        return
    from transformers.generation.utils import GenerationMixin

    kind, _, rest = fault.partition(":")
    amount, _, where = rest.partition("@")
    if kind == "compile-off":
        GenerationMixin._valid_auto_compile_criteria = lambda self, *args, **kwargs: False  # type: ignore[method-assign]
    elif kind == "decode-delay":
        seconds = float(amount or 5) / 1000.0
        original = GenerationMixin.prepare_inputs_for_generation

        @functools.wraps(original)
        def slow(self: Any, *args: Any, **kwargs: Any) -> Any:
            if _applies(where):
                time.sleep(seconds)
            return original(self, *args, **kwargs)

        GenerationMixin.prepare_inputs_for_generation = slow  # type: ignore[method-assign]
    elif kind in ("gpu-delay", "gpu-work"):
        per_path = _gpu_work(float(amount)) if kind == "gpu-work" else None
        _spin_after_each_step(float(amount) if per_path is None else 0.0, per_path, where)
    else:
        raise pytest.UsageError(f"LLMOPT_PERF_FAULT={fault!r}: expected compile-off, decode-delay:MS, gpu-delay:US or gpu-work:PCT (each with @TEXT optional)")


def _applies(where: str) -> bool:
    from pytest_llmopt.running.campaign import CURRENT

    return not where or where in (CURRENT.get() or "")


def _gpu_work(percent: float) -> dict[str, float]:
    """Microseconds per step for each path: ``percent`` of its pooled gpu_ms_per_token in the baseline file."""
    path = os.environ.get("LLMOPT_PERF_FAULT_BASELINE")
    if not path:
        raise pytest.UsageError("LLMOPT_PERF_FAULT=gpu-work:PCT needs LLMOPT_PERF_FAULT_BASELINE=<baseline file of the model>")
    with open(path, encoding="utf-8") as handle:
        doc = json.load(handle)
    out = {}
    for check, figures in doc["checks"].items():
        sessions = figures.get("gpu_ms_per_token", {}).get("sessions")
        if sessions:
            ms = sum(s["value"] for s in sessions) / len(sessions)
            out[check] = ms * 1000.0 * percent / 100.0
    return out


def _spin_after_each_step(us: float, per_path: dict[str, float] | None, where: str) -> None:
    import torch
    from transformers import LogitsProcessorList

    from pytest_llmopt.running.campaign import CURRENT

    cycles_per_us = _calibrate()
    original = LogitsProcessorList.__call__

    @functools.wraps(original)
    def call(self: Any, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
        key = CURRENT.get() or ""
        if _applies(where):
            if per_path is not None:  # the reference's own check is stored under its check key
                wanted = per_path.get(key) or per_path.get(key.replace("reference[", "performance::test_generate_speed[")) or 0.0
            else:
                wanted = us
            if wanted > 0:
                torch.cuda._sleep(int(wanted * cycles_per_us))
        return original(self, input_ids, scores, **kwargs)

    LogitsProcessorList.__call__ = call  # type: ignore[method-assign]


def _calibrate() -> float:
    """Spin-kernel cycles per microsecond on this card (its clock), from one 2 ms spin timed with CUDA events."""
    import torch

    torch.cuda._sleep(1_000_000)  # wake the clock up
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    cycles = 4_000_000
    start.record()
    torch.cuda._sleep(cycles)
    end.record()
    end.synchronize()
    return cycles / (start.elapsed_time(end) * 1000.0)
