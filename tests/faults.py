"""Faults shaped like real regressions, injected into transformers with a MonkeyPatch.

Each function patches the installed transformers (5.x layout) and raises LookupError when the place it
patches is not there, so a layout change fails loudly instead of testing nothing.
"""

from __future__ import annotations

import inspect
import textwrap
from typing import Any

import pytest


def cache_written_one_slot_early(mp: pytest.MonkeyPatch) -> None:
    """Decode steps write their key/value one position before where they belong, over the previous
    token's (an off-by-one in the static cache's write index; the length it reports stays right)."""
    from transformers.cache_utils import StaticLayer

    original = StaticLayer.update

    def update(self: Any, key_states: Any, value_states: Any, *args: Any, **kwargs: Any) -> Any:
        shifted = self.is_initialized and key_states.shape[-2] == 1
        if shifted:
            self.cumulative_length.sub_(1)
        result = original(self, key_states, value_states, *args, **kwargs)
        if shifted:
            self.cumulative_length.add_(1)
        return result

    mp.setattr(StaticLayer, "update", update)


def reset_keeps_position(mp: pytest.MonkeyPatch) -> None:
    """StaticCache.reset() zeroes the tensors but forgets the position counter: the next prompt is
    appended after the previous one."""
    from transformers.cache_utils import StaticLayer

    def reset(self: Any) -> None:
        if self.is_initialized:
            self.keys.zero_()
            self.values.zero_()

    mp.setattr(StaticLayer, "reset", reset)


def first_draft_accepted_unverified(mp: pytest.MonkeyPatch) -> None:
    """Assisted decoding counts one more match than the verification found: the first draft token is
    accepted without being checked (an off-by-one in the acceptance rule)."""
    from transformers.generation import utils

    exact = "n_matches = ((~(candidate_new_tokens == selected_tokens[:, :-1])).cumsum(dim=-1) < 1).sum()"
    wrong = "n_matches = min(int(((~(candidate_new_tokens == selected_tokens[:, :-1])).cumsum(dim=-1) < 1).sum()) + 1, candidate_length)"
    _patch_source(mp, utils, utils.GenerationMixin, "_assisted_decoding", exact, wrong)


def padding_mask_dropped_by_sdpa(mp: pytest.MonkeyPatch) -> None:
    """The SDPA attention path ignores the attention mask (pure causal): padded positions are attended."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    original = ALL_ATTENTION_FUNCTIONS["sdpa"]

    def sdpa_without_mask(module: Any, query: Any, key: Any, value: Any, attention_mask: Any, **kwargs: Any) -> Any:
        kwargs["is_causal"] = query.shape[2] > 1
        return original(module, query, key, value, None, **kwargs)

    mp.setitem(ALL_ATTENTION_FUNCTIONS._global_mapping, "sdpa", sdpa_without_mask)


def sdpa_scale_off(mp: pytest.MonkeyPatch, factor: float = 1.02) -> None:
    """The SDPA path scales attention scores by 2 % too much (a wrong head-dim or a scaling applied twice, in
    part): every logit moves a little, no token need change."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    original = ALL_ATTENTION_FUNCTIONS["sdpa"]

    def sdpa_scaled(module: Any, query: Any, key: Any, value: Any, attention_mask: Any, **kwargs: Any) -> Any:
        scaling = kwargs.get("scaling")
        kwargs["scaling"] = (scaling if scaling is not None else query.shape[-1] ** -0.5) * factor
        return original(module, query, key, value, attention_mask, **kwargs)

    mp.setitem(ALL_ATTENTION_FUNCTIONS._global_mapping, "sdpa", sdpa_scaled)


def recompile_every_step(mp: pytest.MonkeyPatch) -> None:
    """A Python float on the cache layer that changes every step (like the old ``_seen_tokens``
    counter): dynamo guards on it, so every decode step compiles a new graph."""
    from transformers.cache_utils import StaticLayer

    original = StaticLayer.update

    def update(self: Any, key_states: Any, value_states: Any, *args: Any, **kwargs: Any) -> Any:
        self._llmopt_tick = getattr(self, "_llmopt_tick", 0.0) + 1.0
        return original(self, key_states * (1.0 + 0.0 * self._llmopt_tick), value_states, *args, **kwargs)

    mp.setattr(StaticLayer, "update", update)


def dynamic_cache_recompile_every_step(mp: pytest.MonkeyPatch) -> None:
    """A per-step Python constant on the dynamic cache's layer (a string naming the step, which dynamo
    guards on by value and can never make dynamic): a compiled forward recompiles at every new token, so
    the number of graphs grows with the output length and soon hits dynamo's recompile limit."""
    from transformers.cache_utils import DynamicLayer

    original = DynamicLayer.update

    def update(self: Any, key_states: Any, value_states: Any, *args: Any, **kwargs: Any) -> Any:
        self._llmopt_step = f"step {int(getattr(self, '_llmopt_step', 'step 0').split()[1]) + 1}"
        scale = 1.0 if self._llmopt_step.endswith(("0", "1", "2", "3", "4", "5", "6", "7", "8", "9")) else 2.0
        return original(self, key_states * scale, value_states, *args, **kwargs)

    mp.setattr(DynamicLayer, "update", update)


def static_cache_sized_per_request(mp: pytest.MonkeyPatch) -> None:
    """generate() sizes each static cache to its own request again, forgetting both ``max_cache_len`` and
    the largest size seen (the behaviour transformers #46424 fixed), under a compile that specializes on
    shapes (``CompileConfig(dynamic=False)``): a graph per request size."""
    import copy

    from transformers import PreTrainedModel
    from transformers.generation import utils

    original = PreTrainedModel.get_compiled_call

    def static_shapes(self: Any, compile_config: Any) -> Any:
        config = copy.copy(compile_config)
        config.dynamic = False
        return original(self, config)

    mp.setattr(PreTrainedModel, "get_compiled_call", static_shapes)
    _patch_source(mp, utils, utils.GenerationMixin, "_prepare_static_cache",
                  'previous_max_len = getattr(self, "_previous_max_cache_length", -1)', "previous_max_len = -1")
    _patch_source(mp, utils, utils.GenerationMixin, "_prepare_cache_for_generation",
                  "max_cache_length = max(max_cache_length, generation_config.max_cache_len)", "pass")


def auto_compile_stays_eager(mp: pytest.MonkeyPatch) -> None:
    """generate()'s auto-compile criteria answer no whatever the cache and config: a static cache decodes
    eagerly, so it matches eager and compiles nothing, without compiling anything either."""
    from transformers.generation.utils import GenerationMixin

    if not hasattr(GenerationMixin, "_valid_auto_compile_criteria"):
        raise LookupError("this transformers has no GenerationMixin._valid_auto_compile_criteria to patch")
    mp.setattr(GenerationMixin, "_valid_auto_compile_criteria", lambda self, *args, **kwargs: False)


def biased_speculative_acceptance(mp: pytest.MonkeyPatch) -> None:
    """Speculative sampling accepts drafts too often (verification against 0.5 p + 0.5 q instead of p,
    the 'ensemble' relaxation switched on by mistake)."""
    from transformers.generation import utils

    original = utils._speculative_sampling

    def biased(*args: Any, **kwargs: Any) -> Any:
        kwargs["assistant_ensemble_weight"] = 0.5
        return original(*args, **kwargs)

    mp.setattr(utils, "_speculative_sampling", biased)


def top_k_warper_ignored(mp: pytest.MonkeyPatch) -> None:
    """The top-k warper passes every score through: sampling draws from beyond the k most likely tokens."""
    from transformers.generation.logits_process import TopKLogitsWarper

    mp.setattr(TopKLogitsWarper, "__call__", lambda self, input_ids, scores: scores)


def padding_mask_builder_ignores_padding(mp: pytest.MonkeyPatch) -> None:
    """The padding-mask builder that eager, SDPA and flex attention share lets every query attend the pads
    (a fault no comparison between two attention paths can see: both sides share it)."""
    from transformers import masking_utils

    if not hasattr(masking_utils, "padding_mask_function"):
        raise LookupError("this transformers has no masking_utils.padding_mask_function to patch")

    def padding_mask_function(padding_mask: Any) -> Any:
        def inner_mask(batch_idx: Any, head_idx: Any, q_idx: Any, kv_idx: Any) -> Any:
            return padding_mask[batch_idx, kv_idx] | True

        return inner_mask

    mp.setattr(masking_utils, "padding_mask_function", padding_mask_function)


def restart_refeeds_last_cached_token(mp: pytest.MonkeyPatch) -> None:
    """generate() continuing from a returned cache feeds one token too many: the last cached token is
    written into the cache a second time (an off-by-one in the slicing of a restarted prefill)."""
    from transformers.generation import utils

    exact = "next_sequence_length = input_ids.shape[1] - past_length"
    wrong = "next_sequence_length = input_ids.shape[1] - past_length + (1 if past_length else 0)"
    _patch_source(mp, utils, utils.GenerationMixin, "_prefill", exact, wrong)


def generate_leaves_static_cache_config(mp: pytest.MonkeyPatch) -> None:
    """generate() with a static cache leaves ``cache_implementation="static"`` on the model's own
    generation_config: every later plain call silently runs on a static cache."""
    from transformers.generation.utils import GenerationMixin

    original = GenerationMixin.generate

    def generate(self: Any, *args: Any, **kwargs: Any) -> Any:
        out = original(self, *args, **kwargs)
        if kwargs.get("cache_implementation") == "static":
            self.generation_config.cache_implementation = "static"
        return out

    mp.setattr(GenerationMixin, "generate", generate)


def accepted_draft_cropped_from_cache(mp: pytest.MonkeyPatch) -> None:
    """After a verification step that accepted drafts, the cache is cropped one position too far: the last
    accepted token's key/value is lost (only paths whose drafts are accepted can show it)."""
    from transformers.generation import utils

    exact = "outputs.cache.crop(-number_of_tokens_to_crop)"
    wrong = "outputs.cache.crop(-(number_of_tokens_to_crop + (1 if n_matches > 0 else 0)))"
    _patch_source(mp, utils, utils.GenerationMixin, "_assisted_decoding", exact, wrong)


def last_agreeing_draft_rejected(mp: pytest.MonkeyPatch) -> None:
    """Greedy verification counts one match too few: the last agreeing draft token is thrown away and the
    target recomputes it. The output stays right; only speed is lost (one fewer token per accepted block)."""
    from transformers.generation import utils

    exact = "n_matches = ((~(candidate_new_tokens == selected_tokens[:, :-1])).cumsum(dim=-1) < 1).sum()"
    wrong = "n_matches = (((~(candidate_new_tokens == selected_tokens[:, :-1])).cumsum(dim=-1) < 1).sum() - 1).clamp(min=0)"
    _patch_source(mp, utils, utils.GenerationMixin, "_assisted_decoding", exact, wrong)


def eos_inside_draft_kept(mp: pytest.MonkeyPatch) -> None:
    """Assisted decoding keeps the tokens a verification step accepted after an EOS inside the draft block
    (the EOS cut of the accepted tokens finds nothing), so generation runs on past the EOS (reported
    against 5.15)."""
    from transformers.generation import utils

    exact = "eos_positions = torch.isin(valid_tokens.squeeze(0), eos_token_id.to(valid_tokens.device)).nonzero()"
    wrong = "eos_positions = torch.zeros(0, 1, dtype=torch.long)"
    _patch_source(mp, utils, utils.GenerationMixin, "_assisted_decoding", exact, wrong)


def finished_rows_not_padded(mp: pytest.MonkeyPatch) -> None:
    """A row of a batch that met its EOS keeps generating its own tokens instead of padding until the
    longest row ends."""
    from transformers.generation import utils

    exact = "next_tokens = next_tokens * unfinished_sequences + pad_token_id * (1 - unfinished_sequences)"
    _patch_source(mp, utils, utils.GenerationMixin, "_sample", exact, "next_tokens = next_tokens")


def max_length_one_late(mp: pytest.MonkeyPatch) -> None:
    """The max-length criterion stops one step late: one token more than max_new_tokens."""
    from transformers.generation import stopping_criteria

    owner = stopping_criteria.MaxLengthCriteria
    _patch_source(mp, stopping_criteria, owner, "__call__", "is_done = cur_len >= self.max_length", "is_done = cur_len > self.max_length")


def min_new_tokens_one_short(mp: pytest.MonkeyPatch) -> None:
    """min_new_tokens lets the EOS through one token early: the new tokens are counted one too many, both by
    its processor and by the min_length generate() derives from it (either alone holds the EOS back)."""
    from transformers.generation import logits_process, utils

    owner = logits_process.MinNewTokensLengthLogitsProcessor
    exact = "new_tokens_length = input_ids.shape[-1] - self.prompt_length_to_skip"
    _patch_source(mp, logits_process, owner, "__call__", exact, exact + " + 1")
    exact = "generation_config.min_length = generation_config.min_new_tokens + input_ids_length"
    _patch_source(mp, utils, utils.GenerationMixin, "_prepare_generated_length", exact, exact + " - 1")


def stop_string_never_matches(mp: pytest.MonkeyPatch) -> None:
    """The stop-string criterion never reports a match (e.g. a broken token-to-text table): generation runs
    on past the string."""
    import torch
    from transformers.generation.stopping_criteria import StopStringCriteria

    def never(self: Any, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    mp.setattr(StopStringCriteria, "__call__", never)


def processors_see_the_draft_prefix_only(mp: pytest.MonkeyPatch) -> None:
    """Assisted decoding hands the logits processors the ids before the draft block at every draft position
    (the wrong slice of the candidate ids): a repetition penalty or an n-gram ban misses the block's tokens."""
    from transformers.generation import utils

    exact = "new_logits[:, i, :] = logits_processor(candidate_input_ids[:, : cur_len + i], new_logits[:, i, :])"
    wrong = "new_logits[:, i, :] = logits_processor(candidate_input_ids[:, :cur_len], new_logits[:, i, :])"
    _patch_source(mp, utils, utils.GenerationMixin, "_assisted_decoding", exact, wrong)


def static_cache_not_reordered(mp: pytest.MonkeyPatch) -> None:
    """Beam search reorders a StaticCache's layers as a no-op: after the first reorder a beam attends another
    beam's keys and values (a static cache not reordered between beams)."""
    from transformers import cache_utils

    if not hasattr(cache_utils, "StaticLayer"):
        raise LookupError("this transformers has no cache_utils.StaticLayer to patch")
    mp.setattr(cache_utils.StaticLayer, "reorder_cache", lambda self, beam_idx: None)


def token_credited_to_the_wrong_beam(mp: pytest.MonkeyPatch) -> None:
    """Beam search extends each kept candidate from the next beam instead of its own (an off-by-one in the
    beam-index arithmetic): the cache follows the sequences, so every logit is right, but the kept beams are
    not the best candidates."""
    from transformers.generation import utils

    exact = "topk_current_beam_indices = topk_indices // vocab_size"
    wrong = "topk_current_beam_indices = (topk_indices // vocab_size + 1) % num_beams"
    _patch_source(mp, utils, utils.GenerationMixin, "_get_top_k_continuations", exact, wrong)


def sliding_window_rolls_the_wrong_way(mp: pytest.MonkeyPatch) -> None:
    """A full static sliding-window layer rolls its keys and values the wrong way before writing the new token:
    it keeps the oldest position and drops the one before the newest. Nothing changes until a row has
    generated past the window."""
    from transformers import cache_utils

    if not hasattr(cache_utils, "StaticSlidingWindowLayer"):
        raise LookupError("this transformers has no cache_utils.StaticSlidingWindowLayer to patch")
    owner = cache_utils.StaticSlidingWindowLayer
    _patch_source(mp, cache_utils, owner, "update", "roll(-1, dims=-2)", "roll(1, dims=-2)")


def _patch_source(mp: pytest.MonkeyPatch, module: Any, owner: type, name: str, old: str, new: str) -> None:
    source = textwrap.dedent(inspect.getsource(getattr(owner, name)))
    if old not in source:
        raise LookupError(f"{owner.__name__}.{name} of this transformers has no line {old!r} to patch")
    namespace: dict[str, Any] = {}
    exec(compile(source.replace(old, new), f"<fault in {name}>", "exec"), vars(module).copy(), namespace)
    mp.setattr(owner, name, namespace[name])


def static_cache_silently_dynamic(mp: pytest.MonkeyPatch) -> None:
    """generate() asked for ``cache_implementation="static"`` runs a DynamicCache and only logs it, in 5.13's words
    (where it did so for assisted decoding)."""
    from transformers.generation import utils

    original = utils.GenerationMixin._prepare_cache_for_generation

    def prepare(self: Any, generation_config: Any, *args: Any, **kwargs: Any) -> Any:
        if generation_config.cache_implementation == "static":
            utils.logger.warning("An assistant model is provided, using a dynamic cache instead of a cache of type='static'.")
            generation_config.cache_implementation = None
        return original(self, generation_config, *args, **kwargs)

    mp.setattr(utils.GenerationMixin, "_prepare_cache_for_generation", prepare)


def paged_block_handed_to_two_requests(mp: pytest.MonkeyPatch) -> None:
    """The paged cache's page table hands a request a block that another running request already holds (its first),
    so both write their keys and values into it."""
    from transformers.generation.continuous_batching.cache_allocators.full_attention import FullAttentionCacheAllocator

    original = FullAttentionCacheAllocator.allocate_cache_to_request

    def allocate(self: Any, request_id: str, past_length: int, query_length: int) -> None:
        fresh = request_id not in self.block_table
        original(self, request_id, past_length, query_length)
        others = [table for rid, table in self.block_table.items() if rid != request_id and table]
        if fresh and others and self.block_table[request_id]:
            self.block_table[request_id][0] = others[0][0]

    mp.setattr(FullAttentionCacheAllocator, "allocate_cache_to_request", allocate)


def paged_block_freed_while_in_use(mp: pytest.MonkeyPatch) -> None:
    """A request's newest block goes back to the free pool as soon as it is allocated, while the request still
    writes to it: the next request to ask for a block is handed the same one."""
    from transformers.generation.continuous_batching.cache_allocators.full_attention import FullAttentionCacheAllocator

    original = FullAttentionCacheAllocator.allocate_cache_to_request

    def allocate(self: Any, request_id: str, past_length: int, query_length: int) -> None:
        before = len(self.block_table.get(request_id, []))
        original(self, request_id, past_length, query_length)
        table = self.block_table[request_id]
        if len(table) > before:
            self.pool.free_blocks(self.index, [table[-1]])

    mp.setattr(FullAttentionCacheAllocator, "allocate_cache_to_request", allocate)


def request_cut_one_token_early(mp: pytest.MonkeyPatch) -> None:
    """Continuous batching finishes a request one token before its max_new_tokens (an off-by-one in the completion
    check)."""
    from transformers.generation.continuous_batching import requests

    _patch_source(mp, requests, requests.RequestState, "update_and_check_completion",
                  "current_len >= self._new_tokens_limit", "current_len >= self._new_tokens_limit - 1")
