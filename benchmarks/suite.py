"""The benchmark suite: workloads, interleaved repetitions, statistics.

Every workload runs sequential, parstream and each available peer on the same
inputs; one repetition of each runner per round, rounds after a warm-up, so
drift on a shared machine hits every runner alike. Results are medians with
the min-max spread, speedups over sequential, parstream's ratio to the best
peer and, where one exists, every runner's ratio to the physical floor (the
loop for tiny items, max(sum/cores, longest item) for CPU work, a memcpy of
the same bytes for arrays), all from the same run. Issue 12's goals are
checked against the same figures and printed as met or MISSED.

A workload may return several outcomes (``startup`` and ``recovery`` measure
the same thing in different parents); each is a result of its own.
"""

from __future__ import annotations

import contextlib
import gc
import itertools
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import parstream
from benchmarks import child, runners as r, workloads as w
from parstream._results import oks  # how a stream builds its records, timed alone

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

EXECUTOR_MAP = "parstream Supervisor.map"  # the Executor's map, next to parstream.map
ASYNC_STREAM = "parstream async_stream"  # an Ok per item, next to parstream.map
RECORDS = "parstream Ok records alone"  # async_stream's records built with no pool
RECORD_SPAN = 5_000  # items per span when building them alone
TIMED_MAP = "parstream map, timeout=60"  # a per-item timeout, next to parstream.map
WORKLOADS = (
    "cpu",
    "tiny",
    "fine",
    "skew",
    "roundtrip",
    "cold",
    "startup",
    "io",
    "faults",
    "recovery",
    "infinite",
    "numpy",
    "numpy_out",
)
ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Config:
    workers: int
    peers: list[str]
    quick: bool
    skipped: dict[str, str] = field(default_factory=dict)
    backend: str | None = None  # --backend: passed to parstream as backend= when given


@dataclass
class Outcome:
    """One workload's figures: per runner, a list of samples (seconds) or extras."""

    name: str
    what: str
    unit: str = "s"
    higher_is_better: bool = False
    samples: dict[str, list[float]] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    #: The physical floor in seconds (no runner can beat it), and what it is.
    floor: float | None = None
    floor_what: str = ""
    #: Issue 12's goals: (what, value, "<=" or ">=", limit), checked in summary().
    goals: list[tuple[str, float, str, float]] = field(default_factory=list)

    def median(self, runner: str) -> float:
        return statistics.median(self.samples[runner])

    def best_peer(self) -> tuple[str, float] | None:
        """The best peer and parstream's time / its time (< 1: parstream faster)."""
        peers = {
            k: statistics.median(v)
            for k, v in self.samples.items()
            if k != "sequential" and not k.startswith("parstream")
        }
        if "parstream" not in self.samples or not peers:
            return None
        if self.higher_is_better:
            best = max(peers, key=lambda k: peers[k])
            return best, peers[best] / self.median("parstream")
        best = min(peers, key=lambda k: peers[k])
        return best, self.median("parstream") / peers[best]

    def goal(self, what: str, value: float | None, op: str, limit: float) -> None:
        if value is not None:
            self.goals.append((what, value, op, limit))

    def summary(self) -> dict[str, Any]:
        rows: dict[str, Any] = {}
        seq = self.samples.get("sequential")
        seq_med = statistics.median(seq) if seq else None
        for runner, xs in self.samples.items():
            med = statistics.median(xs)
            row = {"median": med, "min": min(xs), "max": max(xs), "n": len(xs)}
            if seq_med and runner != "sequential" and not self.higher_is_better:
                row["speedup"] = seq_med / med
            if self.floor and self.unit == "s":
                row["to_floor"] = med / self.floor
            rows[runner] = row
        best = self.best_peer()
        if best is not None:
            # ratio < 1 means parstream beat the best peer.
            self.extra["best_peer"], self.extra["ratio_to_best_peer"] = best
        if self.floor:
            self.extra["floor_s"] = self.floor
            self.extra["floor_what"] = self.floor_what
            if "parstream" in rows:
                self.extra["parstream_to_floor"] = rows["parstream"]["to_floor"]
        if self.goals:
            self.extra["goals"] = [
                {
                    "goal": what,
                    "value": value,
                    "op": op,
                    "limit": limit,
                    "met": value <= limit if op == "<=" else value >= limit,
                }
                for what, value, op, limit in self.goals
            ]
        return {
            "what": self.what,
            "unit": self.unit,
            "rows": rows,
            "extra": self.extra,
            "notes": self.notes,
        }


def _rounds(cfg: Config, quick: int, full: int) -> int:
    return quick if cfg.quick else full


def _interleave(
    outcome: Outcome, runners: dict[str, Callable[[], float]], rounds: int, warmup: int = 1
) -> None:
    for _ in range(warmup):
        for fn in runners.values():
            fn()
    order = list(runners.items())
    for i in range(rounds):
        # Rotate who goes first, so no runner always follows the same one
        # (a long sequential run, say) and inherits its effects.
        k = i % len(order)
        for name, fn in order[k:] + order[:k]:
            outcome.samples.setdefault(name, []).append(fn())


def _timed(fn: Callable[[], Any]) -> Callable[[], float]:
    def run() -> float:
        # Each runner starts with no garbage left by the one before: a peer
        # that leaves cycles behind (futures of 200,000 items...) would
        # otherwise have the next runner's first full collection pay for them.
        gc.collect()
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0

    return run


def _map_workload(
    cfg: Config,
    outcome: Outcome,
    fn: Callable[[Any], Any],
    items: list[Any],
    chunksize: int,
    rounds: int,
    peers: list[str],
    more: Callable[[Any], dict[str, Callable[[], Any]]] | None = None,
    own_chunking: tuple[str, ...] = (),
) -> None:
    """Every runner on the same items; ``more(sup)`` adds runs on parstream's
    warm supervisor (rows named ``parstream ...``, not counted as peers).
    Peers named in ``own_chunking`` run ``Pool.map`` with its own chunk size."""
    expected = [fn(x) for x in items[:3]]
    with contextlib.ExitStack() as stack:
        runners: dict[str, Callable[[], float]] = {
            "sequential": _timed(lambda: [fn(x) for x in items])
        }
        for name in ["parstream", *peers]:
            pool = stack.enter_context(r.open_pool(name, cfg.workers, cfg.backend))
            chunk = None if name in own_chunking else chunksize

            def run(name: str = name, pool: Any = pool, chunk: int | None = chunk) -> None:
                out = r.pmap(name, pool, fn, items, chunk)
                assert len(out) == len(items), (name, len(out))
                assert all(_same(a, b) for a, b in zip(out[:3], expected, strict=True)), name

            runners[name] = _timed(run)
            if name == "parstream" and more is not None:
                for label, extra_run in more(pool).items():
                    runners[label] = _timed(extra_run)
        _interleave(outcome, runners, rounds)


def _same(a: Any, b: Any) -> bool:
    try:
        import numpy as np

        if isinstance(a, np.ndarray):
            return bool(np.allclose(a, b))
    except ImportError:
        pass
    return bool(a == b)


def _quick_peers(cfg: Config, out: Outcome, slow: tuple[str, ...]) -> list[str]:
    """The peers a workload runs: in quick mode without ``slow`` ones (noted)."""
    if not cfg.quick:
        return list(cfg.peers)
    peers = [p for p in cfg.peers if p not in slow]
    dropped = [p for p in cfg.peers if p in slow]
    if dropped:
        out.notes.append(f"quick mode skips {', '.join(dropped)}")
    return peers


def _speedup_goal(out: Outcome, cores: int, per_core: float, label: str) -> None:
    """Goal: parstream's speedup over sequential >= ``per_core`` x cores."""
    if "sequential" in out.samples and "parstream" in out.samples:
        out.goal(
            f"speedup over sequential ({label})",
            out.median("sequential") / out.median("parstream"),
            ">=",
            per_core * cores,
        )


def _peer_goal(out: Outcome, limit: float) -> None:
    best = out.best_peer()
    if best is not None:
        out.goal(f"parstream / best peer ({best[0]})", best[1], "<=", limit)


def bench_cpu(cfg: Config) -> Outcome:
    target = 0.03 if cfg.quick else 0.1
    limit = w.calibrate_primes(target)
    n = 4 * cfg.workers if cfg.quick else 16
    out = Outcome("cpu", f"{n} pure-Python prime counts of ~{target * 1e3:.0f} ms each")
    _map_workload(cfg, out, w.count_primes, [limit] * n, 1, _rounds(cfg, 2, 3), cfg.peers)
    item_ms = statistics.median(out.samples["sequential"]) / n * 1e3
    out.what = f"{n} pure-Python prime counts of ~{item_ms:.0f} ms each (measured)"
    out.extra["cores"] = cfg.workers
    out.floor = out.median("sequential") / cfg.workers  # equal items: longest < sum/cores
    out.floor_what = "sequential / cores"
    _speedup_goal(out, cfg.workers, 0.975, "goal 0.975 x cores")
    _peer_goal(out, 1.0)
    return out


def bench_tiny(cfg: Config) -> Outcome:
    n = 50_000 if cfg.quick else 200_000
    chunk = max(1, n // (4 * cfg.workers))
    out = Outcome(
        "tiny",
        f"{n:,} x square(x); parstream untuned, peers with chunksize={chunk:,} "
        "(joblib and mpire automatic)",
    )
    peers = _quick_peers(cfg, out, ("joblib", "pebble", "mpire"))
    items = list(range(n))

    def on_supervisor(sup: Any) -> dict[str, Callable[[], Any]]:
        # Issue 11: the Executor's map runs on the same engine, on the same warm
        # supervisor; the goal is within 1.1x of parstream.map. Issue 12: the
        # same items through async_stream, an Ok per item, within 1.2x.
        def executor_map() -> None:
            out = list(sup.map(w.square, items))
            assert len(out) == n

        def stream() -> None:
            out = list(sup.async_stream(w.square, items))
            assert len(out) == n
            assert isinstance(out[-1], parstream.Ok)
            assert out[-1].value == items[-1] ** 2

        def timed() -> None:
            # A per-item timeout that never fires: what it costs to watch it.
            out = list(sup.stream_map(w.square, items, timeout=60))
            assert len(out) == n

        squares = [w.square(x) for x in items]
        spans = [squares[i : i + RECORD_SPAN] for i in range(0, n, RECORD_SPAN)]

        def records() -> None:
            # The floor under async_stream's extra time: the same Ok records
            # built in this process with no pool at all, span by span as a
            # stream builds them, and kept (as list(stream) keeps them), so
            # the cyclic collector's passes over them count here too.
            out = list(itertools.chain.from_iterable(map(oks, spans)))
            assert len(out) == n

        return {
            EXECUTOR_MAP: executor_map,
            ASYNC_STREAM: stream,
            TIMED_MAP: timed,
            RECORDS: records,
        }

    _map_workload(cfg, out, w.square, items, chunk, _rounds(cfg, 3, 5), peers, on_supervisor)
    out.extra["items"] = n
    out.extra["items_per_s"] = {k: n / statistics.median(v) for k, v in out.samples.items()}
    ps = out.median("parstream")
    out.extra["executor_map_over_map"] = out.median(EXECUTOR_MAP) / ps
    out.extra["async_stream_over_map"] = out.median(ASYNC_STREAM) / ps
    out.extra["timeout_over_map"] = out.median(TIMED_MAP) / ps
    out.extra["records_s"] = out.median(RECORDS)
    out.extra["async_stream_extra_over_records"] = (out.median(ASYNC_STREAM) - ps) / out.median(
        RECORDS
    )
    out.floor = out.median("sequential")
    out.floor_what = "the sequential loop"
    out.notes.append(
        f"'{EXECUTOR_MAP}', '{ASYNC_STREAM}', '{TIMED_MAP}': the same warm supervisor "
        "as 'parstream'"
    )
    out.notes.append(
        f"a per-item timeout costs {out.extra['timeout_over_map']:.2f} x parstream.map's time"
    )
    out.notes.append(
        f"'{RECORDS}': building the {n:,} Ok records alone takes "
        f"{out.median(RECORDS) / ps:.2f} x parstream.map's time; async_stream's time over "
        f"map's is {out.extra['async_stream_extra_over_records']:.2f} x that (the floor "
        f"for its goal is map + the records: {1 + out.median(RECORDS) / ps:.2f} x map)"
    )
    _peer_goal(out, 0.9)
    out.goal("parstream / the loop", ps / out.floor, "<=", 2.6)
    out.goal("async_stream / parstream.map", out.extra["async_stream_over_map"], "<=", 1.2)
    out.goal(
        "Supervisor.map / parstream.map (issue 11)", out.extra["executor_map_over_map"], "<=", 1.1
    )
    return out


def bench_fine(cfg: Config) -> Outcome:
    """Issue 12: items too small to ship one by one, too big to be free."""
    n = 20_000 if cfg.quick else 60_000
    k = w.calibrate_fine(4.5e-6)
    chunk = max(1, n // (4 * cfg.workers))
    out = Outcome("fine", f"{n:,} x ~4.5 us pure-Python items (fine({k}))")
    peers = _quick_peers(cfg, out, ("joblib", "pebble", "mpire", "ppe", "loky"))
    own = ("pool", "billiard")
    _map_workload(cfg, out, w.fine, [k] * n, chunk, _rounds(cfg, 2, 5), peers, own_chunking=own)
    item_us = out.median("sequential") / n * 1e6
    out.what = f"{n:,} x ~{item_us:.1f} us pure-Python items (measured), parstream untuned"
    out.floor = out.median("sequential") / cfg.workers
    out.floor_what = "sequential / cores"
    out.notes.append(
        f"pool, billiard: Pool.map with its own chunking; ppe, loky: chunksize={chunk:,}; "
        "joblib, mpire: automatic"
    )
    _speedup_goal(out, cfg.workers, 0.9, "goal x1.8 on 2 cores")
    _peer_goal(out, 0.95)
    return out


def bench_skew(cfg: Config) -> Outcome:
    """Issue 12: busy items of lognormal durations, the slow ones last."""
    n, total = (100, 0.15) if cfg.quick else (400, 1.45)
    durations = w.skewed_durations(n, total)
    rate = w.busy_rate()
    items = [max(1, round(d * rate)) for d in durations]
    static = math.ceil(n / cfg.workers)
    out = Outcome(
        "skew",
        f"{n} busy items, lognormal (sigma 1) durations summing to ~{total} s, sorted "
        f"ascending (slow ones last); longest ~{max(durations) * 1e3:.1f} ms",
    )
    peers = _quick_peers(cfg, out, ("joblib", "pebble", "mpire", "ppe", "loky", "billiard"))
    with contextlib.ExitStack() as stack:
        runners: dict[str, Callable[[], float]] = {
            "sequential": _timed(lambda: [w.busy(x) for x in items])
        }
        for name in ["parstream", *peers]:
            pool = stack.enter_context(r.open_pool(name, cfg.workers, cfg.backend))
            runners[name] = _timed(
                lambda name=name, pool=pool: r.pmap(name, pool, w.busy, items, 1)
            )
            if name == "pool":
                runners["pool static chunks"] = _timed(
                    lambda pool=pool: pool.map(w.busy, items, chunksize=static)
                )
                if not cfg.quick:
                    runners["pool map (own chunking)"] = _timed(
                        lambda pool=pool: pool.map(w.busy, items)
                    )
        _interleave(out, runners, _rounds(cfg, 2, 3))
    # The items' sizes are fixed in work; this run's sequential time says what
    # they cost here, so the ideal is scaled from it.
    scale = out.median("sequential") / math.fsum(durations)
    out.floor = max(math.fsum(durations) / cfg.workers, max(durations)) * scale
    out.floor_what = "ideal = max(sum/cores, longest item), from the sequential time"
    out.extra["sum_s"] = math.fsum(durations) * scale
    out.extra["longest_s"] = max(durations) * scale
    out.notes.append(
        f"peers chunksize=1 (dynamic; joblib automatic); 'pool static chunks': "
        f"Pool.map chunksize={static} (one block per worker)"
    )
    out.goal("parstream / ideal", out.median("parstream") / out.floor, "<=", 1.05)
    return out


def bench_roundtrip(cfg: Config) -> Outcome:
    calls = 200 if cfg.quick else 2000
    out = Outcome("roundtrip", "one no-op task's round trip on a warm pool", unit="us")
    names = ["parstream"] + [p for p in cfg.peers if p != "joblib"]
    lat: dict[str, list[float]] = {n: [] for n in names}
    with contextlib.ExitStack() as stack:
        pools = {n: stack.enter_context(r.open_pool(n, cfg.workers, cfg.backend)) for n in names}
        for _ in range(20):
            for n in names:
                r.roundtrip(n, pools[n])
        for _ in range(calls):
            for n in names:
                t0 = time.perf_counter()
                r.roundtrip(n, pools[n])
                lat[n].append((time.perf_counter() - t0) * 1e6)
    for n, xs in lat.items():
        out.samples[n] = xs
        xs_sorted = sorted(xs)
        out.extra.setdefault("p99_us", {})[n] = xs_sorted[int(0.99 * (len(xs) - 1))]
    out.notes.append("joblib has no single-task API; left out")
    if "pool" in out.samples:
        ratio = out.median("parstream") / out.median("pool")
        out.goal("parstream / Pool.apply, median", ratio, "<=", 0.8)
        p99 = out.extra["p99_us"]
        out.goal("parstream / Pool.apply, p99", p99["parstream"] / p99["pool"], "<=", 0.8)
    return out


def bench_cold(cfg: Config) -> Outcome:
    out = Outcome("cold", "new pool -> first result -> closed, in the suite's process", unit="s")
    # billiard's close alone takes ~0.8 s: too slow for a smoke run.
    names = ["parstream"] + [p for p in _quick_peers(cfg, out, ("billiard",)) if p != "joblib"]
    _interleave(
        out,
        {n: (lambda n=n: r.cold_start(n, cfg.workers, cfg.backend)) for n in names},
        _rounds(cfg, 2, 5),
    )
    out.notes.append(
        "pool, ppe, pebble, mpire and billiard fork (fast, unsafe with threads); "
        "loky and parstream start fresh interpreters; 'startup' measures fresh processes"
    )
    return out


def _run_child(spec: dict[str, Any], timeout: float = 180) -> tuple[dict[str, Any], float]:
    """``python -m benchmarks.child SPEC`` in a fresh process: its figures, and its wall time."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(x for x in (str(ROOT), env.get("PYTHONPATH")) if x)
    # As a user's interpreter: bytecode cached after the first run (a shell
    # with PYTHONDONTWRITEBYTECODE would recompile every pure-Python package,
    # parstream included, in every fresh process, and the stdlib never).
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.child", json.dumps(spec)],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"exit {proc.returncode}: {proc.stderr.strip()[-500:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1]), wall


def _interpreter_start() -> float:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", "pass"], check=True)
    return time.perf_counter() - t0


def bench_startup(cfg: Config) -> list[Outcome]:
    """Issue 12: import + new pool + first result, in a fresh bare process and in a
    heavy one (numpy imported, hundreds of MB resident); then a second pool there."""
    ballast = 50 if cfg.quick else 500
    bare = Outcome("startup_bare", "fresh bare process: import + new pool + first result")
    heavy = Outcome(
        "startup_heavy",
        f"fresh process holding numpy and {ballast} MB: import + new pool + first result",
    )
    second = Outcome(
        "startup_second", "a second new pool -> first result in the same (bare) process"
    )
    names = ["parstream"]
    for p in cfg.peers:
        if p == "pool":
            names += ["pool", "pool-spawn"]
        elif p in child.STARTUP_NAMES:
            names.append(p)
    if cfg.quick:
        names = [n for n in names if n in ("parstream", "pool-spawn")]
        bare.notes.append("quick mode: parstream and pool-spawn only")
    rounds = _rounds(cfg, 1, 3)
    walls: dict[str, dict[str, list[float]]] = {"bare": {}, "heavy": {}}
    rss: dict[str, float] = {}
    failed: dict[str, str] = {}
    interp: list[float] = []
    for i in range(rounds):
        interp.append(_interpreter_start())
        k = i % len(names)
        for name in names[k:] + names[:k]:
            if name in failed:
                continue
            for where, outcome, mb in (("bare", bare, 0), ("heavy", heavy, ballast)):
                spec = {
                    "what": "startup",
                    "name": name,
                    "workers": cfg.workers,
                    "ballast_mb": mb,
                    "backend": cfg.backend if name == "parstream" else None,
                }
                try:
                    res, wall = _run_child(spec)
                except (RuntimeError, subprocess.TimeoutExpired) as e:
                    failed[name] = str(e)
                    break
                outcome.samples.setdefault(name, []).append(res["first"])
                walls[where].setdefault(name, []).append(wall)
                rss[where] = res["rss_mb"]
                if where == "bare":
                    second.samples.setdefault(name, []).append(res["second"])
    for name, why in failed.items():
        for o in (bare, heavy, second):
            o.samples.pop(name, None)
        bare.notes.append(f"{name} failed and is left out: {why}")
    for where, outcome in (("bare", bare), ("heavy", heavy)):
        outcome.extra["process_wall_s"] = {
            k: statistics.median(v) for k, v in walls[where].items() if k not in failed
        }
        outcome.extra["parent_rss_mb"] = rss.get(where)
        outcome.extra["interpreter_start_s"] = statistics.median(interp)
        outcome.notes.append(
            "timed inside the child, from before the import to the first result; "
            "process_wall_s adds interpreter start and exit"
        )
        if "pool-spawn" in outcome.samples and "parstream" in outcome.samples:
            outcome.goal(
                "parstream / spawn Pool",
                outcome.median("parstream") / outcome.median("pool-spawn"),
                "<=",
                1.0,
            )
    second.notes.append("parstream's second Supervisor in the same process: goal <= 30 ms")
    if "parstream" in second.samples:
        second.goal("parstream second Supervisor, s", second.median("parstream"), "<=", 0.030)
    return [bare, heavy, second]


def bench_io(cfg: Config) -> Outcome:
    n, sleep = (8, 0.1) if cfg.quick else (20, 0.2)
    out = Outcome("io", f"{n} items each waiting {sleep} s; max_concurrency={n}")
    items = [sleep] * n
    with contextlib.ExitStack() as stack:
        sup = stack.enter_context(r.supervisor(cfg.workers, cfg.backend))
        runners: dict[str, Callable[[], float]] = {
            "sequential": _timed(lambda: [w.io_wait(x) for x in items]),
            "parstream": _timed(lambda: list(sup.stream_map(w.io_wait, items, max_concurrency=n))),
        }
        for name in _quick_peers(cfg, out, ("billiard",)):
            if name == "joblib":
                continue
            pool = stack.enter_context(r.open_pool(name, n))
            runners[name] = _timed(
                lambda name=name, pool=pool: r.pmap(name, pool, w.io_wait, items, 1)
            )
        _interleave(out, runners, _rounds(cfg, 2, 3), warmup=1)
    out.notes.append(
        f"peers get {n} workers up front; parstream keeps {cfg.workers} and grows for the stream"
    )
    out.floor = sleep  # every item at once: the longest wait
    out.floor_what = "the longest item (all waits at once)"
    return out


def bench_faults(cfg: Config) -> Outcome:
    out = Outcome("faults", "recovery: SIGKILL of a busy worker, and a hung item's timeout")
    rounds = _rounds(cfg, 2, 5)
    kill_to_crash: list[float] = []
    kill_to_replacement: list[float] = []
    timeout_to_next: list[float] = []
    others: list[float] = []
    with r.supervisor(cfg.workers, cfg.backend) as sup:
        sup.async_(w.noop).await_()
        for _ in range(rounds):
            busy = [sup.async_(w.io_wait, 30) for _ in range(cfg.workers - 1)]
            victim = sup.async_(w.io_wait, 30)
            while victim.pid is None or any(b.pid is None for b in busy):
                time.sleep(0.001)
            time.sleep(0.02)
            t0 = time.perf_counter()
            os.kill(victim.pid, signal.SIGKILL)
            nxt = sup.async_(os.getpid)  # every other worker is busy: the replacement runs it
            with contextlib.suppress(parstream.WorkerCrashed):
                victim.await_()
            kill_to_crash.append(time.perf_counter() - t0)
            nxt.await_()
            kill_to_replacement.append(time.perf_counter() - t0)
            for b in busy:
                b.shutdown(parstream.BRUTAL_KILL)
        timeout = 0.2
        for _ in range(rounds):
            items = [0, *range(1, 400)]  # item 0 hangs; the rest take ~5 ms each
            stream = sup.async_stream_nolink(
                w.hang_or_square,
                items,
                timeout=timeout,
                on_timeout="kill_task",
                ordered=False,
                chunksize=1,
            )
            t0 = time.perf_counter()
            times: list[float] = []
            exit_at = None
            for res in stream:
                now = time.perf_counter() - t0
                if isinstance(res, parstream.Exit):
                    exit_at = now
                elif exit_at is not None and len(timeout_to_next) < len(others) + 1:
                    timeout_to_next.append(now - exit_at)
                times.append(now)
            assert exit_at is not None
            during = sum(1 for t in times if t < exit_at)
            others.append(during / exit_at)
    out.samples["kill->crash reported"] = kill_to_crash
    out.samples["kill->replacement's result"] = kill_to_replacement
    out.samples["timeout->next result"] = timeout_to_next
    out.extra["other_workers_items_per_s_during_hang"] = statistics.median(others)
    out.notes.append(
        "parstream only: peers either hang, break the pool or abort the job (shared/peers.md); "
        "'recovery' compares the replacement's first result with the pools that survive"
    )
    return out


def bench_recovery(cfg: Config) -> list[Outcome]:
    """Issue 12: SIGKILL of a busy worker -> the replacement's first result, in a small
    parent, a heavy one (numpy and hundreds of MB) and the suite's own process."""
    import psutil

    rounds = _rounds(cfg, 1, 5)
    ballast = 50 if cfg.quick else 500
    what = "SIGKILL of a busy worker -> the replacement's first result"
    small = Outcome("recovery_small", f"{what}, parent: a small fresh process")
    heavy = Outcome("recovery_heavy", f"{what}, parent: numpy and {ballast} MB resident")
    suite_ = Outcome("recovery_suite", f"{what}, parent: this suite's process")
    names = ["parstream"] + [p for p in cfg.peers if p in child.RECOVERY_NAMES]
    if cfg.quick:
        names = [n for n in names if n in ("parstream", "pool")]
    failed: dict[str, str] = {}
    for name in names:
        for outcome, mb in ((small, 0), (heavy, ballast)):
            spec = {
                "what": "recovery",
                "name": name,
                "workers": cfg.workers,
                "rounds": rounds,
                "ballast_mb": mb,
                "backend": cfg.backend if name == "parstream" else None,
            }
            try:
                res, _ = _run_child(spec)
            except (RuntimeError, subprocess.TimeoutExpired) as e:
                failed[f"{name} ({outcome.name})"] = str(e)
                continue
            outcome.samples[name] = res["times"]
            outcome.extra["parent_rss_mb"] = res["rss_mb"]
        try:
            suite_.samples[name] = child.recovery(
                name, cfg.workers, rounds, cfg.backend if name == "parstream" else None
            )
        except (AssertionError, OSError, TimeoutError) as e:
            failed[f"{name} (suite)"] = repr(e)
    suite_.extra["parent_rss_mb"] = psutil.Process().memory_info().rss / 2**20
    for o in (small, heavy, suite_):
        o.notes.append(
            "every worker busy, one SIGKILLed, then a probe task: only the replacement can "
            "run it; ppe and loky break on a dead worker, joblib and mpire abort the job"
        )
        if "parstream" in o.samples:
            o.goal("parstream kill -> first result, s", o.median("parstream"), "<=", 0.030)
    for what_failed, why in failed.items():
        small.notes.append(f"{what_failed} failed: {why}")
    return [small, heavy, suite_]


def bench_infinite(cfg: Config) -> Outcome:
    n = 100_000 if cfg.quick else 1_000_000
    out = Outcome("infinite", f"map(square, itertools.count()) consumed for {n:,} items")
    names = ["parstream", EXECUTOR_MAP] + [
        p for p in ("pool", "joblib") if p in cfg.peers and not (cfg.quick and p == "joblib")
    ]
    for name in names:
        res = r.infinite_rss(name, n, cfg.workers, backend=cfg.backend)
        out.samples[name] = [res["seconds"]]
        out.extra[name] = res
    out.notes.append("goal: parent RSS flat (growth_mb ~ 0)")
    return out


def _memcpy_seconds(nbytes: int) -> float:
    """The fastest of a few in-process copies of ``nbytes`` with numpy: memory bandwidth."""
    import numpy as np

    src = np.ones(nbytes // 8)
    dst = np.empty_like(src)
    best = math.inf
    for _ in range(5):
        t0 = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - t0)
    return best


def _array_floor(cfg: Config, out: Outcome, nbytes: int) -> None:
    """Floor for array items: compute spread over the cores, or moving the bytes once."""
    copy = _memcpy_seconds(nbytes)
    compute = out.median("sequential") / cfg.workers
    out.floor = max(compute, copy)
    out.floor_what = "max(sequential / cores, memcpy of the same bytes)"
    out.extra["bytes_moved_mib"] = nbytes / 2**20
    out.extra["memcpy_s"] = copy
    out.extra["memcpy_gib_per_s"] = nbytes / copy / 2**30
    out.extra["sequential_over_cores_s"] = compute


def bench_numpy(cfg: Config) -> Outcome:
    import numpy as np

    n = 16 if cfg.quick else 64
    rng = np.random.default_rng(0)
    arrays = [rng.standard_normal(131_072) for _ in range(n)]  # 1 MiB each
    out = Outcome("numpy", f"{n} x rfft of a 1 MiB float64 array (1 MiB in, 0.5 MiB out)")
    peers = _quick_peers(cfg, out, ("joblib", "billiard"))
    _map_workload(cfg, out, w.spectrum, arrays, 1, _rounds(cfg, 2, 3), peers)
    _array_floor(cfg, out, sum(a.nbytes for a in arrays) + n * w.spectrum(arrays[0]).nbytes)
    _speedup_goal(out, cfg.workers, 0.65, "goal x1.3 on 2 cores")
    _peer_goal(out, 0.6)
    return out


def bench_numpy_out(cfg: Config) -> Outcome:
    """Large results from small arguments: the other direction of ``numpy``."""
    n = 8 if cfg.quick else 64
    out = Outcome("numpy_out", f"{n} x a 1 MiB float64 array made from a seed (int in, 1 MiB out)")
    peers = _quick_peers(cfg, out, ("joblib", "billiard", "loky"))
    _map_workload(cfg, out, w.synth, list(range(n)), 1, _rounds(cfg, 2, 3), peers)
    _array_floor(cfg, out, n * w.synth(0).nbytes)
    _speedup_goal(out, cfg.workers, 0.65, "as numpy: x1.3 on 2 cores")
    return out


BENCHES: dict[str, Callable[[Config], Outcome | list[Outcome]]] = {
    "cpu": bench_cpu,
    "tiny": bench_tiny,
    "fine": bench_fine,
    "skew": bench_skew,
    "roundtrip": bench_roundtrip,
    "cold": bench_cold,
    "startup": bench_startup,
    "io": bench_io,
    "faults": bench_faults,
    "recovery": bench_recovery,
    "infinite": bench_infinite,
    "numpy": bench_numpy,
    "numpy_out": bench_numpy_out,
}


def scaling(cfg: Config, max_workers: int) -> Outcome:
    """Coarse CPU items with 1..max_workers workers: speedup and efficiency."""
    target = 0.03 if cfg.quick else 0.1
    limit = w.calibrate_primes(target)
    n = 4 * max_workers
    items = [limit] * n
    out = Outcome(
        "scaling", f"{n} prime counts of ~{target * 1e3:.0f} ms, workers 1..{max_workers}"
    )
    seq = []
    for _ in range(2):
        t0 = time.perf_counter()
        [w.count_primes(x) for x in items]
        seq.append(time.perf_counter() - t0)
    out.samples["sequential"] = seq
    for k in range(1, max_workers + 1):
        with r.supervisor(k, cfg.backend) as sup:
            list(sup.stream_map(w.count_primes, items[:k]))
            ts = []
            for _ in range(2):
                t0 = time.perf_counter()
                list(sup.stream_map(w.count_primes, items))
                ts.append(time.perf_counter() - t0)
        out.samples[f"parstream x{k}"] = ts
        out.extra.setdefault("efficiency", {})[k] = (
            statistics.median(seq) / statistics.median(ts) / k
        )
    return out


def run(cfg: Config, only: list[str]) -> Iterator[Outcome]:
    for name in only:
        got = BENCHES[name](cfg)
        yield from got if isinstance(got, list) else [got]


__all__ = ["BENCHES", "WORKLOADS", "Config", "Outcome", "run", "scaling"]
