"""The registry of known upstream issues: bugs of transformers or torch that the suites catch.

A suite test declares the issues it may hit by id, in its marker
(``@pytest.mark.llmopt(..., known_issues=["prompt-lookup-overruns-static-cache"])``), so that renaming
the test keeps its xfail, and an id missing from the registry is a usage error. Each entry probes the
installed code or version, so it stops applying once the bug is fixed upstream, and is as narrow as the bug:
a check whose prompts have no padding declares a bug that needs a mask beyond causal as ``ID:unpadded``,
which applies only where the entry's ``unpadded`` probe says such a prompt meets it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch

from . import probes


@dataclass(frozen=True)
class KnownIssue:
    """An upstream bug this suite catches on a given stack, run as a non-strict xfail limited to the
    exception it raises: any other failure still fails, and a fix shows up as XPASS. ``present`` probes
    the installed code or versions, so the entry stops applying once the bug is fixed upstream."""

    id: str  # what a suite's marker names: @pytest.mark.llmopt(..., known_issues=[id])
    present: Callable[[], bool]
    raises: str  # dotted exception class
    reason: str
    applies: Callable[[str, str, str], bool] = lambda cache, attention, device: True  # (variant cache, attention, device type)
    hits: Callable[[Any], bool] = lambda config: True  # the model's config: a bug of one architecture spares the others
    # False where running into the bug harms the rest of the session (e.g. it exhausts dynamo's recompile limit
    # of a code object later checks compile too): the test is then not run while the probe says the bug is there.
    run: bool = True
    # For a bug that needs a mask beyond causal: whether a prompt without padding meets it on this model and release
    # (a sliding window, a padding term added to a mask that pads nothing). Read where a check declares "ID:unpadded".
    unpadded: Callable[[Any], bool] | None = None
    compiled_only: bool = False  # a bug of code generate()'s auto-compile generates: variants that compile only


UNPADDED = "unpadded"  # the qualifier of a declaration by a check whose prompts have no padding


KNOWN_ISSUES: tuple[KnownIssue, ...] = (
    KnownIssue(
        id="torch-flex-attention-cpu-codegen",
        applies=lambda cache, attention, device: attention == "flex_attention" and device == "cpu",
        present=lambda: torch.__version__.startswith("2.13.") and probes.flex_mask_from_offsets(),
        unpadded=lambda config: probes.has_sliding_layers(config) or probes.flex_mask_pads_unpadded(),
        raises="torch._inductor.exc.InductorError",
        reason="known issue: torch 2.13's inductor emits C++ that does not compile ('cur_kvSplitSize0' undeclared) "
        "for flex_attention's CPU decode kernel when the mask is more than causal (padding, a sliding window), with the "
        "masks transformers 5.5+ builds from query offsets (seen 5.5.4-5.25.0; 4.57.6 and 5.0-5.2 pass the same checks)",
    ),
    KnownIssue(
        id="torch-flex-attention-cpu-decode",
        applies=lambda cache, attention, device: attention == "flex_attention" and device == "cpu",
        # with 5.5+'s masks the codegen failure above comes first
        present=lambda: torch.__version__.startswith("2.13.") and not probes.flex_mask_from_offsets(),
        compiled_only=True,
        raises="_pytest.outcomes.Failed",
        reason="known issue: torch 2.13's CPU flex_attention decode step, compiled inside generate()'s auto-compiled forward, "
        "gives wrong logits on 4.57's padded masks from a later step (|Δlogit| 4.3 at new token 11; the same masks through "
        "torch's uncompiled flex_attention are right). Seen in full sessions only (4.57.6: static-object + auto-compile on "
        "tiny-qwen2 and tiny-gemma2; a run of the flex checks alone passes), so which compiled variant meets it depends on "
        "what the session compiled before; with 5.5+'s masks the codegen failure comes first",
    ),
    KnownIssue(
        id="sdpa-ignores-attention-softcap",
        applies=lambda cache, attention, device: attention.startswith("sdpa"),
        hits=lambda config: getattr(probes.text_config(config), "attn_logit_softcapping", None) is not None,
        present=probes.sdpa_drops_softcap,
        raises="_pytest.outcomes.Failed",
        reason="known issue (transformers 4.46-5.2x, seen in 4.52.4, 4.57.6, 5.10.4, 5.20.2; 5.24's Gemma2 no longer declares SDPA): SDPA attention "
        "ignores the model's attn_logit_softcapping, so its logits differ from eager's, which caps",
    ),
    KnownIssue(
        id="gemma2-decode-window-mask-misaligned",
        hits=probes.is_type("gemma2"),
        present=lambda: "attention_mask[:, :, :, -self.sliding_window :]" in probes.model_code("gemma2", "Gemma2DecoderLayer.forward"),
        raises="_pytest.outcomes.Failed",
        reason="known issue (transformers 4.46-4.47 Gemma2, fixed in 4.48 by an offset): at a decode step a sliding "
        "layer reads the last sliding_window columns of the cache-long mask, not the columns of the keys it holds, so a "
        "left-padded row past the window attends to its padding (|Δlogit| ~7 from the first decode step; the unpadded "
        "row is right)",
    ),
    KnownIssue(
        id="sliding-cache-shifts-one-slot",
        hits=lambda config: getattr(probes.text_config(config), "cache_implementation", None) == "hybrid",  # 4.x Gemma2
        present=lambda: "to_shift[-1].int()" in probes.source_of(probes.cache_class("HybridCache")),
        raises="_pytest.outcomes.Failed",
        reason="known issue (transformers 4.46-4.51, HybridCache): a sliding layer past its window makes room for one new "
        "token whatever the number it is given, and writes them all to its last slot, so several tokens at once (a draft "
        "block to verify, a second turn on a returned cache) lose keys: assisted decoding handed a HybridCache object "
        "runs on it (seen in 4.46.3), and a conversation continued on Gemma2's own cache hits it",
    ),
    KnownIssue(
        id="gemma2-flex-mask-as-tensor",
        applies=lambda cache, attention, device: attention == "flex_attention",
        hits=probes.is_type("gemma2"),
        present=lambda: "torch.finfo(attention_mask.dtype)" in probes.gemma2_source("Gemma2DecoderLayer.forward"),
        raises="AttributeError",
        reason="known issue (transformers 4.x Gemma2): a sliding-window layer cuts flex_attention's BlockMask to "
        "its window as if it were a mask tensor ('BlockMask' object has no attribute 'dtype')",
    ),
    KnownIssue(
        id="gemma2-flex-4d-mask-in-generate",
        applies=lambda cache, attention, device: attention == "flex_attention",
        hits=probes.is_type("gemma2"),
        present=lambda: 'not self.config._attn_implementation == "flash_attention_2"'
        in probes.gemma2_source("Gemma2ForCausalLM.prepare_inputs_for_generation"),
        raises="ValueError",
        reason="known issue (transformers 4.x Gemma2): generate() with its HybridCache turns the mask 4D for every "
        "attention but flash, and flex_attention's mask builder wants it 2D (ValueError: too many values to unpack)",
    ),
    KnownIssue(
        id="gptneo-flash-attention-ignores-local-window",
        applies=lambda cache, attention, device: attention == "flash_attention_2",
        hits=lambda config: "local" in (getattr(probes.text_config(config), "attention_layers", None) or ()),
        present=lambda: (lambda code: bool(code) and "window" not in code)(probes.model_code("gpt_neo", "GPTNeoFlashAttention2.forward")),
        raises="_pytest.outcomes.Failed",
        reason="known issue (transformers GPT-Neo, every release 4.46-5.24): GPTNeoFlashAttention2 hands flash-attn no "
        "window, so a local layer attends to every earlier token where eager masks all but the last window_size "
        "(seen on the H100 under 5.10.4: |Δlogit| 3.6-7.8 once a text passes the window)",
    ),
    KnownIssue(
        id="gptneo-flash-attention-4d-mask-slice",
        applies=lambda cache, attention, device: attention == "flash_attention_2",
        hits=probes.is_type("gpt_neo"),
        present=lambda: "attention_mask[:, :, :, :" in probes.model_code("gpt_neo", "GPTNeoFlashAttention2.forward"),
        raises="IndexError",
        reason="known issue (transformers 4.46-4.57 GPT-Neo): GPTNeoFlashAttention2 slices its mask as 4D "
        "(attention_mask[:, :, :, :k]) but flash attention gets the 2D padding mask: any padded batch raises "
        "IndexError (too many indices for tensor of dimension 2)",
    ),
    KnownIssue(
        id="gpt2-flash-attention-not-causal-with-mask",
        applies=lambda cache, attention, device: attention == "flash_attention_2",
        hits=probes.is_type("gpt2"),
        present=lambda: "is_causal = attention_mask is None and" in probes.model_code("gpt2", "GPT2Attention.forward"),
        raises="_pytest.outcomes.Failed",
        reason="known issue (transformers 4.52-4.57 GPT-2): GPT2Attention passes is_causal=False whenever it has an "
        "attention mask, which flash attention honours while the mask it gets is the 2D padding mask, so the prompt "
        "attends to later tokens (seen on the H100 under 4.57.6: |Δlogit| up to 10 on padded batches; a prompt alone passes)",
    ),
    KnownIssue(
        id="dynamic-cache-int-recompiles",
        applies=lambda cache, attention, device: cache == "dynamic",
        present=probes.dynamic_cache_counts_in_an_int,
        raises="_pytest.outcomes.Failed",
        run=False,
        reason="known issue (transformers 4.4x, seen in 4.46.3): the DynamicCache is an nn.Module counting its tokens "
        "in an int attribute (_seen_tokens) that dynamo specializes on; a compiled forward (greedy or beam search) recompiles at "
        "every token until dynamo's recompile limit drops it to eager (not run: the recompiles count against the model's "
        "forward for the rest of the session, so later compiled checks would hit the limit too)",
    ),
    KnownIssue(
        id="paged-eager-ignores-attention-softcap",
        applies=lambda cache, attention, device: attention == "eager",
        hits=lambda config: getattr(probes.text_config(config), "attn_logit_softcapping", None) is not None,
        present=probes.paged_eager_drops_softcap,
        raises="_pytest.outcomes.Failed",
        reason="known issue (transformers 5.x continuous batching): eager_paged_attention_forward, the 'paged|eager' "
        "attention that continuous batching switches eager to, takes softcap in its kwargs and never applies it, so a model "
        "with attn_logit_softcapping (Gemma 2) answers with other logits than generate() (tiny-gemma2 under 5.25.0: "
        "log-probabilities off by up to 0.07, tokens part; exact once the model's softcapping is removed)",
    ),
    KnownIssue(
        id="batching-runs-models-without-attention-interface",
        hits=probes.without_attention_backend,
        present=probes.batching_takes_any_attention,
        raises="_pytest.outcomes.Failed",
        reason="known issue (transformers 5.x continuous batching): a model whose attention does not go through the "
        "attention interface (_supports_attention_backend False, e.g. GPT-Neo) is accepted, its layers never call the "
        "paged attention, so every answer is computed without the request's cache (tiny-gptneo under 5.25.0: every "
        "request wrong from its first tokens, requests added later never finish)",
    ),
    KnownIssue(
        id="prompt-lookup-overruns-static-cache",
        applies=lambda cache, attention, device: cache == "static",
        present=probes.prompt_lookup_overruns_max_length,
        raises="IndexError",
        reason="known issue: PromptLookupCandidateGenerator caps a draft at max_length as a source index, not as a "
        "length, so a draft near the end writes past a static cache (IndexError in index_copy_)",
    ),
    KnownIssue(
        id="early-exit-drops-is-first-iteration",
        present=probes.early_exit_drops_first_iteration,
        raises="TypeError",
        reason="known issue: EarlyExitCandidateGenerator.get_candidates calls the base get_candidates without its "
        "required is_first_iteration argument (TypeError on the first draft)",
    ),
    KnownIssue(
        id="universal-draft-gets-target-inputs",
        present=probes.universal_draft_gets_target_inputs,
        raises="RuntimeError",
        reason="known issue: universal assisted decoding hands the draft model the target's attention mask or position "
        "ids, whose length differs from the draft's re-tokenized input (size mismatch in the draft's forward)",
    ),
    KnownIssue(
        id="universal-draft-cache-rolled-back-by-target-length",
        present=probes.universal_draft_cache_rolled_back_by_target_length,
        raises="RuntimeError",
        reason="known issue (transformers 5.25.0; 5.24 is right): universal assisted decoding rolls the draft's cache back "
        "by the length of the last candidates counted in the target's tokens, not by what the draft's cache holds, so stale "
        "draft keys pile up until the draft's forward gets no new token (RuntimeError: cannot reshape tensor of 0 elements); "
        "any draft whose tokens are accepted hits it (scripts/repro/universal-draft-cache-rollback.py)",
    ),
    KnownIssue(
        id="universal-draft-with-sliding-window",
        # a draft whose cache keeps sliding layers: transformers' caches read `sliding_window`; GPT-Neo's local layers
        # (`window_size`) are cached in full and do not meet it (XPASS on 5.24)
        hits=lambda config: probes.has_sliding_layers(config) and getattr(probes.text_config(config), "sliding_window", None) is not None,
        present=lambda: probes.transformers_major() >= 5,
        raises="RuntimeError",
        reason="known issue (seen in transformers 5.20.2 and 5.24 on tiny-gemma2 and tiny-mistral, once the text passes the sliding "
        "window): universal assisted decoding with a sliding-window draft gives the draft an attention mask shorter "
        "than its keys (size of tensor a (N) must match b (N+k)); a separate Gemma2 draft shows it too",
    ),
)


BY_ID = {issue.id: issue for issue in KNOWN_ISSUES}


def unknown(ids: Iterable[str]) -> list[str]:
    """The ids a marker names that the registry does not hold, or with a qualifier other than ``:unpadded`` on an entry
    that has an ``unpadded`` probe (a usage error: a typo would silently drop an xfail)."""
    bad = []
    for declared in ids:
        name, _, qualifier = declared.partition(":")
        issue = BY_ID.get(name)
        if issue is None or (qualifier and (qualifier != UNPADDED or issue.unpadded is None)):
            bad.append(declared)
    return sorted(bad)


def known_issues(ids: Iterable[str], cache: str, attention: str, device_type: str, config: Any = None, compiled: bool = False) -> list[KnownIssue]:
    """The test's declared issues that apply to this variant (``compiled``: it compiles generate()'s forward) and model
    and are present in the installed code."""
    found = []
    for declared in ids:
        name, _, qualifier = declared.partition(":")
        issue = BY_ID[name]
        probe = issue.unpadded if qualifier == UNPADDED else None
        if config is not None and not (issue.hits(config) and (probe is None or probe(config))):
            continue
        if issue.applies(cache, attention, device_type) and (compiled or not issue.compiled_only) and issue.present():
            found.append(issue)
    return found


def exception_class(dotted: str) -> type[BaseException]:
    import builtins
    import importlib

    module, _, name = dotted.rpartition(".")
    return getattr(importlib.import_module(module), name) if module else getattr(builtins, name)

