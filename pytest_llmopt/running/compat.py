"""Everything that differs between transformers (and torch) releases, in one place.

Supported: transformers 4.46 through 5.x. Where a release lacks a feature, ``missing_feature`` says so
and the variant is reported unsupported for that version. Feature checks probe the installed code
(attributes, signatures) rather than version numbers, so a backport is judged by what it does.
Neighbours: ``known_issues`` (upstream bugs), ``instrumentation`` (proof a path ran), ``outcomes``.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from collections.abc import Iterator
from typing import Any

import torch
import transformers
from packaging.version import Version
from transformers import AutoModelForCausalLM, GenerationMixin

from . import hybrid

TRANSFORMERS = Version(transformers.__version__)

CAPABILITIES = ("sdpa", "flash_attn", "flex_attn", "compile_fullgraph", "static_cache")
# Where the installed release keeps each capability. 4.x gated static caches with
# ``_supports_static_cache``; 5.x replaced it with ``_can_compile_fullgraph`` (models without it, such as
# GPT-Neo, build wrong masks over a StaticCache).
_LEGACY_STATIC = hasattr(transformers.PreTrainedModel, "_supports_static_cache")
CAPABILITY_ATTRIBUTE = {
    "sdpa": "_supports_sdpa",
    "flash_attn": "_supports_flash_attn" if hasattr(transformers.PreTrainedModel, "_supports_flash_attn") else "_supports_flash_attn_2",
    "flex_attn": "_supports_flex_attn",
    "compile_fullgraph": "_can_compile_fullgraph" if hasattr(transformers.PreTrainedModel, "_can_compile_fullgraph") else "_supports_static_cache",
    "static_cache": "_supports_static_cache" if _LEGACY_STATIC else "_can_compile_fullgraph",
}


# --------------------------------------------------------------------------------------------------
# Loading


def dtype_keyword() -> str:
    """``dtype=`` since 4.56; ``torch_dtype=`` before (still accepted, deprecated, in 5.x)."""
    params = inspect.signature(transformers.PreTrainedModel.from_pretrained).parameters
    return "torch_dtype" if TRANSFORMERS < Version("4.56") and "dtype" not in params else "dtype"


def from_config(config: Any, dtype: torch.dtype, attention: str | None = None) -> Any:
    kwargs: dict[str, Any] = {dtype_keyword(): dtype}
    if attention is not None:
        kwargs["attn_implementation"] = attention
    return AutoModelForCausalLM.from_config(config, **kwargs)


def from_pretrained(
    name: str,
    dtype: torch.dtype,
    device: str,
    attn_implementation: str,
    quantization_config: Any = None,
    trust_remote_code: bool = False,
) -> Any:
    kwargs: dict[str, Any] = {
        dtype_keyword(): dtype,
        "attn_implementation": attn_implementation,
        "trust_remote_code": trust_remote_code,
    }
    if quantization_config is not None:
        kwargs["quantization_config"] = quantization_config
        kwargs["device_map"] = device
    elif device != "cpu":
        kwargs["device_map"] = device
    return AutoModelForCausalLM.from_pretrained(name, **kwargs)


def model_class(config: Any, trust_remote_code: bool) -> type | None:
    """The causal-LM class a config loads into, without building it (None if unknown)."""
    mapping = AutoModelForCausalLM._model_mapping
    if type(config) in mapping:
        found: Any = mapping[type(config)]
        return found
    auto_map = getattr(config, "auto_map", None) or {}
    if trust_remote_code and "AutoModelForCausalLM" in auto_map:
        from transformers.dynamic_module_utils import get_class_from_dynamic_module

        return get_class_from_dynamic_module(auto_map["AutoModelForCausalLM"], config._name_or_path)
    return None


def capabilities(cls: type) -> dict[str, bool]:
    """What a model class declares, under one set of names across releases (CAPABILITY_ATTRIBUTE).

    A stateful model (Mamba-like) never holds a StaticCache, whatever it declares.
    """
    flags = {name: bool(getattr(cls, attr, False)) for name, attr in CAPABILITY_ATTRIBUTE.items()}
    flags["flash_attn"] = flags["flash_attn"] or bool(getattr(cls, "_supports_flash_attn_2", False))
    flags["static_cache"] = flags["static_cache"] and not getattr(cls, "_is_stateful", False)
    return flags


def model_capabilities(model: Any) -> dict[str, bool]:
    """Capabilities of a loaded model: every PreTrainedModel inside it must declare a flag."""
    found = [capabilities(type(m)) for m in model.modules() if isinstance(m, transformers.PreTrainedModel)]
    return {name: all(flags[name] for flags in found) for name in CAPABILITIES}


def bnb_config(quant: str, compute_dtype: torch.dtype) -> Any:
    from transformers import BitsAndBytesConfig

    if quant == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant, bnb_4bit_compute_dtype=compute_dtype)


# --------------------------------------------------------------------------------------------------
# Attention


def set_attention(model: Any, implementation: str) -> bool:
    """Switch a loaded model's attention implementation; False if it needs a reload instead.

    5.x has ``set_attn_implementation`` (which only warns when the class cannot switch); 4.48+ looks
    the attention function up at forward time from the config; 4.46-4.47 built attention modules at
    init, so switching there means loading again.
    """
    if getattr(model.config, "_attn_implementation", None) == implementation:
        return True
    if hasattr(model, "set_attn_implementation"):
        with contextlib.suppress(ValueError, ImportError):
            model.set_attn_implementation(implementation)
        return getattr(model.config, "_attn_implementation", None) == implementation
    if can_switch_attention():
        for module in model.modules():
            config = getattr(module, "config", None)
            if config is not None and hasattr(config, "_attn_implementation"):
                config._attn_implementation = implementation
        return True
    return False


def can_switch_attention() -> bool:
    """4.48+ looks attention functions up at forward time; before, the modules were built for one."""
    return TRANSFORMERS >= Version("4.48")


@contextlib.contextmanager
def sdpa_backend(name: str | None) -> Iterator[None]:
    """Pin SDPA to one backend (math, flash, efficient, cudnn) for the duration; no-op for None."""
    if name is None:
        yield
        return
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = {
        "math": SDPBackend.MATH,
        "flash": SDPBackend.FLASH_ATTENTION,
        "efficient": SDPBackend.EFFICIENT_ATTENTION,
        "cudnn": SDPBackend.CUDNN_ATTENTION,
    }[name]
    with sdpa_kernel([backend]):
        yield


# --------------------------------------------------------------------------------------------------
# Caches and forward calls


def _init_params(cls: type) -> set[str]:
    """The keyword arguments ``cls(...)`` accepts, following ``**kwargs`` into the base classes
    (4.54's StaticCache is ``__init__(*args, **kwargs)`` and hands everything to Cache)."""
    names: set[str] = set()
    for klass in cls.__mro__:
        if "__init__" not in vars(klass) or klass is object:
            continue
        params = inspect.signature(vars(klass)["__init__"]).parameters
        names |= {n for n, p in params.items() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
        if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
            break
    return names


def make_dynamic_cache(model: Any, max_cache_len: int | None = None) -> Any:
    """An empty DynamicCache (from 4.5x given the config); a 4.x HybridCache model, which runs on nothing else, its HybridCache."""
    from transformers import DynamicCache
    if max_cache_len is not None and hybrid.hybrid_class(model) is not None:
        return make_static_cache(model, 1, max_cache_len)
    return DynamicCache(config=model.config) if "config" in _init_params(DynamicCache) else DynamicCache()


def make_static_cache(model: Any, batch_size: int, max_cache_len: int) -> Any:
    """A StaticCache (a 4.x HybridCache model: its HybridCache): 5.x takes (config, max_cache_len); 4.x wanted batch size, device and dtype."""
    from transformers import StaticCache
    cls = hybrid.hybrid_class(model) or StaticCache
    params = _init_params(cls)
    kwargs: dict[str, Any] = {"config": model.config, "max_cache_len": max_cache_len}
    for name in ("max_batch_size", "batch_size"):
        if name in params:
            kwargs[name] = batch_size
            break
    if "device" in params:
        kwargs["device"] = model.device
    if "dtype" in params:
        kwargs["dtype"] = model.dtype
    return cls(**kwargs)


def cache_tensors(cache: Any) -> list[torch.Tensor]:
    """Every key and value tensor a cache holds (5.x: per-layer objects; 4.x: key_cache/value_cache lists)."""
    tensors: list[torch.Tensor] = []
    if hasattr(cache, "layers"):
        for layer in cache.layers:
            for name in ("keys", "values"):
                tensor = getattr(layer, name, None)
                if isinstance(tensor, torch.Tensor):
                    tensors.append(tensor)
    else:
        tensors = [t for t in (*getattr(cache, "key_cache", []), *getattr(cache, "value_cache", [])) if isinstance(t, torch.Tensor)]
    return tensors


@functools.cache
def _forward_params(cls: Any) -> frozenset[str]:
    return frozenset(inspect.signature(cls.forward).parameters)


def forward_step(model: Any, input_ids: torch.Tensor, cache: Any, start: int, attention_mask: torch.Tensor | None = None) -> Any:
    """One forward pass that appends ``input_ids`` to ``cache`` at position ``start``.

    The cache keyword was ``past_key_values`` until 5.2x renamed it ``cache``; ``cache_position`` was
    required for static caches before 5.2x dropped it.
    """
    return model(**step_kwargs(model, input_ids, cache, start, attention_mask))


def cache_keyword(model: Any) -> str:
    """The keyword that hands a cache to forward() and generate(): ``cache`` from 5.2x, else ``past_key_values``."""
    return "cache" if "cache" in _forward_params(model.__class__) else "past_key_values"


def step_kwargs(model: Any, input_ids: torch.Tensor, cache: Any, start: int, attention_mask: torch.Tensor | None = None) -> dict[str, Any]:
    params = _forward_params(model.__class__)
    length = input_ids.shape[1]
    positions = torch.arange(start, start + length, device=input_ids.device)
    kwargs: dict[str, Any] = {
        "input_ids": input_ids,
        "position_ids": positions.unsqueeze(0).expand(input_ids.shape[0], -1),
        "use_cache": True,
        cache_keyword(model): cache,
    }
    if "cache_position" in params:
        kwargs["cache_position"] = positions
    if attention_mask is not None:
        kwargs["attention_mask"] = attention_mask
    if "position_ids" not in params:
        kwargs.pop("position_ids")
    return kwargs


# --------------------------------------------------------------------------------------------------
# Generation


def allow_recompiles(limit: int) -> None:
    """Raise dynamo's per-code-object recompile limit to at least ``limit`` (never lowers it)."""
    import torch._dynamo

    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    setattr(config, name, max(getattr(config, name), limit))
    if hasattr(config, "accumulated_recompile_limit"):
        config.accumulated_recompile_limit = max(config.accumulated_recompile_limit, 32 * limit)


@contextlib.contextmanager
def _instance_override(obj: Any, name: str, value: Any) -> Iterator[None]:
    """Set ``obj.name`` for a while and put back exactly what was there, so that overrides nest (the
    reference and the target of a check often share one loaded model)."""
    missing = object()
    saved = vars(obj).get(name, missing)
    setattr(obj, name, value)
    try:
        yield
    finally:
        if saved is missing:
            vars(obj).pop(name, None)
        else:
            setattr(obj, name, saved)


def supports_auto_compile() -> bool:
    """generate() decides by itself whether to compile its decode steps, on any device a CompileConfig
    allows, and can be told not to (``disable_compile``): 4.52+."""
    return hasattr(GenerationMixin, "_valid_auto_compile_criteria")


@functools.cache
def _auto_compiles_on_cuda_only() -> bool:
    """4.48-4.51: _sample compiles (``get_compiled_call``) whenever the cache is a StaticCache and the
    device is CUDA, with no switch to turn it off; never on another device. Read once: it is asked at
    every collected variant and every eager generate() call."""
    try:
        return "get_compiled_call" in inspect.getsource(GenerationMixin._sample)
    except (AttributeError, OSError, TypeError):
        return False


@contextlib.contextmanager
def eager_generate(model: Any) -> Iterator[None]:
    """Keep generate() eager where a release auto-compiles with no off switch (4.48-4.51 on CUDA with a
    static cache), so that the static-cache checks compare a cache, not a compiler."""
    if supports_auto_compile() or not hasattr(model, "get_compiled_call") or not _auto_compiles_on_cuda_only():
        yield
        return
    with _instance_override(model, "get_compiled_call", lambda compile_config: model.__call__):
        yield


def compile_config(all_devices: bool, **kwargs: Any) -> Any:
    """A CompileConfig; ``all_devices`` lets generate compile on CPU too (it compiles only on
    accelerators by default). Returns None where CompileConfig does not exist."""
    try:
        from transformers import CompileConfig
    except ImportError:
        return None
    config: Any = CompileConfig(**kwargs)
    if all_devices:
        config._compile_all_devices = True
    return config


def generate_kwargs(
    *,
    new_tokens: int,
    cache: str,
    compile_mode: str,
    device_type: str,
    do_sample: bool = False,
    eos_ids: list[int] | None = None,
    model: Any = None,
) -> dict[str, Any]:
    """Keyword arguments for generate() that force exactly ``new_tokens`` tokens on the requested path.

    EOS stays defined (older releases crash in assisted decoding with ``eos_token_id=None``) but can
    never be chosen: it is suppressed at every step (``suppress_tokens``). Not ``min_new_tokens``: 4.5x
    refuses assisted decoding with a minimum-length processor. Sampling knobs a model's
    generation_config may carry are reset.
    """
    kwargs: dict[str, Any] = {
        "max_new_tokens": new_tokens,
        "suppress_tokens": list(eos_ids or []),
        "do_sample": do_sample,
        "return_dict_in_generate": True,
        "output_logits": True,
        "num_beams": 1,
        "repetition_penalty": 1.0,
        "no_repeat_ngram_size": 0,
    }
    if do_sample:
        kwargs.update(temperature=1.0, top_k=0, top_p=1.0)
    else:
        kwargs.update(temperature=None, top_k=None, top_p=None)
    if cache == "static":  # a 4.x HybridCache model's static cache is "hybrid" (module hybrid)
        kwargs["cache_implementation"] = "static" if model is None else hybrid.static_implementation(model)
    if compile_mode == "off":
        if supports_auto_compile():
            kwargs["disable_compile"] = True
    elif compile_mode == "auto":
        config = compile_config(all_devices=device_type != "cuda")
        if config is not None and device_type != "cuda":
            # CPU: inductor without CUDA graphs; same fullgraph default as generate's own config.
            config.mode = "default"
        if config is not None:
            kwargs["compile_config"] = config
    return kwargs


def early_exit_unsupported(model: Any) -> str | None:
    """Why ``assistant_early_exit`` cannot run on ``model``, or None.

    transformers (4.47+) drafts by lowering ``config.num_hidden_layers`` of the base model for a while;
    only decoders that loop over ``layers[: config.num_hidden_layers]`` honour it. Others (GPT-2,
    GPT-Neo) run every layer into a cache sized for fewer, crash, and keep the lowered config.
    """
    from transformers import GenerationConfig

    if not hasattr(GenerationConfig(), "assistant_early_exit"):
        return f"unsupported by transformers {TRANSFORMERS}: no assistant_early_exit in this release"
    base = getattr(model, model.base_model_prefix, None)
    try:
        source = inspect.getsource(type(base).forward) if base is not None else ""
    except (OSError, TypeError):
        source = ""
    if "config.num_hidden_layers" not in source:
        return f"unsupported by the model: {type(base).__name__}.forward does not stop at config.num_hidden_layers, which early exit relies on"
    return None


@contextlib.contextmanager
def layers_restored(model: Any) -> Iterator[None]:
    """Put ``num_hidden_layers`` back when early exit *fails* half-way (transformers does not), so one failure
    does not spoil the session's later checks. A call that returns is checked, not repaired (Runner.generate)."""
    base = getattr(model, model.base_model_prefix, model)
    layers = getattr(base.config, "num_hidden_layers", None)
    try:
        yield
    except BaseException:
        base.config.num_hidden_layers = layers
        raise


def missing_feature(variant_compile: str, device_type: str) -> str | None:
    """Why this transformers release cannot run a variant on this device at all, or None."""
    if variant_compile == "auto" and not supports_auto_compile():
        if not _auto_compiles_on_cuda_only():
            return f"unsupported by transformers {TRANSFORMERS}: generate() has no auto-compile in this release"
        if device_type != "cuda":
            return f"unsupported by transformers {TRANSFORMERS}: generate() auto-compiles only on CUDA in this release"
    return None
