"""The variant matrix: ids, validity, requirements, selection."""

from __future__ import annotations

import pytest

from pytest_llmopt.running.machine import Machine
from pytest_llmopt.running.variants import Variant, matrix, parse_selection


def test_ids_are_stable_and_readable():
    assert Variant().id == "dynamic/sdpa/fp32"
    assert Variant(cache="static", compile="auto", attention="sdpa:flash", quant="nf4", dtype="bfloat16").id == "static+compile/sdpa:flash/nf4/bf16"
    assert Variant(cache="static-object", compile="reduce-overhead", attention="eager", dtype="float16").id == "static-object+compile:reduce-overhead/eager/fp16"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"cache": "paged"}, "unknown cache 'paged'"),
        ({"attention": "sdpa:fast"}, "unknown attention"),
        ({"compile": "auto"}, "compiled decoding needs a static cache"),
        ({"dtype": "int4"}, "unknown dtype"),
    ],
)
def test_invalid_variants_are_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Variant(**kwargs)


def test_matrix_skips_invalid_combinations_and_keeps_order():
    found = matrix(cache=["dynamic", "static"], compile=["off", "auto"])
    assert [v.id for v in found] == ["dynamic/sdpa/fp32", "static/sdpa/fp32", "static+compile/sdpa/fp32"]


def test_matrix_rejects_unknown_axis():
    with pytest.raises(ValueError, match="unknown axis"):
        matrix(kernel=["x"])


CPU = Machine(device="cpu", dtype="float32", versions={"bitsandbytes": None})
H100 = Machine(device="cuda:0", dtype="bfloat16", gpu_name="NVIDIA H100", capability=(9, 0), versions={"bitsandbytes": "0.50.2"}, flash_attn_2=True)
A10 = Machine(device="cuda:0", dtype="float32", gpu_name="NVIDIA A10", capability=(8, 6), versions={"bitsandbytes": None})


def _unmet(variant: Variant, machine: Machine) -> list[str]:
    return [need.how for need in variant.machine_requirements() if not machine.has(need.key)]


def test_requirements_say_how_to_enable():
    assert _unmet(Variant(attention="sdpa:flash"), CPU)[0].startswith("needs CUDA: run on a GPU runner")
    assert _unmet(Variant(attention="sdpa:flash"), A10) == ["needs float16 or bfloat16: run with --llmopt-dtype=bfloat16 (or float16)"]
    assert _unmet(Variant(quant="nf4", dtype="bfloat16"), A10) == ["needs bitsandbytes: pip install 'pytest-llmopt[cuda]'"]
    assert _unmet(Variant(attention="flash_attention_3", dtype="bfloat16"), A10)[0] == "needs a Hopper GPU (compute capability 9.0)"
    assert _unmet(Variant(attention="flash_attention_2", dtype="bfloat16"), H100) == []
    assert _unmet(Variant(cache="static", compile="reduce-overhead"), CPU)[0].startswith("needs CUDA")
    assert _unmet(Variant(cache="static", compile="default"), CPU) == []


def test_markers_follow_requirements():
    assert Variant(quant="int8").markers() == ["llmopt_bitsandbytes", "llmopt_cuda"]
    assert Variant(attention="flash_attention_2").markers() == ["llmopt_cuda", "llmopt_flash_attn"]
    assert Variant(cache="static", compile="auto").markers() == ["llmopt_compile"]
    assert Variant().markers() == []


def test_model_requirements():
    assert Variant(attention="eager").model_requirements() == []
    assert Variant(attention="sdpa:math").model_requirements() == ["sdpa"]
    assert Variant(cache="static", compile="auto", attention="flex_attention").model_requirements() == ["flex_attn", "static_cache", "compile_fullgraph"]


@pytest.mark.parametrize(
    ("text", "kept"),
    [
        ("", 4),
        ("attention=eager", 2),
        ("attention=sdpa*", 2),
        ("attention!=sdpa*", 2),
        ("cache=static attention=sdpa", 1),
        ("cache=static;attention=sdpa,eager", 2),
    ],
)
def test_selection(text, kept):
    variants = matrix(cache=["dynamic", "static"], attention=["eager", "sdpa"])
    assert sum(parse_selection(text).matches(v) for v in variants) == kept


@pytest.mark.parametrize(("text", "message"), [("attention", "cannot read"), ("kind=x", "unknown axis"), ("quant=q3", "matches nothing")])
def test_selection_errors(text, message):
    with pytest.raises(ValueError, match=message):
        parse_selection(text)
