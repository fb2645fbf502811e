"""Stopping: every path stops each row where its EOS is, pads it after, and never gives one token more.

The EOS is a token the path itself generates (pytest_llmopt.verdicts.stopping: random-weight models almost never
choose their real one, and generate() treats every id in ``eos_token_id`` alike), chosen so that the rows
of the padded batch meet it at different steps. Each check compares the path with the same path run with
nothing able to stop it, so a near-tie between two paths cannot raise a false alarm:

* rows end at different steps, each cut after its own EOS and padded to the longest (every cache,
  attention implementation and generate()'s auto-compile);
* an EOS accepted inside a draft block (assisted decoding with the target as its own draft, which accepts
  whole blocks) ends the output there, and prompt lookup stops the same way;
* ``min_new_tokens``: no row ends earlier, rows whose EOS comes later end where they did;
* ``stop_strings``: each row ends on the token that completes the string;
* exactly ``max_new_tokens`` new tokens, never one more, for short lengths too, on every path;
* in sampling mode, an EOS inside a speculative-sampling or prompt-lookup block ends the output, and the padded
  batch's rows end where their seeded unstopped twin met the EOS (plain sampling draws the same numbers).
"""

from __future__ import annotations

import pytest
import torch

from pytest_llmopt.api import LOOKUP, assistants, grounded, not_exercised, not_run, stopping, track_drafts

CACHES = ["dynamic", "static", "static-object"]
ATTENTIONS = ["eager", "sdpa", "flash_attention_2", "flex_attention"]
FLEX = ["torch-flex-attention-cpu-codegen"]  # the decode-logits issue needs a compiled forward: test_combined
BLOCK = assistants.DRAFT_TOKENS + 1  # tokens one verification of an all-accepted draft adds (drafts + the bonus)
SHORT = (1, 2, 3, BLOCK, BLOCK + 1)  # max_new_tokens around one draft block


def _require(ok: bool, message: str) -> None:
    """A verdict as pytest.fail (as the other suites' verdicts), so a known issue declared for the path covers it."""
    if not ok:
        pytest.fail(message, pytrace=False)


def _pad(target) -> int:
    pad = target.tokenizer.pad_token_id
    return int(pad if pad is not None else target.eos_ids[0])


def _never(target, free) -> set[int]:
    """Tokens that cannot be the designated EOS: the pad and every id the path was told never to pick."""
    return {_pad(target), *target.eos_ids, *free.suppressed}


def _as_eos(target, token: int) -> dict:
    return {"eos_token_id": [token], "pad_token_id": _pad(target)}


def _batch(case):
    return case.target.encode([p.text for p in case.prompts])


def _free_batch(case, sample: bool = False):
    """The padded batch, its run with nothing able to stop it (seeded when sampling), and the EOS chosen from it."""
    ids, mask = _batch(case)
    with case.explain(f"{_mode(sample)}padded batch, nothing able to stop it"):
        free = _run(case, ids, mask, sample)
    found = stopping.plan(free.new_tokens, _never(case.target, free))
    if found is None:
        not_run("no generated token first occurs at different steps in different rows, so no EOS can end them at different steps")
    return ids, mask, free, found


def _rows_stop(case, sample: bool = False) -> None:
    """Rows end at their own EOS and are padded, against the unstopped run (its seeded twin when sampling: plain
    sampling's draws do not depend on the EOS)."""
    target = case.target
    mode = _mode(sample)
    ids, mask, free, found = _free_batch(case, sample)
    with case.explain(f"{mode}padded batch, token {found.token} as EOS"):
        stopped = _run(case, ids, mask, sample, **_as_eos(target, found.token))
    problem = stopping.difference(stopping.cut(free.new_tokens, found.firsts, _pad(target)), stopped.new_tokens, found.firsts)
    prefix = "sampled_" if sample else ""
    case.record(**{f"{prefix}stop_token": found.token, f"{prefix}stop_steps": stopping.describe(found.firsts)})
    _require(problem is None, f"{case.label}: {mode}stopping at EOS (token {found.token} as EOS, met at new tokens {stopping.describe(found.firsts)}): {problem}")


def _mode(sample: bool) -> str:
    return "sampling, " if sample else ""


def _exact_lengths(case, name: str, ids, mask, lengths, **extra) -> None:
    for length in lengths:
        with case.explain(f"{name}, max_new_tokens={length}"):
            got = case.target.generate(ids, mask, length, **extra).new_tokens.shape[1]
        _require(
            got == length,
            f"{case.label}: exactly max_new_tokens: {name} generated {got} new tokens for max_new_tokens={length}{' (one more)' if got == length + 1 else ''}",
        )


@pytest.mark.llmopt(cache=CACHES, attention=ATTENTIONS, reference={}, known_issues=[*FLEX, "gptneo-flash-attention-4d-mask-slice"])
def test_rows_stop_at_their_own_eos(llmopt_case):
    """Rows of one padded batch meet their EOS at different steps: each ends there and is padded after,
    the batch runs to its longest row, and the tokens before each EOS are those of the unstopped run."""
    _rows_stop(llmopt_case)


@pytest.mark.llmopt(cache="static", compile="auto", reference={})
def test_compiled_rows_stop_at_their_own_eos(llmopt_case):
    """The same under generate()'s auto-compile, and exactly max_new_tokens for the shortest lengths."""
    case = llmopt_case
    _rows_stop(case)
    _exact_lengths(case, f"{case.variant.id}, padded batch", *_batch(case), (1, 2))


@pytest.mark.llmopt(reference={})
def test_eos_inside_a_draft_block_ends_the_output(llmopt_case):
    """Assisted decoding with the target as its own draft (whole blocks accepted) and prompt lookup: an EOS
    met inside a block ends the output there; nothing accepted after it is kept. Batch 1, every prompt;
    the EOS is the first new token that sits inside a draft block (neither its first token nor its bonus)."""
    _eos_inside_blocks(llmopt_case, sample=False)


@pytest.mark.llmopt(reference={})
def test_sampling_stops_at_the_eos(llmopt_case):
    """The same in sampling mode (temperature 1): speculative sampling with the target as its own draft (every
    draft accepted: min(1, p/q) = 1) and prompt lookup, batch 1, end at the first EOS they sample (a token their
    seeded unstopped twin met inside a block; the EOS shortens drafts, so the draws before it may differ); plain
    sampling on the padded batch, whose draws do not depend on the EOS, ends each row where its seeded twin met
    the EOS and pads it after."""
    _eos_inside_blocks(llmopt_case, sample=True)
    _rows_stop(llmopt_case, sample=True)


def _run(case, ids, mask, sample: bool, **extra):
    """generate() on the case's path; sampling after seeding torch's generator with the session's seed, so that a
    run and its twin draw the same numbers."""
    if sample:
        torch.manual_seed(case.seed)
    return case.target.generate(ids, mask, case.new_tokens, do_sample=sample, **extra)


def _eos_inside_blocks(case, sample: bool) -> None:
    target = case.target
    mode = _mode(sample)
    paths = [("self draft", lambda: {"assistant_model": assistants.build(target.model, "self")}), ("prompt lookup", lambda: dict(LOOKUP))]
    inside = 0
    for name, extra in paths:
        with track_drafts() as drafts:
            for prompt in case.prompts:
                ids, mask = target.encode(prompt.text)
                with case.explain(f"{mode}{name}, prompt {prompt.name!r}, nothing able to stop it"):
                    free = _run(case, ids, mask, sample, **extra())
                row = free.new_tokens[0].tolist()
                step, token = _first_inside_a_block(row, _never(target, free))
                if token is None:
                    continue
                with case.explain(f"{mode}{name}, prompt {prompt.name!r}, token {token} as EOS"):
                    stopped = _run(case, ids, mask, sample, **extra(), **_as_eos(target, token))
                said = f"{case.label}: {mode}stopping at an EOS inside a draft block ({name}, prompt {prompt.name!r}, token {token} as EOS"
                if sample:
                    # Not the twin's tokens: the EOS changes the drafts (a lookup or a draft model stops its block at
                    # it), so the number of random draws, and the tokens, can differ before it. The run must end at
                    # its own first EOS.
                    got = stopped.new_tokens[0].tolist()
                    met = stopping.first_index(got, token)
                    if met is None:
                        continue
                    inside += met % BLOCK not in (0, BLOCK - 1)
                    _require(len(got) == met + 1, f"{said}, sampled at new token {met}): {len(got) - met - 1} new token(s) generated after it")
                    continue
                inside += step % BLOCK not in (0, BLOCK - 1)
                problem = stopping.difference(stopping.cut(free.new_tokens, (step,), _pad(target)), stopped.new_tokens, (step,))
                _require(problem is None, f"{said}, first met at new token {step}): {problem}")
        if name == "self draft" and drafts.accepted == 0:
            not_exercised(f"the self draft had 0 of {drafts.proposed} draft tokens accepted: no EOS could sit inside an accepted block")
    case.record(**{("sampled_" if sample else "") + "eos_inside_a_block": inside})
    if inside == 0:
        not_exercised("no prompt's continuation has a token first met inside a draft block")


def _first_inside_a_block(row: list[int], never: set[int]) -> tuple[int, int | None]:
    """(step, token): the earliest token first met strictly inside a draft block, else any after step 0."""
    firsts = {t: stopping.first_index(row, t) for t in set(row) - never}
    ranked = sorted((s, t) for t, s in firsts.items() if s)
    inside = [(s, t) for s, t in ranked if s % BLOCK not in (0, BLOCK - 1)]
    return (inside or ranked or [(0, None)])[0]


@pytest.mark.llmopt(cache=["dynamic", "static"], reference={})
def test_min_new_tokens_holds_the_eos_back(llmopt_case):
    """min_new_tokens one past the earliest EOS of the batch: no row ends before it; the rows whose EOS
    comes later end exactly where they did without it; the held-back row goes on past its EOS."""
    case = llmopt_case
    target = case.target
    ids, mask, free, found = _free_batch(case)
    least = min(s for s in found.firsts if s is not None)
    floor = least + 1
    with case.explain(f"padded batch, token {found.token} as EOS, min_new_tokens={floor}"):
        got = target.generate(ids, mask, case.new_tokens, min_new_tokens=floor, **_as_eos(target, found.token)).new_tokens
    expected = stopping.cut(free.new_tokens, found.firsts, _pad(target))
    case.record(stop_token=found.token, stop_steps=stopping.describe(found.firsts), min_new_tokens=floor)
    label = f"{case.label}: min_new_tokens={floor} (token {found.token} as EOS, met at new tokens {stopping.describe(found.firsts)})"
    for row, first in enumerate(found.firsts):
        met = stopping.first_index(got[row].tolist(), found.token)
        _require(met is None or met >= floor, f"{label}: row {row} ended at new token {met}, before min_new_tokens")
        if first is None or first >= floor:
            end = got.shape[1] if first is None else first + 1
            same = got.shape[1] >= end and torch.equal(got[row, :end], expected[row, :end])
            _require(same, f"{label}: row {row}, whose EOS comes after the minimum, changed before it")
            _require(bool((got[row, end:] == _pad(target)).all()), f"{label}: row {row} kept generating after its EOS at new token {first}")
        else:
            _require(torch.equal(got[row, :first], free.new_tokens[row, :first]), f"{label}: row {row} changed before its held-back EOS")


@pytest.mark.llmopt(cache=["dynamic", "static"], reference={})
def test_stop_strings_end_each_row(llmopt_case):
    """stop_strings (a piece of text the path generates, spanning two tokens): each row ends on the token that
    completes it, and is padded after."""
    case = llmopt_case
    target = case.target
    tokenizer = target.tokenizer
    ids, mask = _batch(case)
    textless = {"suppress_tokens": target.eos_ids + target.textless_ids} if target.textless_ids else {}
    with case.explain("padded batch, nothing able to stop it"):
        free = target.generate(ids, mask, case.new_tokens, **textless)
    rows = [r.tolist() for r in free.new_tokens]
    text = stopping.stop_string(rows, tokenizer.decode)
    if text is None:
        not_run("no two generated tokens decode to a plain ASCII piece of text that could be a stop string")
    stops = tuple(stopping.text_stop(r, text, tokenizer.decode) for r in rows)
    with case.explain(f"padded batch, stop_strings=[{text!r}]"):
        got = target.generate(ids, mask, case.new_tokens, stop_strings=[text], tokenizer=tokenizer, pad_token_id=_pad(target), **textless).new_tokens
    problem = stopping.difference(stopping.cut(free.new_tokens, stops, _pad(target)), got, stops, word="stop")
    case.record(stop_string=text, stop_steps=stopping.describe(stops))
    _require(problem is None, f"{case.label}: stop_strings=[{text!r}] (completed at new tokens {stopping.describe(stops)}): {problem}")


@pytest.mark.llmopt(cache=CACHES, reference={})
def test_exactly_max_new_tokens(llmopt_case):
    """Exactly max_new_tokens new tokens, never one more, for 1, 2, 3, one draft block and one more, and the
    session's length: on the padded batch, and (dynamic cache) with a self draft, a contrarian draft and
    prompt lookup, whose blocks can overrun the end."""
    case = llmopt_case
    target = case.target
    lengths = (*SHORT, case.new_tokens)
    _exact_lengths(case, f"{case.variant.id}, padded batch", *_batch(case), lengths)
    if case.variant.cache != "dynamic":
        return
    ids, mask = target.encode(grounded(case.prompts)[0].text)
    for kind in ("self", "contrarian"):
        _exact_lengths(case, f"{kind} draft", ids, mask, lengths, assistant_model=assistants.build(target.model, kind))
    _exact_lengths(case, "prompt lookup", ids, mask, lengths, **LOOKUP)
