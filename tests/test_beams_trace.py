"""The beam-trace rules of pytest_llmopt.verdicts.beams on hand-made traces: the selection replay accepts a faithful
beam search and names a wrong one; the cache-free reference is read at the right prefix of each beam."""

from __future__ import annotations

import torch

from pytest_llmopt.verdicts import beams


def _search(log_probs: list[torch.Tensor], prompt: torch.Tensor, k: int, returned: int) -> beams.BeamRun:
    """A faithful beam search over given per-step log-probabilities (one prompt, no padding), as a BeamRun."""
    ids = [prompt.repeat(k, 1)]
    score = torch.full((k,), -1e9, dtype=torch.float64)
    score[0] = 0.0
    for step, lp in enumerate(log_probs):
        cand = (score[:, None] + lp.double()).flatten()
        keep = returned if step == len(log_probs) - 1 else k
        top = cand.topk(keep).indices
        parents, tokens = top // lp.shape[1], top % lp.shape[1]
        rows = torch.cat([ids[-1][parents], tokens[:, None]], dim=1)
        if step == len(log_probs) - 1:
            sequences = rows
        else:
            ids.append(rows)
            score = cand[top]
    logits = torch.stack(log_probs, dim=1)  # stands in for the raw logits [k, N, V]
    return beams.BeamRun(prompt[None], torch.ones(1, prompt.shape[0], dtype=torch.long), k, returned, ids, log_probs, logits, sequences)


def _trace(seed: int = 0, k: int = 3, steps: int = 5, vocab: int = 11) -> beams.BeamRun:
    gen = torch.Generator().manual_seed(seed)
    log_probs = [torch.log_softmax(torch.randn(k, vocab, generator=gen) * 3, dim=-1) for _ in range(steps)]
    return _search(log_probs, torch.tensor([1, 2, 3]), k, 2)


def test_a_faithful_search_passes() -> None:
    for seed in range(5):
        assert beams.selection_problem(_trace(seed)) is None


def test_a_kept_beam_that_is_not_the_best_is_named() -> None:
    run = _trace(1)
    worst = run.log_probs[0][0].argmin()
    run.ids[1][1, -1] = worst  # the second kept beam took the worst token of the first step
    problem = beams.selection_problem(run)
    assert problem is not None and problem.startswith("step 1, prompt 0: a candidate scoring")


def test_returned_sequences_out_of_order_are_named() -> None:
    run = _trace(2)
    run.sequences = run.sequences.flip(0)
    problem = beams.selection_problem(run)
    assert problem is not None and "not in order of their scores" in problem


def test_a_kept_beam_from_nowhere_is_named() -> None:
    run = _trace(3)
    taken = set(run.ids[1][:, 3].tolist())
    run.ids[2][0, 3] = min(set(range(11)) - taken)  # its first new token matches no running beam of step 1
    problem = beams.selection_problem(run)
    assert problem is not None and "extends none of the running beams" in problem


class _Echo:
    """A stand-in reference whose logits at each position encode (position, token): the test reads back
    which prefix each beam's reference came from."""

    calls = 0

    def logits(self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        _Echo.calls += 1
        out = torch.zeros(*ids.shape, 2, dtype=torch.float64)
        out[..., 0] = positions.double()
        out[..., 1] = ids.double()
        return out


def test_reference_is_read_at_each_beams_last_position_with_one_forward_per_distinct_beam() -> None:
    run = _trace(4)
    _Echo.calls = 0
    ref = beams.reference_logits(run, _Echo())
    assert ref.shape == (run.beams, len(run.ids), 2)
    for step, ids in enumerate(run.ids):
        for row in range(run.beams):
            assert ref[row, step, 0] == ids.shape[1] - 1  # the position of the beam's last token
            assert ref[row, step, 1] == ids[row, -1]  # and that token
    distinct_longest = {tuple(r.tolist()) for r in run.ids[-1]}
    assert len(distinct_longest) <= _Echo.calls <= sum(len({tuple(r.tolist()) for r in ids}) for ids in run.ids)


def test_parted_names_the_first_step_whose_beams_differ() -> None:
    a, b = _trace(5), _trace(5)
    assert beams.parted(a, b) is None
    b.ids[3] = b.ids[3].clone()
    b.ids[3][0, -1] = (b.ids[3][0, -1] + 1) % 11
    assert beams.parted(a, b) == 3
