#!/usr/bin/env python3
"""Agreement of two performance-suite runs and of the independent measurement (scripts/measure-speed.py).

    python scripts/compare-speed.py RUN1.json RUN2.json [INDEPENDENT.json]

RUN1/RUN2 are --llmopt-report JSON files of suites/test_performance.py. Prints, per model and check,
the figures of both runs and their difference, and the static+compile speedup beside the independent
one. Exit 1 when two runs differ by more than 5 % on a timing figure or the suite's static+compile
speedup differs from the independent one by more than 10 %.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

FIGURES = ("speedup", "decode_speedup", "tokens_per_s", "decode_ms", "ttft_ms", "roofline_pct", "peak_memory_bytes")
RUN_TOLERANCE = 0.05
INDEPENDENT_TOLERANCE = 0.10


def results(path: str) -> dict[tuple[str, str, str], dict]:
    doc = json.loads(Path(path).read_text(encoding="utf-8"))
    return {(r["model"], r["check"], r["variant"]): r for r in doc["results"] if r["suite"] == "performance"}


def main(argv: list[str]) -> int:
    if len(argv) not in (2, 3):
        print(__doc__)
        return 2
    one, two = results(argv[0]), results(argv[1])
    bad = 0
    print("| model | check | variant | figure | run 1 | run 2 | diff |\n|---|---|---|---|---|---|---|")
    for key in sorted(one.keys() & two.keys()):
        a, b = one[key]["metrics"], two[key]["metrics"]
        for name in FIGURES:
            x, y = a.get(name), b.get(name)
            if not isinstance(x, (int, float)) or not isinstance(y, (int, float)) or not x:
                continue
            diff = (y - x) / x
            flag = " **over 5 %**" if abs(diff) > RUN_TOLERANCE and name != "ttft_ms" else ""
            bad += bool(flag)
            print(f"| {key[0]} | {key[1]} | {key[2]} | {name} | {x:.4g} | {y:.4g} | {diff:+.1%}{flag} |")
    print("\nstatus run 1 / run 2: " + ", ".join(f"{k[0]} {k[1]}[{k[2]}] {one[k]['status']}/{two[k]['status']}" for k in sorted(one.keys() & two.keys())))
    if len(argv) == 3:
        independent = json.loads(Path(argv[2]).read_text(encoding="utf-8"))["shapes"]
        print("\n| model | suite speedup run 1 | run 2 | independent | diff (run 1) | diff (run 2) |\n|---|---|---|---|---|---|")
        for model, figures in sorted(independent.items()):
            suite = [
                run[k]["metrics"].get("speedup")
                for run in (one, two)
                for k in run
                if k[0] == model and k[1] == "test_generate_speed" and k[2].startswith("static+compile/")
            ]
            if len(suite) != 2 or None in suite:
                print(f"| {model} | missing | | {figures['speedup']:.3g} | | |")
                bad += 1
                continue
            diffs = [(s - figures["speedup"]) / figures["speedup"] for s in suite]
            flag = " **over 10 %**" if any(abs(d) > INDEPENDENT_TOLERANCE for d in diffs) else ""
            bad += bool(flag)
            print(f"| {model} | {suite[0]:.3g} | {suite[1]:.3g} | {figures['speedup']:.3g} | {diffs[0]:+.1%} | {diffs[1]:+.1%}{flag} |")
    print(f"\n{'AGREE' if not bad else f'{bad} DISAGREEMENT(S)'}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
