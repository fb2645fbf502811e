"""pytest wiring only: options, markers, hooks and fixtures. The work happens in the modules it calls."""

from __future__ import annotations

import logging
import os
from collections.abc import Generator
from typing import Any

import pytest

from . import settings as settings_module
from .session import LlmoptSession, build

SESSION_KEY = pytest.StashKey[LlmoptSession]()

MARKERS = {
    "llmopt": "llmopt(cache=..., compile=..., attention=..., quant=..., reference={axis: value}): "
    "run the test for every --llmopt-model under each variant of these axes (see the llmopt_case fixture)",
    "llmopt_cuda": "llmopt_cuda: the variant needs a CUDA GPU (select with -m llmopt_cuda, drop with -m 'not llmopt_cuda')",
    "llmopt_bitsandbytes": "llmopt_bitsandbytes: the variant needs bitsandbytes (pip install 'pytest-llmopt[cuda]')",
    "llmopt_flash_attn": "llmopt_flash_attn: the variant needs flash-attn (pip install 'pytest-llmopt[flash]')",
    "llmopt_compile": "llmopt_compile: the variant runs torch.compile (slow first call; drop with -m 'not llmopt_compile')",
}


def pytest_addoption(parser: pytest.Parser) -> None:
    settings_module.add_options(parser)


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config: pytest.Config) -> None:
    for marker in MARKERS.values():
        config.addinivalue_line("markers", marker)
    if config.option.help or config.option.version:
        return
    # torch's structured-trace logger emits DEBUG records on every compile; kept out of failure reports.
    logging.getLogger("torch.__trace").propagate = False
    session = build(settings_module.from_config(config))
    session.machine  # noqa: B018 - probe now: a device that does not exist is a usage error, not a collection error
    _share_cpu_between_workers()
    config.stash[SESSION_KEY] = session
    # Speed checks and stored baselines (perf imports no torch until a speed check runs).
    from .perf import PerfPlugin

    config.pluginmanager.register(PerfPlugin(config, session), "llmopt-perf")
    if not hasattr(config, "workerinput"):  # xdist workers hand their reports to the controller
        config.pluginmanager.register(ResultsPlugin(config), "llmopt-results")


def _share_cpu_between_workers() -> None:
    """Under pytest-xdist each worker would start one torch thread per core: with -n 2 on 2 cores that is
    4 threads spinning on 2 cores, several times slower than 1 each. Give every worker its share."""
    count = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0") or 0)
    if count > 1:
        import torch

        torch.set_num_threads(max(1, (os.cpu_count() or 1) // count))


def session_of(config: pytest.Config) -> LlmoptSession:
    return config.stash[SESSION_KEY]


def pytest_report_header(config: pytest.Config) -> list[str]:
    if SESSION_KEY not in config.stash:
        return []
    session = session_of(config)
    machine = session.machine
    v = machine.versions
    where = machine.device + (f" ({machine.gpu_name}, sm{machine.capability[0]}{machine.capability[1]})" if machine.gpu_name else "")
    lines = [
        f"llmopt: models {', '.join(spec.name for spec in session.models)}"
        + (f"; assistant {session.assistant.name}" if session.assistant else ""),
        f"llmopt: device {where}, dtype {machine.dtype}, variants {session.settings.variants}, seed {session.settings.seed}",
        "llmopt: torch {}, transformers {}, bitsandbytes {}, flash-attn {}".format(
            v.get("torch"), v.get("transformers"), v.get("bitsandbytes") or "not installed", v.get("flash-attn") or "not installed"
        ),
    ]
    return lines


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "llmopt_case" not in metafunc.fixturenames:
        return
    marker = metafunc.definition.get_closest_marker("llmopt")
    if marker is None:
        raise pytest.UsageError(f"{metafunc.definition.nodeid}: a test using llmopt_case needs @pytest.mark.llmopt(...)")
    from .cases import params_for

    metafunc.parametrize("llmopt_case", params_for(session_of(metafunc.config), marker, metafunc.function.__name__), indirect=True)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if SESSION_KEY not in config.stash:
        return
    from .cases import deselect, label_items

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
        from .report import Collector

        self.config = config
        self.collector = Collector()

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        self.collector.add(report)

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        if not self.collector.results:
            return
        from .render import WORD, matrix

        models, suites, cells = matrix(self.collector.sorted())
        terminalreporter.section("llmopt: model x optimization")
        width = max(len(m) for m in models)
        for model in models:
            for suite in suites:
                cell = cells[(model, suite)]
                if cell.results:
                    terminalreporter.write_line(f"{model:<{width}}  {suite:<14} {cell.text(WORD)}")
        path = session_of(self.config).settings.report
        if path:
            terminalreporter.write_line(f"report written to {path}")

    @pytest.hookimpl(trylast=True)
    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        llmopt = session_of(self.config)
        if llmopt.settings.report is None:
            return
        from .report import environment, write

        write(llmopt.settings.report, self.collector.sorted(), [environment(llmopt)])


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Generator[None, Any, Any]:
    """Out of GPU memory in one test is that test's failure, with one line, and memory is given back
    so that the rest of the session keeps going."""
    try:
        return (yield)
    except Exception as exc:
        if type(exc).__name__ != "OutOfMemoryError":
            raise
        from .models import release_memory

        release_memory()
        raise pytest.fail.Exception(f"out of GPU memory: {str(exc).splitlines()[0]}", pytrace=False) from None


@pytest.fixture(scope="session")
def llmopt_session(pytestconfig: pytest.Config) -> LlmoptSession:
    """Settings, models, prompts, machine and model store of this session."""
    return session_of(pytestconfig)


@pytest.fixture
def llmopt_case(request: pytest.FixtureRequest, llmopt_session: LlmoptSession) -> Any:
    """The model x variant this test instance checks (a cases.Case)."""
    from .cases import Case

    return Case(request.param, llmopt_session, request.node)
