"""Expected memory footprint of a bitsandbytes-quantized model, computed from its module tree.

The rule is the documented one, written down independently of transformers' own conversion code (so a
bug there is not shared): every ``nn.Linear`` (and GPT-2 ``Conv1D``) weight of the model is quantized
except the output embedding (``lm_head``) and any weight tied to the input embedding; embeddings,
norms, biases and the output head stay in the compute dtype; buffers keep their own dtype.
int8 stores 1 byte per weight, nf4/fp4 0.5 byte (two 4-bit codes per uint8).

``get_memory_footprint()`` counts parameters and buffers only, so the quantization state (int8 per-row
scales ``SCB``; 4-bit absmax per block of 64, compressed by double quant) is outside it. Measured with
bitsandbytes 0.50.2 / transformers 5.24 on CPU (tiny-llama, bf16): the formula gives the footprint to
the byte for int8 and nf4. On the H100 (transformers 5.17) the 7B shape measured bf16 12.55, int8 6.52,
nf4 3.50 GiB; the formula gives 12.55, 6.52, 3.50.

Because a single total can hide one layer left in bf16 inside a large model, ``audit`` also checks every
weight that should be quantized, by name: that check holds at any model size.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

# Bytes per weight of a quantized Linear, as get_memory_footprint counts them.
BYTES_PER_WEIGHT: dict[str, float] = {
    "int8": 1.0,
    "nf4": 0.5,
    "fp4": 0.5,
    "nf4-dq": 0.5,
}
# Quantization state kept outside parameters (not in get_memory_footprint), reported for information:
# int8: one fp32 scale per output row; 4-bit: one fp32 absmax per block of 64 weights; double quant:
# one uint8 per block plus one fp32 per 256 blocks.
BLOCK = 64
# Relative slack of the total-footprint bound. The formula matched to the byte on CPU (see above);
# 0.1% leaves room for buffers a release adds (e.g. rotary tables) without hiding a layer left in bf16
# in a model of up to ~1000 Linears (one such layer is >= 1/1000 of the quantized weights); ``audit``
# covers the rest, at any size.
FOOTPRINT_SLACK = 1e-3


@dataclass
class Expected:
    """What a quantized model's footprint should be, and where it comes from."""

    scheme: str
    total_bytes: int
    unquantized_bytes: int  # the same tree with every parameter in the compute dtype
    quantized_weights: dict[str, int] = field(
        default_factory=dict
    )  # weight name -> number of weights
    kept_bytes: int = 0  # parameters and buffers that stay in their dtype (embeddings, head, norms, biases)
    state_bytes: int = 0  # quantization state outside get_memory_footprint

    @property
    def ratio(self) -> float:
        return self.total_bytes / self.unquantized_bytes


def _linear_types() -> tuple[type[Any], ...]:
    import torch

    types: list[type[Any]] = [torch.nn.Linear]
    try:
        from transformers.pytorch_utils import Conv1D

        types.append(Conv1D)
    except ImportError:  # pragma: no cover - every supported release has it
        pass
    return tuple(types)


def quantizable_weights(model: Any) -> dict[str, int]:
    """Names of the weights bitsandbytes should quantize (every Linear but the output head and weights
    tied to the input embedding), with their number of weights in the unquantized model."""
    head = (
        model.get_output_embeddings()
        if hasattr(model, "get_output_embeddings")
        else None
    )
    embed = (
        model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    )
    embed_weight = getattr(embed, "weight", None)
    out: dict[str, int] = {}
    module: Any
    for name, module in model.named_modules():
        if not isinstance(module, _linear_types()) or module is head:
            continue
        weight = module.weight
        if embed_weight is not None and weight is embed_weight:
            continue
        out[f"{name}.weight"] = _original_numel(weight)
    return out


def _original_numel(weight: Any) -> int:
    """Weights of an unquantized Linear; for a bnb 4-bit parameter, the shape before packing."""
    state = getattr(weight, "quant_state", None)
    if state is not None and getattr(state, "shape", None) is not None:
        n = 1
        for d in state.shape:
            n *= int(d)
        return n
    return int(weight.nelement())


def expected(model: Any, scheme: str, compute_bytes: int) -> Expected:
    """The footprint ``model`` (an unquantized module tree: built from a config, on any device, meta
    included) should have once quantized with ``scheme``, its parameters in a ``compute_bytes`` dtype."""
    if scheme not in BYTES_PER_WEIGHT:
        raise ValueError(
            f"unknown scheme {scheme!r}; known: {', '.join(BYTES_PER_WEIGHT)}"
        )
    quantized = quantizable_weights(model)
    total = 0.0
    unquantized = 0
    kept = 0
    seen: set[int] = set()
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in seen:
            continue
        seen.add(id(param))
        numel = int(param.nelement())
        own = compute_bytes if param.is_floating_point() else param.element_size()
        unquantized += numel * own
        if name in quantized:
            total += numel * BYTES_PER_WEIGHT[scheme]
        else:
            total += numel * own
            kept += numel * own
    buffers = sum(int(b.nelement()) * b.element_size() for b in model.buffers())
    return Expected(
        scheme=scheme,
        total_bytes=int(total) + buffers,
        unquantized_bytes=unquantized + buffers,
        quantized_weights=quantized,
        kept_bytes=kept + buffers,
        state_bytes=state_bytes(quantized.values(), scheme),
    )


def state_bytes(weights: Iterable[int], scheme: str) -> int:
    """Quantization state outside the parameters (approximate for int8: a row count is not kept here,
    so it is bounded by one fp32 per 64 weights, the 4-bit figure)."""
    total = sum(weights)
    blocks = -(-total // BLOCK)
    if scheme == "nf4-dq":
        return blocks + 4 * -(-blocks // 256)
    return 4 * blocks


@dataclass
class Verdict:
    ok: bool
    message: str
    footprint: int
    expected: Expected
    offenders: list[str]


def check(
    quantized_model: Any, want: Expected, footprint: int | None = None, label: str = ""
) -> Verdict:
    """The footprint bound: the model's ``get_memory_footprint()`` (or ``footprint``) within
    FOOTPRINT_SLACK of the formula, and no weight that should be quantized stored wider than the scheme."""
    measured = int(
        footprint if footprint is not None else quantized_model.get_memory_footprint()
    )
    offenders = audit(quantized_model, want)
    limit = want.total_bytes * (1 + FOOTPRINT_SLACK)
    floor = want.total_bytes * (1 - FOOTPRINT_SLACK)
    problems = []
    if not floor <= measured <= limit:
        problems.append(
            f"get_memory_footprint() is {_gib(measured)} ({measured} bytes), the formula for {want.scheme} gives "
            f"{_gib(want.total_bytes)} ({want.total_bytes} bytes): {measured / want.total_bytes:.4f}x, allowed "
            f"{1 - FOOTPRINT_SLACK:.4f}x to {1 + FOOTPRINT_SLACK:.4f}x"
        )
    if offenders:
        shown = ", ".join(offenders[:5]) + (
            f" and {len(offenders) - 5} more" if len(offenders) > 5 else ""
        )
        problems.append(
            f"{len(offenders)} weight(s) that should be {want.scheme} are stored wider: {shown}"
        )
    head = f"{label}: " if label else ""
    message = head + (
        "; ".join(problems)
        if problems
        else f"footprint {_gib(measured)} = {measured / want.unquantized_bytes:.3f}x of unquantized"
    )
    return Verdict(not problems, message, measured, want, offenders)


def audit(quantized_model: Any, want: Expected) -> list[str]:
    """Weights of ``want.quantized_weights`` whose stored bytes per weight exceed the scheme's
    (e.g. 'model.layers.1.mlp.down_proj.weight: 2.00 bytes/weight')."""
    params = dict(quantized_model.named_parameters(remove_duplicate=False))
    allowed = BYTES_PER_WEIGHT[want.scheme]
    out = []
    for name, numel in want.quantized_weights.items():
        param = params.get(name)
        if param is None:
            out.append(f"{name}: missing")
            continue
        per = param.nelement() * param.element_size() / max(numel, 1)
        if per > allowed + 1e-9:
            out.append(f"{name}: {per:.2f} bytes/weight")
    return out


def simulate(model: Any, scheme: str, skip: Iterable[str] = ()) -> Any:
    """Stand-in for a bitsandbytes load where bitsandbytes is absent (CPU CI): replace, in place, the
    weights *transformers'* quantizer would convert (its ``get_keys_to_not_convert`` plus ``skip``, as
    ``llm_int8_skip_modules``) by int8 / packed uint8 tensors of bitsandbytes' shapes. It exercises the
    bound, not bitsandbytes; the real load is used wherever bitsandbytes imports."""
    import torch

    try:
        from transformers.quantizers.base import get_keys_to_not_convert
    except ImportError:  # older layout
        from transformers.integrations.bitsandbytes import get_keys_to_not_convert  # type: ignore[no-redef,attr-defined]
    keep = set(get_keys_to_not_convert(model)) | set(skip)
    module: Any
    for name, module in list(model.named_modules()):
        if not isinstance(module, _linear_types()) or any(
            name == k or name.endswith("." + k) or name.startswith(k + ".")
            for k in keep
        ):
            continue
        weight = module.weight
        numel = int(weight.nelement())
        if scheme == "int8":
            data = torch.zeros(weight.shape, dtype=torch.int8, device=weight.device)
        else:
            data = torch.zeros(
                (-(-numel // 2), 1), dtype=torch.uint8, device=weight.device
            )
        module.weight = torch.nn.Parameter(data, requires_grad=False)
    return model


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**28 else f"{n / 2**20:.2f} MiB"
