"""The built-in drafts whose acceptance is known (pytest_llmopt/running/assistants.py), checked without the suites."""

from __future__ import annotations

import torch

from pytest_llmopt.running import assistants, zoo


def _tiny(name: str):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(zoo.builtin_config(name)).eval(), zoo.builtin_tokenizer(name)


def test_renumbered_twin_is_another_vocabulary_with_the_same_text() -> None:
    model, tokenizer = _tiny("tiny-llama")
    twin = assistants.renumbered_twin(model, tokenizer)
    assert twin is not None
    draft, twin_tokenizer = twin
    text = "Once upon a time there was a little fox."
    ours, theirs = tokenizer(text)["input_ids"], twin_tokenizer(text)["input_ids"]
    assert len(ours) == len(theirs) and ours != theirs  # same tokens, other ids
    assert twin_tokenizer.decode(theirs) == tokenizer.decode(ours)
    assert twin_tokenizer.eos_token_id == tokenizer.eos_token_id and twin_tokenizer.pad_token_id == tokenizer.pad_token_id
    # transformers tells the vocabularies apart by size: the twin must not look like the same tokenizer
    assert draft.config.vocab_size == model.config.vocab_size + 1
    assert model.config.vocab_size == zoo.builtin_config("tiny-llama").vocab_size  # the target's config untouched


def test_renumbered_twin_drafts_the_targets_own_greedy_text() -> None:
    model, tokenizer = _tiny("tiny-llama")
    draft, twin_tokenizer = assistants.renumbered_twin(model, tokenizer)
    text = "Once upon a time there was"
    suppress = [tokenizer.eos_token_id]
    with torch.no_grad():
        ours = model.generate(**tokenizer([text], return_tensors="pt"), max_new_tokens=12, do_sample=False, suppress_tokens=suppress)
        theirs = draft.generate(**twin_tokenizer([text], return_tensors="pt"), max_new_tokens=12, do_sample=False, suppress_tokens=suppress)
    assert twin_tokenizer.decode(theirs[0]) == tokenizer.decode(ours[0])
    assert not torch.equal(ours, theirs)


def test_renumbered_twin_needs_a_bpe_tokenizers_tokenizer() -> None:
    model, _ = _tiny("tiny-llama")

    class Slow:
        pass

    assert assistants.renumbered_twin(model, Slow()) is None


def test_drafts_that_wrap_forward_keep_its_signature() -> None:
    """generate() reads forward's signature to build the draft's inputs and slice what its cache holds: a draft whose
    forward hid it behind (*args, **kwargs) re-ran its whole input every round (on 5.25, whose relative cache
    rollback keeps the duplicates, tiny-gptneo's draft passed its 1024 positions)."""
    import inspect

    model, tokenizer = _tiny("tiny-gptneo")
    expected = inspect.signature(model.forward)
    drafts = [assistants.agreeing_for(model, 3, 8), assistants.renumbered_twin(model, tokenizer)[0]]
    assert [inspect.signature(d.forward) for d in drafts] == [expected, expected]
