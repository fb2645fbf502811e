"""The variant matrix: cache x compile x attention (SDPA backend) x quantization x dtype.

A variant is one point of that matrix, with a stable readable id (``static+compile/sdpa:flash/nf4/bf16``)
and the requirements it has on the machine and on the model. Requirements on the machine become
markers and skip reasons that say how to enable the variant; requirements on the model become
"unsupported by the model", which the report keeps apart from a failure. This module is pure data
and string handling: it imports neither torch nor transformers.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from itertools import product

CACHES = ("dynamic", "static", "static-object")
COMPILES = ("off", "auto", "default", "reduce-overhead")
ATTENTIONS = (
    "eager",
    "sdpa",
    "sdpa:math",
    "sdpa:flash",
    "sdpa:efficient",
    "sdpa:cudnn",
    "flash_attention_2",
    "flash_attention_3",
    "flex_attention",
)
QUANTS = ("none", "int8", "nf4", "fp4", "nf4-dq")  # nf4-dq: nf4 with double quantization
DTYPES = ("float32", "float16", "bfloat16")
AXES: Mapping[str, tuple[str, ...]] = {
    "cache": CACHES,
    "compile": COMPILES,
    "attention": ATTENTIONS,
    "quant": QUANTS,
}
SHORT_DTYPE = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}


@dataclass(frozen=True)
class Requirement:
    """Something a variant needs. ``marker`` is the pytest marker it maps to; ``how`` says how to get it."""

    key: str
    marker: str
    how: str


# What the machine (or the installed packages) must provide. Keys are answered by machine.Machine.
NEEDS_CUDA = Requirement("cuda", "llmopt_cuda", "needs CUDA: run on a GPU runner (--llmopt-device=cuda or auto)")
NEEDS_SM80 = Requirement("sm80", "llmopt_cuda", "needs an Ampere or newer GPU (compute capability >= 8.0)")
NEEDS_SM90 = Requirement("sm90", "llmopt_cuda", "needs a Hopper GPU (compute capability 9.0)")
NEEDS_HALF = Requirement(
    "half", "llmopt_cuda", "needs float16 or bfloat16: run with --llmopt-dtype=bfloat16 (or float16)"
)
NEEDS_BNB = Requirement(
    "bitsandbytes", "llmopt_bitsandbytes", "needs bitsandbytes: pip install 'pytest-llmopt[cuda]'"
)
NEEDS_FLASH2 = Requirement(
    "flash_attn", "llmopt_flash_attn", "needs flash-attn 2: pip install 'pytest-llmopt[flash]' (or a prebuilt wheel)"
)
NEEDS_FLASH3 = Requirement(
    "flash_attn_3", "llmopt_flash_attn", "needs flash-attn 3 (flash_attn_interface): build the hopper/ folder of flash-attention"
)
NEEDS_COMPILE = Requirement(
    "compile", "llmopt_compile", "needs a working torch.compile (inductor and a C++ compiler on CPU)"
)

# What the model class must declare (see compat.model_capabilities). Missing -> "unsupported by the model".
MODEL_NEEDS_ATTENTION = {
    "sdpa": "sdpa",
    "flash_attention_2": "flash_attn",
    "flash_attention_3": "flash_attn",
    "flex_attention": "flex_attn",
}


@dataclass(frozen=True)
class Variant:
    """One point of the matrix. ``dtype`` is filled from the session (--llmopt-dtype)."""

    cache: str = "dynamic"
    compile: str = "off"
    attention: str = "sdpa"
    quant: str = "none"
    dtype: str = "float32"

    def __post_init__(self) -> None:
        for axis, allowed in (*AXES.items(), ("dtype", DTYPES)):
            value = getattr(self, axis)
            if value not in allowed:
                raise ValueError(f"unknown {axis} {value!r}; known: {', '.join(allowed)}")
        if self.compile != "off" and self.cache == "dynamic":
            raise ValueError("compiled decoding needs a static cache (cache=static or static-object)")

    @property
    def id(self) -> str:
        head = self.cache
        if self.compile == "auto":
            head += "+compile"
        elif self.compile != "off":
            head += f"+compile:{self.compile}"
        parts = [head, self.attention]
        if self.quant != "none":
            parts.append(self.quant)
        parts.append(SHORT_DTYPE[self.dtype])
        return "/".join(parts)

    @property
    def sdpa_backend(self) -> str | None:
        """'math', 'flash', ... for a pinned SDPA backend; None when SDPA picks its own (or no SDPA)."""
        return self.attention.split(":", 1)[1] if self.attention.startswith("sdpa:") else None

    @property
    def attn_implementation(self) -> str:
        """The value for transformers' ``attn_implementation``."""
        return "sdpa" if self.attention.startswith("sdpa") else self.attention

    def with_dtype(self, dtype: str) -> Variant:
        return replace(self, dtype=dtype)

    def machine_requirements(self) -> list[Requirement]:
        """Everything the machine must offer, in the order a user should fix them."""
        needs: list[Requirement] = []
        cuda_only = (
            self.attention in ("sdpa:flash", "sdpa:efficient", "sdpa:cudnn", "flash_attention_2", "flash_attention_3")
            or self.compile == "reduce-overhead"
            or self.quant != "none"
        )
        if cuda_only:
            needs.append(NEEDS_CUDA)
        if self.attention in ("sdpa:flash", "flash_attention_2"):
            needs.append(NEEDS_SM80)
        if self.attention in ("sdpa:cudnn", "flash_attention_3"):
            needs.append(NEEDS_SM90)
        if self.attention in ("sdpa:flash", "flash_attention_2", "flash_attention_3") and self.dtype == "float32":
            needs.append(NEEDS_HALF)
        if self.attention == "flash_attention_2":
            needs.append(NEEDS_FLASH2)
        if self.attention == "flash_attention_3":
            needs.append(NEEDS_FLASH3)
        if self.quant != "none":
            needs.append(NEEDS_BNB)
        if self.compile != "off" or self.attention == "flex_attention":
            needs.append(NEEDS_COMPILE)
        return needs

    def model_requirements(self) -> list[str]:
        """Capability names (compat.CAPABILITIES) the model class must declare."""
        needs: list[str] = []
        base = MODEL_NEEDS_ATTENTION.get(self.attn_implementation)
        if base:
            needs.append(base)
        if self.cache != "dynamic":
            needs.append("static_cache")
        if self.compile != "off":
            needs.append("compile_fullgraph")
        return needs

    def markers(self) -> list[str]:
        return sorted({req.marker for req in self.machine_requirements()})


def matrix(dtype: str = "float32", **axes: Iterable[str] | str) -> list[Variant]:
    """All valid combinations of the given axis values (others at their defaults), in a stable order."""
    unknown = set(axes) - set(AXES)
    if unknown:
        raise ValueError(f"unknown axis {sorted(unknown)}; known: {', '.join(AXES)}")
    names = list(AXES)
    choices = [
        [axes[name]] if isinstance(axes.get(name), str) else list(axes.get(name, [getattr(Variant(), name)]))
        for name in names
    ]
    out: list[Variant] = []
    for combo in product(*choices):
        values = dict(zip(names, combo))
        if values["compile"] != "off" and values["cache"] == "dynamic":
            continue
        out.append(Variant(dtype=dtype, **values))
    return out


@dataclass(frozen=True)
class Term:
    """``axis=pattern,...`` (keep matching variants) or ``axis!=pattern,...`` (drop them)."""

    axis: str
    patterns: tuple[str, ...]
    negate: bool

    def matches(self, variant: Variant) -> bool:
        value = getattr(variant, self.axis)
        hit = any(fnmatch.fnmatchcase(value, pattern) for pattern in self.patterns)
        return hit != self.negate

    def __str__(self) -> str:
        return f"{self.axis}{'!=' if self.negate else '='}{','.join(self.patterns)}"


@dataclass(frozen=True)
class Selection:
    """A parsed --llmopt-variants: every term must match. The empty selection keeps everything."""

    terms: tuple[Term, ...] = field(default_factory=tuple)

    def matches(self, variant: Variant) -> bool:
        return all(term.matches(variant) for term in self.terms)

    def __str__(self) -> str:
        return " ".join(str(term) for term in self.terms) or "all"


TERM_RE = re.compile(r"^(?P<axis>[a-z_]+)\s*(?P<op>!=|=)\s*(?P<values>.+)$")


def parse_selection(text: str) -> Selection:
    """Parse 'attention=eager,sdpa* cache!=static-object'. Raises ValueError naming the bad term."""
    terms: list[Term] = []
    for raw in re.split(r"[;\s]+", text.strip()):
        if not raw:
            continue
        found = TERM_RE.match(raw)
        if not found:
            raise ValueError(f"cannot read {raw!r}: write axis=value[,value...] or axis!=value[,...]")
        axis = found["axis"]
        if axis not in AXES:
            raise ValueError(f"unknown axis {axis!r} in {raw!r}; axes: {', '.join(AXES)}")
        patterns = tuple(value for value in found["values"].split(",") if value)
        for pattern in patterns:
            if not any(fnmatch.fnmatchcase(value, pattern) for value in AXES[axis]):
                raise ValueError(f"{axis} {pattern!r} matches nothing; known: {', '.join(AXES[axis])}")
        terms.append(Term(axis, patterns, found["op"] == "!="))
    return Selection(tuple(terms))
