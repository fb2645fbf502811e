"""The stopping checks' expectations (pytest_llmopt.verdicts.stopping): which token is made the EOS, where each row must
end, and what a wrong stop is called."""

from __future__ import annotations

import torch

from pytest_llmopt.verdicts import stopping

FREE = torch.tensor([[5, 6, 7, 8, 9], [6, 5, 5, 7, 8], [9, 9, 6, 9, 9]])


def test_plan_splits_the_rows_into_the_most_stop_steps() -> None:
    found = stopping.plan(FREE, exclude=set())
    assert found == stopping.StopPlan(6, (1, 0, 2))
    assert found.length == 3


def test_plan_skips_excluded_tokens_and_needs_two_stop_steps() -> None:
    assert stopping.plan(FREE, exclude={5, 6, 7, 8, 9}) is None
    same = torch.tensor([[4, 3], [4, 3]])
    assert stopping.plan(same, exclude=set()) is None  # every token first met at one step by every row
    found = stopping.plan(torch.tensor([[4, 3, 2]]), exclude=set())
    assert found is not None and found.firsts[0] != 0  # batch 1: never the first token (nothing to check before it)


def test_cut_pads_after_each_stop_and_runs_to_the_longest_row() -> None:
    cut = stopping.cut(FREE, (1, 0, 2), pad=0)
    assert cut.tolist() == [[5, 6, 0], [6, 0, 0], [9, 9, 6]]
    assert stopping.cut(FREE, (1, None, 2), pad=0).shape == FREE.shape


def test_difference_names_what_went_wrong() -> None:
    expected = stopping.cut(FREE, (1, 0, 2), pad=0)
    assert stopping.difference(expected, expected.clone(), (1, 0, 2)) is None
    kept = expected.clone()
    kept[1, 1] = 5
    assert "row 1 kept generating after its EOS at new token 0" in stopping.difference(expected, kept, (1, 0, 2))
    early = expected.clone()
    early[2, 1] = 3
    assert "row 2 departs from the same path run without stopping at new token 1 before its EOS" in stopping.difference(expected, early, (1, 0, 2))
    longer = FREE[:, :4]
    assert "4 new tokens generated where the rows stop after 3" in stopping.difference(expected, longer, (1, 0, 2))
    assert "after its stop at" in stopping.difference(expected, kept, (1, 0, 2), word="stop")


def test_stop_string_spans_two_tokens_and_is_found_where_completed() -> None:
    pieces = {1: "a b", 2: "ab", 3: "cd", 4: "e"}

    def decode(ids: list[int]) -> str:
        return "".join(pieces[i] for i in ids)

    assert stopping.stop_string([[2, 1, 1, 4]], decode) is None  # spaces, or a single character on one side
    text = stopping.stop_string([[4, 2, 3, 4]], decode)
    assert text == "abcd"  # from the second token on: the pair (2, 3)
    assert stopping.text_stop([4, 2, 3, 4], text, decode) == 2
    assert stopping.text_stop([2, 2, 4], text, decode) is None
