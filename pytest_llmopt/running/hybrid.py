"""4.x models that run only on their own HybridCache (Gemma2; also Gemma3, Cohere2 in those releases).

Their generation config names ``cache_implementation="hybrid"`` and their sliding-window layers cut the
attention mask to the window, so a DynamicCache or a StaticCache that holds more positions than the window
crashes (size mismatch), and generate() refuses a cache object beside the configured kind (ValueError).
On such a model the plain path's cache *is* a HybridCache, and the static cache is the HybridCache too:
these helpers let compat build and hand over that kind. 5.x builds sliding layers into every cache and
dropped HybridCache, so none of this applies there (``hybrid_class`` returns None).
"""

from __future__ import annotations

from typing import Any


def hybrid_class(model: Any) -> type | None:
    """HybridCache where ``model`` needs it (its generation config asks for it and the release has it), else None."""
    import transformers

    if getattr(getattr(model, "generation_config", None), "cache_implementation", None) != "hybrid":
        return None
    found: type | None = getattr(transformers, "HybridCache", None)
    return found


def static_implementation(model: Any) -> str:
    """The ``cache_implementation`` that means "a static cache" for ``model``: 'hybrid' on a HybridCache model."""
    return "hybrid" if hybrid_class(model) is not None else "static"


def cache_object_kwargs(model: Any) -> dict[str, Any]:
    """What generate() needs beside a cache object: no configured ``cache_implementation`` (4.x raises
    "Passing both cache_implementation ... and past_key_values" when the model's config names one)."""
    return {"cache_implementation": None} if getattr(model.generation_config, "cache_implementation", None) else {}
