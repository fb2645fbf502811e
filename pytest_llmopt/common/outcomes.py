"""Outcomes of a check, as a type: what the report, the terminal matrix and `llmopt compare` read.

Besides passed and failed, a check can be unsupported (the model, transformers or torch does not offer
the combination), not run (this machine or this session lacks something; the reason says how to get
it), inconclusive (measured, but too noisy to judge), not exercised (it ran and agreed, but its optimized
path never did its work: no draft accepted, nothing compiled; agreeing proves nothing then) or a known
upstream issue (a non-strict xfail).
A test says which with the helpers below; they skip the test with the reason as its message, and the
plugin records the status beside the report (a user property, so it travels through pytest-xdist).
Nothing parses the prose of a reason.

This module imports neither torch nor pytest at import time: `llmopt compare` runs without them.
"""

from __future__ import annotations

from enum import Enum
from typing import TYPE_CHECKING, Any, NoReturn

if TYPE_CHECKING:
    import pytest


class Status(str, Enum):
    """The outcome of one check. String-valued: JSON reports hold these strings (schema 1)."""

    FAILED = "failed"
    KNOWN_ISSUE_PASSED = "known-issue-passed"
    PASSED = "passed"
    KNOWN_ISSUE = "known-issue"
    INCONCLUSIVE = "inconclusive"
    NOT_EXERCISED = "not-exercised"
    UNSUPPORTED = "unsupported"
    NOT_RUN = "skipped"

    def __str__(self) -> str:
        return self.value


# Passed, whether or not a known issue was expected.
GOOD = (Status.PASSED, Status.KNOWN_ISSUE_PASSED)
# The user property under which a report carries the status a helper below decided.
PROPERTY = "llmopt_status"
UNSUPPORTED_BY_MODEL = "unsupported by the model"


def _skip(status: Status, reason: str) -> NoReturn:
    import pytest

    exc = pytest.skip.Exception(reason)
    exc.llmopt_status = status  # type: ignore[attr-defined]
    raise exc


def unsupported(reason: str) -> NoReturn:
    """The model, transformers or torch does not offer this combination: reported apart from failures."""
    _skip(Status.UNSUPPORTED, reason)


def not_run(how: str) -> NoReturn:
    """This machine or session lacks something; ``how`` says how to run it (e.g. "needs CUDA: ...")."""
    _skip(Status.NOT_RUN, how)


def inconclusive(reason: str) -> NoReturn:
    """Measured, but the measurement cannot decide (e.g. its spread is too wide)."""
    _skip(Status.INCONCLUSIVE, reason)


def not_exercised(reason: str) -> NoReturn:
    """The check ran and found no difference, but the path under test never did its work (a draft never
    accepted, a lookup that never matched, a compiled function never called): not a pass."""
    _skip(Status.NOT_EXERCISED, reason)


def known_issue(reason: str, raises: type[BaseException] | tuple[type[BaseException], ...], run: bool = True) -> pytest.MarkDecorator:
    """The mark of a known upstream issue: a non-strict xfail limited to the exception that bug raises,
    so any other failure still fails and a fix shows up as XPASS. ``run=False`` for a bug whose run would harm
    the rest of the session (pytest's xfail without running)."""
    import pytest

    return pytest.mark.xfail(reason=reason, raises=raises, strict=False, run=run)


def status_of_exception(exc: BaseException | None) -> Status | None:
    """The status a helper above attached to the exception it raised, or None."""
    status = getattr(exc, "llmopt_status", None)
    return status if isinstance(status, Status) else None


def status_from(name: Any) -> Status | None:
    """A status written in a report or a user property, or None when it is not one."""
    try:
        return Status(name)
    except ValueError:
        return None


# Messages with which transformers itself refuses a combination: "unsupported by transformers", not failures.
REFUSALS = (
    "requires a cache that can be cropped",  # 5.2x: a static sliding-window cache longer than its window
    "not supported with Static cache",  # up to 5.1x: assisted generation refuses static caches
    "does not support an instance of `Cache` as `past_key_values`",  # 4.4x: a legacy-cache model (GPT-2) given a Cache object
)


def refusal(exc: BaseException, sdpa_backend: str | None = None) -> str | None:
    """Why ``exc`` is transformers (or torch) refusing a combination, or None when it is a real error.

    A pinned SDPA backend that has no kernel for the input (PyTorch's flash kernel takes no attention
    mask, so a padded batch has none) is torch's refusal, reported with the backend named; so is a
    NotImplementedError of flex_attention's CPU lowering (wrapped by inductor in a RuntimeError).
    """
    from importlib.metadata import version

    import torch

    transformers = version("transformers")

    text = str(exc)
    if isinstance(exc, ValueError) and any(r in text for r in REFUSALS):
        return f"unsupported by transformers {transformers}: {text.splitlines()[0]}"
    if sdpa_backend and isinstance(exc, RuntimeError) and "No available kernel" in text:
        return f"unsupported by torch {torch.__version__}: the {sdpa_backend} SDPA backend has no kernel for this input"
    if isinstance(exc, RuntimeError) and "`return_lse` is not supported" in text:
        # transformers 4.50-4.5x asks flex_attention for the log-sum-exp, which torch's CPU kernel lacks
        return f"unsupported by torch {torch.__version__}: its compiled CPU flex_attention cannot return the log-sum-exp transformers {transformers} asks for"
    return None


# Lines of an exception message that say nothing about the cause (torch wraps compiler errors in them).
_BOILERPLATE = ("raised:", "Set TORCH_LOGS", "You can suppress this exception", "Traceback", "While executing")


def summary_line(exc: BaseException) -> str:
    """``Type: first meaningful line`` of an exception (inductor's ``BackendCompilerFailed`` starts with
    "backend='inductor' raised:"; its cause is on the next line)."""
    for line in str(exc).splitlines():
        text = line.strip()
        if text and not any(b in text for b in _BOILERPLATE):
            return f"{type(exc).__name__}: {text[:300]}"
    return type(exc).__name__
