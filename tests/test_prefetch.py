"""A stream's next chunk sent behind a busy worker's running one (issue 12).

The local pool sends a queued chunk of the same stream down a busy worker's
pipe, so the worker goes on to it without waiting a round trip. Faults must
not care: a worker killed or crashing with a chunk queued behind its
running one loses only the running item, the queued chunk runs elsewhere,
once; a stream closed meanwhile runs none of it.
"""

from __future__ import annotations

import functools
import os
import signal
import threading
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


class _Collect:
    """A job's sink: its values, and when it ended."""

    def __init__(self) -> None:
        self.values: list[Any] = []
        self.ended = threading.Event()

    def on_started(self, at: float) -> None:
        pass

    def on_results(self, values: list[Any], errors: Any, seconds: float | None) -> None:
        self.values.extend(values)

    def on_done(self, end: str, unrun: int) -> None:
        self.ended.set()


def test_a_late_send_does_not_let_a_chunk_jump_ahead(monkeypatch: pytest.MonkeyPatch) -> None:
    """A thread that sent a task to a worker and was descheduled before it
    marked the task delivered marked it delivered later, after the worker had
    answered and another thread had been given the worker for a stream's
    chunk X, not yet written. The hub then took X for delivered, sent the
    stream's next chunk Y behind it, and Y reached the pipe first: the
    worker ran Y first, Y's values were credited to X and X's to Y
    (``parstream.map`` returned items twice and out of order, under load)."""
    from parstream._backend import Gate, Job
    from parstream._backends.local import _wire

    sup = parstream.Supervisor(max_workers=1)
    pool: Any = sup._backend
    wait_until(lambda: any(w.state == "idle" for w in pool._workers), 20, "a worker")
    fn = pool.prepare(abs)
    wrote_a = threading.Event()
    go_on_a = threading.Event()
    go_on_b = threading.Event()
    send_bytes = _wire.FdConnection.send_bytes
    send = _pool.LocalPool._send

    def late_marking_send_bytes(self: Any, data: bytes) -> None:
        send_bytes(self, data)
        if threading.current_thread().name == "A":
            wrote_a.set()
            go_on_a.wait(10)  # descheduled between the write and the mark

    def late_send(self: Any, worker: Any, job: Any, *, behind: bool = False) -> bool:
        if threading.current_thread().name == "B":
            go_on_b.wait(10)  # descheduled between taking the worker and sending
        return bool(send(self, worker, job, behind=behind))

    monkeypatch.setattr(_wire.FdConnection, "send_bytes", late_marking_send_bytes)
    monkeypatch.setattr(_pool.LocalPool, "_send", late_send)
    try:
        task = _Collect()
        a = threading.Thread(
            target=pool.submit, args=(Job(fn, [-9], task),), name="A", daemon=True
        )
        a.start()
        assert wrote_a.wait(10)
        assert task.ended.wait(10)  # the worker answered: idle again
        gate = Gate(limit=2)
        x, y = _Collect(), _Collect()
        b = threading.Thread(
            target=pool.submit,
            args=(Job(fn, [-1, -2, -3, -4], x, gate=gate, returnable=True),),
            name="B",
            daemon=True,
        )
        b.start()
        wait_until(lambda: any(w.job is not None for w in pool._workers), 10, "X assigned")
        go_on_a.set()
        a.join(10)
        pool.submit(Job(fn, [-5, -6, -7, -8], y, gate=gate, first_index=4, returnable=True))
        time.sleep(0.2)  # the hub's turn: (wrongly) queue Y behind X, and send it
        go_on_b.set()
        b.join(10)
        assert x.ended.wait(10)
        assert y.ended.wait(10)
        assert (x.values, y.values) == ([1, 2, 3, 4], [5, 6, 7, 8])
    finally:
        go_on_a.set()
        go_on_b.set()
        monkeypatch.undo()
        sup.close()


def nap_then_pid(x: int) -> tuple[int, int]:
    time.sleep(0.5)
    return x, os.getpid()


def test_results_of_another_batch_are_never_credited(caplog: pytest.LogCaptureFixture) -> None:
    """Each flush of results says which batch it is of. Should the pool ever
    lose track of which batch a worker runs (the swapped chunks fixed above
    did), the results are not credited to the wrong items: the worker is
    killed with an error in the log, and the batch runs again whole."""
    sup = parstream.Supervisor(max_workers=1)
    pool: Any = sup._backend
    try:
        assert sup.async_(abs, -1).await_() == 1
        task = sup.async_(nap_then_pid, 7)
        wait_until(lambda: any(w.job is not None for w in pool._workers), 10, "the task sent")
        with pool._lock:
            (worker,) = [w for w in pool._workers if w.job is not None]
            first_pid = worker.pid
            worker.seq += 1  # the pool's belief, not the worker's
        with caplog.at_level("ERROR", logger="parstream"):
            x, pid = task.await_(timeout=30)
        assert x == 7
        assert pid != first_pid  # ran again, on the replacement
        assert "sent the results of batch" in caplog.text
        assert sup.async_(abs, -2).await_() == 2
        assert gone(first_pid)
    finally:
        sup.close()


def held_until_released(marker: str, i: int) -> str:
    """Item 5 waits for ``marker`` (a file the consumer makes once it has the
    results finished before it); every other item returns at once."""
    if i != 5:
        return f"item {i}"
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if os.path.exists(marker):
            return "released"
        time.sleep(0.01)
    return "gave up: its batch-mates' results never came"


@pytest.mark.parametrize("timeout", [None, 60])
def test_a_slow_item_does_not_hold_back_what_finished_before_it(
    tmp_path: Path, timeout: float | None
) -> None:
    """The items of a batch that finished before a slow one reach the parent
    while it runs: its worker's ticker sends them (an early flush), and the
    batch's own flush later repeats them, taken once. Before, they came only
    when the slow item ended, so a consumer waiting for them waited for it."""
    marker = str(tmp_path / "go")
    fn = functools.partial(held_until_released, marker)
    before = {f"item {k}" for k in range(5)}
    got: list[str] = []
    with parstream.Supervisor(max_workers=2) as sup:
        stream = sup.async_stream(
            fn, range(20), ordered=False, chunksize=10, max_concurrency=2, timeout=timeout
        )
        for r in stream:
            got.append(value(r))
            if before <= set(got):
                Path(marker).touch()
    expected = [f"item {k}" for k in range(20) if k != 5] + ["released"]
    assert sorted(got) == sorted(expected)


class SlowToUnpickle:
    """An argument whose unpickling, in the worker, takes ``seconds``."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def __reduce__(self) -> tuple[Any, ...]:
        return (time.sleep, (self.seconds,))


def nap(x: float | None) -> float | None:
    if x:
        time.sleep(x)
    return x


def test_an_early_flush_does_not_start_the_running_items_clock_early() -> None:
    """The early flush moves the pool's count on to the running item; its
    timeout must still count from its own start, not from the batch's
    (which here includes a slow unpickling). It was killed at 2 s of the
    batch, 0.8 s into a 1.2 s item with a 2 s timeout."""
    with parstream.Supervisor(max_workers=1) as sup:
        stream = sup.async_stream(
            nap, [SlowToUnpickle(1.2), 1.2], timeout=2, chunksize=2, max_concurrency=1
        )
        assert [value(r) for r in stream] == [None, 1.2]
