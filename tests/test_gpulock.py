"""The device's timing lock between processes: a campaign (exclusive) waits for running tests (shared) to end, and
tests that start while it waits queue behind it (the turnstile), so it never starves."""

from __future__ import annotations

import multiprocessing
import time
import uuid
from pathlib import Path

import pytest

from pytest_llmopt.common.gpulock import DeviceLock

pytestmark = pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="needs fork (POSIX)")


def _shared(key: str, log: str, name: str, hold: float, start_after: float) -> None:
    time.sleep(start_after)
    lock = DeviceLock(key)
    with lock.shared():
        _log(log, f"{name} in")
        time.sleep(hold)
        _log(log, f"{name} out")


def _exclusive(key: str, log: str, start_after: float) -> None:
    time.sleep(start_after)
    lock = DeviceLock(key)
    with lock.shared(), lock.exclusive():  # a speed test holds its share first: the campaign gives it up meanwhile
        _log(log, "campaign in")
        time.sleep(0.3)
        _log(log, "campaign out")


def _log(path: str, line: str) -> None:
    with open(path, "a") as handle:
        handle.write(line + "\n")


def test_a_campaign_waits_for_running_tests_and_later_tests_wait_for_it(tmp_path: Path) -> None:
    key = f"test-{uuid.uuid4().hex}"
    log = str(tmp_path / "log")
    ctx = multiprocessing.get_context("fork")
    procs = [
        ctx.Process(target=_shared, args=(key, log, "early", 0.6, 0.0)),  # running when the campaign asks
        ctx.Process(target=_exclusive, args=(key, log, 0.2)),
        ctx.Process(target=_shared, args=(key, log, "late", 0.1, 0.4)),  # starts while the campaign waits
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(10)
        assert p.exitcode == 0
    order = Path(log).read_text().split("\n")[:-1]
    assert order == ["early in", "early out", "campaign in", "campaign out", "late in", "late out"]


def test_the_lock_is_reentrant_within_a_test_and_says_how_long_it_waited() -> None:
    lock = DeviceLock(f"test-{uuid.uuid4().hex}")
    with lock.shared(), lock.shared(), lock.exclusive() as waited:
        assert waited < 1.0
    assert lock.waited_s < 1.0
