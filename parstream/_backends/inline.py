"""The inline backend: tasks run in the calling thread, one item after another.

For debugging: ``breakpoint()``, pdb, profilers and coverage see a task's
code as they see the caller's, because it runs in the caller's thread (what
joblib users get from ``n_jobs=1``). A job runs to its end inside
``submit``; its outcomes reach the sink from this backend's event thread,
as with every backend, so streams, tasks, futures and children behave as
they do elsewhere, one item at a time.

What cannot hold in-process, and what happens instead:

* Nothing is pickled: a function or value that could not travel to a worker
  process works here.
* Per-item timeouts are reported, not enforced: an item is never
  interrupted; if it ran longer than its timeout, its result is dropped and
  it gets ``TaskTimeout``, as it would elsewhere (with ``on_timeout="exit"``
  the stream raises it). Refusing ``timeout=`` instead would make the same
  code fail only when debugged.
* ``kill`` cannot stop a running item: the job stops after it. Tasks are
  done when ``async_`` returns (``submit`` returns once the sinks have heard
  the outcomes), so there is rarely anything to kill.
* A child's restart is decided on parstream's callback thread; there it does
  not run inline (it would stall every other callback) but on a runner
  thread of this backend, one job after another.
* A crash (``os._exit``, a segfault) takes the caller down with it; nothing
  is isolated. ``KeyboardInterrupt`` inside a task stops the caller, as in a
  plain loop.
* One item runs at a time, whatever ``max_workers`` says: a stream runs
  one item at a time. Threads that submit at once each run their own job in
  their own thread, as plain calls would (a task may use parstream inline
  from a thread it starts, nested maps included). ``max_workers``,
  ``max_tasks_per_worker`` and ``max_memory_per_worker`` are accepted and
  have no effect, so that code written for worker processes runs unchanged
  when debugged. The ``initializer`` runs once, in this process, when the
  Supervisor is created; if it raises, each job fails with
  ``WorkerStartFailed`` (its exception as ``__cause__``), as a worker that
  cannot start fails it elsewhere, and the next job tries it again.
"""

from __future__ import annotations

import os
import queue
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from parstream._backend import BackendClosed, Capabilities, Counts, FnHandle, Node, Worker
from parstream._backends._dispatch import unusable
from parstream._callbacks import on_callback_thread
from parstream._errors import TaskTimeout, WorkerStartFailed

if TYPE_CHECKING:
    from collections.abc import Callable

    from parstream._backend import Backend, Job, Settings

CAPABILITIES = Capabilities(
    partial_results=True,
    timeout_from="start",
    kills=False,
    isolates_crashes=False,
    worker_pids=True,
    restarts_workers=False,
    nodes=False,
    pickles=False,
)


@dataclass(frozen=True)
class InlineBackend:
    """Run tasks in the calling thread, one item after another (for debugging).

    Example::

        # step into the task with pdb: the same code, run inline
        list(parstream.map(work, items, backend="inline"))
    """

    name = "inline"

    def open(self, settings: Settings) -> Backend:
        pool = InlinePool()
        if settings.initializer is not None:
            pool._initializer = (settings.initializer, settings.initargs)
            pool._initialize()
        return pool


class _Run:
    __slots__ = ("kill_reason", "killed", "running")

    def __init__(self) -> None:
        self.killed = False
        self.kill_reason: BaseException | None = None
        self.running = True


class InlinePool:
    """The engine: runs each job inside ``submit``; an event thread tells sinks."""

    name = "inline"
    capabilities = CAPABILITIES
    capacity = 1
    start_error = None

    def __init__(self) -> None:
        self._counts = Counts()
        # Guards the jobs running and the counts; not held while items run.
        self._lock = threading.Lock()
        self._running: list[Job] = []  # the jobs running now, nested ones included
        self._state = threading.Lock()  # guards _closed and _active
        self._active = 0  # submits in progress; the event thread outlives them
        self._runner: queue.SimpleQueue[Job | None] | None = None  # restarts (callback thread)
        # The Supervisor's initializer, until it has run without raising.
        self._initializer: tuple[Callable[..., Any], tuple[Any, ...]] | None = None
        self._init_lock = threading.Lock()
        self._init_error: BaseException | None = None
        self._closed = False
        self._pid = os.getpid()
        self._notes: queue.SimpleQueue[tuple[Callable[..., None], tuple[Any, ...]] | None] = (
            queue.SimpleQueue()
        )
        self._events = threading.Thread(
            target=self._run_events, name="parstream-inline-events", daemon=True
        )
        self._events.start()

    @property
    def forked(self) -> bool:
        return self._pid != os.getpid()

    def usable(self) -> str | None:
        return unusable(self._pid, self._closed, "its tasks")

    def _run_events(self) -> None:
        while True:
            note = self._notes.get()
            if note is None:
                return
            fn, args = note
            try:
                fn(*args)
            except Exception:  # pragma: no cover - a sink must not break the backend
                import logging

                logging.getLogger("parstream").exception("parstream: a sink failed")
            # Hold no sink (a task, a future, a chunk) nor its results while
            # waiting for the next note.
            del note, fn, args

    def _post(self, fn: Callable[..., None], *args: Any) -> None:
        self._notes.put((fn, args))

    def prepare(self, fn: Callable[..., Any]) -> FnHandle:
        return FnHandle(fn)

    def submit(self, job: Job) -> None:
        with self._state:
            why = self.usable()
            if why is not None:
                raise BackendClosed(why)
            self._active += 1
            job.state = _Run()
        if on_callback_thread():
            self._run_later(job)  # a restart: never stall the callback thread
            return
        try:
            self._run_job(job)
        finally:
            self._leave(wait=True)

    def _initialize(self) -> BaseException | None:
        """Run the initializer if it has not yet run without raising: None
        once it has, else the ``WorkerStartFailed`` a job gets for it."""
        with self._init_lock:
            init = self._initializer
            if init is None:
                return None
            fn, args = init
            try:
                fn(*args)
            except Exception as exc:
                error = WorkerStartFailed(
                    f"the initializer raised {exc!r}; the inline backend runs it again "
                    "for the next job"
                )
                error.__cause__ = exc
                self._init_error = error
                return error
            self._initializer = self._init_error = None
            return None

    def _run_job(self, job: Job) -> None:
        n = len(job.items)
        run: _Run = job.state
        failed = self._initialize() if self._initializer is not None else None
        if failed is not None:
            run.running = False
            with self._lock:
                self._counts.submitted += n
                self._counts.failed += n
                self._post(job.sink.on_results, [None] * n, dict.fromkeys(range(n), failed), None)
                self._post(job.sink.on_done, "finished", 0)
            return
        with self._lock:
            self._running.append(job)
            self._counts.submitted += n
            self._counts.started += n
            self._post(job.sink.on_started, time.monotonic())
        # The items run outside the lock: a task that waits on parstream
        # work submitted from another thread (a thread pool inside the task)
        # must not wait for itself.
        try:
            values, errors = self._run_items(job, run)
        except BaseException:
            # KeyboardInterrupt in the task: the job ends here, the
            # caller's exception goes on up.
            with self._lock:
                self._running.remove(job)
                self._end(job, run, [], {}, n)
            raise
        with self._lock:
            self._running.remove(job)
            self._end(job, run, values, errors, n - len(values))

    def _leave(self, *, wait: bool) -> None:
        """A submit is over: once its outcomes are delivered, return (so a task
        is done when ``async_`` returns); the last one after ``close()``
        stops the event thread."""
        with self._state:
            self._active -= 1
            last = self._closed and self._active == 0
        if last:
            self._notes.put(None)
        elif wait and not self._closed:
            delivered = threading.Event()
            self._post(delivered.set)
            delivered.wait()

    def _run_later(self, job: Job) -> None:
        with self._state:
            if self._runner is None:
                self._runner = queue.SimpleQueue()
                threading.Thread(
                    target=self._run_queued,
                    args=(self._runner,),
                    daemon=True,
                    name="parstream-inline-runner",
                ).start()
            self._runner.put(job)
            if self._closed:  # close() let the runner go already: this one ends after it
                self._runner.put(None)
                self._runner = None

    def _run_queued(self, jobs: queue.SimpleQueue[Job | None]) -> None:
        while True:
            job = jobs.get()
            if job is None:  # closed: nothing is queued after this
                return
            try:
                self._run_job(job)
            except BaseException:  # pragma: no cover - logged by the task's sink
                pass
            finally:
                self._leave(wait=False)
            del job  # its function, arguments and sink, until the next restart

    def _run_items(self, job: Job, run: _Run) -> tuple[list[Any], dict[int, BaseException]]:
        fn = job.fn.fn
        values: list[Any] = []
        errors: dict[int, BaseException] = {}
        for index, item in enumerate(job.items, job.first_index):
            if run.killed or self._closed:
                break
            started = time.monotonic()
            try:
                value = fn(*item) if job.star else fn(item)
            except KeyboardInterrupt:
                raise  # Ctrl-C stops the caller, as in a plain loop
            except BaseException as exc:  # SystemExit and the rest: the item's own
                errors[len(values)] = exc
                value = None
            took = time.monotonic() - started
            if job.timeout is not None and took > job.timeout:
                errors[len(values)] = TaskTimeout(
                    f"item {index} ran {took:.3g} s, longer than its timeout of "
                    f"{job.timeout} s; the inline backend cannot stop a running item, "
                    "so it ran to its end and its result was dropped",
                    index=index,
                    timeout=job.timeout,
                )
                value = None
            values.append(value)
        return values, errors

    def _end(
        self, job: Job, run: _Run, values: list[Any], errors: dict[int, BaseException], rest: int
    ) -> None:
        run.running = False
        counts = self._counts
        timed_out = sum(1 for e in errors.values() if isinstance(e, TaskTimeout))
        counts.timed_out += timed_out
        counts.failed += len(errors) - timed_out
        counts.ok += len(values) - len(errors)
        counts.killed += rest
        if values:
            self._post(job.sink.on_results, values, errors, None)
        reason = run.kill_reason
        if reason is not None and rest:  # killed with a reason: each unrun item gets it
            self._post(
                job.sink.on_results, [None] * rest, dict.fromkeys(range(rest), reason), None
            )
            self._post(job.sink.on_done, "killed", 0)
            return
        end = "closed" if self._closed and rest else ("killed" if rest else "finished")
        self._post(job.sink.on_done, end, rest)

    def kill(self, job: Job, reason: BaseException | None, *, grace: float = 0.0) -> None:
        run = job.state
        if isinstance(run, _Run) and run.running and not run.killed:
            run.killed = True  # it stops after the running item
            run.kill_reason = reason

    def cancel(self, job: Job) -> bool:
        return False  # a job runs inside submit: there is never one to withdraw

    def reserve(self, n: int) -> None:
        pass

    def release(self, n: int) -> None:
        pass

    def check_node(self, node: str) -> str:
        raise ValueError(f"node={node!r}: the inline backend has no nodes")

    def capacity_on(self, node: str) -> int:
        return self.capacity

    def worker_of(self, job: Job) -> Worker | None:
        if job in self._running:
            return Worker(id="inline", pid=os.getpid(), busy=True)
        return None

    def workers(self) -> list[Worker]:
        if self._closed:
            return []
        return [Worker(id="inline", pid=os.getpid(), busy=bool(self._running))]

    def nodes(self) -> list[Node]:
        return []

    def counts(self) -> Counts:
        return Counts(**vars(self._counts))

    def restart_workers(self) -> None:
        pass

    def close(self) -> None:
        """Refuse new work; a job running now stops after its item and still
        reports (its sink hears ``closed``) before the event thread ends."""
        with self._state:
            if self._closed:
                return
            self._closed = True
            idle = self._active == 0
            if self._runner is not None and not self.forked:
                # Its thread ends once the restarts queued before have run.
                self._runner.put(None)
                self._runner = None
        if self.forked:
            return
        if idle:
            self._notes.put(None)
            if threading.current_thread() is not self._events:
                self._events.join(timeout=5.0)
