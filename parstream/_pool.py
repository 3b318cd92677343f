"""The local worker pool: owns the worker processes and everything sent to them.

The rest of parstream sees only ``Pool.submit(job)``, ``Pool.kill(job, reason)``,
``Pool.cancel(job)`` (withdraw a job no worker has taken),
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
lost or run twice. Each worker has a progress slot (``_slot``) it updates
before each batch and each item, so at a death the pool knows exactly whether
the batch was begun and which item was running, without asking the dead.
Workers are started only from the hub thread, because ``PR_SET_PDEATHSIG``
fires when the *thread* that started a child exits.

A worker that cannot be started (an exception in the parent, or a process
that dies before it is ready) is retried with back-off; more than
``max_start_failures`` failures within ``start_failure_window`` seconds fail
the queued jobs with ``WorkerStartFailed`` (the cause attached), and the
next successful start ends the episode. Sink calls run only on the hub
thread, outside the pool's lock, never inline in a caller's ``submit`` or
``kill``; sinks must be quick and never run user code (``Task`` hands user
callbacks to ``_callbacks``).

After ``os.fork()`` the child's copy of a pool is inert: it refuses work
(``SupervisorClosed`` naming the fork), never signals the parent's workers,
and closes its copies of their pipes.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import select
import selectors
import signal
import threading
import time
import weakref
from dataclasses import dataclass, field
from multiprocessing import connection
from typing import Any, Protocol

from loky.backend.context import get_context

from parstream import _reaper, _wire
from parstream._callbacks import mark_hub_thread
from parstream._errors import (
    ParstreamInternalError,
    SupervisorClosed,
    TaskTimeout,
    WorkerCrashed,
    WorkerStartFailed,
)
from parstream._functions import Shipped
from parstream._slot import Slot, new_slot
from parstream._worker import worker_main

log = logging.getLogger("parstream")

FN_CACHE_SIZE = 32  # functions a worker keeps unpickled; more means more worker memory
START_BACKOFF_S = (0.05, 2.0)  # first and longest wait between failed worker starts
MAX_WAIT_S = 3600.0  # the hub wakes at least this often, whatever the deadlines say
FUNCTION_LOAD_S = 60.0  # the bound on loading a function, outside any item's timeout

_pools: weakref.WeakSet[Pool] = weakref.WeakSet()


class Sink(Protocol):
    """Receives a job's outcomes; called from the hub thread only, outside the
    pool's lock. Implementations must be quick and run no user code.

    A sink may also have ``on_returned(job)``: the job ended early with the items
    from ``job.cursor`` on unrun, for the sink to resubmit (else it is re-queued).
    """

    def on_results(self, job: Job, values: list[Any], errors: _wire.Errors) -> None:
        """The next ``len(values)`` items of ``job``, in order; ``errors`` maps
        positions in ``values`` to ``(exception, traceback_text)``."""

    def on_job_done(self, job: Job) -> None: ...

    # Optional: ``on_started(job)``, called (outside the lock, in order with the
    # other calls) each time the job is given to a worker; see ``Pool._assign``.


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
    is per item: the first item's from the moment it is sent to a worker (so
    it covers unpickling the function and arguments), each next one's from
    the end of the one before. ``first_index`` and
    ``tag`` belong to the sink.
    """

    fn: Shipped
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
    isolate_from: int = 0  # run items one at a time from here ...
    isolate_until: int = 0  # ... up to here (a step of tiny items that crashed)
    has_bad: bool = False  # some items were replaced by BadArgs stand-ins
    finished: bool = False
    kill_reason: BaseException | None = None
    killed: bool = False
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
    fns: collections.OrderedDict[bytes, None] = field(default_factory=collections.OrderedDict)
    send_lock: threading.Lock = field(default_factory=threading.Lock)
    slot: Slot | None = None
    seq: int = 0  # sequence number of the last batch sent
    init_error: tuple[BaseException, str] | None = None  # the initializer raised


def kill_tree(pid: int) -> None:
    """SIGKILL a worker and every process its tasks started: its process group
    (which reaches a shell's background grandchild), then, for processes that
    moved to another group, its descendants as they were before the kill."""
    import psutil  # here: workers import this module, and psutil costs ~8 ms

    try:
        proc = psutil.Process(pid)
        children = proc.children(recursive=True)
    except psutil.Error:
        children = []
    _reaper.kill_group(pid)
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
        max_start_failures: int = 3,
        start_failure_window: float = 5.0,
        initializer: bytes | None = None,
    ) -> None:
        self.base = max_workers
        self.initializer = initializer  # pickled (fn, args), run by each worker before READY
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
        self._pid = os.getpid()
        self._forked = False
        self.max_start_failures = max_start_failures
        self.start_failure_window = start_failure_window
        self._start_failures: collections.deque[float] = collections.deque()
        self._start_error: BaseException | None = None
        self._next_start_at = 0.0
        self._backoff = 0.0
        self._start_detail = ""  # the worker traceback of a raising initializer
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
        _reaper.acquire(self)
        self._hub = threading.Thread(target=self._run_hub, name="parstream-hub", daemon=True)
        mark_hub_thread(self._hub)
        self._hub.start()
        _pools.add(self)

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

    @property
    def forked(self) -> bool:
        """True in a forked child's copy of a pool (which must not be used)."""
        return self._forked or self._pid != os.getpid()

    @property
    def start_error(self) -> BaseException | None:
        """Why the last worker start failed, while starts are failing."""
        return self._start_error

    def fork_error(self) -> SupervisorClosed:
        return SupervisorClosed(
            f"this Supervisor was created in process {self._pid} and reached process "
            f"{os.getpid()} through os.fork(); its workers belong to the parent. Create a "
            "new Supervisor in the child (parstream's module-level functions do so)"
        )

    def submit(self, job: Job) -> None:
        with self._lock:
            if self.forked:
                raise self.fork_error()
            if self._closed:
                raise SupervisorClosed("the supervisor is closed")
            if self._start_error is not None:
                # New work during a run of failed starts: try again soon rather
                # than at the end of a long back-off, so a fixed cause (a
                # working directory back, an initializer that no longer raises)
                # is noticed at once.
                soon = time.monotonic() + START_BACKOFF_S[0]
                self._next_start_at = min(self._next_start_at, soon)
            self.counters["tasks_started"] += len(job.items)
            worker = self._idle_worker()
            if worker is None or (job.gate is not None and job.gate.active >= job.gate.limit):
                self._queue.append(job)
                self._wake()
                return
            self._assign(worker, job)
        self._send(worker, job)

    def kill(self, job: Job, reason: BaseException | None, *, grace: float = 0.0) -> None:
        """Stop ``job``: its running item's worker is killed and replaced.

        With a ``reason``, each unreported item gets it as its failure;
        without, they are dropped. With ``grace``, the worker's process group
        gets SIGTERM first and SIGKILL after ``grace`` seconds, and results it
        sends before dying still count. Safe to call from any thread, any time;
        the sink hears of it from the hub thread.
        """
        if self.forked:
            return  # never signal the parent's workers from a forked child
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
                    _reaper.term_group(worker.pid)  # the task's subprocesses too
                else:
                    job.killed = True
                    kill_tree(worker.pid)
            self._wake()

    def cancel(self, job: Job) -> bool:
        """Withdraw ``job`` if no worker has taken it yet; True if it was withdrawn.

        Atomic with dispatch (under the lock): a withdrawn job never runs, and
        its sink hears nothing more. False once the job was given to a worker
        or has ended.
        """
        with self._lock:
            if job.finished or job.killed or job.worker is not None or job.started_at:
                return False
            try:
                self._queue.remove(job)
            except ValueError:
                return False
            job.finished = True
            job.killed = True
            self.counters["tasks_killed"] += len(job.items) - job.cursor
            job.cursor = len(job.items)
            return True

    def running_pid(self, job: Job) -> int | None:
        """The pid of the worker that has begun ``job``'s current slice, if any."""
        worker = job.worker
        if worker is None or worker.state != "busy":
            return None
        slot = worker.slot
        if slot is not None and slot.read()[0] != worker.seq:
            return None  # handed over, not begun: a death now re-queues it
        return worker.pid

    def reserve(self, n: int) -> None:
        """Allow ``n`` more workers than the base size while they are needed."""
        if self.forked:
            return
        with self._lock:
            self._reserved += n
            self._wake()

    def release(self, n: int) -> None:
        if self.forked:
            return
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
        if self.forked:
            self._forget_after_fork()
            return
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
        _reaper.release(self)

    @property
    def closed(self) -> bool:
        return self._closed

    def _forget_after_fork(self) -> None:
        """In a forked child: drop the parent's workers without touching them."""
        if self._forked:
            return
        self._forked = True
        self._closed = True
        self._lock = threading.RLock()  # a parent thread may have held it at fork
        self._notes_lock = threading.RLock()
        for w in self._workers:
            with contextlib.suppress(OSError):
                w.conn.close()
            if w.slot is not None:
                w.slot.close()
        self._workers = []
        self._queue = collections.deque()
        self._notes = collections.deque()
        for end in (self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                end.close()
        if self._selector is not None:
            with contextlib.suppress(OSError):
                self._selector.close()
            self._selector = None

    # -- dispatch -----------------------------------------------------------

    def _idle_worker(self) -> _Worker | None:
        for w in self._workers:
            if w.state == "idle" and w.kill_cause is None:
                return w
        return None

    def _assign(self, worker: _Worker, job: Job) -> None:
        worker.seq += 1  # this slice's number: the worker writes it in its slot on reading it
        worker.state = "busy"
        worker.job = job
        worker.batch_start = job.cursor
        if job.gate is not None:
            job.gate.active += 1
        worker.delivered = False
        worker.timed_out_index = None
        job.worker = worker
        alone = job.isolate or job.isolate_from <= job.cursor < job.isolate_until
        end = len(job.items) if not alone else job.cursor + 1
        if job.cursor < job.isolate_from:
            end = min(end, job.isolate_from)  # a batch up to the crashed step
        if self.max_tasks_per_worker:
            # A batch never takes a worker past its limit: the rest of the
            # job goes to the next worker once this one retires.
            end = min(end, job.cursor + max(1, self.max_tasks_per_worker - worker.items_done))
        job.sent_end = min(end, len(job.items))
        job.started_at = time.monotonic()
        # The first item's clock starts now, before the worker has unpickled
        # anything: a timeout bounds everything from dispatch to result.
        worker.item_started = job.started_at if job.timeout is not None else None
        on_started = getattr(job.sink, "on_started", None)
        if on_started is not None:
            self._note(on_started, job)

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
        evict: list[bytes] = []
        key = job.fn.key
        if key in worker.fns:
            worker.fns.move_to_end(key)
        else:
            fn_bytes = job.fn.data
            worker.fns[key] = None
            while len(worker.fns) > FN_CACHE_SIZE:
                evict.append(worker.fns.popitem(last=False)[0])
        report_each = job.timeout is not None
        if report_each and fn_bytes is not None:
            # Importing the function's module is not the item's time (a heavy
            # import would time out every first item): the clock restarts
            # when the worker says LOADED, with this bound on the loading.
            worker.item_started = job.started_at + FUNCTION_LOAD_S
        items = job.items[job.cursor : job.sent_end]
        level = logging.getLogger().getEffectiveLevel()
        has_bad = job.has_bad
        try:
            items_bytes = _wire.dumps(items)
        except BaseException:
            # Some arguments cannot be pickled: each such item fails alone (the
            # worker reports the stand-in's error in its place, keeping order).
            for i, args in enumerate(items):
                try:
                    _wire.dumps(args)
                except BaseException as cause:
                    culprit = _culprit_error(args if job.star else (args,), cause)
                    items[i] = _wire.BadArgs(culprit)
            job.items[job.cursor : job.sent_end] = items
            items_bytes = _wire.dumps(items)
            has_bad = job.has_bad = True  # also when a slice is sent again
        message = (
            key,
            fn_bytes,
            len(items),
            items_bytes,
            job.star,
            report_each,
            evict,
            has_bad,
            level,
        )
        return _wire.encode_run(worker.seq, message)

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
            _reaper.release(self)

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
        if self._next_start_at > now and self._wants_workers():
            best = self._next_start_at - now
        for w in self._workers:
            dl: float | None = None
            if w.kill_deadline is not None:
                dl = w.kill_deadline
            elif w.state == "busy" and w.job is not None and w.item_started is not None:
                if w.job.timeout is not None and w.kill_cause is None:
                    dl = w.item_started + w.job.timeout
            elif w.state == "idle" and self._surplus():
                dl = w.idle_since + self.idle_timeout
            if dl is not None:
                wait = max(0.0, dl - now)
                best = wait if best is None else min(best, wait)
        return MAX_WAIT_S if best is None else min(best, MAX_WAIT_S)

    def _live(self) -> list[_Worker]:
        return [w for w in self._workers if w.state in ("starting", "idle", "busy")]

    def _surplus(self) -> bool:
        """More live workers than the base size plus the reservations."""
        return len(self._live()) > self.base + self._reserved

    def _wanted(self) -> int:
        live = self._live()
        idle_or_starting = sum(1 for w in live if w.state in ("starting", "idle"))
        # Keep the base size warm; grow up to the reservations when work waits.
        want = max(len(live), self.base)
        shortfall = len(self._queue) - idle_or_starting
        if shortfall > 0:
            want = max(want, min(len(live) + shortfall, self.base + self._reserved))
        return want - len(live)

    def _wants_workers(self) -> bool:
        return not self._closed and self._wanted() > 0

    def _spawn_as_needed(self) -> None:
        if self._closed or time.monotonic() < self._next_start_at:
            return
        for _ in range(self._wanted()):
            try:
                self._start_worker()
            except Exception as exc:
                # Out of processes or descriptors, no working directory, a
                # broken interpreter: retry later, and tell the waiting work.
                self._start_failed(exc)
                return

    def _start_failed(self, cause: BaseException) -> None:
        """A worker could not be started (lock held): back off, maybe fail the queue."""
        now = time.monotonic()
        first = self._start_error is None
        self._start_error = cause
        self.counters["worker_start_failures"] += 1
        self._start_failures.append(now)
        while self._start_failures and now - self._start_failures[0] > self.start_failure_window:
            self._start_failures.popleft()
        low, high = START_BACKOFF_S
        self._backoff = min(max(self._backoff * 2, low), high)
        self._next_start_at = now + self._backoff
        if first:
            log.error("parstream: could not start a worker process: %r (retrying)", cause)
        if len(self._start_failures) > self.max_start_failures:
            self._fail_queue(cause)

    def _start_worker(self) -> None:
        parent_conn, child_conn = self._ctx.Pipe(duplex=True)
        slot = new_slot()
        try:
            process = self._ctx.Process(
                target=worker_main,
                args=(child_conn, os.getpid(), slot, self.initializer),
                name="parstream-worker",
                env={"PYTHONUNBUFFERED": "1"},
            )
            with _allow_children_of_daemon():
                process.start()
        except BaseException:
            parent_conn.close()
            child_conn.close()
            if slot is not None:
                slot.close()
            raise
        _reaper.watch(process.pid)
        child_conn.close()
        worker = _Worker(process=process, conn=parent_conn, pid=process.pid, slot=slot)
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
                if self._start_error is not None:
                    log.info("parstream: worker processes start again")
                self._start_failures.clear()
                self._start_error = None
                self._start_detail = ""
                self._backoff = 0.0
                self._next_start_at = 0.0
        elif kind == _wire.LOADED:
            if worker.job is not None and worker.job.timeout is not None:
                worker.item_started = time.monotonic()
        elif kind == _wire.FORGET:
            with self._lock:
                worker.fns.pop(_wire.decode(data), None)
        elif kind == _wire.START_FAILED:
            worker.init_error = _wire.decode(data)
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
                worker.fns.pop(job.fn.key, None)
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
                self._note(job.sink.on_results, job, values, errors)
        if count:
            worker.item_started = t_next  # the worker's clock: the next item's start
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
        worker.state = "idle"
        worker.idle_since = time.monotonic()
        if worker.kill_cause == "kill" and worker.kill_deadline is not None:
            # A graceful shutdown the reply won: the worker has had SIGTERM,
            # so it is not reused; kill it now rather than at the deadline.
            worker.kill_deadline = None
            kill_tree(worker.pid)
        if job.killed:
            self._finish_killed(job)
        elif job.cursor >= len(job.items):
            job.finished = True
            self._note(job.sink.on_job_done, job)
        elif not (job.isolate or job.has_bad) and (
            returned := getattr(job.sink, "on_returned", None)
        ):
            # The worker stopped the batch at its time budget (issue 8, item
            # 10): the sink re-cuts the unrun rest, so items that turned slow
            # spread over every free worker instead of staying on this one.
            job.finished = True
            self.counters["tasks_started"] -= len(job.items) - job.cursor
            self._note(returned, job)
        else:
            self._queue.appendleft(job)
            self._wake()

    def _requeue(self, worker: _Worker, job: Job) -> None:
        self._unassign(worker)
        job.worker = None
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
        n = len(job.items) - job.cursor
        if isinstance(job.kill_reason, TaskTimeout):
            counter = "tasks_timed_out"
        elif isinstance(job.kill_reason, WorkerStartFailed):
            counter = "tasks_failed"
        else:
            counter = "tasks_killed"
        if n > 0:
            self.counters[counter] += n
        if job.kill_reason is not None and n > 0:
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
        _reaper.worker_gone(worker.pid)  # before the join: the group id is still ours
        worker.process.join(timeout=1.0)
        exitcode = worker.process.exitcode
        slot = worker.slot
        begun_seq, begun, window = slot.read() if slot is not None else (-1, -1, None)
        try:
            self._settle_death(worker, slot, delivered, exitcode, begun_seq, begun, window)
        finally:
            if slot is not None:
                slot.close()

    def _settle_death(
        self,
        worker: _Worker,
        slot: Slot | None,
        delivered: bool,
        exitcode: int | None,
        begun_seq: int,
        begun: int,
        window: int | None,
    ) -> None:
        with self._lock:
            if worker in self._workers:
                self._workers.remove(worker)
            was_starting = worker.state == "starting"
            worker.state = "dead"
            job = self._unassign(worker)
            cause = worker.kill_cause
            if was_starting and cause is None and not self._closed:
                if worker.init_error is not None:
                    failure: BaseException = _wire.rebuild_error(worker.init_error)
                    self._start_detail = worker.init_error[1]
                else:
                    failure = WorkerStartFailed(
                        f"a worker process (pid {worker.pid}) exited with code {exitcode} "
                        "before it was ready; see its stderr for the cause",
                        exitcode=exitcode,
                    )
                self._start_failed(failure)
            if job is None or job.finished:
                return
            job.worker = None
            if job.killed or cause in ("kill", "close"):
                job.killed = True
                self._finish_killed(job)
                return
            if not delivered or job.cursor >= job.sent_end:
                self._queue.appendleft(job)
                return
            if slot is not None:
                self._blame_exactly(worker, job, cause, exitcode, begun_seq, begun, window)
            else:
                self._blame_coarsely(worker, job, cause, exitcode)
            if job.cursor >= len(job.items):
                job.finished = True
                self._note(job.sink.on_job_done, job)
            else:
                self._queue.appendleft(job)

    def _timeout_error(self, worker: _Worker, job: Job) -> TaskTimeout:
        index = job.first_index + job.cursor
        return TaskTimeout(
            f"item {index} ran longer than its timeout of {job.timeout} s; its worker "
            f"(pid {worker.pid}) was killed and replaced",
            index=index,
            timeout=job.timeout,
        )

    def _blame_exactly(
        self,
        worker: _Worker,
        job: Job,
        cause: str | None,
        exitcode: int | None,
        begun_seq: int,
        begun: int,
        window: int | None,
    ) -> None:
        """Settle a dead worker's slice from its slot (lock held).

        The slot says how many of the slice's items the worker began: the
        last one began is the culprit, every later one never started and is
        re-queued, so nothing runs twice. For tiny items run from C a step
        at a time, the slot gives the step instead (``window``): the items
        before it are settled so, and the step's items run again one at a
        time, which finds the culprit.
        """
        if begun_seq != worker.seq:
            return  # the worker never began this slice: re-queue it whole
        end = min(worker.batch_start + begun, job.sent_end)
        if window is not None:
            # Tiny items, run from C a step at a time and not journaled (the
            # journal would cost more than the item): what finished since the
            # last flush runs again, as a batch, and the step that crashed
            # runs one item at a time, which finds the culprit.
            start = worker.batch_start + window
            if start >= end or end <= job.cursor:
                return  # died between steps, after reporting what it ran
            self._settle_finished(worker, job, exitcode, job.cursor, start)
            job.isolate_from = max(start, job.cursor)
            job.isolate_until = max(job.isolate_until, end)
            return
        culprit = end - 1  # index in job.items
        if begun == 0:
            # Died while unpickling the batch (a function or argument whose
            # loading kills the process): find the culprit one item at a time.
            if job.sent_end - job.cursor == 1:
                culprit = job.cursor
            else:
                job.isolate = True
                return
        if culprit < job.cursor:
            return  # died between items, after reporting the last one it ran
        self._settle_finished(worker, job, exitcode, culprit, culprit)
        if job.cursor > culprit:
            return  # the last item begun had finished: nothing to blame
        if cause == "timeout":
            if culprit == worker.timed_out_index:
                late = self._timeout_error(worker, job)
                self._report_error(job, (late, ""), "tasks_timed_out")
            # else: the late item finished just before the kill, and the one
            # after it had barely begun; that one is re-queued.
        else:
            self._report_error(job, (_crash_error(worker.pid, exitcode), ""), "tasks_crashed")

    def _settle_finished(
        self, worker: _Worker, job: Job, exitcode: int | None, until: int, culprit: int
    ) -> None:
        """Deliver the dead worker's items finished before ``until`` (lock held):
        from the journal where it has them, else as lost. None runs again."""
        assert worker.slot is not None
        base, entries = worker.slot.journal()
        base += worker.batch_start
        values: list[Any] = []
        errors: _wire.Errors = {}
        lost = WorkerCrashed(
            f"this item finished, but its result was lost: its worker (pid "
            f"{worker.pid}) died while running item {job.first_index + culprit} of the "
            "same batch, before sending the results; the item was not run again",
            exitcode=exitcode,
            pid=worker.pid,
        )
        position = job.cursor
        while position < until or base <= position < base + len(entries):
            if base <= position < base + len(entries):
                ok, outcome = entries[position - base]
                if ok:
                    values.append(outcome)
                else:
                    errors[len(values)] = outcome
                    values.append(None)
            else:
                errors[len(values)] = (lost, "")
                values.append(None)
            position += 1
        if values:
            failed = len(errors)
            job.cursor += len(values)
            self.counters["tasks_crashed"] += failed
            self.counters["tasks_ok"] += len(values) - failed
            if not job.killed:
                self._note(job.sink.on_results, job, values, errors)

    def _blame_coarsely(
        self, worker: _Worker, job: Job, cause: str | None, exitcode: int | None
    ) -> None:
        """Without a slot: blame from what was reported (lock held)."""
        if cause == "timeout":
            if worker.timed_out_index == job.cursor:
                self._report_error(job, (self._timeout_error(worker, job), ""), "tasks_timed_out")
        elif job.timeout is not None or job.sent_end - job.cursor == 1 or job.isolate:
            crash = _crash_error(worker.pid, exitcode)
            self._report_error(job, (crash, ""), "tasks_crashed")
        else:
            # Several items were on the worker and we cannot tell which one
            # took it down: run them one at a time to find out.
            job.isolate = True

    def _fail_queue(self, cause: BaseException) -> None:
        err = WorkerStartFailed(
            f"no worker process could be started ({len(self._start_failures)} failures "
            f"within {self.start_failure_window:g} s): {cause!r}; parstream keeps retrying",
            exitcode=getattr(cause, "exitcode", None),
        )
        if self._start_detail:
            err = WorkerStartFailed(
                f"{err}\n\nWorker traceback:\n{self._start_detail.rstrip()}",
                exitcode=err.exitcode,
            )
        err.__cause__ = cause
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
                    and self._surplus()
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


@contextlib.contextmanager
def _allow_children_of_daemon() -> Any:
    """Let a daemonic process (a ``multiprocessing.Pool`` worker) start workers.

    multiprocessing refuses children to daemonic processes so that none is
    orphaned when the daemon is terminated; ours die with their parent
    (``PR_SET_PDEATHSIG`` and a parent-pid watch), so the rule's reason does
    not apply. The flag is lifted only while the hub starts one worker.
    """
    import multiprocessing

    config = multiprocessing.current_process()._config  # type: ignore[attr-defined]
    daemon = config.pop("daemon", None)
    try:
        yield
    finally:
        if daemon is not None:
            config["daemon"] = daemon


def _after_fork_in_child() -> None:
    for pool in list(_pools):
        pool._forget_after_fork()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


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
