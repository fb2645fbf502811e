"""The baseline rules (pure functions) and the timing arithmetic, without a model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pytest_llmopt import baselines as bl
from pytest_llmopt import timing as tm

CHECK = "performance::test_generate_speed[static+compile/sdpa/bf16]"


def metric(value: float, tolerance: float = 0.1, direction: str = "higher", kind: str = "ratio") -> bl.Metric:
    return bl.Metric(value, tolerance, direction, kind)


@pytest.mark.parametrize(
    ("direction", "measured", "verdict"),
    [
        ("higher", 3.0, "ok"),
        ("higher", 2.75, "ok"),  # 8.3 % worse, inside 10 %
        ("higher", 2.6, "regression"),  # 13 % worse
        ("higher", 3.5, "improvement"),
        ("lower", 3.25, "ok"),
        ("lower", 3.5, "regression"),  # a latency 17 % higher
        ("lower", 2.5, "improvement"),
    ],
)
def test_judge_follows_the_direction_and_the_relative_tolerance(direction: str, measured: float, verdict: str) -> None:
    assert bl.judge(CHECK, "x", measured, metric(3.0, 0.1, direction)).verdict == verdict


def test_a_zero_baseline_is_judged_by_absolute_difference() -> None:
    assert bl.judge(CHECK, "acceptance_rate", 0.04, metric(0.0, 0.05)).verdict == "ok"
    assert bl.judge(CHECK, "recompiles", 1.0, metric(0.0, 0.0, "lower")).verdict == "regression"


def test_failure_text_names_metric_baseline_measured_and_tolerance() -> None:
    finding = bl.judge(CHECK, "decode_ms", 9.1, metric(7.07, 0.1, "lower", "absolute"), "baselines/h100/llama.json")
    text = bl.failure_text("static+compile vs dynamic", [finding])
    assert "decode_ms: measured 9.1, baseline 7.07 (+28.7%; tolerance 10% absolute, lower is better)" in text
    assert "baselines/h100/llama.json" in text and "--llmopt-update-baselines" in text


def _file(tmp_path: Path, hardware: str, checks: dict[str, dict[str, bl.Metric]]) -> bl.BaselineFile:
    return bl.BaselineFile(tmp_path / hardware / "m.json", hardware, "m", {}, checks)


def test_ratios_cross_machines_absolutes_do_not(tmp_path: Path) -> None:
    other = _file(tmp_path, "a100", {CHECK: {"speedup": metric(4.0), "decode_ms": metric(2.0, 0.1, "lower", "absolute")}})
    found = {f.metric: f for f in bl.compare(CHECK, {"speedup": 2.0, "decode_ms": 9.0, "total_ms": 5.0}, None, other)}
    assert found["speedup"].verdict == "regression"
    assert found["decode_ms"].verdict == "other hardware" and found["decode_ms"].baseline is None
    assert "total_ms" not in found  # not a baselined figure
    same = _file(tmp_path, "h100", {CHECK: {"decode_ms": metric(2.0, 0.1, "lower", "absolute")}})
    found = {f.metric: f for f in bl.compare(CHECK, {"speedup": 2.0, "decode_ms": 9.0}, same, other)}
    assert found["decode_ms"].verdict == "regression"
    assert found["speedup"].verdict == "regression" and "a100" in found["speedup"].source  # a ratio the own file lacks


def test_update_writes_only_measured_figures_and_keeps_tuned_tolerances(tmp_path: Path) -> None:
    store = bl.Store(tmp_path)
    path = store.path("h100-80gb-hbm3", "llama-1b-shape")
    path.parent.mkdir(parents=True)
    kept_check = "performance::test_attention_speed[dynamic/eager/bf16]"
    path.write_text(
        json.dumps(
            {
                "schema": 1,
                "hardware": "h100-80gb-hbm3",
                "model": "llama-1b-shape",
                "environment": {"torch": "old"},
                "checks": {
                    CHECK: {
                        "speedup": {"value": 3.0, "tolerance": 0.2, "direction": "higher", "kind": "ratio"},
                        "ttft_ms": {"value": 30.0, "tolerance": 0.15, "direction": "lower", "kind": "absolute"},
                    },
                    kept_check: {"speedup": {"value": 0.8, "tolerance": 0.1, "direction": "higher", "kind": "ratio"}},
                },
            }
        )
    )
    store.update("h100-80gb-hbm3", "llama-1b-shape", {"torch": "new"}, CHECK, {"speedup": 4.123456789, "total_ms": 9.0, "note": "x"})
    doc = bl.load(path)
    assert doc.checks[CHECK]["speedup"] == bl.Metric(4.12346, 0.2, "higher", "ratio")  # tuned tolerance kept
    assert doc.checks[CHECK]["ttft_ms"].value == 30.0  # not measured this time: untouched
    assert "total_ms" not in doc.checks[CHECK]  # not a baselined figure
    assert doc.checks[kept_check]["speedup"].value == 0.8
    assert doc.environment == {"torch": "new"}
    assert sorted(p.name for p in path.parent.iterdir()) == ["llama-1b-shape.json"]  # no temporary or lock file left


def test_atomic_write_leaves_the_old_file_when_writing_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "x.json"
    path.write_text("old")

    def broken(src: str, dst: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(bl.os, "replace", broken)
    with pytest.raises(OSError):
        bl.write_atomic(path, "new")
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]  # no temporary file left behind


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("{not json", "not JSON"),
        ('{"schema": 2, "hardware": "h", "model": "m", "checks": {}}', "schema 2"),
        ('{"schema": 1, "hardware": "h", "model": "m"}', "'checks' must be"),
        ('{"schema": 1, "hardware": "h", "model": "m", "checks": {"c": {"speedup": {"value": "fast", "tolerance": 0.1, "direction": "higher", "kind": "ratio"}}}}', "'value' must be"),
        ('{"schema": 1, "hardware": "h", "model": "m", "checks": {"c": {"speedup": {"value": 1, "tolerance": -1, "direction": "higher", "kind": "ratio"}}}}', "'tolerance' must be"),
        ('{"schema": 1, "hardware": "h", "model": "m", "checks": {"c": {"speedup": {"value": 1, "tolerance": 0.1, "direction": "up", "kind": "ratio"}}}}', "'direction' must be"),
    ],
)
def test_a_malformed_file_is_one_error_naming_it(tmp_path: Path, text: str, says: str) -> None:
    path = tmp_path / "m.json"
    path.write_text(text)
    with pytest.raises(bl.BaselineError) as info:
        bl.load(path)
    assert str(info.value).startswith(str(path)) and says in str(info.value)


def test_other_hardware_stays_within_the_device_type(tmp_path: Path) -> None:
    store = bl.Store(tmp_path)
    for hardware in ("cpu-x86_64", "h100-80gb-hbm3"):
        store.update(hardware, "m", {}, CHECK, {"speedup": 2.0})
    assert store.other_hardware("a100-sxm4-80gb", "m", "cuda").hardware == "h100-80gb-hbm3"  # type: ignore[union-attr]
    assert store.other_hardware("cpu-aarch64", "m", "cpu").hardware == "cpu-x86_64"  # type: ignore[union-attr]
    assert store.other_hardware("cpu-aarch64", "other-model", "cpu") is None
    assert store.path("h", "org/name").name == "org--name.json"


def test_spread_is_robust_to_one_outlier_but_not_to_a_bimodal_device() -> None:
    assert tm.relative_spread([10.0, 10.1, 9.9, 10.0, 30.0]) < 0.05
    assert tm.relative_spread([10.0, 20.0, 10.0, 20.0, 10.0]) > 0.5
    assert tm.relative_spread([10.0]) == 0.0


def test_timed_call_splits_prefill_from_decode_and_checks_the_length() -> None:
    import time

    def generate(processors: list) -> torch.Tensor:
        ids = torch.zeros(1, 4, dtype=torch.long)
        time.sleep(0.03)  # prefill
        for step in range(5):
            if step:
                time.sleep(0.01)
            for p in processors:
                p(ids, torch.zeros(1, 8))
            ids = torch.cat([ids, ids[:, :1]], dim=1)
        return ids

    run = tm.timed_call(generate, torch.device("cpu"), prompt_len=4, new_tokens=5)
    assert 25 <= run.ttft_ms < 60 and 8 <= run.decode_ms < 20 and run.total_ms >= run.ttft_ms + 4 * 8
    with pytest.raises(tm.ShortOutputError, match="returned 5 new tokens instead of the forced 6"):
        tm.timed_call(generate, torch.device("cpu"), prompt_len=4, new_tokens=6)


def test_compile_time_is_the_first_warm_up_beyond_a_warm_run() -> None:
    runs = [tm.Run(1.0, 2.0, 100.0, 8) for _ in range(3)]
    timing = tm.Timing(runs, warmup_ms=[5100.0, 100.0])
    assert timing.compile_s == pytest.approx(5.0)
    assert timing.tokens_per_s == pytest.approx(80.0)


def test_roofline_of_the_7b_shape_matches_the_reference_floor() -> None:
    """Weights 13.0 GB (less the embedding table) + kv cache at 64 positions, over 2.99 TB/s: ~4.4 ms,
    the "≈ 4.5 ms" of the design notes; a 7.07 ms step is then ~63 % of the floor."""
    from pytest_llmopt.zoo import builtin_config

    config = builtin_config("llama-7b-shape")
    weights = 2 * (32 * (4 * 4096 * 4096 + 3 * 4096 * 11008 + 2 * 4096) + 4096 + 32000 * 4096)  # bf16, lm_head read, embedding not
    kv = tm.kv_bytes_per_token(config, 64, 2)
    assert kv == 2 * 32 * 4096 * 2 * 64
    floor_ms = (weights + kv) / 2.99e12 * 1000
    assert 4.3 < floor_ms < 4.6


@pytest.mark.parametrize("tied", [False, True])
def test_weight_bytes_count_the_embedding_table_only_when_the_head_reads_it(tied: bool) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=100, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=1, tie_word_embeddings=tied)
    model = LlamaForCausalLM(config)
    everything = sum(p.numel() * 4 for p in model.parameters())
    assert tm.weight_bytes_per_token(model) == (everything if tied else everything - 100 * 16 * 4)
    figures = tm.roofline(model, prompt_len=8, new_tokens=8, bandwidth=1e9, decode_ms=1.0)
    assert figures["roofline_pct"] == pytest.approx(100 * figures["roofline_floor_ms"])


def test_baseline_options_resolve_like_the_others(tmp_path: Path) -> None:
    from pytest_llmopt.settings import resolve

    ini = tmp_path / "proj" / "pytest.ini"
    ini.parent.mkdir()
    s = resolve({}, {}, {"llmopt_baselines": "perf/baselines"}, ini, tmp_path)
    assert s.baselines == ini.parent / "perf" / "baselines" and s.update_baselines is False  # ini: relative to the ini file
    s = resolve({}, {"LLMOPT_BASELINES": "mine", "LLMOPT_UPDATE_BASELINES": "1"}, {"llmopt_baselines": "x"}, ini, tmp_path)
    assert s.baselines == tmp_path / "mine" and s.update_baselines is True  # env beats ini, relative to cwd
    s = resolve({"llmopt_baselines": "cli", "llmopt_update_baselines": "true"}, {"LLMOPT_BASELINES": "mine"}, {}, None, tmp_path)
    assert s.baselines == tmp_path / "cli" and s.sources["baselines"] == "--llmopt-baselines"
    assert resolve({}, {}, {}, None, tmp_path).baselines is None  # the plugin then uses <rootdir>/baselines
    (tmp_path / "file").write_text("")
    with pytest.raises(pytest.UsageError, match=r"bad value --llmopt-baselines=file: not a directory: .*file"):
        resolve({"llmopt_baselines": "file"}, {}, {}, None, tmp_path)


def test_cudagraph_activity_counts_skips_with_reasons_and_restores_inductor() -> None:
    """The counters CUDA runs read (no CUDA here: skips and log lines are produced by hand)."""
    import logging

    from torch._dynamo.utils import counters
    from torch._inductor import cudagraph_trees

    run, record = cudagraph_trees.CUDAGraphNode.run, cudagraph_trees.CUDAGraphTreeManager.record_function
    with tm.cudagraph_activity() as seen:
        assert cudagraph_trees.CUDAGraphNode.run is not run  # counting wrappers in place
        counters["inductor"]["cudagraph_skips"] += 2
        logging.getLogger("torch._inductor.cudagraph_utils").warning("skipping cudagraphs due to mutated inputs (1 instances)")
    assert seen["skips"] == 2 and seen["recorded"] == 0 and seen["replayed"] == 0
    assert seen["reasons"] == ["skipping cudagraphs due to mutated inputs (1 instances)"]
    assert cudagraph_trees.CUDAGraphNode.run is run and cudagraph_trees.CUDAGraphTreeManager.record_function is record
