"""The compatibility module's probes: how it reads the installed transformers, checked against code
shaped like the releases it has to tell apart (4.46's explicit StaticCache, 4.54's ``**kwargs``
forwarding, the universal-draft and early-exit bugs of 5.0-5.10 and their fixes)."""

from __future__ import annotations

import pytest
import torch
from transformers.generation import candidate_generator as cg

from pytest_llmopt.common import outcomes
from pytest_llmopt.running import compat, known_issues, probes


class _Cache454:
    def __init__(self, layer_classes, config=None, max_batch_size=None, max_cache_len=None, device=None, dtype=None, **kwargs):
        pass


class _Static454(_Cache454):
    def __init__(self, *args, **kwargs):
        super().__init__(object, *args, **kwargs)


class _Static446:
    def __init__(self, config, batch_size=None, max_cache_len=None, device=None, dtype=torch.float32, max_batch_size=None):
        pass


class _Cache5:
    def __init__(self, layers=None, offloading=False):
        pass


class _Static5(_Cache5):
    def __init__(self, config, max_cache_len, offloading=False, **kwargs):
        super().__init__(offloading=offloading)


@pytest.mark.parametrize(
    ("cls", "expected", "absent"),
    [
        (_Static454, {"config", "max_batch_size", "max_cache_len", "device", "dtype"}, set()),
        (_Static446, {"config", "batch_size", "max_batch_size", "device", "dtype"}, set()),
        (_Static5, {"config", "max_cache_len", "offloading", "layers"}, {"max_batch_size", "device", "dtype"}),
    ],
    ids=["4.54-kwargs-forwarding", "4.46-explicit", "5.x-lazy"],
)
def test_static_cache_arguments_are_found_through_kwargs_forwarding(cls, expected, absent):
    params = compat._init_params(cls)
    assert expected <= params
    assert not (absent & params)


def test_static_cache_of_the_installed_release_has_the_asked_length():
    from pytest_llmopt.running import zoo

    model = zoo.build_builtin("tiny-llama", 0, torch.float32, "cpu", compat.from_config)
    cache = compat.make_static_cache(model, batch_size=2, max_cache_len=24)
    ids = torch.randint(3, 100, (2, 5))
    compat.forward_step(model, ids, cache, start=0)
    tensors = compat.cache_tensors(cache)
    assert tensors and all(t.shape[0] == 2 and t.shape[-2] == 24 for t in tensors)


@pytest.mark.parametrize(
    ("exc", "backend", "fragment"),
    [
        (ValueError("`assisted generate` is not supported with Static cache classes`"), None, "unsupported by transformers"),
        (RuntimeError("No available kernel. Aborting execution."), "flash", "the flash SDPA backend has no kernel"),
        (
            RuntimeError("LoweringException: NotImplementedError: torch.compile on CPU only supports inference and `return_lse` is not supported yet."),
            None,
            "CPU flex_attention cannot return the log-sum-exp",
        ),
        (
            ValueError("GPT2LMHeadModel does not support an instance of `Cache` as `past_key_values`. Please check the model documentation for supported cache formats."),
            None,
            "unsupported by transformers",
        ),
    ],
    ids=["transformers-refuses", "sdpa-backend-has-no-kernel", "flex-cpu-lse", "legacy-cache-model"],
)
def test_refusals_are_told_apart_from_errors(exc, backend, fragment):
    reason = outcomes.refusal(exc, backend)
    assert reason is not None and fragment in reason


@pytest.mark.parametrize(
    "exc",
    [RuntimeError("The size of tensor a (46) must match the size of tensor b (39)"), RuntimeError("No available kernel."), ValueError("bad value")],
    ids=["real-error", "no-kernel-without-a-pinned-backend", "other-value-error"],
)
def test_real_errors_are_not_refusals(exc):
    assert outcomes.refusal(exc, None) is None


def _needs(name: str) -> None:
    if not hasattr(cg, name):
        pytest.skip(f"transformers has no {name} here: the probe answers False without looking")


def test_universal_draft_probe_sees_the_5_0_prefill_path(monkeypatch):
    _needs("AssistedCandidateGeneratorDifferentTokenizers")

    def prepare(self, input_ids, min_new_tokens, max_new_tokens, is_first_iteration):  # 5.0-5.2's signature
        return {}

    monkeypatch.setattr(cg.AssistedCandidateGenerator, "_prepare_generation_args", prepare, raising=False)
    assert probes.universal_draft_gets_target_inputs()


def test_universal_draft_probe_sees_position_ids_kept_and_dropped(monkeypatch):
    _needs("AssistedCandidateGeneratorDifferentTokenizers")

    def prepare(self, input_ids, min_new_tokens, max_new_tokens):
        return {}

    def kept(self, input_ids):  # 5.5-5.10: position ids of the target stay in the assistant kwargs
        self.assistant_kwargs.pop("attention_mask", None)

    def dropped(self, input_ids):  # 5.14: dropped before the draft generates
        self.assistant_kwargs.pop("attention_mask", None)
        self.assistant_kwargs.pop("position_ids", None)

    monkeypatch.setattr(cg.AssistedCandidateGenerator, "_prepare_generation_args", prepare, raising=False)
    monkeypatch.setattr(cg, "_prepare_position_ids", lambda *a: None, raising=False)
    monkeypatch.setattr(cg.AssistedCandidateGeneratorDifferentTokenizers, "get_candidates", kept)
    assert probes.universal_draft_gets_target_inputs()
    monkeypatch.setattr(cg.AssistedCandidateGeneratorDifferentTokenizers, "get_candidates", dropped)
    assert not probes.universal_draft_gets_target_inputs()


def test_early_exit_probe(monkeypatch):
    _needs("EarlyExitCandidateGenerator")

    def base(self, input_ids, is_first_iteration):  # 5.0-5.2: a new required argument
        return input_ids, None

    def broken(self, input_ids, is_first_iteration):
        return super().get_candidates(input_ids)  # only read as source

    def fixed(self, input_ids, is_first_iteration):
        return super().get_candidates(input_ids, is_first_iteration)

    monkeypatch.setattr(cg.AssistedCandidateGenerator, "get_candidates", base)
    monkeypatch.setattr(cg.EarlyExitCandidateGenerator, "get_candidates", broken)
    assert probes.early_exit_drops_first_iteration()
    monkeypatch.setattr(cg.EarlyExitCandidateGenerator, "get_candidates", fixed)
    assert not probes.early_exit_drops_first_iteration()


def test_universal_draft_rollback_probe_reads_the_installed_code(monkeypatch):
    _needs("AssistedCandidateGeneratorDifferentTokenizers")

    def by_last_length(self, input_ids, num_extra_tokens_to_remove=0):  # 5.25: crops by the last candidates' length
        return self._last_ids_length - input_ids.shape[-1] + num_extra_tokens_to_remove

    def by_own_cache(self, input_ids, remove_from_pkv=0, num_added_tokens=1):  # 5.24: crops to the draft input's length
        return input_ids.shape[-1] - 1 - remove_from_pkv - num_added_tokens

    def target_length(self, input_ids):  # 5.25: the universal generator counts in the target's tokens
        new_target_ids = input_ids
        self._last_ids_length = (
            input_ids.shape[-1] if self.prev_target_ids_len >= new_target_ids.shape[1] else new_target_ids.shape[-1]
        )

    def draft_length(self, input_ids, assistant_output=None):  # a fix: the draft's own sequence length
        self._last_ids_length = assistant_output.sequences.shape[-1]

    universal = cg.AssistedCandidateGeneratorDifferentTokenizers
    for rollback, drafting, expected in ((by_last_length, target_length, True), (by_own_cache, target_length, False), (by_last_length, draft_length, False)):
        monkeypatch.setattr(cg.AssistedCandidateGenerator, "_update_past_and_masks", rollback)
        monkeypatch.setattr(universal, "get_candidates", drafting)
        assert probes.universal_draft_cache_rolled_back_by_target_length() is expected, (rollback.__name__, drafting.__name__)


def test_instance_overrides_nest_and_restore():
    """The reference and the target of a check share one model: counting compiled calls around both, and
    keeping the reference eager inside, must leave the model as it was (4.48 on CUDA lost the counter)."""

    class Model:
        def get_compiled_call(self, config):
            return "class"

    model = Model()
    counting, eager = (lambda c: "counting"), (lambda c: "eager")
    with compat._instance_override(model, "get_compiled_call", counting):
        with compat._instance_override(model, "get_compiled_call", eager):
            assert model.get_compiled_call(None) == "eager"
        assert model.get_compiled_call(None) == "counting"
    assert "get_compiled_call" not in vars(model) and model.get_compiled_call(None) == "class"


@pytest.mark.parametrize(
    ("new_api", "cuda_only", "device", "expected"),
    [
        (True, False, "cpu", None),
        (False, True, "cuda", None),
        (False, True, "cpu", "auto-compiles only on CUDA"),
        (False, False, "cuda", "has no auto-compile"),
    ],
    ids=["4.52+", "4.48-4.51-cuda", "4.48-4.51-cpu", "4.46"],
)
def test_auto_compile_support_by_release(monkeypatch, new_api, cuda_only, device, expected):
    monkeypatch.setattr(compat, "supports_auto_compile", lambda: new_api)
    monkeypatch.setattr(compat, "_auto_compiles_on_cuda_only", lambda: cuda_only)
    reason = compat.missing_feature("auto", device)
    assert reason is None if expected is None else expected in reason
    assert compat.missing_feature("off", device) is None


def test_every_known_issue_is_declared_by_a_suite() -> None:
    """An entry no suite names would never apply: the registry and the markers must agree."""
    from conftest import SUITES

    text = "".join(path.read_text() for path in SUITES.glob("test_*.py"))
    assert [issue.id for issue in known_issues.KNOWN_ISSUES if f'"{issue.id}"' not in text and f'"{issue.id}:' not in text] == []


def test_a_known_issue_id_missing_from_the_registry_is_a_usage_error(pytester: pytest.Pytester, clean_env: pytest.MonkeyPatch) -> None:
    pytester.makepyfile("import pytest\n\n@pytest.mark.llmopt(known_issues=['no-such-issue'])\ndef test_x(llmopt_case):\n    pass\n")
    result = pytester.runpytest()
    assert result.ret != 0
    result.stdout.fnmatch_lines(["*known_issues=*no-such-issue* not in pytest_llmopt.running.known_issues.KNOWN_ISSUES*"])


def test_an_architecture_bug_spares_other_models(monkeypatch: pytest.MonkeyPatch) -> None:
    """An upstream bug of one architecture (SDPA dropping Gemma2's soft-capping) applies to the models that
    have what it needs, whatever the release: not to Llama, not to eager attention."""
    from dataclasses import replace

    from pytest_llmopt.running import zoo

    name = "sdpa-ignores-attention-softcap"
    monkeypatch.setitem(known_issues.BY_ID, name, replace(known_issues.BY_ID[name], present=lambda: True))

    def found(model: str, attention: str) -> list[str]:
        return [i.id for i in known_issues.known_issues([name], "dynamic", attention, "cpu", zoo.builtin_config(model))]

    assert found("tiny-gemma2", "sdpa") == [name]
    assert found("tiny-llama", "sdpa") == [] and found("tiny-gemma2", "eager") == []


def test_a_hybrid_cache_model_gets_its_own_cache_kind() -> None:
    """4.x Gemma2 runs on nothing but its HybridCache: it is the static cache and the cache object of the plain
    path there, and "static" means "hybrid" to generate(). 5.x dropped HybridCache: StaticCache and "static"."""
    from pytest_llmopt.running import hybrid, zoo

    model = zoo.build_builtin("tiny-gemma2", 0, torch.float32, "cpu", compat.from_config, "eager")
    cls = hybrid.hybrid_class(model)
    kwargs = compat.generate_kwargs(new_tokens=1, cache="static", compile_mode="off", device_type="cpu", model=model)
    if cls is None:
        assert type(compat.make_static_cache(model, 1, 64)).__name__ == "StaticCache"
        assert kwargs["cache_implementation"] == "static" and hybrid.cache_object_kwargs(model) == {}
    else:
        assert isinstance(compat.make_static_cache(model, 1, 64), cls) and isinstance(compat.make_dynamic_cache(model, 64), cls)
        assert kwargs["cache_implementation"] == "hybrid" and hybrid.cache_object_kwargs(model) == {"cache_implementation": None}


def test_4x_gemma2_probes_read_the_installed_code(monkeypatch: pytest.MonkeyPatch) -> None:
    """The three 4.46-4.47 Gemma2 bugs are found in the code that has them and not in the code that fixed them:
    SDPA attention without soft-capping, the decode-step window mask cut from the end, the sliding cache that
    shifts one slot whatever the number of new tokens."""
    import transformers
    from transformers.models.gemma2 import modeling_gemma2 as gemma2

    class Sdpa:  # 4.46's Gemma2SdpaAttention: scaled_dot_product_attention, no softcap
        def forward(self, q, k, v):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v)

    class Layer:
        def forward(self, attention_mask):  # 4.46-4.47
            attention_mask = attention_mask[:, :, :, -self.sliding_window :]
            return attention_mask

    class Hybrid:
        def _sliding_update(self, cache_position, to_shift, slicing, max_cache_len):  # 4.46-4.51
            return (slicing + to_shift[-1].int() - 1) % max_cache_len

    monkeypatch.setattr(gemma2, "Gemma2SdpaAttention", Sdpa, raising=False)
    monkeypatch.setattr(gemma2, "Gemma2DecoderLayer", Layer)
    monkeypatch.setattr(transformers.cache_utils, "HybridCache", Hybrid, raising=False)
    assert probes.sdpa_drops_softcap()
    assert known_issues.BY_ID["gemma2-decode-window-mask-misaligned"].present()
    assert known_issues.BY_ID["sliding-cache-shifts-one-slot"].present()

    class Capped(Sdpa):
        def forward(self, q, k, v, softcap=50.0):
            return torch.nn.functional.scaled_dot_product_attention(torch.tanh(q / softcap) * softcap, k, v)

    class Offset(Layer):
        def forward(self, attention_mask, offset=0):  # 4.48+
            return attention_mask[:, :, :, offset : offset + self.sliding_window]

    class Rolled(Hybrid):
        def _sliding_update(self, cache_position, to_shift, slicing, max_cache_len):
            return slicing.roll(-len(cache_position))

    monkeypatch.setattr(gemma2, "Gemma2SdpaAttention", Capped)
    monkeypatch.setattr(gemma2, "Gemma2DecoderLayer", Offset)
    monkeypatch.setattr(transformers.cache_utils, "HybridCache", Rolled)
    assert not probes.sdpa_drops_softcap()
    assert not known_issues.BY_ID["gemma2-decode-window-mask-misaligned"].present()
    assert not known_issues.BY_ID["sliding-cache-shifts-one-slot"].present()


def test_default_attention_is_what_from_pretrained_picks() -> None:
    """SDPA where the class declares it, eager where it does not or turns an unasked-for SDPA down (4.46-4.47
    Gemma2 overrides _check_and_enable_sdpa for that): the variant a suite runs when it names no attention."""
    import transformers

    from pytest_llmopt.running.models import ModelInfo, ModelSpec

    class Declares(transformers.PreTrainedModel):
        _supports_sdpa = True

    class TurnsDown(Declares):
        @classmethod
        def _check_and_enable_sdpa(cls, config, hard_check_only=False):
            if not hard_check_only and config._attn_implementation == "sdpa":
                config._attn_implementation = "eager"
            return config

    spec = ModelSpec("x", "builtin")
    assert ModelInfo(spec, None, Declares, compat.capabilities(Declares)).default_attention == "sdpa"
    assert ModelInfo(spec, None, TurnsDown, compat.capabilities(TurnsDown)).default_attention == "eager"
    assert ModelInfo(spec, None, Declares, {**compat.capabilities(Declares), "sdpa": False}).default_attention == "eager"


def test_cache_size_formula_follows_the_release(monkeypatch: pytest.MonkeyPatch) -> None:
    """Sliding-window layers count min(window, length) positions where the release's caches trim them (per-layer
    caches, 4.56+; 4.x Gemma2's HybridCache), every position before (a 4.46-4.55 StaticCache is full-length)."""
    from transformers import cache_utils

    from pytest_llmopt.running import zoo
    from pytest_llmopt.running.measure import caches_trim_sliding_layers, static_cache_bytes

    mistral = zoo.builtin_config("tiny-mistral")  # every layer slides, window 48
    monkeypatch.setattr(cache_utils, "StaticSlidingWindowLayer", object, raising=False)
    trimmed = static_cache_bytes(mistral, 1, 100, 4)
    monkeypatch.delattr(cache_utils, "StaticSlidingWindowLayer")
    assert not caches_trim_sliding_layers(mistral)
    assert static_cache_bytes(mistral, 1, 100, 4) == trimmed * 100 // 48


def test_flash_attention_model_probes_read_the_installed_code(monkeypatch: pytest.MonkeyPatch) -> None:
    """GPT-Neo's flash attention without a window and with a 4D slice of its 2D mask (4.46-4.57), GPT-2's is_causal
    dropped whenever a mask is given (4.52-4.57): found in code that has them, not in code that fixed them, and each
    spares the other architectures."""
    from types import SimpleNamespace

    from transformers.models.gpt2 import modeling_gpt2 as gpt2
    from transformers.models.gpt_neo import modeling_gpt_neo as gpt_neo

    class NeoFlash:  # 4.57.6
        def forward(self, attention_mask, key):
            attention_mask = attention_mask[:, :, :, : key.shape[-2]]
            return attention_mask

    class Gpt2Attention:  # 4.52-4.57
        def forward(self, attention_mask, q):
            is_causal = attention_mask is None and q.shape[-2] > 1
            return is_causal

    monkeypatch.setattr(gpt_neo, "GPTNeoFlashAttention2", NeoFlash)
    monkeypatch.setattr(gpt2, "GPT2Attention", Gpt2Attention)
    by_id = known_issues.BY_ID
    assert by_id["gptneo-flash-attention-ignores-local-window"].present()
    assert by_id["gptneo-flash-attention-4d-mask-slice"].present()
    assert by_id["gpt2-flash-attention-not-causal-with-mask"].present()

    class NeoFlashFixed:
        def forward(self, attention_mask, key, sliding_window=None):
            return attention_mask, sliding_window

    class Gpt2AttentionFixed:
        def forward(self, attention_mask, scaling):
            return attention_mask, scaling

    monkeypatch.setattr(gpt_neo, "GPTNeoFlashAttention2", NeoFlashFixed)
    monkeypatch.setattr(gpt2, "GPT2Attention", Gpt2AttentionFixed)
    assert not by_id["gptneo-flash-attention-ignores-local-window"].present()
    assert not by_id["gptneo-flash-attention-4d-mask-slice"].present()
    assert not by_id["gpt2-flash-attention-not-causal-with-mask"].present()

    neo = SimpleNamespace(model_type="gpt_neo", attention_layers=["global", "local"])
    llama = SimpleNamespace(model_type="llama")
    for name in ("gptneo-flash-attention-ignores-local-window", "gptneo-flash-attention-4d-mask-slice"):
        assert by_id[name].hits(neo) and not by_id[name].hits(llama)
        assert by_id[name].applies("dynamic", "flash_attention_2", "cuda") and not by_id[name].applies("dynamic", "sdpa", "cuda")
    assert not by_id["gpt2-flash-attention-not-causal-with-mask"].hits(neo)


def test_a_known_issue_raised_inside_a_step_keeps_its_xfail(pytester: pytest.Pytester, clean_env: pytest.MonkeyPatch) -> None:
    """case.explain turns an exception of the optimized path into a failure that names the step, except the exception
    a declared known issue raises (4.57 GPT-Neo's IndexError inside a generate step): its xfail still judges it, and
    any other exception there still fails."""
    from dataclasses import replace

    issue = replace(known_issues.BY_ID["prompt-lookup-overruns-static-cache"], applies=lambda *_: True, present=lambda: True)
    clean_env.setitem(known_issues.BY_ID, issue.id, issue)
    pytester.makepyfile(
        f"""
        import pytest

        @pytest.mark.llmopt(known_issues=[{issue.id!r}])
        def test_declared(llmopt_case):
            with llmopt_case.explain("generate"):
                raise IndexError("too many indices for tensor of dimension 2")

        @pytest.mark.llmopt(known_issues=[{issue.id!r}])
        def test_other(llmopt_case):
            with llmopt_case.explain("generate"):
                raise KeyError("another bug")
        """
    )
    result = pytester.runpytest_inprocess("-p", "no:cacheprovider", "--llmopt-model=tiny-llama", "--llmopt-report=r.json")
    result.assert_outcomes(xfailed=1, failed=1)
    result.stdout.fnmatch_lines(["*(generate): the optimized path raised KeyError*"])
    # The report names the declared issues that applied, by id (the release sweep counts them so)
    from pytest_llmopt.wiring.report import load

    results, _ = load(pytester.path / "r.json")
    assert {r.check: (r.status.value, r.known_issues) for r in results} == {
        "test_declared": ("known-issue", [issue.id]),
        "test_other": ("failed", [issue.id]),
    }


def test_flex_mask_probes_read_the_installed_code(monkeypatch: pytest.MonkeyPatch) -> None:
    from transformers import masking_utils

    def mask_52(batch_size, cache_position, kv_length, kv_offset=0, mask_function=None, attention_mask=None):  # 4.57-5.2
        if attention_mask is not None:
            return padding_mask_function(attention_mask)  # noqa: F821 (only read as source)

    def mask_513(batch_size, q_length, kv_length, q_offset=0, kv_offset=0, mask_function=None, attention_mask=None):  # 5.5-5.13
        if attention_mask is not None:
            return padding_mask_function(attention_mask)  # noqa: F821

    def mask_514(batch_size, q_length, kv_length, q_offset=0, kv_offset=0, mask_function=None, attention_mask=None):  # 5.14+
        if attention_mask is not None and not fast_all(attention_mask):  # noqa: F821
            return padding_mask_function(attention_mask)  # noqa: F821

    for build, offsets, pads_unpadded in ((mask_52, False, True), (mask_513, True, True), (mask_514, True, False)):
        monkeypatch.setattr(masking_utils, "flex_attention_mask", build, raising=False)
        assert probes.flex_mask_from_offsets() is offsets, build.__name__
        assert probes.flex_mask_pads_unpadded() is pads_unpadded, build.__name__


def test_a_check_without_padding_meets_a_mask_bug_only_where_its_mask_is_beyond_causal(monkeypatch: pytest.MonkeyPatch) -> None:
    from pytest_llmopt.running.zoo import builtin_config

    codegen = "torch-flex-attention-cpu-codegen"
    assert known_issues.unknown([f"{codegen}:unpadded"]) == []
    assert known_issues.unknown([f"{codegen}:padded", "prompt-lookup-overruns-static-cache:unpadded"]) == sorted([f"{codegen}:padded", "prompt-lookup-overruns-static-cache:unpadded"])
    monkeypatch.setattr(torch, "__version__", "2.13.0+cpu")
    monkeypatch.setattr(probes, "flex_mask_from_offsets", lambda: True)
    llama, gemma2 = builtin_config("tiny-llama"), builtin_config("tiny-gemma2")

    def declared(ids: list[str], config: object) -> list[str]:
        return [i.id for i in known_issues.known_issues(ids, "dynamic", "flex_attention", "cpu", config)]

    monkeypatch.setattr(probes, "flex_mask_pads_unpadded", lambda: False)  # 5.14+: a prompt alone is causal only
    assert declared([f"{codegen}:unpadded"], llama) == []
    assert declared([f"{codegen}:unpadded"], gemma2) == [codegen]  # its sliding window is beyond causal
    assert declared([codegen], llama) == [codegen]  # a padded check meets it on any model
    monkeypatch.setattr(probes, "flex_mask_pads_unpadded", lambda: True)  # 5.5-5.13: a padding term all the same
    assert declared([f"{codegen}:unpadded"], llama) == [codegen]


def test_a_bug_of_compiled_code_spares_the_variants_that_do_not_compile(monkeypatch: pytest.MonkeyPatch) -> None:
    from pytest_llmopt.running.zoo import builtin_config

    monkeypatch.setattr(torch, "__version__", "2.13.0+cpu")
    monkeypatch.setattr(probes, "flex_mask_from_offsets", lambda: False)  # 4.57-5.2's masks
    decode = "torch-flex-attention-cpu-decode"
    config = builtin_config("tiny-qwen2")
    assert known_issues.known_issues([decode], "static-object", "flex_attention", "cpu", config, compiled=False) == []
    assert [i.id for i in known_issues.known_issues([decode], "static-object", "flex_attention", "cpu", config, compiled=True)] == [decode]


def test_the_sliding_window_draft_issue_needs_a_cache_that_keeps_sliding_layers() -> None:
    """GPT-Neo's local layers (window_size) are cached in full: its universal draft passed under 5.24 while Mistral's and
    Gemma2's (sliding_window) failed."""
    from pytest_llmopt.running.zoo import TINY, builtin_config

    issue = known_issues.BY_ID["universal-draft-with-sliding-window"]
    assert {name for name in TINY if issue.hits(builtin_config(name))} == {"tiny-mistral", "tiny-gemma2"}
