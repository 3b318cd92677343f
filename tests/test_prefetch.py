"""A stream's next chunk sent behind a busy worker's running one (issue 12).

The local pool sends a queued chunk of the same stream down a busy worker's
pipe, so the worker goes on to it without waiting a round trip. Faults must
not care: a worker killed or crashing with a chunk queued behind its
running one loses only the running item, the queued chunk runs elsewhere,
once; a stream closed meanwhile runs none of it.
"""

from __future__ import annotations

import os
import signal
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from _util import gone, reason, value, wait_until

import parstream
from parstream._backends.local import _pool

pytestmark = pytest.mark.skipif(not _pool.PREFETCH, reason="the local pool queues nothing behind")

# The item that runs (and hangs, or crashes) while a chunk waits behind it: the
# first of its chunk of two, so every result before it is in when it starts.
SLOW = 4


def mark(directory: str, i: int, crash: bool = False) -> int:
    """Leaves ``<i>-<pid>`` in ``directory``; item ``SLOW`` then hangs (or exits)."""
    Path(directory, f"{i}-{os.getpid()}").touch()
    if i == SLOW:
        if crash:
            os._exit(3)
        time.sleep(60)
    return i * 10


def _worker_with_a_chunk_behind(sup: parstream.Supervisor) -> int:
    """The pid of the worker that runs item SLOW, once a chunk waits behind it."""
    pool: Any = sup._backend

    def queued() -> bool:
        with pool._lock:
            return any(w.next_job is not None for w in pool._workers)

    wait_until(queued, 20, what="a chunk queued behind the running one")
    with pool._lock:
        (worker,) = [w for w in pool._workers if w.next_job is not None]
        return int(worker.pid)


def _runs(directory: Path) -> Counter[int]:
    return Counter(int(p.name.split("-")[0]) for p in directory.iterdir())


def test_a_killed_worker_loses_only_its_running_item(tmp_path: Path) -> None:
    items = range(10)
    with parstream.Supervisor(max_workers=1) as sup:
        stream = sup.async_stream_nolink(lambda i: mark(str(tmp_path), i), items, chunksize=2)
        results: list[Any] = []
        for r in stream:
            results.append(r)
            if len(results) == SLOW:  # the items before it are in: SLOW runs now
                wait_until(lambda: _runs(tmp_path)[SLOW] == 1, 20, what="the slow item")
                pid = _worker_with_a_chunk_behind(sup)
                os.kill(pid, signal.SIGKILL)
                assert gone(pid)
    assert len(results) == len(items)
    for i, r in enumerate(results):
        if i == SLOW:
            assert isinstance(reason(r), parstream.WorkerCrashed)
        else:
            assert value(r) == i * 10
    assert _runs(tmp_path) == Counter(items)  # each item ran exactly once


def test_a_crash_with_a_chunk_behind_fails_only_its_item(tmp_path: Path) -> None:
    items = range(10)
    with parstream.Supervisor(max_workers=1) as sup:
        pool: Any = sup._backend
        behind_seen: list[bool] = []
        original = pool._queue_behind

        def noting(worker: Any, job: Any) -> None:
            behind_seen.append(True)
            original(worker, job)

        pool._queue_behind = noting
        crashing = lambda i: mark(str(tmp_path), i, crash=True)  # noqa: E731
        results: list[Any] = list(sup.async_stream_nolink(crashing, items, chunksize=2))
    assert behind_seen, "no chunk was queued behind a running one"
    for i, r in enumerate(results):
        if i == SLOW:
            assert isinstance(reason(r), parstream.WorkerCrashed)
        else:
            assert value(r) == i * 10
    assert _runs(tmp_path) == Counter(items)


def test_closing_a_stream_runs_nothing_queued_behind(tmp_path: Path) -> None:
    with parstream.Supervisor(max_workers=1) as sup:
        stream = sup.async_stream(lambda i: mark(str(tmp_path), i), range(10), chunksize=2)
        got = [value(next(stream)) for _ in range(SLOW)]
        wait_until(lambda: _runs(tmp_path)[SLOW] == 1, 20, what="the slow item")
        pid = _worker_with_a_chunk_behind(sup)
        stream.close()
        assert gone(pid)
        # The pool goes on with a new worker.
        assert sup.async_(os.getpid).await_(30) != pid
    assert got == [0, 10, 20, 30]
    ran = _runs(tmp_path)
    assert all(ran[i] == 1 for i in range(SLOW + 1))
    assert not any(ran[i] for i in range(SLOW + 1, 10)), ran  # the chunk behind never ran


def echo(b: bytes) -> bytes:
    return b


def test_a_batch_too_big_for_the_pipe_is_not_sent_behind(tmp_path: Path) -> None:
    """Arguments that travel in the pipe (bytes) and fill its buffer: the hub
    must not wait for a busy worker to read them (it would wait on a worker
    that waits on it to read its results)."""
    items = [bytes([i % 256]) * 200_000 for i in range(40)]
    with parstream.Supervisor(max_workers=1) as sup:
        assert list(sup.map(echo, items, chunksize=8)) == items


def stamp(seconds: float) -> float:
    time.sleep(seconds)
    return time.monotonic()


def test_a_task_does_not_wait_behind_a_stream() -> None:
    """Chunks sent behind a running one never jump over other queued work: a
    task submitted during a long stream runs long before the stream ends."""
    with parstream.Supervisor(max_workers=1) as sup:
        ends: list[float] = []
        task: Any = None
        for i, end in enumerate(sup.map(stamp, [0.005] * 300)):
            ends.append(end)
            if i == 20:
                task = sup.async_(stamp, 0.0)
        assert task is not None
        task_end = task.await_(30)
    after = sum(1 for end in ends if end > task_end)
    assert after >= 100, f"only {after} of 300 stream items ran after the task"
