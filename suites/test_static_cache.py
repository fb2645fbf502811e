"""Static kv-cache: the same greedy tokens as the dynamic cache, however the cache is used.

Covers ``cache_implementation="static"``, a StaticCache object handed to generate(), the guide's
hand-written decode loop, reuse of one cache across prompts (``reset()``), batch and length growing
between calls (the cache must be re-allocated), and the memory the cache allocates.
"""

from __future__ import annotations

import pytest

from pytest_llmopt.api import cache_tensors, greedy_each_prompt, make_static_cache, not_run, static_cache_bytes

TO_DYNAMIC = {"cache": "dynamic"}


@pytest.mark.llmopt(cache=["static", "static-object"], reference=TO_DYNAMIC)
def test_matches_dynamic(llmopt_case):
    """Each prompt alone (batch 1): static-cache tokens equal dynamic-cache tokens, up to near-ties."""
    greedy_each_prompt(llmopt_case, explain=True)


@pytest.mark.llmopt(cache=["static", "static-object"], reference=TO_DYNAMIC)
def test_padded_batch_matches_dynamic(llmopt_case):
    """All prompts in one left-padded batch: padding must be masked in the static cache too."""
    case = llmopt_case
    reference, target = case.reference, case.target
    ids, mask = reference.encode([p.text for p in case.prompts])
    if bool(mask.all()):
        not_run("the prompts tokenize to equal lengths, so the batch has no padding to check")
    case.check_greedy(reference.generate(ids, mask, case.new_tokens), target.generate(ids, mask, case.new_tokens))


@pytest.mark.llmopt(cache="static", reference=TO_DYNAMIC)
def test_second_prompt_gets_its_own_answer(llmopt_case):
    """generate() keeps its static cache between calls: a long prompt, then a short one and back must
    each give their own answer, not one computed on a stale cache."""
    case = llmopt_case
    reference, target = case.reference, case.target
    texts = sorted((p.text for p in case.prompts), key=len, reverse=True)
    order = [texts[0], texts[-1], texts[0]] if len(texts) > 1 else [texts[0], texts[0]]
    plain, got = [], []
    for number, text in enumerate(order):
        ids, mask = reference.encode(text)
        with case.explain(f"call {number + 1} of {len(order)}"):
            got.append(target.generate(ids, mask, case.new_tokens))
        plain.append(reference.generate(ids, mask, case.new_tokens))
    case.check_greedy(plain, got, what=f"{len(order)} calls in turn")


@pytest.mark.llmopt(cache="static-object", reference=TO_DYNAMIC)
def test_reused_cache_object_after_reset(llmopt_case):
    """One StaticCache object, reset() between prompts, passed to generate(): every prompt is answered
    as if the cache were new."""
    case = llmopt_case
    reference, target = case.reference, case.target
    encoded = [reference.encode(p.text) for p in case.prompts]
    longest = max(ids.shape[1] for ids, _ in encoded)
    cache = make_static_cache(target.model, 1, longest + case.new_tokens)
    plain, got = [], []
    for prompt, (ids, mask) in zip(case.prompts, encoded):
        _reset(case, cache)
        with case.explain(f"prompt {prompt.name!r} on the reused cache"):
            got.append(target.generate(ids, mask, case.new_tokens, cache_object=cache))
        plain.append(reference.generate(ids, mask, case.new_tokens))
    case.check_greedy(plain, got, what="each prompt on the reused cache")


@pytest.mark.llmopt(cache="static-object", reference=TO_DYNAMIC)
def test_hand_written_decode_loop(llmopt_case):
    """The guide's decode_one_tokens loop on one StaticCache, reused across prompts with reset()."""
    case = llmopt_case
    reference, target = case.reference, case.target
    encoded = [reference.encode(p.text) for p in case.prompts]
    longest = max(ids.shape[1] for ids, _ in encoded)
    cache = make_static_cache(target.model, 1, longest + case.new_tokens)
    plain, got = [], []
    for prompt, (ids, mask) in zip(case.prompts, encoded):
        _reset(case, cache)
        with case.explain(f"prompt {prompt.name!r}, hand-written loop on the reused cache"):
            got.append(target.decode_loop(ids, case.new_tokens, cache=cache))
        plain.append(reference.generate(ids, mask, case.new_tokens))
    case.check_greedy(plain, got, what="each prompt, hand-written loop on the reused cache")


@pytest.mark.llmopt(cache="static", reference=TO_DYNAMIC)
def test_batch_and_length_growing_between_calls(llmopt_case):
    """Batch 1, then a padded batch of all prompts, then twice the new tokens: the static cache generate()
    keeps must be re-allocated each time it is too small."""
    case = llmopt_case
    reference, target = case.reference, case.target
    texts = [p.text for p in case.prompts]
    steps = [([texts[0]], case.new_tokens), (texts, case.new_tokens), (texts, 2 * case.new_tokens)]
    for batch, new_tokens in steps:
        ids, mask = reference.encode(batch)
        case.check_greedy(
            reference.generate(ids, mask, new_tokens),
            target.generate(ids, mask, new_tokens),
            what=f"batch {len(batch)}, {new_tokens} new tokens",
        )


@pytest.mark.llmopt(cache="static-object", reference=TO_DYNAMIC)
def test_allocated_size_matches_formula(llmopt_case):
    """A StaticCache allocates exactly 2 x batch x kv_heads x head_dim x bytes x (positions of every layer),
    where sliding-window layers hold min(window, max_len) positions, and it does not grow while used."""
    case = llmopt_case
    target = case.target
    ids, mask = target.encode([p.text for p in case.prompts])
    batch, max_len = ids.shape[0], ids.shape[1] + case.new_tokens
    cache = make_static_cache(target.model, batch, max_len)
    target.generate(ids, mask, case.new_tokens, cache_object=cache)
    allocated = sum(t.numel() * t.element_size() for t in cache_tensors(cache))
    expected = static_cache_bytes(target.model.config, batch, max_len, target.model.dtype.itemsize)
    case.record(static_cache_bytes=allocated, static_cache_expected_bytes=expected)
    assert allocated == expected, (
        f"{case.label}: StaticCache(batch={batch}, max_cache_len={max_len}) holds {allocated} bytes, "
        f"the formula gives {expected} ({allocated / expected:.3f}x)"
    )
    _reset(case, cache)
    target.generate(ids, mask, case.new_tokens, cache_object=cache)
    again = sum(t.numel() * t.element_size() for t in cache_tensors(cache))
    assert again == allocated, f"{case.label}: the StaticCache grew from {allocated} to {again} bytes on reuse"


def _reset(case, cache):
    """reset() must empty the cache: a position counter left behind appends the next prompt to the last."""
    cache.reset()
    left = int(cache.get_seq_length())
    assert left == 0, (
        f"{case.label}: after StaticCache.reset() the cache still reports {left} cached positions; "
        "the next prompt would be written after the previous one (a stale cache)"
    )
