"""The one registry of recorded figures: what each means, which way is better, how it is judged, where a stored
value of it may judge another machine, and how it is printed. The baselines, ``llmopt compare`` and the
renderers all read it, so a figure cannot be judged one way in a baseline and another way in the gate.

How a figure is judged (``kind``):
- ``timed``: a paired, interleaved estimate with an interval (stats.py); judged by its interval against the
  baseline's, never by a fixed tolerance.
- ``fixed``: deterministic up to allocator rounding or a draft's luck (memory, cache bytes, acceptance rate,
  recompiles): judged by a tolerance, relative or absolute.
- ``info``: recorded and shown, never judged (absolute wall times and rates move with the host; the paired
  figures carry what can be gated).

Where a stored value may judge (``portable``): ``any`` machine (deterministic figures of the same stack),
the same ``hardware`` (GPU work, memory), or the same hardware and host class (``host``: wall-time ratios,
whose host-bound part moves with the CPU).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


def _bytes(value: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return str(value)


@dataclass(frozen=True)
class Figure:
    name: str
    label: str
    fmt: Callable[[float], str]
    direction: int = 0  # +1 higher is better, -1 lower is better, 0 neither
    kind: str = "info"  # "timed" | "fixed" | "info"
    tolerance: float = 0.0  # fixed figures: how far the wrong way it may move
    absolute: bool = False  # the tolerance is in the figure's units (rates, counts), else relative
    portable: str = "hardware"  # "any" | "hardware" | "host"
    band: str | None = None  # timed figures whose bound is known in advance ("gpu-work"); else measured per run

    @property
    def judged(self) -> bool:
        return self.kind != "info" and self.direction != 0


def _ratio(v: float) -> str:
    return f"{v:.2f}x"


def _ms(v: float) -> str:
    return f"{v:.3g} ms"


def _pct(v: float) -> str:
    return f"{v:.0%}"


# Tolerances of fixed figures: memory repeats to allocator rounding (2 %; prefill peaks 5 %; a footprint 1 %),
# cache sizes exactly; a draft's acceptance rate is deterministic in greedy decoding up to kernel ties (2 points).
FIGURES: dict[str, Figure] = {
    f.name: f
    for f in (
        Figure("decode_speedup", "decode speedup", _ratio, +1, "timed", portable="host"),
        Figure("speedup", "speedup", _ratio, +1, "timed", portable="host"),
        Figure("gpu_ms_per_token", "GPU ms/token", _ms, -1, "timed", band="gpu-work"),
        Figure("acceptance_rate", "acceptance", _pct, +1, "fixed", 0.02, absolute=True, portable="any"),
        Figure("peak_memory_bytes", "peak memory", _bytes, -1, "fixed", 0.02),
        Figure("prefill_peak_bytes", "prefill peak", _bytes, -1, "fixed", 0.05),
        Figure("footprint_bytes", "footprint", _bytes, -1, "fixed", 0.01),
        Figure("static_cache_bytes", "kv-cache", _bytes, -1, "fixed", 0.0),
        Figure("kv_cache_bytes", "kv-cache (generate)", _bytes, -1, "fixed", 0.0),
        Figure("recompiles", "recompiles", str, -1, "fixed", 0.0, absolute=True, portable="any"),
        Figure("compiles_warmup", "compiles in warm-up", str, -1, "fixed", 0.0, absolute=True, portable="any"),
        Figure("gpu_busy_pct", "GPU busy", lambda v: f"{v:.0f}%", +1),
        Figure("step_ms", "ms/step", _ms, -1),
        Figure("tokens_per_s", "tokens/s", lambda v: f"{v:.1f}", +1),
        Figure("reference_tokens_per_s", "tokens/s one by one", lambda v: f"{v:.1f}", +1),
        Figure("decode_ms", "decode ms/token", _ms, -1),
        Figure("ttft_ms", "TTFT ms", lambda v: f"{v:.1f}", -1),
        Figure("roofline_pct", "% of bandwidth floor", lambda v: f"{v:.0f}%", +1),
        Figure("compile_s", "compile s", lambda v: f"{v:.1f}", -1),
        Figure("footprint_ratio", "footprint vs unquantized", lambda v: f"{v:.3f}x"),
        Figure("top1_agreement", "top-1 agreement", lambda v: f"{v:.1%}", +1),
        Figure("kl_mean", "KL mean", lambda v: f"{v:.3g}", -1),
        Figure("latency_ratio", "latency vs unquantized", _ratio, -1),
        Figure("max_delta_logit", "max Δlogit", lambda v: f"{v:.3g}"),
        Figure("logits_max_delta", "max Δlogit (logits)", lambda v: f"{v:.3g}"),
        Figure("near_ties", "near-ties", str),
        Figure("ks_pvalue", "KS p-value", lambda v: f"{v:.3g}"),
    )
}
# Figures of the memory, static-cache and quantization suites kept in the same baseline files as the speed ones.
MEMORY = ("peak_memory_bytes", "prefill_peak_bytes", "footprint_bytes", "static_cache_bytes", "kv_cache_bytes")
TIMED = tuple(name for name, f in FIGURES.items() if f.kind == "timed")
# What the speed checks gate: the GPU's own work everywhere on CUDA, the paired wall-time ratios where the
# run's band allows (stats.judge says inconclusive otherwise).
GATED = (*TIMED, "acceptance_rate", "peak_memory_bytes")


def figure(name: str) -> Figure | None:
    return FIGURES.get(name)


def fixed_worse(name: str, base: float, measured: float) -> tuple[bool, float, float]:
    """(beyond tolerance the wrong way, how far it moved in the tolerance's terms, the tolerance) of a fixed figure."""
    f = FIGURES[name]
    delta = measured - base
    moved = abs(delta) if f.absolute or not base else abs(delta) / abs(base)
    worse = delta * f.direction < 0
    return worse and moved > f.tolerance + 1e-12, moved, f.tolerance
