"""``python -m benchmarks``: sequential vs parstream vs the peers, in one run.

Prints an at-a-glance table (speedup over sequential, parstream / best peer),
the full table, writes ``<out>/<timestamp>.json`` and ``<out>/<timestamp>.png``
(the same two views on top, then each workload's times) and says where they
are. ``--quick`` first says what its small inputs do to the comparison.
``python -m benchmarks scaling`` sweeps the worker count instead.

Where a physical floor exists each row also shows its time / the floor, and
issue 12's goals are printed as met or MISSED. ``--backend NAME`` passes
``backend=NAME`` to every parstream Supervisor the suite makes (``local``,
``inline``); without it nothing is passed. ``--backend ray`` runs the Ray
suite instead (``ray_suite``: a local two-node cluster, parstream against
plain Ray and Ray's Pool, issue 10's goals; needs the ray extra).
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.util
import json
import os
import platform
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

import parstream
from benchmarks import ray_suite, runners, suite

DEFAULT_OUT = Path(__file__).parent / "results"


def machine(load_at_start: tuple[float, float, float] | None = None) -> dict[str, Any]:
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions = {}
    for pkg in (
        "parstream",
        "loky",
        "cloudpickle",
        "psutil",
        "joblib",
        "pebble",
        "mpire",
        "billiard",
        "numpy",
        "ray",
    ):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    return {
        "cores": parstream.cpu_count(),
        "cpu": cpu,
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "versions": versions,
        # Other work on a shared machine skews every figure; this says how busy it was.
        "load_average_at_start": list(load_at_start or os.getloadavg()),
        "load_average_at_end": list(os.getloadavg()),
        "start_methods": (
            "pool/ppe/pebble/mpire/billiard: fork (their default); "
            "loky, joblib, parstream: loky; pool-spawn: spawn"
        ),
    }


def _fmt(value: float, unit: str) -> str:
    if unit == "us":
        return f"{value:,.0f} us"
    if unit == "items/s":
        if value >= 1e6:
            return f"{value / 1e6:.1f}M/s"
        if value >= 1e4:
            return f"{value / 1e3:.0f}k/s"
        return f"{value:,.0f}/s"
    if value >= 1:
        return f"{value:.2f} s"
    return f"{value * 1e3:.1f} ms"


_SHOWN = ("ratio_to_best_peer", "best_peer", "floor_s", "floor_what", "goals")


def table(results: dict[str, Any], issue: str = "12", skip: tuple[str, ...] = ()) -> str:
    """The full table; extras named in ``skip`` are left to the caller to print."""
    lines = []
    for name, res in results.items():
        unit = res["unit"]
        extra = res["extra"]
        floor = "floor_s" in extra
        width = max([28, *(len(runner) + 2 for runner in res["rows"])])
        lines.append(f"\n== {name}: {res['what']}")
        lines.append(
            f"   {'runner':<{width}}{'median':>12}{'min-max':>24}{'vs sequential':>16}"
            + (f"{'/ floor':>10}" if floor else "")
        )
        for runner, row in res["rows"].items():
            spread = f"{_fmt(row['min'], unit)} - {_fmt(row['max'], unit)}"
            speed = f"x{row['speedup']:.2f}" if "speedup" in row else ""
            to_floor = f"{row['to_floor']:.2f}" if "to_floor" in row else ""
            lines.append(
                f"   {runner:<{width}}{_fmt(row['median'], unit):>12}{spread:>24}{speed:>16}"
                + (f"{to_floor:>10}" if floor else "")
            )
        if "ratio_to_best_peer" in extra:
            verdict = "faster" if extra["ratio_to_best_peer"] <= 1 else "SLOWER"
            lines.append(
                f"   parstream / best peer ({extra['best_peer']}): "
                f"{extra['ratio_to_best_peer']:.2f} ({verdict})"
            )
        if floor:
            lines.append(
                f"   floor: {_fmt(extra['floor_s'], 's')} = {extra['floor_what']}; "
                f"parstream / floor: {extra.get('parstream_to_floor', float('nan')):.2f}"
            )
        for g in extra.get("goals", []):
            lines.append(
                f"   goal (issue {issue}): {g['goal']} = {g['value']:.3g}, want {g['op']} "
                f"{g['limit']:.3g}: {'met' if g['met'] else 'MISSED'}"
            )
        for key, value in extra.items():
            if key in _SHOWN or key == "parstream_to_floor" or key in skip:
                continue
            lines.append(f"   {key}: {json.dumps(value, default=str)[:200]}")
        lines.extend(f"   note: {n}" for n in res["notes"])
    return "\n".join(lines)


def glance(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Per workload: parstream's speedup, the best peer's, and parstream / best peer."""
    out = []
    for name, res in results.items():
        rows, extra = res["rows"], res["extra"]
        best = extra.get("best_peer")
        entry = {
            "workload": name,
            "parstream_speedup": rows.get("parstream", {}).get("speedup"),
            "best_peer": best,
            "best_peer_speedup": rows.get(best, {}).get("speedup") if best else None,
            "ratio_to_best_peer": extra.get("ratio_to_best_peer"),
            "parstream_to_floor": extra.get("parstream_to_floor"),
            "goals_missed": [g["goal"] for g in extra.get("goals", []) if not g["met"]],
        }
        if entry["parstream_speedup"] is not None or entry["ratio_to_best_peer"] is not None:
            out.append(entry)
    return out


def glance_table(results: dict[str, Any]) -> str:
    lines = [
        "== at a glance: speedup over sequential, and parstream / best peer "
        "(time ratio; < 1 means parstream was faster); parstream / floor; goals missed",
        f"   {'workload':<16}{'parstream':>12}{'best peer':>26}{'ratio':>8}{'/ floor':>9}"
        "   goals missed",
    ]
    for e in glance(results):
        ps = f"x{e['parstream_speedup']:.2f}" if e["parstream_speedup"] is not None else "-"
        peer = "-"
        if e["best_peer"] is not None:
            speed = e["best_peer_speedup"]
            peer = e["best_peer"] + (f" x{speed:.2f}" if speed is not None else "")
        ratio = e["ratio_to_best_peer"]
        fl = e["parstream_to_floor"]
        lines.append(
            f"   {e['workload']:<16}{ps:>12}{peer:>26}"
            f"{f'{ratio:.2f}' if ratio is not None else '-':>8}"
            f"{f'{fl:.2f}' if fl is not None else '-':>9}"
            f"   {'; '.join(e['goals_missed']) or '-'}"
        )
    return "\n".join(lines)


def quick_note(results: dict[str, Any]) -> str:
    """What a --quick run's small inputs do to the comparison, from this run's figures."""
    behind = [
        f"{e['workload']} ({e['ratio_to_best_peer']:.2f}x the best peer's time)"
        for e in glance(results)
        if e["ratio_to_best_peer"] is not None and e["ratio_to_best_peer"] > 1
    ]
    head = (
        "QUICK RUN: small inputs and 2-3 rounds, so fixed start-up and per-call costs "
        "weigh more than in a full run"
    )
    if behind:
        return (
            f"{head}; that favours the peers, and here parstream trailed the best peer on "
            f"{', '.join(behind)}. Run without --quick for "
            "representative figures."
        )
    return (
        f"{head}; that favours the peers, though in this run parstream matched or beat the "
        "best peer everywhere. Run without --quick for representative figures."
    )


def chart(results: dict[str, Any], path: Path, *, quick: bool = False) -> None:
    """Top row: speedup over sequential and ratio to the best peer; then each workload."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    cols = 2
    rows = (len(names) + cols - 1) // cols
    fig = plt.figure(figsize=(12, 3.6 + 3.2 * rows))
    grid = fig.add_gridspec(rows + 1, cols, height_ratios=[1.15] + [1] * rows)
    at = glance(results)

    ax = fig.add_subplot(grid[0, 0])
    sped = [e for e in at if e["parstream_speedup"] is not None]
    ys = list(range(len(sped)))
    bars = ax.barh(
        [y - 0.2 for y in ys],
        [e["parstream_speedup"] for e in sped],
        height=0.4,
        color="tab:red",
        label="parstream",
    )
    ax.bar_label(bars, labels=[f"x{e['parstream_speedup']:.2f}" for e in sped], fontsize=7)
    bars = ax.barh(
        [y + 0.2 for y in ys],
        [e["best_peer_speedup"] or 0 for e in sped],
        height=0.4,
        color="tab:gray",
        label="best peer",
    )
    ax.bar_label(
        bars,
        labels=[
            f"{e['best_peer']} x{e['best_peer_speedup']:.2f}" if e["best_peer_speedup"] else ""
            for e in sped
        ],
        fontsize=7,
    )
    ax.set_yticks(ys, [e["workload"] for e in sped])
    ax.invert_yaxis()
    ax.axvline(1, color="black", lw=0.8)
    ax.set_title("speedup over sequential (higher is better; 1 = no gain)", fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
    ax.tick_params(labelsize=8)

    ax = fig.add_subplot(grid[0, 1])
    rated = [e for e in at if e["ratio_to_best_peer"] is not None]
    ratios = [e["ratio_to_best_peer"] for e in rated]
    bars = ax.barh(
        [f"{e['workload']} (vs {e['best_peer']})" for e in rated],
        [x - 1 for x in ratios],
        left=1,  # bars grow from parity: left when parstream is faster, right when slower
        color=["tab:green" if x <= 1 else "tab:red" for x in ratios],
    )
    ax.bar_label(bars, labels=[f"{x:.2f}" for x in ratios], fontsize=7)
    ax.invert_yaxis()
    ax.set_xscale("log")  # 0.5 and 2 lie equally far from 1
    if ratios:
        ax.set_xlim(min(0.5, min(ratios) / 1.3), max(2.0, max(ratios) * 1.3))
    ax.axvline(1, color="black", lw=0.8)
    ax.set_title("parstream time / best peer time (log; < 1: parstream faster)", fontsize=9)
    ax.tick_params(labelsize=8)

    for i, name in enumerate(names):
        ax = fig.add_subplot(grid[1 + i // cols, i % cols])
        res = results[name]
        labels = list(res["rows"])
        med = [res["rows"][k]["median"] for k in labels]
        low = [m - res["rows"][k]["min"] for k, m in zip(labels, med, strict=True)]
        high = [res["rows"][k]["max"] - m for k, m in zip(labels, med, strict=True)]
        colours = ["tab:red" if k.startswith("parstream") else "tab:gray" for k in labels]
        colours = [
            "tab:blue" if k == "sequential" else c for k, c in zip(labels, colours, strict=True)
        ]
        ax.barh(labels, med, xerr=[low, high], color=colours)
        if "floor_s" in res["extra"] and res["unit"] == "s":
            ax.axvline(res["extra"]["floor_s"], color="black", ls="--", lw=0.8, label="floor")
            ax.legend(fontsize=7, loc="lower right")
        ax.set_title(f"{name} ({res['unit']}, lower is better)", fontsize=9)
        ax.tick_params(labelsize=8)
        if name == "scaling" and "efficiency" in res["extra"]:
            eff = res["extra"]["efficiency"]
            ax2 = ax.inset_axes((0.6, 0.1, 0.35, 0.35))
            ks = sorted(int(k) for k in eff)
            ax2.plot(ks, [eff[k] if k in eff else eff[str(k)] for k in ks], "o-")
            ax2.set_ylim(0, 1.1)
            ax2.set_title("efficiency", fontsize=7)
    if quick:
        fig.suptitle("quick run: small inputs favour the peers", fontsize=10, color="tab:red")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    p.add_argument("mode", nargs="?", default="suite", choices=["suite", "scaling"])
    p.add_argument("--quick", action="store_true", help="a smoke run, under 30 s")
    p.add_argument("--only", action="append", default=[], help="workloads (repeat or comma list)")
    p.add_argument("--peers", default=",".join(runners.PEERS), help="comma list of peers")
    p.add_argument("--workers", type=int, default=parstream.cpu_count())
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument(
        "--backend",
        default=None,
        metavar="NAME",
        help="passed as backend=NAME to every parstream Supervisor the suite makes "
        "(default: none passed); 'ray' runs the Ray suite instead, on a local two-node "
        f"cluster (workloads {', '.join(ray_suite.WORKLOADS)}; needs pip install "
        "'parstream[ray]')",
    )
    args = p.parse_args(argv)

    if args.backend == "ray":
        only = [x for item in args.only for x in item.split(",") if x] or list(ray_suite.WORKLOADS)
        unknown = [x for x in only if x not in ray_suite.WORKLOADS]
        if unknown:
            p.error(
                f"unknown workload(s) {unknown}; with --backend ray choose from "
                f"{list(ray_suite.WORKLOADS)}"
            )
        if args.mode != "suite":
            p.error(f"--backend ray runs its own suite; {args.mode!r} is for the local ones")
        if importlib.util.find_spec("ray") is None:
            p.error("--backend ray needs Ray: pip install 'parstream[ray]'")
        return ray_suite.main(args, only)

    only = [x for item in args.only for x in item.split(",") if x] or list(suite.WORKLOADS)
    unknown = [x for x in only if x not in suite.BENCHES]
    if unknown:
        p.error(f"unknown workload(s) {unknown}; choose from {list(suite.BENCHES)}")
    wanted = [x for x in args.peers.split(",") if x]
    bad = [x for x in wanted if x not in runners.PEERS]
    if bad:
        p.error(f"unknown peer(s) {bad}; choose from {list(runners.PEERS)}")
    peers = [x for x in wanted if runners.available(x)]
    cfg = suite.Config(workers=args.workers, peers=peers, quick=args.quick, backend=args.backend)
    for x in wanted:
        if x not in peers:
            cfg.skipped[x] = "not installed"
            print(f"note: peer {x!r} is not installed; skipped", file=sys.stderr)

    if args.quick:
        print(
            "note: --quick uses small inputs, which favour the peers where start-up and "
            "per-call costs dominate; the report says where",
            file=sys.stderr,
        )
    load_at_start = os.getloadavg()
    started = time.perf_counter()
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    results: dict[str, Any] = {}
    took: dict[str, float] = {}  # seconds per workload, to keep --quick quick
    if args.mode == "scaling":
        outcomes = [suite.scaling(cfg, args.workers)]
    else:
        outcomes = []
        for name in only:
            print(f"running {name} ...", file=sys.stderr, flush=True)
            t0 = time.perf_counter()
            got = suite.BENCHES[name](cfg)
            took[name] = round(time.perf_counter() - t0, 1)
            outcomes.extend(got if isinstance(got, list) else [got])
    for o in outcomes:
        results[o.name] = o.summary()

    report = {
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "mode": args.mode,
        "quick": args.quick,
        "workers": args.workers,
        "machine": machine(load_at_start),
        "peers": peers,
        "skipped_peers": cfg.skipped,
        "backend": args.backend,
        "seconds": round(time.perf_counter() - started, 1),
        "workload_seconds": took,
        "results": results,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    json_path = args.out / f"{stamp}.json"
    png_path = args.out / f"{stamp}.png"
    report["glance"] = glance(results)
    if args.quick:
        report["quick_note"] = quick_note(results)
    json_path.write_text(json.dumps(report, indent=2, default=str))
    chart(results, png_path, quick=args.quick)
    if args.quick:
        print(report["quick_note"] + "\n")
    print(glance_table(results))
    print(table(results))
    m = report["machine"]
    load = f"{m['load_average_at_start'][0]:.2f} -> {m['load_average_at_end'][0]:.2f}"
    print(
        f"\nmachine: {m['cores']} cores, {m['cpu']}, Python {m['python']}; "
        f"1-min load average {load}"
    )
    print(f"took {report['seconds']} s")
    print(f"results: {json_path}\nchart:   {png_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
