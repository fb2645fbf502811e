"""Proof of power: each fault, shaped like a real regression, makes the suite that guards against it
fail with a message that points at the cause; the same selection passes without the fault."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, replace

import faults
import pytest

from conftest import SUITES, smollm2


@dataclass(frozen=True)
class Fault:
    inject: Callable[[pytest.MonkeyPatch], None]
    suite: str
    select: str  # -k expression
    args: tuple[str, ...]
    expect: tuple[str, ...]  # fnmatch lines that must appear in the failure output


FAULTS = {
    "cache written at the wrong position": Fault(
        faults.cache_written_one_slot_early,
        "test_static_cache.py",
        "test_matches_dynamic and static",
        (),
        ("*logits left the rounding-noise floor of the plain path*", "*mean_rms * vs floor *", "*worst: prompt*new token*", "*reproduce: pytest*"),
    ),
    "cache not reset between calls": Fault(
        faults.reset_keeps_position,
        "test_static_cache.py",
        "test_reused_cache_object_after_reset or test_hand_written_decode_loop",
        (),
        ("*after StaticCache.reset() the cache still reports * cached positions*",),
    ),
    "unverified draft token accepted": Fault(
        faults.first_draft_accepted_unverified,
        "test_speculative.py",
        "test_contrarian_draft_is_always_rejected and dynamic",
        (),
        ("*contrarian draft*logits left the rounding-noise floor of the plain path*", "*tokens part at new token 1*"),
    ),
    "padding mask dropped": Fault(
        faults.padding_mask_dropped_by_sdpa,
        "test_attention.py",
        "test_logits_match_eager",
        ("--llmopt-variants=attention=sdpa",),
        ("*dynamic/sdpa/fp32@tiny-llama vs dynamic/eager/fp32 (padded batch): logits left the rounding-noise floor*",),
    ),
    "attention scale off by 2 %": Fault(
        faults.sdpa_scale_off,
        "test_attention.py",
        "test_logits_match_eager or test_single_prompt",
        ("--llmopt-variants=attention=sdpa",),
        ("*dynamic/sdpa/fp32@tiny-llama vs dynamic/eager/fp32 (padded batch): logits left the rounding-noise floor*", "*2 failed*"),
    ),
    "a recompile every step": Fault(
        faults.recompile_every_step,
        "test_compile.py",
        "test_auto_compile_does_not_recompile",
        ("--llmopt-variants=compile=auto", "--llmopt-new-tokens=5"),
        ("*graphs compiled during one warm-up call of 5 tokens*it recompiles while decoding*", "*dynamo's reasons:*_llmopt_tick*"),
    ),
    "a dynamic cache recompiles every token": Fault(
        faults.dynamic_cache_recompile_every_step,
        "test_compile.py",
        "test_compiled_forward_with_dynamic_cache",
        ("--llmopt-new-tokens=9",),
        ("*dynamic/sdpa/fp32@tiny-llama*: 6 more graph(s) compiled for 9 new tokens after a warm-up of 3 (3 graphs): the graph count grows with the number of new tokens*", "*dynamo's reasons:*_llmopt_step == 'step *"),
    ),
    "static cache sized per request": Fault(
        faults.static_cache_sized_per_request,
        "test_compile.py",
        "test_request_mix",
        (),
        ("*static+compile/sdpa/fp32@tiny-llama vs dynamic/sdpa/fp32: the request mix *it recompiles per request*", "*size mismatch at index*"),
    ),
    "auto-compile silently eager": Fault(
        faults.auto_compile_stays_eager,
        "test_compile.py",
        "test_auto_compile",
        ("--llmopt-variants=compile=auto", "--llmopt-new-tokens=5"),
        # Both auto-compile checks, each saying why: compiled == eager and no recompile prove nothing when eager.
        ("*AssertionError*auto-compile did not trigger*", "*AssertionError*auto-compile did not trigger*", "*2 failed*"),
    ),
    "biased sampling acceptance": Fault(
        faults.biased_speculative_acceptance,
        "test_speculative.py",
        "test_speculative_sampling_keeps_the_distribution and contrarian",
        (),
        ("*sampled tokens do not follow the target model's distribution*", "*Kolmogorov-Smirnov on 1600 PIT values*"),
    ),
    "top-k ignored while sampling": Fault(
        faults.top_k_warper_ignored,
        "test_speculative.py",
        "test_speculative_sampling_keeps_the_distribution and top-k",
        (),
        ("*(tempered-top-k draft): sampled tokens do not follow the target model's distribution*", "*Kolmogorov-Smirnov on * PIT values*"),
    ),
    "padding mask builder shared by every attention": Fault(
        faults.padding_mask_builder_ignores_padding,
        "test_consistency.py",
        "test_batch_rows_match_alone and dynamic and (eager or sdpa)",
        (),
        ("*batch = alone: each row of the padded batch vs its prompt alone*logits left the rounding-noise floor*", "*2 failed*"),
    ),
    "continuation re-feeds a cached token": Fault(
        faults.restart_refeeds_last_cached_token,
        "test_consistency.py",
        "test_continuation_matches_from_scratch",
        (),
        ("*continuation: second turn on the first turn's cache vs from scratch*logits left the rounding-noise floor*", "*2 failed*"),
    ),
    "generate leaves its static cache setting behind": Fault(
        faults.generate_leaves_static_cache_config,
        "test_static_cache.py",
        "test_matches_dynamic and static and not object",
        (),
        ("*no state left behind: generate() on static/sdpa/fp32 left the model changed: generation_config.cache_implementation: None -> 'static'*",),
    ),
    "accepted drafts cropped from the cache": Fault(
        faults.accepted_draft_cropped_from_cache,
        "test_prompt_lookup.py",
        "test_greedy_matches_plain_greedy and dynamic",
        (),
        ("*prompt lookup, each prompt alone (the grounded ones, and the copying one: *logits left the rounding-noise floor*",),
    ),
    "last agreeing draft token rejected": Fault(
        faults.last_agreeing_draft_rejected,
        "test_speculative.py",
        "test_draft_agreeing_for_k_tokens_has_k_accepted",
        (),
        ("*a draft that agrees with the target for exactly 3 new tokens had 2 of * draft tokens accepted (exactly 3 expected)*",),
    ),
    "EOS inside a draft block kept going": Fault(
        faults.eos_inside_draft_kept,
        "test_stopping.py",
        "test_eos_inside_a_draft_block_ends_the_output",
        (),
        ("*stopping at an EOS inside a draft block (self draft, prompt*new tokens generated where the rows stop after*",),
    ),
    "finished rows not padded": Fault(
        faults.finished_rows_not_padded,
        "test_stopping.py",
        "test_rows_stop_at_their_own_eos and dynamic and sdpa",
        (),
        ("*stopping at EOS (token * as EOS, met at new tokens *): row * kept generating after its EOS at new token *padding (0) expected*",),
    ),
    "one token past max_new_tokens": Fault(
        faults.max_length_one_late,
        "test_stopping.py",
        "test_exactly_max_new_tokens and dynamic",
        (),
        ("*exactly max_new_tokens: dynamic/sdpa/fp32, padded batch generated 2 new tokens for max_new_tokens=1 (one more)*",),
    ),
    "min_new_tokens one short": Fault(
        faults.min_new_tokens_one_short,
        "test_stopping.py",
        "test_min_new_tokens and dynamic",
        (),
        ("*min_new_tokens=* (token * as EOS, met at new tokens *): row * ended at new token *, before min_new_tokens*",),
    ),
    "processors see the wrong slice of a draft": Fault(
        faults.processors_see_the_draft_prefix_only,
        "test_processors.py",
        "test_drafts_under_processors_match_plain",
        (),
        ("*(self draft, prompt *, repetition_penalty 1.3, no_repeat_ngram_size 3*",),
    ),
    "stop string missed": Fault(
        faults.stop_string_never_matches,
        "test_stopping.py",
        "test_stop_strings and dynamic",
        (),
        ("*stop_strings=[[]*[]] (completed at new tokens *): row * kept generating after its stop at new token *",),
    ),
    "StaticCache not reordered between beams": Fault(
        faults.static_cache_not_reordered,
        "test_beams.py",
        "test_beams_match_dynamic_cache and static and not object",
        (),
        (
            "*static/sdpa/fp32@tiny-llama vs dynamic/sdpa/fp32 (padded batch, num_beams=3, num_return_sequences=2): the running beams' logits left the rounding-noise floor of the dynamic cache's beams*",
            "*worst: new token *, prompt *, beam *: max |Δlogit| *",
        ),
    ),
    "a token credited to the wrong beam": Fault(
        faults.token_credited_to_the_wrong_beam,
        "test_beams.py",
        "test_beams_match_dynamic_cache and static and not object",
        (),
        ("*(padded batch, num_beams=3, num_return_sequences=2): beam selection (dynamic cache): step 2, prompt 0: a candidate scoring * was dropped while one scoring * was kept*",),
    ),
    "a full sliding window rolled the wrong way": Fault(
        faults.sliding_window_rolls_the_wrong_way,
        "test_combined.py",
        "test_padded_batch_past_the_window and static/eager and not object",
        ("--llmopt-model=tiny-gemma2",),
        (
            "*static/eager/fp32@tiny-gemma2 vs dynamic/eager/fp32 (padded batch, * new tokens, every row past the sliding window of 48): logits left the rounding-noise floor*",
        ),
    ),
    "sampling: EOS inside a draft block kept going": Fault(
        faults.eos_inside_draft_kept,
        "test_stopping.py",
        "test_sampling_stops_at_the_eos",
        (),
        ("*dynamic/sdpa/fp32@tiny-llama vs dynamic/sdpa/fp32: sampling, stopping at an EOS inside a draft block (self draft, prompt *, token * as EOS, sampled at new token *): * new token(s) generated after it",),
    ),
    "sampling: finished rows not padded": Fault(
        faults.finished_rows_not_padded,
        "test_stopping.py",
        "test_sampling_stops_at_the_eos",
        (),
        ("*dynamic/sdpa/fp32@tiny-llama vs dynamic/sdpa/fp32: sampling, stopping at EOS (token * as EOS, met at new tokens *): row * kept generating after its EOS at new token *, padding (0) expected",),
    ),
    "paged block handed to two requests": Fault(
        faults.paged_block_handed_to_two_requests,
        "test_continuous_batching.py",
        "test_requests_match_greedy_alone",
        ("--llmopt-variants=attention=sdpa",),
        ("*(a mix of requests, attention sdpa): * request(s) not answered as plain greedy answers each alone*",
         "*which the higher-precision reference puts * below its best*", "*reproduce: pytest*"),
    ),
    "paged block freed while in use": Fault(
        faults.paged_block_freed_while_in_use,
        "test_continuous_batching.py",
        "test_scheduling_cannot_change_an_answer",
        ("--llmopt-variants=attention=sdpa",),
        ("*request(s) not answered as plain greedy answers each alone*", "*which the higher-precision reference puts * below its best*"),
    ),
    "continuous batching samples beyond top-k": Fault(
        faults.top_k_warper_ignored,
        "test_continuous_batching.py",
        "test_sampling_keeps_the_distribution and top",
        ("--llmopt-variants=attention=sdpa",),
        ("*(continuous batching, tempered-top-k, prompt *): sampled tokens do not follow the target model's distribution*",),
    ),
    "continuous batching cuts a request one token early": Fault(
        faults.request_cut_one_token_early,
        "test_continuous_batching.py",
        "test_requests_match_greedy_alone or test_each_request_stops_at_its_eos",
        ("--llmopt-variants=attention=sdpa",),
        ("*request story:whole*answered 23 token(s), the request allows exactly 24 here*", "*2 failed*"),
    ),
}


def _run(pytester: pytest.Pytester, fault: Fault) -> pytest.RunResult:
    return pytester.runpytest(str(SUITES / fault.suite), "-k", fault.select, "-p", "no:logging", "-p", "no:cacheprovider", *fault.args)


@pytest.mark.parametrize("name", list(FAULTS))
def test_fault_is_caught(name: str, pytester: pytest.Pytester, clean_env: pytest.MonkeyPatch) -> None:
    fault = FAULTS[name]
    fault.inject(clean_env)
    result = _run(pytester, fault)
    outcomes = result.parseoutcomes()
    assert outcomes.get("failed", 0) >= 1, f"{name}: the suite did not fail\n{result.stdout.str()[-3000:]}"
    result.stdout.fnmatch_lines(list(fault.expect))


@pytest.mark.parametrize("name", list(FAULTS))
def test_same_selection_passes_without_the_fault(name: str, pytester: pytest.Pytester, clean_env: pytest.MonkeyPatch) -> None:
    result = _run(pytester, FAULTS[name])
    outcomes = result.parseoutcomes()
    assert outcomes.get("passed", 0) >= 1 and not outcomes.get("failed") and not outcomes.get("errors"), result.stdout.str()[-3000:]


# Every fault that applies to a Llama (all but the sliding window's: a Llama has none), on the built-in trained model:
# 30 layers of trained weights and a 49,152-token vocabulary instead of 4 random layers and 512 tokens. They take
# over an hour on CI's two cores (the sampling faults draw 1,600 tokens at 30 layers, twenty minutes each), so they
# run where asked for (LLMOPT_TRAINED_FAULTS=1); CI runs smollm2-135m's main-job subset and these faults on tiny-llama.
#
# Left out, as no output of this model can show it: top-k ignored. Under the suite's settings (temperature 0.7, top-p
# 0.9, repetition penalty 1.2) the nucleus of smollm2-135m held more than 40 tokens at 1 of 384 sampled steps, and what
# top-k 40 removes from it averaged 0.012 % of the probability: a sampler that ignores top-k draws the same tokens
# (the suite's top-k check passes on it with or without the fault).
UNOBSERVABLE_ON_TRAINED = {"top-k ignored while sampling", "continuous batching samples beyond top-k"}
ON_A_TRAINED_LLAMA = [
    name for name, fault in FAULTS.items() if not any(a.startswith("--llmopt-model=") for a in fault.args) and name not in UNOBSERVABLE_ON_TRAINED
]
TRAINED_ASKED = os.environ.get("LLMOPT_TRAINED_FAULTS") == "1"


def _on(fault: Fault, model: str) -> Fault:
    """The fault's run on ``model``: its name in the expected messages, and its own pad token (the tiny models' is 0)."""
    expect = tuple(e.replace("@tiny-llama", f"@{model}").replace("padding (0) expected", "padding (*) expected") for e in fault.expect)
    return replace(fault, args=(*fault.args, f"--llmopt-model={model}"), expect=expect)


@pytest.mark.parametrize("name", ON_A_TRAINED_LLAMA)
def test_fault_is_caught_on_a_trained_model(name: str, pytester: pytest.Pytester, clean_env: pytest.MonkeyPatch) -> None:
    if not TRAINED_ASKED:
        pytest.skip("the faults on smollm2-135m take over an hour on 2 cores: LLMOPT_TRAINED_FAULTS=1 runs them")
    fault = _on(FAULTS[name], smollm2(clean_env))
    fault.inject(clean_env)
    result = _run(pytester, fault)
    assert result.parseoutcomes().get("failed", 0) >= 1, f"{name}: the suite did not fail on smollm2-135m\n{result.stdout.str()[-3000:]}"
    result.stdout.fnmatch_lines(list(fault.expect))
