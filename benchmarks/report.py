"""``python -m benchmarks.report RUN.json [...]``: the README's table; goals over runs.

Reads result files written by ``python -m benchmarks`` and prints, in
Markdown:

* the benchmark table of the last run given: per workload, each runner's
  median time (and its speedup over sequential where there is one) and
  parstream's time as a ratio of the best peer's;
* for every goal of issue 12 the suite checks, its value in each run, the
  median and the range over the runs, and how many runs met it.

Every figure comes from the files; nothing is measured here. Peers are only
compared within a run, never across.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
from pathlib import Path
from typing import Any

# Workloads in the README's table, with the label shown for each.
ROWS = {
    "cpu": "16 x ~100 ms pure-Python CPU items",
    "tiny": "200,000 x `x*x`, parstream untuned",
    "fine": "60,000 x ~4 µs pure-Python items",
    "skew": "400 lognormal items, slow ones last",
    "roundtrip": "one no-op task, warm pool (median)",
    "startup_bare": "fresh process: import + pool + first result",
    "startup_second": "a second pool in the same process → first result",
    "recovery_small": "SIGKILL of a busy worker → replacement's first result",
    "io": "20 x 0.2 s waits, max_concurrency=20",
    "numpy": "64 x rfft of 1 MiB arrays (1 MiB in, 0.5 MiB out)",
    "numpy_out": "64 x 1 MiB arrays made from a seed (int in, 1 MiB out)",
    "infinite": "1,000,000 items from `itertools.count()`",
}
PEERS = ("pool", "pool-spawn", "ppe", "loky", "joblib", "pebble", "mpire", "billiard")


def _fmt(value: float, unit: str) -> str:
    if unit == "us":
        return f"{value:,.0f} µs"
    if value >= 1.0:
        return f"{value:.2f} s"
    return f"{value * 1e3:.1f} ms"


def table(run: dict[str, Any]) -> str:
    results = run["results"]
    peers = [p for p in PEERS if any(p in results[w]["rows"] for w in ROWS if w in results)]
    head = ["workload", "sequential", "parstream", *peers, "parstream / best peer"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, label in ROWS.items():
        if name not in results:
            continue
        res = results[name]
        rows, unit = res["rows"], res["unit"]

        def cell(runner: str, rows: dict[str, Any] = rows, unit: str = unit) -> str:
            row = rows.get(runner)
            if row is None:
                return "—"
            text = _fmt(row["median"], unit)
            if "speedup" in row:
                text += f" (x{row['speedup']:.2f})"
            return text

        extra = res.get("extra", {})
        ratio = extra.get("ratio_to_best_peer")
        best = extra.get("best_peer")
        versus = f"{ratio:.2f} ({best})" if ratio is not None else "—"
        cells = [label, cell("sequential"), cell("parstream"), *map(cell, peers), versus]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def goals(runs: list[dict[str, Any]]) -> str:
    seen: dict[tuple[str, str], list[tuple[float, bool]]] = {}
    limits: dict[tuple[str, str], str] = {}
    for run in runs:
        for name, res in run["results"].items():
            for g in res.get("extra", {}).get("goals", []):
                # "parstream / best peer (loky)": one row whichever peer was best.
                goal = re.sub(rf" \(({'|'.join(PEERS)})\)$", "", g["goal"])
                key = (name, goal)
                seen.setdefault(key, []).append((g["value"], g["met"]))
                limits[key] = f"{g['op']} {g['limit']:g}"
    lines = [
        "| workload | goal | want | per run | median | range | met |",
        "|---|---|---|---|---|---|---|",
    ]
    for (name, goal), values in seen.items():
        xs = [v for v, _ in values]
        met = sum(m for _, m in values)
        per_run = ", ".join(f"{x:.3g}" for x in xs)
        lines.append(
            f"| {name} | {goal} | {limits[(name, goal)]} | {per_run} | "
            f"{statistics.median(xs):.3g} | {min(xs):.3g} - {max(xs):.3g} | {met}/{len(xs)} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.report", description=__doc__)
    p.add_argument("runs", nargs="+", type=Path, help="result files of python -m benchmarks")
    args = p.parse_args(argv)
    runs = [json.loads(path.read_text()) for path in args.runs]
    last = runs[-1]
    m = last["machine"]
    print(
        f"Run of {last['date']}: {m['cores']} cores ({m['cpu']}), Python {m['python']}; "
        f"whole run {last['seconds']:.0f} s.\n"
    )
    print(table(last))
    print(f"\nGoals of issue 12 over {len(runs)} run(s):\n")
    print(goals(runs))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
