#!/usr/bin/env python3
"""Agreement of two performance-suite sessions, and of the suite with the independent measurement
(scripts/measure-speed.py), judged by the figures' own intervals.

    python scripts/compare-speed.py RUN1.json RUN2.json [INDEPENDENT.json]

RUN1/RUN2 are --llmopt-report JSON files of suites/test_performance.py on the same machine and stack. Per model
and check, every timed figure of both runs with its 95 % interval:
- the GPU's own work (gpu_ms_per_token) must agree within 5 %;
- a wall-time ratio (decode_speedup, speedup) must agree within its band: the difference of the two logs within
  1.96 sqrt(se1^2 + se2^2 + 2 sigma_B^2), sigma_B the between-session default of its band class (stats.py).
The suite's static+compile speedup must agree with the independent one by the same rule. Exit 1 on a disagreement.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pytest_llmopt.common.stats import DEFAULT_SIGMA_BETWEEN

GPU_TOLERANCE = 0.05
TIMED = ("gpu_ms_per_token", "decode_speedup", "speedup")


def results(path: str) -> dict[tuple[str, str, str], dict]:
    doc = json.loads(Path(path).read_text(encoding="utf-8"))
    return {(r["model"], r["check"], r["variant"]): r for r in doc["results"] if r["suite"] == "performance"}


def _interval(metrics: dict, name: str) -> tuple[float, float, str] | None:
    found = (metrics.get("intervals") or {}).get(name)
    if not isinstance(found, dict) or "log" not in found:
        return None
    return float(found["log"]), float(found["se"]), str(found.get("band", "mixed"))


def agree(name: str, a: tuple[float, float, str], b: tuple[float, float, str]) -> tuple[bool, float, float]:
    """(agree, relative difference, allowed relative difference)."""
    diff = b[0] - a[0]
    if name == "gpu_ms_per_token":
        return abs(math.expm1(diff)) <= GPU_TOLERANCE, math.expm1(diff), GPU_TOLERANCE
    band = a[2] if DEFAULT_SIGMA_BETWEEN.get(a[2], 0) >= DEFAULT_SIGMA_BETWEEN.get(b[2], 0) else b[2]
    sigma = DEFAULT_SIGMA_BETWEEN.get(band, 0.10)
    allowed = 1.96 * math.sqrt(a[1] ** 2 + b[1] ** 2 + 2 * sigma**2)
    return abs(diff) <= allowed, math.expm1(diff), math.expm1(allowed)


def main(argv: list[str]) -> int:
    if len(argv) not in (2, 3):
        print(__doc__)
        return 2
    one, two = results(argv[0]), results(argv[1])
    bad = checked = 0
    print("| model | check | variant | figure | run 1 [95 %] | run 2 [95 %] | difference | allowed |\n|---|---|---|---|---|---|---|---|")
    for key in sorted(one.keys() & two.keys()):
        a, b = one[key]["metrics"], two[key]["metrics"]
        for name in TIMED:
            ia, ib = _interval(a, name), _interval(b, name)
            if ia is None or ib is None:
                continue
            ok, diff, allowed = agree(name, ia, ib)
            checked += 1
            bad += not ok
            shown = [f"{math.exp(x[0]):.4g} [{math.exp(x[0] - 1.96 * x[1]):.4g}, {math.exp(x[0] + 1.96 * x[1]):.4g}] ({x[2]})" for x in (ia, ib)]
            print(f"| {key[0]} | {key[1]} | {key[2]} | {name} | {shown[0]} | {shown[1]} | {diff:+.1%}{'' if ok else ' **disagree**'} | ±{allowed:.1%} |")
    print("\nstatus run 1 / run 2: " + ", ".join(f"{k[0]} {k[1]}[{k[2]}] {one[k]['status']}/{two[k]['status']}" for k in sorted(one.keys() & two.keys())))
    if len(argv) == 3:
        independent = json.loads(Path(argv[2]).read_text(encoding="utf-8"))["shapes"]
        print("\n| model | suite speedup run 1 | run 2 | independent | agree |\n|---|---|---|---|---|")
        for model, figures in sorted(independent.items()):
            sp = figures["speedup"]
            other = (math.log(sp["value"]), sp["se"], "mixed")
            suite = [_interval(run[k]["metrics"], "speedup") for run in (one, two) for k in run if k[0] == model and k[1] == "test_generate_speed" and k[2].startswith("static+compile/")]
            if len(suite) != 2 or None in suite:
                print(f"| {model} | missing | | {sp['value']:.3g} | no |")
                bad += 1
                continue
            verdicts = [agree("speedup", s, other) for s in suite if s is not None]
            ok = all(v[0] for v in verdicts)
            bad += not ok
            print(f"| {model} | {math.exp(suite[0][0]):.3g} | {math.exp(suite[1][0]):.3g} | {sp['value']:.3g} [{sp['low']:.3g}, {sp['high']:.3g}] | "  # type: ignore[index]
                  f"{'yes' if ok else '**no**'} ({', '.join(f'{d:+.1%} of ±{a:.1%}' for _, d, a in verdicts)}) |")
    print(f"\n{checked} figure(s) compared; {'AGREE' if not bad else f'{bad} DISAGREEMENT(S)'}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
