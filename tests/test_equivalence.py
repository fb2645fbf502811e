"""The comparison rules themselves, on synthetic generations: what passes, what fails, what it says."""

from __future__ import annotations

import math

import torch

from pytest_llmopt.equivalence import (
    Tolerance,
    compare_greedy,
    compare_logits,
    distribution_test,
    kolmogorov_pvalue,
    ks_uniform,
    randomized_pit,
)
from pytest_llmopt.runner import Generation

TOL = Tolerance(atol=1e-3, rtol=0.0, tie_atol=1e-2, tie_rtol=0.0)
VOCAB = 8


class Chars:
    """A tokenizer stand-in: id i decodes to chr(97 + i)."""

    def decode(self, ids, skip_special_tokens=False):
        return "".join(chr(97 + i) for i in ids)


def _generation(tokens: list[int], logits: torch.Tensor | None) -> Generation:
    prompt = torch.tensor([[0, 1]])
    return Generation(prompt, torch.cat([prompt, torch.tensor([tokens])], dim=1), logits)


def _peaked(tokens: list[int], margin: float = 1.0) -> torch.Tensor:
    logits = torch.zeros(1, len(tokens), VOCAB)
    for pos, tok in enumerate(tokens):
        logits[0, pos, tok] = margin
    return logits


def test_identical_generations_pass():
    logits = _peaked([2, 3, 4])
    verdict = compare_greedy(_generation([2, 3, 4], logits), _generation([2, 3, 4], logits.clone()), TOL, Chars())
    assert verdict.ok and verdict.stats["near_ties"] == 0


def test_near_tie_divergence_passes_and_later_tokens_may_part():
    ref_logits = _peaked([2, 3, 4])
    ref_logits[0, 1, 5] = 1.0 - 0.004  # token 5 nearly ties token 3 at position 1
    cand_logits = ref_logits.clone()
    cand_logits[0, 1, 5] = 1.0 + 0.0004  # the other kernel rounds the other way
    verdict = compare_greedy(_generation([2, 3, 4], ref_logits), _generation([2, 5, 7], cand_logits), TOL, Chars())
    assert verdict.ok
    assert verdict.rows[0].divergence == 1 and verdict.stats["near_ties"] == 1
    assert math.isclose(verdict.stats["min_tie_margin"], 0.004, rel_tol=1e-3)


def test_real_divergence_fails_with_position_tokens_and_margins():
    ref_logits = _peaked([2, 3, 4])
    cand_logits = _peaked([2, 6, 4])
    verdict = compare_greedy(
        _generation([2, 3, 4], ref_logits), _generation([2, 6, 4], cand_logits), TOL, Chars(), label="static/sdpa/fp32@m vs dynamic", reproduce="pytest x"
    )
    assert not verdict.ok
    text = verdict.message
    assert "static/sdpa/fp32@m vs dynamic: generations differ beyond a near-tie" in text
    assert "tokens differ at new token 1 with margin 1 > near-tie tolerance 0.01" in text
    assert "reference token 'd' (id 3)" in text and "candidate token 'g' (id 6)" in text
    assert "reproduce: pytest x" in text


def test_drift_before_the_divergence_fails_even_when_tokens_agree():
    ref_logits = _peaked([2, 3, 4])
    cand_logits = ref_logits.clone()
    cand_logits[0, 0, 7] = 0.5  # a wrong cache moves logits without flipping the argmax
    verdict = compare_greedy(_generation([2, 3, 4], ref_logits), _generation([2, 3, 4], cand_logits), TOL, Chars())
    assert not verdict.ok
    assert "logits drifted at new token 0 while the tokens still agreed" in verdict.message


def test_eos_is_ignored_when_judging_a_tie():
    ref_logits = _peaked([2, 3, 4])
    ref_logits[0, 1, 1] = 5.0  # EOS (id 1) is suppressed while generating: not a candidate
    ref_logits[0, 1, 5] = 1.0 - 0.001
    cand_logits = ref_logits.clone()
    cand_logits[0, 1, 5] = 1.0 + 0.0001
    verdict = compare_greedy(_generation([2, 3, 4], ref_logits), _generation([2, 5, 4], cand_logits), TOL, Chars(), eos_ids=[1])
    assert verdict.ok


def test_missing_logits_cannot_excuse_a_divergence():
    verdict = compare_greedy(_generation([2, 3], None), _generation([2, 4], None), TOL, Chars())
    assert not verdict.ok and "neither side recorded logits" in verdict.message


def test_compare_logits_ignores_padding_and_fails_on_real_positions():
    ref = torch.randn(2, 4, VOCAB)
    cand = ref.clone()
    cand[0, 0] += 10.0  # a padded position: ignored
    mask = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]])
    assert compare_logits(ref, cand, mask, TOL).ok
    cand[1, 2] += 0.5
    verdict = compare_logits(ref, cand, mask, TOL, label="x")
    assert not verdict.ok and verdict.worst == (1, 2) and "row 1, position 2" in verdict.message


def test_kolmogorov_pvalue_matches_known_quantiles():
    # Critical values of the one-sample KS test (large n): 1.358/sqrt(n) at 5 %, 1.628/sqrt(n) at 1 %.
    n = 10_000
    assert math.isclose(kolmogorov_pvalue(1.358 / math.sqrt(n), n), 0.05, rel_tol=0.05)
    assert math.isclose(kolmogorov_pvalue(1.628 / math.sqrt(n), n), 0.01, rel_tol=0.08)
    assert kolmogorov_pvalue(0.0, n) == 1.0


def test_ks_uniform_accepts_uniform_and_rejects_skewed():
    g = torch.Generator().manual_seed(0)
    assert ks_uniform(torch.rand(5000, generator=g))[1] > 0.01
    assert ks_uniform(torch.rand(5000, generator=g) ** 1.3)[1] < 1e-6


def _exact_and_samples(n: int, skew: torch.Tensor | None, seed: int):
    g = torch.Generator().manual_seed(seed)
    probs = torch.softmax(torch.randn(VOCAB, generator=g) * 2, dim=-1).double()
    draw = probs if skew is None else skew
    samples = torch.multinomial(draw.float(), n * 3, replacement=True, generator=g).view(n, 3)
    return probs, samples


def test_distribution_test_false_alarm_rate_is_about_alpha():
    """Under the null hypothesis the p-value is uniform: at alpha 0.05, about 5 % of 400 runs fail."""
    failures = 0
    for seed in range(400):
        probs, samples = _exact_and_samples(100, None, seed)
        verdict = distribution_test(samples, torch.tensor([0]), lambda full, p=probs: p.expand(full.shape[0], 3, VOCAB), seed=seed, alpha=0.05)
        failures += not verdict.ok
    assert 8 <= failures <= 35, failures  # binomial(400, 0.05): mean 20, sd 4.4


def test_distribution_test_catches_a_biased_sampler():
    probs, _ = _exact_and_samples(1, None, 1)
    biased = torch.roll(probs, 1)
    _, samples = _exact_and_samples(300, biased, 1)
    verdict = distribution_test(samples, torch.tensor([0]), lambda full: probs.expand(full.shape[0], 3, VOCAB), seed=1, label="biased")
    assert not verdict.ok and "do not follow the target model's distribution" in verdict.message


def test_randomized_pit_is_uniform_for_exact_samples():
    g = torch.Generator().manual_seed(3)
    probs = torch.softmax(torch.randn(4, VOCAB, generator=g), -1).double()
    tokens = torch.stack([torch.multinomial(probs[i].float(), 2000, replacement=True, generator=g) for i in range(4)], dim=1)
    u = randomized_pit(probs.expand(2000, 4, VOCAB), tokens, g)
    assert ks_uniform(u)[1] > 0.001
