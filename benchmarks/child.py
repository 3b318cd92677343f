"""Measurements that need a process of their own: ``python -m benchmarks.child SPEC``.

``SPEC`` is one JSON object: ``what`` ("startup" or "recovery"), ``name`` (the
pool), ``workers``, ``ballast_mb`` (0: a bare parent; otherwise the parent
imports numpy and holds that many MB, as a data-science process would),
``rounds`` (recovery) and ``backend`` (passed to parstream when not null).
The child prints one JSON line with its figures.

Nothing heavy is imported at module level: a "fresh bare process" must pay
for ``import parstream`` (or ``import multiprocessing``, ...) inside the timing.
``recovery`` is also called in-process by the suite, so the same code measures
the small parent and the suite's own.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

#: What ``startup`` can start; ``pool`` forks, ``pool-spawn`` spawns.
STARTUP_NAMES = (
    "parstream",
    "pool",
    "pool-spawn",
    "ppe",
    "loky",
    "billiard",
    "pebble",
    "mpire",
)
#: Pools that survive a SIGKILLed worker and replace it (shared/peers.md); the
#: others break (ProcessPoolExecutor, loky) or abort the job (joblib, mpire).
RECOVERY_NAMES = ("parstream", "pool", "billiard", "pebble")

Submit = Callable[..., Callable[[], Any]]


@contextlib.contextmanager
def open_pool(name: str, workers: int, backend: str | None = None) -> Iterator[Submit]:
    """A new pool; yields ``submit(fn, *args) -> get()``. Imports happen here."""
    if name == "parstream":
        import parstream

        options = {} if backend is None else {"backend": backend}
        with parstream.Supervisor(max_workers=workers, **options) as sup:
            yield lambda fn, *args: sup.async_nolink(fn, *args).await_
    elif name in ("pool", "pool-spawn"):
        import multiprocessing

        ctx = multiprocessing.get_context("spawn" if name == "pool-spawn" else "fork")
        with ctx.Pool(workers) as pool:
            yield lambda fn, *args: pool.apply_async(fn, args).get
    elif name == "ppe":
        import concurrent.futures

        with concurrent.futures.ProcessPoolExecutor(workers) as ex:
            yield lambda fn, *args: ex.submit(fn, *args).result
    elif name == "loky":
        import loky

        lex = loky.ProcessPoolExecutor(workers)
        try:
            yield lambda fn, *args: lex.submit(fn, *args).result
        finally:
            lex.shutdown(wait=True, kill_workers=True)
    elif name == "billiard":
        import billiard

        # A short lost-worker timeout, as in shared/peers.md: with the default 10 s,
        # closing a pool that lost workers takes ~7 s.
        with billiard.Pool(workers, lost_worker_timeout=1.0) as bpool:
            yield lambda fn, *args: bpool.apply_async(fn, args).get
    elif name == "pebble":
        import pebble

        ppool = pebble.ProcessPool(max_workers=workers)
        try:
            yield lambda fn, *args: ppool.schedule(fn, args=args).result
        finally:
            ppool.stop()
            ppool.join()
    elif name == "mpire":
        import mpire

        with mpire.WorkerPool(n_jobs=workers) as mpool:
            yield lambda fn, *args: mpool.apply_async(fn, args).get
    else:
        raise ValueError(name)


def rss_mb() -> float:
    """This process's resident set, from /proc (no psutil import in a bare parent)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def startup(name: str, workers: int, backend: str | None = None) -> dict[str, float]:
    """Import + new pool + first result, then close; then a second pool the same way."""
    t0 = time.perf_counter()
    with open_pool(name, workers, backend) as submit:
        submit(os.getpid)()
        t1 = time.perf_counter()
    t2 = time.perf_counter()
    with open_pool(name, workers, backend) as submit:
        submit(os.getpid)()
        t3 = time.perf_counter()
    t4 = time.perf_counter()
    return {
        "first": t1 - t0,
        "close": t2 - t1,
        "second": t3 - t2,
        "second_close": t4 - t3,
    }


def _wait_marks(directory: str, n: int, timeout: float = 60.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while True:
        pids = [int(x) for x in os.listdir(directory)]
        if len(pids) >= n:
            return pids
        if time.monotonic() > deadline:
            raise TimeoutError(f"only {len(pids)} of {n} workers busy after {timeout} s")
        time.sleep(0.001)


def recovery(name: str, workers: int, rounds: int, backend: str | None = None) -> list[float]:
    """Seconds from SIGKILL of a busy worker to the replacement's first result.

    Every worker is busy (so only the replacement can run the probe); a file
    per busy worker says its pid. After each round the other busy workers
    are killed too, so each round starts from replacements that are warm.
    """
    import logging
    import shutil
    import signal
    import tempfile

    from benchmarks import workloads as w

    times: list[float] = []
    top = tempfile.mkdtemp(prefix="parstream-bench-")
    # billiard logs each killed worker on the "multiprocessing" logger, which has
    # no handler, so Python prints it to stderr; that is expected here.
    quiet = logging.NullHandler()
    logging.getLogger("multiprocessing").addHandler(quiet)
    try:
        with open_pool(name, workers, backend) as submit:
            submit(os.getpid)()
            for r in range(rounds):
                marks = os.path.join(top, str(r))
                os.mkdir(marks)
                for _ in range(workers):
                    submit(w.mark_and_sleep, marks, 120)
                pids = _wait_marks(marks, workers)
                time.sleep(0.02)
                t0 = time.perf_counter()
                os.kill(pids[0], signal.SIGKILL)
                got = submit(os.getpid)()
                times.append(time.perf_counter() - t0)
                assert got not in pids, (name, got, pids)
                for pid in pids[1:]:
                    os.kill(pid, signal.SIGKILL)
    finally:
        logging.getLogger("multiprocessing").removeHandler(quiet)
        shutil.rmtree(top, ignore_errors=True)
    return times


def main(spec: dict[str, Any]) -> dict[str, Any]:
    ballast = None
    if spec.get("ballast_mb"):
        import numpy as np

        ballast = np.ones(int(spec["ballast_mb"]) * 2**20 // 8)  # written, so resident
    out: dict[str, Any] = {"rss_mb": rss_mb()}
    if spec["what"] == "startup":
        out.update(startup(spec["name"], spec["workers"], spec.get("backend")))
    elif spec["what"] == "recovery":
        out["times"] = recovery(spec["name"], spec["workers"], spec["rounds"], spec.get("backend"))
    else:
        raise ValueError(spec["what"])
    del ballast
    return out


if __name__ == "__main__":
    print(json.dumps(main(json.loads(sys.argv[1]))), flush=True)
