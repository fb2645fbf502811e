"""``llmopt``: the upgrade gate and report merging, on JSON reports written with --llmopt-report.

  llmopt compare BASE.json CANDIDATE.json   diff of every check and figure, regressions first (figures judged
                                            by the metric registry: timed ones by their intervals, fixed ones by
                                            their tolerance); exit 1 on any regression, 0 otherwise
  llmopt report RUN.json [RUN.json ...] -o compat.md|.html|.json   one matrix from several runs
  llmopt run [PYTEST ARGS ...]              the installed suites: pytest --pyargs pytest_llmopt.suites ARGS

Exit status 2 means the command itself could not run (a missing or malformed report, a bad option).
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeGuard

from .common import metrics as mx
from .common import stats
from .common.outcomes import GOOD, Status
from .wiring.render import write
from .wiring.report import ReportError, Result, load


@dataclass
class Change:
    kind: str  # "regression" | "improvement" | "change"
    key: str
    what: str  # "status" or a figure name
    base: str
    candidate: str
    note: str

    @property
    def order(self) -> int:
        return {"regression": 0, "improvement": 1, "change": 2}[self.kind]


def compare(base: list[Result], candidate: list[Result]) -> tuple[list[Change], int]:
    """Every difference between two runs, classified; and how many checks did not change at all."""
    old = {r.key: r for r in base}
    new = {r.key: r for r in candidate}
    changes: list[Change] = []
    unchanged = 0
    for key in sorted(old.keys() | new.keys()):
        a, b = old.get(key), new.get(key)
        if a is None:
            changes.append(Change("change", key, "status", "absent", _status(b), "new check"))
            continue
        if b is None:
            kind = "regression" if a.status in GOOD else "change"
            changes.append(Change(kind, key, "status", _status(a), "absent", "check missing from the candidate run"))
            continue
        found = _status_change(key, a, b) + _figure_changes(key, a, b)
        changes += found
        unchanged += not found
    changes.sort(key=lambda c: (c.order, c.key, c.what))
    return changes, unchanged


def _status(r: Result | None) -> str:
    if r is None:
        return "absent"
    return r.status.value + (f": {r.reason}" if r.reason and r.status != Status.PASSED else "")


def _status_change(key: str, a: Result, b: Result) -> list[Change]:
    if a.status == b.status:
        return []
    if Status.NOT_RUN in (a.status, b.status):
        return [Change("change", key, "status", _status(a), _status(b), "not run in one of the runs: not comparable")]
    if b.status == Status.FAILED or (a.status in GOOD and b.status not in GOOD):
        note = {Status.FAILED: "new failure", Status.UNSUPPORTED: "support lost", Status.KNOWN_ISSUE: "now a known issue", Status.NOT_EXERCISED: "no longer exercised"}.get(b.status, "worse")
        return [Change("regression", key, "status", _status(a), _status(b), note)]
    if b.status in GOOD:
        return [Change("improvement", key, "status", _status(a), _status(b), "now passes")]
    return [Change("change", key, "status", _status(a), _status(b), "")]


def _figure_changes(key: str, a: Result, b: Result) -> list[Change]:
    """Every judged figure of the registry (metrics.py) that moved: fixed figures by their tolerance, timed ones by
    their intervals (stats.compare_sessions: each run one session, the between-session spread its band's default;
    a figure a report carries without an interval is taken as exact, so only that spread judges it)."""
    out = []
    for name, figure in mx.FIGURES.items():
        x, y = a.metrics.get(name), b.metrics.get(name)
        if not figure.judged or not _number(x) or not _number(y) or x == y:
            continue
        if figure.kind == "timed":
            out += _timed_change(key, name, a, b) if x > 0 and y > 0 else []
            continue
        worse, moved, allowed = mx.fixed_worse(name, x, y)
        delta = f"{y - x:+.4g}" if figure.absolute or not x else f"{(y - x) / x:+.1%}"
        shown = f"{allowed:g}" if figure.absolute or not x else f"{allowed:.0%}"
        if worse:
            out.append(Change("regression", key, name, figure.fmt(x), figure.fmt(y), f"{delta} (allowed {shown})"))
        elif moved > allowed + 1e-12:
            out.append(Change("improvement", key, name, figure.fmt(x), figure.fmt(y), delta))
    return out


def _timed_change(key: str, name: str, a: Result, b: Result) -> list[Change]:
    figure = mx.FIGURES[name]
    ia, ib = _interval(a, name), _interval(b, name)
    band = figure.band or ib[2] or ia[2] or "mixed"
    verdict = stats.compare_sessions(ia[:2], ib[:2], band if band in stats.BAND_CLASSES else "mixed", figure.direction)
    shown_a, shown_b = _with_interval(a, name), _with_interval(b, name)
    if verdict.kind == "regression":
        return [Change("regression", key, name, shown_a, shown_b, verdict.text + f" (band {band})")]
    if verdict.kind == "improvement":
        return [Change("improvement", key, name, shown_a, shown_b, verdict.text + f" (band {band})")]
    if verdict.kind == "inconclusive":
        return [Change("change", key, name, shown_a, shown_b, verdict.text + f" (band {band})")]
    return []


def _interval(r: Result, name: str) -> tuple[float, float, str | None]:
    """(ln value, its standard error, band) of a figure: from the report's interval, else exact."""
    found = r.metrics.get("intervals", {}).get(name) if isinstance(r.metrics.get("intervals"), dict) else None
    if isinstance(found, dict) and _number(found.get("log")) and _number(found.get("se")):
        return float(found["log"]), float(found["se"]), found.get("band")
    return math.log(float(r.metrics[name])), 0.0, None


def _with_interval(r: Result, name: str) -> str:
    figure = mx.FIGURES[name]
    found = r.metrics.get("intervals", {}).get(name) if isinstance(r.metrics.get("intervals"), dict) else None
    text = figure.fmt(float(r.metrics[name]))
    if isinstance(found, dict) and _number(found.get("low")) and _number(found.get("high")):
        text += f" [{figure.fmt(found['low'])}, {figure.fmt(found['high'])}]"
    return text


def _number(value: Any) -> TypeGuard[float]:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _versions(env: dict[str, Any]) -> str:
    v = env.get("versions", {}) if isinstance(env, dict) else {}
    parts = [f"transformers {v.get('transformers')}", f"torch {v.get('torch')}"]
    parts += [f"{n} {v[n]}" for n in ("bitsandbytes", "flash-attn") if v.get(n)]
    return ", ".join(parts) + (f", {env.get('gpu') or env.get('device')}" if env.get("device") else "")


def render_changes(changes: list[Change], unchanged: int, base_env: dict[str, Any], cand_env: dict[str, Any]) -> str:
    counts = {kind: sum(1 for c in changes if c.kind == kind) for kind in ("regression", "improvement", "change")}
    verdict = "FAIL" if counts["regression"] else "PASS"
    lines = [
        f"## llmopt compare: {verdict}",
        "",
        f"base: {_versions(base_env)}  ",
        f"candidate: {_versions(cand_env)}",
        "",
        f"{counts['regression']} regression(s), {counts['improvement']} improvement(s), {counts['change']} other change(s), {unchanged} check(s) unchanged",
        "",
    ]
    if changes:
        lines += ["| | check | what | base | candidate | change |", "|---|---|---|---|---|---|"]
        mark = {"regression": "❌ regression", "improvement": "✅ improvement", "change": "· change"}
        for c in changes:
            cells = [mark[c.kind], c.key, c.what, c.base, c.candidate, c.note]
            lines.append("| " + " | ".join(str(x).replace("|", "\\|").replace("\n", " ")[:300] for x in cells) + " |")
    return "\n".join(lines) + "\n"


SUITES_PACKAGE = "pytest_llmopt.suites"


def run(pytest_args: Sequence[str]) -> int:
    """``llmopt run ARGS``: pytest on the suites installed with the package, from any directory
    (``python_files`` pinned, so that a project's own ini cannot hide them)."""
    import pytest

    return int(pytest.main(["--pyargs", SUITES_PACKAGE, "-o", "python_files=test_*.py", *pytest_args]))


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    if args_list[:1] == ["run"]:  # everything after `run` belongs to pytest, unparsed
        return run(args_list[1:])
    parser = argparse.ArgumentParser(prog="llmopt", description="pytest-llmopt reports: the upgrade gate and merged compatibility reports")
    sub = parser.add_subparsers(dest="command", required=True)
    cmp_parser = sub.add_parser("compare", help="diff two JSON reports; exit 1 on a regression")
    cmp_parser.add_argument("base", type=Path, help="report of the current stack")
    cmp_parser.add_argument("candidate", type=Path, help="report of the candidate stack")
    cmp_parser.add_argument("-o", "--output", type=Path, help="also write the diff (Markdown) to this file, e.g. $GITHUB_STEP_SUMMARY")
    sub.add_parser("run", help="run the installed suites: pytest --pyargs pytest_llmopt.suites [PYTEST ARGS]", add_help=False)
    rep_parser = sub.add_parser("report", help="merge JSON reports into one matrix")
    rep_parser.add_argument("runs", type=Path, nargs="+", help="JSON reports written with --llmopt-report")
    rep_parser.add_argument("-o", "--output", type=Path, required=True, help="compat.md, compat.html or compat.json")
    args = parser.parse_args(args_list)
    try:
        if args.command == "compare":
            return _compare(args)
        return _report(args)
    except ReportError as exc:
        print(f"llmopt: {exc}", file=sys.stderr)
        return 2


def _clash(named: list[tuple[Path, dict[str, Any]]]) -> str | None:
    """Two reports whose models share a name but not a config (two folders called "final"): not one model."""
    seen: dict[str, tuple[str, Path]] = {}
    for path, env in named:
        keys = env.get("model_keys")
        for name, key in (keys if isinstance(keys, dict) else {}).items():
            if name in seen and seen[name][0] != key:
                return f"{seen[name][1]} and {path} name different models {name!r} ({seen[name][0]} and {key}: their configs differ); not one model"
            seen.setdefault(name, (key, path))
    return None


def _compare(args: argparse.Namespace) -> int:
    base, base_env = load(args.base)
    candidate, cand_env = load(args.candidate)
    clash = _clash([(args.base, base_env), (args.candidate, cand_env)])
    if clash:
        print(f"llmopt: {clash}", file=sys.stderr)
        return 2
    changes, unchanged = compare(base, candidate)
    text = render_changes(changes, unchanged, base_env, cand_env)
    print(text, end="")
    if args.output:
        args.output.write_text(text, encoding="utf-8")
    return 1 if any(c.kind == "regression" for c in changes) else 0


def _report(args: argparse.Namespace) -> int:
    merged: dict[str, Result] = {}
    envs = []
    loaded = [(path, *load(path)) for path in args.runs]
    clash = _clash([(path, env) for path, _, env in loaded])
    if clash:
        print(f"llmopt: {clash}", file=sys.stderr)
        return 2
    for path, results, env in loaded:
        envs.append(env)
        for r in results:
            if r.key in merged:
                print(f"llmopt: {path}: {r.key} also in an earlier run; keeping this one", file=sys.stderr)
            merged[r.key] = r
    ordered = sorted(merged.values(), key=lambda r: (r.model, r.suite, r.check, r.variant, r.extra or ""))
    write(args.output, ordered, envs)
    print(f"llmopt: {len(ordered)} checks of {len({r.model for r in ordered})} model(s) written to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
