"""Equivalence checks that absorb near-ties and still catch real bugs.

Greedy generations are compared the way transformers' and vLLM's own tests do, made stricter:
  * while the tokens agree, the logits must agree within a tolerance (a wrong cache or mask moves
    logits long before it flips a token, so this catches bugs that change no token);
  * at the first differing token the two tokens must be a near-tie on both sides (each side's margin
    between them within ``tie``), which is what different kernels rounding differently produce;
  * after that, the sequences may legitimately part.

Sampling paths cannot be compared token by token. ``distribution_test`` checks that sampled
continuations follow the target model's distribution: each sampled token becomes a randomized
probability-integral-transform value u = F(x-) + V p(x) under the target's exact next-token
distribution; under the null hypothesis all u are independent Uniform(0, 1) (Rosenblatt), whatever
the prompt, position or vocabulary, and a one-sample Kolmogorov-Smirnov test gives a p-value. The
false-alarm rate is ALPHA per test.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .runner import Generation

ALPHA = 1e-3  # false-alarm rate of one distribution test (fixed seeds make a given stack's verdict repeatable)


@dataclass(frozen=True)
class Tolerance:
    """How far two paths may differ: |Δlogit| <= atol + rtol * max|logit| at that position, and a
    token pair is a near-tie when each side's margin between them is <= tie_atol + tie_rtol * max|logit|."""

    atol: float
    rtol: float
    tie_atol: float
    tie_rtol: float

    def logits(self, scale: float) -> float:
        return self.atol + self.rtol * scale

    def tie(self, scale: float) -> float:
        return self.tie_atol + self.tie_rtol * scale

    def scaled(self, factor: float) -> Tolerance:
        return Tolerance(self.atol * factor, self.rtol * factor, self.tie_atol * factor, self.tie_rtol * factor)


# Measured, then padded (figures in baselines/h100-80gb-hbm3/NOTES.md and docs in the README):
# float32, CPU (torch 2.13): the largest |Δlogit| between eager/SDPA/static/compiled/assisted paths on
#   the built-in and the shared real models was 3.1e-5 with max |logit| around 6; allowed here:
#   1e-4 + 1e-4 * max|logit| (about 7e-4, 20x the worst seen) before the path factor.
# bfloat16, H100 (torch 2.11, transformers 5.17, Llama-1B shape): static vs dynamic 0 exactly; attention
#   backends vs eager up to 0.148, compiled vs eager 0.137, assisted 0.109, with max |logit| near 4.5;
#   near-ties flipped at margins of 0.016-0.031 (one or two bf16 steps). Allowed: 0.08 + 0.02 * max|logit|
#   (0.17 at that scale), doubled for kernel-changing paths: 0.34, twice the worst seen.
# float16: derived from bfloat16 (three more mantissa bits: an eighth), then measured on an H200 (same
#   stack and shape): attention vs eager up to 0.0195, compiled 0.0156, assisted 0.0149, ties flipped at
#   margins of 0.002-0.006; allowed 0.01 + 0.0025 * max|logit|, doubled: 0.043, twice the worst seen.
TOLERANCES: dict[str, Tolerance] = {
    "float32": Tolerance(atol=1e-4, rtol=1e-4, tie_atol=1e-4, tie_rtol=1e-4),
    "float16": Tolerance(atol=1e-2, rtol=2.5e-3, tie_atol=1e-2, tie_rtol=2.5e-3),
    "bfloat16": Tolerance(atol=8e-2, rtol=2e-2, tie_atol=8e-2, tie_rtol=2e-2),
}

# Paths whose arithmetic differs more than a cache swap: another attention kernel, inductor's fused and
# reordered reductions, or a verification pass over several tokens at once. Multiplies the dtype tolerance.
PATH_FACTOR = {"cache": 1.0, "compile": 2.0, "attention": 2.0, "assisted": 2.0}


def tolerance(dtype: str, path: str = "cache") -> Tolerance:
    return TOLERANCES[dtype].scaled(PATH_FACTOR[path])


@dataclass
class RowOutcome:
    """One prompt's comparison."""

    row: int
    ok: bool
    divergence: int | None = None  # first differing new-token position
    margin: float | None = None  # larger of the two sides' margins at the divergence
    max_delta: float = 0.0  # max |Δlogit| over the positions that were compared
    detail: str = ""


@dataclass
class Verdict:
    ok: bool
    rows: list[RowOutcome]
    message: str = ""
    stats: dict[str, Any] = field(default_factory=dict)


def _describe(tokenizer: Any, token: int) -> str:
    try:
        text = tokenizer.decode([token])
    except Exception:  # ids beyond the tokenizer (full-size shapes with a tiny tokenizer)
        text = None
    return f"{text!r} (id {token})" if text is not None else f"<id {token}>"


def _text(tokenizer: Any, ids: torch.Tensor, limit: int = 120) -> str:
    try:
        text = tokenizer.decode(ids.tolist(), skip_special_tokens=True)
    except Exception:
        text = " ".join(str(i) for i in ids.tolist())
    return repr(text if len(text) <= limit else text[: limit - 3] + "...")


def compare_greedy(
    reference: Generation,
    candidate: Generation,
    tol: Tolerance,
    tokenizer: Any,
    eos_ids: Sequence[int] = (),
    label: str = "",
    reproduce: str = "",
) -> Verdict:
    """Tie-aware comparison of two greedy generations of the same prompts (see the module docstring)."""
    ref_new, cand_new = reference.new_tokens, candidate.new_tokens
    if ref_new.shape != cand_new.shape:
        return Verdict(False, [], f"{label}: generated {tuple(cand_new.shape)} tokens, the reference {tuple(ref_new.shape)}")
    rows: list[RowOutcome] = []
    for row in range(ref_new.shape[0]):
        rows.append(_compare_row(row, reference, candidate, tol, list(eos_ids)))
    ok = all(r.ok for r in rows)
    stats = {
        "max_delta_logit": max((r.max_delta for r in rows), default=0.0),
        "near_ties": sum(1 for r in rows if r.divergence is not None and r.ok),
        "min_tie_margin": min((r.margin for r in rows if r.margin is not None and r.ok), default=None),
        "rows": len(rows),
    }
    message = "" if ok else _failure_message(reference, candidate, rows, tol, tokenizer, label, reproduce)
    return Verdict(ok, rows, message, stats)


def _compare_row(row: int, reference: Generation, candidate: Generation, tol: Tolerance, eos_ids: list[int]) -> RowOutcome:
    ref_tokens = reference.new_tokens[row]
    cand_tokens = candidate.new_tokens[row]
    differ = (ref_tokens != cand_tokens).nonzero()
    first = int(differ[0]) if len(differ) else None
    ref_logits = reference.logits[row] if reference.logits is not None else None
    cand_logits = candidate.logits[row] if candidate.logits is not None else None
    outcome = RowOutcome(row, True, first)
    if ref_logits is not None and cand_logits is not None:
        upto = ref_tokens.shape[0] if first is None else first
        for pos in range(upto):
            scale = float(ref_logits[pos].abs().max())
            delta = float((ref_logits[pos] - cand_logits[pos]).abs().max())
            outcome.max_delta = max(outcome.max_delta, delta)
            if delta > tol.logits(scale):
                outcome.ok = False
                outcome.detail = (
                    f"logits drifted at new token {pos} while the tokens still agreed: "
                    f"max |Δlogit| {delta:.4g} > tolerance {tol.logits(scale):.3g}"
                )
                outcome.divergence = pos if first is None else first
                return outcome
    if first is None:
        return outcome
    a, b = int(ref_tokens[first]), int(cand_tokens[first])
    margins = []
    scale = 0.0
    if ref_logits is not None:
        masked = ref_logits[first].clone()
        masked[eos_ids] = float("-inf")
        scale = float(ref_logits[first].abs().max())
        margins.append(float(masked[a] - masked[b]))
    if cand_logits is not None:
        masked = cand_logits[first].clone()
        masked[eos_ids] = float("-inf")
        scale = max(scale, float(cand_logits[first].abs().max()))
        margins.append(float(masked[b] - masked[a]))
    if not margins:
        outcome.ok = False
        outcome.detail = f"tokens differ at new token {first} and neither side recorded logits to judge a tie"
        return outcome
    outcome.margin = max(margins)
    if outcome.margin > tol.tie(scale):
        outcome.ok = False
        outcome.detail = f"tokens differ at new token {first} with margin {outcome.margin:.4g} > near-tie tolerance {tol.tie(scale):.3g}"
    return outcome


def _failure_message(
    reference: Generation,
    candidate: Generation,
    rows: list[RowOutcome],
    tol: Tolerance,
    tokenizer: Any,
    label: str,
    reproduce: str,
) -> str:
    lines = [f"{label}: generations differ beyond a near-tie"]
    for r in rows:
        if r.ok:
            continue
        prompt = reference.prompt_ids[r.row]
        if reference.attention_mask is not None:
            prompt = prompt[reference.attention_mask[r.row].bool()]
        lines.append(f"  prompt {r.row} {_text(tokenizer, prompt, 80)}: {r.detail}")
        pos = r.divergence
        if pos is not None:
            a = int(reference.new_tokens[r.row, pos])
            b = int(candidate.new_tokens[r.row, pos])
            ref_l = reference.logits[r.row, pos] if reference.logits is not None else None
            cand_l = candidate.logits[r.row, pos] if candidate.logits is not None else None
            if a != b:
                lines.append(
                    f"    reference token {_describe(tokenizer, a)}"
                    + (f": logit {float(ref_l[a]):.4f}, candidate's token has {float(ref_l[b]):.4f}" if ref_l is not None else "")
                )
                lines.append(
                    f"    candidate token {_describe(tokenizer, b)}"
                    + (f": logit {float(cand_l[b]):.4f}, reference's token has {float(cand_l[a]):.4f}" if cand_l is not None else "")
                )
            lines.append(f"    max |Δlogit| up to new token {pos}: {r.max_delta:.4g}")
        lines.append(f"    reference continuation: {_text(tokenizer, reference.new_tokens[r.row])}")
        lines.append(f"    candidate continuation: {_text(tokenizer, candidate.new_tokens[r.row])}")
    lines.append(f"  tolerance: {tol}")
    if reproduce:
        lines.append(f"  reproduce: {reproduce}")
    return "\n".join(lines)


@dataclass
class LogitsVerdict:
    ok: bool
    max_delta: float
    worst: tuple[int, int]  # (row, position)
    allowed: float
    argmax_flips: int
    message: str = ""


def compare_logits(
    reference: torch.Tensor,
    candidate: torch.Tensor,
    mask: torch.Tensor | None,
    tol: Tolerance,
    label: str = "",
    reproduce: str = "",
) -> LogitsVerdict:
    """Logits of two forward passes over the same (possibly padded) batch; padded positions are ignored.

    Fails when any real position differs beyond the tolerance, or when the argmax flips between two
    tokens that are not a near-tie.
    """
    valid = mask.bool() if mask is not None else torch.ones(reference.shape[:2], dtype=torch.bool)
    scale = reference.abs().amax(dim=-1)  # [B, T]
    delta = (reference - candidate).abs().amax(dim=-1)
    allowed = tol.atol + tol.rtol * scale
    excess = torch.where(valid, delta - allowed, torch.full_like(delta, float("-inf")))
    worst_flat = int(excess.flatten().argmax())
    worst = (worst_flat // delta.shape[1], worst_flat % delta.shape[1])
    ref_top, cand_top = reference.argmax(-1), candidate.argmax(-1)
    flips = 0
    for row, pos in (valid & (ref_top != cand_top)).nonzero().tolist():
        a, b = int(ref_top[row, pos]), int(cand_top[row, pos])
        margin = max(float(reference[row, pos, a] - reference[row, pos, b]), float(candidate[row, pos, b] - candidate[row, pos, a]))
        if margin > tol.tie(float(scale[row, pos])):
            flips += 1
    max_delta = float(torch.where(valid, delta, torch.zeros_like(delta)).max())
    ok = bool(excess.max() <= 0) and flips == 0
    message = ""
    if not ok:
        message = (
            f"{label}: logits differ from the reference beyond tolerance\n"
            f"  worst real (unpadded) position: row {worst[0]}, position {worst[1]}: |Δlogit| {float(delta[worst]):.4g} "
            f"> allowed {float(allowed[worst]):.3g}\n"
            f"  argmax flips that are not near-ties: {flips}\n"
            f"  max |Δlogit| over real positions: {max_delta:.4g}; tolerance {tol}"
        )
        if reproduce:
            message += f"\n  reproduce: {reproduce}"
    return LogitsVerdict(ok, max_delta, worst, float(allowed[worst]), flips, message)


# --------------------------------------------------------------------------------------------------
# Distributions of sampling paths


def kolmogorov_pvalue(statistic: float, n: int) -> float:
    """P(D_n >= statistic) for the one-sample KS test, by Stephens' approximation (fine for n >= 35)."""
    if n <= 0:
        return 1.0
    root = math.sqrt(n)
    x = statistic * (root + 0.12 + 0.11 / root)
    if x < 0.2:
        return 1.0
    total = 0.0
    for k in range(1, 101):
        term = (-1) ** (k - 1) * math.exp(-2.0 * k * k * x * x)
        total += term
        if abs(term) < 1e-12:
            break
    return max(0.0, min(1.0, 2.0 * total))


def ks_uniform(values: torch.Tensor) -> tuple[float, float]:
    """One-sample KS statistic and p-value of ``values`` against Uniform(0, 1)."""
    u = values.double().flatten().sort().values
    n = u.numel()
    ranks = torch.arange(1, n + 1, dtype=torch.float64)
    d_plus = (ranks / n - u).max()
    d_minus = (u - (ranks - 1) / n).max()
    statistic = float(torch.maximum(d_plus, d_minus))
    return statistic, kolmogorov_pvalue(statistic, n)


def randomized_pit(probs: torch.Tensor, tokens: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """u = F(x-) + V p(x) with tokens ordered by decreasing probability (ties by id).

    ``probs`` [..., V] are the exact next-token distributions, ``tokens`` [...] the sampled tokens.
    Ordering by probability makes the test most sensitive to a sampler that picks unlikely tokens
    too often (or likely ones too rarely), which is what a wrong acceptance rule does.
    """
    order = torch.argsort(probs, dim=-1, descending=True, stable=True)
    sorted_probs = torch.gather(probs, -1, order)
    cdf = sorted_probs.cumsum(-1)
    rank = torch.argsort(order, dim=-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    p_x = sorted_probs.gather(-1, rank.unsqueeze(-1)).squeeze(-1)
    before = cdf.gather(-1, rank.unsqueeze(-1)).squeeze(-1) - p_x
    v = torch.rand(tokens.shape, generator=generator, dtype=probs.dtype)
    return (before + v * p_x).clamp(0.0, 1.0)


@dataclass
class DistributionVerdict:
    ok: bool
    statistic: float
    pvalue: float
    samples: int
    values: int
    message: str = ""


def distribution_test(
    samples: torch.Tensor,
    prompt_ids: torch.Tensor,
    exact_probs: Callable[[torch.Tensor], torch.Tensor],
    seed: int,
    label: str = "",
    reproduce: str = "",
    alpha: float = ALPHA,
) -> DistributionVerdict:
    """Do ``samples`` [N, L] (new tokens after ``prompt_ids`` [P]) follow the target distribution?

    ``exact_probs(full_ids [n, P+L]) -> [n, L, V]`` gives the target's processed next-token
    distribution at every generated position (teacher forcing).
    """
    generator = torch.Generator().manual_seed(seed)
    full = torch.cat([prompt_ids.expand(samples.shape[0], -1), samples], dim=1)
    probs = exact_probs(full).double()
    u = randomized_pit(probs, samples, generator)
    statistic, pvalue = ks_uniform(u)
    ok = pvalue >= alpha
    message = ""
    if not ok:
        hist = torch.histc(u.float(), bins=10, min=0.0, max=1.0).int().tolist()
        message = (
            f"{label}: sampled tokens do not follow the target model's distribution\n"
            f"  Kolmogorov-Smirnov on {u.numel()} PIT values from {samples.shape[0]} samples: D = {statistic:.4f}, "
            f"p = {pvalue:.2e} < alpha {alpha:g} (false-alarm rate of this test)\n"
            f"  PIT histogram (10 bins, uniform expected {u.numel() // 10} each): {hist}\n"
            f"  mass in the upper half means unlikely tokens are sampled too often (e.g. drafts accepted without the p/q test)"
        )
        if reproduce:
            message += f"\n  reproduce: {reproduce}"
    return DistributionVerdict(ok, statistic, pvalue, samples.shape[0], u.numel(), message)
