"""pytest-llmopt: validate the fast generation paths of Hugging Face transformers on your models."""

from __future__ import annotations

__version__ = "0.1.0"
