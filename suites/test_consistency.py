"""Properties every generation path must have, each judged by a reference that does not share the code it
checks (comparing two paths that run through the same mask builder, position logic and cache classes cannot
see a fault in what they share):

* batch = alone: each row of a left-padded batch gives the logits and tokens of its prompt run alone, on
  every cache and attention implementation, the plain path included;
* continuation: generating on from the cache a first call filled (dynamic and static, multi-turn style)
  equals generating the whole text from scratch;
* no state left behind: a plain generate repeats its first answer after any path has run. (That every
  generate() leaves the model's config, generation_config and attention implementation unchanged is
  checked on every call of every suite: runner.Runner.generate.)

All verdicts are the noise-floor rule of equivalence.py against a higher-precision cache-free forward.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from pytest_llmopt.api import LOOKUP, assistants, make_dynamic_cache, make_static_cache, not_run

ATTENTIONS = ["eager", "sdpa", "flash_attention_2", "flex_attention"]
FLEX = ["torch-flex-attention-cpu-codegen"]  # the decode-logits issue needs a compiled forward: test_combined
# 4.x Gemma2: SDPA without its soft-capping, and a decode-step window mask that lets a padded row see its padding
GEMMA2_4X = ["sdpa-ignores-attention-softcap", "gemma2-decode-window-mask-misaligned"]
PLAIN = {"cache": "dynamic", "compile": "off"}  # the attention stays the model's default
FOLLOW_UP = "\nNow tell the same story again, in other words."


def _batch_rows_match_alone(case) -> None:
    target = case.target
    ids, mask = target.encode([p.text for p in case.prompts])
    if bool(mask.all()):
        not_run("the prompts tokenize to equal lengths, so the batch has no padding to check")
    with case.explain("left-padded batch"):
        batch = target.generate(ids, mask, case.new_tokens)
    alone = []
    for prompt in case.prompts:
        alone_ids, alone_mask = target.encode(prompt.text)
        with case.explain(f"prompt {prompt.name!r} alone"):
            alone.append(target.generate(alone_ids, alone_mask, case.new_tokens))
    rows = [batch.row(index) for index in range(len(case.prompts))]
    case.check_greedy(alone, rows, what="batch = alone: each row of the padded batch vs its prompt alone", plain=target)


@pytest.mark.llmopt(cache=["dynamic", "static"], attention=ATTENTIONS, reference={}, known_issues=[*FLEX, *GEMMA2_4X, "gptneo-flash-attention-4d-mask-slice", "gpt2-flash-attention-not-causal-with-mask"])
def test_batch_rows_match_alone(llmopt_case):
    """Each row of a left-padded batch generates what its prompt generates alone, on this very path."""
    _batch_rows_match_alone(llmopt_case)


@pytest.mark.llmopt(cache="static", compile="auto", reference={}, known_issues=GEMMA2_4X)
def test_compiled_batch_rows_match_alone(llmopt_case):
    """The same with generate()'s auto-compile: a compiled padded batch generates what each prompt does alone."""
    _batch_rows_match_alone(llmopt_case)


@pytest.mark.llmopt(cache=["dynamic", "static-object"], reference={}, known_issues=["sliding-cache-shifts-one-slot"])
def test_continuation_matches_from_scratch(llmopt_case):
    """A second turn generated on from the cache the first turn filled (the returned cache object, the
    first turn's tokens and a follow-up) equals the same text generated from scratch."""
    case = llmopt_case
    target = case.target
    first_ids, first_mask = target.encode(case.prompts[0].text)
    follow = target.tokenizer(FOLLOW_UP, add_special_tokens=False, return_tensors="pt")["input_ids"].to(first_ids.device)
    length = first_ids.shape[1] + case.new_tokens + follow.shape[1] + case.new_tokens
    second: dict[str, torch.Tensor] = {}

    def continued(force: torch.Tensor | None = None):
        model = target.model
        cache = make_dynamic_cache(model, length) if case.variant.cache == "dynamic" else make_static_cache(model, 1, length)
        turn = target.generate(first_ids, first_mask, case.new_tokens, cache_object=cache)
        ids = second.setdefault("ids", torch.cat([turn.sequences.to(follow.device), follow], dim=1))
        out = target.generate(ids, torch.ones_like(ids), case.new_tokens, force=force, cache_object=cache)
        return replace(out, replay=lambda tokens: continued(tokens))

    with case.explain("continuation from the first turn's cache"):
        candidate = continued()
    ids = second["ids"]
    with case.explain("the whole text from scratch"):
        scratch = target.generate(ids, torch.ones_like(ids), case.new_tokens)
    case.check_greedy(scratch, candidate, what="continuation: second turn on the first turn's cache vs from scratch", plain=target)


@pytest.mark.llmopt(cache=["dynamic", "static", "static-object"], reference=PLAIN)
def test_plain_answer_unchanged_after(llmopt_case):
    """Plain greedy on a padded batch, then this path (and on the dynamic cache, assisted and prompt-lookup
    decoding), then plain greedy again: the second plain answer is the first."""
    case = llmopt_case
    reference, target = case.reference, case.target
    ids, mask = reference.encode([p.text for p in case.prompts])
    first = reference.generate(ids, mask, case.new_tokens)
    one_ids, one_mask = target.encode(case.prompts[0].text)  # assisted decoding takes batch 1
    paths = [(f"{case.variant.id} on the padded batch", ids, mask, {})]
    if case.variant.cache == "dynamic":
        paths += [("self-assisted decoding", one_ids, one_mask, {"assistant_model": assistants.build(target.model, "self")}),
                  ("prompt lookup", one_ids, one_mask, LOOKUP)]
    for name, path_ids, path_mask, extra in paths:
        with case.explain(name):
            target.generate(path_ids, path_mask, case.new_tokens, **extra)
        again = reference.generate(ids, mask, case.new_tokens)
        case.check_greedy(first, again, what=f"no state left behind: plain greedy after {name} vs before", plain=reference)
