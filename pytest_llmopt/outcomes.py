"""Why a check did not pass or fail: the reasons the plugin gives, and the refusals of transformers or
torch that mean "unsupported", not "broken".

This module imports neither torch nor transformers at import time.
"""

from __future__ import annotations

UNSUPPORTED_BY_MODEL = "unsupported by the model"


# Messages with which transformers itself refuses a combination: "unsupported by transformers", not failures.
REFUSALS = (
    "requires a cache that can be cropped",  # 5.2x: a static sliding-window cache longer than its window
    "not supported with Static cache",  # up to 5.1x: assisted generation refuses static caches
)


def refusal(exc: BaseException, sdpa_backend: str | None = None) -> str | None:
    """Why ``exc`` is transformers (or torch) refusing a combination, or None when it is a real error.

    A pinned SDPA backend that has no kernel for the input (PyTorch's flash kernel takes no attention
    mask, so a padded batch has none) is torch's refusal, reported with the backend named; so is a
    NotImplementedError of flex_attention's CPU lowering (wrapped by inductor in a RuntimeError).
    """
    import torch

    from .compat import TRANSFORMERS

    text = str(exc)
    if isinstance(exc, ValueError) and any(r in text for r in REFUSALS):
        return f"unsupported by transformers {TRANSFORMERS}: {text.splitlines()[0]}"
    if sdpa_backend and isinstance(exc, RuntimeError) and "No available kernel" in text:
        return f"unsupported by torch {torch.__version__}: the {sdpa_backend} SDPA backend has no kernel for this input"
    if isinstance(exc, RuntimeError) and "`return_lse` is not supported" in text:
        # transformers 4.50-4.5x asks flex_attention for the log-sum-exp, which torch's CPU kernel lacks
        return f"unsupported by torch {torch.__version__}: its compiled CPU flex_attention cannot return the log-sum-exp transformers {TRANSFORMERS} asks for"
    return None

