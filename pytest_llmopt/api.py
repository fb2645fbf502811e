"""The public API for suite authors: everything a suite needs, the shipped ones (which import nothing else, a test
keeps them so) and a user's own. Internal modules may be renamed or split; what is named here stays.

A suite is a pytest test asking for the ``llmopt_case`` fixture, parametrized by the ``llmopt`` marker over
optimized paths; the case lends runners of the plain path (``case.reference``) and of the path under test
(``case.target``) and decides (``case.check_greedy``, ``case.check_logits``)::

    import pytest
    from pytest_llmopt.api import greedy_each_prompt

    @pytest.mark.llmopt(cache=["static"], reference={"cache": "dynamic"})
    def test_static_cache_matches_dynamic(llmopt_case):
        greedy_each_prompt(llmopt_case)  # each prompt alone, both paths, one verdict on the noise floor

``pytest --fixtures`` lists the fixtures (``llmopt_case``, ``llmopt_speed``, ``llmopt_settings``); docs/models-and-options.md
("Writing a suite") says more. Below: outcomes beyond pass and fail, prompts, verdicts, instruments, the
transformers helpers that differ between releases, and the toolkits of the domain suites (assistants, beams,
continuous batching, stopping, memory, quantization), whose functions are part of this API.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

from .common.outcomes import inconclusive, known_issue, not_exercised, not_run, unsupported
from .running import assistants, batching, footprint, hybrid, memory, qlayers, quantize, zoo
from .running.compat import (
    cache_tensors,
    compile_config,
    early_exit_unsupported,
    generate_kwargs,
    layers_restored,
    make_dynamic_cache,
    make_static_cache,
)
from .running.instrumentation import compiled_forward, count_compiled_calls, dynamo_backend, track_drafts
from .running.measure import cache_layout, static_cache_bytes, watch_compiles
from .running.models import ModelSpec
from .running.prompts import LOOKUP, copy_point, grounded, long_prompt
from .running.runner import Runner
from .running.variants import ATTENTIONS
from .verdicts import beams, stopping
from .verdicts.choices import Floor, floor_of, judge_answer, summary
from .verdicts.equivalence import FLOOR_FACTOR, Generation, ratios_text
from .verdicts.scores import compare_scores
from .wiring.cases import Case

__all__ = [  # noqa: RUF022 (grouped by what a suite uses them for)
    # outcomes beyond pass and fail
    "inconclusive", "known_issue", "not_exercised", "not_run", "unsupported",
    # the case and its runners
    "Case", "Runner", "ModelSpec", "greedy_each_prompt",
    # prompts
    "LOOKUP", "copy_point", "grounded", "long_prompt",
    # verdicts
    "FLOOR_FACTOR", "Generation", "ratios_text", "compare_scores", "Floor", "floor_of", "judge_answer", "summary",
    # instruments
    "track_drafts", "compiled_forward", "count_compiled_calls", "dynamo_backend", "watch_compiles", "cache_layout",
    "static_cache_bytes",
    # transformers helpers across releases
    "ATTENTIONS", "cache_tensors", "compile_config", "early_exit_unsupported", "generate_kwargs", "layers_restored",
    "make_dynamic_cache", "make_static_cache",
    # toolkits of the domain suites
    "assistants", "batching", "beams", "footprint", "hybrid", "memory", "qlayers", "quantize", "stopping", "zoo",
]  # fmt: skip


def greedy_each_prompt(
    case: Case,
    what: str = "each prompt alone",
    *,
    candidate: Runner | None = None,
    both: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
    each: Callable[[Any, Any, Any], None] | None = None,
    explain: bool = False,
) -> tuple[list[Generation], list[Generation]]:
    """Each prompt alone (batch 1) through the plain path (``case.reference``) and the candidate (``case.target``
    unless given), then one ``check_greedy`` verdict over all their positions. ``both``: generate() arguments for
    both paths; ``extra``: for the candidate only (e.g. ``prompt_lookup_num_tokens``); ``each(prompt, ids, mask)``
    runs first for every prompt (e.g. a logits check); ``explain``: an exception of the candidate fails the check
    naming the prompt (``case.explain``). Returns the two lists of generations."""
    reference, target = case.reference, candidate or case.target
    plain: list[Generation] = []
    got: list[Generation] = []
    for prompt in case.prompts:
        ids, mask = target.encode(prompt.text)
        if each is not None:
            each(prompt, ids, mask)
        plain.append(reference.generate(ids, mask, case.new_tokens, **(both or {})))
        with case.explain(f"prompt {prompt.name!r}") if explain else contextlib.nullcontext():
            got.append(target.generate(ids, mask, case.new_tokens, **(both or {}), **(extra or {})))
    case.check_greedy(plain, got, what=what)
    return plain, got
