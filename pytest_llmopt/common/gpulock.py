"""One timing lock per device, so that nothing else of the plugin runs on a device while a speed campaign times
it (pytest-xdist workers are separate processes; pytest-benchmark disables itself under xdist for this reason).

Every llmopt test holds the device's lock shared for its whole run; a speed campaign (and the session's noise
calibration) holds it exclusive. A turnstile keeps a campaign from waiting forever behind a stream of shared
takers: a shared taker passes through the turnstile before taking its share, and an exclusive taker holds the
turnstile while it waits, so new tests queue behind it. Locks are fcntl locks on files in the temporary folder
(released by the kernel if a worker dies); where fcntl does not exist (Windows) the lock does nothing. ``file_lock``
is the same kind of lock around one file's read-modify-write (baselines, GGUF conversions).
"""

from __future__ import annotations

import contextlib
import re
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from .phases import phase


def lock_path(device_key: str, kind: str = "lock") -> Path:
    safe = re.sub(r"[^A-Za-z0-9_.-]", "-", device_key)
    return Path(tempfile.gettempdir()) / f"llmopt-device-{safe}.{kind}"


class DeviceLock:
    """The shared/exclusive lock of one device for this process. ``waited_s`` adds up the time spent waiting."""

    def __init__(self, device_key: str) -> None:
        self.device_key = device_key
        self._shared: IO[Any] | None = None
        self._depth = 0
        self.waited_s = 0.0

    @contextlib.contextmanager
    def shared(self) -> Iterator[None]:
        """Held around an ordinary test; re-entrant within the process."""
        if self._depth:
            self._depth += 1
            try:
                yield
            finally:
                self._depth -= 1
            return
        fcntl = _fcntl()
        start = time.perf_counter()
        if fcntl is not None:
            with phase("wait"), open(lock_path(self.device_key, "turnstile"), "a") as turnstile:
                fcntl.flock(turnstile, fcntl.LOCK_EX)
                fcntl.flock(turnstile, fcntl.LOCK_UN)
                self._shared = open(lock_path(self.device_key), "a")  # noqa: SIM115 - held across the yield
                fcntl.flock(self._shared, fcntl.LOCK_SH)
        self.waited_s += time.perf_counter() - start
        self._depth = 1
        try:
            yield
        finally:
            self._depth = 0
            if self._shared is not None:
                self._shared.close()  # closing releases the lock
                self._shared = None

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[float]:
        """Held while timing. A share this process holds is given up for the while (flock would otherwise wait
        on itself) and taken again after. Yields the seconds waited."""
        fcntl = _fcntl()
        if fcntl is None:
            yield 0.0
            return
        had_share = self._shared is not None
        if had_share:
            self._shared.close()  # type: ignore[union-attr]
            self._shared = None
        start = time.perf_counter()
        with open(lock_path(self.device_key, "turnstile"), "a") as turnstile, open(lock_path(self.device_key), "a") as main:
            with phase("wait"):
                fcntl.flock(turnstile, fcntl.LOCK_EX)
            try:
                with phase("wait"):
                    fcntl.flock(main, fcntl.LOCK_EX)
                waited = time.perf_counter() - start
                self.waited_s += waited
                try:
                    yield waited
                finally:
                    fcntl.flock(main, fcntl.LOCK_UN)
            finally:
                fcntl.flock(turnstile, fcntl.LOCK_UN)
        if had_share:
            self._shared = open(lock_path(self.device_key), "a")  # noqa: SIM115
            fcntl.flock(self._shared, fcntl.LOCK_SH)


@contextlib.contextmanager
def file_lock(path: Path, purpose: str) -> Iterator[None]:
    """Serialize work on one file or folder between processes (pytest-xdist workers and their controller): an
    exclusive lock in the temporary folder (nothing to ignore beside ``path``), keyed by ``purpose`` and the path."""
    fcntl = _fcntl()
    if fcntl is None:  # pragma: no cover - Windows: one process at a time
        yield
        return
    import hashlib

    digest = hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:16]
    with open(Path(tempfile.gettempdir()) / f"llmopt-{purpose}-{digest}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _fcntl() -> Any:
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        return None
    return fcntl


def device_key(device: str) -> str:
    """A key naming the physical device: the GPU's UUID where torch tells it (two processes that see the same
    card under different indices share it), else the device string ("cpu": the CPU is the device)."""
    if not device.startswith("cuda"):
        return "cpu"
    try:
        import torch

        index = torch.device(device).index or 0
        uuid = getattr(torch.cuda.get_device_properties(index), "uuid", None)
        return f"cuda-{uuid}" if uuid else f"cuda-{index}"
    except Exception:
        return device.replace(":", "-")
