"""Judging a path that answers with tokens and their log-probabilities, not logits: continuous batching.

A request's answer is judged on its own tokens by the higher-precision, cache-free reference (one forward over
prompt + answer, sharing no code with the paged path):

- every chosen token is the reference's best within the noise: the reference puts it at most
  2 x factor x the plain path's largest |Δlogit| below its best token (a correct path picks its own argmax, and
  each of its logits is off by no more than that);
- every returned log-probability is within factor x the plain path's own log-probability error (largest and RMS),
  where the release returns them: a systematic error too small to flip a token still moves them;
- the answer is as long as the request allows (its ``new_tokens``, or up to and including its first EOS).

The floor is the plain path's error (greedy generate() on the same prompt alone) against the same reference, as
everywhere in the project (equivalence.py), with the dtype's factor.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .equivalence import Generation, _describe, _text, error_stats


@dataclass(frozen=True)
class Floor:
    """The plain path's error against the reference: its largest |Δlogit| and its chosen tokens' log-probability
    error (largest and RMS)."""

    max_abs: float
    logprob_max: float
    logprob_rms: float


def floor_of(plain: Sequence[Generation], precise: Sequence[torch.Tensor]) -> Floor:
    """The floor over plain generations and the reference's logits on their tokens ([1, N, V] each)."""
    deltas, peaks = [], []
    for generation, reference in zip(plain, precise):
        assert generation.logits is not None
        peaks.append(error_stats(generation.logits, reference).max_abs)
        tokens = generation.new_tokens.unsqueeze(-1)
        ours = torch.log_softmax(generation.logits.double(), -1).gather(-1, tokens)
        theirs = torch.log_softmax(reference.double(), -1).gather(-1, tokens)
        deltas.append((ours - theirs).abs().flatten())
    delta = torch.cat(deltas)
    return Floor(max(peaks), float(delta.max()), float(delta.pow(2).mean().sqrt()))


@dataclass
class AnswerVerdict:
    """One request's answer against the reference; ``problem`` is empty where it passes."""

    problem: str = ""
    gap: float = 0.0  # the largest reference gap of a chosen token below the best one
    logprob_max: float = 0.0
    logprob_rms: float = 0.0
    parted_at: int | None = None  # where the answer leaves plain greedy's tokens (a near-tie), if it does
    stats: dict[str, Any] = field(default_factory=dict)


def judge_answer(
    name: str,
    prompt: Sequence[int],
    tokens: Sequence[int],
    logprobs: Sequence[float] | None,
    expected_length: int,
    reference: torch.Tensor,
    plain_tokens: Sequence[int],
    floor: Floor,
    factor: float,
    tokenizer: Any,
) -> AnswerVerdict:
    """``reference`` [N, V]: the higher-precision logits at each of the answer's positions, on its own tokens."""
    verdict = AnswerVerdict()
    said = f"request {name} (prompt {_text(tokenizer, torch.tensor(list(prompt)))})"
    if len(tokens) != expected_length:
        verdict.problem = f"{said}: answered {len(tokens)} token(s), the request allows exactly {expected_length} here"
        return verdict
    if not tokens:
        return verdict
    chosen = torch.tensor(list(tokens)).unsqueeze(-1)
    logits = reference.double()
    gaps = logits.max(-1).values - logits.gather(-1, chosen).squeeze(-1)
    allowed_gap = 2 * factor * floor.max_abs
    verdict.gap = float(gaps.max())
    common = min(len(tokens), len(plain_tokens))
    differ = [i for i in range(common) if tokens[i] != plain_tokens[i]]
    verdict.parted_at = differ[0] if differ else None
    if verdict.gap > allowed_gap:
        at = int(gaps.argmax())
        best = int(logits[at].argmax())
        verdict.problem = (
            f"{said}: new token {at} is {_describe(tokenizer, int(tokens[at]))}, which the higher-precision reference puts "
            f"{verdict.gap:.4g} below its best, {_describe(tokenizer, best)}, on the request's own tokens; a correct path "
            f"stays within {allowed_gap:.4g} (2 x {factor:g} x the plain path's largest |Δlogit| {floor.max_abs:.4g})"
            + (f"; plain greedy parted from it at new token {differ[0]}" if differ else "")
        )
        return verdict
    if logprobs is not None and len(logprobs) == len(tokens):
        exact = torch.log_softmax(logits, -1).gather(-1, chosen).squeeze(-1)
        delta = (torch.tensor(list(logprobs), dtype=torch.float64) - exact).abs()
        verdict.logprob_max, verdict.logprob_rms = float(delta.max()), float(delta.pow(2).mean().sqrt())
        limit_max, limit_rms = factor * max(floor.logprob_max, 1e-9), factor * max(floor.logprob_rms, 1e-9)
        if verdict.logprob_max > limit_max or verdict.logprob_rms > limit_rms:
            at = int(delta.argmax())
            verdict.problem = (
                f"{said}: its log-probabilities left the noise floor: largest error {verdict.logprob_max:.4g} (at new token {at}, "
                f"{_describe(tokenizer, int(tokens[at]))}: {logprobs[at]:.6g} vs {float(exact[at]):.6g}) and RMS {verdict.logprob_rms:.4g}, "
                f"allowed {limit_max:.4g} and {limit_rms:.4g} ({factor:g} x the plain path's own)"
            )
    return verdict


def summary(verdicts: Sequence[AnswerVerdict], floor: Floor, factor: float, logprobs: bool) -> dict[str, Any]:
    """The figures a report keeps for a set of answers."""
    return {
        "requests": len(verdicts),
        "max_choice_gap": round(max((v.gap for v in verdicts), default=0.0), 6),
        "allowed_choice_gap": round(2 * factor * floor.max_abs, 6),
        "floor_max_abs": round(floor.max_abs, 6),
        "logprob_error_max": round(max((v.logprob_max for v in verdicts), default=0.0), 8) if logprobs else None,
        "floor_logprob_max": round(floor.logprob_max, 8),
        "near_ties": sum(v.parted_at is not None for v in verdicts),
        "floor_factor": factor,
    }


