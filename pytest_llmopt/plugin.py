"""pytest wiring only: options, markers, hooks and fixtures. The work happens in the modules it calls."""

from __future__ import annotations

import logging
import os
from collections.abc import Generator
from typing import TYPE_CHECKING, Any

import pytest

from .common import outcomes
from .wiring import settings as settings_module
from .wiring.settings import Settings

if TYPE_CHECKING:
    from .wiring.cases import Case
    from .wiring.expect import Expectation
    from .wiring.session import LlmoptSession

SETTINGS_KEY = pytest.StashKey[Settings]()
SESSION_KEY = pytest.StashKey["LlmoptSession"]()
EXPECT_KEY: pytest.StashKey[Expectation] = pytest.StashKey()
# The check during which this process's CUDA context was lost, and the error it is stuck on (machine.cuda_context_error)
LOST_KEY = pytest.StashKey[tuple[str, str]]()

MARKERS = {
    "llmopt": "llmopt(cache=..., compile=..., attention=..., quant=..., reference={axis: value}): "
    "run the test for every --llmopt-model under each variant of these axes (see the llmopt_case fixture)",
    "llmopt_cuda": "llmopt_cuda: the variant needs a CUDA GPU (select with -m llmopt_cuda, drop with -m 'not llmopt_cuda')",
    "llmopt_bitsandbytes": "llmopt_bitsandbytes: the variant needs bitsandbytes (pip install 'pytest-llmopt[cuda]')",
    "llmopt_flash_attn": "llmopt_flash_attn: the variant needs flash-attn (pip install 'pytest-llmopt[flash]')",
    "llmopt_compile": "llmopt_compile: the variant runs torch.compile (slow first call; drop with -m 'not llmopt_compile')",
    "llmopt_whole_device": "llmopt_whole_device: the test sizes what it allocates to the device's free memory, so it runs alone "
    "on the device (no other pytest-xdist worker's llmopt test at the same time)",
    "llmopt_speed": "llmopt_speed(**generate_kwargs): a speed check's generate() arguments (e.g. prompt_lookup_num_tokens=10), "
    "known at collection so that its model's campaign times it with the others",
}


def pytest_addoption(parser: pytest.Parser) -> None:
    settings_module.add_options(parser)


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config: pytest.Config) -> None:
    """Cheap in every session: markers, settings (validated: a bad value is a usage error now) and the
    results collector. The llmopt session (machine probe, torch, model resolution, maybe the hub) is
    built here only when llmopt was asked for, so that a bad model ends the session before any test;
    otherwise on first need (an llmopt test collected), and never in a session that has none."""
    for marker in MARKERS.values():
        config.addinivalue_line("markers", marker)
    if config.option.help or config.option.version:
        return
    settings = settings_module.from_config(config)
    config.stash[SETTINGS_KEY] = settings
    if settings.expect is not None:
        from .wiring.expect import Expectation
        from .wiring.report import ReportError

        try:
            config.stash[EXPECT_KEY] = Expectation.read(settings.expect)
        except ReportError as exc:
            raise pytest.UsageError(f"pytest-llmopt: --llmopt-expect: {exc}") from None
    # Speed checks and stored baselines (perf imports no torch until a speed check runs).
    from .wiring.perf import PerfPlugin

    config.pluginmanager.register(PerfPlugin(config, settings, lambda: session_of(config)), "llmopt-perf")
    if not hasattr(config, "workerinput"):  # xdist workers hand their reports to the controller
        config.pluginmanager.register(ResultsPlugin(config), "llmopt-results")
    if asked_for(settings):
        session_of(config)


def asked_for(settings: Settings) -> bool:
    """Any --llmopt-* option, LLMOPT_* variable or llmopt_* ini key given."""
    return any(source != "default" for source in settings.sources.values())


def session_of(config: pytest.Config) -> LlmoptSession:
    """The llmopt session of this pytest session, built on first call."""
    if SESSION_KEY not in config.stash:
        from .wiring.session import build

        _quiet_torch_trace()
        session = build(config.stash[SETTINGS_KEY])
        session.machine  # noqa: B018 - probe now: a device that does not exist is a usage error, not a collection error
        _share_cpu_between_workers()
        config.stash[SESSION_KEY] = session
    return config.stash[SESSION_KEY]


def _quiet_torch_trace() -> None:
    """torch's structured-trace logger emits empty DEBUG records on every compile (853 in one H100 log), and
    they reach pytest's captured log. Only tlparse needs them, and only when TORCH_TRACE names a folder."""
    if not os.environ.get("TORCH_TRACE"):
        logging.getLogger("torch.__trace").disabled = True


def _share_cpu_between_workers() -> None:
    """Under pytest-xdist each worker would start one torch thread per core: with -n 2 on 2 cores that is
    4 threads spinning on 2 cores, several times slower than 1 each. Give every worker its share."""
    count = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0") or 0)
    if count > 1:
        import torch

        torch.set_num_threads(max(1, (os.cpu_count() or 1) // count))


def _header(session: LlmoptSession) -> list[str]:
    from .running.models import origin

    machine = session.machine
    v = machine.versions
    sm = machine.capability or (0, 0)
    where = machine.device + (f" ({machine.gpu_name}, sm{sm[0]}{sm[1]})" if machine.gpu_name else "")
    # A GGUF model says so (its file, quantization, and the dtype it was dequantized to)
    specs = (*session.models, *([session.assistant] if session.assistant else []))
    origins = [f"llmopt: {spec.name} is {found}" for spec in dict.fromkeys(specs) if (found := origin(spec, machine.dtype))]
    return [
        f"llmopt: models {', '.join(spec.name for spec in session.models)}"
        + (f"; assistant {session.assistant.name}" if session.assistant else ""),
        *origins,
        f"llmopt: device {where}, dtype {machine.dtype}, variants {session.settings.variants}, seed {session.settings.seed}",
        "llmopt: torch {}, transformers {}, bitsandbytes {}, flash-attn {}".format(
            v.get("torch"), v.get("transformers"), v.get("bitsandbytes") or "not installed", v.get("flash-attn") or "not installed"
        ),
    ]


def pytest_report_header(config: pytest.Config) -> list[str]:
    """Asked for: the session exists already (built at configure)."""
    if SETTINGS_KEY not in config.stash or not asked_for(config.stash[SETTINGS_KEY]):
        return []
    return _header(session_of(config))


def pytest_report_collectionfinish(config: pytest.Config) -> list[str]:
    """Not asked for, but llmopt tests were collected (e.g. plain `pytest suites`): the same lines, now."""
    if SETTINGS_KEY not in config.stash or asked_for(config.stash[SETTINGS_KEY]) or SESSION_KEY not in config.stash:
        return []
    return _header(config.stash[SESSION_KEY])


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "llmopt_case" not in metafunc.fixturenames:
        return
    marker = metafunc.definition.get_closest_marker("llmopt")
    if marker is None:
        raise pytest.UsageError(f"{metafunc.definition.nodeid}: a test using llmopt_case needs @pytest.mark.llmopt(...)")
    from .wiring.cases import params_for

    metafunc.parametrize("llmopt_case", params_for(session_of(metafunc.config), marker), indirect=True)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if SESSION_KEY not in config.stash:  # no llmopt test was collected
        return
    from .wiring.cases import deselect, label_items

    label_items(items)
    selection = session_of(config).settings.variants
    if not selection.terms:
        return
    kept, dropped = deselect(items, selection)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = kept


class ResultsPlugin:
    """Collects the results of the run where every report arrives (the xdist controller, or the only
    process), prints the matrix at the end and writes --llmopt-report."""

    def __init__(self, config: pytest.Config) -> None:
        from .wiring.report import Collector

        self.config = config
        self.collector = Collector()

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        self.collector.add(report)

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        if not self.collector.results:
            return
        from .wiring.render import WORD, matrix

        models, suites, cells = matrix(self.collector.sorted())
        terminalreporter.section("llmopt: model x optimization")
        width = max(len(m) for m in models)
        for model in models:
            for suite in suites:
                cell = cells[(model, suite)]
                if cell.results:
                    terminalreporter.write_line(f"{model:<{width}}  {suite:<14} {cell.text(WORD)}")
        path = self.config.stash[SETTINGS_KEY].report
        if path:
            terminalreporter.write_line(f"report written to {path}")
        from .common.phases import summary_lines

        lines = summary_lines(self.collector.sorted())
        if lines:
            terminalreporter.section("llmopt: where the time went")
            for line in lines:
                terminalreporter.write_line(line)

    @pytest.hookimpl(trylast=True)
    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        path = self.config.stash[SETTINGS_KEY].report
        if path is None:
            return
        from .wiring.render import write
        from .wiring.report import environment

        write(path, self.collector.sorted(), [environment(session_of(self.config))])


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """The status an outcomes helper (unsupported, not_run, inconclusive) gave, beside the report. A crash
    inside torch or transformers in a suite test fails with one line naming the exception and its first
    meaningful line (not hundreds of lines of inductor IR); -vv shows the whole traceback."""
    report = yield
    excinfo = call.excinfo
    status = outcomes.status_of_exception(excinfo.value if excinfo else None)
    if status is not None:
        report.user_properties.append((outcomes.PROPERTY, status.value))
    if (
        report.failed
        and excinfo is not None
        and "llmopt_case" in getattr(item, "fixturenames", ())
        and item.config.get_verbosity() < 2
        and not isinstance(excinfo.value, (AssertionError, pytest.fail.Exception))
    ):
        report.longrepr = f"{outcomes.summary_line(excinfo.value)}\n  (the full traceback: run again with -vv)"
    if report.skipped and EXPECT_KEY in item.config.stash:
        _lost_support(item, report)
    return report


def _lost_support(item: pytest.Item, report: pytest.TestReport) -> None:
    """A refusal of a combination that ran in the --llmopt-expect report fails the test (expect.py)."""
    from .common.outcomes import Status, status_from
    from .wiring.report import PROPERTY, Result, status_of

    props = next((v for n, v in report.user_properties if n == PROPERTY and isinstance(v, dict) and "suite" in v), None)
    if props is None:
        return
    status, reason = status_of(report, status_from(props.get("skipped_as")))
    if status != Status.UNSUPPORTED:
        return
    key = Result(props["suite"], props["check"], props["model"], props["variant"], status, props.get("extra")).key
    config = item.config
    message = config.stash[EXPECT_KEY].lost(key, reason or "", session_of(config).machine.versions, config.stash[SETTINGS_KEY].expected_refusals)
    if message is not None:
        report.outcome = "failed"
        report.longrepr = message


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> Generator[None, Any, Any]:
    """Every llmopt test's phases are timed from its setup on (phases.py)."""
    if "llmopt_case" in getattr(item, "fixturenames", ()):
        from .common import phases

        phases.start()
    return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Generator[None, Any, Any]:
    """Out of GPU memory in one test is that test's failure, with one line, and memory is given back
    so that the rest of the session keeps going. A test during which the process's CUDA context was lost fails
    saying so (the checks after it are not run: llmopt_case). The test's phases go into its record."""
    try:
        try:
            # the device's timing lock, shared (a speed campaign holds it exclusive), and the peak GPU memory of every llmopt test
            with _device_share(item), _track_peak(item):
                result = yield
        finally:
            _record_phases(item)
    except Exception as exc:
        if type(exc).__name__ == "OutOfMemoryError":
            from .running.models import release_memory

            release_memory()
            raise pytest.fail.Exception(f"out of GPU memory: {str(exc).splitlines()[0]}", pytrace=False) from None
        lost = _lost_device(item)
        if lost is None:
            raise
        told = str(exc) if isinstance(exc, pytest.fail.Exception) else outcomes.summary_line(exc)
        raise pytest.fail.Exception(f"{told}\n{lost}", pytrace=False) from None
    lost = _lost_device(item)
    if lost is not None:
        raise pytest.fail.Exception(lost, pytrace=False)
    return result


def _lost_device(item: pytest.Item) -> str | None:
    """Whether this test lost the process's CUDA context (then noted for the tests after it): the line that says so."""
    from .running import machine

    if LOST_KEY in item.config.stash or (error := machine.cuda_context_error()) is None:
        return None
    item.config.stash[LOST_KEY] = (item.nodeid, error)
    return f"the CUDA context of this process was lost during this check ({error}): the checks after it in this process are not run"


def _record_phases(item: pytest.Item) -> None:
    from .common import phases

    spent = phases.stop()
    if spent is not None:
        from .wiring.report import record_phases

        record_phases(item, spent)


def _device_share(item: pytest.Item) -> Any:
    import contextlib

    perf = item.config.pluginmanager.get_plugin("llmopt-perf")
    return perf.shared(item) if perf is not None else contextlib.nullcontext()


def _track_peak(item: pytest.Item) -> Any:
    import contextlib

    if "llmopt_case" not in getattr(item, "fixturenames", ()):
        return contextlib.nullcontext()
    from .wiring.report import track_peak

    return track_peak(item)


@pytest.fixture(scope="session")
def llmopt_session(pytestconfig: pytest.Config) -> LlmoptSession:
    """Settings, models, prompts, machine and model store of this session."""
    return session_of(pytestconfig)


@pytest.fixture
def llmopt_case(request: pytest.FixtureRequest, llmopt_session: LlmoptSession) -> Case:
    """The model x variant this test instance checks: its runners (``.reference``, the plain path; ``.target``, the
    path under test), prompts and verdicts (``.check_greedy``, ``.check_logits``). Mark the test with the axes it
    covers and take helpers from ``pytest_llmopt.api`` only. Example: ``from pytest_llmopt.api import
    greedy_each_prompt``, then ``@pytest.mark.llmopt(cache=["static"], reference={"cache": "dynamic"})`` on
    ``def test_static(llmopt_case): greedy_each_prompt(llmopt_case)`` (each prompt through both paths, one verdict).
    """
    from .wiring.cases import Case

    lost = request.config.stash.get(LOST_KEY, None)
    if lost is not None:  # each check after it would fail for that check's cause, not its own
        outcomes.not_run(
            f"the CUDA context of this process was lost in {lost[0]} ({lost[1]}), and every CUDA call after a "
            f"device-side assert fails: run this check again on its own (pytest '{request.node.nodeid}')"
        )
    return Case(request.param, llmopt_session, request.node)
