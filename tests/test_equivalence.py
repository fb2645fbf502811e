"""The comparison rules themselves, on synthetic generations: what passes, what fails, what it says."""

from __future__ import annotations

import math

import pytest
import torch

from pytest_llmopt.verdicts.distribution import distribution_test, kolmogorov_pvalue, ks_uniform, randomized_pit
from pytest_llmopt.verdicts.equivalence import (
    FLOOR_FACTOR,
    Generation,
    compare_greedy,
    compare_logits,
    error_stats,
    stack,
)

VOCAB = 8
FACTOR = FLOOR_FACTOR["bfloat16"]


class Chars:
    """A tokenizer stand-in: id i decodes to chr(97 + i)."""

    def decode(self, ids, skip_special_tokens=False):
        return "".join(chr(97 + i) for i in ids)


def _precise(positions: int = 6, seed: int = 0) -> torch.Tensor:
    """'Higher-precision' logits whose argmax is token 2 + position % 5 with a clear margin."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(1, positions, 64, generator=g, dtype=torch.float64)  # wide enough for steady statistics
    for pos in range(positions):
        logits[0, pos, 2 + pos % 5] += 4.0
    return logits


def _noisy(precise: torch.Tensor, sigma: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (precise + sigma * torch.randn(precise.shape, generator=g, dtype=torch.float64)).float()


def _generation(logits: torch.Tensor, tokens: list[int] | None = None, replay=None) -> Generation:
    """A greedy generation whose tokens follow its logits (or ``tokens``)."""
    prompt = torch.tensor([[0, 1]])
    chosen = torch.tensor([tokens]) if tokens is not None else logits.argmax(-1)
    return Generation(prompt, torch.cat([prompt, chosen], dim=1), logits, replay=replay)


def _greedy(reference: Generation, candidate: Generation, precise: torch.Tensor, forced: Generation | None = None):
    return compare_greedy(reference, candidate, precise, Chars(), forced=forced, factor=FACTOR, label="cand vs ref", reproduce="pytest x")


def test_paths_within_the_noise_floor_pass_and_report_the_floor():
    precise = _precise()
    verdict = _greedy(_generation(_noisy(precise, 0.01, 1)), _generation(_noisy(precise, 0.01, 2)), precise)
    assert verdict.ok, verdict.message
    assert 0.5 < verdict.ratios["mean_rms"] < FACTOR
    figures = verdict.figures()
    assert figures["floor_factor"] == FACTOR and figures["floor_mean_rms"] > 0 and figures["sensitivity"] > 0


def test_a_systematic_shift_fails_exactly_beyond_the_reported_sensitivity():
    precise = _precise(positions=40)
    reference = _generation(_noisy(precise, 0.01, 1))
    base = _noisy(precise, 0.01, 2)
    sensitivity = _greedy(reference, _generation(base), precise).sensitivity
    direction = torch.randn(base.shape, generator=torch.Generator().manual_seed(9))
    direction /= direction.pow(2).mean(-1, keepdim=True).sqrt()  # unit RMS at every position
    assert _greedy(reference, _generation(base + 0.5 * sensitivity * direction), precise).ok
    failed = _greedy(reference, _generation(base + 2.0 * sensitivity * direction), precise)
    assert not failed.ok and "logits left the rounding-noise floor of the plain path" in failed.message
    assert "mean_rms" in failed.message and "reproduce: pytest x" in failed.message


def test_an_error_at_one_late_position_fails_on_the_largest_error():
    precise = _precise()
    cand = _noisy(precise, 0.01, 2)
    cand[0, 5, 0] += 0.3  # a late cache slot gone wrong: one position, no token change
    verdict = _greedy(_generation(_noisy(precise, 0.01, 1)), _generation(cand), precise)
    assert not verdict.ok and verdict.ratios["max_abs"] > FACTOR
    assert "new token 5" in verdict.message


def _tied(precise: torch.Tensor, pos: int, other: int = 7) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain and candidate logits for which ``precise`` ties two tokens at ``pos`` and each side's rounding
    (0.002) puts a different one on top."""
    top = int(precise[0, pos].argmax())
    precise[0, pos, other] = precise[0, pos, top]
    plain, cand = _noisy(precise, 0.01, 1), _noisy(precise, 0.01, 2)
    for logits, sign in ((plain, 1), (cand, -1)):
        logits[0, pos, top] = float(precise[0, pos, top]) + sign * 0.002
        logits[0, pos, other] = float(precise[0, pos, other]) - sign * 0.002
    return plain, cand


def test_a_near_tie_is_replayed_teacher_forced_and_judged_after_it():
    precise = _precise()
    plain, cand = _tied(precise, 1)
    tokens = plain.argmax(-1)[0].tolist()
    forced_logits = _noisy(precise, 0.01, 3)
    verdict = _greedy(_generation(plain), _generation(cand), precise, forced=_generation(forced_logits, tokens))
    assert verdict.ok, verdict.message
    assert verdict.stats["teacher_forced"] and verdict.stats["near_ties"] == 1
    forced_logits[0, 4] += 0.5  # a bug that starts after the tie
    late = _greedy(_generation(plain), _generation(cand), precise, forced=_generation(forced_logits, tokens))
    assert not late.ok and "teacher-forced on the reference's tokens" in late.message


def test_without_a_replay_only_the_positions_up_to_the_divergence_are_judged():
    precise = _precise()
    plain, cand = _tied(precise, 1)
    cand[0, 4] += 0.5  # after the divergence: not judged without teacher forcing
    verdict = _greedy(_generation(plain), _generation(cand), precise)
    assert verdict.ok and not verdict.stats["teacher_forced"]


def test_a_token_the_logits_do_not_pick_fails_even_when_every_logit_is_right():
    precise = _precise()
    logits = _noisy(precise, 0.01, 2)
    tokens = logits.argmax(-1)[0].tolist()
    tokens[2] = 0  # committed without verification
    verdict = _greedy(_generation(_noisy(precise, 0.01, 1)), _generation(logits, tokens), precise)
    assert not verdict.ok
    assert "greedy chose a token its own logits do not pick: prompt 0, new token 2" in verdict.message


def test_eos_is_not_a_choice_when_checking_the_tokens():
    precise = _precise()
    precise[0, 3, 1] = 50.0  # EOS (id 1) tops the logits, but it is suppressed while generating
    plain, cand = _noisy(precise, 0.01, 1), _noisy(precise, 0.01, 2)
    masked = plain.clone()
    masked[..., 1] = float("-inf")
    tokens = masked.argmax(-1)[0].tolist()
    verdict = compare_greedy(_generation(plain, tokens), _generation(cand, tokens), precise, Chars(), eos_ids=[1], factor=FACTOR)
    assert verdict.ok, verdict.message


def test_ids_the_generation_suppressed_are_not_a_choice():
    """An id generate() was told never to pick (e.g. one past the tokenizer) may top the raw logits: the
    token below it is the right choice, on the side that suppressed it only."""
    precise = _precise()
    precise[0, 3, 40] = 50.0
    plain, cand = _noisy(precise, 0.01, 1), _noisy(precise, 0.01, 2)
    masked = plain.clone()
    masked[..., 40] = float("-inf")
    tokens = masked.argmax(-1)[0].tolist()

    def suppressing(logits: torch.Tensor, ids: tuple[int, ...]) -> Generation:
        generation = _generation(logits, tokens)
        return Generation(generation.prompt_ids, generation.sequences, logits, suppressed=ids)

    assert compare_greedy(suppressing(plain, (40,)), suppressing(cand, (40,)), precise, Chars(), factor=FACTOR).ok
    unsuppressed = compare_greedy(suppressing(plain, (40,)), suppressing(cand, ()), precise, Chars(), factor=FACTOR)
    assert not unsuppressed.ok and "greedy chose a token its own logits do not pick: prompt 0, new token 3" in unsuppressed.message


def test_missing_logits_fail():
    prompt = torch.tensor([[0, 1]])
    plain = Generation(prompt, torch.tensor([[0, 1, 2, 3]]), None)
    verdict = compare_greedy(plain, plain, _precise(2), Chars(), factor=FACTOR)
    assert not verdict.ok and "recorded no logits" in verdict.message


def test_stack_pools_prompts_of_different_lengths_as_a_left_padded_batch():
    a = Generation(torch.tensor([[5, 6, 7]]), torch.tensor([[5, 6, 7, 1, 2]]), torch.ones(1, 2, VOCAB), suppressed=(3,))
    b = Generation(torch.tensor([[4]]), torch.tensor([[4, 2, 1]]), 2 * torch.ones(1, 2, VOCAB), suppressed=(0,))
    pooled = stack([a, b])
    assert pooled.prompt_ids.tolist() == [[5, 6, 7], [0, 0, 4]]
    assert pooled.attention_mask is not None and pooled.attention_mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert pooled.new_tokens.tolist() == [[1, 2], [2, 1]] and pooled.suppressed == (0, 3)
    assert pooled.logits is not None and pooled.logits[:, 0, 0].tolist() == [1.0, 2.0]
    assert pooled.row(1).sequences.tolist() == [[4, 2, 1]]  # each row is its prompt alone again
    assert stack([a]) is a


def test_stack_replays_each_prompt_on_its_own_row():
    calls = []

    def replay_of(prompt: int):
        def replay(tokens: torch.Tensor) -> Generation:
            calls.append((prompt, tokens.tolist()))
            return Generation(torch.tensor([[prompt]]), torch.cat([torch.tensor([[prompt]]), tokens], 1), torch.zeros(1, 2, VOCAB))
        return replay

    a = Generation(torch.tensor([[5]]), torch.tensor([[5, 1, 2]]), torch.zeros(1, 2, VOCAB), replay=replay_of(5))
    b = Generation(torch.tensor([[6]]), torch.tensor([[6, 3, 4]]), torch.zeros(1, 2, VOCAB), replay=replay_of(6))
    forced = stack([a, b]).replay(torch.tensor([[7, 7], [8, 8]]))  # type: ignore[misc]
    assert calls == [(5, [[7, 7]]), (6, [[8, 8]])] and forced.new_tokens.tolist() == [[7, 7], [8, 8]]


def test_a_pooled_verdict_sees_a_fault_in_one_prompt_and_not_a_lucky_floor():
    """One prompt's plain path a lucky draw (its largest error small): judged alone, a correct candidate fails on
    it; pooled with the others, it passes. A large error confined to one prompt still fails pooled."""
    precise = [_precise(seed=s) for s in range(4)]
    plain = [_noisy(p, 0.01 if i else 0.004, 10 + i) for i, p in enumerate(precise)]
    cand = [_noisy(p, 0.01, 20 + i) for i, p in enumerate(precise)]
    alone = _greedy(_generation(plain[0]), _generation(cand[0]), precise[0])
    assert not alone.ok
    pooled = _greedy(stack([_generation(x) for x in plain]), stack([_generation(x) for x in cand]), torch.cat(precise))
    assert pooled.ok, pooled.message
    broken = [c.clone() for c in cand]
    broken[2][0, 4, 0] += 0.5
    caught = _greedy(stack([_generation(x) for x in plain]), stack([_generation(x) for x in broken]), torch.cat(precise))
    assert not caught.ok and "prompt 2" in caught.message


def test_compare_logits_ignores_padding_and_fails_on_real_positions():
    g = torch.Generator().manual_seed(0)
    precise = torch.randn(2, 4, VOCAB, generator=g, dtype=torch.float64)
    plain, cand = _noisy(precise, 0.01, 1), _noisy(precise, 0.01, 2)
    cand[0, 0] += 10.0  # a padded position: ignored
    mask = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]])
    assert compare_logits(plain, cand, precise, mask, factor=FACTOR).ok
    cand[1, 2] += 0.5
    verdict = compare_logits(plain, cand, precise, mask, factor=FACTOR, label="x")
    assert not verdict.ok and "row 1, position 2" in verdict.message


def test_error_stats_ignore_invalid_positions():
    precise = torch.zeros(1, 3, 4, dtype=torch.float64)
    cand = torch.full((1, 3, 4), 0.1)
    cand[0, 0] = 100.0
    stats = error_stats(cand, precise, torch.tensor([[False, True, True]]))
    assert math.isclose(stats.max_abs, 0.1, rel_tol=1e-5) and math.isclose(stats.mean_rms, 0.1, rel_tol=1e-5) and stats.positions == 2


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


def test_top_k_boundary_within_the_noise_is_undecided():
    """A step whose k-th and (k+1)-th logits lie closer than twice the run dtype's error there cannot tell
    which token top-k keeps; one with a clear gap can."""
    from pytest_llmopt.verdicts.distribution import BoundaryRule

    precise = torch.tensor([[[5.0, 4.0, 3.0, 2.9999, 1.0], [5.0, 4.0, 3.0, 2.0, 1.0]]], dtype=torch.float64)
    run = precise + torch.tensor([0.001, -0.001, 0.0, 0.0, 0.0], dtype=torch.float64)
    full = torch.zeros(1, 4, dtype=torch.long)
    assert BoundaryRule(lambda ids: run, lambda ids: precise, 3)(full).tolist() == [[True, False]]
    assert BoundaryRule(lambda ids: run, lambda ids: precise, 2)(full).tolist() == [[False, False]]
    run[..., 4] = float("-inf")  # a token the processors removed on both sides adds no error
    precise[..., 4] = float("-inf")
    rule = BoundaryRule(lambda ids: run, lambda ids: precise, 3)
    assert rule(full).tolist() == [[True, False]] and math.isclose(rule.noise_median, 0.001)


def test_more_draws_only_where_they_can_reach_enough_decided_steps():
    from pytest_llmopt.verdicts.distribution import MAX_BATCHES, MIN_PIT_VALUES, more_batches

    assert more_batches(MIN_PIT_VALUES) == 0 and more_batches(0) == 0  # enough; or none decided (a random bf16 shape)
    assert more_batches(MIN_PIT_VALUES // 2) == 2  # 1 would do at exactly the first batch's rate: a fifth more is asked
    fewest = math.ceil(MIN_PIT_VALUES * 1.2 / MAX_BATCHES)  # the fewest per batch that MAX_BATCHES in all bring to enough
    assert more_batches(fewest) == MAX_BATCHES - 1 and more_batches(fewest - 1) == 0


def test_left_out_steps_leave_the_test_uniform_and_are_counted():
    """Steps left out by what precedes them (not by the draw) keep the rest Uniform(0, 1); a biased sampler is
    still caught on what is left, and the message says how many were left out."""
    probs, samples = _exact_and_samples(300, None, 2)
    every_other = torch.zeros(300, 3, dtype=torch.bool)
    every_other[::2, 1] = True
    exact = lambda full: probs.expand(full.shape[0], 3, VOCAB)  # noqa: E731
    verdict = distribution_test(samples, torch.tensor([0]), exact, seed=2, undecided=lambda full: every_other)
    assert verdict.ok and verdict.left_out == 150 and verdict.values == 750
    _, biased = _exact_and_samples(300, torch.roll(probs, 1), 2)
    verdict = distribution_test(biased, torch.tensor([0]), exact, seed=2, label="biased", undecided=lambda full: every_other)
    assert not verdict.ok and "(150 left out: top-k boundary within the noise)" in verdict.message


def test_distribution_test_by_chunks_gives_the_same_verdict_and_bounds_what_it_holds(monkeypatch: pytest.MonkeyPatch) -> None:
    """The exact distributions are asked for by chunks of rows (a 262,144-token vocabulary at 50 samples was killed
    for memory in one piece), and the verdict is the one the whole batch gives: the same uniform draws, row by row."""
    from pytest_llmopt.verdicts import distribution

    probs, samples = _exact_and_samples(100, None, 7)
    asked: list[int] = []

    def exact(full: torch.Tensor) -> torch.Tensor:
        asked.append(full.shape[0])
        return probs.expand(full.shape[0], 3, VOCAB)

    whole = distribution_test(samples, torch.tensor([0]), exact, seed=3)
    assert asked == [1, 99]
    asked.clear()
    monkeypatch.setattr(distribution, "PIT_CHUNK_BYTES", 8 * 3 * VOCAB * 7)  # seven rows a chunk
    chunked = distribution_test(samples, torch.tensor([0]), exact, seed=3)
    assert asked == [1] + [7] * 14 + [1] and (chunked.statistic, chunked.pvalue) == (whole.statistic, whole.pvalue)
