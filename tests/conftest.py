"""Shared helpers of the plugin's own tests."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

pytest_plugins = ["pytester"]

ROOT = Path(__file__).resolve().parents[1]
SUITES = ROOT / "suites"
SHARED_MODELS = Path(os.environ.get("LLMOPT_SHARED_MODELS", ROOT.parent / "shared" / "models"))


def shared_model(name: str) -> Path:
    """A real trained model of ../shared/models; skips where that folder does not exist."""
    path = SHARED_MODELS / name
    if not (path / "config.json").is_file():
        pytest.skip(f"{path} not present (the real models live in ../shared/models beside the checkout)")
    return path


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """No LLMOPT_* variable of the outer environment leaks into a test."""
    for name in list(os.environ):
        if name.startswith("LLMOPT_"):
            monkeypatch.delenv(name)
    return monkeypatch
