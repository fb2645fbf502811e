"""What a speed campaign times, known at collection: the planned checks of one model and kind of weights (a group),
their ids, and the one prompt every path of a campaign decodes. Light on purpose: perf.py plans at collection,
before torch is needed."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest

PROMPT_TOKENS = 32


@dataclass
class Planned:
    """A speed check's path, known from collection."""

    key: str  # the check's id in baselines and reports
    param: Any  # cases.CaseParam
    extra: dict[str, Any]


@dataclass
class Group:
    """The paths one campaign times: a model on one kind of weights and one workload (the one prompt, or the
    request mix of throughput.py), against the plain unquantized path on it."""

    model: str
    quant: str
    workload: str = "prompt"  # "prompt" | "requests"
    planned: dict[str, Planned] = field(default_factory=dict)
    outcome: Any = None  # speedrun.Outcome once run (here or by another worker), or the exception its campaign raised


def workload(extra: dict[str, Any]) -> str:
    """The workload a speed check's marker asks for: ``requests=...`` times a request mix, anything else the one prompt."""
    return "requests" if "requests" in extra else "prompt"


def group_key(model: str, quant: str, extra: dict[str, Any]) -> tuple[str, str, str]:
    return (model, quant, workload(extra))


def check_key(node: pytest.Item, variant_id: str) -> str:
    """A check's id in baselines and campaigns: ``suite::test[variant]``."""
    return f"{node.path.stem.removeprefix('test_')}::{getattr(node, 'originalname', node.name)}[{variant_id}]"


def prompt_ids(runner: Any) -> Any:
    """A fixed PROMPT_TOKENS-token prompt (batch 1), on the model's device: the same for every variant."""
    import torch

    ids = runner.tokenizer(_TEXT, return_tensors="pt")["input_ids"][0]
    while ids.numel() < PROMPT_TOKENS:
        ids = torch.cat([ids, ids])
    return ids[:PROMPT_TOKENS].unsqueeze(0).to(runner.model.device)


_TEXT = (
    "The quick brown fox jumps over the lazy dog while the committee reviews the quarterly report on "
    "inference latency, memory bandwidth and the cost of serving large language models at batch one."
)
