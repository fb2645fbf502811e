"""Reproduction for transformers maintainers: universal assisted decoding crashes in 5.25.0 (5.24.0 passes).

Offline, CPU, seconds: a random 2-layer Llama and, as its draft, a copy of it with the same weights whose config
claims one more vocabulary entry, so that generate() takes the universal (different-tokenizers) path with
`tokenizer=` and `assistant_tokenizer=`. Its drafts are the target's own choices, so they are accepted, and
greedy output must equal plain greedy.

    python universal-draft-cache-rollback.py           # 5.25.0: RuntimeError: cannot reshape tensor of 0 elements ...
    python universal-draft-cache-rollback.py --mend    # 5.24.0's rollback rule restored: equal to plain greedy

Cause: AssistedCandidateGeneratorDifferentTokenizers.get_candidates sets `_last_ids_length` from the *target's*
ids (its input, or its converted candidates), and AssistedCandidateGenerator._update_past_and_masks crops the
draft's cache by `_last_ids_length - len(draft input ids) + extra`. That is not what the draft's cache holds
(5.24 cropped it to `len(draft input ids) - 2 - extra`), so stale draft keys pile up until the cache holds every
draft input id and the draft's forward is called with none.
"""

import copy
import sys

import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

if "--mend" in sys.argv:
    from transformers.generation import candidate_generator as cg

    universal = cg.AssistedCandidateGeneratorDifferentTokenizers
    broken = universal._update_past_and_masks

    def mended(self, input_ids, num_extra_tokens_to_remove=0):
        cache = self.assistant_kwargs.get("cache")
        if cache is not None:  # make the inherited rule crop to 5.24's length: the draft input's, in the draft's tokens
            keep = input_ids.shape[-1] - 2 - num_extra_tokens_to_remove
            self._last_ids_length = cache.get_seq_length() - keep + input_ids.shape[-1] - num_extra_tokens_to_remove
        return broken(self, input_ids, num_extra_tokens_to_remove)

    universal._update_past_and_masks = mended

text = "Once upon a time there was a little robot named Tim. Tim lived in a small town by the sea. The quick brown fox jumps."
bpe = Tokenizer(models.BPE())
bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
bpe.decoder = decoders.ByteLevel()
bpe.train_from_iterator([text], trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>", "<s>", "</s>"],
                                                    initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, pad_token="<pad>", bos_token="<s>", eos_token="</s>")

torch.manual_seed(0)
config = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, pad_token_id=0, bos_token_id=1, eos_token_id=2)
target = LlamaForCausalLM(config).eval()
draft = copy.deepcopy(target)
draft.config.vocab_size += 1  # generate() tells the two tokenizers apart by the models' vocabulary sizes

ids = tokenizer("Once upon a time there was a little robot", return_tensors="pt").input_ids
settings = dict(max_new_tokens=40, do_sample=False, suppress_tokens=[2])
plain = target.generate(ids, **settings)
try:
    out = target.generate(ids, assistant_model=draft, tokenizer=tokenizer, assistant_tokenizer=tokenizer, **settings)
except RuntimeError as exc:
    print(f"transformers {transformers.__version__}: {type(exc).__name__}: {exc}")
    sys.exit(1)
print(f"transformers {transformers.__version__}: equal to plain greedy: {torch.equal(out, plain)}")
sys.exit(0 if torch.equal(out, plain) else 1)
