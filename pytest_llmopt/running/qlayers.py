"""The layer rule of quantization: each quantized linear layer against the same layer in the compute dtype, on
fixed inputs, and against an emulation of its scheme written here (no bitsandbytes code).

Whole-model agreement of next-token predictions says something only on trained weights (a random model's
distribution is nearly flat); a layer's error is defined on any weights, random ones included. Per layer, with P the
unquantized layer, Q bitsandbytes' and W the unquantized weights:

* ``error = |Q(X) - P(X)| / |P(X)|`` on fixed Gaussian inputs X (seeded, the compute dtype): what the scheme costs
  the layer, reported beside ``expected``, the same figure of the emulated scheme;
* ``gap = |W_q - W_e| / |W_e - W|``: how far the weights bitsandbytes computes with (W_q, read as Q's output on the
  identity) are from the scheme's own (W_e, emulated on W), in units of the scheme's error. Where a weight lies on
  the boundary between two codes (within TIE: bf16 weights often do, and bitsandbytes' CPU and CUDA kernels break
  such ties differently), either code is the scheme's. A correct layer sits near 0 (the compute dtype's rounding);
  a dequantization scale off by a few percent, another 4-bit type, another block size or a second quantization moves
  it to a sizeable fraction of 1 or beyond; a layer left unquantized sits at 1. The bound on the gap (GAP) decides.

The emulation: 4-bit schemes quantize the flattened weight in blocks of 64 to the nearest value of the NF4 or FP4
code book times the block's absolute maximum (double quantization also rounds the maxima to 8 bits: inside the
bound); int8 (LLM.int8) rounds each output row to 127 steps of its absolute maximum (and each input row likewise:
``error`` on Gaussian inputs, which stay below the outlier threshold).
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
# The largest gap of each scheme, bitsandbytes 0.50.2, bf16, on CPU (torch 2.13, transformers 5.25): the tiny built-ins,
# tinystories-656k and stories-260k (its 4-bit layers are not a shape bitsandbytes' CPU kernel takes):
#   int8 0.263-0.337, nf4 0.022-0.023, fp4 0.015-0.016, nf4-dq 0.037-0.063.
# On an H100 (torch 2.11+cu130, transformers 5.17) the output-level form of the gap, before ties were allowed either
# way, gave nf4 0.024-0.026 and nf4-dq 0.034-0.095 on llama-1b/7b-shape, both real models and three tiny built-ins, and
# fp4 0.09-0.19: bitsandbytes' CUDA kernel decides a value between two codes by thresholds rounded to 6-7 digits and
# breaks ties the other way than its CPU kernel, which TIE now absorbs. With this rule, on the H100: llama-1b/7b-shape
# int8 0.197 / 0.189, nf4 0.016, fp4 0.009, nf4-dq 0.030 (baselines/h100-80gb-hbm3/quantization-2026-12-07/NOTES.md):
# below the CPU maxima, so the bounds are those x GAP_MARGIN.
CPU = "on CPU (bitsandbytes 0.50.2, bf16)"
GAP: dict[str, GapBound] = {
    "int8": GapBound(0.337, f"stories-260k {CPU}"),
    "nf4": GapBound(0.023, f"the tiny built-ins and tinystories-656k {CPU}"),
    "fp4": GapBound(0.016, f"tiny-gpt2 {CPU}"),
    "nf4-dq": GapBound(0.063, f"tinystories-656k {CPU}"),
}


def code_book(scheme: str) -> torch.Tensor:
    values = NF4 if scheme.startswith("nf4") else FP4 + tuple(-v for v in FP4)
    return torch.tensor(sorted(set(values)), dtype=torch.float32)


TIE = 2.0**-20  # a scaled weight this close to the boundary between two codes may round either way


def emulate(weight: torch.Tensor, scheme: str, block: int = BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """``weight`` quantized and dequantized by the scheme, in float32, and the same with every weight that lies on a
    boundary between two codes rounded the other way (elsewhere the two agree)."""
    w = weight.detach().float()
    if scheme == "int8":
        scale = w.abs().amax(dim=1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny) / 127
        steps = w / scale
        nearest = torch.round(steps)
        tie = ((steps - torch.floor(steps)) - 0.5).abs() <= TIE * 127
        other = torch.where(tie, 2 * torch.floor(steps) + 1 - nearest, nearest)
        return nearest * scale, other * scale
    flat = w.reshape(-1)
    pad = (-flat.numel()) % block
    blocks = torch.nn.functional.pad(flat, (0, pad)).reshape(-1, block)
    absmax = blocks.abs().amax(dim=1, keepdim=True)
    scaled = blocks * (1.0 / absmax.clamp_min(torch.finfo(torch.float32).tiny))  # times the reciprocal, as bitsandbytes
    code = code_book(scheme).to(w.device)
    middles = (code[1:] + code[:-1]) / 2
    index = torch.bucketize(scaled, middles)  # the nearest code
    below, above = (index - 1).clamp(min=0), index.clamp(max=middles.numel() - 1)
    other = torch.where((index > 0) & ((scaled - middles[below]).abs() <= TIE), index - 1, index)
    other = torch.where((index < middles.numel()) & ((scaled - middles[above]).abs() <= TIE), index + 1, other)

    def values(chosen: torch.Tensor) -> torch.Tensor:
        return (code[chosen] * absmax).reshape(-1)[: flat.numel()].reshape(w.shape)

    return values(index), values(other)


def _emulated_output(weight: torch.Tensor, inputs: torch.Tensor, scheme: str) -> torch.Tensor:
    """The scheme's layer output (no bias) on ``inputs`` [n, in], in float32: LLM.int8 also rounds each input row."""
    emulated, _ = emulate(weight, scheme)
    x = inputs.float()
    if scheme == "int8":
        scale = x.abs().amax(dim=1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny) / 127
        x = torch.round(x / scale) * scale
    return x @ emulated.T


@dataclass(frozen=True)
class LayerError:
    name: str
    error: float  # |Q(X) - P(X)| / |P(X)|
    expected: float  # |E(X) - P(X)| / |P(X)|: the scheme's own
    gap: float  # |W_q - W_e| / |W_e - W|, either code where a weight lies on a boundary
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
        device, dtype = _device(candidate), weight.dtype
        generator = torch.Generator(device="cpu").manual_seed(seed)
        x = (torch.randn(ROWS, weight.shape[1], generator=generator) * INPUT_STD).to(device=weight.device, dtype=dtype)
        exact = x.float() @ weight.float().T  # no rounding of the reference's own (the bias cancels in every figure)
        bias = candidate(torch.zeros_like(x[:1]).to(device)).float().to(weight.device)
        q = candidate(x.to(device)).float().to(weight.device) - bias
        # The weights bitsandbytes computes with: its output on the identity, less the bias.
        w_q = (candidate(torch.eye(weight.shape[1], dtype=dtype, device=device)).float().to(weight.device) - bias).T
        first, second = emulate(weight, scheme)
        nearest = torch.where((w_q - first).abs() <= (w_q - second).abs(), first, second)
        scale = float(exact.norm())
        out.append(
            LayerError(
                name=name,
                error=float((q - exact).norm()) / scale,
                expected=float((_emulated_output(weight, x, scheme) - exact).norm()) / scale,
                gap=float((w_q - nearest).norm()) / max(float((first - weight.float()).norm()), torch.finfo(torch.float32).tiny),
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
