"""Prompts: built-in ones, or the user's file (--llmopt-prompts).

A prompt is "grounded" when its continuation is expected to copy from it (summaries, code edits):
prompt-lookup decoding only has something to look up there. Built-in prompts cover plain text,
question answering, a summary and code; a long prompt is made by repeating text to a token length.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Prompt:
    name: str
    text: str
    grounded: bool = False


BUILTIN: tuple[Prompt, ...] = (
    Prompt("story", "Once upon a time there was a little robot named Tim. Tim lived in a small town by the sea."),
    Prompt("qa", "Question: What is the capital of France? Answer: The capital of France is Paris.\nQuestion: What is two plus three? Answer:"),
    Prompt(
        "summary",
        "The quarterly report shows that revenue grew by twelve percent while costs fell by three percent. "
        "The board approved the plan to open two new offices and to hire forty engineers next year.\n"
        "Summary: The quarterly report shows that revenue grew by",
        grounded=True,
    ),
    Prompt(
        "code",
        "def factorial(n):\n    result = 1\n    for i in range(2, n + 1):\n        result = result * i\n    return result\n\n"
        "# the same function, renamed\ndef product_up_to(n):\n    result = 1\n    for i in range(2, n + 1):",
        grounded=True,
    ),
)

LONG_SOURCE = (
    "Every morning Tim walked to the harbour to watch the boats. One day a big storm came and the boats could "
    "not come home. Tim climbed the lighthouse and turned on the light so the boats could see the way. "
)


class PromptFileError(ValueError):
    """A prompts file that cannot be used; the message names the file and the entry."""


def load(path: Path | None) -> tuple[Prompt, ...]:
    """The user's prompts, or the built-in ones when no file is given."""
    if path is None:
        return BUILTIN
    text = path.read_text(encoding="utf-8")
    suffix = path.suffix.lower()
    if suffix == ".json":
        try:
            items = json.loads(text)
        except json.JSONDecodeError as exc:
            raise PromptFileError(f"{path}: not valid JSON ({exc})") from None
        if not isinstance(items, list):
            raise PromptFileError(f"{path}: expected a JSON list of prompts")
    elif suffix == ".jsonl":
        items = []
        for number, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    items.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise PromptFileError(f"{path}:{number}: not valid JSON ({exc})") from None
    else:
        items = [block.strip("\n") for block in text.split("\n\n") if block.strip()]
    prompts = tuple(_prompt(item, index, path) for index, item in enumerate(items, 1))
    if not prompts:
        raise PromptFileError(f"{path}: holds no prompt")
    return prompts


def _prompt(item: object, index: int, path: Path) -> Prompt:
    if isinstance(item, str) and item.strip():
        return Prompt(f"p{index}", item)
    if isinstance(item, dict) and isinstance(item.get("text"), str) and item["text"].strip():
        grounded = item.get("grounded", False)
        if not isinstance(grounded, bool):
            raise PromptFileError(f"{path}: prompt {index}: 'grounded' must be true or false")
        return Prompt(str(item.get("name", f"p{index}")), item["text"], grounded)
    raise PromptFileError(f"{path}: prompt {index} must be a non-empty string or an object with a 'text' string")


def grounded(prompts: tuple[Prompt, ...]) -> tuple[Prompt, ...]:
    """The grounded prompts, falling back to the built-in ones when the user gave none."""
    chosen = tuple(p for p in prompts if p.grounded)
    return chosen or tuple(p for p in BUILTIN if p.grounded)


def long_prompt(tokenizer: object, tokens: int) -> str:
    """Text of at least ``tokens`` tokens, for long-context attention checks."""
    text = LONG_SOURCE
    while len(tokenizer(text)["input_ids"]) < tokens:  # type: ignore[operator]
        text += LONG_SOURCE
    ids = tokenizer(text)["input_ids"][:tokens]  # type: ignore[operator]
    return tokenizer.decode(ids, skip_special_tokens=True)  # type: ignore[attr-defined]


# The prompt-lookup settings the suites use, and that copy_point's draft prediction assumes.
LOOKUP = {"prompt_lookup_num_tokens": 4, "max_matching_ngram_size": 2}


def lookup_draft(tokens: list[int], ngram: int, span: int) -> list[int]:
    """The draft prompt-lookup decoding proposes after ``tokens``: for the longest n-gram size from ``ngram``
    down to 1, the ``span`` tokens after the earliest earlier occurrence of the last n-gram
    (transformers' PromptLookupCandidateGenerator)."""
    for size in range(min(ngram, len(tokens) - 1), 0, -1):
        last = tokens[-size:]
        for start in range(len(tokens) - size):
            if tokens[start : start + size] == last and start + size < len(tokens):
                return tokens[start + size : start + size + span]
    return []


def copy_point(prompt: list[int], continuation: list[int], ngram: int, span: int) -> tuple[int, int] | None:
    """Where a greedy ``continuation`` of ``prompt`` can be cut so that prompt lookup on ``prompt +
    continuation[:cut]`` drafts what the model says next: ``(cut, accepted)``, the cut whose draft has the
    longest agreeing head (the earliest of those), or None when no draft ever agrees. A prompt cut there is
    one the model provably copies from: its own greedy continuation accepts ``accepted`` draft tokens.
    Trained models repeat themselves often; random ones by chance, a token here and there."""
    best: tuple[int, int] | None = None
    for cut in range(1, len(continuation)):
        draft = lookup_draft(prompt + continuation[:cut], ngram, span)
        agree = 0
        while agree < len(draft) and cut + agree < len(continuation) and draft[agree] == continuation[cut + agree]:
            agree += 1
        if agree and (best is None or agree > best[1]):
            best = (cut, agree)
            if agree == span:
                break
    return best
