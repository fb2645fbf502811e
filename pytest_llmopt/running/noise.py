"""What the machine's noise is, measured, not assumed: a short calibration once per session and device (the host's
kernel-launch cost and its spread, the device's copy bandwidth, other processes on the GPU), the host class that
wall-time baselines are keyed by, and the noise class a session is reported in.

The A/A figure (the reference against its own twin in every round, campaign.Result.aa) is the noise that
matters for the paired figures; the calibration says why it is what it is (a slow or jittery host, someone
else on the card).
"""

from __future__ import annotations

import os
import platform
import shutil
import statistics
import subprocess
import time
from dataclasses import dataclass
from functools import cache
from typing import Any

# Noise classes of a session by the A/A noise of one call (relative sd): quiet sessions pin host-bound figures to a
# few percent, noisy ones to tens of percent; beyond, wall-time figures are reported, not judged.
QUIET = 0.03
NOISY = 0.15


@dataclass(frozen=True)
class Calibration:
    launch_us: float | None  # median host cost of one tiny kernel launch (CUDA), or of a tiny op (CPU)
    launch_cv: float | None  # its coefficient of variation over the probe's repeats
    bandwidth_gbps: float | None  # device-to-device copy bandwidth (CUDA)
    others: tuple[str, ...]  # other processes using the GPU (pid:name), from nvidia-smi
    host: str

    def line(self) -> str:
        parts = [f"host {self.host}"]
        if self.launch_us is not None:
            parts.append(f"launch {self.launch_us:.2f} us (cv {self.launch_cv:.1%})")
        if self.bandwidth_gbps is not None:
            parts.append(f"copy bandwidth {self.bandwidth_gbps:.0f} GB/s")
        parts.append(f"other processes on the GPU: {', '.join(self.others)}" if self.others else "no other process on the GPU")
        return "; ".join(parts)


def calibrate(device: Any) -> Calibration:
    """About a second: 21 probes of 2,000 tiny launches (or ops), the copy bandwidth, nvidia-smi's process list."""
    import torch

    cuda = getattr(device, "type", str(device)) == "cuda"
    x = torch.zeros(1, device=device)
    per = []
    for _ in range(21):
        if cuda:
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        for _ in range(2000):
            x.add_(1)
        if cuda:
            torch.cuda.synchronize(device)
        per.append((time.perf_counter() - start) / 2000 * 1e6)
    median = statistics.median(per)
    cv = statistics.stdev(per) / statistics.fmean(per)
    bandwidth = None
    if cuda:
        from .timing import copy_bandwidth

        bandwidth = copy_bandwidth(device) / 1e9
    return Calibration(median, cv, bandwidth, _gpu_processes() if cuda else (), host_class())


def _gpu_processes() -> tuple[str, ...]:
    """Compute processes on the GPUs other than this one and its pytest-xdist siblings (nvidia-smi; empty
    where it is missing). A process in a container may not see the others: absence proves little."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return ()
    try:
        out = subprocess.run([exe, "--query-compute-apps=pid,process_name", "--format=csv,noheader"], check=False, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return ()
    mine = {os.getpid(), os.getppid()}
    found = []
    for line in out.stdout.splitlines():
        pid, _, name = line.partition(",")
        if pid.strip().isdigit() and int(pid) not in mine and "pytest" not in name:
            found.append(f"{pid.strip()}:{name.strip()}")
    return tuple(found)


@cache
def host_class() -> str:
    """The CPU model and core count: what a host-bound wall-time figure depends on besides the GPU."""
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{' '.join(name.split())} x{os.cpu_count()}"


def noise_class(per_call: float | None) -> str:
    if per_call is None:
        return "unmeasured"
    return "quiet" if per_call <= QUIET else "noisy" if per_call <= NOISY else "hostile"
