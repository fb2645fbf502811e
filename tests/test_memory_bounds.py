"""Proof of power of the memory bounds, on CPU: a cache kept alive after generate(), a cache that grows
over calls, and a sliding-window layer that stops trimming each make the memory suite fail, with a
message that says so; the same selections pass without the fault."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from conftest import SUITES
from pytest_llmopt.running import memory


def cache_kept_on_model(mp: pytest.MonkeyPatch) -> None:
    """generate() leaves the cache it built on the model (a reference that outlives the call)."""
    from transformers.generation.utils import GenerationMixin

    original = GenerationMixin.generate

    def generate(self: Any, *args: Any, **kwargs: Any) -> Any:
        out = original(self, *args, **kwargs)
        self.__dict__["_llmopt_leaked_cache"] = getattr(out, "past_key_values", None)
        return out

    mp.setattr(GenerationMixin, "generate", generate)


def caches_kept_in_closure(mp: pytest.MonkeyPatch) -> None:
    """Every generate() call's cache is captured by a closure that lives on (grows with each call)."""
    from transformers.generation.utils import GenerationMixin

    original = GenerationMixin.generate
    kept: list[Any] = []

    def generate(self: Any, *args: Any, **kwargs: Any) -> Any:
        out = original(self, *args, **kwargs)
        kept.append(getattr(out, "past_key_values", None))
        return out

    mp.setattr(GenerationMixin, "generate", generate)


def sliding_window_not_trimmed(mp: pytest.MonkeyPatch) -> None:
    """The dynamic sliding-window layer stops trimming: it keeps every position, like a full layer (the
    mask still applies the window, so no token changes: only memory can tell)."""
    from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

    for name in ("update", "get_mask_sizes", "get_seq_length", "crop"):
        if name in DynamicSlidingWindowLayer.__dict__ and name in DynamicLayer.__dict__:
            mp.setattr(DynamicSlidingWindowLayer, name, DynamicLayer.__dict__[name])


FAULTS: dict[
    str,
    tuple[Callable[[pytest.MonkeyPatch], None], str, tuple[str, ...], tuple[str, ...]],
] = {
    "cache kept on the model": (
        cache_kept_on_model,
        "test_memory_returns_after_generate and dynamic",
        (),
        (
            "*bytes more than before generate() are still held after it returned*kept alive on the model or in a closure*",
        ),
    ),
    "caches kept in a closure": (
        caches_kept_in_closure,
        "test_memory_returns_after_generate",
        (),
        (
            "*still held after it returned*",
            "*memory grew by * bytes over 3 identical calls*",
        ),
    ),
    "sliding window not trimmed": (
        sliding_window_not_trimmed,
        "test_generate_cache_within_formula and dynamic",
        ("--llmopt-model=tiny-mistral",),
        ("*sliding-window layer 0 holds * positions, its window is 48*",),
    ),
}


def _run(
    pytester: pytest.Pytester, select: str, args: tuple[str, ...]
) -> pytest.RunResult:
    return pytester.runpytest(
        str(SUITES / "test_memory.py"),
        "-k",
        select,
        "-p",
        "no:logging",
        "-p",
        "no:cacheprovider",
        *args,
    )


@pytest.mark.parametrize("name", list(FAULTS))
def test_memory_fault_is_caught(
    name: str, pytester: pytest.Pytester, clean_env: pytest.MonkeyPatch
) -> None:
    inject, select, args, expect = FAULTS[name]
    inject(clean_env)
    result = _run(pytester, select, args)
    assert result.parseoutcomes().get("failed", 0) >= 1, (
        f"{name}: the suite did not fail\n{result.stdout.str()[-3000:]}"
    )
    result.stdout.fnmatch_lines(list(expect))


@pytest.mark.parametrize("name", list(FAULTS))
def test_same_memory_selection_passes_without_the_fault(
    name: str, pytester: pytest.Pytester, clean_env: pytest.MonkeyPatch
) -> None:
    _, select, args, _ = FAULTS[name]
    result = _run(pytester, select, args)
    outcomes = result.parseoutcomes()
    assert (
        outcomes.get("passed", 0) >= 1
        and not outcomes.get("failed")
        and not outcomes.get("errors")
    ), result.stdout.str()[-3000:]


def test_sliding_layers_of_a_mixed_model_stay_in_their_window(
    pytester: pytest.Pytester, clean_env: pytest.MonkeyPatch
) -> None:
    """gemma2 alternates sliding and full layers: both caches pass the formula (the flags follow layer_types)."""
    result = _run(
        pytester, "test_generate_cache_within_formula", ("--llmopt-model=tiny-gemma2",)
    )
    outcomes = result.parseoutcomes()
    assert outcomes.get("passed", 0) == 2, result.stdout.str()[-3000:]


def test_tensor_probe_counts_live_tensors() -> None:
    """The CPU probe sees a new tensor's bytes, and not after it is dropped."""
    import torch

    probe = memory.TensorProbe()
    before = probe.current()
    held = torch.zeros(1 << 16, dtype=torch.float32)
    assert probe.current() - before == held.nbytes
    del held
    assert probe.current() == before


def test_check_returns_allows_only_what_is_declared_kept() -> None:
    """A call that keeps N bytes passes only when N is declared as kept (the static cache's reuse)."""
    import torch

    probe = memory.TensorProbe()
    box: list[Any] = []

    def call() -> None:
        box[:] = [
            torch.zeros(1024, dtype=torch.float32)
        ]  # replaced, not accumulated: no growth

    assert not memory.check_returns(probe, call, slack=0).ok
    box.clear()
    assert memory.check_returns(probe, call, kept=lambda: 4096, slack=0).ok


def test_static_capacity_reads_the_full_layers() -> None:
    """A static cache's capacity is that of its full layers: 4.57's ``Cache.max_cache_len`` (the longest layer)
    is the window where every layer slides (Mistral), 5.x caches have none, 4.x caches carry their own."""
    from types import SimpleNamespace as Obj

    def layer(length: int, sliding: bool) -> Obj:
        return Obj(max_cache_len=length, is_sliding=sliding)

    mixed = Obj(layers=[layer(48, True), layer(104, False)], max_cache_len=104)
    all_sliding = Obj(layers=[layer(48, True), layer(48, True)], max_cache_len=48)
    assert memory.static_capacity(mixed, 100) == 104
    assert memory.static_capacity(all_sliding, 100) == 100
    assert memory.static_capacity(Obj(max_cache_len=96), 90) == 96  # 4.x StaticCache / HybridCache
    assert memory.static_capacity(Obj(layers=[layer(30, False)]), 90) == 30  # too small: the check reports it
