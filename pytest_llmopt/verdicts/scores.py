"""Processed scores (``output_scores``) of two greedy paths compared, beside their raw logits.

Users generate with logits processors (repetition_penalty, no_repeat_ngram_size, ...); a path that hands a
processor the wrong input (a draft's wrong slice of ids, a stale length) produces the wrong processed
scores while its raw logits stay right. The bound needs no tolerance of its own: a processor of these
settings bans a token (-inf) or multiplies or divides its raw logit by at most the penalty, so where both
paths saw the same tokens, each processed score may differ by at most ``penalty`` times its raw logit's
difference (plus float32 rounding).
"""

from __future__ import annotations

import torch

from .equivalence import Generation


def compare_scores(reference: Generation, candidate: Generation, penalty: float) -> str | None:
    """What differs beyond that bound, at the first step (row by row, up to the first step whose token
    differs, which still shares its prefix); None when nothing does."""
    if reference.scores is None or candidate.scores is None or reference.logits is None or candidate.logits is None:
        raise ValueError("compare_scores needs output_scores and output_logits of both paths")
    steps = min(reference.scores.shape[1], candidate.scores.shape[1])
    for row in range(reference.scores.shape[0]):
        same = (reference.new_tokens[row, :steps] == candidate.new_tokens[row, :steps]).tolist()
        last = same.index(False) if False in same else steps - 1
        for step in range(last + 1):
            problem = _step(reference, candidate, row, step, penalty)
            if problem is not None:
                return f"row {row}, new token {step}: {problem}"
    return None


def _step(reference: Generation, candidate: Generation, row: int, step: int, penalty: float) -> str | None:
    assert reference.scores is not None and candidate.scores is not None
    assert reference.logits is not None and candidate.logits is not None
    ref, got = reference.scores[row, step], candidate.scores[row, step]
    banned_ref, banned_got = torch.isinf(ref) & (ref < 0), torch.isinf(got) & (got < 0)
    if not torch.equal(banned_ref, banned_got):
        only_ref = banned_ref & ~banned_got
        only_got = banned_got & ~banned_ref
        return (
            f"the banned tokens differ: {_ids(only_got)} banned only on this path, {_ids(only_ref)} only on the plain path "
            "(a processor saw other input ids)"
        )
    finite = ~banned_ref
    raw = (reference.logits[row, step] - candidate.logits[row, step]).abs()
    delta = (ref - got).abs()
    slack = penalty * raw + 1e-5 * (ref.abs() + 1.0)
    excess = torch.where(finite, delta - slack, torch.zeros_like(delta))
    worst = int(excess.argmax())
    if float(excess[worst]) <= 0:
        return None
    return (
        f"processed score of token {worst} is {float(got[worst]):.6g} here and {float(ref[worst]):.6g} on the plain path "
        f"(|Δ| {float(delta[worst]):.3g}) while their raw logits differ by {float(raw[worst]):.3g}: more than the penalty "
        f"({penalty}) can explain (a processor saw other input ids)"
    )


def _ids(mask: torch.Tensor) -> str:
    ids = mask.nonzero().flatten().tolist()
    return "none" if not ids else ", ".join(map(str, ids[:8])) + (" ..." if len(ids) > 8 else "")
