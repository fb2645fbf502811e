"""The compatibility report as a person reads it: a model x optimization matrix, then what failed, what
is unsupported and why, and the measured figures. Markdown (a PR comment, a CI step summary) and a
self-contained HTML page (colored matrix; click a cell to see its checks). ``write`` writes a report
file in any of the three formats (JSON from report.to_document)."""

from __future__ import annotations

import html as html_lib
import json
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..common.metrics import FIGURES
from ..common.outcomes import Status
from .report import ReportError, Result, to_document
from .speedview import html_section, markdown_section

SUITE_NAMES = {
    "static_cache": "static cache",
    "compile": "torch.compile",
    "speculative": "speculative decoding",
    "prompt_lookup": "prompt lookup",
    "attention": "attention",
    "quantization": "quantization",
    "continuous_batching": "continuous batching",
    "performance": "performance",
}
# Figures worth showing, in order; labels and formats come from the metric registry.
SHOWN = (
    "acceptance_rate", "decode_speedup", "speedup", "gpu_ms_per_token", "gpu_busy_pct", "tokens_per_s", "ttft_ms",
    "peak_memory_bytes", "footprint_bytes", "static_cache_bytes", "kv_cache_bytes", "footprint_ratio", "top1_agreement",
    "kl_mean", "latency_ratio", "recompiles", "max_delta_logit", "logits_max_delta", "near_ties", "ks_pvalue", "roofline_pct",
)

# The figure a cell of the matrix shows: the acceptance rate of the first of these drafts that ran.
HEADLINE_DRAFTS = (
    ("test_user_assistant", "your draft"),
    ("test_early_exit_self_speculation", "early-exit draft"),
    ("test_greedy_matches_plain_greedy", "lookup draft"),
)
MARK = {"pass": "✅", "fail": "❌", "unsupported": "⚪", "skipped": "⏭", "known": "🐞", "empty": "·"}
# The HTML page says it in words: the cell's color carries the state, and no emoji font is needed.
WORD = {"pass": "pass", "fail": "FAIL", "unsupported": "unsupported", "skipped": "not run", "known": "known issue", "empty": "·"}
STATUS_WORD = {
    Status.FAILED: "failed",
    Status.KNOWN_ISSUE_PASSED: "passed (known issue not hit)",
    Status.PASSED: "passed",
    Status.KNOWN_ISSUE: "known issue",
    Status.INCONCLUSIVE: "inconclusive",
    Status.NOT_EXERCISED: "not exercised",
    Status.UNSUPPORTED: "unsupported",
    Status.NOT_RUN: "not run",
}


@dataclass
class Cell:
    """All checks of one model under one optimization."""

    results: list[Result] = field(default_factory=list)

    def count(self, *statuses: Status) -> int:
        return sum(1 for r in self.results if r.status in statuses)

    @property
    def state(self) -> str:
        if not self.results:
            return "empty"
        if self.count(Status.FAILED):
            return "fail"
        if self.count(Status.PASSED, Status.KNOWN_ISSUE_PASSED):
            return "pass"
        if self.count(Status.KNOWN_ISSUE):
            return "known"
        return "unsupported" if self.count(Status.UNSUPPORTED) else "skipped"

    def text(self, marks: dict[str, str] = MARK) -> str:
        """'✅ 9/9 · 2 unsupported · 3 not run' - counts over the checks that ran."""
        ran = self.count(Status.PASSED, Status.FAILED, Status.KNOWN_ISSUE_PASSED)
        if ran:
            parts = [f"{marks[self.state]} {self.count(Status.PASSED, Status.KNOWN_ISSUE_PASSED)}/{ran}"]
        else:  # nothing ran: the counts below say it; words would only repeat them
            parts = [] if marks is WORD else [marks[self.state]]
        for status, word in ((Status.KNOWN_ISSUE, "known issue"), (Status.UNSUPPORTED, "unsupported"), (Status.NOT_RUN, "not run"), (Status.INCONCLUSIVE, "inconclusive"), (Status.NOT_EXERCISED, "not exercised")):
            n = self.count(status)
            if n:
                parts.append(f"{n} {word}")
        headline = self.headline()
        if headline:
            parts.append(headline)
        return " · ".join(parts) or marks[self.state]

    def headline(self) -> str:
        """The one figure that says most about this optimization."""
        # Acceptance of a realistic draft (not the self/contrarian controls, which are 100 % / 0 % by design).
        for check, label in HEADLINE_DRAFTS:
            values = [v for r in self.results if r.check == check and isinstance(v := r.metrics.get("acceptance_rate"), (int, float))]
            if values:
                return f"{label} {max(values):.0%} accepted"
        speedups = [r.metrics["speedup"] for r in self.results if isinstance(r.metrics.get("speedup"), (int, float))]
        if speedups:
            return f"speedup {max(speedups):.2f}x"
        recompiles = [r.metrics["recompiles"] for r in self.results if isinstance(r.metrics.get("recompiles"), int)]
        if recompiles:
            return f"{sum(recompiles)} recompiles"
        return ""


def matrix(results: Iterable[Result]) -> tuple[list[str], list[str], dict[tuple[str, str], Cell]]:
    cells: dict[tuple[str, str], Cell] = defaultdict(Cell)
    models: list[str] = []
    suites: set[str] = set()
    for r in results:
        if r.model not in models:
            models.append(r.model)
        suites.add(r.suite)
        cells[(r.model, r.suite)].results.append(r)
    ordered = [s for s in SUITE_NAMES if s in suites] + sorted(suites - set(SUITE_NAMES))
    return models, ordered, cells


def environment_line(env: dict[str, Any]) -> str:
    v = env.get("versions", {})
    where = env.get("gpu") or env.get("device", "?")
    parts = [
        where,
        env.get("dtype", "?"),
        f"torch {v.get('torch')}",
        f"transformers {v.get('transformers')}",
    ]
    for name in ("bitsandbytes", "flash-attn"):
        if v.get(name):
            parts.append(f"{name} {v[name]}")
    parts.append(f"seed {env.get('seed')}")
    if env.get("created"):
        parts.append(env["created"])
    return " · ".join(str(p) for p in parts)


def _figures(result: Result) -> list[tuple[str, str]]:
    out = []
    intervals = result.metrics.get("intervals") if isinstance(result.metrics.get("intervals"), dict) else {}
    for key in SHOWN:
        value = result.metrics.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            figure = FIGURES[key]
            shown = figure.fmt(value)
            found = intervals.get(key) if intervals else None
            if isinstance(found, dict) and isinstance(found.get("low"), (int, float)) and isinstance(found.get("high"), (int, float)):
                shown += f" [{figure.fmt(found['low'])}, {figure.fmt(found['high'])}]"
            out.append((figure.label, shown))
    return out


def _md(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def markdown(results: list[Result], envs: list[dict[str, Any]], limit: int = 150) -> str:
    models, suites, cells = matrix(results)
    lines = ["## pytest-llmopt compatibility report", ""]
    for env in envs:
        lines.append(f"_{environment_line(env)}_  ")
    counts = {status: sum(1 for r in results if r.status == status) for status in STATUS_WORD}
    lines += ["", " · ".join(f"{n} {STATUS_WORD[s]}" for s, n in counts.items() if n) or "no results", ""]
    lines.append("| model | " + " | ".join(SUITE_NAMES.get(s, s) for s in suites) + " |")
    lines.append("|---|" + "---|" * len(suites))
    for model in models:
        lines.append(f"| **{_md(model)}** | " + " | ".join(_md(cells[(model, s)].text()) for s in suites) + " |")
    lines += [
        "",
        "✅ every check that ran passed (passed/ran) · ❌ a check failed · ⚪ unsupported by the model or the stack · "
        "⏭ not run on this machine (needs CUDA, flash-attn, ...) · 🐞 known upstream issue",
        "",
    ]
    lines += markdown_section(results)
    failed = [r for r in results if r.status == Status.FAILED]
    if failed:
        lines += [f"### ❌ Failures ({len(failed)})", "", "| model | check | variant | what broke |", "|---|---|---|---|"]
        lines += [f"| {_md(r.model)} | {_md(r.check)} | `{_md(r.variant)}` | {_md(r.reason or '')} |" for r in failed[:limit]]
        lines.append("")
    for status, title in ((Status.UNSUPPORTED, "⚪ Unsupported"), (Status.KNOWN_ISSUE, "🐞 Known upstream issues"), (Status.NOT_RUN, "⏭ Not run here"), (Status.NOT_EXERCISED, "⏭ Not exercised (the path never did its work)")):
        chosen = [r for r in results if r.status == status]
        if not chosen:
            continue
        reasons: dict[str, list[Result]] = defaultdict(list)
        for r in chosen:
            reasons[r.reason or "no reason given"].append(r)
        lines += [f"<details><summary>{title} ({len(chosen)})</summary>", "", "| why | checks |", "|---|---|"]
        for reason, rs in reasons.items():
            where = ", ".join(sorted({f"{r.model}: {r.variant}" for r in rs}))
            lines.append(f"| {_md(reason)} | {_md(where)} |")
        lines += ["", "</details>", ""]
    figured = [r for r in results if _figures(r)]
    if figured:
        lines += [f"<details><summary>Figures ({len(figured)} checks)</summary>", "", "| model | check | variant | figures |", "|---|---|---|---|"]
        for r in figured[:limit]:
            shown = ", ".join(f"{label} {value}" for label, value in _figures(r))
            lines.append(f"| {_md(r.model)} | {_md(r.check)}{' (' + _md(r.extra) + ')' if r.extra else ''} | `{_md(r.variant)}` | {_md(shown)} |")
        if len(figured) > limit:
            lines.append(f"| … | {len(figured) - limit} more in the JSON report | | |")
        lines += ["", "</details>", ""]
    return "\n".join(lines)


CSS = """
body{font:14px/1.45 system-ui,sans-serif;margin:24px;color:#1f2328}
h1{font-size:20px;margin:0 0 4px}.env{color:#57606a;margin:2px 0}
table{border-collapse:collapse;margin:12px 0}th,td{border:1px solid #d0d7de;padding:6px 10px;text-align:left;vertical-align:top}
th{background:#f6f8fa}.matrix td.cell{cursor:pointer;min-width:130px}
.pass{background:#dafbe1}.fail{background:#ffd7d5}.unsupported{background:#eaeef2}.skipped{background:#fff8c5}
.known{background:#fbefff}.empty{background:#fff}td.cell.selected{outline:3px solid #0969da}
.badge{display:inline-block;padding:0 6px;border-radius:10px;font-size:12px}
.b-passed,.b-known-issue-passed{background:#1a7f37;color:#fff}.b-failed{background:#cf222e;color:#fff}
.b-unsupported{background:#6e7781;color:#fff}.b-skipped,.b-inconclusive,.b-not-exercised{background:#9a6700;color:#fff}.b-known-issue{background:#8250df;color:#fff}
#details tr.hidden{display:none}.reason{color:#57606a;max-width:620px}code{font-size:12px}
"""

SCRIPT = """
document.querySelectorAll('td.cell').forEach(function(cell){
  cell.addEventListener('click',function(){
    var on=!cell.classList.contains('selected');
    document.querySelectorAll('td.cell').forEach(function(c){c.classList.remove('selected')});
    if(on){cell.classList.add('selected')}
    var shown=0;
    document.querySelectorAll('#details tbody tr').forEach(function(row){
      var hit=!on||(row.dataset.model===cell.dataset.model&&row.dataset.suite===cell.dataset.suite);
      row.classList.toggle('hidden',!hit); if(hit){shown++}
    });
    document.getElementById('shown').textContent=on?(shown+' checks of '+cell.dataset.model+' / '+cell.dataset.suiteName):'all checks';
  });
});
"""


def html(results: list[Result], envs: list[dict[str, Any]]) -> str:
    e = html_lib.escape
    models, suites, cells = matrix(results)
    out = ["<!doctype html><html lang='en'><head><meta charset='utf-8'><title>pytest-llmopt compatibility report</title>", f"<style>{CSS}</style></head><body>"]
    out.append("<h1>pytest-llmopt compatibility report</h1>")
    for env in envs:
        out.append(f"<p class='env'>{e(environment_line(env))}</p>")
    out.append("<table class='matrix' id='matrix'><thead><tr><th>model</th>" + "".join(f"<th>{e(SUITE_NAMES.get(s, s))}</th>" for s in suites) + "</tr></thead><tbody>")
    for model in models:
        row = [f"<tr><th>{e(model)}</th>"]
        for suite in suites:
            cell = cells[(model, suite)]
            row.append(
                f"<td class='cell {cell.state}' data-model='{e(model)}' data-suite='{e(suite)}' data-suite-name='{e(SUITE_NAMES.get(suite, suite))}' "
                f"title='click to list these checks'>{e(cell.text(WORD))}</td>"
            )
        out.append("".join(row) + "</tr>")
    out.append("</tbody></table>")
    out.append(
        "<p class='env'>green: every check that ran passed · red: a check failed · grey: unsupported by the model or the stack · "
        "yellow: not run on this machine · purple: known upstream issue. Click a cell to list its checks.</p>"
    )
    out.append(html_section(results))
    out.append("<h2>Checks <small id='shown'>all checks</small></h2>")
    out.append("<table id='details'><thead><tr><th>model</th><th>optimization</th><th>check</th><th>variant</th><th>status</th><th>figures / reason</th></tr></thead><tbody>")
    for r in results:
        figures = ", ".join(f"{label} {value}" for label, value in _figures(r))
        detail = " — ".join(x for x in (figures, r.reason or "") if x)
        check = r.check + (f" ({r.extra})" if r.extra else "")
        out.append(
            f"<tr data-model='{e(r.model)}' data-suite='{e(r.suite)}' data-status='{e(r.status.value)}'><td>{e(r.model)}</td><td>{e(SUITE_NAMES.get(r.suite, r.suite))}</td>"
            f"<td>{e(check)}</td><td><code>{e(r.variant)}</code></td><td><span class='badge b-{e(r.status.value)}'>{e(STATUS_WORD[r.status])}</span></td>"
            f"<td class='reason'>{e(detail)}</td></tr>"
        )
    out.append(f"</tbody></table><script>{SCRIPT}</script></body></html>")
    return "\n".join(out)


def write(path: Path, results: list[Result], envs: list[dict[str, Any]]) -> None:
    """Write ``results`` as JSON, Markdown or HTML, by the file's extension."""
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = path.suffix.lower()
    if suffix == ".json":
        env = envs[0] if len(envs) == 1 else {"merged": envs}
        text = json.dumps(to_document(results, env), indent=1, sort_keys=False) + "\n"
    elif suffix == ".md":
        text = markdown(results, envs)
    elif suffix == ".html":
        text = html(results, envs)
    else:
        raise ReportError(f"{path}: the extension must be .json, .md or .html")
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
