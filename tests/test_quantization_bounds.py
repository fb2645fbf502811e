"""Proof of power of the quantization bounds, on CPU.

The footprint formula is checked against full-size shapes (built on the meta device: no memory) and
against a load: the real bitsandbytes load where bitsandbytes (and accelerate) import, else a stand-in
that converts what transformers' own quantizer would convert. A config that leaves one decoder Linear in
bf16 (``llm_int8_skip_modules``) must break the bound, at any model size.
"""

from __future__ import annotations

import importlib.util
from typing import Any

import pytest
import torch

from pytest_llmopt.running import compat, footprint, quantize, zoo
from pytest_llmopt.running.variants import Variant

GIB = 2**30
HAS_BNB = all(
    importlib.util.find_spec(name) is not None
    for name in ("bitsandbytes", "accelerate")
)
NEEDS_BNB = pytest.mark.skipif(
    not HAS_BNB,
    reason="needs bitsandbytes and accelerate (pip install bitsandbytes accelerate): bnb 0.50 runs int8/nf4 on CPU",
)


def _meta(name: str, dtype: torch.dtype = torch.bfloat16) -> Any:
    with torch.device("meta"):
        return compat.from_config(zoo.builtin_config(name), dtype, "sdpa")


def _tiny(dtype: torch.dtype = torch.bfloat16) -> Any:
    """tiny-llama as from_pretrained builds it in ``dtype``: parameters in ``dtype``, rotary tables
    (non-persistent buffers) left in float32 (build_builtin's ``.to(dtype)`` would cast those too)."""
    torch.manual_seed(0)
    return compat.from_config(zoo.builtin_config("tiny-llama"), dtype, "sdpa")


def test_formula_gives_the_footprints_measured_on_the_h100() -> None:
    """llama-7b-shape, measured with bitsandbytes on the H100 (transformers 5.17): bf16 12.55, int8 6.52,
    nf4 3.50 GiB (the guide: Mistral-7B 13.74 GB -> 6.87 GB in 8-bit, the same halving)."""
    model = _meta("llama-7b-shape")
    int8 = footprint.expected(model, "int8", 2)
    nf4 = footprint.expected(model, "nf4", 2)
    assert round(int8.unquantized_bytes / GIB, 2) == 12.55
    assert round(int8.total_bytes / GIB, 2) == 6.52
    assert round(nf4.total_bytes / GIB, 2) == 3.50
    assert (
        "lm_head.weight" not in int8.quantized_weights
        and "model.embed_tokens.weight" not in int8.quantized_weights
    )
    assert len(int8.quantized_weights) == 32 * 7


def test_tied_head_is_not_quantized() -> None:
    """llama-1b-shape ties lm_head to the embedding: that weight stays in bf16, counted once."""
    model = _meta("llama-1b-shape")
    want = footprint.expected(model, "nf4", 2)
    assert all(".layers." in name for name in want.quantized_weights)
    embed = 128256 * 2048
    assert want.kept_bytes >= 2 * embed and want.kept_bytes < 2 * embed * 1.01


@pytest.mark.parametrize("shape", ["llama-1b-shape", "llama-7b-shape"])
@pytest.mark.parametrize("scheme", ["int8", "nf4"])
def test_one_small_layer_left_in_bf16_breaks_the_bound_at_any_size(
    shape: str, scheme: str
) -> None:
    """The smallest decoder Linear (a k_proj) left in bf16 in a full-size shape: the total moves by less
    than the slack on llama-1b-shape int8, but the per-weight audit names it."""
    want = footprint.expected(_meta(shape), scheme, 2)
    fine = footprint.check(footprint.simulate(_meta(shape), scheme), want)
    assert fine.ok, fine.message
    skipped = footprint.simulate(
        _meta(shape), scheme, skip=["model.layers.3.self_attn.k_proj"]
    )
    verdict = footprint.check(skipped, want)
    assert not verdict.ok
    assert verdict.offenders == [
        "model.layers.3.self_attn.k_proj.weight: 2.00 bytes/weight"
    ], verdict.message


def test_simulated_tiny_load_matches_formula_and_skip_breaks_it() -> None:
    """tiny-llama: the stand-in load equals the formula to the byte; skipping one down_proj breaks both
    the total (by 2.9% for int8, far beyond the 0.1% slack) and the audit."""
    want = footprint.expected(_tiny(), "int8", 2)
    assert (
        footprint.check(footprint.simulate(_tiny(), "int8"), want).footprint
        == want.total_bytes
    )
    verdict = footprint.check(
        footprint.simulate(_tiny(), "int8", skip=["model.layers.1.mlp.down_proj"]), want
    )
    assert not verdict.ok
    assert (
        "get_memory_footprint() is" in verdict.message
        and "model.layers.1.mlp.down_proj.weight: 2.00 bytes/weight" in verdict.message
    )


def _bnb_load(tmp_path: Any, scheme: str, skip: list[str] | None = None) -> Any:
    from transformers import AutoModelForCausalLM

    folder = tmp_path / "tiny"
    if not folder.exists():
        _tiny(torch.float32).save_pretrained(folder)
    config = quantize.bnb_config(scheme, torch.bfloat16, skip=skip)
    return AutoModelForCausalLM.from_pretrained(
        folder, dtype=torch.bfloat16, quantization_config=config, device_map="cpu"
    )


@NEEDS_BNB
@pytest.mark.parametrize("scheme", ["int8", "nf4", "fp4", "nf4-dq"])
def test_real_bitsandbytes_load_matches_formula(tmp_path: Any, scheme: str) -> None:
    """bitsandbytes on CPU: the loaded model's get_memory_footprint() is the formula's, to the byte."""
    model = _bnb_load(tmp_path, scheme)
    want = footprint.expected(_tiny(), scheme, 2)
    verdict = footprint.check(model, want)
    assert verdict.ok and verdict.footprint == want.total_bytes, verdict.message


@NEEDS_BNB
def test_real_bitsandbytes_skip_module_breaks_the_bound(tmp_path: Any) -> None:
    """``llm_int8_skip_modules`` leaving one decoder Linear in bf16: the footprint bound fails and names it."""
    model = _bnb_load(tmp_path, "int8", skip=["model.layers.1.mlp.down_proj"])
    verdict = footprint.check(model, footprint.expected(_tiny(), "int8", 2))
    assert not verdict.ok
    assert verdict.offenders == [
        "model.layers.1.mlp.down_proj.weight: 2.00 bytes/weight"
    ], verdict.message


def test_quality_metrics() -> None:
    """Identical logits: agreement 1, KL 0; a flipped argmax and a shifted distribution show in both."""
    torch.manual_seed(0)
    ref = torch.randn(2, 5, 11)
    same = quantize.quality(ref, ref.clone())
    assert same.top1 == 1.0 and abs(same.kl_mean) < 1e-12
    other = ref.clone()
    other[0, 0] = -other[0, 0]
    moved = quantize.quality(ref, other)
    assert moved.top1 < 1.0 and moved.kl_max > 0.1
    mask = torch.ones(2, 5, dtype=torch.long)
    mask[0, 0] = 0  # the changed position is padding: not counted
    assert quantize.quality(ref, other, mask).top1 == 1.0


def test_collapse_is_relative_to_the_unquantized_model() -> None:
    assert quantize.collapsed([5] * 12 + [1, 2], [1, 2, 3, 4] * 3)
    assert not quantize.collapsed(
        [5] * 12, [5] * 10
    )  # the unquantized model repeats as much
    assert not quantize.collapsed([1, 2, 3, 3, 4], [1, 2, 3, 4, 5])


def test_auto_compile_of_a_quantized_model_is_unsupported() -> None:
    """transformers' bitsandbytes quantizers are not compileable: auto-compile + quant is reported as
    unsupported with the reason; without quantization the rule says nothing."""
    assert not quantize.bnb_compileable("int8") and not quantize.bnb_compileable("nf4")
    reason = quantize.unsupported(
        Variant(cache="static", compile="auto", quant="nf4", dtype="bfloat16")
    )
    assert (
        reason is not None
        and "is_compileable is False" in reason
        and reason.startswith("unsupported by transformers")
    )
    assert (
        quantize.unsupported(Variant(cache="static", compile="auto", dtype="bfloat16"))
        is None
    )
    assert (
        quantize.unsupported(Variant(cache="static", quant="nf4", dtype="bfloat16"))
        is None
    )


def test_bnb_configs() -> None:
    """Each scheme's config: 8-bit, 4-bit nf4 / fp4, double quant only for nf4-dq, compute dtype kept."""
    int8 = quantize.bnb_config(
        "int8", torch.bfloat16, skip=["model.layers.1.mlp.down_proj"]
    )
    assert int8.load_in_8bit and int8.llm_int8_skip_modules == [
        "model.layers.1.mlp.down_proj"
    ]
    dq = quantize.bnb_config("nf4-dq", torch.bfloat16)
    assert (
        dq.load_in_4bit
        and dq.bnb_4bit_quant_type == "nf4"
        and dq.bnb_4bit_use_double_quant
    )
    assert dq.bnb_4bit_compute_dtype == torch.bfloat16
    fp4 = quantize.bnb_config("fp4", torch.bfloat16)
    assert fp4.bnb_4bit_quant_type == "fp4" and not fp4.bnb_4bit_use_double_quant


def test_every_whole_model_bound_can_fail_and_says_where_it_was_measured() -> None:
    assert set(quantize.QUALITY) == set(quantize.SCHEMES)
    for scheme, bound in quantize.QUALITY.items():
        assert 0 < bound.min_top1 < 1 and 0 < bound.max_kl < float("inf") and bound.where, scheme


def test_random_weights_have_no_whole_model_bound() -> None:
    from pytest_llmopt.running.models import ModelSpec

    for name in ("tiny-llama", "llama-7b-shape"):
        with pytest.raises(ValueError, match="defined on trained weights only"):
            quantize.bound_for(ModelSpec(name, "builtin"), "nf4")
