"""Running one planned campaign (perf.Group) and reading every check's figures from it; and sharing those figures
between pytest-xdist workers, so that a model's campaign runs once whichever worker each of its checks lands on.

Why share: a campaign times all of a model's speed paths together, but pytest-xdist deals the checks out to
workers one by one (its ``loadgroup`` mode, which would keep them together, does not work with pytest 9's node
ids). The first worker to reach a check of the group runs the campaign under the device's exclusive lock and
writes every check's figures (plain data: numbers, intervals, problem texts, or what the check raised) to a file
named by the run's id; a worker reaching another check of the group later takes the lock, finds the file and
reads its check's figures instead of timing again.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import pickle
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..common import outcomes, stats
from ..verdicts import baselines as bl
from .campaign import Campaign, Plan
from .campaign import Path as CampaignPath
from .speedplan import PROMPT_TOKENS


@dataclass
class Figures:
    """What one check reads from its campaign."""

    metrics: dict[str, Any]
    measured: dict[str, bl.Measured]
    problems: list[str]
    call_seconds: list[float] = field(default_factory=list)  # the timed calls, for pytest-benchmark's export


@dataclass(frozen=True)
class Raised:
    """What a check's path raised while its campaign was built or warmed, as plain data (re-raised in the check)."""

    module: str
    name: str
    message: str
    status: str | None  # an outcomes status (unsupported, not run, ...) when a helper raised it

    @staticmethod
    def of(exc: BaseException) -> Raised:
        status = outcomes.status_of_exception(exc)
        return Raised(type(exc).__module__, type(exc).__qualname__, str(exc.args[0]) if exc.args else str(exc), status.value if status else None)

    def rebuild(self) -> BaseException:
        if self.status is not None:
            import pytest

            exc = pytest.skip.Exception(self.message)
            exc.llmopt_status = outcomes.Status(self.status)  # type: ignore[attr-defined]
            return exc
        try:
            cls = getattr(importlib.import_module(self.module), self.name)
            return cls(self.message)
        except Exception:
            return RuntimeError(f"{self.module}.{self.name}: {self.message}")


@dataclass
class Outcome:
    """Every check of a group: its figures, or what it raised; and the campaign's one-line summary."""

    figures: dict[str, Figures]
    raised: dict[str, Raised]
    summary: str
    calibration: Any = None


@dataclass
class Built:
    """A planned path made runnable, with the counters its calls add to."""

    path: CampaignPath
    runner: Any
    param: Any  # cases.CaseParam
    compiled_calls: int = 0
    drafts: Any = None  # instrumentation.DraftStats of every call


def run(plugin: Any, group: Any, case: Any) -> Outcome:
    """Build every planned path of ``group`` (``case`` lends the runners), run the campaign, read the figures.
    The caller holds the device's lock exclusive."""
    import torch

    from . import throughput
    from .speedplan import prompt_ids

    setup = plugin.setup
    reference = case.param.reference
    reference_runner = case.runner(reference)
    ids = prompt_ids(reference_runner)
    requests = throughput.mix(ids[0].tolist(), setup.new_tokens) if group.workload == "requests" else None
    built: dict[str, Built] = {}
    raised: dict[str, Raised] = {}
    reference_key = f"reference[{reference.id}]" if requests is None else f"reference[{reference.id}/{throughput.REFERENCE}]"
    def make(key: str, runner: Any, param: Any, extra: dict[str, Any]) -> Built:
        """A path of the prompt campaign (generate() on the prompt), or of the request mix (the reference: one by one)."""
        if requests is None:
            return build(key, runner, param, ids, extra, setup.new_tokens)
        return Built(throughput.path(extra.get("requests", throughput.REFERENCE), key, runner, requests), runner, param)

    own = [key for key, p in group.planned.items() if p.param.variant == p.param.reference and not p.extra]
    for key, planned in group.planned.items():
        if key in own:
            continue
        try:
            built[key] = make(key, case.runner(planned.param.variant), planned.param, planned.extra)
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as exc:
            raised[key] = Raised.of(exc)
    built[reference_key] = make(reference_key, reference_runner, case.param, {})
    for runner in {id(b.runner.model): b.runner for b in built.values()}.values():
        # transformers sizes a new static cache to the longest one this model has seen (_previous_max_cache_length) and
        # older releases keep it on the model (_cache): forget both once, before the warm-ups (never between rounds)
        for name in ("_previous_max_cache_length", "_cache"):
            runner.model.__dict__.pop(name, None)
    device = torch.device(plugin.machine.device)
    if plugin.calibration is None and plugin.machine.device_type == "cuda":
        from .noise import calibrate

        plugin.calibration = calibrate(device)
    plan = Plan(setup.new_tokens, setup.budget_s, setup.min_rounds, setup.max_rounds, seed=plugin.llmopt.settings.seed)
    result = Campaign(device, ids.shape[1], plan).run(built[reference_key].path, [b.path for k, b in built.items() if k != reference_key])
    raised.update({key: Raised.of(exc) for key, exc in result.errors.items()})
    cuda = plugin.machine.device_type == "cuda"
    bandwidth = plugin.calibration.bandwidth_gbps * 1e9 if cuda and plugin.calibration and plugin.calibration.bandwidth_gbps else None
    figures = {key: read(plugin, result, b, key == reference_key, bandwidth) for key, b in built.items() if key in result.paths}
    for key in own:
        figures[key] = figures[reference_key]
    return Outcome(figures, raised, summary(group, result, len(figures) - len(own) - 1), plugin.calibration)


def build(key: str, runner: Any, param: Any, ids: Any, extra: dict[str, Any], new_tokens: int) -> Built:
    """The path's generate(processors) on ``runner``, counting compiled calls and draft tokens."""
    from transformers import LogitsProcessorList

    from . import compat, instrumentation

    variant = runner.variant
    kwargs = compat.generate_kwargs(
        new_tokens=new_tokens, cache=variant.cache, compile_mode=variant.compile, device_type=runner.machine.device_type, eos_ids=runner.eos_ids, model=runner.model
    )
    kwargs.update(output_logits=False, **extra)
    mask = ids.new_ones(ids.shape)
    drafts = "prompt_lookup_num_tokens" in extra or "assistant_model" in extra
    auto = variant.compile == "auto"
    built = Built(CampaignPath(key, lambda processors: None, compiled=variant.compile != "off", per_step=not drafts), runner, param)
    built.drafts = instrumentation.DraftStats() if drafts else None

    def generate(processors: list[Any]) -> Any:
        with runner.active() as model, runner.refusals_skip():
            eager = compat.eager_generate(model) if variant.compile == "off" else contextlib.nullcontext()
            with eager, _maybe(instrumentation.track_drafts() if drafts else None) as seen, _maybe(instrumentation.count_compiled_calls(model) if auto else None) as calls:
                out = model.generate(input_ids=ids, attention_mask=mask, logits_processor=LogitsProcessorList(processors), **kwargs)
        if seen is not None:
            built.drafts.proposed += seen.proposed
            built.drafts.accepted += seen.accepted
        if calls is not None:
            built.compiled_calls += calls["calls"]
        return out.sequences

    built.path.generate = generate
    return built


def read(plugin: Any, result: Any, built: Built, own: bool, bandwidth: float | None) -> Figures:
    """One check's figures from the campaign: absolute ones for the reference's own check (with the A/A), paired
    speedups with their intervals for the others; on CUDA the GPU's work and busy share, memory, the roofline."""
    key = built.path.key
    record = result.paths[key]
    device_type = plugin.machine.device_type
    cuda = device_type == "cuda"
    whole = built.path.tokens  # a request mix: the call is the figure (its decode_ms is the time per token)
    names = ("total_ms", "decode_ms") if whole else ("step_ms", "decode_ms", "ttft_ms", "total_ms")
    metrics: dict[str, Any] = {name: result.median(key, name) for name in names}
    per_token = metrics["decode_ms"] if whole else metrics["step_ms"]
    tokens = whole or plugin.setup.new_tokens
    metrics.update(rounds=len(record.runs), compile_s=record.compile_s, tokens_per_s=tokens / (metrics["total_ms"] / 1000.0))
    intervals: dict[str, Any] = {}
    measured: dict[str, bl.Measured] = {}
    gpu = result.gpu_estimate(key) if cuda else None
    busy = gpu.value / per_token if gpu is not None and per_token > 0 else None
    ref_gpu = result.gpu_estimate(result.reference) if cuda else None
    ref_step = result.median(result.reference, "decode_ms" if whole else "step_ms")
    ref_busy = ref_gpu.value / ref_step if ref_gpu is not None and ref_step > 0 else None
    band = max((stats.band_class(busy, device_type), stats.band_class(ref_busy, device_type)), key=lambda c: stats.DEFAULT_SIGMA_BETWEEN[c])
    if gpu is not None:
        metrics.update(gpu_ms_per_token=gpu.value, gpu_busy_pct=100.0 * busy)  # type: ignore[operator]
        intervals["gpu_ms_per_token"] = {**gpu.to_json(), "band": "gpu-work"}
        measured["gpu_ms_per_token"] = bl.Measured(gpu.value, gpu, "gpu-work", busy)
    elif cuda and record.gpu_error:
        metrics["gpu_work_error"] = record.gpu_error
    if own:
        aa, noise = result.aa(), result.noise_per_call()
        if aa is not None:
            intervals["aa_ratio"] = {**aa.to_json(), "band": band}
            metrics["aa_ratio"] = aa.value
        if noise is not None:
            metrics["noise_per_call"] = noise
    else:
        pairs = (("speedup", "total_ms"),) if whole else (("decode_speedup", "step_ms"), ("speedup", "total_ms"))
        for name, figure in pairs:
            est = result.paired(key, figure)
            if est is not None:
                metrics[name] = est.value
                intervals[name] = {**est.to_json(), "band": band}
                measured[name] = bl.Measured(est.value, est, band, busy)
        if whole:
            metrics.update(requests=whole // plugin.setup.new_tokens, reference_tokens_per_s=tokens / (result.median(result.reference, "total_ms") / 1000.0))
        else:
            metrics["reference_step_ms"] = ref_step
    metrics["band"] = band
    if built.drafts is not None and built.drafts.acceptance_rate is not None:
        metrics["acceptance_rate"] = built.drafts.acceptance_rate
        measured["acceptance_rate"] = bl.Measured(built.drafts.acceptance_rate)
    variant = built.runner.variant
    if variant.compile == "auto":
        metrics["compiled_forward_calls"] = built.compiled_calls
    if cuda:
        from .timing import roofline

        if record.peak_bytes is not None:
            metrics["peak_memory_bytes"] = record.peak_bytes + _weight_bytes(built.runner.model)
            measured["peak_memory_bytes"] = bl.Measured(float(metrics["peak_memory_bytes"]))
        metrics.update({f"cudagraphs_{k}": v for k, v in record.graphs.items()})
        if bandwidth and not whole:  # the roofline is batch 1's
            metrics.update(roofline(built.runner.model, PROMPT_TOKENS, plugin.setup.new_tokens, bandwidth, metrics["step_ms"]))
    metrics["intervals"] = intervals
    metrics["campaign"] = {
        "rounds": len(result.kept), "dropped": len(result.dropped), "late_warmup": len(result.late), "stopped": result.stopped,
        "seconds": round(result.seconds, 1), "timed_seconds": round(result.timed_seconds, 1), "seed": result.seed,
    }
    if record.recompiled:
        metrics["late_warmup"] = record.recompiled[0]
    label = f"{built.param.id} vs {built.param.reference.id}"
    return Figures(metrics, measured, problems(label, variant, built.compiled_calls, record, cuda), [r.total_ms / 1000.0 for r in record.runs.values()])


def problems(label: str, variant: Any, compiled_calls: int, record: Any, cuda: bool) -> list[str]:
    """Findings that fail whatever the baseline says: compiled code that did not run as compiled, or compiled again."""
    out = []
    if len(record.recompiled) >= 2:  # once is a late warm-up (its round is left out); again is the path recompiling
        out.append(f"{label}: recompiled while timing, in {len(record.recompiled)} rounds: {'; '.join(record.recompiled[:4])}")
    if variant.compile == "auto" and compiled_calls == 0:
        out.append(f"{label}: generate() never called its compiled forward: auto-compile did not trigger (compile silently off)")
    if variant.compile == "auto" and cuda:
        graphs = record.graphs
        if graphs["skips"]:
            out.append(
                f"{label}: inductor skipped CUDA graphs {graphs['skips']} time(s) in the compiled decode "
                f"(counters['inductor']['cudagraph_skips']); the decode runs kernel by kernel. "
                f"Reasons: {'; '.join(record.skip_reasons) or 'rerun with TORCH_LOGS=perf_hints,cudagraphs'}"
            )
        elif not (graphs["recorded"] or graphs["replayed"]) and not _compiled_config_without_graphs():
            out.append(f"{label}: the compiled decode neither recorded nor replayed a CUDA graph (mode reduce-overhead expected)")
    return out


def summary(group: Any, result: Any, variants: int) -> str:
    from .noise import noise_class

    noise, aa = result.noise_per_call(), result.aa()
    bias = ""
    if aa is not None:
        bias = f", A/A bias {aa.value - 1:+.1%}" + (" (an order effect?)" if abs(aa.log) > 2 * aa.se else "")
    return (
        f"{group.model} ({group.quant}{', request mix' if group.workload == 'requests' else ''}): {variants} variant(s) x {len(result.kept)} rounds ({len(result.dropped)} dropped, {len(result.late)} late warm-up), "
        f"stopped on {result.stopped}, "
        f"{result.timed_seconds:.1f} s timed of {result.seconds:.1f} s; A/A noise per call {'?' if noise is None else f'{noise:.1%}'}{bias}; "
        f"noise class {noise_class(noise)}"
    )


# --- sharing between workers ----------------------------------------------------------------------------------


def shared_path(run_id: str, group: Any) -> Path:
    digest = hashlib.sha1(f"{run_id}\0{group.model}\0{group.quant}\0{group.workload}".encode()).hexdigest()[:20]
    return Path(tempfile.gettempdir()) / f"llmopt-speed-{digest}.pkl"


def load_shared(path: Path) -> Outcome | None:
    try:
        with open(path, "rb") as handle:
            found = pickle.load(handle)
    except (OSError, pickle.UnpicklingError, EOFError, AttributeError):
        return None
    return found if isinstance(found, Outcome) else None


def save_shared(path: Path, outcome: Outcome) -> None:
    bl.write_atomic(path, pickle.dumps(outcome))


@contextlib.contextmanager
def _maybe(manager: Any) -> Iterator[Any]:
    if manager is None:
        yield None
        return
    with manager as value:
        yield value


def _weight_bytes(model: Any) -> int:
    return int(sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()]))


def _compiled_config_without_graphs() -> bool:
    """transformers' CompileConfig default mode is reduce-overhead (CUDA graphs); a user may change it."""
    try:
        from transformers import CompileConfig

        return CompileConfig().mode != "reduce-overhead"
    except ImportError:
        return False
