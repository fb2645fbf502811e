"""Built-in models: tiny ones for CPU CI and full-size "shapes" for GPUs, all built offline from configs.

Weights are random but deterministic (seeded), and the tokenizers are byte-level BPEs trained at run
time on a fixed corpus, so nothing is downloaded. Tiny models use a larger initializer range than
transformers' default (0.02): with the default, a tiny model's next token hardly depends on its
context, and a wrong kv-cache, mask or draft acceptance would change no token at all. Two tokenizers
of different vocabularies exist so that universal assisted decoding has a built-in pair.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

CORPUS = """\
Once upon a time there was a little robot named Tim. Tim lived in a small town by the sea.
Every morning Tim walked to the harbour to watch the boats. One day a big storm came and the boats
could not come home. Tim was brave. He climbed the lighthouse and turned on the light so the boats
could see the way. The sailors were happy and they thanked Tim. From that day on, Tim was the
keeper of the lighthouse, and the town was never dark again.
The quarterly report shows that revenue grew by twelve percent while costs fell by three percent.
The board approved the plan to open two new offices and to hire forty engineers next year.
In summary: revenue grew, costs fell, and the company will open new offices and hire engineers.
def fibonacci(n):
    if n < 2:
        return n
    return fibonacci(n - 1) + fibonacci(n - 2)

def factorial(n):
    result = 1
    for i in range(2, n + 1):
        result = result * i
    return result

for i in range(10):
    print(i, fibonacci(i), factorial(i))
The quick brown fox jumps over the lazy dog. A journey of a thousand miles begins with a single step.
Question: What is the capital of France? Answer: The capital of France is Paris.
Question: What is two plus three? Answer: Two plus three is five.
{"name": "widget", "price": 12.5, "tags": ["blue", "small"], "stock": 42}
SELECT name, price FROM products WHERE price > 10 ORDER BY price DESC;
0123456789 +-*/=<>()[]{}.,;:!?'"#@$%&_|\\~^`
"""

SPECIAL_TOKENS = ("<pad>", "<s>", "</s>")
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2


@dataclass(frozen=True)
class TokenizerRecipe:
    """A byte-level BPE trained on CORPUS: same recipe, same vocabulary, on every machine."""

    vocab_size: int


TOKENIZER_A = TokenizerRecipe(vocab_size=512)
TOKENIZER_B = TokenizerRecipe(vocab_size=384)


@functools.cache
def _trained(recipe: TokenizerRecipe) -> str:
    """The trained tokenizer as JSON (cached: training takes a few milliseconds, but once is enough)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=recipe.vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS.splitlines(keepends=True), trainer=trainer)
    return tok.to_str()


def build_tokenizer(recipe: TokenizerRecipe = TOKENIZER_A) -> Any:
    """A transformers fast tokenizer; left padding, as batched generation needs."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_trained(recipe)),
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        padding_side="left",
    )
    return tok


def _ids(vocab: int) -> dict[str, int]:
    return {"vocab_size": vocab, "bos_token_id": BOS_ID, "eos_token_id": EOS_ID, "pad_token_id": PAD_ID}


# Each entry: model_type, config kwargs, tokenizer recipe. Tiny sizes keep a CPU run in seconds while
# exercising what differs between architectures: GQA (llama, qwen2, mistral), qkv bias (qwen2),
# sliding windows shorter than the long prompts (mistral, gemma2, gpt-neo local layers), soft-capping
# (gemma2), learned absolute positions (gpt2, gpt-neo).
TINY: dict[str, tuple[str, dict[str, Any], TokenizerRecipe]] = {
    "tiny-llama": (
        "llama",
        dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=False),
        TOKENIZER_A,
    ),
    "tiny-qwen2": (
        "qwen2",
        dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=False),
        TOKENIZER_A,
    ),
    "tiny-mistral": (
        "mistral",
        dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=1024, sliding_window=48, tie_word_embeddings=False),
        TOKENIZER_A,
    ),
    "tiny-gemma2": (
        "gemma2",
        dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16, max_position_embeddings=1024, sliding_window=48,
             query_pre_attn_scalar=16, attn_logit_softcapping=50.0, final_logit_softcapping=30.0,
             tie_word_embeddings=False),
        TOKENIZER_A,
    ),
    "tiny-gpt2": (
        "gpt2",
        dict(n_embd=64, n_layer=4, n_head=4, n_positions=1024, tie_word_embeddings=False),
        TOKENIZER_B,
    ),
    "tiny-gptneo": (
        "gpt_neo",
        dict(hidden_size=64, num_layers=4, num_heads=4, max_position_embeddings=1024, window_size=48,
             attention_types=[[["global", "local"], 2]]),
        TOKENIZER_A,
    ),
}
TINY_INIT_RANGE = 0.25  # see the module docstring; checked by tests/test_zoo.py::test_tiny_models_are_context_sensitive

# Full-size shapes of public models, random weights: for speed and memory figures on a GPU, where a
# download is not wanted. Their logits are nearly flat (initializer 0.02), so they are full of near-ties.
SHAPES: dict[str, tuple[str, dict[str, Any], TokenizerRecipe]] = {
    "llama-1b-shape": (
        "llama",
        dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
             num_attention_heads=32, num_key_value_heads=8, head_dim=64, max_position_embeddings=8192,
             rope_theta=500000.0, tie_word_embeddings=True),
        TOKENIZER_A,
    ),
    "llama-7b-shape": (
        "llama",
        dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
             num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096, tie_word_embeddings=False),
        TOKENIZER_A,
    ),
}

BUILTIN_NAMES = tuple(TINY) + tuple(SHAPES)
DEFAULT_MODEL = "tiny-llama"
DEFAULT_ASSISTANT_OTHER_TOKENIZER = "tiny-gpt2"


def is_builtin(name: str) -> bool:
    return name in TINY or name in SHAPES


def builtin_config(name: str) -> Any:
    """The transformers config of a built-in model (no weights)."""
    from transformers import AutoConfig

    model_type, kwargs, recipe = TINY[name] if name in TINY else SHAPES[name]
    merged = {**_ids(recipe.vocab_size), **kwargs}
    if name in TINY:
        merged["initializer_range"] = TINY_INIT_RANGE
    if model_type == "gpt2":
        merged.pop("pad_token_id")
    return AutoConfig.for_model(model_type, **merged)


def builtin_tokenizer(name: str) -> Any:
    recipe = (TINY[name] if name in TINY else SHAPES[name])[2]
    return build_tokenizer(recipe)


def build_builtin(name: str, seed: int, dtype: Any, device: Any, factory: Callable[..., Any], attention: str | None = None) -> Any:
    """Instantiate a built-in model with seeded weights directly on ``device``.

    ``factory(config, dtype, attention)`` comes from compat (the from_config keywords changed across releases).
    Weights are drawn on the CPU in float32 for tiny models, so they are the same on every machine,
    and on the target device for shapes, where CPU initialization would take minutes.
    """
    import torch

    config = builtin_config(name)
    if name in TINY:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = factory(config, torch.float32, attention)
        model = model.to(device=device, dtype=dtype)
    else:
        with torch.random.fork_rng(devices=[device] if torch.device(device).type == "cuda" else []):
            torch.manual_seed(seed)
            with torch.device(device):
                model = factory(config, dtype, attention)
    model.generation_config.pad_token_id = PAD_ID
    model.generation_config.eos_token_id = EOS_ID
    model.generation_config.bos_token_id = BOS_ID
    return model.eval()
