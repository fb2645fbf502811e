"""Beam search and several return sequences on the fast paths, against the dynamic cache.

``num_beams=3, num_return_sequences=2`` on the padded batch: every step reorders the cache between beams
(a StaticCache must move its keys and values with its beams), and the returned sequences are the best
beams. Beam searches part for good at their first near-tie, so each path is judged on its own trace
(pytest_llmopt.verdicts.beams): every running beam's logits at every step against a higher-precision cache-free
forward of that beam's tokens, within the noise floor of the dynamic cache's beams judged the same way, and
every selection against the path's own scores. Whether the returned sequences equal the dynamic cache's is
recorded (``parted_at``; None when equal).

Compile: generate()'s auto-compile does not reach beam search's decode steps (5.24: only greedy, sampling
and assisted decoding), so compiled beams are what users write, ``model.forward = torch.compile(model.forward)``,
with the dynamic and the static cache (inductor on CUDA, dynamo's eager backend on CPU).
"""

from __future__ import annotations

import pytest

from pytest_llmopt.api import (
    FLOOR_FACTOR,
    beams,
    compiled_forward,
    dynamo_backend,
    make_static_cache,
    not_exercised,
    ratios_text,
    watch_compiles,
)

BEAMS, RETURNED = 3, 2
PLAIN = {"cache": "dynamic", "compile": "off"}
SAID = f"num_beams={BEAMS}, num_return_sequences={RETURNED}"


def _fail(message: str) -> None:
    pytest.fail(message, pytrace=False)


def _beams(case, runner, ids, mask, what: str) -> beams.BeamRun:
    extra = {}
    if runner.variant.cache == "static-object":  # the cache holds every beam of every prompt
        extra["cache_object"] = make_static_cache(runner.model, ids.shape[0] * BEAMS, ids.shape[1] + case.new_tokens)
    with case.explain(what):
        return beams.run(runner, ids, mask, case.new_tokens, BEAMS, RETURNED, **extra)


def _judge(case, plain: beams.BeamRun, got: beams.BeamRun, what: str) -> None:
    label = f"{case.label} ({what}, {SAID})"
    expected = (got.batch * RETURNED, got.prompt_ids.shape[1] + case.new_tokens)
    if tuple(got.sequences.shape) != expected:
        _fail(f"{label}: returned sequences of shape {tuple(got.sequences.shape)}, {expected} expected")
    for side, run in (("dynamic cache", plain), ("path", got)):
        problem = beams.selection_problem(run)
        if problem is not None:
            _fail(f"{label}: beam selection ({side}): {problem}")
    precise = case.precise()
    verdict = beams.judge_trace(plain, got, precise, FLOOR_FACTOR[case.dtype])
    parted = beams.parted(plain, got)
    case.record(parted_at=parted, beam_floor_ratio=max(verdict.ratios.values(), default=0.0), beam_positions=verdict.candidate.positions)
    if not verdict.ok:
        parting = "the returned sequences equal the dynamic cache's" if parted is None else f"its beams part from the dynamic cache's at new token {parted}"
        _fail(
            f"{label}: the running beams' logits left the rounding-noise floor of the dynamic cache's beams "
            f"(each against a cache-free forward of its own tokens): {ratios_text(verdict)}\n"
            f"  worst: {verdict.stats.get('worst')}; {parting} (e.g. a cache not reordered between beams)\n  reproduce: {case.reproduce}"
        )


def _batch(case):
    return case.target.encode([p.text for p in case.prompts])


@pytest.mark.llmopt(cache=["static", "static-object"], reference=PLAIN)
def test_beams_match_dynamic_cache(llmopt_case):
    """Beam search with a static cache (generate()'s and a StaticCache object) on the padded batch."""
    case = llmopt_case
    ids, mask = _batch(case)
    plain = _beams(case, case.reference, ids, mask, "beam search, dynamic cache")
    got = _beams(case, case.target, ids, mask, "beam search")
    _judge(case, plain, got, "padded batch")


@pytest.mark.llmopt(cache=["dynamic", "static"], reference=PLAIN, known_issues=["dynamic-cache-int-recompiles"])
def test_beams_with_compiled_forward(llmopt_case):
    """Beam search with ``model.forward = torch.compile(model.forward)``: every step calls the compiled forward,
    and dynamo never hits its recompile limit (a silent fall back to eager; a static cache reordered by
    reassignment is where that would start)."""
    case = llmopt_case
    ids, mask = _batch(case)
    plain = _beams(case, case.reference, ids, mask, "beam search, dynamic cache")
    with compiled_forward(case.target.model, dynamo_backend(case.device_type)) as calls, watch_compiles() as seen:
        got = _beams(case, case.target, ids, mask, "beam search, compiled forward")
    case.record(compiled_forward_calls=calls["calls"], graphs=seen.graphs)
    if calls["calls"] == 0:
        not_exercised("generate() never called the compiled forward during beam search")
    if seen.limit_hits:
        _fail(f"{case.label} (beam search, {SAID}): the compiled forward hit dynamo's recompile limit, so it fell back to eager: {'; '.join(seen.limit_hits)}")
    if calls["calls"] != case.new_tokens:
        _fail(f"{case.label} (beam search, {SAID}): {calls['calls']} compiled forward calls for {case.new_tokens} new tokens (one per step expected)")
    _judge(case, plain, got, f"padded batch, forward compiled ({dynamo_backend(case.device_type)})")
