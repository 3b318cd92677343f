"""Runners: one per (pool, workload), each timing exactly one repetition.

A runner is a callable that does the work and returns seconds (or a dict of
measurements for latency workloads). Pools are created once per workload
and closed after it, so warm workloads measure warm pools. Peers that are not
installed are skipped with a note.

``backend``: the hook for ``--backend NAME``; when given it is passed as
``backend=`` to every ``parstream.Supervisor`` the suite makes (``None``, the
default, passes nothing). No backend runner lives here: ``ray`` needs the ray
extra and a parstream that takes ``backend=``.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import importlib.util
import itertools
import multiprocessing
import time
from typing import TYPE_CHECKING, Any

import parstream
from benchmarks import workloads as w

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

PEERS = ("pool", "ppe", "loky", "joblib", "pebble", "mpire", "billiard")
_MODULES = {
    "loky": "loky",
    "joblib": "joblib",
    "pebble": "pebble",
    "mpire": "mpire",
    "billiard": "billiard",
}


def available(peer: str) -> bool:
    module = _MODULES.get(peer)
    return module is None or importlib.util.find_spec(module) is not None


def backend_options(backend: str | None) -> dict[str, Any]:
    """The keyword arguments that carry ``--backend`` into parstream, if it was given."""
    return {} if backend is None else {"backend": backend}


def supervisor(workers: int, backend: str | None = None) -> parstream.Supervisor:
    """A new ``parstream.Supervisor``: every one the suite makes comes from here."""
    return parstream.Supervisor(max_workers=workers, **backend_options(backend))


@contextlib.contextmanager
def open_pool(name: str, workers: int, backend: str | None = None) -> Iterator[Any]:
    """A warm pool of ``name`` with ``workers`` workers, closed on exit."""
    if name == "parstream":
        with supervisor(workers, backend) as sup:
            sup.async_(w.noop).await_()
            yield sup
    elif name == "pool":
        with multiprocessing.Pool(workers) as pool:
            pool.apply(w.noop)
            yield pool
    elif name == "ppe":
        with concurrent.futures.ProcessPoolExecutor(workers) as ex:
            ex.submit(w.noop).result()
            yield ex
    elif name == "loky":
        import loky

        ex = loky.ProcessPoolExecutor(workers)
        ex.submit(w.noop).result()
        try:
            yield ex
        finally:
            ex.shutdown(wait=True, kill_workers=True)
    elif name == "joblib":
        import joblib

        with joblib.Parallel(n_jobs=workers, return_as="generator") as par:
            list(par(joblib.delayed(w.noop)() for _ in range(workers)))
            yield par
    elif name == "pebble":
        import pebble

        pool = pebble.ProcessPool(max_workers=workers)
        pool.schedule(w.noop).result()
        try:
            yield pool
        finally:
            pool.stop()
            pool.join()
    elif name == "mpire":
        import mpire

        with mpire.WorkerPool(n_jobs=workers) as pool:
            yield pool
    elif name == "billiard":
        import billiard

        with billiard.Pool(workers) as pool:
            pool.apply(w.noop)
            yield pool
    else:  # pragma: no cover
        raise ValueError(name)


def pmap(
    name: str, pool: Any, fn: Callable[[Any], Any], items: list[Any], chunksize: int | None
) -> list[Any]:
    """An ordered parallel map on ``pool``; ``chunksize`` is the peers' hand-picked one.

    ``chunksize=None``: ``Pool.map`` (pool, billiard) with its own chunking.
    parstream gets no tuning: ``chunksize=None`` (automatic).
    """
    if name == "parstream":
        return list(pool.stream_map(fn, items))
    if name in ("pool", "billiard"):
        if chunksize is None:
            return list(pool.map(fn, items))
        return list(pool.imap(fn, items, chunksize=chunksize))
    if chunksize is None:  # pragma: no cover - the suite never asks
        raise ValueError(f"{name} has no chunking of its own worth measuring")
    if name in ("ppe", "loky"):
        return list(pool.map(fn, items, chunksize=chunksize))
    if name == "joblib":
        import joblib

        return list(pool(joblib.delayed(fn)(x) for x in items))
    if name == "pebble":
        return list(pool.map(fn, items, chunksize=chunksize).result())
    if name == "mpire":
        return list(
            pool.map(
                fn,
                items,
                chunk_size=chunksize if chunksize > 1 else None,
                concatenate_numpy_output=False,
            )
        )
    raise ValueError(name)  # pragma: no cover


def roundtrip(name: str, pool: Any) -> None:
    """One no-op task, submitted and awaited."""
    if name == "parstream":
        pool.async_(w.noop).await_()
    elif name == "pool":
        pool.apply(w.noop)
    elif name in ("ppe", "loky"):
        pool.submit(w.noop).result()
    elif name == "pebble":
        pool.schedule(w.noop).result()
    elif name in ("mpire", "billiard"):
        pool.apply(w.noop)
    else:
        raise ValueError(name)  # pragma: no cover


def cold_start(name: str, workers: int, backend: str | None = None) -> float:
    """Seconds from a new pool to its first result, closing included."""
    t0 = time.perf_counter()
    if name == "parstream":
        with supervisor(workers, backend) as sup:
            sup.async_(w.noop).await_()
    elif name == "pool":
        with multiprocessing.Pool(workers) as pool:
            pool.apply(w.noop)
    elif name == "ppe":
        with concurrent.futures.ProcessPoolExecutor(workers) as ex:
            ex.submit(w.noop).result()
    elif name == "loky":
        import loky

        ex = loky.ProcessPoolExecutor(workers)
        ex.submit(w.noop).result()
        ex.shutdown(wait=True, kill_workers=True)
    elif name == "pebble":
        import pebble

        pp = pebble.ProcessPool(max_workers=workers)
        pp.schedule(w.noop).result()
        pp.stop()
        pp.join()
    elif name == "mpire":
        import mpire

        with mpire.WorkerPool(n_jobs=workers) as mp_pool:
            mp_pool.apply(w.noop)
    elif name == "billiard":
        import billiard

        with billiard.Pool(workers) as b_pool:
            b_pool.apply(w.noop)
    else:
        raise ValueError(name)  # pragma: no cover
    return time.perf_counter() - t0


def infinite_rss(
    name: str, n: int, workers: int, samples: int = 10, backend: str | None = None
) -> dict[str, Any]:
    """Consume ``n`` results of ``square`` over ``itertools.count()``; sample parent RSS."""
    import psutil

    proc = psutil.Process()
    rss: list[int] = []
    step = max(1, n // samples)
    kind = "parstream" if name.startswith("parstream") else name
    with open_pool(kind, workers, backend if kind == "parstream" else None) as pool:
        t0 = time.perf_counter()
        if name == "parstream":
            it: Iterator[Any] = pool.stream_map(w.square, itertools.count())
        elif name.startswith("parstream"):  # Supervisor.map, the Executor's
            it = pool.map(w.square, itertools.count())
        elif name == "pool":
            it = pool.imap(w.square, itertools.count(), chunksize=2048)
        elif name == "joblib":
            import joblib

            it = iter(pool(joblib.delayed(w.square)(x) for x in itertools.count()))
        else:
            raise ValueError(name)  # pragma: no cover
        for i, _ in enumerate(itertools.islice(it, n), 1):
            if i % step == 0:
                rss.append(proc.memory_info().rss)
        elapsed = time.perf_counter() - t0
        close = getattr(it, "close", None)
        if close is not None:
            close()
    return {
        "seconds": elapsed,
        "rss_mb": [round(r / 2**20, 1) for r in rss],
        "growth_mb": round((rss[-1] - rss[0]) / 2**20, 1) if rss else 0.0,
        # The pipeline fills while chunks grow; after that, flat is the goal.
        "growth_after_first_20pct_mb": (
            round((rss[-1] - rss[len(rss) // 5]) / 2**20, 1) if rss else 0.0
        ),
    }
