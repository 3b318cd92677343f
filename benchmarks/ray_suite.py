"""``python -m benchmarks --backend ray``: parstream's Ray backend against plain Ray.

Issue 10. In this process it starts a real multi-node Ray cluster on this
machine (a head with no CPUs and two worker nodes of one CPU each, bound to
127.0.0.1, token authentication, under a short temporary directory: the
settings of the tests' ``ray_cluster`` fixture), runs the workloads below
and tears the cluster down, also on Ctrl-C, SIGTERM or an error. Ray reads
its settings when first imported, so nothing here imports Ray before
``local_cluster`` has set them.

Every runner works on the same items in the same run, interleaved over a few
rounds after a warm-up (``suite._interleave``); figures are medians with the
min-max spread.

- ``coarse``: 16 pure-Python prime counts of ~60 ms: parstream's
  ``stream_map`` on ``Supervisor(backend=RayBackend(address=...))`` (untuned:
  ``max_concurrency`` is the cluster's CPUs) against plain Ray (the function
  made remote once with ``max_retries=0``, at most N refs in flight, one
  ``ray.wait(num_returns=1)`` per result) with N = the cluster's CPUs and
  N = 4, and ``ray.util.multiprocessing.Pool(processes=2).map``. Goal:
  parstream <= 1.05 x plain Ray with N = CPUs.
- ``tiny``: 200,000 x ``square``: parstream's items/s against plain Ray's
  tasks/s (one task per item, measured on 2,000 items) and ``Pool.imap`` with
  a chunk size. Goal: parstream items/s >= 10 x plain Ray's best tasks/s.
- ``hang``: ``async_stream_nolink`` over 5 ms items of which the first hangs
  for ever, ``timeout=0.5, on_timeout="kill_task"``. Goal: the first result
  after the hung item's ``Exit`` arrives <= 100 ms after its timeout deadline
  (the moment the item started on its worker, as the worker noted it, plus
  the timeout).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import itertools
import json
import math
import os
import secrets
import shutil
import signal
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

import parstream
from benchmarks import suite, workloads as w

if TYPE_CHECKING:
    import argparse
    from collections.abc import Callable, Iterator

ROOT = Path(__file__).resolve().parents[1]
WORKLOADS = ("coarse", "tiny", "hang")
NODE_CPUS = 1
WORKER_NODES = 2
CLUSTER_WHAT = (
    f"a local Ray cluster on this machine: a head node with 0 CPUs and {WORKER_NODES} "
    f"worker nodes of {NODE_CPUS} CPU each (ray.cluster_utils.Cluster, in the benchmark "
    "process; 127.0.0.1 only, token auth)"
)


@dataclass
class Cluster:
    """The running cluster: Ray's ``Cluster``, its address, and the node names by id."""

    cluster: Any
    address: str
    names: dict[str, str]  # node id -> "head", "w1", "w2"
    cpus: int


def _ray_env(tmp: str) -> dict[str, str]:
    """Loopback only, token auth, files under ``tmp``, no usage reporting; the
    benchmarks importable on the workers (their functions travel by reference)."""
    return {
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": secrets.token_hex(32),
        "RAY_TMPDIR": tmp,
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_DEDUP_LOGS": "0",
        "PYTHONPATH": os.pathsep.join(
            p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p
        ),
    }


def _terminate(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)  # unwinds like Ctrl-C: the cluster is torn down


@contextlib.contextmanager
def local_cluster() -> Iterator[Cluster]:
    """Start the two-node cluster and connect this process; tear both down after."""
    if "ray" in sys.modules:
        raise RuntimeError("ray was imported before its settings were set; they must come first")
    tmp = tempfile.mkdtemp(prefix="rb", dir="/tmp")  # AF_UNIX paths: 107 bytes at most
    saved = dict(os.environ)
    os.environ.update(_ray_env(tmp))
    old_term = signal.signal(signal.SIGTERM, _terminate)
    cluster: Any = None
    try:
        import ray
        from ray.cluster_utils import Cluster as RayCluster

        # Made empty, then the head added: a failed start still leaves an
        # object whose shutdown() ends what did start.
        cluster = RayCluster(initialize_head=False)
        head = cluster.add_node(
            num_cpus=0,
            no_monitor=True,
            include_dashboard=False,
            temp_dir=os.path.join(tmp, "ray"),
            _system_config={
                "health_check_period_ms": 500,
                "health_check_failure_threshold": 3,
                "health_check_timeout_ms": 500,
            },
        )
        names = {head.node_id: "head"}
        for i in range(WORKER_NODES):
            node = cluster.add_node(num_cpus=NODE_CPUS)
            names[node.node_id] = f"w{i + 1}"
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, log_to_driver=False)
        cpus = int(ray.cluster_resources().get("CPU", 0))
        yield Cluster(cluster, cluster.address, names, cpus)
    finally:
        try:
            if "ray" in sys.modules and sys.modules["ray"].is_initialized():
                sys.modules["ray"].shutdown()
        finally:
            if cluster is not None:
                cluster.shutdown()
            shutil.rmtree(tmp, ignore_errors=True)
            signal.signal(signal.SIGTERM, old_term)
            os.environ.clear()
            os.environ.update(saved)


# -- runners ------------------------------------------------------------------


def plain_ray(
    remote: Any, items: list[Any], in_flight: int, arrived: list[Any] | None = None
) -> list[Any]:
    """Plain Ray: one task per item, at most ``in_flight`` refs out, results in order.

    ``arrived``: where to append ``(*result, time.time())`` as each result comes."""
    import ray

    results: list[Any] = [None] * len(items)
    pending: dict[Any, int] = {}

    def take_one() -> None:
        ready, _ = ray.wait(list(pending), num_returns=1)
        for ref in ready:
            results[pending.pop(ref)] = value = ray.get(ref)
            if arrived is not None:
                arrived.append((*value, time.time()))

    for i, x in enumerate(items):
        if len(pending) >= in_flight:
            take_one()
        pending[remote.remote(x)] = i
    while pending:
        take_one()
    return results


def plain_ray_hang(
    submit: Callable[[Any], Any], items: list[Any], in_flight: int, timeout: float
) -> list[tuple[float, Any, bool]]:
    """Plain Ray's take on a per-item timeout: the bounded loop, and a task still
    unfinished ``timeout`` s after its submission force-cancelled (Ray cannot see
    when it started). Returns (time.time(), item, timed out) per item as it settled."""
    import ray

    events: list[tuple[float, Any, bool]] = []
    pending: dict[Any, tuple[float, Any]] = {}  # ref -> (its deadline, its item)

    def settle_one() -> None:
        now = time.time()
        wait = max(0.0, min(d for d, _ in pending.values()) - now)
        ready, _ = ray.wait(list(pending), num_returns=1, timeout=wait)
        if ready:
            for ref in ready:
                _, item = pending.pop(ref)
                ray.get(ref)
                events.append((time.time(), item, False))
            return
        ref = min(pending, key=lambda r: pending[r][0])
        if pending[ref][0] <= time.time():
            _, item = pending.pop(ref)
            ray.cancel(ref, force=True)
            with contextlib.suppress(ray.exceptions.TaskCancelledError):
                ray.get(ref)
            events.append((time.time(), item, True))

    for x in items:
        while len(pending) >= in_flight:
            settle_one()
        pending[submit(x)] = (time.time() + timeout, x)
    while pending:
        settle_one()
    return events


def node_id(_: Any = None) -> str:
    """Where this runs (for where the Pool's actors landed)."""
    import ray

    return str(ray.get_runtime_context().get_node_id())


def _checked(name: str, got: list[Any], expected: list[Any]) -> None:
    assert got == expected, (name, len(got), got[:3], expected[:3])


def _supervisor(rc: Cluster) -> parstream.Supervisor:
    sup = parstream.Supervisor(backend=parstream.RayBackend(address=rc.address))
    sup.async_(w.noop).await_()
    return sup


def _descendants_cpu() -> float:
    """CPU seconds of this process's live descendants: the cluster's processes."""
    import psutil

    total = 0.0
    for p in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):
            t = p.cpu_times()
            total += t.user + t.system
    return total


def _cpu_profile(run: Callable[[], Any], reps: int) -> dict[str, float]:
    """Per run, medians: wall, this process's CPU (the driver), and the cluster's CPU."""
    walls, driver, cluster = [], [], []
    for _ in range(reps):
        c0, d0, t0 = _descendants_cpu(), time.process_time(), time.perf_counter()
        run()
        t1, d1, c1 = time.perf_counter(), time.process_time(), _descendants_cpu()
        walls.append(t1 - t0)
        driver.append(d1 - d0)
        cluster.append(c1 - c0)
    return {
        "wall_s": round(statistics.median(walls), 4),
        "driver_cpu_s": round(statistics.median(driver), 4),
        "cluster_cpu_s": round(statistics.median(cluster), 4),
    }


def _timeline(
    run: Callable[[], list[tuple[float, float, int, float]]], reps: int
) -> dict[str, Any]:
    """Where a coarse run's time goes, from each item's own start and end on its
    worker and the moment its result reached this process; medians over ``reps``."""
    rows: list[dict[str, float]] = []
    for _ in range(reps):
        t0 = time.time()
        spans = run()  # (start, end, pid, arrived)
        t1 = time.time()
        by_pid: dict[int, list[tuple[float, float, float]]] = {}
        for s, e, pid, a in spans:
            by_pid.setdefault(pid, []).append((s, e, a))
        gaps, relaunch = [], []
        for runs in by_pid.values():
            runs.sort()
            for a, b in itertools.pairwise(runs):
                gaps.append(b[0] - a[1])
                relaunch.append(b[0] - a[2])
        rows.append(
            {
                "wall_ms": (t1 - t0) * 1e3,
                "first_item_start_ms": (min(s for s, _, _, _ in spans) - t0) * 1e3,
                "item_ms": statistics.median(e - s for s, e, _, _ in spans) * 1e3,
                "item_end_to_driver_ms": statistics.median(a - e for _, e, _, a in spans) * 1e3,
                "gap_between_items_on_a_process_ms": statistics.median(gaps) * 1e3,
                "driver_has_result_to_next_start_ms": statistics.median(relaunch) * 1e3,
                "processes": len(by_pid),
                "busiest_process_share": max(len(v) for v in by_pid.values()) / len(spans),
                "busy_fraction_of_cpus": math.fsum(e - s for s, e, _, _ in spans)
                / (2 * (t1 - t0)),
            }
        )
    return {k: round(statistics.median(r[k] for r in rows), 3) for k in rows[0]}


# -- workloads ----------------------------------------------------------------


def bench_coarse(rc: Cluster, quick: bool) -> suite.Outcome:
    import ray
    from ray.util.multiprocessing import Pool

    target = 0.06
    limit = w.calibrate_primes(target)
    n = 8 if quick else 16
    items = [limit] * n
    expected = [w.count_primes(limit)] * n
    plain = f"plain Ray, {rc.cpus} in flight"
    plain4 = "plain Ray, 4 in flight"
    out = suite.Outcome("coarse", f"{n} pure-Python prime counts of ~{target * 1e3:.0f} ms")
    remote = ray.remote(w.count_primes).options(max_retries=0)
    pool = Pool(processes=rc.cpus)
    try:
        actor_nodes = sorted(rc.names.get(x, x) for x in pool.map(node_id, range(8), 1))
        with _supervisor(rc) as sup:
            runners: dict[str, Callable[[], float]] = {
                "sequential": suite._timed(lambda: [w.count_primes(x) for x in items]),
                "parstream": suite._timed(
                    lambda: _checked(
                        "parstream", list(sup.stream_map(w.count_primes, items)), expected
                    )
                ),
                plain: suite._timed(
                    lambda: _checked(plain, plain_ray(remote, items, rc.cpus), expected)
                ),
                plain4: suite._timed(
                    lambda: _checked(plain4, plain_ray(remote, items, 4), expected)
                ),
                "ray Pool.map": suite._timed(
                    lambda: _checked("ray Pool.map", pool.map(w.count_primes, items), expected)
                ),
            }
            suite._interleave(out, runners, 3 if quick else 11)
            # Where the time goes, outside the timed rounds: each item's span on
            # its worker and its result's arrival here (unordered, so arrival is
            # not held back by order); chunksize=n/CPUs shows the cost of a task per item.
            timed_remote = ray.remote(w.timed_primes).options(max_retries=0)

            def ps(**options: Any) -> list[tuple[float, float, int, float]]:
                stream = sup.async_stream(w.timed_primes, items, ordered=False, **options)
                return [(*res.value, time.time()) for res in stream]

            def plain_spans() -> list[tuple[float, float, int, float]]:
                spans: list[tuple[float, float, int, float]] = []
                plain_ray(timed_remote, items, rc.cpus, arrived=spans)
                return spans

            out.extra["timeline"] = {
                "parstream (async_stream, unordered)": _timeline(ps, 5),
                f"parstream chunksize={n // rc.cpus}": _timeline(
                    lambda: ps(chunksize=n // rc.cpus), 5
                ),
                plain: _timeline(plain_spans, 5),
            }
            out.extra["cpu_per_run"] = {
                "parstream": _cpu_profile(lambda: list(sup.stream_map(w.count_primes, items)), 3),
                plain: _cpu_profile(lambda: plain_ray(remote, items, rc.cpus), 3),
            }
    finally:
        pool.terminate()
    item_ms = out.median("sequential") / n * 1e3
    out.what = f"{n} pure-Python prime counts of ~{item_ms:.0f} ms each (measured)"
    out.floor = out.median("sequential") / rc.cpus
    out.floor_what = f"sequential / the cluster's {rc.cpus} CPUs"
    out.extra["ray_pool_actor_nodes"] = sorted(set(actor_nodes))
    out.notes.append(
        f"'{plain}': ray.remote(fn).options(max_retries=0), made once; a new task whenever "
        f"fewer than {rc.cpus} are out, one ray.wait(num_returns=1) per result; "
        f"'{plain4}' the same with 4 out; 'ray Pool.map': "
        f"ray.util.multiprocessing.Pool(processes={rc.cpus}).map, its own chunking"
    )
    out.notes.append(
        "timeline (medians of 5 runs): item start/end as time.time() on the worker, arrival "
        "as time.time() here; cpu_per_run: CPU s of this process (the driver) and of the "
        "cluster's processes (raylets, GCS, workers)"
    )
    out.goal(f"parstream / {plain}", out.median("parstream") / out.median(plain), "<=", 1.05)
    return out


def bench_tiny(rc: Cluster, quick: bool) -> suite.Outcome:
    import ray
    from ray.util.multiprocessing import Pool

    n = 50_000 if quick else 200_000
    n_tasks = 500 if quick else 2_000
    chunk = max(1, n // (4 * rc.cpus))
    items = list(range(n))
    expected = [w.square(x) for x in items]
    out = suite.Outcome(
        "tiny",
        f"{n:,} x square(x): items/s; plain Ray one task per item on the first {n_tasks:,}",
        unit="items/s",
        higher_is_better=True,
    )
    remote = ray.remote(w.square).options(max_retries=0)
    plain = {k: f"plain Ray per task, {k} in flight" for k in sorted({rc.cpus, 8})}
    imap = f"ray Pool.imap chunksize={chunk:,}"

    def rate(count: int, fn: Callable[[], Any]) -> Callable[[], float]:
        timed = suite._timed(fn)
        return lambda: count / timed()

    pool = Pool(processes=rc.cpus)
    try:
        with _supervisor(rc) as sup:
            runners: dict[str, Callable[[], float]] = {
                "sequential": rate(n, lambda: [w.square(x) for x in items]),
                "parstream": rate(
                    n,
                    lambda: _checked("parstream", list(sup.stream_map(w.square, items)), expected),
                ),
            }
            for k, label in plain.items():
                runners[label] = rate(
                    n_tasks,
                    lambda k=k, label=label: _checked(
                        label, plain_ray(remote, items[:n_tasks], k), expected[:n_tasks]
                    ),
                )
            runners[imap] = rate(
                n, lambda: _checked(imap, list(pool.imap(w.square, items, chunk)), expected)
            )
            suite._interleave(out, runners, 3 if quick else 5)
    finally:
        pool.terminate()
    best = max(plain.values(), key=out.median)
    ratio = out.median("parstream") / out.median(best)
    out.extra["items"] = n
    out.extra["plain_ray_tasks"] = n_tasks
    out.extra["parstream_over_plain_ray_per_task"] = ratio
    out.notes.append(
        "parstream untuned (automatic batching); plain Ray: one task per item, the same "
        "bounded ray.wait loop as 'coarse', timed on the first "
        f"{n_tasks:,} items and given as tasks/s"
    )
    out.goal(f"parstream items/s / {best} tasks/s", ratio, ">=", 10.0)
    return out


def _hang_round(
    sup: parstream.Supervisor | None,
    tmp: str,
    timeout: float,
    n: int,
    concurrency: int | None,
    remote: Any = None,
) -> dict[str, Any]:
    """One stream where item 0 hangs: deadline -> Exit, Exit -> next result, and more.

    On parstream's supervisor ``sup``, or with ``sup=None`` on plain Ray's loop
    (``remote``, ``concurrency`` in flight)."""
    import functools

    directory = tempfile.mkdtemp(dir=tmp)
    t0 = time.time()
    events: list[tuple[float, Any, bool]] = []  # (when it came, its item, did it fail)
    reason = "TaskCancelledError"
    if sup is None:
        events = plain_ray_hang(
            lambda x: remote.remote(directory, x), list(range(n)), concurrency or 2, timeout
        )
    else:
        options: dict[str, Any] = {} if concurrency is None else {"max_concurrency": concurrency}
        stream = sup.async_stream_nolink(
            functools.partial(w.hang_marked, directory),
            range(n),
            timeout=timeout,
            on_timeout="kill_task",
            ordered=False,
            zip_input_on_exit=True,
            **options,
        )
        for res in stream:
            if isinstance(res, parstream.Exit):
                events.append((time.time(), res.input, True))
                if res.input == 0:
                    reason = type(res.reason).__name__
            else:
                events.append((time.time(), None, False))
    exits = [t for t, item, failed in events if failed and item == 0]
    assert len(exits) == 1, f"item 0: {len(exits)} Exits"
    exit_at = exits[0]
    after = [t for t, _, failed in events if not failed and t >= exit_at]
    assert after, "no result after the Exit"
    oks_before = sum(1 for t, _, failed in events if not failed and t < exit_at)
    started = float(Path(directory, "hang-start").read_text())
    deadline = started + timeout
    return {
        "deadline_to_exit": exit_at - deadline,
        "exit_to_next": after[0] - exit_at,
        "deadline_to_next": after[0] - deadline,
        "start_lag": started - t0,
        "oks_per_s_while_hung": oks_before / max(exit_at - started, 1e-9),
        "reason": reason,
        "other_items_failed": sum(1 for _, item, failed in events if failed and item != 0),
    }


def bench_hang(rc: Cluster, quick: bool) -> suite.Outcome:
    timeout = 0.5
    n = 301  # item 0 hangs; 300 x 5 ms keep the other CPU busy well past the timeout
    rounds = 3 if quick else 7
    out = suite.Outcome(
        "hang",
        f"async_stream_nolink over {n} items of 5 ms, item 0 hangs; timeout={timeout} s, "
        "on_timeout='kill_task', ordered=False, otherwise untuned",
    )
    import ray

    remote = ray.remote(w.hang_marked).options(max_retries=0)
    plain = f" (plain Ray, {rc.cpus} in flight)"
    variants = {"": None, " (max_concurrency=1)": 1, plain: rc.cpus}
    reasons: list[str] = []
    extra: dict[str, dict[str, list[float]]] = {}
    tmp = tempfile.mkdtemp(prefix="rbh")
    try:
        with _supervisor(rc) as sup:
            for _ in range(rounds):
                for suffix, concurrency in variants.items():
                    # Each round kills a Ray worker process: first make sure each
                    # node has a live one again (two concurrent 0.2 s items), so
                    # that no round waits for Ray to start a process before it.
                    list(sup.stream_map(w.io_wait, [0.2] * rc.cpus))
                    on = None if suffix == plain else sup
                    got = _hang_round(on, tmp, timeout, n, concurrency, remote)
                    for key, label in (
                        ("deadline_to_next", "deadline -> next result"),
                        ("deadline_to_exit", "deadline -> Exit"),
                        ("exit_to_next", "Exit -> next result"),
                    ):
                        out.samples.setdefault(label + suffix, []).append(got[key])
                    for key in ("start_lag", "oks_per_s_while_hung", "other_items_failed"):
                        extra.setdefault(key, {}).setdefault(suffix or "default", [])
                        extra[key][suffix or "default"].append(got[key])
                    if suffix != plain:
                        reasons.append(got["reason"])
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for key, by in extra.items():
        out.extra[f"{key}_median"] = {k: round(statistics.median(v), 3) for k, v in by.items()}
    out.extra["exit_reasons"] = sorted(set(reasons))
    all_timeouts = all(r == "TaskTimeout" for r in reasons)
    out.notes.append(
        "deadline = when item 0 began on its Ray worker (time.time() there, same machine) + "
        "the timeout; 'Exit': when the stream yielded item 0's Exit; 'next result': the "
        "first Ok the stream yielded after that Exit; start_lag: stream call -> item 0 began; "
        "oks_per_s_while_hung: Oks before the Exit / (Exit - item 0 began), the other "
        "CPU's output while one is hung (ideal for 5 ms items: 200/s)"
    )
    out.notes.append(
        "'(max_concurrency=1)' is no goal, it shows the worst case: the stream's only slot "
        "holds the hung item, so its next result needs a new Ray task after the kill, "
        "placed where Ray chooses (a node whose worker was just killed has to start a "
        "new process first)"
    )
    out.notes.append(
        f"'{plain.strip(' ()')}': the same items, one task each, the bounded ray.wait loop; a "
        "task unfinished timeout s after its submission is ray.cancel(force=True)ed and "
        "its TaskCancelledError awaited (the 'Exit')"
    )
    within = {
        k: f"{sum(x <= 0.100 for x in v)}/{len(v)}"
        for k, v in out.samples.items()
        if k.startswith("deadline -> next result")
    }
    out.extra["rounds_within_100_ms"] = within
    out.goal(
        "deadline -> next result, s (default concurrency)",
        out.median("deadline -> next result"),
        "<=",
        0.100,
    )
    out.goal("every Exit is a TaskTimeout (1 = yes)", float(all_timeouts), ">=", 1.0)
    return out


_TIMELINE_COLUMNS = {
    "wall_ms": "wall",
    "first_item_start_ms": "1st start",
    "item_ms": "item",
    "item_end_to_driver_ms": "end->here",
    "gap_between_items_on_a_process_ms": "gap",
    "driver_has_result_to_next_start_ms": "here->next",
    "busy_fraction_of_cpus": "CPUs busy",
    "busiest_process_share": "on busiest",
}


def where_time_goes(extra: dict[str, Any]) -> str:
    """coarse's timeline and CPU figures as a small table (ms unless said)."""
    lines = [
        "\n== coarse, where the time goes (medians of 5 runs; ms): 'gap': one item's end to "
        "the next item's start on the same worker process; 'here->next': its result reached "
        "this process -> the next item started there; 'on busiest': the share of the items "
        "run by the busiest worker process (0.5: spread evenly; 1: all on one)"
    ]
    lines.append(f"   {'runner':<38}" + "".join(f"{c:>11}" for c in _TIMELINE_COLUMNS.values()))
    for runner, row in extra.get("timeline", {}).items():
        cells = "".join(
            f"{row[k]:>11.2f}" if k.startswith("bus") else f"{row[k]:>11.1f}"
            for k in _TIMELINE_COLUMNS
        )
        lines.append(f"   {runner:<38}{cells}")
    for runner, row in extra.get("cpu_per_run", {}).items():
        lines.append(
            f"   CPU per run, {runner}: driver {row['driver_cpu_s'] * 1e3:.0f} ms, cluster "
            f"processes {row['cluster_cpu_s'] * 1e3:.0f} ms, wall {row['wall_s'] * 1e3:.0f} ms"
        )
    return "\n".join(lines)


BENCHES: dict[str, Callable[[Cluster, bool], suite.Outcome]] = {
    "coarse": bench_coarse,
    "tiny": bench_tiny,
    "hang": bench_hang,
}


def main(args: argparse.Namespace, only: list[str]) -> int:
    """Run ``only`` (Ray workloads) on a fresh local cluster; print and save the figures."""
    from benchmarks import __main__ as cli

    load_at_start = os.getloadavg()
    started = time.perf_counter()
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    results: dict[str, Any] = {}
    took: dict[str, float] = {}
    print("starting the local Ray cluster ...", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    try:
        with local_cluster() as rc:
            cluster_start = time.perf_counter() - t0
            for name in only:
                print(f"running {name} ...", file=sys.stderr, flush=True)
                t0 = time.perf_counter()
                results[name] = BENCHES[name](rc, args.quick).summary()
                took[name] = round(time.perf_counter() - t0, 1)
            cpus = rc.cpus
            t0 = time.perf_counter()
    except KeyboardInterrupt:
        print("interrupted; the Ray cluster was torn down", file=sys.stderr)
        return 130
    teardown = time.perf_counter() - t0
    machine = cli.machine(load_at_start)
    report = {
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "mode": "ray",
        "quick": args.quick,
        "backend": "ray",
        "machine": machine,
        "cluster": {
            "what": CLUSTER_WHAT,
            "head_cpus": 0,
            "worker_nodes": WORKER_NODES,
            "cpus_per_worker_node": NODE_CPUS,
            "cluster_cpus": cpus,
            "machine_cores": machine["cores"],
            "ray": metadata.version("ray"),
            "python": machine["python"],
            "start_s": round(cluster_start, 1),
            "teardown_s": round(teardown, 1),
        },
        "seconds": round(time.perf_counter() - started, 1),
        "workload_seconds": took,
        "results": results,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    json_path = args.out / f"ray-{stamp}.json"
    json_path.write_text(json.dumps(report, indent=2, default=str))
    print(cli.table(results, issue="10", skip=("timeline", "cpu_per_run")))
    if "coarse" in results:
        print(where_time_goes(results["coarse"]["extra"]))
    c = report["cluster"]
    print(
        f"\ncluster: {CLUSTER_WHAT}; {c['cluster_cpus']} CPUs on a {c['machine_cores']}-core "
        f"machine ({machine['cpu']}); ray {c['ray']}, Python {c['python']}; "
        f"start {c['start_s']} s, teardown {c['teardown_s']} s"
    )
    load = f"{machine['load_average_at_start'][0]:.2f} -> {machine['load_average_at_end'][0]:.2f}"
    print(f"1-min load average {load}; took {report['seconds']} s")
    print(f"results: {json_path}")
    return 0


__all__ = ["BENCHES", "WORKLOADS", "local_cluster", "main", "plain_ray"]
