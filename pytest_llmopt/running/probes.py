"""Probes of the installed transformers and torch: does this release carry a known upstream bug? Each reads the
code (or the version) that has the bug, so that a known issue (known_issues.py) stops applying once it is fixed."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch


def source_of(obj: Any) -> str:
    try:
        return inspect.getsource(obj)
    except (OSError, TypeError):
        return ""


def text_config(config: Any) -> Any:
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def sdpa_drops_softcap() -> bool:
    """transformers' SDPA attention takes ``softcap`` in its kwargs and never applies it (4.48+ attention
    interface; seen in 4.52), nor does 4.46-4.47's own ``Gemma2SdpaAttention``; Gemma2 declared
    ``_supports_sdpa`` all the same until 5.x stopped declaring it."""
    source = model_code("gemma2", "Gemma2SdpaAttention.forward")
    if not source:
        try:
            from transformers.integrations.sdpa_attention import sdpa_attention_forward
        except ImportError:
            return False
        source = source_of(sdpa_attention_forward)
    return bool(source) and "softcap" not in source


def paged_eager_drops_softcap() -> bool:
    """Continuous batching's ``paged|eager`` attention (what it switches eager to) takes ``softcap`` in its kwargs and
    never applies it (transformers 5.x, seen in 5.25.0)."""
    try:
        from transformers.integrations import eager_paged
    except ImportError:
        return False
    source = source_of(getattr(eager_paged, "eager_paged_attention_forward", None))
    return bool(source) and "softcap" not in source


def batching_takes_any_attention() -> bool:
    """Continuous batching runs a model whose attention layers do not go through transformers' attention interface
    (``_supports_attention_backend`` False): the paged attention is never called, and nothing refuses the model."""
    try:
        from transformers.generation.continuous_batching import continuous_api
    except ImportError:
        return False
    source = source_of(continuous_api)
    return bool(source) and "_supports_attention_backend" not in source


def without_attention_backend(config: Any) -> bool:
    from .compat import model_class

    cls = model_class(config, False)
    return cls is not None and not getattr(cls, "_supports_attention_backend", False)


def model_code(module: str, name: str) -> str:
    """Source of ``Class.method`` in an installed modeling file, e.g. ("gpt_neo", "GPTNeoFlashAttention2.forward")
    ("" where there is none)."""
    import importlib

    try:
        modeling = importlib.import_module(f"transformers.models.{module}.modeling_{module}")
    except ImportError:
        return ""
    cls, _, method = name.partition(".")
    return source_of(getattr(getattr(modeling, cls, None), method, None))


def is_type(model_type: str) -> Callable[[Any], bool]:
    return lambda config: getattr(text_config(config), "model_type", "") == model_type


def cache_class(name: str) -> Any:
    """A class of the installed cache_utils (None where this release has no such class)."""
    from transformers import cache_utils

    return getattr(cache_utils, name, None)


def gemma2_source(name: str) -> str:
    """Source of a Gemma2 class of the installed release ("" where flex_attention is not declared there)."""
    try:
        from transformers.models.gemma2 import modeling_gemma2 as gemma2
    except ImportError:
        return ""
    if not getattr(gemma2.Gemma2PreTrainedModel, "_supports_flex_attn", False):
        return ""
    return model_code("gemma2", name)


def flex_mask_from_offsets() -> bool:
    """5.5+: flex_attention's mask is built from query and key offsets (``flex_attention_mask(..., q_offset)``), where
    4.57-5.2 built it from ``cache_position``."""
    try:
        from transformers import masking_utils
    except ImportError:
        return False
    build = getattr(masking_utils, "flex_attention_mask", None)
    return build is not None and "q_offset" in inspect.signature(build).parameters


def flex_mask_pads_unpadded() -> bool:
    """Up to 5.13 flex_attention's mask gets a padding term even where the attention mask pads nothing (5.14 adds it
    only where something is padded: ``not fast_all(attention_mask)``), so a prompt alone has a mask beyond causal."""
    try:
        from transformers import masking_utils
    except ImportError:
        return True  # before masking_utils the model files built flex masks, padding term included
    source = source_of(getattr(masking_utils, "flex_attention_mask", None))
    return "padding_mask_function" in source and "fast_all(attention_mask)" not in source


def has_sliding_layers(config: Any) -> bool:
    from .measure import cache_layout

    return cache_layout(config).sliding_layers > 0


def transformers_major() -> int:
    import transformers

    return int(transformers.__version__.split(".")[0])


def prompt_lookup_overruns_max_length() -> bool:
    from transformers.generation.candidate_generator import PromptLookupCandidateGenerator

    try:
        source = inspect.getsource(PromptLookupCandidateGenerator.get_candidates)
    except (OSError, TypeError):
        return False
    return "min(end_idx, input_length, self.max_length)" in source


def early_exit_drops_first_iteration() -> bool:
    """5.0: the base generator's get_candidates gained a required ``is_first_iteration`` that
    EarlyExitCandidateGenerator does not pass on to it (TypeError on the first draft)."""
    from transformers.generation import candidate_generator as cg

    early_exit = getattr(cg, "EarlyExitCandidateGenerator", None)
    if early_exit is None:
        return False
    parameter = inspect.signature(cg.AssistedCandidateGenerator.get_candidates).parameters.get("is_first_iteration")
    try:
        source = inspect.getsource(early_exit.get_candidates)
    except (OSError, TypeError):
        return False
    return parameter is not None and parameter.default is inspect.Parameter.empty and "super().get_candidates(input_ids)" in source


def universal_draft_gets_target_inputs() -> bool:
    """Universal assisted decoding hands the draft model per-token inputs of the target, whose length
    differs from the draft's re-tokenized input (a size mismatch in the draft's forward):
    5.0 to 5.2, the first draft call's prefill path (taking ``is_first_iteration``) passes the target's
    attention mask; later, the assistant kwargs carry the target's position ids (``_prepare_position_ids``)
    until 5.1x made the universal generator drop them."""
    from transformers.generation import candidate_generator as cg

    universal = getattr(cg, "AssistedCandidateGeneratorDifferentTokenizers", None)
    if universal is None:
        return False
    prepare = getattr(cg.AssistedCandidateGenerator, "_prepare_generation_args", None)
    if prepare is not None and "is_first_iteration" in inspect.signature(prepare).parameters:
        return True
    try:
        source = inspect.getsource(universal.get_candidates)
    except (OSError, TypeError):
        return False
    return hasattr(cg, "_prepare_position_ids") and "position_ids" not in source


def universal_draft_cache_rolled_back_by_target_length() -> bool:
    """5.25: the draft's cache is rolled back by ``_last_ids_length - len(draft input)`` (the base
    ``_update_past_and_masks``), and the universal generator sets ``_last_ids_length`` from the target's ids (its
    input, or its converted candidates) instead of what the draft's own cache holds (5.24 cropped to the draft
    input's length): stale draft keys pile up until the cache holds every draft input id."""
    import re

    from transformers.generation import candidate_generator as cg

    universal = getattr(cg, "AssistedCandidateGeneratorDifferentTokenizers", None)
    if universal is None:
        return False
    rollback = source_of(getattr(cg.AssistedCandidateGenerator, "_update_past_and_masks", None))
    drafting = source_of(universal.get_candidates)
    by_last_length = re.search(r"self\._last_ids_length\s*-\s*input_ids\.shape\[-1\]", rollback) is not None
    set_from_target = re.search(r"self\._last_ids_length\s*=\s*\(?\s*(input_ids|new_target_ids)\.shape", drafting) is not None
    return by_last_length and set_from_target


def dynamic_cache_counts_in_an_int() -> bool:
    """4.x: the DynamicCache is an ``nn.Module`` that counts its tokens in a Python int attribute
    (``_seen_tokens``), which dynamo specializes on: a compiled forward recompiles at every token."""
    cache = cache_class("DynamicCache")
    return cache is not None and issubclass(cache, torch.nn.Module) and "self._seen_tokens +=" in source_of(cache.update)
