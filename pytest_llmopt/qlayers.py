"""The layer rule of quantization: each quantized linear layer against the same layer in the compute dtype, on
fixed inputs, and against an emulation of its scheme written here (no bitsandbytes code).

Whole-model agreement of next-token predictions says something only on trained weights (a random model's
distribution is nearly flat); a layer's error is defined on any weights, random ones included. Per layer, on
fixed Gaussian inputs X (seeded, in the compute dtype), with P the unquantized layer, Q bitsandbytes' and E the
scheme emulated on P's weights:

* ``error = |Q(X) - P(X)| / |P(X)|``: what the scheme costs the layer (reported);
* ``gap = |Q(X) - E(X)| / |E(X) - P(X)|``: how far bitsandbytes' output is from the scheme, in units of the
  scheme's own error. A correct layer sits near 0 (rounding); a dequantization scale off by a few percent,
  another 4-bit type, another block size or a second quantization moves it to a sizeable fraction of 1 or
  beyond; a layer left unquantized sits at exactly 1. The bound on the gap (GAP) is the verdict.

The emulation: 4-bit schemes quantize the flattened weight in blocks of 64 to the nearest value of the NF4 or FP4
code book times the block's absolute maximum (double quantization also rounds the maxima to 8 bits: inside the
bound); int8 (LLM.int8) rounds the weight per output row and the input per row to 127 steps of their absolute
maxima and multiplies in integers (inputs stay below the outlier threshold, so no column is kept in half precision).
"""

from __future__ import annotations

import statistics
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

NF4 = (-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635, -0.18477343022823334,
       -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
       0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0)  # the NF4 paper's code book (QLoRA)
FP4 = (0.0, 0.0052083334885537624, 0.6666666865348816, 1.0, 0.3333333432674408, 0.5, 0.1666666716337204, 0.25)  # and negated
BLOCK = 64  # transformers' BitsAndBytesConfig quantizes 4-bit weights in blocks of 64
ROWS = 64  # inputs per layer
INPUT_STD = 0.5  # |x| stays far below LLM.int8's outlier threshold (6)
QUANTIZED_CLASSES = ("Linear8bitLt", "Linear4bit", "LinearFP4", "LinearNF4")



@dataclass(frozen=True)
class GapBound:
    """The largest gap a correct bitsandbytes may show: the largest measured, times GAP_MARGIN."""

    measured: float  # the largest gap measured on a correct bitsandbytes
    where: str  # on what it was measured

    @property
    def bound(self) -> float:
        return round(self.measured * GAP_MARGIN, 3)


GAP_MARGIN = 2.0
CPU = "CPU, bitsandbytes 0.50.2, torch 2.13, transformers 5.25, bf16: the six tiny built-ins, tinystories-656k, stories-260k (int8)"
GAP: dict[str, GapBound] = {
    "int8": GapBound(0.235, CPU),
    "nf4": GapBound(0.025, CPU),
    "fp4": GapBound(0.018, CPU),
    "nf4-dq": GapBound(0.066, CPU),
}


def code_book(scheme: str) -> torch.Tensor:
    values = NF4 if scheme.startswith("nf4") else FP4 + tuple(-v for v in FP4)
    return torch.tensor(sorted(set(values)), dtype=torch.float32)


def emulate_4bit(weight: torch.Tensor, scheme: str, block: int = BLOCK) -> torch.Tensor:
    """``weight`` quantized and dequantized by the 4-bit scheme, in float32."""
    flat = weight.detach().float().reshape(-1)
    pad = (-flat.numel()) % block
    blocks = torch.nn.functional.pad(flat, (0, pad)).reshape(-1, block)
    absmax = blocks.abs().amax(dim=1, keepdim=True)
    # times the reciprocal, as bitsandbytes computes it: on bf16 weights many values fall exactly between two codes
    scaled = blocks * (1.0 / absmax.clamp_min(torch.finfo(torch.float32).tiny))
    code = code_book(scheme).to(weight.device)
    index = torch.bucketize(scaled, (code[1:] + code[:-1]) / 2)  # the nearest code value
    return (code[index] * absmax).reshape(-1)[: flat.numel()].reshape(weight.shape)


def emulate_int8(weight: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
    """LLM.int8's vector-wise product of ``inputs`` [n, in] with ``weight`` [out, in], in float32."""
    w = weight.detach().float()
    x = inputs.float()
    w_max = w.abs().amax(dim=1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
    x_max = x.abs().amax(dim=1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
    product = torch.round(x * 127 / x_max) @ torch.round(w * 127 / w_max).T
    return product * x_max * w_max.T / 127**2


@dataclass(frozen=True)
class LayerError:
    name: str
    error: float  # |Q - P| / |P|
    expected: float  # |E - P| / |P|: the scheme's own error
    gap: float  # |Q - E| / |E - P|
    quantized: bool  # bitsandbytes replaced the layer


def _linear_weight(module: Any) -> torch.Tensor:
    """[out, in]: GPT-2's Conv1D stores its weight transposed."""
    return module.weight.T if type(module).__name__ == "Conv1D" else module.weight


def _candidates(plain: Any) -> Iterator[tuple[str, Any]]:
    """The unquantized model's linear layers that the scheme quantizes (all but the output head)."""
    head = plain.get_output_embeddings()
    for name, module in plain.named_modules():
        if module is not head and (isinstance(module, torch.nn.Linear) or type(module).__name__ == "Conv1D"):
            yield name, module


@torch.no_grad()
def measure(plain: Any, quantized: Any, scheme: str, seed: int = 0) -> list[LayerError]:
    """The layer rule's figures for every linear layer of ``plain`` (its counterpart of the same name in ``quantized``)."""
    modules = dict(quantized.named_modules())
    out = []
    for name, reference in _candidates(plain):
        candidate = modules.get(name)
        if candidate is None:
            continue
        weight = _linear_weight(reference)
        generator = torch.Generator(device="cpu").manual_seed(seed)
        x = (torch.randn(ROWS, weight.shape[1], generator=generator) * INPUT_STD).to(device=weight.device, dtype=weight.dtype)
        bias = reference.bias.float() if getattr(reference, "bias", None) is not None else 0.0
        p = x.float() @ weight.float().T + bias  # exact: no rounding of the reference's own
        q = candidate(x.to(_device(candidate))).float().to(p.device)
        e = (emulate_int8(weight, x) if scheme == "int8" else x.float() @ emulate_4bit(weight, scheme).T) + bias
        scheme_error = float((e - p).norm())
        out.append(
            LayerError(
                name=name,
                error=float((q - p).norm() / p.norm()),
                expected=scheme_error / float(p.norm()),
                gap=float((q - e).norm()) / max(scheme_error, torch.finfo(torch.float32).tiny),
                quantized=type(candidate).__name__ in QUANTIZED_CLASSES,
            )
        )
    return out


def _device(module: Any) -> torch.device:
    return next(module.parameters()).device


def figures(layers: list[LayerError]) -> dict[str, Any]:
    """What a report records of the rule on one model and scheme."""
    worst = max(layers, key=lambda layer: layer.gap)
    return {
        "layers": len(layers),
        "layers_unquantized": sum(not layer.quantized for layer in layers),
        "layer_error_median": round(statistics.median(layer.error for layer in layers), 5),
        "layer_error_max": round(max(layer.error for layer in layers), 5),
        "layer_expected_max": round(max(layer.expected for layer in layers), 5),
        "layer_gap_median": round(statistics.median(layer.gap for layer in layers), 4),
        "layer_gap_max": round(worst.gap, 4),
        "layer_gap_worst": worst.name,
    }


def verdict(layers: list[LayerError], scheme: str) -> str | None:
    """Why the layers break the rule (None where they keep it): a layer bitsandbytes did not replace, or one whose
    output is farther from the scheme than the bound allows, worst first."""
    if not layers:
        return f"no linear layer of the model was found quantized by {scheme}"
    bound = GAP[scheme]
    left = [layer.name for layer in layers if not layer.quantized]
    bad = sorted((layer for layer in layers if layer.gap > bound.bound), key=lambda layer: -layer.gap)
    if not left and not bad:
        return None
    lines = []
    if left:
        lines.append(f"{len(left)} of {len(layers)} linear layers left unquantized (still in the compute dtype): {', '.join(left[:5])}")
    if bad:
        lines.append(
            f"{len(bad)} of {len(layers)} layers' outputs are farther from the {scheme} scheme than a correct bitsandbytes "
            f"(gap = |bnb - scheme| / |scheme - unquantized| above {bound.bound}, {GAP_MARGIN:g} x the largest measured, {bound.measured}, {bound.where}):"
        )
        lines += [f"  {layer.name}: gap {layer.gap:.3f}, error {layer.error:.4f} where the scheme's own is {layer.expected:.4f}" for layer in bad[:5]]
    return "\n".join(lines)
