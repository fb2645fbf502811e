"""Throughput on a request mix: the same requests served one by one with plain generate() (the reference), as one
left-padded batch through plain generate(), and by continuous batching (``generate_batch`` over a paged cache, as a
user calls it: the release's defaults but for the cache's size, cache_config says why). Each is a whole-call path
of the model's speed campaign (campaign.Path.tokens), so its figure is a paired, interleaved throughput ratio like
every other speedup. Inputs and configurations are built once, outside the timed calls.

The mix: prompts of several lengths (what a padded batch wastes and continuous batching saves), each made to
generate the same number of tokens (EOS can never end a request), so that the three ways do the same work and
only how they schedule it differs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..common import outcomes
from . import batching, compat
from .campaign import Path

PROMPT_LENGTHS = (6, 10, 14, 19, 24, 29, 36, 44)  # one request each; their sum and the new tokens fix the work
MODES = ("batched", "continuous")  # what ``@pytest.mark.llmopt_speed(requests=...)`` may ask for
REFERENCE = "one by one"


@dataclass(frozen=True)
class Mix:
    """The requests' prompt token ids and how many tokens each generates."""

    prompts: tuple[tuple[int, ...], ...]
    new_tokens: int

    @property
    def tokens(self) -> int:
        return len(self.prompts) * self.new_tokens


def mix(stream: list[int], new_tokens: int) -> Mix:
    """Requests cut from one token stream (repeated as needed), each starting one token further on, so no two
    prompts are the same."""
    need = max(PROMPT_LENGTHS) + len(PROMPT_LENGTHS)
    while len(stream) < need:
        stream = stream + stream
    return Mix(tuple(tuple(stream[i : i + n]) for i, n in enumerate(PROMPT_LENGTHS)), new_tokens)


def path(mode: str, key: str, runner: Any, requests: Mix) -> Path:
    """The whole-call path of ``mode`` ("one by one", "batched" or "continuous") on ``runner``'s model."""
    serve = {REFERENCE: _one_by_one, "batched": _batched, "continuous": _continuous}.get(mode)
    if serve is None:
        raise ValueError(f"unknown request mode {mode!r}: expected one of {', '.join(MODES)}")
    if mode == "continuous":
        reason = batching.unsupported_reason()
        if reason:
            outcomes.unsupported(reason)
    return Path(key, serve(runner, requests), per_step=False, tokens=requests.tokens)


def _plain_kwargs(runner: Any, requests: Mix) -> dict[str, Any]:
    kwargs = compat.generate_kwargs(
        new_tokens=requests.new_tokens, cache="dynamic", compile_mode="off", device_type=runner.machine.device_type, eos_ids=runner.eos_ids, model=runner.model
    )
    kwargs.update(output_logits=False)
    return kwargs


def _one_by_one(runner: Any, requests: Mix) -> Callable[[list[Any]], int]:
    import torch

    kwargs = _plain_kwargs(runner, requests)
    device = runner.model.device
    inputs = [torch.tensor([prompt], device=device) for prompt in requests.prompts]

    def serve(processors: list[Any]) -> int:
        made = 0
        with runner.active() as model, runner.refusals_skip(), compat.eager_generate(model):
            for ids in inputs:
                out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kwargs)
                made += int(out.sequences.shape[-1]) - ids.shape[-1]
        return made

    return serve


def _batched(runner: Any, requests: Mix) -> Callable[[list[Any]], int]:
    import torch

    kwargs = _plain_kwargs(runner, requests)
    width = max(len(p) for p in requests.prompts)
    pad = batching.pad_id(runner.model)
    device = runner.model.device
    ids = torch.tensor([[pad] * (width - len(p)) + list(p) for p in requests.prompts], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in requests.prompts], device=device)

    def serve(processors: list[Any]) -> int:
        with runner.active() as model, runner.refusals_skip(), compat.eager_generate(model):
            out = model.generate(input_ids=ids, attention_mask=mask, pad_token_id=pad, **kwargs)
        return (int(out.sequences.shape[-1]) - width) * len(requests.prompts)

    return serve


def cache_config(requests: Mix) -> Any:
    """The release's continuous batching defaults, but a paged cache sized to the mix (twice the pages its requests
    need at once) rather than to the machine's free memory: sized to memory, generate_batch spent 6-20 s of every
    call allocating it on a 24 GiB CPU machine (0.9 s with this size), which would be the figure."""
    from transformers import ContinuousBatchingConfig

    default = ContinuousBatchingConfig()
    page = int(getattr(default, "page_size", None) or getattr(default, "block_size", None) or 32)
    longest = max(len(p) for p in requests.prompts) + requests.new_tokens
    return batching.config(None, num_blocks=2 * len(requests.prompts) * -(-longest // page), return_logprobs=False)


def _continuous(runner: Any, requests: Mix) -> Callable[[list[Any]], int]:
    cache = cache_config(requests)
    config = batching.generation_config(runner.model, None, max_new_tokens=requests.new_tokens)
    inputs = [list(p) for p in requests.prompts]

    def serve(processors: list[Any]) -> int:
        with runner.active() as model, runner.refusals_skip():
            out = model.generate_batch(inputs=inputs, generation_config=config, continuous_batching_config=cache, progress_bar=False)
        failed = [f"{name}: {o.error}" for name, o in out.items() if getattr(o, "error", None)]
        if failed:
            raise RuntimeError(f"generate_batch failed requests of the mix: {'; '.join(failed[:3])}")
        return sum(len(o.generated_tokens) for o in out.values())

    return serve

