"""torch.compile: compiled decoding gives the eager answer, and does not recompile once warm.

Two ways users compile: generate()'s own auto-compile of the decode step when the cache is static
(``compile=auto``; on CPU the plugin asks generate to compile anyway, in inductor's default mode), and
``torch.compile(model.forward, fullgraph=True)`` in the guide's hand-written decode loop
(``compile=default`` or ``reduce-overhead``, the latter with CUDA graphs, GPU only). A model without
``_can_compile_fullgraph`` is reported unsupported.
"""

from __future__ import annotations

import contextlib

import pytest

from pytest_llmopt.instrumentation import count_compiled_calls
from pytest_llmopt.measure import cache_layout, watch_compiles

TO_EAGER = {"cache": "dynamic", "compile": "off"}
WARMUP_GRAPHS = 2  # a decode graph, and at most one more (e.g. the first decode step's mask shape)


@pytest.mark.llmopt(cache="static", compile="auto", reference=TO_EAGER)
def test_auto_compile_matches_eager(llmopt_case):
    """generate() with a static cache compiles its decode steps: the tokens equal eager, dynamic-cache ones."""
    case = llmopt_case
    reference, target = case.reference, case.target
    with count_compiled_calls(target.model) as compiled:
        for prompt in case.prompts:
            ids, mask = reference.encode(prompt.text)
            case.check_greedy(
                reference.generate(ids, mask, case.new_tokens),
                target.generate(ids, mask, case.new_tokens),
                what=f"prompt {prompt.name!r}",
            )
    case.record(compiled_forward_calls=compiled["calls"])
    assert compiled["calls"] > 0, f"{case.label}: generate() never called its compiled forward: auto-compile did not trigger"


@pytest.mark.llmopt(cache="static-object", compile=["default", "reduce-overhead"], reference=TO_EAGER)
def test_fullgraph_decode_loop_matches_eager(llmopt_case):
    """torch.compile(forward, fullgraph=True) in the guide's decode loop: tokens equal eager generate()."""
    case = llmopt_case
    reference, target = case.reference, case.target
    for prompt in case.prompts:
        ids, mask = reference.encode(prompt.text)
        case.check_greedy(
            reference.generate(ids, mask, case.new_tokens),
            target.generate(ids, mask, case.new_tokens),
            what=f"prompt {prompt.name!r}",
        )


@pytest.mark.llmopt(cache="static", compile="auto", reference=TO_EAGER)
def test_auto_compile_does_not_recompile(llmopt_case):
    """generate()'s auto-compile: after one warm-up call, same-shape calls with other inputs compile nothing."""
    _check_recompiles(llmopt_case)


@pytest.mark.llmopt(cache="static-object", compile=["default", "reduce-overhead"], reference=TO_EAGER)
def test_decode_loop_does_not_recompile(llmopt_case):
    """The compiled decode loop: after one warm-up call, same-shape calls with other inputs compile nothing."""
    _check_recompiles(llmopt_case)


def _check_recompiles(case):
    """A recompile per step (a guard on a value that changes every token) costs seconds per call and, past
    dynamo's recompile limit, silently falls back to eager; both show up here, with dynamo's reasons."""
    target = case.target
    texts = [p.text for p in case.prompts]
    width = min(len(target.tokenizer(t)["input_ids"]) for t in texts)
    encoded = [target.encode(t)[0][:, :width] for t in texts]  # same shape, different tokens
    with watch_compiles() as warmup:
        target.generate(encoded[0], None, case.new_tokens)
    auto = target.variant.compile == "auto"
    with watch_compiles() as after, count_compiled_calls(target.model) if auto else contextlib.nullcontext({}) as compiled:
        for ids in encoded[1:] + encoded[:1]:
            target.generate(ids, None, case.new_tokens)
    case.record(compiles_warmup=warmup.graphs, recompiles=after.graphs)
    # No recompile is only worth something if the compiled code ran (an auto-compile that silently stayed
    # eager compiles nothing either).
    assert not auto or compiled["calls"] > 0, f"{case.label}: generate() never called its compiled forward: auto-compile did not trigger"
    # A sliding-window layer changes branch once its window is full (transformers' StaticSlidingWindowLayer):
    # one more graph when the warm-up crosses the window; none after warm-up either way.
    layout = cache_layout(target.model.config)
    allowed = WARMUP_GRAPHS + (1 if layout.sliding_layers and width + case.new_tokens > (layout.window or 0) else 0)
    assert warmup.graphs <= allowed, (
        f"{case.label}: {warmup.graphs} graphs compiled during one warm-up call of {case.new_tokens} tokens "
        f"(expected at most {allowed}): it recompiles while decoding.\n  dynamo's reasons: {_reasons(warmup.reasons)}"
    )
    assert after.graphs == 0, (
        f"{case.label}: {after.graphs} recompile(s) after warm-up on same-shape inputs.\n  dynamo's reasons: {_reasons(after.reasons)}"
    )


def _reasons(reasons: list[str] | None) -> str:
    unique = list(dict.fromkeys(reasons or []))
    return "; ".join(unique[:5]) + (f" (+{len(unique) - 5} more)" if len(unique) > 5 else "") if unique else "none recorded"
