"""Where each row of a generation must stop, derived from the same path run without stopping.

Random-weight models almost never choose their real EOS, so the stopping checks designate as EOS a token
the path itself generates (generate() treats every id in ``eos_token_id`` alike): one that first occurs at
different steps in different rows of the batch. The path is run twice, once with nothing able to stop it
(its "free" run) and once with that token as EOS; the second run must be the first cut after each row's
first EOS and padded to the longest row. The reference is the path itself, so a near-tie between two paths
cannot make a false alarm, and nothing in it shares the stopping code under test.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class StopPlan:
    """A designated EOS and the step (index of the new token) where it first occurs in each row, or None."""

    token: int
    firsts: tuple[int | None, ...]

    @property
    def length(self) -> int | None:
        """New tokens of the stopped run: up to the last row's EOS; None when a row never stops (all of them)."""
        return _length(self.firsts)


def _length(stops: tuple[int | None, ...]) -> int | None:
    return None if any(s is None for s in stops) else max(s for s in stops if s is not None) + 1


def first_index(row: list[int], token: int, start: int = 0) -> int | None:
    """Index of the first ``token`` in ``row`` at or after ``start``, None if absent."""
    for index in range(start, len(row)):
        if row[index] == token:
            return index
    return None


def plan(tokens: torch.Tensor, exclude: set[int]) -> StopPlan | None:
    """The token whose first occurrences split the rows of ``tokens`` [B, N] into the most distinct stop steps
    (a row that never meets it counts as one more), with at least two of them; ties go to the token that
    stops more rows early, then the lower id. None when no token does (batch 1: any token but the first)."""
    rows = [list(map(int, r)) for r in tokens.tolist()]
    best: tuple[tuple[int, int, int], StopPlan] | None = None
    for token in sorted({t for r in rows for t in r} - exclude):
        firsts = tuple(first_index(r, token) for r in rows)
        distinct = len(set(firsts))
        if len(rows) > 1 and distinct < 2:
            continue
        if len(rows) == 1 and firsts[0] in (None, 0):
            continue
        stopped = sum(f is not None for f in firsts)
        key = (distinct, stopped, -token)
        if best is None or key > best[0]:
            best = (key, StopPlan(token, firsts))
    return None if best is None else best[1]


def cut(tokens: torch.Tensor, stops: tuple[int | None, ...], pad: int) -> torch.Tensor:
    """``tokens`` [B, N] cut after each row's stop index and padded with ``pad`` to the longest row (all N when
    a row never stops)."""
    out = tokens[:, : _length(stops) or tokens.shape[1]].clone()
    for row, stop in enumerate(stops):
        if stop is not None:
            out[row, stop + 1 :] = pad
    return out


def difference(expected: torch.Tensor, got: torch.Tensor, stops: tuple[int | None, ...], word: str = "EOS") -> str | None:
    """What is wrong with ``got`` against ``expected`` (both [B, N']), in the words of the stopping property
    (``word``: what ends a row, "EOS" or "stop"); None when they are equal."""
    if got.shape != expected.shape:
        return f"{got.shape[1]} new tokens generated where the rows stop after {expected.shape[1]} (stops at new tokens {_stops(stops)})"
    wrong = (got != expected).nonzero().tolist()
    if not wrong:
        return None
    row, step = wrong[0]
    stop = stops[row]
    if stop is not None and step > stop:
        return (
            f"row {row} kept generating after its {word} at new token {stop}: new token {step} is {int(got[row, step])}, "
            f"padding ({int(expected[row, step])}) expected"
        )
    where = f"before its {word}" if stop is not None else f"(it never meets its {word})"
    return f"row {row} departs from the same path run without stopping at new token {step} {where}: {int(got[row, step])} instead of {int(expected[row, step])}"


def _stops(stops: tuple[int | None, ...]) -> str:
    return ", ".join("never" if s is None else str(s) for s in stops)


def describe(stops: tuple[int | None, ...]) -> str:
    """Stop steps for a message: '3, 7, never'."""
    return _stops(stops)


def stop_string(rows: list[list[int]], decode: Callable[[list[int]], str]) -> str | None:
    """A stop string the rows generate: two consecutive tokens (the first of them not the row's first) that
    decode to plain ASCII text of at least 3 characters without spaces, each token a part of it (the string
    spans a token boundary). None when no row has one."""
    for row in rows:
        for k in range(2, len(row)):
            left, right, both = decode([row[k - 1]]), decode([row[k]]), decode(row[k - 1 : k + 1])
            if left and right and both == left + right and len(both) >= 3 and both.isascii() and both.isprintable() and " " not in both:
                return both
    return None


def text_stop(row: list[int], text: str, decode: Callable[[list[int]], str]) -> int | None:
    """Index of the token on which ``row``'s decoded text first contains ``text``; None if it never does."""
    for index in range(len(row)):
        if text in decode(row[: index + 1]):
            return index
    return None
