"""Triage one transformers release on CPU: install it beside the project, run every suite on every built-in
architecture, and write its section of baselines/cpu-x86_64/transformers-releases.md.

    python scripts/release_sweep.py 5.25.0                      # every built-in architecture, every suite
    python scripts/release_sweep.py latest --compare-to lock    # the newest release on PyPI, new findings against the lock's
    python scripts/release_sweep.py 4.49.0 --models tiny-llama -- -k "not flex_attention"   # after --: pytest's

The release gets its own virtual environment, .sweep/venv-REL (this environment's torch, the lock's pytest, the
project, and transformers==REL with the tokenizers and huggingface_hub it asks for); the suites run from this
checkout with pytest-xdist, and the report is .sweep/REL.json. The section lists, per architecture, the outcome
counts and every check that failed, hit a known issue (by issue id) or passed although a known issue was declared
(XPASS: a probe broader than its bug), and, with --compare-to, what is new against another report (a failure or a
known issue that report did not have). `--write` puts the section into the write-up, replacing an earlier one of
the same release. Exit status: 1 where a check failed, 0 otherwise (2: the release could not be installed or run).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pytest_llmopt.wiring.report import Result, load  # noqa: E402

WRITE_UP = ROOT / "baselines" / "cpu-x86_64" / "transformers-releases.md"
CONSTRAINTS = ROOT / "constraints.txt"
WORK = ROOT / ".sweep"
COLUMNS = ("passed", "failed", "known-issue", "known-issue-passed", "unsupported", "not-exercised", "inconclusive", "skipped")
HEAD = ("passed", "failed", "known issue", "XPASS", "unsupported", "not exercised", "inconclusive", "not run here")


def locked_transformers() -> str:
    """The transformers release of the lock (constraints.txt): the stack CI was last green with."""
    release = _locked().get("transformers")
    if release is None:
        raise SystemExit(f"{CONSTRAINTS}: no transformers== line")
    return release


def newest_release() -> str:
    """The newest transformers on the package index pip uses."""
    out = subprocess.run([sys.executable, "-m", "pip", "index", "versions", "transformers"], capture_output=True, text=True, check=True).stdout
    match = re.search(r"transformers \(([^)]+)\)", out)
    if match is None:
        raise SystemExit(f"pip index versions transformers: no version in {out[:200]!r}")
    return match.group(1)


def install(release: str) -> Path:
    """A virtual environment .sweep/venv-REL with this environment's torch, the lock's pytest and pytest-xdist, the
    project (editable, no dependencies) and transformers==release with what that release asks for (pip chooses
    tokenizers and huggingface_hub); kept for reruns. Its own environment: packages this one has that the release
    did not ask for (e.g. `kernels`, which 5.1x imports when present) stay out. Returns its python."""
    import torch

    venv = WORK / f"venv-{release}"
    python = venv / "bin" / "python"
    if not (venv / "ok").is_file():
        pins = {name: version for name, version in _locked().items() if name in ("pytest", "pytest-xdist", "pytest-benchmark", "packaging")}
        steps = [
            [sys.executable, "-m", "venv", "--clear", str(venv)],
            [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", f"torch=={torch.__version__.split('+')[0]}"],
            [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", f"transformers=={release}", *(f"{n}=={v}" for n, v in pins.items())],
            [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-deps", "-e", str(ROOT)],
        ]
        for step in steps:
            run = subprocess.run(step, capture_output=True, text=True)
            if run.returncode != 0:
                print(" ".join(step), run.stdout[-3000:] + run.stderr[-3000:], sep="\n", file=sys.stderr)
                raise SystemExit(2)
        (venv / "ok").write_text(release)
    return python


def _locked() -> dict[str, str]:
    """name -> version of every pin in constraints.txt."""
    pins = {}
    for line in CONSTRAINTS.read_text().splitlines():
        name, sep, version = line.split("#")[0].strip().partition("==")
        if sep:
            pins[name.strip().lower()] = version.strip()
    return pins


def run_suites(release: str, python: Path, models: list[str], workers: int, extra: list[str]) -> Path:
    report = WORK / f"{release}.json"
    report.unlink(missing_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLMOPT_") and k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    paths = [] if any(a.startswith("suites") for a in extra) else ["suites"]  # a suite file named among the arguments: only it
    command = [str(python), "-m", "pytest", *paths, "-p", "no:cacheprovider", "-q", "-rfEX", f"--llmopt-report={report}"]
    command += ["-n", str(workers)] if workers > 1 else ["-p", "no:xdist"]
    command += [f"--llmopt-model={m}" for m in models] + extra
    log = WORK / f"{release}.log"
    start = time.monotonic()
    with log.open("w") as out:
        code = subprocess.run(command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT).returncode
    print(f"transformers {release}: pytest exit {code} in {time.monotonic() - start:.0f} s (log {log.relative_to(ROOT)})")
    if not report.is_file():
        print(log.read_text()[-4000:], file=sys.stderr)
        raise SystemExit(2)
    return report


def issue_ids(result: Result) -> list[str]:
    """The known issues declared for a check that applied (the report names them; a report written before it did is
    read by the registry's reasons, which its reason joins)."""
    from pytest_llmopt.running.known_issues import KNOWN_ISSUES

    return result.known_issues or [issue.id for issue in KNOWN_ISSUES if result.reason and issue.reason in result.reason]


def section(release: str, results: list[Result], env: dict, seconds: float | None, baseline: list[Result] | None, baseline_name: str, command: str) -> str:
    """The write-up's section of one release: a table per architecture, then the checks that need a reader."""
    versions = env.get("versions", {})
    lines = [
        f"### transformers {release} (sweep of {time.strftime('%Y-%m-%d', time.gmtime())})",
        "",
        f"`{command}`: torch {versions.get('torch')}, tokenizers {versions.get('tokenizers')}, {env.get('dtype')}, "
        f"{env.get('device')}" + (f", {seconds / 60:.0f} min" if seconds else "") + ". Generated by scripts/release_sweep.py.",
        "",
        "| model | " + " | ".join(HEAD) + " |",
        "| --- | " + " | ".join("---:" for _ in HEAD) + " |",
    ]
    by_model: dict[str, Counter] = defaultdict(Counter)
    for r in results:
        by_model[r.model][r.status.value] += 1
    for model in sorted(by_model):
        lines.append(f"| {model} | " + " | ".join(str(by_model[model][c]) for c in COLUMNS) + " |")
    lines.append("")
    old = {r.key: r for r in baseline or []}
    groups = (
        ("Failed", [r for r in results if r.status.value == "failed"]),
        ("Known issues", [r for r in results if r.status.value == "known-issue"]),
        ("Passed although a known issue is declared (XPASS)", [r for r in results if r.status.value == "known-issue-passed"]),
    )
    for title, chosen in groups:
        if not chosen:
            lines.append(f"- **{title}**: none")
            continue
        if title == "Failed":
            items = [f"`{r.key}`: {(r.reason or '')[:160]}" for r in chosen]
        else:
            per_issue: dict[str, list[str]] = defaultdict(list)
            for r in chosen:
                for name in issue_ids(r) or ["(declared by the check itself, not the registry)"]:
                    per_issue[name].append(f"{r.model} {r.suite}::{r.check}[{r.variant}{'-' + r.extra if r.extra else ''}]")
            items = [f"`{name}` ({len(keys)}): " + ", ".join(sorted(keys)) for name, keys in sorted(per_issue.items())]
        lines.append(f"- **{title}** ({len(chosen)}):")
        lines += [f"  - {item}" for item in items]
    if baseline is not None:
        new_failed = sorted(r.key for r in results if r.status.value == "failed" and (r.key not in old or old[r.key].status.value != "failed"))
        before = {name for r in baseline if r.status.value in ("known-issue", "known-issue-passed") for name in issue_ids(r)}
        now = {name for r in results if r.status.value == "known-issue" for name in issue_ids(r)}
        lines.append(f"- **New against {baseline_name}**: failures: {', '.join(f'`{k}`' for k in new_failed) or 'none'}; "
                     f"known issues: {', '.join(f'`{n}`' for n in sorted(now - before)) or 'none'}")
    return "\n".join(lines) + "\n"


MARK = "<!-- sweep {release} -->"


def write(release: str, text: str, path: Path = WRITE_UP) -> None:
    """Put the section into the write-up between its markers (replacing an earlier sweep of the release), or at the end."""
    begin, end = MARK.format(release=release), MARK.format(release=release + " end")
    block = f"{begin}\n{text}{end}\n"
    doc = path.read_text()
    if begin in doc and end in doc:
        doc = doc[: doc.index(begin)] + block + doc[doc.index(end) + len(end) + 1 :]
    else:
        doc = doc.rstrip("\n") + "\n\n" + block
    path.write_text(doc)


def main(argv: list[str] | None = None) -> int:
    from pytest_llmopt.running import zoo

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("release", help="a transformers version, 'latest' (the newest on the index) or 'lock' (constraints.txt's)")
    parser.add_argument("--models", default=",".join(zoo.TINY), help="comma-separated built-in models (default: every tiny architecture)")
    parser.add_argument("--workers", type=int, default=2, help="pytest-xdist workers (default 2)")
    parser.add_argument("--compare-to", help="a JSON report, or 'lock' (the lock's release, swept first where its report is missing)")
    parser.add_argument("--report", type=Path, help="summarize this report instead of running the suites")
    parser.add_argument("--write", action="store_true", help=f"put the section into {WRITE_UP.relative_to(ROOT)}")
    parser.add_argument("--bump-lock", action="store_true", help="where no check failed, pin the release and what it installed with it in constraints.txt")
    argv = sys.argv[1:] if argv is None else argv
    split = argv.index("--") if "--" in argv else len(argv)
    args = parser.parse_args(argv[:split])
    args.pytest_args = argv[split + 1 :]  # after --: pytest's own, e.g. -k "not flex_attention"
    release = {"latest": newest_release, "lock": locked_transformers}.get(args.release, lambda: args.release)()
    if args.release == "latest" and release == locked_transformers():
        print(f"transformers {release}, the newest release, is the lock's (constraints.txt): nothing newer to try")
        return 0
    models = [m for m in args.models.split(",") if m]
    WORK.mkdir(exist_ok=True)
    command = f"scripts/release_sweep.py {release} " + (f"--models {args.models} " if args.models != ",".join(zoo.TINY) else "") + " ".join(args.pytest_args)
    seconds = None
    if args.report is None:
        start = time.monotonic()
        report = run_suites(release, install(release), models, args.workers, args.pytest_args)
        seconds = time.monotonic() - start
    else:
        report = args.report
    results, env = load(report)
    baseline, baseline_name = None, ""
    if args.compare_to:
        other = locked_transformers() if args.compare_to == "lock" else None
        path = WORK / f"{other}.json" if other else Path(args.compare_to)
        if other and not path.is_file():
            run_suites(other, install(other), models, args.workers, args.pytest_args)
        baseline, _ = load(path)
        baseline_name = f"transformers {other}" if other else str(path)
    text = section(release, results, env, seconds, baseline, baseline_name, command.strip())
    print(text)
    if args.write:
        write(release, text)
    failed = any(r.status.value == "failed" for r in results)
    if args.bump_lock and not failed:
        bump_lock(WORK / f"venv-{release}" / "bin" / "python")
    return 1 if failed else 0


BUMPED = ("transformers", "tokenizers", "huggingface-hub", "huggingface_hub", "safetensors")


def bump_lock(python: Path) -> None:
    """Pin in constraints.txt the versions the sweep's environment resolved for transformers and the packages that
    move with it (tokenizers, huggingface_hub, safetensors); every other pin stays."""
    frozen = subprocess.run([str(python), "-m", "pip", "freeze", "--exclude-editable"], capture_output=True, text=True, check=True).stdout
    found = {n.strip().lower(): v.strip() for n, _, v in (line.partition("==") for line in frozen.splitlines()) if v}
    lines = []
    for line in CONSTRAINTS.read_text().splitlines():
        name = line.partition("==")[0].strip().lower()
        lines.append(f"{line.partition('==')[0]}=={found[name]}" if name in BUMPED and name in found else line)
    CONSTRAINTS.write_text("\n".join(lines) + "\n")
    print(f"{CONSTRAINTS.relative_to(ROOT)}: " + ", ".join(f"{n}=={found[n]}" for n in BUMPED if n in found))


if __name__ == "__main__":
    sys.exit(main())
