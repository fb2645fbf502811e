"""Built-in models: deterministic, offline, and sensitive enough that a broken cache or mask shows."""

from __future__ import annotations

import pytest
import torch

from pytest_llmopt.running import compat, zoo
from pytest_llmopt.running.machine import Machine
from pytest_llmopt.running.models import ModelSpec, ModelStore, describe


def _build(name: str, seed: int = 0):
    return zoo.build_builtin(name, seed, torch.float32, "cpu", compat.from_config)


def test_at_least_four_architectures():
    types = {zoo.builtin_config(name).model_type for name in zoo.TINY}
    assert {"llama", "qwen2", "mistral", "gemma2", "gpt2", "gpt_neo"} <= types


@pytest.mark.parametrize("name", list(zoo.TINY))
def test_weights_are_deterministic_per_seed(name):
    a, b, c = _build(name, 0), _build(name, 0), _build(name, 1)
    for (key, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(pa, pb), key
    assert any(not torch.equal(pa, pc) for pa, pc in zip(a.state_dict().values(), c.state_dict().values()))


def test_tokenizers_are_deterministic_and_differ_between_recipes():
    a1, a2 = zoo.build_tokenizer(zoo.TOKENIZER_A), zoo.build_tokenizer(zoo.TOKENIZER_A)
    b = zoo.build_tokenizer(zoo.TOKENIZER_B)
    text = "Once upon a time, def f(x): return x"
    assert a1(text)["input_ids"] == a2(text)["input_ids"]
    assert a1.get_vocab() != b.get_vocab() and len(b) == 384 and len(a1) == 512
    assert a1.decode(a1(text)["input_ids"]) == text
    assert a1.padding_side == "left" and a1.pad_token_id == zoo.PAD_ID


@pytest.mark.parametrize("name", list(zoo.TINY))
def test_tiny_models_are_context_sensitive(name):
    """Changing one early prompt token changes the continuation: so a cache or mask that loses the
    context changes tokens too, and the suites are not blind (with initializer range 0.02 they are)."""
    model = _build(name)
    tok = zoo.builtin_tokenizer(name)
    kwargs = compat.generate_kwargs(new_tokens=16, cache="dynamic", compile_mode="off", device_type="cpu", eos_ids=[zoo.EOS_ID])
    changed = 0
    texts = ["Once upon a time there was a little robot named Tim. Tim lived", "The quarterly report shows that revenue grew by twelve"]
    for text in texts:
        ids = tok(text, return_tensors="pt").input_ids
        edited = ids.clone()
        edited[0, 1] = (edited[0, 1] + 7) % 300 + 10
        with torch.no_grad():
            a = model.generate(ids, **kwargs).sequences[0, ids.shape[1] :]
            b = model.generate(edited, **kwargs).sequences[0, ids.shape[1] :]
        changed += int(not torch.equal(a, b))
        assert len(set(a.tolist())) >= 6, f"{name} repeats itself: {a.tolist()}"
    assert changed == len(texts)


def test_capabilities_come_from_the_model_class():
    gemma = describe(ModelSpec("tiny-gemma2", "builtin"), False)
    assert gemma.capabilities["sdpa"] is False and gemma.capabilities["flash_attn"] is True
    neo = describe(ModelSpec("tiny-gptneo", "builtin"), False)
    assert neo.capabilities["compile_fullgraph"] is False and neo.capabilities["static_cache"] is False
    assert describe(ModelSpec("tiny-llama", "builtin"), False).capabilities == dict.fromkeys(compat.CAPABILITIES, True)


def test_store_loads_once_and_switches_attention_in_place():
    store = ModelStore("cpu", "float32", 0, False)
    spec = ModelSpec("tiny-llama", "builtin")
    first = store.load(spec, "sdpa")
    again = store.load(spec, "eager")
    assert first.model is again.model and again.model.config._attn_implementation == "eager"


def test_store_loads_a_class_that_cannot_switch_once_per_attention(monkeypatch):
    """A class without the attention interface refuses to switch (5.10's GPT-Neo to flash_attention_2): the store
    loads it again with that attention, from then on once per implementation, instead of failing the check."""
    store = ModelStore("cpu", "float32", 0, False)
    spec = ModelSpec("tiny-llama", "builtin")
    real = compat.set_attention
    monkeypatch.setattr(compat, "set_attention", lambda model, name: model.config._attn_implementation == name and real(model, name))
    first = store.load(spec, "sdpa")
    other = store.load(spec, "eager")
    assert other.model is not first.model and other.model.config._attn_implementation == "eager"
    assert store.load(spec, "sdpa").model is first.model and store.load(spec, "eager").model is other.model


def test_shapes_build_on_the_meta_device_with_the_right_size():
    config = zoo.builtin_config("llama-1b-shape")
    with torch.device("meta"):
        model = compat.from_config(config, torch.bfloat16)
    params = sum(p.numel() for p in model.parameters())
    assert 1.2e9 < params < 1.3e9  # Llama-3.2-1B: 1.24 B parameters with tied embeddings


def test_machine_hardware_id():
    assert Machine(device="cuda:0", dtype="bfloat16", gpu_name="NVIDIA H100 80GB HBM3").hardware_id == "h100-80gb-hbm3"
