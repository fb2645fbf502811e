"""What one pytest session knows: its settings, its models and prompts, the machine, the model store.

Built by the plugin when llmopt is asked for (at configure time) or first needed; the machine is probed
then too (a device that does not exist is a usage error); the model store is made on first use.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import pytest

from ..running import models, prompts
from ..running.models import ModelSpec
from ..running.prompts import Prompt
from .settings import Settings

if TYPE_CHECKING:
    from ..running.machine import Machine
    from ..running.models import ModelStore


@dataclass
class LlmoptSession:
    settings: Settings
    models: tuple[ModelSpec, ...]
    assistant: ModelSpec | None
    prompts: tuple[Prompt, ...]
    _machine: Machine | None = field(default=None, repr=False)
    _store: ModelStore | None = field(default=None, repr=False)

    @property
    def machine(self) -> Machine:
        """The machine, probed once (raises UsageError for a device that does not exist)."""
        if self._machine is None:
            from ..running import machine

            try:
                self._machine = machine.probe(self.settings.device, self.settings.dtype)
            except ValueError as exc:
                raise pytest.UsageError(f"pytest-llmopt: {exc}") from None
        return self._machine

    @property
    def store(self) -> ModelStore:
        """The model store of this session (one per process: each xdist worker has its own)."""
        if self._store is None:
            from ..running import compat

            m = self.machine
            # torch.compile caches by code object: every model of the session shares LlamaForCausalLM.forward,
            # so each model costs its own graphs. Room for all of them, or the second model hits the limit.
            compat.allow_recompiles(8 * (len(self.models) + 1))
            keep = 8 if m.device_type == "cpu" else 2
            self._store = models.ModelStore(m.device, m.dtype, self.settings.seed, self.settings.trust_remote_code, keep)
        return self._store


def build(settings: Settings) -> LlmoptSession:
    """Resolve models and prompts; a bad one is one UsageError for the whole session."""
    try:
        specs = models.distinct(tuple(dict.fromkeys(models.resolve(ref) for ref in settings.models)))
        assistant = models.resolve(settings.assistant, "--llmopt-assistant") if settings.assistant else None
    except models.ModelError as exc:
        raise pytest.UsageError(f"pytest-llmopt: {exc}") from None
    try:
        loaded_prompts = prompts.load(settings.prompts)
    except prompts.PromptFileError as exc:
        raise pytest.UsageError(f"pytest-llmopt: --llmopt-prompts: {exc}") from None
    return LlmoptSession(settings, specs, assistant, loaded_prompts)
