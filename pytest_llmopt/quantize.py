"""bitsandbytes schemes: their configs, what transformers refuses with them, and the quality bound.

Quality is measured against the unquantized model (same weights, compute dtype) on fixed text, by
teacher forcing: top-1 agreement of next-token predictions and KL(P_ref || P_quant) per position.
Random-weight shapes (initializer 0.02) have nearly flat logits, so their argmax is a near-tie almost
everywhere and top-1 agreement says little; their KL is tiny. Trained models have peaked distributions:
agreement is meaningful there. So the thresholds are per (kind of model, scheme).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

SCHEMES = ("int8", "nf4", "fp4", "nf4-dq")

UNSUPPORTED_COMPILE = (
    "unsupported by transformers: bitsandbytes models are never compiled by generate() "
    "(hf_quantizer.is_compileable is False)"
)


def bnb_config(quant: str, compute_dtype: Any, skip: list[str] | None = None) -> Any:
    """The BitsAndBytesConfig of a scheme; ``skip`` is ``llm_int8_skip_modules`` (modules left unquantized)."""
    from transformers import BitsAndBytesConfig

    extra: dict[str, Any] = {"llm_int8_skip_modules": skip} if skip else {}
    if quant == "int8":
        return BitsAndBytesConfig(load_in_8bit=True, **extra)
    if quant not in SCHEMES:
        raise ValueError(f"unknown quantization {quant!r}; known: {', '.join(SCHEMES)}")
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4" if quant.startswith("nf4") else "fp4",
        bnb_4bit_use_double_quant=quant == "nf4-dq",
        bnb_4bit_compute_dtype=compute_dtype,
        **extra,
    )


def unsupported(variant: Any) -> str | None:
    """Combinations transformers refuses for a quantized model (reported as unsupported, not failed)."""
    if variant.quant != "none" and variant.compile == "auto" and not bnb_compileable(variant.quant):
        return UNSUPPORTED_COMPILE
    return None


def bnb_compileable(quant: str) -> bool:
    """What the installed transformers' bitsandbytes quantizer class says of ``is_compileable`` (False when
    it cannot say without an instance): generate() auto-compiles only when it is True."""
    import importlib

    module, name = ("quantizer_bnb_8bit", "Bnb8BitHfQuantizer") if quant == "int8" else ("quantizer_bnb_4bit", "Bnb4BitHfQuantizer")
    try:
        cls = getattr(importlib.import_module(f"transformers.quantizers.{module}"), name)
        flag = cls.__dict__.get("is_compileable", getattr(cls, "is_compileable", False))
        return bool(flag.fget(None)) if isinstance(flag, property) else bool(flag)
    except (ImportError, AttributeError, TypeError):
        return False


def is_random_weights(spec: Any) -> bool:
    """Built-in models (tiny and full-size shapes) carry random weights; anything else is taken as trained."""
    return bool(getattr(spec, "kind", "") == "builtin")


@dataclass(frozen=True)
class QualityBound:
    min_top1: float
    max_kl: float
    where: str


# Thresholds of the quality bound: (kind, scheme) -> bound. Where the GPU figure is still to come, the
# value is a PLACEHOLDER (marked so) chosen loose; scripts/measure-quant.py prints the figures.
# Random shapes: flat logits, so top-1 is near-tie noise; the bound is mostly on KL.
# PLACEHOLDER(H100): set from `scripts/measure-quant.py` on llama-1b-shape / llama-7b-shape, bf16:
#   min_top1 = measured min over both shapes - 0.10, max_kl = 3 x measured max over both shapes.
QUALITY: dict[tuple[str, str], QualityBound] = {
    ("random", "int8"): QualityBound(0.50, 0.05, "PLACEHOLDER: loose until the H100 run"),
    ("random", "nf4"): QualityBound(0.20, 0.20, "PLACEHOLDER: loose until the H100 run"),
    ("random", "fp4"): QualityBound(0.15, 0.30, "PLACEHOLDER: loose until the H100 run"),
    ("random", "nf4-dq"): QualityBound(0.20, 0.20, "PLACEHOLDER: loose until the H100 run"),
    # Trained: measured with bitsandbytes 0.50.2 on CPU (bf16) on tinystories-656k and stories-260k,
    # see QUALITY_CPU_FIGURES; bound = measured worst - margin (top-1) and 3 x measured worst (KL).
    ("trained", "int8"): QualityBound(0.85, 0.05, "CPU bnb 0.50.2, tinystories-656k/stories-260k"),
    ("trained", "nf4"): QualityBound(0.70, 0.30, "CPU bnb 0.50.2, tinystories-656k/stories-260k"),
    ("trained", "fp4"): QualityBound(0.60, 0.50, "CPU bnb 0.50.2, tinystories-656k/stories-260k"),
    ("trained", "nf4-dq"): QualityBound(0.70, 0.30, "CPU bnb 0.50.2, tinystories-656k/stories-260k"),
}


def bound_for(spec: Any, scheme: str) -> QualityBound:
    return QUALITY[("random" if is_random_weights(spec) else "trained", scheme)]


@dataclass(frozen=True)
class Quality:
    top1: float
    kl_mean: float
    kl_max: float
    positions: int


def quality(reference_logits: Any, candidate_logits: Any, mask: Any = None) -> Quality:
    """Top-1 agreement and KL(P_ref || P_cand) over the real positions of two [B, T, V] logit tensors."""
    import torch

    ref = reference_logits.double()
    cand = candidate_logits.double()
    keep = torch.ones(ref.shape[:2], dtype=torch.bool) if mask is None else mask.bool().cpu()
    logp = torch.log_softmax(ref, dim=-1)
    logq = torch.log_softmax(cand, dim=-1)
    kl = (logp.exp() * (logp - logq)).sum(-1)[keep]
    agree = (ref.argmax(-1) == cand.argmax(-1))[keep]
    return Quality(float(agree.float().mean()), float(kl.mean()), float(kl.max()), int(keep.sum()))


def finite(logits: Any) -> bool:
    import torch

    return bool(torch.isfinite(logits).all())


def longest_run(tokens: Any) -> int:
    """Longest run of one repeated token in a 1-D sequence."""
    values = [int(t) for t in tokens]
    best = run = 1 if values else 0
    for a, b in zip(values, values[1:]):
        run = run + 1 if a == b else 1
        best = max(best, run)
    return best


# A quantized model has collapsed when its longest run of one token is at least COLLAPSE_RUN and more
# than twice the unquantized model's on the same prompt (trained models repeat too; the comparison
# keeps that from counting).
COLLAPSE_RUN = 8


def collapsed(quant_tokens: Any, reference_tokens: Any) -> bool:
    run = longest_run(quant_tokens)
    return run >= COLLAPSE_RUN and run > 2 * longest_run(reference_tokens)
