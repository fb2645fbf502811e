"""torch.compile: compiled decoding gives the eager answer, and does not recompile once warm.

Two ways users compile: generate()'s own auto-compile of the decode step when the cache is static
(``compile=auto``; on CPU the plugin asks generate to compile anyway, in inductor's default mode), and
``torch.compile(model.forward, fullgraph=True)`` in the guide's hand-written decode loop
(``compile=default`` or ``reduce-overhead``, the latter with CUDA graphs, GPU only). A model without
``_can_compile_fullgraph`` is reported unsupported. Recompiles are checked on one repeated request, on
a serving-like mix of lengths, batch sizes and output lengths, and for ``model.forward =
torch.compile(model.forward)`` with a dynamic cache; dynamo's recompile limit stays in force, so a
silent fall back to eager shows as a failure. Each check starts from an empty dynamo cache (``_fresh_dynamo``).
"""

from __future__ import annotations

import contextlib

import pytest

from pytest_llmopt.api import (
    cache_layout,
    compile_config,
    compiled_forward,
    count_compiled_calls,
    dynamo_backend,
    greedy_each_prompt,
    watch_compiles,
)

TO_EAGER = {"cache": "dynamic", "compile": "off"}
WARMUP_GRAPHS = 2  # a decode graph, and at most one more (e.g. the first decode step's mask shape)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Each check here counts graphs, recompiles and recompile-limit hits from an empty dynamo cache, as a process
    that compiles one model does. dynamo's cache is the process's, per code object, and every model class's forward
    can be one shared decorator (4.57's ``can_return_tuple`` wrapper): after the earlier checks of two models it held
    25 entries, and a check that passes alone hit the recompile limit."""
    import torch._dynamo

    torch._dynamo.reset()


@pytest.mark.llmopt(cache="static", compile="auto", reference=TO_EAGER)
def test_auto_compile_matches_eager(llmopt_case):
    """generate() with a static cache compiles its decode steps: the tokens equal eager, dynamic-cache ones."""
    case = llmopt_case
    target = case.target
    with count_compiled_calls(target.model) as compiled:
        greedy_each_prompt(case)
    case.record(compiled_forward_calls=compiled["calls"])
    assert compiled["calls"] > 0, f"{case.label}: generate() never called its compiled forward: auto-compile did not trigger"


@pytest.mark.llmopt(cache="static-object", compile=["default", "reduce-overhead"], reference=TO_EAGER)
def test_fullgraph_decode_loop_matches_eager(llmopt_case):
    """torch.compile(forward, fullgraph=True) in the guide's decode loop: tokens equal eager generate()."""
    greedy_each_prompt(llmopt_case)


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
    # One more graph where the warm-up crosses a sliding window; none after warm-up either way.
    allowed = WARMUP_GRAPHS + _window_graphs(target.model, width + case.new_tokens)
    assert warmup.graphs <= allowed, (
        f"{case.label}: {warmup.graphs} graphs compiled during one warm-up call of {case.new_tokens} tokens "
        f"(expected at most {allowed}): it recompiles while decoding.\n  dynamo's reasons: {_reasons(warmup.reasons)}"
    )
    assert after.graphs == 0, (
        f"{case.label}: {after.graphs} recompile(s) after warm-up on same-shape inputs.\n  dynamo's reasons: {_reasons(after.reasons)}"
    )


@pytest.mark.llmopt(cache="static", compile="auto", reference=TO_EAGER)
def test_request_mix_compiles_a_bounded_number_of_graphs(llmopt_case):
    """A serving-like mix under one cache size (prompts of several lengths, batch 1 and 4, several
    max_new_tokens), twice: the first pass compiles a bounded number of graphs, the second none, no
    function hits dynamo's recompile limit, and every decode step goes through the compiled forward."""
    case = llmopt_case
    target = case.target
    mix = _request_mix(case)
    ceiling = max(ids.shape[1] + n for ids, _, n in mix)
    extra: dict = {"max_cache_len": ceiling} if compat_max_cache_len() else {}
    if dynamo_backend(case.device_type) != "inductor":
        extra["compile_config"] = compile_config(all_devices=True, backend=dynamo_backend(case.device_type), mode=None)
    # Largest request first: releases without max_cache_len size the cache to the largest call so far.
    mix.sort(key=lambda r: -(r[0].shape[1] + r[2]))
    with watch_compiles() as first:
        for ids, mask, n in mix:
            target.generate(ids, mask, n, **extra)
    with watch_compiles() as second, count_compiled_calls(target.model) as compiled:
        for ids, mask, n in reversed(mix):
            target.generate(ids, mask, n, **extra)
    steps = sum(n - 1 for _, _, n in mix)
    batches = len({ids.shape[0] for ids, _, _ in mix})
    layout = cache_layout(target.model.config)
    allowed = batches * (WARMUP_GRAPHS + 1) + (1 if layout.sliding_layers else 0)
    case.record(requests=len(mix), compiles_first_pass=first.graphs, recompiles_second_pass=second.graphs,
                compiled_forward_calls=compiled["calls"], decode_steps=steps)
    hits = first.limit_hits + second.limit_hits
    assert not hits, f"{case.label}: the request mix hit dynamo's recompile limit, so it fell back to eager (it recompiles per request): {'; '.join(hits)}"
    assert compiled["calls"] >= steps, (
        f"{case.label}: {compiled['calls']} compiled forward calls for {steps} decode steps in the second pass: "
        "some decode steps ran eager"
    )
    assert first.graphs <= allowed, (
        f"{case.label}: the request mix compiled {first.graphs} graphs ({len(mix)} requests under one cache size, "
        f"at most {allowed} expected for {batches} batch sizes): it recompiles per request.\n"
        f"  dynamo's reasons: {_reasons(first.reasons)}"
    )
    assert second.graphs == 0, (
        f"{case.label}: {second.graphs} recompile(s) when the same request mix came again.\n  dynamo's reasons: {_reasons(second.reasons)}"
    )


@pytest.mark.llmopt(cache="dynamic", reference=TO_EAGER, known_issues=["dynamic-cache-int-recompiles"])
def test_compiled_forward_with_dynamic_cache(llmopt_case):
    """``model.forward = torch.compile(model.forward)`` with the default dynamic cache: the cache grows
    every step, so dynamo must mark the length dynamic once and stop compiling; a call with three times
    the new tokens compiles nothing more, nothing hits the recompile limit, and the tokens equal eager."""
    case = llmopt_case
    reference, target = case.reference, case.target
    ids, mask = reference.encode([p.text for p in case.prompts])
    short = max(2, case.new_tokens // 3)
    with compiled_forward(target.model, dynamo_backend(case.device_type)) as calls, watch_compiles() as first:
        target.generate(ids, mask, short)
    with compiled_forward(target.model, dynamo_backend(case.device_type)) as calls, watch_compiles() as longer:
        generated = target.generate(ids, mask, 3 * short)
    case.record(compiles_short=first.graphs, recompiles_longer=longer.graphs, compiled_forward_calls=calls["calls"])
    hits = first.limit_hits + longer.limit_hits
    if hits:
        pytest.fail(f"{case.label}: the compiled forward hit dynamo's recompile limit, so it fell back to eager: {'; '.join(hits)}", pytrace=False)
    assert calls["calls"] == 3 * short, f"{case.label}: {calls['calls']} compiled forward calls for {3 * short} new tokens"
    allowed = _window_graphs(target.model, ids.shape[1] + 3 * short)
    if longer.graphs > allowed:
        pytest.fail(
            f"{case.label}: {longer.graphs} more graph(s) compiled for {3 * short} new tokens after a warm-up of {short} "
            f"({first.graphs} graphs): the graph count grows with the number of new tokens.\n  dynamo's reasons: {_reasons(longer.reasons)}",
            pytrace=False,
        )
    case.check_greedy(reference.generate(ids, mask, 3 * short), generated, what="compiled forward, dynamic cache")


def _request_mix(case) -> list:
    """(ids, mask, max_new_tokens): each prompt alone and its first half, and the padded batch of all."""
    target = case.target
    n = case.new_tokens
    lengths = [n, max(2, n // 2), max(2, n // 3)]
    mix = []
    for i, prompt in enumerate(case.prompts):
        ids, mask = target.encode(prompt.text)
        half = max(1, ids.shape[1] // 2)
        mix.append((ids, mask, lengths[i % 3]))
        mix.append((ids[:, :half], mask[:, :half], lengths[(i + 1) % 3]))
    ids, mask = target.encode([p.text for p in case.prompts])
    mix.append((ids, mask, lengths[0]))
    mix.append((ids, mask, lengths[2]))
    return mix


def _window_graphs(model, length: int) -> int:
    """A sliding-window layer changes branch once its window is full (transformers' sliding-window cache
    layers): one more graph for a call whose ``length`` crosses the window, none otherwise."""
    layout = cache_layout(model.config)
    return 1 if layout.sliding_layers and length > (layout.window or 0) else 0


def compat_max_cache_len() -> bool:
    """generate(max_cache_len=...) exists from transformers 5.2x; before, the cache keeps the largest size seen."""
    from transformers import GenerationConfig

    return hasattr(GenerationConfig(), "max_cache_len")


def _reasons(reasons: list[str] | None) -> str:
    unique = list(dict.fromkeys(reasons or []))
    return "; ".join(unique[:5]) + (f" (+{len(unique) - 5} more)" if len(unique) > 5 else "") if unique else "none recorded"
