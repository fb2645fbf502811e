"""The higher-precision reference of the noise-floor rule (equivalence.py): the model's own weights in float32
(float64 when the run dtype is float32), eager attention, one cache-free forward pass over prompt + tokens.

It shares no cache, compile or kernel code with the paths it judges. Where it lives: on the run copy's device
when it fits there next to it; otherwise on the CPU (slower, same numbers); otherwise nowhere, and the checks
that need it are not run, with the reason. The copy is kept on the run model object, so it lives and dies
with it (the model store frees both together).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from copy import deepcopy
from dataclasses import dataclass
from typing import Any

import torch

from ..common.phases import timed
from ..verdicts.equivalence import Generation

PRECISE_DTYPE = {"float32": torch.float64, "float16": torch.float32, "bfloat16": torch.float32}
ACTIVATION_ROOM = 4 << 30  # bytes kept free beside the copy for its forward pass (eager attention, float32 logits)
_ATTRIBUTE = "_llmopt_precise"


@dataclass
class Precise:
    """The copy (or why there is none) and a name for reports, e.g. 'float32 copy on cuda:0'."""

    model: Any | None
    name: str

    @timed("reference")
    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [B, T, V] of a cache-free forward pass, in the copy's dtype, on the CPU.

        A padded batch is run one row at a time without its padding (pads' logits stay 0): each prompt alone,
        at the positions the batch gave it, so the reference shares no padding-mask code with the path it
        judges (and float64 eager attention, whose mask overflows on fully padded rows, is never asked for one).
        """
        assert self.model is not None
        if attention_mask is None or bool(attention_mask.all()):
            return self._forward(input_ids, position_ids)
        if position_ids is None:
            position_ids = torch.arange(input_ids.shape[1]).expand_as(input_ids)
        real = attention_mask.bool().cpu()
        out: torch.Tensor | None = None
        for row in range(input_ids.shape[0]):
            keep = real[row]
            logits = self._forward(input_ids[row : row + 1, keep.to(input_ids.device)], position_ids[row : row + 1, keep.to(position_ids.device)])
            if out is None:
                out = torch.zeros(*input_ids.shape, logits.shape[-1], dtype=logits.dtype)
            out[row, keep] = logits[0]
        assert out is not None
        return out

    def _forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None) -> torch.Tensor:
        assert self.model is not None
        if self.model.config._attn_implementation != "eager" and not _quantized(self.model):
            raise RuntimeError(f"the {self.name} runs {self.model.config._attn_implementation} attention, not eager: its config is shared")
        device = next(self.model.parameters()).device
        kwargs: dict[str, Any] = {"input_ids": input_ids.to(device), "use_cache": False}
        from .compat import _forward_params

        if position_ids is not None and "position_ids" in _forward_params(self.model.__class__):
            kwargs["position_ids"] = position_ids.to(device)
        with torch.no_grad():
            return self.model(**kwargs).logits.cpu()

    @timed("reference")
    def generation_logits(self, generation: Generation) -> torch.Tensor:
        """The next-token logits at each generated position of ``generation`` [B, N, V], by teacher forcing:
        one forward over prompt + generated tokens, with the positions generate() gives a left-padded batch."""
        prompt_len, new = generation.prompt_ids.shape[1], generation.new_tokens.shape[1]
        mask = generation.attention_mask
        if mask is None:
            mask = torch.ones_like(generation.prompt_ids)
        full_mask = torch.cat([mask, torch.ones(mask.shape[0], new, dtype=mask.dtype)], dim=1)
        positions = (full_mask.long().cumsum(-1) - 1).masked_fill(full_mask == 0, 1)
        logits = self.logits(generation.sequences, full_mask, positions)
        return logits[:, prompt_len - 1 : prompt_len + new - 1]


def precise_for(model: Any, run_dtype: str) -> Precise:
    """The higher-precision copy of ``model`` (made once, then kept on it)."""
    cached = model.__dict__.get(_ATTRIBUTE)
    if cached is None:
        cached = _make(model, PRECISE_DTYPE[run_dtype])
        model.__dict__[_ATTRIBUTE] = cached
    return cached


def _quantized(model: Any) -> bool:
    return getattr(model, "hf_quantizer", None) is not None or bool(getattr(model, "is_quantized", False))


def _make(model: Any, dtype: torch.dtype) -> Precise:
    if _quantized(model):
        # Quantized weights have no higher-precision copy here: the documented fallback is the model's own
        # cache-free forward in its compute dtype (still independent of the cache and decoding code).
        return Precise(model, "the quantized model's own cache-free forward (no higher-precision copy of quantized weights)")
    device = next(model.parameters()).device
    need = sum(p.numel() for p in model.parameters()) * torch.finfo(dtype).bits // 8
    short = str(dtype).removeprefix("torch.")
    for where in _places(device, need):
        try:
            copy = _copy(model, dtype, where)
        except torch.cuda.OutOfMemoryError:
            _release()
            continue
        return Precise(copy, f"{short} copy on {where}")
    return Precise(None, f"none: a {short} copy ({need / 2**30:.1f} GiB) fits neither on {device} nor in the CPU's free memory")


def _places(device: torch.device, need: int) -> Iterator[torch.device]:
    """The run copy's device if the copy fits there with room for its activations, then the CPU if it fits."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        if need + ACTIVATION_ROOM < free:
            yield device
    elif device.type == "cpu":
        if need + ACTIVATION_ROOM // 4 < _cpu_free():
            yield device
        return
    if need + ACTIVATION_ROOM < _cpu_free():
        yield torch.device("cpu")


def _cpu_free() -> int:
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 0


def _copy(model: Any, dtype: torch.dtype, device: torch.device) -> Any:
    """The same architecture built empty on ``device`` in ``dtype`` with eager attention, then the run copy's
    weights loaded into it (upcast on the way): no second run-dtype copy is ever made."""
    from . import compat

    # Its own config: attention is switched on the run copy's config object, which must not reach this one.
    with _no_init(), torch.device(device):
        copy = compat.from_config(deepcopy(model.config), dtype, "eager")
    copy.load_state_dict(_weights(model), strict=True)
    if hasattr(copy, "tie_weights"):
        copy.tie_weights()
    compat.set_attention(copy, "eager")
    return copy.eval()


def _weights(model: Any) -> dict[str, torch.Tensor]:
    """The model's state dict without the buffers of a kv-cache held as a submodule: in 4.x a ``Cache`` is an
    ``nn.Module`` and generate() keeps its static cache on the model (``model._cache``), so after a static-cache
    generate the state dict carries that cache's tensors, which the copy (and the architecture) does not have."""
    try:
        from transformers.cache_utils import Cache
    except ImportError:  # pragma: no cover - every supported release has it
        return model.state_dict()
    caches = [name + "." for name, module in model.named_modules() if name and isinstance(module, Cache)]
    return {key: value for key, value in model.state_dict().items() if not any(key.startswith(c) for c in caches)}


@contextlib.contextmanager
def _no_init() -> Iterator[None]:
    """Skip random initialisation (the weights are overwritten): minutes saved on a 7B model."""
    try:
        from transformers.initialization import no_init_weights
    except ImportError:
        try:
            from transformers.modeling_utils import no_init_weights  # type: ignore[attr-defined,no-redef]
        except ImportError:
            yield
            return
    with no_init_weights():
        yield


def _release() -> None:
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
