"""The HTML report in a real browser (headless Chromium): the matrix shows the right colors and counts,
and clicking a cell lists exactly that cell's checks."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from pytest_llmopt.wiring.render import write
from pytest_llmopt.wiring.report import Result

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
playwright = pytest.importorskip("playwright.sync_api", reason="pip install playwright (the test extra has it)")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="needs Chromium: apt-get install chromium (.ci/run installs it)")

RESULTS = [
    Result("static_cache", "test_matches_dynamic", "tiny-llama", "static/sdpa/fp32", "passed", metrics={"max_delta_logit": 2e-5}),
    Result("static_cache", "test_reused_cache", "tiny-llama", "static-object/sdpa/fp32", "passed"),
    Result("speculative", "test_early_exit_self_speculation", "tiny-llama", "dynamic/sdpa/fp32", "passed", metrics={"acceptance_rate": 0.25}),
    Result("speculative", "test_contrarian", "tiny-llama", "dynamic/sdpa/fp32", "failed", reason="generations differ beyond a near-tie"),
    Result("attention", "test_logits_match_eager", "tiny-llama", "dynamic/sdpa:flash/fp32", "skipped", reason="needs CUDA: run on a GPU runner"),
    Result("static_cache", "test_matches_dynamic", "tiny-gptneo", "static/eager/fp32", "unsupported", reason="unsupported by the model: GPTNeoForCausalLM does not declare _can_compile_fullgraph"),
    Result("speculative", "test_early_exit_self_speculation", "tiny-gptneo", "dynamic/eager/fp32", "passed", metrics={"acceptance_rate": 0.5}),
]
ENV = {"device": "cpu", "dtype": "float32", "versions": {"torch": "2.13.0", "transformers": "5.24.0"}, "seed": 0}
COLORS = {"pass": "rgb(218, 251, 225)", "fail": "rgb(255, 215, 213)", "unsupported": "rgb(234, 238, 242)", "skipped": "rgb(255, 248, 197)"}


@pytest.fixture
def page(tmp_path: Path):
    path = tmp_path / "compat.html"
    write(path, RESULTS, [ENV])
    with playwright.sync_playwright() as pw:
        browser = pw.chromium.launch(
            executable_path=CHROMIUM,
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update", "--no-first-run"],
        )
        tab = browser.new_page()
        tab.goto(path.as_uri())
        yield tab
        tab.screenshot(path=str(tmp_path / "compat.png"), full_page=True)
        browser.close()


def _cell(page, model: str, suite: str):
    return page.locator(f"td.cell[data-model='{model}'][data-suite='{suite}']")


def test_matrix_shows_each_model_and_optimization_with_its_color(page) -> None:
    assert page.title() == "pytest-llmopt compatibility report"
    headers = page.locator("#matrix thead th").all_inner_texts()
    assert headers == ["model", "static cache", "speculative decoding", "attention"]
    assert page.locator("#matrix tbody th").all_inner_texts() == ["tiny-llama", "tiny-gptneo"]
    expected = {
        ("tiny-llama", "static_cache"): ("pass", "pass 2/2"),
        ("tiny-llama", "speculative"): ("fail", "FAIL 1/2 · early-exit draft 25% accepted"),
        ("tiny-llama", "attention"): ("skipped", "1 not run"),
        ("tiny-gptneo", "static_cache"): ("unsupported", "1 unsupported"),
        ("tiny-gptneo", "speculative"): ("pass", "pass 1/1 · early-exit draft 50% accepted"),
    }
    for (model, suite), (state, text) in expected.items():
        cell = _cell(page, model, suite)
        assert cell.inner_text() == text
        assert cell.evaluate("e => getComputedStyle(e).backgroundColor") == COLORS[state], (model, suite)
    assert _cell(page, "tiny-gptneo", "attention").inner_text() == "·"


def test_clicking_a_cell_lists_its_checks_and_clicking_again_lists_all(page) -> None:
    visible = page.locator("#details tbody tr:visible")
    assert visible.count() == len(RESULTS)
    _cell(page, "tiny-llama", "speculative").click()
    assert page.locator("#shown").inner_text() == "2 checks of tiny-llama / speculative decoding"
    rows = visible.all_inner_texts()
    assert len(rows) == 2 and any("generations differ beyond a near-tie" in row and "failed" in row for row in rows)
    _cell(page, "tiny-gptneo", "static_cache").click()
    assert "does not declare _can_compile_fullgraph" in visible.all_inner_texts()[0]
    _cell(page, "tiny-gptneo", "static_cache").click()
    assert visible.count() == len(RESULTS) and page.locator("#shown").inner_text() == "all checks"


def _speed(variant: str, value: float, low: float, high: float, verdict: str | None, busy: float | None) -> Result:
    metrics: dict = {"decode_speedup": value, "intervals": {"decode_speedup": {"low": low, "high": high, "band": "mixed"}}}
    if verdict:
        metrics["verdicts"] = {"decode_speedup": {"verdict": verdict, "text": f"{verdict}: example", "baseline": 4.0, "band": [3.6, 4.4]}}
    if busy is not None:
        metrics["gpu_busy_pct"] = busy
    return Result("performance", "test_generate_speed", "llama-1b-shape", variant, "passed" if verdict != "regression" else "failed", metrics=metrics)


def test_the_speed_chart_draws_intervals_baseline_bands_verdicts_and_gpu_busy(tmp_path: Path) -> None:
    results = [
        _speed("static+compile/sdpa/bf16", 4.1, 3.9, 4.3, "ok", 46.0),
        _speed("static/sdpa/bf16", 0.7, 0.6, 0.8, "regression", 12.0),
        _speed("dynamic/eager/bf16", 0.9, 0.5, 1.6, None, None),
    ]
    path = tmp_path / "speed.html"
    write(path, results, [ENV])
    with playwright.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu", "--no-first-run"])
        tab = browser.new_page()
        tab.goto(path.as_uri())
        chart = tab.locator("svg.speed")
        assert chart.count() == 1 and chart.get_attribute("aria-label") == "speedups of llama-1b-shape over the plain path"
        rows = chart.locator("g.row")
        assert rows.count() == 3
        assert [rows.nth(i).get_attribute("data-verdict") for i in range(3)] == ["ok", "regression", "none"]
        dots = [rows.nth(i).locator("circle.estimate").evaluate("e => getComputedStyle(e).fill") for i in range(3)]
        assert dots == ["rgb(26, 127, 55)", "rgb(207, 34, 46)", "rgb(87, 96, 106)"]
        assert rows.nth(0).locator("rect.baseline").count() == 1 and rows.nth(2).locator("rect.baseline").count() == 0
        # the interval is drawn to scale: the compiled row's whisker is narrower than the noisy eager one's
        widths = [rows.nth(i).locator("line.interval").bounding_box()["width"] for i in (0, 2)]  # type: ignore[index]
        assert widths[0] < widths[1]
        busy = [rows.nth(i).locator("rect.busy").bounding_box()["width"] for i in (0, 1)]  # type: ignore[index]
        assert busy[0] == pytest.approx(46 * 0.8, abs=1) and busy[1] == pytest.approx(12 * 0.8, abs=1)
        assert "regression: example" in (rows.nth(1).locator("title").text_content() or "")
        tab.screenshot(path=str(tmp_path / "speed.png"), full_page=True)
        browser.close()
