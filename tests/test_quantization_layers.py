"""Proof of power of the quantization layer rule (pytest_llmopt/running/qlayers.py), on CPU with bitsandbytes: each fault of a
quantizer, injected into a correctly loaded tiny-llama, breaks the rule, and the same load without it keeps it."""

from __future__ import annotations

import copy
import importlib.util
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from pytest_llmopt.running import compat, qlayers, quantize, zoo

pytestmark = pytest.mark.skipif(
    not all(importlib.util.find_spec(name) for name in ("bitsandbytes", "accelerate")),
    reason="needs bitsandbytes and accelerate (pip install -c constraints.txt -e '.[test]'): bitsandbytes 0.50 quantizes on CPU",
)


@pytest.fixture(scope="module")
def plain_folder(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Path]:
    """tiny-llama in bfloat16 (seed 0) and the folder it was saved to, to load quantized from."""
    model = zoo.build_builtin("tiny-llama", 0, torch.bfloat16, "cpu", compat.from_config, "eager")
    folder = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(folder)
    return model, folder


def _load(folder: Path, scheme: str) -> Any:
    from transformers import AutoModelForCausalLM

    config = quantize.bnb_config(scheme, torch.bfloat16)
    return AutoModelForCausalLM.from_pretrained(folder, quantization_config=config, dtype=torch.bfloat16, device_map="cpu").eval()


def _layers(model: Any, kind: str) -> list[Any]:
    return [m for m in model.modules() if type(m).__name__ == kind]


def scale_off(model: Any, scheme: str, plain: Any) -> None:
    """Every layer dequantized with its scale 3 % too large (a block maximum or row scale mis-read)."""
    if scheme == "int8":
        for layer in _layers(model, "Linear8bitLt"):
            layer.weight.SCB.mul_(1.03)
    else:
        for layer in _layers(model, "Linear4bit"):
            layer.weight.quant_state.absmax.mul_(1.03)


def read_as_nf4(model: Any, scheme: str, plain: Any) -> None:
    """FP4 weights dequantized with the NF4 code book (the wrong 4-bit type)."""
    import bitsandbytes.functional as bnb

    for layer in _layers(model, "Linear4bit"):
        state = layer.weight.quant_state
        state.quant_type, state.code = "nf4", bnb.get_4bit_type("nf4", device="cpu")


def one_left_unquantized(model: Any, scheme: str, plain: Any) -> None:
    """One decoder projection kept in the compute dtype (a skip list or a module-name match gone wrong)."""
    parent = model.model.layers[1].mlp
    parent.down_proj = copy.deepcopy(plain.model.layers[1].mlp.down_proj)


def block_of_32(model: Any, scheme: str, plain: Any) -> None:
    """4-bit weights quantized in blocks of 32 instead of 64 (a loader with the wrong block size; bitsandbytes' CPU kernel
    takes no block longer than a row of the 64-wide tiny model, so the smaller size)."""
    import bitsandbytes.functional as bnb

    originals = dict(plain.named_modules())
    for name, layer in model.named_modules():
        if type(layer).__name__ == "Linear4bit":
            data, wrong = bnb.quantize_4bit(originals[name].weight.data, blocksize=32, quant_type=scheme)
            layer.weight.data, layer.weight.quant_state = data, wrong


FAULTS: dict[str, tuple[str, Callable[..., None]]] = {
    "int8 scale off by 3 %": ("int8", scale_off),
    "nf4 scale off by 3 %": ("nf4", scale_off),
    "fp4 scale off by 3 %": ("fp4", scale_off),
    "fp4 weights read as nf4": ("fp4", read_as_nf4),
    "a layer left unquantized (int8)": ("int8", one_left_unquantized),
    "a layer left unquantized (nf4)": ("nf4", one_left_unquantized),
    "nf4 in blocks of 32": ("nf4", block_of_32),
    "fp4 in blocks of 32": ("fp4", block_of_32),
}


@pytest.mark.parametrize("name", list(FAULTS))
def test_fault_breaks_the_layer_rule(name: str, plain_folder: tuple[Any, Path]) -> None:
    plain, folder = plain_folder
    scheme, inject = FAULTS[name]
    quantized = _load(folder, scheme)
    assert qlayers.verdict(qlayers.measure(plain, quantized, scheme), scheme) is None  # the control: the same load, unharmed
    quantized = _load(folder, scheme)
    inject(quantized, scheme, plain)
    found = qlayers.measure(plain, quantized, scheme)
    why = qlayers.verdict(found, scheme)
    assert why is not None, f"{name}: the rule passed; largest gap {max(layer.gap for layer in found):.3f}"
    if inject is one_left_unquantized:
        assert "1 of 28 linear layers left unquantized (still in the compute dtype): model.layers.1.mlp.down_proj" in why
    else:
        assert "layers' outputs are farther from the" in why and "gap = |bnb - scheme|" in why


@pytest.mark.parametrize(("first", "then"), [("nf4", "int8"), ("fp4", "nf4")])
def test_weights_quantized_twice_break_the_layer_rule(first: str, then: str, plain_folder: tuple[Any, Path], tmp_path: Path) -> None:
    """A checkpoint that was itself a dequantized ``first`` export, quantized again with ``then``: judged against the
    original weights, every layer carries the first scheme's error on top of the second's."""
    plain, _ = plain_folder
    twice = copy.deepcopy(plain)
    with torch.no_grad():
        for _, module in qlayers._candidates(twice):
            module.weight.copy_(qlayers.emulate(module.weight, first)[0].to(module.weight.dtype))
    twice.save_pretrained(tmp_path)
    found = qlayers.measure(plain, _load(tmp_path, then), then)
    why = qlayers.verdict(found, then)
    assert why is not None and "28 of 28 layers' outputs are farther from the" in why, why


def test_the_rule_has_a_bound_for_every_scheme_and_no_bound_that_cannot_fail() -> None:
    assert set(qlayers.GAP) == set(quantize.SCHEMES)
    for scheme, bound in qlayers.GAP.items():
        # A layer left unquantized sits at a gap of exactly 1: every bound must stay below it.
        assert 0 < bound.bound < 1, (scheme, bound)
        assert bound.where, scheme


def test_the_emulation_reads_bitsandbytes_own_code_books() -> None:
    """The code books are written in qlayers (independent of bitsandbytes); they must be bitsandbytes' values."""
    import bitsandbytes.functional as bnb

    for scheme in ("nf4", "fp4"):
        theirs = sorted(set(bnb.get_4bit_type(scheme, device="cpu").tolist()))
        assert qlayers.code_book(scheme).tolist() == pytest.approx(theirs), scheme
