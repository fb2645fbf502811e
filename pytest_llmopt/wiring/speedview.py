"""The speed figures drawn: per model, each variant's paired speedup over the plain path with its 95 % interval, the
baseline's band where one was compared, the verdict as a color, and how busy the GPU was (what bounds the path).
An SVG (self-contained, no script) for the HTML report and a table for Markdown; both read the report's records
only (the figures, intervals and verdicts the speed checks recorded)."""

from __future__ import annotations

import html
import math
from dataclasses import dataclass

from ..common import metrics as mx
from .report import Result

FIGURE = "decode_speedup"
COLORS = {"regression": "#cf222e", "ok": "#1a7f37", "improvement": "#0969da", "inconclusive": "#9a6700", "": "#57606a"}


@dataclass(frozen=True)
class Row:
    label: str
    value: float
    low: float
    high: float
    verdict: str  # "" when not compared
    text: str
    baseline: tuple[float, float, float] | None  # value, low, high
    busy: float | None  # percent
    band: str


def rows(results: list[Result]) -> dict[str, list[Row]]:
    """Speed rows per model, in the report's order."""
    out: dict[str, list[Row]] = {}
    for r in results:
        value = r.metrics.get(FIGURE)
        interval = (r.metrics.get("intervals") or {}).get(FIGURE) if isinstance(r.metrics.get("intervals"), dict) else None
        if r.suite != "performance" or not isinstance(value, (int, float)) or not isinstance(interval, dict):
            continue
        judged = (r.metrics.get("verdicts") or {}).get(FIGURE) if isinstance(r.metrics.get("verdicts"), dict) else None
        judged = judged if isinstance(judged, dict) else {}
        base = judged.get("baseline")
        band = judged.get("band")
        baseline = (float(base), float(band[0]), float(band[1])) if isinstance(base, (int, float)) and isinstance(band, list) and len(band) == 2 else None
        busy = r.metrics.get("gpu_busy_pct")
        out.setdefault(r.model, []).append(
            Row(
                f"{r.check.removeprefix('test_').removesuffix('_speed')} {r.variant}",
                float(value),
                float(interval.get("low", value)),
                float(interval.get("high", value)),
                str(judged.get("verdict", "")) if judged.get("verdict") in COLORS else "",
                str(judged.get("text", "not compared with a baseline")),
                baseline,
                float(busy) if isinstance(busy, (int, float)) else None,
                str(interval.get("band", "")),
            )
        )
    return out


def svg(model: str, found: list[Row]) -> str:
    """A forest plot on a log axis: band (baseline), whisker (interval), dot (estimate, colored by verdict), GPU busy bar."""
    label_w, plot_w, busy_w, row_h, top = 260, 420, 110, 26, 30
    values = [x for row in found for x in (row.low, row.high, *(row.baseline[1:] if row.baseline else ()))] + [1.0]
    lo, hi = math.log(min(values) / 1.15), math.log(max(values) * 1.15)

    def x(v: float) -> float:
        return label_w + (math.log(v) - lo) / (hi - lo) * plot_w

    height = top + row_h * len(found) + 28
    e = html.escape
    parts = [
        f"<svg xmlns='http://www.w3.org/2000/svg' class='speed' role='img' width='{label_w + plot_w + busy_w + 20}' height='{height}' "
        f"aria-label='speedups of {e(model)} over the plain path'>",
        "<text x='8' y='16' font-size='12' fill='#57606a'>decode speedup over the plain path (log scale), 95 % interval; blue band: baseline</text>",
        f"<text x='{label_w + plot_w + 12}' y='16' font-size='12' fill='#57606a'>GPU busy</text>",
        f"<line x1='{x(1.0):.1f}' y1='{top - 6}' x2='{x(1.0):.1f}' y2='{height - 24}' stroke='#8c959f' stroke-dasharray='3,3'/>",
        f"<text x='{x(1.0):.1f}' y='{height - 8}' font-size='11' text-anchor='middle' fill='#57606a'>1x</text>",
    ]
    for i, row in enumerate(found):
        y = top + i * row_h + row_h / 2
        color = COLORS[row.verdict]
        title = f"{row.label}: {mx.FIGURES[FIGURE].fmt(row.value)} [{row.low:.2f}, {row.high:.2f}], {row.band or 'band ?'}; {row.text}"
        parts.append(f"<g class='row' data-verdict='{e(row.verdict or 'none')}'><title>{e(title)}</title>")
        parts.append(f"<text x='{label_w - 8}' y='{y + 4:.1f}' font-size='12' text-anchor='end'>{e(row.label)}</text>")
        if row.baseline:
            b, b_lo, b_hi = row.baseline
            parts.append(f"<rect class='baseline' x='{x(b_lo):.1f}' y='{y - 9:.1f}' width='{max(1.0, x(b_hi) - x(b_lo)):.1f}' height='18' fill='#ddf4ff'/>")
            parts.append(f"<line x1='{x(b):.1f}' y1='{y - 9:.1f}' x2='{x(b):.1f}' y2='{y + 9:.1f}' stroke='#54aeff'/>")
        parts.append(f"<line class='interval' x1='{x(row.low):.1f}' y1='{y:.1f}' x2='{x(row.high):.1f}' y2='{y:.1f}' stroke='{color}' stroke-width='2'/>")
        parts.append(f"<circle class='estimate' cx='{x(row.value):.1f}' cy='{y:.1f}' r='4.5' fill='{color}'/>")
        parts.append(f"<text x='{x(row.high) + 6:.1f}' y='{y + 4:.1f}' font-size='11' fill='{color}'>{row.value:.2f}x</text>")
        bar_x = label_w + plot_w + 12
        if row.busy is not None:
            share = max(0.0, min(100.0, row.busy))
            parts.append(f"<rect x='{bar_x}' y='{y - 6:.1f}' width='80' height='12' fill='#eaeef2'/>")
            parts.append(f"<rect class='busy' x='{bar_x}' y='{y - 6:.1f}' width='{0.8 * share:.1f}' height='12' fill='#8250df'/>")
            parts.append(f"<text x='{bar_x + 84}' y='{y + 4:.1f}' font-size='11'>{share:.0f}%</text>")
        else:
            parts.append(f"<text x='{bar_x}' y='{y + 4:.1f}' font-size='11' fill='#57606a'>n/a</text>")
        parts.append("</g>")
    parts.append("</svg>")
    return "".join(parts)


def html_section(results: list[Result]) -> str:
    found = rows(results)
    if not found:
        return ""
    out = ["<h2>Speed</h2>", "<p class='env'>green: ok against the baseline · red: regression · amber: inconclusive · blue: improvement · grey: no baseline. Hover a row for its verdict.</p>"]
    for model, model_rows in found.items():
        out.append(f"<figure><figcaption><b>{html.escape(model)}</b></figcaption>{svg(model, model_rows)}</figure>")
    return "\n".join(out)


def markdown_section(results: list[Result]) -> list[str]:
    found = rows(results)
    if not found:
        return []
    lines = ["### Speed", "", "| model | check | decode speedup [95 %] | baseline band | verdict | GPU busy |", "|---|---|---|---|---|---|"]
    for model, model_rows in found.items():
        for row in model_rows:
            base = f"{row.baseline[1]:.2f}–{row.baseline[2]:.2f}x" if row.baseline else "—"
            busy = f"{row.busy:.0f}%" if row.busy is not None else "n/a"
            text = row.text.replace("|", "\\|")
            lines.append(f"| {model} | {row.label} | {row.value:.2f}x [{row.low:.2f}, {row.high:.2f}] | {base} | {text} | {busy} |")
    return [*lines, ""]
