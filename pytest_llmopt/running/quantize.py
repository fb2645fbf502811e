"""bitsandbytes schemes: their configs, what transformers refuses with them, and the whole-model quality bound.

Whole-model quality is measured against the unquantized model (same weights, compute dtype) on fixed text, by
teacher forcing: top-1 agreement of next-token predictions and KL(P_ref || P_quant) per position. It is defined
on trained weights only: a random model's next-token distribution is nearly flat (the shapes, initializer 0.02:
top-1 agreement 0.016 at 7B is what any quantization gives), or peaked by construction (the tiny built-ins,
initializer 0.25), and says nothing about whether a scheme is right. On any weights, the layer rule judges it
(qlayers.py).
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
    if (
        variant.quant != "none"
        and variant.compile == "auto"
        and not bnb_compileable(variant.quant)
    ):
        return UNSUPPORTED_COMPILE
    return None


def bnb_compileable(quant: str) -> bool:
    """What the installed transformers' bitsandbytes quantizer class says of ``is_compileable`` (False when
    it cannot say without an instance): generate() auto-compiles only when it is True."""
    import importlib

    module, name = (
        ("quantizer_bnb_8bit", "Bnb8BitHfQuantizer")
        if quant == "int8"
        else ("quantizer_bnb_4bit", "Bnb4BitHfQuantizer")
    )
    try:
        cls = getattr(
            importlib.import_module(f"transformers.quantizers.{module}"), name
        )
        flag = cls.__dict__.get("is_compileable", getattr(cls, "is_compileable", False))
        return (
            bool(flag.fget(None))
            if isinstance(flag, property) and flag.fget
            else bool(flag)
        )
    except (ImportError, AttributeError, TypeError):
        return False


def model_kind(spec: Any) -> str:
    """'tiny' (built-in, random, initializer 0.25: peaked logits), 'shape' (built-in full-size shape,
    random, initializer 0.02: nearly flat logits) or 'trained' (anything else)."""
    from . import zoo

    if getattr(spec, "kind", "") != "builtin":
        return "trained"
    return "shape" if spec.ref in zoo.SHAPES else "tiny"


@dataclass(frozen=True)
class QualityBound:
    min_top1: float
    max_kl: float
    where: str


# Bounds of whole-model quality on trained models, per scheme. Rule: min_top1 = worst measured - 0.10, max_kl = 2 x
# worst measured mean KL. Figures (scripts/measure-quant.py --model ..., teacher forcing over the built-in prompts,
# bf16 compute, CPU, bitsandbytes 0.50.2, transformers 5.2x): tinystories-656k / stories-260k: int8 top-1
# 0.950-0.956, KL 0.0019-0.0049; nf4 0.66-0.68, 0.13-0.25; fp4 0.58-0.62, 0.21-0.48; nf4-dq 0.67-0.69, 0.13-0.25
# (sub-1M-parameter models: a billion-parameter trained model does better, so these bounds are loose for it).
TRAINED_CPU = "measured on tinystories-656k and stories-260k (CPU, bitsandbytes 0.50.2, bf16), worst - 0.10 and 2 x worst KL"
QUALITY: dict[str, QualityBound] = {
    "int8": QualityBound(0.85, 0.01, TRAINED_CPU),
    "nf4": QualityBound(0.56, 0.51, TRAINED_CPU),
    "fp4": QualityBound(0.47, 0.97, TRAINED_CPU),
    "nf4-dq": QualityBound(0.56, 0.51, TRAINED_CPU),
}


def bound_for(spec: Any, scheme: str) -> QualityBound:
    """The whole-model bound of ``scheme``; only trained models have one (model_kind)."""
    if model_kind(spec) != "trained":
        raise ValueError(f"{getattr(spec, 'name', spec)}: whole-model quality is defined on trained weights only")
    return QUALITY[scheme]


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
    keep = (
        torch.ones(ref.shape[:2], dtype=torch.bool)
        if mask is None
        else mask.bool().cpu()
    )
    logp = torch.log_softmax(ref, dim=-1)
    logq = torch.log_softmax(cand, dim=-1)
    kl = (logp.exp() * (logp - logq)).sum(-1)[keep]
    agree = (ref.argmax(-1) == cand.argmax(-1))[keep]
    return Quality(
        float(agree.float().mean()), float(kl.mean()), float(kl.max()), int(keep.sum())
    )


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
