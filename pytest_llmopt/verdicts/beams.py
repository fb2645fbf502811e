"""Beam search judged on its own trace, so that a near-tie between two paths cannot raise a false alarm.

Two beam searches part for good at the first near-tie between a kept and a dropped candidate, after which
their beams share nothing to compare. So a processor records what beam search hands its processors at every
step (the running beams' ids and their processed log-probabilities), and each path is judged on its own beams:

* **logits**: every running beam's raw logits at every step, against one higher-precision cache-free forward
  pass over that beam's own tokens (reference.Precise), within the noise floor of the plain path's beams
  judged the same way. A cache that is not reordered between beams gives a beam another beam's keys and
  values: its logits leave the floor at the first reorder;
* **selection**: each step keeps the best ``num_beams`` candidates by the path's own accumulated scores, and
  the returned sequences are the best ``num_return_sequences`` of the last step, best first (a wrong beam
  index, score or order);
* whether the returned sequences equal the plain path's is reported (``parted``): with both rules holding,
  only a near-tie can part them.

EOS stays suppressed (runner.generate), so every beam runs to ``max_new_tokens`` and length normalisation
cannot reorder them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from .equivalence import FloorVerdict, error_stats, judge

SLACK = 1e-4  # relative: float32 accumulation in generate() against float64 here


class BeamRecorder:
    """A logits processor (the last of the list) that keeps each step's running beams [B*beams, P+t] and
    the processed log-probabilities [B*beams, V] the selection uses; it returns the scores unchanged."""

    def __init__(self) -> None:
        self.ids: list[torch.Tensor] = []
        self.log_probs: list[torch.Tensor] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self.ids.append(input_ids.detach().cpu().clone())
        self.log_probs.append(scores.detach().float().cpu().clone())
        return scores


@dataclass
class BeamRun:
    """One beam-search generate() on a (left-padded) batch and its trace."""

    prompt_ids: torch.Tensor  # [B, P]
    mask: torch.Tensor  # [B, P]
    beams: int
    returned: int  # num_return_sequences
    ids: list[torch.Tensor]  # per step: running beams [B*beams, P+t]
    log_probs: list[torch.Tensor]  # per step: processed log-probabilities [B*beams, V]
    logits: torch.Tensor  # [B*beams, N, V] raw logits of the running beams at each step
    sequences: torch.Tensor  # [B*returned, P+N]
    figures: dict[str, Any] = field(default_factory=dict)

    @property
    def batch(self) -> int:
        return int(self.prompt_ids.shape[0])


def run(runner: Any, ids: torch.Tensor, mask: torch.Tensor, new_tokens: int, beams: int, returned: int, **extra: Any) -> BeamRun:
    """Beam search on ``runner``'s path with a recorder as its last logits processor."""
    from transformers import LogitsProcessorList

    recorder = BeamRecorder()
    out = runner.generate(ids, mask, new_tokens, num_beams=beams, num_return_sequences=returned, logits_processor=LogitsProcessorList([recorder]), **extra)
    assert out.logits is not None
    return BeamRun(ids.cpu(), mask.cpu(), beams, returned, recorder.ids, recorder.log_probs, out.logits, out.sequences)


def selection_problem(beam_run: BeamRun) -> str | None:
    """Replay the selection on the recorded scores (float64): each step's kept beams must be the best
    candidates, and the returned sequences the best of the last step in order; None when they are."""
    k, runs = beam_run.beams, beam_run.batch
    steps = len(beam_run.ids)
    if steps == 0 or beam_run.logits.shape[1] != steps:
        return f"the trace holds {steps} steps where {beam_run.logits.shape[1]} tokens were generated"
    score = torch.full((runs * k,), -1e9, dtype=torch.float64)
    score[::k] = 0.0  # generate() starts every prompt from its first beam (the copies score -1e9)
    for step in range(steps):
        last = step == steps - 1
        kept_rows, want = (beam_run.sequences, beam_run.returned) if last else (beam_run.ids[step + 1], k)
        candidates = score[:, None] + beam_run.log_probs[step].double()
        new_score: list[float] = []
        for prompt in range(runs):
            parents = beam_run.ids[step][prompt * k : (prompt + 1) * k]
            block = candidates[prompt * k : (prompt + 1) * k].flatten()
            vocab = candidates.shape[1]
            picked: list[int] = []
            for seq in kept_rows[prompt * want : (prompt + 1) * want]:
                same = (parents == seq[:-1]).all(1).nonzero().flatten()
                if same.numel() == 0:
                    return f"step {step + 1}, prompt {prompt}: a kept beam extends none of the running beams"
                parent = int(same[block.view(k, vocab)[same, int(seq[-1])].argmax()])
                picked.append(parent * vocab + int(seq[-1]))
            if len(set(picked)) < want:
                return f"step {step + 1}, prompt {prompt}: the same candidate was kept twice"
            kept = block[picked]
            others = block.clone()
            others[picked] = float("-inf")
            floor = float(kept.min())
            if float(others.max()) > floor + SLACK * max(1.0, abs(floor)):
                best = int(others.argmax())
                return (
                    f"step {step + 1}, prompt {prompt}: a candidate scoring {float(others.max()):.6g} (beam {best // vocab}, "
                    f"token {best % vocab}) was dropped while one scoring {floor:.6g} was kept"
                )
            if last and any(float(b) > float(a) + SLACK * max(1.0, abs(float(a))) for a, b in zip(kept[:-1], kept[1:])):
                return f"prompt {prompt}: the {want} returned sequences are not in order of their scores ({[round(float(s), 5) for s in kept]})"
            new_score.extend(float(s) for s in kept)
        score = torch.tensor(new_score, dtype=torch.float64)
    return None


def reference_logits(beam_run: BeamRun, precise: Any) -> torch.Tensor:
    """The higher-precision, cache-free next-token logits of every running beam at every step [B*beams, N, V]:
    one forward per distinct beam that no longer beam extends, read at each of its prefixes."""
    k = beam_run.beams
    at: dict[tuple[int, ...], tuple[int, int]] = {}  # (prompt, *ids) -> (forward index, position)
    longest: list[tuple[int, torch.Tensor]] = []
    prompt_len = beam_run.prompt_ids.shape[1]
    for step in reversed(range(len(beam_run.ids))):
        for row, seq in enumerate(beam_run.ids[step]):
            if _key(row // k, seq) in at:
                continue
            longest.append((row // k, seq))
            for length in range(prompt_len, seq.shape[0] + 1):
                at.setdefault(_key(row // k, seq[:length]), (len(longest) - 1, length - 1))
    outputs = []
    for prompt, seq in longest:
        mask = torch.cat([beam_run.mask[prompt], torch.ones(seq.shape[0] - prompt_len, dtype=beam_run.mask.dtype)])
        positions = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 1)
        outputs.append(precise.logits(seq[None], mask[None], positions[None])[0])
    rows = [
        torch.stack([outputs[i][pos] for i, pos in (at[_key(row // k, seq)] for row, seq in enumerate(ids))])
        for ids in beam_run.ids
    ]
    return torch.stack(rows, dim=1)


def _key(prompt: int, seq: torch.Tensor) -> tuple[int, ...]:
    return (prompt, *seq.tolist())


def judge_trace(plain: BeamRun, candidate: BeamRun, precise: Any, factor: float) -> FloorVerdict:
    """Each side's beams against the cache-free reference of their own tokens; the candidate's error within
    ``factor`` times the plain path's (equivalence.judge). ``stats["worst"]`` says where the candidate's beams
    are furthest from the reference."""
    plain_stats = error_stats(plain.logits, reference_logits(plain, precise))
    cand_reference = reference_logits(candidate, precise)
    cand_stats = error_stats(candidate.logits, cand_reference)
    ok, ratios = judge(cand_stats, plain_stats, factor)
    verdict = FloorVerdict(ok, plain_stats, cand_stats, ratios, factor, precise.name)
    if cand_stats.per_position is not None and cand_stats.positions:
        row, step = divmod(int(cand_stats.per_position.argmax()), candidate.logits.shape[1])
        delta = float((candidate.logits[row, step] - cand_reference[row, step].float()).abs().max())
        verdict.stats["worst"] = f"new token {step + 1}, prompt {row // candidate.beams}, beam {row % candidate.beams}: max |Δlogit| {delta:.4g}"
    return verdict


def parted(plain: BeamRun, candidate: BeamRun) -> int | None:
    """The first step (1-based new token) whose running beams differ as sets between the two runs, or the last
    step + 1 when only the returned sequences differ; None when the runs agree throughout."""
    k = plain.beams
    for step, (a, b) in enumerate(zip(plain.ids, candidate.ids)):
        for prompt in range(plain.batch):
            if {tuple(r.tolist()) for r in a[prompt * k : (prompt + 1) * k]} != {tuple(r.tolist()) for r in b[prompt * k : (prompt + 1) * k]}:
                return step
    if not torch.equal(plain.sequences, candidate.sequences):
        return len(plain.ids)
    return None
