"""The benchmark suite: workloads, interleaved repetitions, statistics.

Every workload runs sequential, parstream and each available peer on the same
inputs; one repetition of each runner per round, rounds after a warm-up, so
drift on a shared machine hits every runner alike. Results are medians with
the min-max spread, speedups over sequential, and parstream's ratio to the
best peer, all from the same run.
"""

from __future__ import annotations

import contextlib
import os
import signal
import statistics
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import parstream
from benchmarks import runners as r, workloads as w

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

EXECUTOR_MAP = "parstream Supervisor.map"  # the Executor's map, next to parstream.map
WORKLOADS = ("cpu", "tiny", "roundtrip", "cold", "io", "faults", "infinite", "numpy")


@dataclass
class Config:
    workers: int
    peers: list[str]
    quick: bool
    skipped: dict[str, str] = field(default_factory=dict)


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

    def summary(self) -> dict[str, Any]:
        rows: dict[str, Any] = {}
        seq = self.samples.get("sequential")
        seq_med = statistics.median(seq) if seq else None
        for runner, xs in self.samples.items():
            med = statistics.median(xs)
            row = {"median": med, "min": min(xs), "max": max(xs), "n": len(xs)}
            if seq_med and runner != "sequential" and not self.higher_is_better:
                row["speedup"] = seq_med / med
            rows[runner] = row
        peers = {
            k: v["median"]
            for k, v in rows.items()
            if k != "sequential" and not k.startswith("parstream")
        }
        if "parstream" in rows and peers:
            if self.higher_is_better:
                best = max(peers, key=lambda k: peers[k])
                ratio = peers[best] / rows["parstream"]["median"]
            else:
                best = min(peers, key=lambda k: peers[k])
                ratio = rows["parstream"]["median"] / peers[best]
            # ratio < 1 means parstream beat the best peer.
            self.extra["best_peer"] = best
            self.extra["ratio_to_best_peer"] = ratio
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
) -> None:
    """Every runner on the same items; ``more(sup)`` adds runs on parstream's
    warm supervisor (rows named ``parstream ...``, not counted as peers)."""
    expected = [fn(x) for x in items[:3]]
    with contextlib.ExitStack() as stack:
        runners: dict[str, Callable[[], float]] = {
            "sequential": _timed(lambda: [fn(x) for x in items])
        }
        for name in ["parstream", *peers]:
            pool = stack.enter_context(r.open_pool(name, cfg.workers))

            def run(name: str = name, pool: Any = pool) -> None:
                out = r.pmap(name, pool, fn, items, chunksize)
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


def bench_cpu(cfg: Config) -> Outcome:
    target = 0.03 if cfg.quick else 0.1
    limit = w.calibrate_primes(target)
    n = 4 * cfg.workers if cfg.quick else 16
    out = Outcome("cpu", f"{n} pure-Python prime counts of ~{target * 1e3:.0f} ms each")
    _map_workload(cfg, out, w.count_primes, [limit] * n, 1, _rounds(cfg, 2, 3), cfg.peers)
    item_ms = statistics.median(out.samples["sequential"]) / n * 1e3
    out.what = f"{n} pure-Python prime counts of ~{item_ms:.0f} ms each (measured)"
    out.extra["cores"] = cfg.workers
    return out


def bench_tiny(cfg: Config) -> Outcome:
    n = 50_000 if cfg.quick else 200_000
    chunk = max(1, n // (4 * cfg.workers))
    out = Outcome(
        "tiny",
        f"{n:,} x square(x); parstream untuned, peers with chunksize={chunk:,} "
        "(joblib and mpire automatic)",
    )
    peers = [p for p in cfg.peers if not (cfg.quick and p in ("joblib", "pebble", "mpire"))]
    if len(peers) < len(cfg.peers):
        out.notes.append("quick mode skips the slowest peers (joblib, pebble, mpire)")
    items = list(range(n))

    def executor_map(sup: Any) -> dict[str, Callable[[], Any]]:
        # Issue 11: the Executor's map runs on the same engine, on the same warm
        # supervisor; the goal is within 1.1x of parstream.map.
        def run() -> None:
            out = list(sup.map(w.square, items))
            assert len(out) == n

        return {EXECUTOR_MAP: run}

    _map_workload(cfg, out, w.square, items, chunk, _rounds(cfg, 3, 5), peers, executor_map)
    out.extra["items"] = n
    out.extra["items_per_s"] = {k: n / statistics.median(v) for k, v in out.samples.items()}
    out.extra["executor_map_over_map"] = statistics.median(
        out.samples[EXECUTOR_MAP]
    ) / statistics.median(out.samples["parstream"])
    out.notes.append(f"'{EXECUTOR_MAP}': the same warm supervisor as 'parstream' (goal <= 1.1x)")
    return out


def bench_roundtrip(cfg: Config) -> Outcome:
    calls = 200 if cfg.quick else 2000
    out = Outcome("roundtrip", "one no-op task's round trip on a warm pool", unit="us")
    names = ["parstream"] + [p for p in cfg.peers if p != "joblib"]
    lat: dict[str, list[float]] = {n: [] for n in names}
    with contextlib.ExitStack() as stack:
        pools = {n: stack.enter_context(r.open_pool(n, cfg.workers)) for n in names}
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
    return out


def bench_cold(cfg: Config) -> Outcome:
    out = Outcome("cold", "new pool -> first result -> closed", unit="s")
    names = ["parstream"] + [p for p in cfg.peers if p != "joblib"]
    _interleave(
        out, {n: (lambda n=n: r.cold_start(n, cfg.workers)) for n in names}, _rounds(cfg, 2, 5)
    )
    out.notes.append(
        "pool, ppe, pebble and mpire fork (fast, unsafe with threads); "
        "loky and parstream start fresh interpreters"
    )
    return out


def bench_io(cfg: Config) -> Outcome:
    n, sleep = (8, 0.1) if cfg.quick else (20, 0.2)
    out = Outcome("io", f"{n} items each waiting {sleep} s; max_concurrency={n}")
    items = [sleep] * n
    with contextlib.ExitStack() as stack:
        sup = stack.enter_context(parstream.Supervisor(max_workers=cfg.workers))
        runners: dict[str, Callable[[], float]] = {
            "sequential": _timed(lambda: [w.io_wait(x) for x in items]),
            "parstream": _timed(lambda: list(sup.stream_map(w.io_wait, items, max_concurrency=n))),
        }
        for name in cfg.peers:
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
    return out


def bench_faults(cfg: Config) -> Outcome:
    out = Outcome("faults", "recovery: SIGKILL of a busy worker, and a hung item's timeout")
    rounds = _rounds(cfg, 2, 5)
    kill_to_crash: list[float] = []
    kill_to_replacement: list[float] = []
    timeout_to_next: list[float] = []
    others: list[float] = []
    with parstream.Supervisor(max_workers=cfg.workers) as sup:
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
        "parstream only: peers either hang, break the pool or abort the job (shared/peers.md)"
    )
    return out


def bench_infinite(cfg: Config) -> Outcome:
    n = 100_000 if cfg.quick else 1_000_000
    out = Outcome("infinite", f"map(square, itertools.count()) consumed for {n:,} items")
    names = ["parstream", EXECUTOR_MAP] + [
        p for p in ("pool", "joblib") if p in cfg.peers and not (cfg.quick and p == "joblib")
    ]
    for name in names:
        res = r.infinite_rss(name, n, cfg.workers)
        out.samples[name] = [res["seconds"]]
        out.extra[name] = res
    out.notes.append("goal: parent RSS flat (growth_mb ~ 0)")
    return out


def bench_numpy(cfg: Config) -> Outcome:
    import numpy as np

    n = 16 if cfg.quick else 64
    rng = np.random.default_rng(0)
    arrays = [rng.standard_normal(131_072) for _ in range(n)]  # 1 MiB each
    out = Outcome("numpy", f"{n} x rfft of a 1 MiB float64 array (1 MiB in, ~1 MiB out)")
    peers = [p for p in cfg.peers if p not in ("joblib",)] if cfg.quick else cfg.peers
    _map_workload(cfg, out, w.spectrum, arrays, 1, _rounds(cfg, 2, 3), peers)
    return out


BENCHES: dict[str, Callable[[Config], Outcome]] = {
    "cpu": bench_cpu,
    "tiny": bench_tiny,
    "roundtrip": bench_roundtrip,
    "cold": bench_cold,
    "io": bench_io,
    "faults": bench_faults,
    "infinite": bench_infinite,
    "numpy": bench_numpy,
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
        with parstream.Supervisor(max_workers=k) as sup:
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
        yield BENCHES[name](cfg)


__all__ = ["BENCHES", "WORKLOADS", "Config", "Outcome", "run", "scaling"]
