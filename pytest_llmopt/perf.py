"""The performance suite's machinery: timing a case against its reference, the roofline, CUDA-graph
checks, stored baselines, and pytest-benchmark's JSON. Registered by plugin.py as one more plugin
object, so the wiring stays in one place and this module is imported only where it is used.

What a speed check does (suites/test_performance.py):
1. Times the reference variant once per model per session (memoized), and the case's variant, with
   the same 32-token prompt and forced output length (timing.measure).
2. Records ttft_ms, decode_ms, tokens_per_s, total_ms, spread, compile_s, speedup (reference time /
   variant time, end to end) and decode_speedup; on CUDA also peak_memory_bytes, the roofline and
   CUDA-graph activity; for draft-based paths the acceptance rate.
3. Fails at once on a compiled CUDA decode whose CUDA graphs were skipped or never recorded, or an
   auto-compile that never ran compiled code.
4. Spread above timing.SPREAD_LIMIT: "inconclusive" (skip), no baseline verdict, nothing written.
5. Otherwise compares with the stored baseline (baselines.py); --llmopt-update-baselines writes instead.

On CPU the same runs happen on the tiny models with fewer tokens; the figures are recorded, compared
only against a same-hardware baseline (none is committed for CPU: machines differ too much), and a
missing one is only listed in the summary. Speed claims live in GPU baselines.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from . import baselines as bl
from . import outcomes

PROMPT_TOKENS = 32


@dataclass(frozen=True)
class Setup:
    """How much is timed. Fixed per device type (baselines are only comparable with the same setup)."""

    new_tokens: int
    repeats: int
    warmups: int  # eager paths
    warmups_compiled: int  # the first call compiles, the second records CUDA graphs


SETUPS = {"cuda": Setup(64, 5, 1, 2), "cpu": Setup(16, 5, 1, 2)}


class PerfPlugin:
    """Session state of the speed checks: the baseline store, reference timings, the card's bandwidth."""

    def __init__(self, config: pytest.Config, settings: Any, session: Callable[[], Any]) -> None:
        self.config = config
        self._session = session  # builds the llmopt session on first need (plugin.session_of)
        self.root = settings.baselines or Path(config.rootpath) / "baselines"
        self.store = bl.Store(self.root)
        self.update = settings.update_baselines
        self.references: dict[tuple[str, str], Any] = {}
        self._bandwidth: float | None = None
        self.missing: dict[Path, list[str]] = {}
        self.written: set[Path] = set()
        self.compared = 0

    @property
    def llmopt(self) -> Any:
        """The llmopt session, built on first need (the plugin stays free when llmopt is not asked for)."""
        return self._session()

    @property
    def machine(self) -> Any:
        return self.llmopt.machine

    @property
    def setup(self) -> Setup:
        return SETUPS["cuda" if self.machine.device_type == "cuda" else "cpu"]

    def bandwidth(self) -> float:
        """Device-to-device copy bandwidth, measured once per session."""
        if self._bandwidth is None:
            import torch

            from .timing import copy_bandwidth

            self._bandwidth = copy_bandwidth(torch.device(self.machine.device))
        return self._bandwidth

    def environment(self) -> dict[str, Any]:
        m = self.machine
        v = m.versions
        return {
            "gpu": m.gpu_name,
            "driver": _driver_version() if m.device_type == "cuda" else None,
            "cuda": v.get("cuda"),
            "torch": v.get("torch"),
            "transformers": v.get("transformers"),
            "bitsandbytes": v.get("bitsandbytes"),
            "flash-attn": v.get("flash-attn"),
            "python": v.get("python"),
            "dtype": m.dtype,
            "setup": {"prompt_tokens": PROMPT_TOKENS, **self.setup.__dict__},
            "updated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }

    def judge(self, model: str, check: str, metrics: dict[str, Any]) -> tuple[list[bl.Finding], dict[str, Any]]:
        """Compare ``metrics`` with the stored baseline (or write them, with --llmopt-update-baselines).
        Returns the findings (none when writing) and what to record about the baseline used."""
        hardware = self.machine.hardware_id
        same = self.store.get(hardware, model)
        other = None if same is not None else self.store.other_hardware(hardware, model, self.machine.device_type)
        findings = bl.compare(check, metrics, same, other)
        compared = [f for f in findings if f.baseline is not None]
        note: dict[str, Any] = {}
        if compared:
            self.compared += 1
            note = {"baseline": compared[0].source, "baseline_regressions": sum(f.verdict == "regression" for f in findings)}
        if self.update:
            self.written.add(self.store.update(hardware, model, self.environment(), check, metrics))
            return [], note  # written on purpose: the new values are the baseline
        if not compared:
            self.missing.setdefault(self.store.path(hardware, model), []).append(check)
            note["baseline"] = "missing"
        return findings, note

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_makereport(self, item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
        """Memory figures of the other suites (peak memory, footprints, cache sizes) are kept in the same
        baseline files and judged the same way: a passed check whose figure left its baseline fails."""
        report = yield
        if call.when != "call" or not report.passed or "llmopt_speed" in getattr(item, "fixturenames", ()):
            return report
        from .report import PROPERTY

        props = next((v for k, v in item.user_properties if k == PROPERTY and isinstance(v, dict)), None)
        metrics = {k: v for k, v in (props or {}).get("metrics", {}).items() if k in bl.MEMORY_METRICS}
        if not metrics or "suite" not in props:  # type: ignore[operator]
            return report
        assert props is not None
        extra = f"-{props['extra']}" if props.get("extra") else ""
        check = f"{props['suite']}::{props['check']}[{props['variant']}{extra}]"
        findings, _ = self.judge(props["model"], check, metrics)
        if any(f.verdict == "regression" for f in findings):
            report.outcome = "failed"
            report.longrepr = bl.failure_text(f"{props['variant']}@{props['model']}", findings)
        return report

    @pytest.hookimpl
    def pytest_collection_finish(self, session: pytest.Session) -> None:
        """A malformed baseline file is one usage error naming it, before any test runs."""
        if not any("llmopt_case" in getattr(item, "fixturenames", ()) for item in session.items):  # any suite: memory figures too
            return
        try:
            self.store.validate(self.machine.hardware_id, [spec.name for spec in self.llmopt.models])
        except bl.BaselineError as exc:
            raise pytest.UsageError(f"pytest-llmopt: malformed baseline file {exc}") from None

    @pytest.hookimpl
    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        if not (self.missing or self.written or self.compared):
            return
        terminalreporter.section("llmopt: baselines")
        terminalreporter.write_line(f"directory {self.root}; {self.compared} check(s) compared")
        for path in sorted(self.written):
            terminalreporter.write_line(f"written: {path}")
        for path, checks in sorted(self.missing.items()):
            terminalreporter.write_line(
                f"no baseline for {len(checks)} check(s) in {path} (hardware {self.machine.hardware_id}): "
                "rerun with --llmopt-update-baselines to write it"
            )

    @pytest.fixture
    def llmopt_speed(self, request: pytest.FixtureRequest) -> SpeedCheck:
        """Times a case against its reference and judges the figures (see this module's docstring)."""
        return SpeedCheck(self, request)


class SpeedCheck:
    def __init__(self, plugin: PerfPlugin, request: pytest.FixtureRequest) -> None:
        self.plugin = plugin
        self.request = request

    def check(self, case: Any, drafts: bool = False, **extra: Any) -> dict[str, Any]:
        """Time ``case`` (with ``extra`` generate arguments, e.g. prompt_lookup_num_tokens) and its
        reference; record, judge, compare with the baseline. Returns the recorded figures."""
        plugin = self.plugin
        setup = plugin.setup
        target = case.target
        ids = prompt_ids(target)
        own = case.variant == case.param.reference and not extra
        reference = self._reference(case, ids, through_benchmark=own)
        with case.explain("timing"):
            timing, acceptance, compiled_calls = (reference, None, None) if own else time_runner(
                target, ids, setup, extra, drafts, timed=self._benchmark_loop()
            )
        metrics: dict[str, Any] = dict(timing.metrics())
        if timing.peak_memory_bytes is not None:
            # this model's weights + what the path allocated: independent of other models the session keeps
            metrics["peak_memory_bytes"] = timing.peak_memory_bytes + _weight_bytes(target.model)
        if not own and timing.total_ms > 0 and timing.decode_ms > 0:
            metrics["speedup"] = reference.total_ms / timing.total_ms
            metrics["decode_speedup"] = reference.decode_ms / timing.decode_ms
            metrics["reference_total_ms"] = reference.total_ms
        if acceptance is not None:
            metrics["acceptance_rate"] = acceptance
        if compiled_calls is not None:
            metrics["compiled_forward_calls"] = compiled_calls
        if plugin.machine.device_type == "cuda":
            from .timing import roofline

            metrics.update(roofline(target.model, ids.shape[1], setup.new_tokens, plugin.bandwidth(), timing.decode_ms))
        case.record(**metrics)
        self._to_benchmark(case, metrics)
        problems = self._problems(case, timing, compiled_calls)
        check = f"{case.node.path.stem.removeprefix('test_')}::{getattr(case.node, 'originalname', case.node.name)}[{case.variant.id}]"
        spread_limit = _spread_limit(plugin.machine.device_type)
        noisy = max(timing.spread, reference.spread)
        if noisy > spread_limit and not problems:
            outcomes.inconclusive(
                f"inconclusive: the runs spread {noisy:.0%} (interquartile range over median of {setup.repeats} runs; "
                f"bound {spread_limit:.0%}), too wide for a verdict; figures recorded, not compared"
            )
        if problems and plugin.update:
            pytest.fail("\n".join(problems) + "\n(figures not written to the baseline)", pytrace=False)
        findings = self._baseline(case, check, metrics)
        bad = [f for f in findings if f.verdict == "regression"]
        if problems or bad:
            text = "\n".join(problems)
            if bad:
                text += ("\n" if text else "") + bl.failure_text(f"{case.label}", findings)
            pytest.fail(text, pytrace=False)
        return metrics

    def _reference(self, case: Any, ids: Any, through_benchmark: bool = False) -> Any:
        """The reference's timing, measured once per model per session (through pytest-benchmark when this
        test is the reference's own check)."""
        plugin = self.plugin
        key = (case.spec.name, case.param.reference.id)
        if key not in plugin.references:
            timed = self._benchmark_loop() if through_benchmark else None
            with case.explain("timing the reference"):
                plugin.references[key] = time_runner(case.reference, ids, plugin.setup, {}, False, timed=timed)[0]
        return plugin.references[key]

    def _problems(self, case: Any, timing: Any, compiled_calls: int | None) -> list[str]:
        """Findings that fail whatever the baseline says: compiled code that did not run as compiled."""
        out = []
        variant = case.variant
        if variant.compile == "auto" and compiled_calls == 0:
            out.append(f"{case.label}: generate() never called its compiled forward: auto-compile did not trigger (compile silently off)")
        if variant.compile == "auto" and self.plugin.machine.device_type == "cuda":
            if timing.cudagraph_skips:
                out.append(
                    f"{case.label}: inductor skipped CUDA graphs {timing.cudagraph_skips} time(s) in the compiled decode "
                    f"(counters['inductor']['cudagraph_skips']); the decode runs kernel by kernel. "
                    f"Reasons: {'; '.join(timing.skip_reasons) or 'rerun with TORCH_LOGS=perf_hints,cudagraphs'}"
                )
            elif not (timing.cudagraphs_recorded or timing.cudagraph_replays) and not _compiled_config_without_graphs():
                out.append(f"{case.label}: the compiled decode neither recorded nor replayed a CUDA graph (mode reduce-overhead expected)")
        return out

    def _baseline(self, case: Any, check: str, metrics: dict[str, Any]) -> list[bl.Finding]:
        plugin = self.plugin
        same = plugin.store.get(plugin.machine.hardware_id, case.spec.name)
        stored = (same.environment.get("setup") if same else None) or None
        current = plugin.environment()["setup"]
        if stored is not None and stored != current and not plugin.update:
            pytest.fail(
                f"{case.label}: the baseline {same.path} was measured with {stored}, this run with {current}: "  # type: ignore[union-attr]
                "not comparable; rerun with --llmopt-update-baselines",
                pytrace=False,
            )
        findings, note = plugin.judge(case.spec.name, check, metrics)
        case.record(**note)
        return findings

    def _benchmark_loop(self) -> Any:
        """pytest-benchmark's pedantic mode as the repetition loop, when it is installed and enabled: it
        times the same synchronized calls with its own clock (no calibration: pedantic mode), so its
        JSON and compare tools see the whole-call times. Our CUDA-event split goes into extra_info."""
        if not self.request.config.pluginmanager.has_plugin("benchmark"):  # pytest-benchmark's entry-point name
            return None
        bench = self.request.getfixturevalue("benchmark")
        if getattr(bench, "disabled", True):
            return None
        self._bench = bench

        def loop(one_run: Any, repeats: int) -> list[Any]:
            runs: list[Any] = []
            bench.pedantic(lambda: runs.append(one_run()), rounds=repeats, iterations=1, warmup_rounds=0)
            return runs

        return loop

    def _to_benchmark(self, case: Any, metrics: dict[str, Any]) -> None:
        bench = getattr(self, "_bench", None)
        if bench is None:
            return
        bench.group = f"llmopt {case.spec.name}"
        bench.extra_info.update({k: v for k, v in metrics.items() if isinstance(v, (int, float, str))})
        bench.extra_info["variant"] = case.variant.id


def _spread_limit(device_type: str) -> float:
    from .timing import SPREAD_LIMIT

    return SPREAD_LIMIT["cuda" if device_type == "cuda" else "cpu"]


def _compiled_config_without_graphs() -> bool:
    """transformers' CompileConfig default mode is reduce-overhead (CUDA graphs); a user may change it."""
    try:
        from transformers import CompileConfig

        return CompileConfig().mode != "reduce-overhead"
    except ImportError:
        return False


def prompt_ids(runner: Any) -> Any:
    """A fixed PROMPT_TOKENS-token prompt (batch 1), on the model's device: the same for every variant."""
    import torch

    ids = runner.tokenizer(_TEXT, return_tensors="pt")["input_ids"][0]
    while ids.numel() < PROMPT_TOKENS:
        ids = torch.cat([ids, ids])
    return ids[:PROMPT_TOKENS].unsqueeze(0).to(runner.model.device)


_TEXT = (
    "The quick brown fox jumps over the lazy dog while the committee reviews the quarterly report on "
    "inference latency, memory bandwidth and the cost of serving large language models at batch one."
)


def time_runner(runner: Any, ids: Any, setup: Setup, extra: dict[str, Any], drafts: bool, timed: Any = None) -> tuple[Any, float | None, int | None]:
    """Time ``runner``'s variant on ``ids``: (Timing, acceptance rate or None, compiled forward calls or None)."""
    import torch

    from . import compat, instrumentation
    from .timing import measure

    variant = runner.variant
    kwargs = compat.generate_kwargs(
        new_tokens=setup.new_tokens,
        cache=variant.cache,
        compile_mode=variant.compile,
        device_type=runner.machine.device_type,
        eos_ids=runner.eos_ids,
        model=runner.model,
    )
    kwargs.update(output_logits=False, **extra)
    mask = torch.ones_like(ids)

    def generate(processors: list[Any]) -> Any:
        from transformers import LogitsProcessorList

        with runner.active() as model, runner.refusals_skip():
            eager = compat.eager_generate(model) if variant.compile == "off" else contextlib.nullcontext()
            with eager:
                out = model.generate(input_ids=ids, attention_mask=mask, logits_processor=LogitsProcessorList(processors), **kwargs)
        return out.sequences

    # transformers sizes a new static cache to the longest one this model has seen (_previous_max_cache_length)
    # and older releases keep it on the model (_cache): forget both, so an earlier check's longer prompt does
    # not change what is timed here (the warm-ups absorb a recompile this may cause).
    for name in ("_previous_max_cache_length", "_cache"):
        runner.model.__dict__.pop(name, None)
    auto = variant.compile == "auto"
    warmups = setup.warmups_compiled if variant.compile != "off" else setup.warmups
    with _maybe(instrumentation.track_drafts() if drafts else None) as stats, _maybe(instrumentation.count_compiled_calls(runner.model) if auto else None) as calls:
        timing = measure(generate, torch.device(runner.machine.device), ids.shape[1], setup.new_tokens, setup.repeats, warmups, timed)
    acceptance = stats.acceptance_rate if stats is not None else None
    return timing, acceptance, (calls["calls"] if calls is not None else None)


@contextlib.contextmanager
def _maybe(manager: Any) -> Iterator[Any]:
    if manager is None:
        yield None
        return
    with manager as value:
        yield value


def _weight_bytes(model: Any) -> int:
    return int(sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()]))


def _driver_version() -> str | None:
    """The NVIDIA driver version (nvidia-smi), which torch does not report."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    try:
        out = subprocess.run([exe, "--query-gpu=driver_version", "--format=csv,noheader"], check=False, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
