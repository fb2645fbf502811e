"""Equivalence checks whose verdict scales with the model: judged against the model's own rounding noise.

Different kernels round differently, and rounding noise grows with depth, width and the size of the logits, so
no constant tolerance fits every model. Each check therefore measures, in the session, a **noise floor**: the
error that the plain path (eager attention, dynamic cache, no compile) makes in the run dtype against a
higher-precision reference that shares no cache code with it: the same weights in float32 (float64 when the
run dtype is float32), run as one cache-free forward pass over the prompt and the reference's tokens (teacher
forcing). The optimized path's error against the same reference must stay within FLOOR_FACTOR times that
floor, on each statistic of FLOOR_STATISTICS (flash-attention's tests use this form, with a factor of 2).

Greedy generations: where the two runs part at a near-tie, the candidate path is replayed teacher-forced on
the reference's tokens and judged at every remaining position, so a bug that starts late cannot hide behind an
early tie. A near-tie needs no rule of its own: two tokens can only swap places when both paths' logits are
within their noise of each other.

Sampling paths cannot be compared token by token: distribution.py tests them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

# --------------------------------------------------------------------------------------------------
# Errors against a higher-precision reference (the noise floor)


@dataclass(frozen=True)
class ErrorStats:
    """How far one path's logits are from a higher-precision reference over the real positions.

    ``max_abs``: the largest |Δlogit|; ``mean_rms`` / ``max_rms``: the root mean square over the vocabulary at
    each position, averaged / maximised over positions; ``q99``: the 99th percentile of the per-position
    largest |Δlogit|. ``per_position`` keeps the per-position RMS for localised verdicts.
    """

    max_abs: float
    mean_rms: float
    max_rms: float
    q99: float
    positions: int
    per_position: torch.Tensor | None = field(default=None, repr=False, compare=False)

    def as_dict(self) -> dict[str, float]:
        return {k: round(getattr(self, k), 6) for k in ("max_abs", "mean_rms", "max_rms", "q99")}

    def ratios(self, plain: ErrorStats) -> dict[str, float]:
        """Each statistic over the plain path's (inf where the plain path is exact)."""
        out = {}
        for key, value in self.as_dict().items():
            base = getattr(plain, key)
            out[key] = round(value / base, 3) if base > 0 else (0.0 if value == 0 else float("inf"))
        return out


def error_stats(candidate: torch.Tensor, reference: torch.Tensor, valid: torch.Tensor | None = None) -> ErrorStats:
    """Statistics of |candidate - reference| over [B, T, V] logits at the positions where ``valid`` [B, T] is true."""
    delta = (candidate.float() - reference.to(candidate.device).float()).abs()
    if valid is None:
        valid = torch.ones(delta.shape[:2], dtype=torch.bool, device=delta.device)
    valid = valid.to(delta.device).bool()
    real = delta[valid]  # [positions, V]
    if real.numel() == 0:
        return ErrorStats(0.0, 0.0, 0.0, 0.0, 0)
    rms = real.double().pow(2).mean(-1).sqrt()
    peak = real.amax(-1).double()
    return ErrorStats(
        max_abs=float(peak.max()),
        mean_rms=float(rms.mean()),
        max_rms=float(rms.max()),
        q99=float(torch.quantile(peak, 0.99)),
        positions=int(real.shape[0]),
        per_position=rms.cpu(),
    )


# The noise-floor rule (module docstring). A path passes when, on each statistic of FLOOR_STATISTICS, its error
# against the higher-precision reference is at most FLOOR_FACTOR[run dtype] times the plain path's error on the
# same tokens. Measured on an H100 (torch 2.11, transformers 5.17, baselines/h100-80gb-hbm3/NOTES.md), as the
# ratio of a path's statistic to plain eager's, over a padded batch and a 1,024-token padded pair:
#   correct kernels (SDPA auto/math/efficient/cuDNN, flash_attention_2), bf16 and fp16, 1B and 7B shapes:
#     0.74-1.07 on every statistic;
#   attention scale off by 2 %: mean_rms >= 1.63, max_abs >= 1.85 in bf16 (7B is the hardest), >= 10 in fp16;
#   attention scale off by 1 %: 1.19-1.47 in bf16 (below the factor: the sensitivity limit), >= 5 in fp16;
#   padding mask dropped: >= 5.7 (mean_rms) and >= 15 (max_abs).
# Half precision: 1.5 sits a third above the worst correct kernel and below the 2 % fault at every size.
# flash-attention's own tests use 2, which would miss the 2 % fault at 7B (its max_abs ratio there is 1.85).
# float32 (judged against float64, CPU): the floor is ~1e-6 of a logit, so a single position's max is noisy:
# inductor's reordered reductions reached 1.5 (tiny-llama, torch 2.13), a compiled padded-batch row against
# the same prompt alone 3.02 (stories-260k, max |Δ| 2.3e-5), while every real fault is hundreds of times the
# floor: 10 costs no power there.
FLOOR_FACTOR: dict[str, float] = {"bfloat16": 1.5, "float16": 1.5, "float32": 10.0}
# mean_rms: a systematic error anywhere (scale, rotary, a norm) moves it, and averaging over the vocabulary and
# the positions keeps it steady for correct kernels; max_abs: an error confined to a few positions (a late cache
# slot, a window rollover) that the mean dilutes.
FLOOR_STATISTICS = ("mean_rms", "max_abs")


@dataclass
class Generation:
    """Prompt and generated ids with the raw logits of every generated position (float32, on CPU).

    ``replay(tokens)`` runs the same path again teacher-forced on ``tokens`` [B, N] (each step's choice is
    forced, its raw logits are kept), so that logits can be judged after the two runs part at a near-tie.
    """

    prompt_ids: torch.Tensor  # [B, P]
    sequences: torch.Tensor  # [B, P + N]
    logits: torch.Tensor | None  # [B, N, V]
    attention_mask: torch.Tensor | None = None
    replay: Callable[[torch.Tensor], Generation] | None = field(default=None, repr=False, compare=False)
    suppressed: tuple[int, ...] = ()  # ids generate() was told never to pick (their raw logits may still be highest)
    scores: torch.Tensor | None = None  # [B, N, V] processed scores (output_scores=True), float32 on CPU

    @property
    def new_tokens(self) -> torch.Tensor:
        return self.sequences[:, self.prompt_ids.shape[1] :]

    def row(self, index: int) -> Generation:
        """Row ``index`` of a (left-padded) batch as if it had been run alone: padding stripped, its own logits.
        Its replay forces that row and keeps the other rows on their own tokens (the batch runs again)."""
        prompt = self.prompt_ids[index]
        if self.attention_mask is not None:
            prompt = prompt[self.attention_mask[index].bool()]
        prompt = prompt.unsqueeze(0)
        sequences = torch.cat([prompt, self.new_tokens[index : index + 1]], dim=1)
        logits = None if self.logits is None else self.logits[index : index + 1]
        replay = None
        if self.replay is not None:
            batch_replay, others = self.replay, self.new_tokens

            def replay(tokens: torch.Tensor) -> Generation:
                forced = others.clone()
                forced[index] = tokens[0].to(forced.device)
                return batch_replay(forced).row(index)

        scores = None if self.scores is None else self.scores[index : index + 1]
        return Generation(prompt, sequences, logits, None, replay, self.suppressed, scores)


def stack(generations: Sequence[Generation]) -> Generation:
    """Generations of one prompt each (as many new tokens each) as one left-padded batch, so that one verdict
    judges all their positions, as a batched check pools its rows (the batches FLOOR_FACTOR was measured on).
    Judged one short prompt at a time, the floor's largest |Δlogit| is a draw over a few dozen positions: on a
    64-wide model in bf16 a lucky plain path set it a third below its usual value (tiny-gpt2 under
    transformers 4.57.6, H100: eager 0.18 on one prompt, 0.27-0.30 on the others and in every batched check)."""
    if len(generations) == 1:
        return generations[0]
    rows = [g.row(0) for g in generations]  # padding (if any) stripped
    width = max(r.prompt_ids.shape[1] for r in rows)
    prompts = torch.zeros(len(rows), width, dtype=rows[0].prompt_ids.dtype)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for index, r in enumerate(rows):
        start = width - r.prompt_ids.shape[1]
        prompts[index, start:], mask[index, start:] = r.prompt_ids[0], 1
    sequences = torch.cat([prompts, torch.cat([r.new_tokens.to(prompts.dtype) for r in rows])], dim=1)
    logits = None if any(r.logits is None for r in rows) else torch.cat([r.logits for r in rows])  # type: ignore[misc]
    scores = None if any(r.scores is None for r in rows) else torch.cat([r.scores for r in rows])  # type: ignore[misc]
    replay = None
    if all(g.replay is not None for g in generations):

        def replay(tokens: torch.Tensor) -> Generation:
            return stack([g.replay(tokens[i : i + 1]) for i, g in enumerate(generations)])  # type: ignore[misc]

    suppressed = tuple(sorted(set().union(*(g.suppressed for g in generations))))
    return Generation(prompts, sequences, logits, mask, replay, suppressed, scores)


@dataclass
class FloorVerdict:
    """A path's error against the higher-precision reference, judged by the plain path's error (the floor)."""

    ok: bool
    plain: ErrorStats
    candidate: ErrorStats
    ratios: dict[str, float]
    factor: float
    reference: str  # what the higher-precision reference was, e.g. "float32 copy on cuda"
    message: str = ""
    stats: dict[str, Any] = field(default_factory=dict)

    def figures(self) -> dict[str, Any]:
        """What the report keeps beside the verdict."""
        return {
            "floor_reference": self.reference,
            "floor_factor": self.factor,
            "floor_mean_rms": round(self.plain.mean_rms, 6),
            "floor_max_abs": round(self.plain.max_abs, 6),
            "error_mean_rms": round(self.candidate.mean_rms, 6),
            "error_max_abs": round(self.candidate.max_abs, 6),
            "floor_ratio": max(self.ratios.values(), default=0.0),
            "sensitivity": round(self.sensitivity, 6),
        }

    @property
    def sensitivity(self) -> float:
        """The smallest systematic logit shift (RMS over the vocabulary, at every position) that fails this check:
        an error e independent of the rounding noise n adds in quadrature, sqrt(n^2 + e^2) > factor * n."""
        return math.sqrt(max(self.factor**2 - 1.0, 0.0)) * self.plain.mean_rms


def judge(candidate: ErrorStats, plain: ErrorStats, factor: float) -> tuple[bool, dict[str, float]]:
    """``candidate`` within ``factor`` x ``plain`` on every statistic of FLOOR_STATISTICS."""
    ratios = {key: candidate.ratios(plain)[key] for key in FLOOR_STATISTICS}
    ok = all(getattr(candidate, key) <= factor * getattr(plain, key) for key in FLOOR_STATISTICS)
    return ok, ratios


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


def ratios_text(verdict: FloorVerdict) -> str:
    """Each judged statistic against its floor, and what was allowed, for a failure message."""
    parts = []
    for key in FLOOR_STATISTICS:
        cand, plain = getattr(verdict.candidate, key), getattr(verdict.plain, key)
        parts.append(f"{key} {cand:.4g} vs floor {plain:.4g} (x{verdict.ratios[key]:.2f})")
    return "; ".join(parts) + f"; allowed x{verdict.factor:g} (reference: {verdict.reference})"


def compare_greedy(
    reference: Generation,
    candidate: Generation,
    precise: torch.Tensor,
    tokenizer: Any,
    eos_ids: Sequence[int] = (),
    forced: Generation | None = None,
    precise_name: str = "higher precision",
    factor: float = FLOOR_FACTOR["bfloat16"],
    label: str = "",
    reproduce: str = "",
) -> FloorVerdict:
    """Two greedy generations of the same prompts, judged against ``precise`` [B, N, V]: the logits of a
    higher-precision, cache-free forward over the prompt and the *reference's* tokens.

    The candidate's own logits are judged up to and including the first token where the two part (a real
    near-tie is within the noise there). After it, ``forced`` (the candidate path teacher-forced on the
    reference's tokens) gives the candidate's logits at every remaining position, so that a bug that starts
    after an early tie still shows. Without it, only the positions up to the first difference are judged, and
    the verdict says so. In assisted decoding transformers hands the processors to the draft model too, so a
    teacher-forced replay drafts the forced tokens: it checks the verification of agreeing drafts.
    """
    ref_new, cand_new = reference.new_tokens, candidate.new_tokens
    if ref_new.shape != cand_new.shape or reference.logits is None or candidate.logits is None:
        shapes = f"generated {tuple(cand_new.shape)} tokens, the reference {tuple(ref_new.shape)}"
        empty = error_stats(torch.zeros(1, 1, 1), torch.zeros(1, 1, 1))
        problem = shapes if ref_new.shape != cand_new.shape else "a side recorded no logits"
        return FloorVerdict(False, empty, empty, {}, factor, precise_name, f"{label}: {problem}")
    unsupported = _unsupported_choices(candidate, eos_ids)
    differ = ref_new != cand_new
    valid = torch.ones(ref_new.shape, dtype=torch.bool)
    cand_logits = candidate.logits
    teacher_forced = False
    if bool(differ.any()):
        # Up to and including each row's first difference, the free run's own logits (the tie itself must be
        # within the noise); after it, the teacher-forced replay's, or nothing without one.
        first = torch.where(differ.any(1), differ.float().argmax(1), torch.full((differ.shape[0],), differ.shape[1]))
        before = torch.arange(differ.shape[1]).unsqueeze(0) <= first.unsqueeze(1)
        if forced is not None and forced.logits is not None and torch.equal(forced.new_tokens, ref_new):
            cand_logits = torch.where(before.unsqueeze(-1), candidate.logits, forced.logits)
            teacher_forced = True
        else:
            valid = before
    plain = error_stats(reference.logits, precise, valid)
    cand = error_stats(cand_logits, precise, valid)
    ok, ratios = judge(cand, plain, factor)
    ok = ok and not unsupported
    rows_parted = [int(r) for r in differ.any(1).nonzero().flatten()]
    margins = []
    for row in rows_parted:
        pos = int(differ[row].float().argmax())
        a, b = int(ref_new[row, pos]), int(cand_new[row, pos])
        ref_choice, cand_choice = _choices(reference), _choices(candidate)
        margins.append(max(float(ref_choice[row, pos, a] - ref_choice[row, pos, b]),
                           float(cand_choice[row, pos, b] - cand_choice[row, pos, a])))
    verdict = FloorVerdict(ok, plain, cand, ratios, factor, precise_name)
    verdict.stats = {
        "max_delta_logit": float((cand_logits - reference.logits).abs()[valid].max()) if bool(valid.any()) else 0.0,
        "near_ties": len(rows_parted) if ok else 0,
        "min_tie_margin": min(margins) if margins and ok else None,
        "teacher_forced": teacher_forced,
        **verdict.figures(),
    }
    if unsupported:
        row, pos, chosen, best, margin = unsupported[0]
        verdict.message = (
            f"{label}: greedy chose a token its own logits do not pick: prompt {row}, new token {pos}: "
            f"{_describe(tokenizer, chosen)} where the argmax is {_describe(tokenizer, best)}, {margin:.4g} higher "
            f"({len(unsupported)} such token(s); e.g. a draft token accepted without verification)\n"
            f"  reference continuation: {_text(tokenizer, ref_new[row])}\n  candidate continuation: {_text(tokenizer, cand_new[row])}"
        )
        if reproduce:
            verdict.message += f"\n  reproduce: {reproduce}"
    elif not ok:
        verdict.message = _greedy_message(reference, candidate, cand_logits, precise, valid, verdict, tokenizer, teacher_forced, label, reproduce)
    return verdict


def _choices(generation: Generation) -> torch.Tensor:
    """What a greedy step picks the argmax of: the processed scores where the run kept them (users' logits
    processors, e.g. a repetition penalty, move the choice off the raw logits), else the raw logits."""
    chosen_from = generation.scores if generation.scores is not None else generation.logits
    assert chosen_from is not None
    return chosen_from


def _unsupported_choices(generation: Generation, eos_ids: Sequence[int]) -> list[tuple[int, int, int, int, float]]:
    """(row, position, chosen, argmax, margin) wherever a greedy path chose a token that is not the argmax of its
    own logits, or processed scores where kept (EOS and the generation's other suppressed ids excluded: they are never picked). The floor rule assumes each side's tokens
    follow its logits; a path that commits a token its logits reject breaks that without moving any logit."""
    assert generation.logits is not None
    logits = _choices(generation).float().clone()
    excluded = sorted(set(eos_ids) | set(generation.suppressed))
    if excluded:
        logits[..., excluded] = float("-inf")
    chosen = generation.new_tokens.to(torch.long)
    best = logits.argmax(-1)
    gap = logits.gather(-1, best.unsqueeze(-1)).squeeze(-1) - logits.gather(-1, chosen.unsqueeze(-1)).squeeze(-1)
    return [(r, p, int(chosen[r, p]), int(best[r, p]), float(gap[r, p])) for r, p in (gap > 0).nonzero().tolist()]


def _greedy_message(
    reference: Generation,
    candidate: Generation,
    cand_logits: torch.Tensor,
    precise: torch.Tensor,
    valid: torch.Tensor,
    verdict: FloorVerdict,
    tokenizer: Any,
    teacher_forced: bool,
    label: str,
    reproduce: str,
) -> str:
    assert reference.logits is not None
    err = (cand_logits.float() - precise.float()).abs().amax(-1).masked_fill(~valid, -1.0)
    plain_err = (reference.logits.float() - precise.float()).abs().amax(-1)
    row, pos = divmod(int(err.argmax()), err.shape[1])
    lines = [f"{label}: logits left the rounding-noise floor of the plain path", f"  {ratios_text(verdict)}"]
    prompt = reference.prompt_ids[row]
    if reference.attention_mask is not None:
        prompt = prompt[reference.attention_mask[row].bool()]
    lines.append(
        f"  worst: prompt {row} {_text(tokenizer, prompt, 80)}, new token {pos}: |Δlogit| {float(err[row, pos]):.4g} "
        f"against the reference, the plain path's {float(plain_err[row, pos]):.4g} there"
    )
    differ = (reference.new_tokens != candidate.new_tokens)[row]
    if bool(differ.any()):
        first = int(differ.float().argmax())
        a, b = int(reference.new_tokens[row, first]), int(candidate.new_tokens[row, first])
        ref_l, cand_l = reference.logits[row, first], candidate.logits[row, first]  # type: ignore[index]
        lines.append(f"  tokens part at new token {first}: reference {_describe(tokenizer, a)} (logit {float(ref_l[a]):.4f}, the other "
                     f"{float(ref_l[b]):.4f}), candidate {_describe(tokenizer, b)} (logit {float(cand_l[b]):.4f}, the other {float(cand_l[a]):.4f})")
        lines.append("  judged after it " + ("teacher-forced on the reference's tokens" if teacher_forced else "up to that token only (no replay)"))
    lines.append(f"  reference continuation: {_text(tokenizer, reference.new_tokens[row])}")
    lines.append(f"  candidate continuation: {_text(tokenizer, candidate.new_tokens[row])}")
    if reproduce:
        lines.append(f"  reproduce: {reproduce}")
    return "\n".join(lines)


def compare_logits(
    reference: torch.Tensor,
    candidate: torch.Tensor,
    precise: torch.Tensor,
    mask: torch.Tensor | None,
    precise_name: str = "higher precision",
    factor: float = FLOOR_FACTOR["bfloat16"],
    label: str = "",
    reproduce: str = "",
) -> FloorVerdict:
    """Logits of one forward pass over the same (possibly padded) batch on the plain path (``reference``) and
    the candidate, both judged against ``precise`` at the real (unpadded) positions: the flash-attention rule."""
    valid = mask.bool() if mask is not None else torch.ones(reference.shape[:2], dtype=torch.bool)
    plain = error_stats(reference, precise, valid)
    cand = error_stats(candidate, precise, valid)
    ok, ratios = judge(cand, plain, factor)
    verdict = FloorVerdict(ok, plain, cand, ratios, factor, precise_name)
    verdict.stats = {"max_delta_logit": float((candidate - reference).abs().amax(-1)[valid].max()) if bool(valid.any()) else 0.0, **verdict.figures()}
    if not ok:
        err = (candidate.float() - precise.float()).abs().amax(-1).masked_fill(~valid, -1.0)
        row, pos = divmod(int(err.argmax()), err.shape[1])
        plain_err = float((reference[row, pos].float() - precise[row, pos].float()).abs().max())
        verdict.message = (
            f"{label}: logits left the rounding-noise floor of the plain path\n  {ratios_text(verdict)}\n"
            f"  worst real (unpadded) position: row {row}, position {pos}: |Δlogit| {float(err[row, pos]):.4g} against the "
            f"reference, the plain path's {plain_err:.4g}"
        )
        if reproduce:
            verdict.message += f"\n  reproduce: {reproduce}"
    return verdict
