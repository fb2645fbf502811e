"""``llmopt``: the upgrade gate and report merging, on JSON reports written with --llmopt-report.

  llmopt compare BASE.json CANDIDATE.json   diff of every check and figure, regressions first;
                                            exit 1 on any regression beyond tolerance, 0 otherwise
  llmopt report RUN.json [RUN.json ...] -o compat.md|.html|.json   one matrix from several runs
  llmopt run [PYTEST ARGS ...]              the installed suites: pytest --pyargs pytest_llmopt.suites ARGS

Exit status 2 means the command itself could not run (a missing or malformed report, a bad option).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .outcomes import GOOD, Status
from .render import write
from .report import ReportError, Result, load

# Figures judged by the gate: +1 when higher is better, -1 when lower is better.
DIRECTION = {
    "acceptance_rate": +1,
    "speedup": +1,
    "tokens_per_s": +1,
    "roofline_pct": +1,
    "ttft_ms": -1,
    "decode_ms": -1,
    "peak_memory_bytes": -1,
    "footprint_bytes": -1,
    "static_cache_bytes": -1,
    "recompiles": -1,
    "compiles_warmup": -1,
}
# How far a figure may move the wrong way before it is a regression: relative, or absolute for rates/counts.
DEFAULT_RELATIVE = 0.05
ABSOLUTE = {"acceptance_rate": 0.02, "recompiles": 0.0, "compiles_warmup": 0.0, "roofline_pct": 5.0}


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


def compare(base: list[Result], candidate: list[Result], relative: float = DEFAULT_RELATIVE) -> tuple[list[Change], int]:
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
        found = _status_change(key, a, b) + _figure_changes(key, a, b, relative)
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


def _figure_changes(key: str, a: Result, b: Result, relative: float) -> list[Change]:
    out = []
    for name, direction in DIRECTION.items():
        x, y = a.metrics.get(name), b.metrics.get(name)
        if not isinstance(x, (int, float)) or not isinstance(y, (int, float)) or x == y:
            continue
        worse = (y - x) * direction < 0
        limit = ABSOLUTE.get(name)
        moved = abs(y - x) if limit is not None else abs(y - x) / abs(x) if x else float("inf")
        allowed = limit if limit is not None else relative
        delta = f"{y - x:+.4g}" if limit is not None else (f"{(y - x) / x:+.1%}" if x else "new")
        if worse and moved > allowed:
            out.append(Change("regression", key, name, f"{x:.4g}", f"{y:.4g}", f"{delta} (allowed {allowed:g}{'' if limit is not None else ' relative'})"))
        elif not worse and moved > allowed:
            out.append(Change("improvement", key, name, f"{x:.4g}", f"{y:.4g}", delta))
    return out


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
    cmp_parser.add_argument("--relative", type=float, default=DEFAULT_RELATIVE, help="allowed relative loss of speed or growth of memory (default 0.05)")
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


def _compare(args: argparse.Namespace) -> int:
    base, base_env = load(args.base)
    candidate, cand_env = load(args.candidate)
    changes, unchanged = compare(base, candidate, args.relative)
    text = render_changes(changes, unchanged, base_env, cand_env)
    print(text, end="")
    if args.output:
        args.output.write_text(text, encoding="utf-8")
    return 1 if any(c.kind == "regression" for c in changes) else 0


def _report(args: argparse.Namespace) -> int:
    merged: dict[str, Result] = {}
    envs = []
    for path in args.runs:
        results, env = load(path)
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
