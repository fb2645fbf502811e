"""pytest wiring only: options, markers, hooks and fixtures. The work happens in the modules it calls."""

from __future__ import annotations

import logging
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
    config.stash[SESSION_KEY] = session


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
    selection = session_of(config).settings.variants
    if not selection.terms:
        return
    from .cases import deselect

    kept, dropped = deselect(items, selection)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = kept


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
