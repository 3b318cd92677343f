"""The local worker pool: owns the worker processes and everything sent to them.

The rest of parstream sees only ``Pool.submit(job)``, ``Pool.kill(job, reason)``,
``Pool.reserve(n)``/``release(n)`` (capacity), ``worker_pids()`` and ``close()``;
a distributed backend can plug in behind the same surface.

Data flow::

    caller threads                       hub thread (one per pool)
    --------------                       -------------------------
    submit(job) --idle worker?--send-->  wait() on every worker pipe, every
         |                               process sentinel, the wake pipe and
         +--no: queue, wake hub------->  the next deadline; then
                                           RESULTS -> job.sink.on_item(...)
    kill(job)  --SIGKILL tree, wake-->     sentinel -> drain pipe, blame or
                                                       re-queue, respawn
                                           deadline -> kill hung item's worker
                                           idle worker -> next queued job

A ``Job`` is a list of items for one function, run in order on one worker at a
time. The pool knows which item of which job each worker is running, which is
what lets it act on one worker at a time: a death fails only the item that was
running (``WorkerCrashed``), a per-item deadline kills only the hung item's
worker (``TaskTimeout``), and the job's unrun items are re-queued, so nothing is
lost or run twice. Workers are started only from the hub thread, because
``PR_SET_PDEATHSIG`` fires when the *thread* that started a child exits.
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import logging
import os
import select
import selectors
import signal
import threading
import time
from dataclasses import dataclass, field
from multiprocessing import connection
from typing import Any, Protocol

from loky.backend.context import get_context

from parstream import _output, _wire
from parstream._errors import (
    ParstreamInternalError,
    SupervisorClosed,
    TaskTimeout,
    WorkerCrashed,
)
from parstream._worker import worker_main

log = logging.getLogger("parstream")

FN_CACHE_SIZE = 32  # functions a worker keeps unpickled; more means more worker memory
STARTUP_FAILURES_LIMIT = 3  # workers dying before READY in a row before queued jobs fail


class Sink(Protocol):
    """Receives a job's outcomes; called from the hub thread (or the submitter's)."""

    def on_results(self, job: Job, values: list[Any], errors: _wire.Errors) -> None:
        """The next ``len(values)`` items of ``job``, in order; ``errors`` maps
        positions in ``values`` to ``(exception, traceback_text)``."""

    def on_job_done(self, job: Job) -> None: ...


@dataclass(eq=False)
class Gate:
    """At most ``limit`` of the jobs sharing a gate run at once; the others
    wait in the pool's queue, so a stream can queue work ahead of its
    concurrency and the hub starts it the moment a worker frees."""

    limit: int
    active: int = 0


@dataclass(eq=False)
class Job:
    """Items for one function, run in order on one worker at a time.

    ``items`` holds argument tuples (``star``) or single arguments. ``timeout``
    is per item, from the moment the worker starts it. ``first_index`` and
    ``tag`` belong to the sink.
    """

    fn_id: int
    fn_bytes: bytes
    items: list[Any]
    sink: Sink
    star: bool = False
    timeout: float | None = None
    first_index: int = 0
    tag: Any = None
    started_at: float = 0.0
    busy_time: float = 0.0
    gate: Gate | None = None
    cursor: int = 0  # first item not yet reported
    sent_end: int = 0  # end of the slice on the worker
    isolate: bool = False  # run one item at a time (after an ambiguous crash)
    finished: bool = False
    kill_reason: BaseException | None = None
    killed: bool = False
    pid: int | None = None  # the worker running it now
    worker: _Worker | None = field(default=None, repr=False)


@dataclass(eq=False)
class _Worker:
    process: Any
    conn: Any
    state: str = "starting"  # starting, idle, busy, retiring, dead
    pid: int = 0
    job: Job | None = None
    delivered: bool = False
    item_started: float | None = None  # worker clock, report_each jobs only
    timed_out_index: int | None = None
    batch_start: int = 0  # the job's cursor when this slice was sent
    kill_cause: str | None = None
    kill_deadline: float | None = None
    idle_since: float = 0.0
    items_done: int = 0
    retire_requested: bool = False
    fns: collections.OrderedDict[int, None] = field(default_factory=collections.OrderedDict)
    send_lock: threading.Lock = field(default_factory=threading.Lock)


_fn_ids = itertools.count(1)


def new_fn_id() -> int:
    return next(_fn_ids)


def kill_tree(pid: int) -> None:
    """SIGKILL a worker and every process it started."""
    import psutil  # here: workers import this module, and psutil costs ~8 ms

    try:
        proc = psutil.Process(pid)
        children = proc.children(recursive=True)
    except psutil.Error:
        children = []
    for child in reversed(children):
        with contextlib.suppress(psutil.Error):
            child.kill()
    with contextlib.suppress(OSError):
        os.kill(pid, 9)


class Pool:
    """Worker processes plus the hub thread that watches them."""

    def __init__(
        self,
        max_workers: int,
        *,
        max_tasks_per_worker: int | None = None,
        max_memory_per_worker: int | None = None,
        idle_timeout: float = 10.0,
        counters: collections.Counter[str] | None = None,
    ) -> None:
        self.base = max_workers
        self.max_tasks_per_worker = max_tasks_per_worker
        self.max_memory_per_worker = max_memory_per_worker
        self.idle_timeout = idle_timeout
        self.counters: collections.Counter[str] = (
            counters if counters is not None else collections.Counter()
        )
        self._ctx = get_context("loky")
        self._lock = threading.RLock()
        self._workers: list[_Worker] = []
        self._queue: collections.deque[Job] = collections.deque()
        self._reserved = 0  # extra workers asked for by streams and children
        self._closed = False
        self._startup_failures = 0
        self._wake_r, self._wake_w = self._ctx.Pipe(duplex=False)
        self._wake_pending = False
        self._selector: selectors.BaseSelector | None = None
        if os.name == "posix":
            self._selector = selectors.DefaultSelector()
            self._selector.register(self._wake_r.fileno(), selectors.EVENT_READ, ("wake", None))
        # Sink calls wait here and run outside the lock, in order, just before
        # the hub sleeps: a woken caller then finds the GIL free at once, and
        # no user callback (a Future's, say) ever runs under the pool's lock.
        self._notes: collections.deque[tuple[Any, tuple[Any, ...]]] = collections.deque()
        self._notes_lock = threading.RLock()
        self._hub = threading.Thread(target=self._run_hub, name="parstream-hub", daemon=True)
        self._hub.start()

    # -- the surface used by the rest of parstream ------------------------

    def _note(self, fn: Any, *args: Any) -> None:
        self._notes.append((fn, args))

    def _flush_notes(self) -> None:
        with self._notes_lock:
            while self._notes:
                fn, args = self._notes.popleft()
                try:
                    fn(*args)
                except Exception:  # pragma: no cover - a sink must not break the pool
                    log.exception("parstream: a task's completion handler failed")

    def submit(self, job: Job) -> None:
        with self._lock:
            if self._closed:
                raise SupervisorClosed("the supervisor is closed")
            self.counters["tasks_started"] += len(job.items)
            worker = self._idle_worker()
            if worker is None or (job.gate is not None and job.gate.active >= job.gate.limit):
                self._queue.append(job)
                self._wake()
                return
            self._assign(worker, job)
        self._send(worker, job)
        self._flush_notes()

    def kill(self, job: Job, reason: BaseException | None, *, grace: float = 0.0) -> None:
        """Stop ``job``: its running item's worker is killed and replaced.

        With a ``reason``, each unreported item gets it as its failure;
        without, they are dropped. With ``grace``, the worker gets SIGTERM
        first and SIGKILL after ``grace`` seconds, and results it sends before
        dying still count. Safe to call from any thread, any time.
        """
        with self._lock:
            if job.finished or job.killed:
                return
            job.kill_reason = reason
            worker = job.worker
            if worker is None:
                job.killed = True
                with contextlib.suppress(ValueError):
                    self._queue.remove(job)
                self._finish_killed(job)
            else:
                worker.kill_cause = "kill"
                if grace > 0:
                    worker.kill_deadline = time.monotonic() + grace
                    with contextlib.suppress(OSError):
                        os.kill(worker.pid, signal.SIGTERM)
                else:
                    job.killed = True
                    kill_tree(worker.pid)
                self._wake()
        self._flush_notes()

    def reserve(self, n: int) -> None:
        """Allow ``n`` more workers than the base size while they are needed."""
        with self._lock:
            self._reserved += n
            self._wake()

    def release(self, n: int) -> None:
        with self._lock:
            self._reserved = max(0, self._reserved - n)
            self._wake()  # extra workers may now be surplus: start their idle clocks

    def worker_pids(self) -> list[int]:
        with self._lock:
            return [w.pid for w in self._workers if w.pid and w.state != "dead"]

    def busy_pids(self) -> list[int]:
        with self._lock:
            return [w.pid for w in self._workers if w.state == "busy"]

    def restart_workers(self) -> None:
        """Retire every idle worker and every busy one once its job ends."""
        with self._lock:
            for w in self._workers:
                if w.state == "idle":
                    self._retire(w)
                else:
                    w.retire_requested = True  # after the current batch
            self._wake()

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            queued = list(self._queue)
            self._queue.clear()
            workers = list(self._workers)
            for w in workers:
                w.kill_cause = "close"
                kill_tree(w.pid or w.process.pid)
        for job in queued:
            self.kill(job, None)
        self._wake()
        if threading.current_thread() is not self._hub:
            self._hub.join(timeout=5.0)
        self._flush_notes()
        for w in workers:
            w.process.join(timeout=1.0)

    @property
    def closed(self) -> bool:
        return self._closed

    # -- dispatch -----------------------------------------------------------

    def _idle_worker(self) -> _Worker | None:
        for w in self._workers:
            if w.state == "idle" and w.kill_cause is None:
                return w
        return None

    def _assign(self, worker: _Worker, job: Job) -> None:
        worker.state = "busy"
        worker.job = job
        worker.batch_start = job.cursor
        if job.gate is not None:
            job.gate.active += 1
        worker.delivered = False
        worker.item_started = None
        worker.timed_out_index = None
        job.worker = worker
        job.pid = worker.pid
        end = len(job.items) if not job.isolate else job.cursor + 1
        job.sent_end = min(end, len(job.items))
        job.started_at = time.monotonic()

    def _send(self, worker: _Worker, job: Job) -> None:
        with worker.send_lock:
            payload = self._encode(worker, job)
            if payload is None:
                return
            try:
                worker.conn.send_bytes(payload)
                worker.delivered = True
            except OSError:
                # The worker died under us; its sentinel tells the hub, which
                # sees ``delivered`` is False and re-queues the whole slice.
                pass

    def _encode(self, worker: _Worker, job: Job) -> bytes | None:
        fn_bytes: bytes | None = None
        evict: list[int] = []
        if job.fn_id in worker.fns:
            worker.fns.move_to_end(job.fn_id)
        else:
            fn_bytes = job.fn_bytes
            worker.fns[job.fn_id] = None
            while len(worker.fns) > FN_CACHE_SIZE:
                evict.append(worker.fns.popitem(last=False)[0])
        report_each = job.timeout is not None
        items = job.items[job.cursor : job.sent_end]
        level = logging.getLogger().getEffectiveLevel()
        message = (job.fn_id, fn_bytes, items, job.star, report_each, evict, False, level)
        try:
            return _wire.encode(_wire.RUN, message)
        except BaseException:
            pass
        # Some arguments cannot be pickled: each such item fails alone (the
        # worker reports the stand-in's error in its place, keeping order).
        for i, args in enumerate(items):
            try:
                _wire.dumps(args)
            except BaseException as cause:
                items[i] = _wire.BadArgs(_culprit_error(args if job.star else (args,), cause))
        job.items[job.cursor : job.sent_end] = items
        return _wire.encode(_wire.RUN, (*message[:-2], True, level))

    # -- the hub thread -----------------------------------------------------

    def _wake(self) -> None:
        if not self._wake_pending:
            self._wake_pending = True
            with contextlib.suppress(OSError):
                self._wake_w.send_bytes(b"")

    def _run_hub(self) -> None:
        try:
            self._hub_loop()
        except BaseException:  # pragma: no cover - a bug in the hub itself
            log.exception("parstream hub thread crashed; killing its workers")
            err = ParstreamInternalError("the pool's hub thread crashed; see the parstream log")
            with self._lock:
                self._closed = True
                jobs = list(self._queue) + [w.job for w in self._workers if w.job is not None]
                self._queue.clear()
                for w in list(self._workers):
                    kill_tree(w.pid or w.process.pid)
                for job in jobs:
                    job.killed = True
                    job.kill_reason = err
                    self._finish_killed(job)
            self._flush_notes()

    def _hub_loop(self) -> None:
        while True:
            with self._lock:
                if self._closed and not self._workers:
                    self._close_selector()
                    done = True
                else:
                    done = False
                    self._spawn_as_needed()
                    timeout = self._next_timeout()
            self._flush_notes()
            if done:
                return
            deaths: list[_Worker] = []
            for what, w in self._wait(timeout):
                if w is None:
                    # Drain first, then clear the flag: a wake() between the two
                    # would otherwise leave the flag set and no byte to wake us.
                    wake: Any = self._wake_r
                    with contextlib.suppress(OSError, EOFError):
                        while wake.poll():
                            wake.recv_bytes()
                    self._wake_pending = False
                    continue
                if what == "conn":
                    # One message per wake-up: the selector is level-triggered,
                    # so more data wakes it again at once. (Connection.poll()
                    # would build a new selector per call, ~30 us each.)
                    if self._selector is not None:
                        self._read_one(w)
                    else:
                        self._drain(w)
                else:
                    deaths.append(w)
            for w in deaths:
                self._on_death(w)
            self._check_deadlines()
            self._dispatch_queued()

    def _wait(self, timeout: float | None) -> list[tuple[str, _Worker | None]]:
        """Wait for pipes and sentinels: a persistent epoll/kqueue selector on
        POSIX (no per-wake set-up), ``connection.wait`` elsewhere."""
        if self._selector is not None:
            return [key.data for key, _ in self._selector.select(timeout)]
        objs: dict[Any, tuple[str, _Worker | None]] = {self._wake_r: ("wake", None)}
        with self._lock:
            for w in self._workers:
                objs[w.conn] = ("conn", w)
                objs[w.process.sentinel] = ("sentinel", w)
        return [objs[o] for o in connection.wait(list(objs), timeout)]

    def _watch(self, worker: _Worker) -> None:
        if self._selector is not None:
            self._selector.register(worker.conn.fileno(), selectors.EVENT_READ, ("conn", worker))
            self._selector.register(
                worker.process.sentinel, selectors.EVENT_READ, ("sentinel", worker)
            )

    def _unwatch(self, worker: _Worker) -> None:
        if self._selector is not None:
            for fd in (worker.conn.fileno(), worker.process.sentinel):
                with contextlib.suppress(KeyError, ValueError, OSError):
                    self._selector.unregister(fd)

    def _close_selector(self) -> None:
        if self._selector is not None:
            self._selector.close()
            self._selector = None

    def _next_timeout(self) -> float | None:
        now = time.monotonic()
        best: float | None = None
        for w in self._workers:
            dl: float | None = None
            if w.kill_deadline is not None:
                dl = w.kill_deadline
            elif w.state == "busy" and w.job is not None and w.item_started is not None:
                if w.job.timeout is not None and w.kill_cause is None:
                    dl = w.item_started + w.job.timeout
            elif w.state == "idle" and self._is_extra(w):
                dl = w.idle_since + self.idle_timeout
            if dl is not None:
                wait = max(0.0, dl - now)
                best = wait if best is None else min(best, wait)
        return best

    def _is_extra(self, worker: _Worker) -> bool:
        live = [w for w in self._workers if w.state in ("starting", "idle", "busy")]
        return len(live) > self.base + self._reserved

    def _spawn_as_needed(self) -> None:
        if self._closed:
            return
        live = [w for w in self._workers if w.state in ("starting", "idle", "busy")]
        idle_or_starting = sum(1 for w in live if w.state in ("starting", "idle"))
        want = len(live)
        # Keep the base size warm; grow up to the reservations when work waits.
        limit = self.base + self._reserved
        want = max(want, self.base)
        shortfall = len(self._queue) - idle_or_starting
        if shortfall > 0:
            want = max(want, min(len(live) + shortfall, limit))
        if self._startup_failures >= STARTUP_FAILURES_LIMIT:
            return
        for _ in range(want - len(live)):
            try:
                self._start_worker()
            except OSError:
                # Out of processes or file descriptors: count it as a failed
                # start, so queued work fails clearly instead of waiting.
                log.exception("parstream: could not start a worker process")
                self._startup_failures += 1
                if self._startup_failures >= STARTUP_FAILURES_LIMIT:
                    self._fail_queue(None)
                return

    def _start_worker(self) -> None:
        parent_conn, child_conn = self._ctx.Pipe(duplex=True)
        process = self._ctx.Process(
            target=worker_main,
            args=(child_conn, os.getpid()),
            name="parstream-worker",
            env={"PYTHONUNBUFFERED": "1"},
        )
        process.start()
        child_conn.close()
        worker = _Worker(process=process, conn=parent_conn, pid=process.pid)
        self._workers.append(worker)
        self._watch(worker)
        self.counters["workers_started"] += 1

    def _read_one(self, worker: _Worker) -> bool:
        """Handle one message from a readable pipe; False at end of file."""
        try:
            data = worker.conn.recv_bytes()
        except (EOFError, OSError):
            return False
        self._on_message(worker, data)
        return True

    def _drain(self, worker: _Worker) -> None:
        """Handle every message already in the pipe (a dead worker's last words)."""
        while _readable(worker.conn) and self._read_one(worker):
            pass

    def _on_message(self, worker: _Worker, data: bytes) -> None:
        kind = _wire.kind_of(data)
        if kind == _wire.RESULTS:
            self._on_results(worker, data)
        elif kind == _wire.READY:
            with self._lock:
                worker.pid = _wire.decode(data)
                if worker.state == "starting":
                    worker.state = "idle"
                    worker.idle_since = time.monotonic()
                self._startup_failures = 0
        elif kind == _wire.LOG:
            name, level, text, position = _wire.decode(data)
            job = worker.job
            index = None if job is None else job.first_index + worker.batch_start + position
            log.log(level, "[item %s, worker %s] %s: %s", index, worker.pid, name, text)
        elif kind == _wire.BAD_BATCH:
            err = _wire.decode(data)
            job = worker.job
            if job is None:
                return
            with worker.send_lock:
                # The worker could not read the message, function included.
                worker.fns.pop(job.fn_id, None)
            if job.sent_end - job.cursor <= 1:
                self._report_error(job, err, "tasks_failed")
                with self._lock:
                    self._job_slice_done(worker, job)
            else:
                with self._lock:
                    job.isolate = True
                    self._requeue(worker, job)
            self._after_idle(worker)

    def _on_results(self, worker: _Worker, data: bytes) -> None:
        done, t_next, values, errors = _wire.loads_results(data)
        job = worker.job
        if job is None:
            return
        count = len(values)
        if count:
            job.cursor += count
            worker.items_done += count
            self.counters["tasks_failed"] += len(errors)
            self.counters["tasks_ok"] += count - len(errors)
            if not job.killed:
                _output.settle()  # in a kernel: the worker's output first
                self._note(job.sink.on_results, job, values, errors)
        if count or worker.item_started is None:
            worker.item_started = t_next
        if done:
            with self._lock:
                job.busy_time += time.monotonic() - job.started_at
                self._job_slice_done(worker, job)
            self._after_idle(worker)

    def _report_error(self, job: Job, payload: Any, counter: str) -> None:
        """Fail the item at the job's cursor with ``payload``."""
        if job.cursor >= len(job.items):
            return
        job.cursor += 1
        if job.killed:
            return
        self.counters[counter] += 1
        self._note(job.sink.on_results, job, [None], {0: payload})

    def _unassign(self, worker: _Worker) -> Job | None:
        """Take the job off the worker (lock held)."""
        job, worker.job = worker.job, None
        if job is not None and job.gate is not None:
            job.gate.active -= 1
        return job

    def _take_queued(self) -> Job | None:
        """The first queued job whose gate lets it run (lock held)."""
        for i, job in enumerate(self._queue):
            if job.gate is None or job.gate.active < job.gate.limit:
                del self._queue[i]
                return job
        return None

    def _job_slice_done(self, worker: _Worker, job: Job) -> None:
        """The worker finished its slice of ``job`` (lock held)."""
        self._unassign(worker)
        job.worker = None
        job.pid = None
        worker.state = "idle"
        worker.idle_since = time.monotonic()
        if job.killed:
            self._finish_killed(job)
        elif job.cursor >= len(job.items):
            job.finished = True
            self._note(job.sink.on_job_done, job)
        else:
            self._queue.appendleft(job)
            self._wake()

    def _requeue(self, worker: _Worker, job: Job) -> None:
        self._unassign(worker)
        job.worker = None
        job.pid = None
        worker.state = "idle"
        self._queue.appendleft(job)
        self._wake()

    def _after_idle(self, worker: _Worker) -> None:
        """Recycle a worker that has just become idle, if its limits say so."""
        with self._lock:
            if worker.state != "idle":
                return
            if worker.retire_requested or (
                self.max_tasks_per_worker and worker.items_done >= self.max_tasks_per_worker
            ):
                self._retire(worker)
            elif self.max_memory_per_worker:
                import psutil

                try:
                    rss = psutil.Process(worker.pid).memory_info().rss
                except psutil.Error:
                    rss = 0
                if rss > self.max_memory_per_worker:
                    self._retire(worker)

    def _retire(self, worker: _Worker) -> None:
        worker.state = "retiring"
        worker.kill_cause = "retire"
        try:
            worker.conn.send_bytes(bytes((_wire.STOP,)))
        except OSError:
            kill_tree(worker.pid)

    def _finish_killed(self, job: Job) -> None:
        job.finished = True
        if job.kill_reason is not None:
            counter = (
                "tasks_timed_out" if isinstance(job.kill_reason, TaskTimeout) else "tasks_killed"
            )
            n = len(job.items) - job.cursor
            if n > 0:
                self.counters[counter] += n
                payload = (job.kill_reason, "")
                self._note(job.sink.on_results, job, [None] * n, dict.fromkeys(range(n), payload))
        job.cursor = len(job.items)
        self._note(job.sink.on_job_done, job)

    def _on_death(self, worker: _Worker) -> None:
        self._drain(worker)
        self._unwatch(worker)
        with worker.send_lock:
            delivered = worker.delivered
            worker.conn.close()
        worker.process.join(timeout=1.0)
        exitcode = worker.process.exitcode
        with self._lock:
            if worker in self._workers:
                self._workers.remove(worker)
            was_starting = worker.state == "starting"
            worker.state = "dead"
            job = self._unassign(worker)
            cause = worker.kill_cause
            if was_starting and cause is None:
                self._startup_failures += 1
                if self._startup_failures >= STARTUP_FAILURES_LIMIT:
                    self._fail_queue(exitcode)
            if job is None or job.finished:
                return
            job.worker = None
            job.pid = None
            if job.killed or cause == "kill":
                job.killed = True
                self._finish_killed(job)
                return
            if cause == "close":
                job.killed = True
                self._finish_killed(job)
                return
            if not delivered or job.cursor >= job.sent_end:
                self._queue.appendleft(job)
                return
            if cause == "timeout":
                if worker.timed_out_index == job.cursor:
                    err = TaskTimeout(
                        f"item {job.first_index + job.cursor} ran longer than its timeout "
                        f"of {job.timeout} s; its worker (pid {worker.pid}) was killed "
                        "and replaced",
                        index=job.first_index + job.cursor,
                        timeout=job.timeout,
                    )
                    self._report_error(job, (err, ""), "tasks_timed_out")
            elif job.timeout is not None or job.sent_end - job.cursor == 1 or job.isolate:
                crash = _crash_error(worker.pid, exitcode)
                self._report_error(job, (crash, ""), "tasks_crashed")
            else:
                # Several items were on the worker and we cannot tell which one
                # took it down: run them one at a time to find out.
                job.isolate = True
            if job.cursor >= len(job.items):
                job.finished = True
                self._note(job.sink.on_job_done, job)
            else:
                self._queue.appendleft(job)

    def _fail_queue(self, exitcode: int | None) -> None:
        err = WorkerCrashed(
            f"worker processes die while starting (exit code {exitcode}); "
            "see the worker's stderr for the cause",
            exitcode=exitcode,
        )
        while self._queue:
            job = self._queue.popleft()
            job.killed = True
            job.kill_reason = err
            self._finish_killed(job)

    def _check_deadlines(self) -> None:
        now = time.monotonic()
        with self._lock:
            for w in self._workers:
                job = w.job
                if w.kill_deadline is not None and now >= w.kill_deadline:
                    w.kill_deadline = None
                    kill_tree(w.pid)
                elif (
                    w.state == "busy"
                    and job is not None
                    and w.kill_cause is None
                    and job.timeout is not None
                    and w.item_started is not None
                    and now >= w.item_started + job.timeout
                ):
                    w.kill_cause = "timeout"
                    w.timed_out_index = job.cursor
                    kill_tree(w.pid)
                elif (
                    w.state == "idle"
                    and now - w.idle_since >= self.idle_timeout
                    and self._is_extra(w)
                ):
                    self._retire(w)

    def _dispatch_queued(self) -> None:
        while True:
            with self._lock:
                if not self._queue or self._closed:
                    return
                worker = self._idle_worker()
                if worker is None:
                    return
                job = self._take_queued()
                if job is None:
                    return
                self._assign(worker, job)
            self._send(worker, job)


def _readable(conn: Any) -> bool:
    """Whether ``conn`` has data now, without Connection.poll()'s set-up cost."""
    if os.name == "posix":
        try:
            return bool(select.select([conn.fileno()], [], [], 0)[0])
        except (OSError, ValueError):
            return False
    try:
        return bool(conn.poll())
    except (OSError, EOFError):
        return False


def _crash_error(pid: int, exitcode: int | None) -> WorkerCrashed:
    if exitcode is not None and exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = f"signal {-exitcode}"
        cause = {
            "SIGSEGV": "a segfault, usually in a C extension",
            "SIGKILL": "killed from outside, often by the OOM killer",
            "SIGBUS": "a bus error, usually in a C extension",
            "SIGABRT": "an abort, usually a failed C assertion",
        }.get(name, "killed by a signal")
        how = f"{name} ({cause})"
    else:
        how = f"exit code {exitcode} (the task called os._exit or the interpreter died)"
    return WorkerCrashed(
        f"the worker (pid {pid}) running this task died: {how}", exitcode=exitcode, pid=pid
    )


def _culprit_error(args: tuple[Any, ...], cause: BaseException) -> BaseException:
    import pickle

    culprit = "the arguments"
    for i, arg in enumerate(args):
        try:
            _wire.dumps(arg)
        except BaseException:
            culprit = f"argument {i} ({type(arg).__qualname__})"
            break
    err = pickle.PicklingError(f"{culprit} of this task could not be pickled: {cause}")
    err.__cause__ = cause
    return err
