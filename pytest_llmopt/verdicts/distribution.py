"""Distributions of sampling paths (speculative and prompt-lookup sampling), which cannot be compared
token by token.

``distribution_test`` checks that sampled continuations follow the target model's distribution: each
sampled token becomes a randomized probability-integral-transform value u = F(x-) + V p(x) under the
target's exact next-token distribution; under the null hypothesis all u are independent Uniform(0, 1)
(Rosenblatt), whatever the prompt, position or vocabulary, and a one-sample Kolmogorov-Smirnov test gives
a p-value. The false-alarm rate is ALPHA per test.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

ALPHA = 1e-3  # false-alarm rate of one distribution test (fixed seeds make a given stack's verdict repeatable)
MIN_PIT_VALUES = 400  # fewer left (top-k boundaries the run dtype cannot decide) and the test has too little power
MAX_BATCHES = 6  # draws of a sampling check, in all, to find MIN_PIT_VALUES decided steps


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


def randomized_pit(probs: torch.Tensor, tokens: torch.Tensor, generator: torch.Generator | None = None, v: torch.Tensor | None = None) -> torch.Tensor:
    """u = F(x-) + V p(x) with tokens ordered by decreasing probability (ties by id).

    ``probs`` [..., V] are the exact next-token distributions, ``tokens`` [...] the sampled tokens, ``v`` the
    uniform draws (else drawn from ``generator``).
    Ordering by probability makes the test most sensitive to a sampler that picks unlikely tokens
    too often (or likely ones too rarely), which is what a wrong acceptance rule does.
    """
    order = torch.argsort(probs, dim=-1, descending=True, stable=True)
    sorted_probs = torch.gather(probs, -1, order)
    cdf = sorted_probs.cumsum(-1)
    rank = torch.argsort(order, dim=-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    p_x = sorted_probs.gather(-1, rank.unsqueeze(-1)).squeeze(-1)
    before = cdf.gather(-1, rank.unsqueeze(-1)).squeeze(-1) - p_x
    if v is None:
        v = torch.rand(tokens.shape, generator=generator, dtype=probs.dtype)
    return (before + v.to(probs.device, probs.dtype) * p_x).clamp(0.0, 1.0)


@dataclass
class BoundaryRule:
    """``undecided`` for distribution_test under top-k: the steps [n, L] whose top-k set the run dtype cannot
    decide, where the gap between the k-th and (k+1)-th processed logit of its cache-free forward is at most twice
    the error there against the higher-precision copy (boundary_margins; each side ``full_ids [n, P+L] -> [n, L,
    V]``, run by chunks). On a near-flat distribution (a random half-precision shape) the k-th logit sits among
    near-ties and each boundary token carries ~1/k of the mass: the cached path and the cache-free forward keep
    different ones, so such a step's PIT value says nothing about the sampler. Which steps are left out depends
    only on the text before them, so the rest stay Uniform(0, 1) under the null hypothesis. Keeps the median gap
    and error of its last call for the report."""

    run_logits: Callable[[torch.Tensor], torch.Tensor]
    precise_logits: Callable[[torch.Tensor], torch.Tensor]
    top_k: int
    gap_median: float = math.nan
    noise_median: float = math.nan

    def __call__(self, full: torch.Tensor) -> torch.Tensor:
        parts = [boundary_margins(self.run_logits(part), self.precise_logits(part), self.top_k) for part in full.split(16)]
        gap, noise = (torch.cat(side) for side in zip(*parts))
        self.gap_median, self.noise_median = float(gap.median()), float(noise.median())
        return gap <= 2 * noise


def more_batches(values: int) -> int:
    """How many more batches of draws, like the first, bring the PIT values up to MIN_PIT_VALUES at the rate of
    decided steps seen: 0 when there are enough, or when even MAX_BATCHES in all would not do (a random half-precision
    shape, where no top-k boundary is decided: more draws would be time spent for nothing)."""
    if values >= MIN_PIT_VALUES or values == 0:
        return 0
    needed = math.ceil(MIN_PIT_VALUES * 1.2 / values) - 1  # a fifth more: the rate of decided steps varies by batch
    return needed if needed + 1 <= MAX_BATCHES else 0


def boundary_margins(run: torch.Tensor, precise: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per step [n, L]: the gap between the k-th and (k+1)-th processed logit of the run dtype, and the largest
    |run - higher-precision| difference among the tokens the run dtype ranks around the boundary (k/2 to 3k/2:
    those top-k decides between; the first ones carry a larger rounding error, larger logits, that does not
    move the boundary)."""
    near = run.double().topk(min(top_k + top_k // 2 + 1, run.shape[-1]), dim=-1).indices[..., top_k // 2 :]
    delta = (run.double().gather(-1, near) - precise.double().gather(-1, near)).abs()
    noise = torch.where(torch.isfinite(delta), delta, torch.zeros((), dtype=torch.float64)).amax(-1)
    top = run.double().topk(min(top_k + 1, run.shape[-1]), dim=-1).values
    return top[..., -2] - top[..., -1], noise


@dataclass
class DistributionVerdict:
    ok: bool
    statistic: float
    pvalue: float
    samples: int
    values: int
    message: str = ""
    left_out: int = 0  # PIT values left out: steps whose top-k boundary the run dtype cannot decide


# One chunk of exact distributions [rows, L, V] in float64: at 50 samples a vocabulary of 262,144 (Gemma 3) takes
# 5.4 GB a copy, and the PIT's sorts hold several copies (the whole batch at once was killed for memory on 24 GiB).
PIT_CHUNK_BYTES = 1 << 28


def distribution_test(
    samples: torch.Tensor,
    prompt_ids: torch.Tensor,
    exact_probs: Callable[[torch.Tensor], torch.Tensor],
    seed: int,
    label: str = "",
    reproduce: str = "",
    alpha: float = ALPHA,
    undecided: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> DistributionVerdict:
    """Do ``samples`` [N, L] (new tokens after ``prompt_ids`` [P]) follow the target distribution?

    ``exact_probs(full_ids [n, P+L]) -> [n, L, V]`` gives the target's processed next-token
    distribution at every generated position (teacher forcing); ``undecided(full_ids) -> [n, L]`` the
    steps to leave out (BoundaryRule).
    """
    generator = torch.Generator().manual_seed(seed)
    full = torch.cat([prompt_ids.expand(samples.shape[0], -1), samples], dim=1)
    v = torch.rand(samples.shape, generator=generator, dtype=torch.float64)
    parts, start, rows = [], 0, 1  # by chunks of rows: one row's [L, V] distributions tell how many fit PIT_CHUNK_BYTES
    while start < full.shape[0]:
        probs = exact_probs(full[start : start + rows]).double()
        parts.append(randomized_pit(probs, samples[start : start + rows].to(probs.device), v=v[start : start + rows]).cpu())
        start += probs.shape[0]
        rows = max(1, PIT_CHUNK_BYTES // max(1, probs[0].numel() * probs.element_size()))
        del probs
    u = torch.cat(parts)
    left_out = 0
    if undecided is not None:
        keep = ~undecided(full).to(u.device)
        left_out = int((~keep).sum())
        u = u[keep]
    statistic, pvalue = ks_uniform(u) if u.numel() else (0.0, 1.0)  # nothing left: not exercised (the caller says so)
    ok = pvalue >= alpha
    message = ""
    if not ok:
        hist = torch.histc(u.float(), bins=10, min=0.0, max=1.0).int().tolist()
        message = (
            f"{label}: sampled tokens do not follow the target model's distribution\n"
            f"  Kolmogorov-Smirnov on {u.numel()} PIT values from {samples.shape[0]} samples"
            f"{f' ({left_out} left out: top-k boundary within the noise)' if left_out else ''}: D = {statistic:.4f}, "
            f"p = {pvalue:.2e} < alpha {alpha:g} (false-alarm rate of this test)\n"
            f"  PIT histogram (10 bins, uniform expected {u.numel() // 10} each): {hist}\n"
            f"  mass in the upper half means unlikely tokens are sampled too often (e.g. drafts accepted without the p/q test)"
        )
        if reproduce:
            message += f"\n  reproduce: {reproduce}"
    return DistributionVerdict(ok, statistic, pvalue, samples.shape[0], u.numel(), message, left_out)


