"""The Supervisor: the public owner of a pool, its tasks, children and streams.

It validates every call, then wires the parts: ``async_`` makes a ``Task`` and
submits its one-item ``Job`` to the ``Pool``; ``async_stream`` builds a
``Stream``; ``start_child`` runs a ``Child`` whose task's completion callback
applies the restart rules (temporary, transient, permanent) and the restart
intensity (more than ``max_restarts`` in ``max_seconds`` makes the supervisor
give up: it terminates its children and closes). It is also a
``concurrent.futures.Executor``: ``submit``, ``map`` and ``shutdown`` delegate
to ``_executor`` (futures, the map stream, what a shutdown waits for).

Lock order: the Supervisor's lock guards only its own bookkeeping and is never
held while calling into the pool, whose hub thread runs task callbacks.
"""

from __future__ import annotations

import atexit
import collections
import concurrent.futures
import contextlib
import functools
import logging
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Literal, TypeVar

from loky import cpu_count as _loky_cpu_count

from parstream import _executor, _wire
from parstream._errors import SupervisorClosed, TaskShutdown
from parstream._functions import ship
from parstream._pool import Job, Pool
from parstream._progress import check_progress
from parstream._results import Exit, Ok, Stats
from parstream._stream import OnTimeout, Stream, _State
from parstream._task import BRUTAL_KILL, ShutdownTimeout, Task, _BrutalKill
from parstream._validate import check_callable, check_int, check_timeout

log = logging.getLogger("parstream")

T = TypeVar("T")
Restart = Literal["temporary", "transient", "permanent"]

_live: weakref.WeakSet[Supervisor] = weakref.WeakSet()


def cpu_count() -> int:
    """CPUs this process may use (affinity and cgroup quotas honoured), from loky."""
    return int(_loky_cpu_count())


class Child:
    """A supervised child started by ``Supervisor.start_child``.

    ``restart`` decides what happens when its call ends: ``"temporary"``
    never restarts, ``"transient"`` restarts after an abnormal end (an
    exception other than ``SystemExit(0)``, a crash, a timeout), ``"permanent"``
    always restarts.
    """

    def __init__(
        self,
        sup: Supervisor,
        fn: Callable[..., Any],
        args: tuple[Any, ...],
        restart: Restart,
        shutdown: ShutdownTimeout,
    ) -> None:
        self._sup = weakref.ref(sup)  # a child must not keep a dropped supervisor alive
        self.fn = fn
        self.args = args
        self.restart = restart
        self.shutdown_timeout = shutdown
        self.restarts = 0
        self.task: Task[Any] | None = None
        self.terminated = False
        self.last_result: Ok[Any] | Exit | None = None
        self._ended = threading.Event()

    @property
    def pid(self) -> int | None:
        """The worker pid running the child now, or None between runs."""
        return self.task.pid if self.task is not None else None

    def alive(self) -> bool:
        """True while the child is running or about to be restarted."""
        return not self._ended.is_set()

    def wait(self, timeout: float | None = None) -> Ok[Any] | Exit | None:
        """Wait until the child ends for good (no more restarts); its last result."""
        self._ended.wait(timeout)
        return self.last_result if self._ended.is_set() else None

    def __repr__(self) -> str:
        return f"<Child {self.restart} restarts={self.restarts} alive={self.alive()}>"


def _is_normal(result: Ok[Any] | Exit | None) -> bool:
    if isinstance(result, Ok):
        return True
    if isinstance(result, Exit):
        reason = result.reason
        if isinstance(reason, SystemExit) and reason.code in (0, None):
            return True
        if isinstance(reason, TaskShutdown):
            return True
    return False


class Supervisor(concurrent.futures.Executor):
    """Owns worker processes and supervises the tasks, children and streams run on them.

    Args:
        max_restarts: restarts allowed within ``max_seconds`` before the
            supervisor gives up (terminates its children and closes). Failed
            worker starts count in a window of the same size: past it, the
            work waiting for a worker fails with ``WorkerStartFailed`` (the
            supervisor itself stays open, retries with back-off and recovers
            once workers start again).
        max_seconds: the window for ``max_restarts``, in seconds (> 0).
        max_children: cap on running children (``start_child``); None = no cap.
        max_workers: worker processes kept warm; default ``cpu_count()``. A
            stream asking for more concurrency, and each running child, get
            extra workers, which retire after ``idle_timeout`` s idle.
        max_tasks_per_worker: replace a worker after it ran this many items.
        max_tasks_per_child: ``ProcessPoolExecutor``'s name for
            ``max_tasks_per_worker``; give one or the other.
        initializer: called as ``initializer(*initargs)`` once in each worker
            before its first task, and in every replacement worker (after a
            crash, a timeout, a recycle). If it raises, the waiting calls fail
            with ``WorkerStartFailed`` carrying its exception and traceback;
            the next call tries again.
        initargs: arguments for ``initializer``.
        max_memory_per_worker: replace a worker whose RSS exceeds this many
            bytes (checked between tasks).
        idle_timeout: seconds an extra worker may stay idle.

    As a ``concurrent.futures.Executor``: ``with Supervisor() as ex:`` is
    ``shutdown(wait=True)`` on leaving the block normally or with an
    ``Exception``: submitted calls and tasks finish, children get their
    ``shutdown`` grace. A ``KeyboardInterrupt`` (any ``BaseException`` that is
    not an ``Exception``) leaving the block kills everything at once instead,
    as ``close()`` does: the Ctrl-C promise wins over the contract. A
    supervisor that is dropped without ``shutdown`` finishes its submitted
    calls, then releases its workers. At interpreter exit, pending submitted
    futures run to completion first (Ctrl-C during that wait kills them);
    tasks from ``async_``/``start``, children and streams are then killed.

    Example::

        with parstream.Supervisor() as sup:
            task = sup.async_(pow, 2, 10)
            assert task.await_() == 1024
    """

    def __init__(
        self,
        max_restarts: int = 3,
        max_seconds: float = 5.0,
        max_children: int | None = None,
        max_workers: int | None = None,
        *,
        max_tasks_per_worker: int | None = None,
        max_memory_per_worker: int | None = None,
        idle_timeout: float = 10.0,
        initializer: Callable[..., Any] | None = None,
        initargs: Iterable[Any] = (),
        max_tasks_per_child: int | None = None,
    ) -> None:
        check_int(max_restarts, "max_restarts", 0, allow_none=False)
        max_seconds = check_timeout(max_seconds, "max_seconds", allow_none=False)
        if max_seconds <= 0:
            raise ValueError(f"max_seconds must be > 0, got {max_seconds}")
        check_int(max_children, "max_children", 1)
        check_int(max_workers, "max_workers", 1)
        check_int(max_tasks_per_worker, "max_tasks_per_worker", 1)
        check_int(max_tasks_per_child, "max_tasks_per_child", 1)
        if max_tasks_per_child is not None:
            if max_tasks_per_worker is not None and max_tasks_per_worker != max_tasks_per_child:
                raise ValueError(
                    "max_tasks_per_child is an alias of max_tasks_per_worker; give one, "
                    f"got {max_tasks_per_worker} and {max_tasks_per_child}"
                )
            max_tasks_per_worker = max_tasks_per_child
        init_bytes = _pickle_initializer(initializer, initargs)
        check_int(max_memory_per_worker, "max_memory_per_worker", 1)
        check_timeout(idle_timeout, "idle_timeout", allow_none=False)
        self.max_restarts = max_restarts
        self.max_seconds = float(max_seconds)
        self.max_children = max_children
        self.max_workers = max_workers or cpu_count()
        self._lock = threading.Lock()
        self._closed_reason: str | None = None
        self._children: list[Child] = []
        self._restart_times: collections.deque[float] = collections.deque()
        self._restarts = 0
        self._tasks: weakref.WeakSet[Task[Any]] = weakref.WeakSet()
        self._counters: collections.Counter[str] = collections.Counter()
        self._pool = Pool(
            self.max_workers,
            max_tasks_per_worker=max_tasks_per_worker,
            max_memory_per_worker=max_memory_per_worker,
            idle_timeout=float(idle_timeout),
            counters=self._counters,
            max_start_failures=max_restarts,
            start_failure_window=float(max_seconds),
            initializer=init_bytes,
        )
        self._core = _executor.ExecutorCore(self._pool, self._tasks)
        # Dropped unreferenced: finish submitted work, then release the workers.
        weakref.finalize(self, _executor.release, self._core).atexit = False
        _live.add(self)

    # -- tasks ---------------------------------------------------------------

    def _check_open(self) -> None:
        if self._pool.forked:
            raise self._pool.fork_error()
        if self._closed_reason is not None:
            raise SupervisorClosed(self._closed_reason)

    def _make_task(
        self, fn: Callable[..., T], args: tuple[Any, ...], *, linked: bool, track: bool = True
    ) -> Task[T]:
        """A task for ``fn(*args)``, its function pickled now; not yet submitted."""
        check_callable(fn)
        self._check_open()
        job = Job(ship(fn), [args], None, star=True)  # type: ignore[arg-type]
        task: Task[T] = Task(self._pool, job, linked=linked)
        if track:  # shutdown(wait=True) waits for it (children end by their own rules)
            self._tasks.add(task)
        return task

    def _task(
        self, fn: Callable[..., T], args: tuple[Any, ...], *, linked: bool, track: bool = True
    ) -> Task[T]:
        task = self._make_task(fn, args, linked=linked, track=track)
        assert task._job is not None
        self._submit(task._job)
        return task

    def _submit(self, job: Job) -> None:
        try:
            self._pool.submit(job)
        except SupervisorClosed:
            raise SupervisorClosed(self._closed_reason or "the supervisor is closed") from None

    def async_(self, fn: Callable[..., T], *args: Any) -> Task[T]:
        """Run ``fn(*args)`` in a worker; a linked task (killed if its handle is dropped).

        Raises:
            TypeError: ``fn`` is not callable.
            pickle.PicklingError: ``fn`` cannot be pickled (the culprit is named).
            SupervisorClosed: the supervisor was closed or gave up.
        """
        return self._task(fn, args, linked=True)

    def async_nolink(self, fn: Callable[..., T], *args: Any) -> Task[T]:
        """Like ``async_``, but the task lives on if its handle is dropped."""
        return self._task(fn, args, linked=False)

    def start(self, fn: Callable[..., Any], *args: Any) -> None:
        """Fire and forget: a failure is logged on the ``parstream`` logger, never raised."""
        task = self._task(fn, args, linked=False)
        task.add_done_callback(_log_failure)

    # -- children ------------------------------------------------------------

    def start_child(
        self,
        fn: Callable[..., Any],
        *args: Any,
        restart: Restart = "temporary",
        shutdown: ShutdownTimeout = 5.0,
    ) -> Child:
        """Start a supervised child running ``fn(*args)``; see ``Child`` for ``restart``.

        Raises:
            ValueError: unknown ``restart``, negative ``shutdown``, or
                ``max_children`` reached.
            SupervisorClosed: the supervisor was closed or gave up.
        """
        check_callable(fn)
        if restart not in ("temporary", "transient", "permanent"):
            raise ValueError(
                f"restart must be 'temporary', 'transient' or 'permanent', got {restart!r}"
            )
        if not isinstance(shutdown, _BrutalKill):
            check_timeout(shutdown, "shutdown", allow_none=False)
        self._check_open()
        child = Child(self, fn, args, restart, shutdown)
        with self._lock:
            running = sum(1 for c in self._children if c.alive())
            if self.max_children is not None and running >= self.max_children:
                raise ValueError(f"max_children ({self.max_children}) children already running")
            self._children.append(child)
        self._pool.reserve(1)
        self._run_child(child, first=True)
        return child

    def _run_child(self, child: Child, *, first: bool = False) -> None:
        try:
            task = self._make_task(child.fn, child.args, linked=False, track=False)
        except SupervisorClosed:
            self._end_child(child)
            if first:
                raise
            return
        except Exception as exc:
            if first:  # start_child itself: the caller gets the error
                self._end_child(child)
                raise
            # The call no longer pickles (its closure changed): the child ends
            # with that error instead of waiting between runs for ever.
            child.last_result = Exit(exc)
            log.error("parstream: could not restart %r: %r", child, exc)
            self._end_child(child)
            return
        with self._lock:
            # terminate_child may have run while the call was being pickled.
            stop = child.terminated or self._closed_reason is not None
            if not stop:
                child.task = task
        if stop:
            self._end_child(child)
            return
        # Weakly: the pool holds the task, and must not hold the supervisor.
        task.add_done_callback(functools.partial(_child_done, weakref.ref(self), child))
        assert task._job is not None
        try:
            self._submit(task._job)
        except SupervisorClosed:
            self._end_child(child)

    def _child_done(self, child: Child, task: Task[Any]) -> None:
        result = task.result_nowait()
        child.last_result = result
        if child.terminated or self._closed_reason is not None:
            self._end_child(child)
            return
        normal = _is_normal(result)
        if child.restart == "temporary" or (child.restart == "transient" and normal):
            if not normal:
                _log_failure(task)
            self._end_child(child)
            return
        now = time.monotonic()
        with self._lock:
            self._restart_times.append(now)
            while self._restart_times and now - self._restart_times[0] > self.max_seconds:
                self._restart_times.popleft()
            too_many = len(self._restart_times) > self.max_restarts
            if not too_many:
                self._restarts += 1
                child.restarts += 1
        if too_many:
            reason = (
                f"the supervisor gave up: more than {self.max_restarts} restarts within "
                f"{self.max_seconds} s (last: {child!r} ended with {result!r})"
            )
            log.error("parstream: %s", reason)
            # Closed before anyone can see the child end: from the moment a
            # waiter wakes, every new call raises SupervisorClosed.
            with self._lock:
                if self._closed_reason is None:
                    self._closed_reason = reason
            self._close(reason)
            return
        self._run_child(child)

    def _end_child(self, child: Child) -> None:
        with self._lock:
            if child._ended.is_set():
                return
            child._ended.set()
            # Ended children are forgotten: a long-lived supervisor running a
            # child per request does not grow.
            with contextlib.suppress(ValueError):
                self._children.remove(child)
        self._pool.release(1)

    def children(self) -> list[Child]:
        """The children still running (or between restarts)."""
        with self._lock:
            return [c for c in self._children if c.alive()]

    def terminate_child(self, child: Child) -> bool:
        """Stop ``child`` (never restarted, even if permanent); False if not found."""
        if not isinstance(child, Child):
            raise TypeError(f"child must be a Child, got {type(child).__name__}")
        with self._lock:
            if child not in self._children or not child.alive():
                return False
            child.terminated = True
        task = child.task
        if task is not None:
            task.shutdown(child.shutdown_timeout)
        self._end_child(child)
        return True

    # -- streams -----------------------------------------------------------------

    def _stream(
        self,
        fn: Callable[..., Any],
        iterable: Iterable[Any],
        *,
        linked: bool,
        wrap: bool,
        max_concurrency: int | None,
        ordered: bool,
        timeout: float | None,
        on_timeout: OnTimeout,
        zip_input_on_exit: bool,
        progress: Any,
        chunksize: int | None,
        buffer_size: int | None,
    ) -> Any:
        check_callable(fn)
        if not isinstance(iterable, Iterable):
            raise TypeError(f"iterable must be iterable, got {type(iterable).__name__}")
        check_int(max_concurrency, "max_concurrency", 1)
        if not isinstance(ordered, bool):
            raise TypeError(f"ordered must be a bool, got {ordered!r}")
        timeout = check_timeout(timeout, "timeout")
        if timeout == 0:
            raise ValueError("timeout must be > 0 or None, got 0")
        if on_timeout not in ("exit", "kill_task"):
            raise ValueError(f"on_timeout must be 'exit' or 'kill_task', got {on_timeout!r}")
        if not isinstance(zip_input_on_exit, bool):
            raise TypeError(f"zip_input_on_exit must be a bool, got {zip_input_on_exit!r}")
        check_progress(progress)
        check_int(chunksize, "chunksize", 1)
        check_int(buffer_size, "buffer_size", 0)
        self._check_open()
        state = _State(
            self._pool,
            fn,
            iterable,
            linked=linked,
            max_concurrency=max_concurrency or self.max_workers,
            ordered=ordered,
            timeout=timeout,
            on_timeout=on_timeout,
            zip_input_on_exit=zip_input_on_exit,
            progress=progress,
            chunksize=chunksize,
            buffer_size=buffer_size,
        )
        stream = Stream(state, wrap=wrap)
        # The stream keeps its supervisor alive: a dropped supervisor's
        # finaliser closes the workers a stream still being consumed needs.
        stream._owner = self  # type: ignore[attr-defined]
        return stream if wrap else _values(stream)

    def async_stream(
        self,
        fn: Callable[..., Any],
        iterable: Iterable[Any],
        *,
        max_concurrency: int | None = None,
        ordered: bool = True,
        timeout: float | None = None,
        on_timeout: OnTimeout = "exit",
        zip_input_on_exit: bool = False,
        progress: Any = False,
        chunksize: int | None = None,
        buffer_size: int | None = None,
    ) -> Stream:
        """Run ``fn(item)`` for each item, in parallel, lazily; yield ``Ok``/``Exit``.

        Linked: the first task failure is raised from the iterator (original
        type, worker traceback as ``__cause__``) and the rest are killed.

        Args:
            max_concurrency: items running at once (default ``max_workers``);
                may exceed the cores, for I/O-bound items.
            ordered: yield in input order (True) or completion order.
            timeout: per item, from when it starts; the item's worker is
                killed and replaced on overrun.
            on_timeout: ``"exit"`` raises ``TaskTimeout`` from the iterator;
                ``"kill_task"`` yields ``Exit(TaskTimeout)`` and goes on.
            zip_input_on_exit: put the input item on every ``Exit``.
            progress: True, a dict of tqdm options, or a tqdm instance.
            chunksize: items per message to a worker; None adapts it to the
                measured cost per item (1 while items are slow).
            buffer_size: results that may wait behind a slow head item (or a
                slow consumer) before pulling stops; default
                ``4 * max_concurrency * chunk``. At most
                ``max_concurrency * chunk + buffer_size`` items are pulled and
                not yet delivered.
        """
        return self._stream(  # type: ignore[no-any-return]
            fn,
            iterable,
            linked=True,
            wrap=True,
            max_concurrency=max_concurrency,
            ordered=ordered,
            timeout=timeout,
            on_timeout=on_timeout,
            zip_input_on_exit=zip_input_on_exit,
            progress=progress,
            chunksize=chunksize,
            buffer_size=buffer_size,
        )

    def async_stream_nolink(
        self,
        fn: Callable[..., Any],
        iterable: Iterable[Any],
        *,
        max_concurrency: int | None = None,
        ordered: bool = True,
        timeout: float | None = None,
        on_timeout: OnTimeout = "exit",
        zip_input_on_exit: bool = False,
        progress: Any = False,
        chunksize: int | None = None,
        buffer_size: int | None = None,
    ) -> Stream:
        """Like ``async_stream``, but failures come back as ``Exit`` items and the
        stream goes on; every input gets exactly one result. A timeout under
        ``on_timeout="exit"`` still raises (as in Elixir)."""
        return self._stream(  # type: ignore[no-any-return]
            fn,
            iterable,
            linked=False,
            wrap=True,
            max_concurrency=max_concurrency,
            ordered=ordered,
            timeout=timeout,
            on_timeout=on_timeout,
            zip_input_on_exit=zip_input_on_exit,
            progress=progress,
            chunksize=chunksize,
            buffer_size=buffer_size,
        )

    def stream_map(
        self,
        fn: Callable[..., T],
        iterable: Iterable[Any],
        *,
        max_concurrency: int | None = None,
        ordered: bool = True,
        timeout: float | None = None,
        on_timeout: OnTimeout = "exit",
        progress: Any = False,
        chunksize: int | None = None,
        buffer_size: int | None = None,
    ) -> Iterator[T]:
        """The plain-values stream (``parstream.map`` on this supervisor): values in
        input order, raising the first failure. ``timeout`` is per item."""
        return self._stream(  # type: ignore[no-any-return]
            fn,
            iterable,
            linked=True,
            wrap=False,
            max_concurrency=max_concurrency,
            ordered=ordered,
            timeout=timeout,
            on_timeout=on_timeout,
            zip_input_on_exit=False,
            progress=progress,
            chunksize=chunksize,
            buffer_size=buffer_size,
        )

    # -- concurrent.futures.Executor ----------------------------------------

    def submit(
        self, fn: Callable[..., T], /, *args: Any, **kwargs: Any
    ) -> concurrent.futures.Future[T]:
        """``Executor.submit``: a ``concurrent.futures.Future`` for ``fn(*args, **kwargs)``.

        The future is pending until a worker takes the call; until then
        ``cancel()`` withdraws it (it never runs) and returns True.

        Raises:
            TypeError: ``fn`` is not callable.
            SupervisorClosed: (a ``RuntimeError``) after ``shutdown``/``close``.
        """
        check_callable(fn)
        self._check_open()
        call = functools.partial(fn, *args, **kwargs) if kwargs else fn
        shipped = ship(call)
        try:
            return self._core.submit(shipped, () if kwargs else args)
        except SupervisorClosed:
            raise SupervisorClosed(self._closed_reason or "the supervisor is closed") from None

    def map(
        self,
        fn: Callable[..., T],
        *iterables: Iterable[Any],
        timeout: float | None = None,
        chunksize: int | None = None,
        buffersize: int | None = None,
    ) -> Iterator[T]:
        """``Executor.map`` on the stream engine: ``fn(*args)`` for the items of
        ``iterables`` zipped (to the shortest), values in input order.

        Lazy and bounded, unlike the stdlib's eager ``map``: items are pulled as
        results are consumed, so an endless input is fine. The first exception
        is raised at its position; the calls after it are then stopped.

        Args:
            timeout: one deadline for the whole call, from the call to ``map``:
                a result not there by then raises ``TimeoutError``, the calls
                running are killed and those not started never run.
            chunksize: calls per message to a worker; None (the default)
                adapts it to the measured cost per call.
            buffersize: at most this many calls (chunks, with ``chunksize``)
                pulled from the input and not yet yielded, as in Python 3.14;
                None: the stream's own bound.

        Raises:
            TypeError/ValueError: bad arguments (named), at call time.
            SupervisorClosed: (a ``RuntimeError``) after ``shutdown``/``close``.
        """
        check_callable(fn)
        for it in iterables:
            if not isinstance(it, Iterable):
                raise TypeError(f"iterables must be iterable, got {type(it).__name__}")
        timeout = check_timeout(timeout, "timeout")
        check_int(chunksize, "chunksize", 1)
        check_int(buffersize, "buffersize", 1)
        deadline = None if timeout is None else time.monotonic() + timeout
        self._check_open()
        return _executor.start_map(
            self, self._pool, fn, iterables, self.max_workers, deadline, chunksize, buffersize
        )

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """``Executor.shutdown``: refuse new work, let submitted work finish, then close.

        Submitted futures and ``async_``/``start`` tasks run to completion;
        children are not restarted and each ends with its own ``shutdown``
        grace. ``wait=False`` returns at once and all that happens in the
        background. ``cancel_futures=True`` cancels the futures no worker has
        taken yet (running ones finish). Ctrl-C while waiting kills everything.
        """
        with self._lock:
            if self._closed_reason is None:
                self._closed_reason = "the supervisor was shut down"
        if cancel_futures:
            self._core.cancel_pending()
        if not wait:
            threading.Thread(target=self._finish, name="parstream-shutdown", daemon=True).start()
            return
        try:
            self._finish()
        except BaseException:
            self.close()
            raise

    def _finish(self) -> None:
        with self._lock:
            children = [c for c in self._children if c.alive()]
            for c in children:
                c.terminated = True
        ending = []
        for c in children:
            task = c.task
            if task is not None and task._job is not None and not task.done():
                grace = 0.0 if isinstance(c.shutdown_timeout, _BrutalKill) else c.shutdown_timeout
                self._pool.kill(task._job, None, grace=grace)
                ending.append(task)
        self._core.wait_all()
        for task in ending:
            task._done.wait()
        for c in children:
            self._end_child(c)
        self._close(self._closed_reason or "the supervisor was shut down")

    # -- the rest ----------------------------------------------------------------

    def stats(self) -> Stats:
        """A snapshot of this supervisor's counters."""
        c = self._counters
        return Stats(
            tasks_started=c["tasks_started"],
            tasks_ok=c["tasks_ok"],
            tasks_failed=c["tasks_failed"],
            tasks_crashed=c["tasks_crashed"],
            tasks_timed_out=c["tasks_timed_out"],
            tasks_killed=c["tasks_killed"],
            workers_started=c["workers_started"],
            workers_alive=len(self._pool.worker_pids()),
            restarts=self._restarts,
        )

    def worker_pids(self) -> list[int]:
        """Pids of the live worker processes."""
        return self._pool.worker_pids()

    def restart_workers(self) -> None:
        """Replace every worker (idle ones now, busy ones after their task).

        Workers import a module once; after editing a module your tasks use,
        call this so the next tasks run the new code.
        """
        self._check_open()
        self._pool.restart_workers()

    @property
    def closed(self) -> bool:
        return self._closed_reason is not None

    def close(self) -> None:
        """Kill every task, child and worker now; later calls raise ``SupervisorClosed``.

        Submitted futures no worker has taken are cancelled; running ones fail
        with ``TaskShutdown``.
        """
        with self._lock:
            if self._closed_reason is None:
                self._closed_reason = "the supervisor was closed"
        self._core.cancel_pending()
        self._close("the supervisor was closed")

    def _close(self, reason: str) -> None:
        if self._pool.forked:
            # A forked child's copy: its lock may have been held at the fork,
            # and the workers are the parent's. Only drop our copies.
            self._pool.close()
            _live.discard(self)
            return
        with self._lock:
            if self._closed_reason is None:
                self._closed_reason = reason
            children = list(self._children)
        for child in children:
            child.terminated = True
            self._end_child(child)
        for t in list(self._tasks):
            if not t.done():
                t._set(Exit(TaskShutdown(reason)))
        self._core.close_pool()
        _live.discard(self)

    def __enter__(self) -> Supervisor:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        if exc_type is not None and not issubclass(exc_type, Exception):
            self.close()  # Ctrl-C: kill at once rather than wait
        else:
            self.shutdown(wait=True)

    def __repr__(self) -> str:
        state = "closed" if self.closed else "open"
        return f"<Supervisor {state} max_workers={self.max_workers}>"


def _values(stream: Stream) -> Iterator[Any]:
    # Straight from the generator: a Python-level __next__ per item would
    # cost more than a tiny item's own work.
    try:
        yield from stream._gen
    finally:
        stream.close()


def _child_done(ref: weakref.ref[Supervisor], child: Child, task: Task[Any]) -> None:
    sup = ref()
    if sup is None:  # dropped: no more restarts; closing its pool ends the rest
        child.last_result = task.result_nowait()
        child._ended.set()
        return
    sup._child_done(child, task)


def _pickle_initializer(initializer: Any, initargs: Any) -> bytes | None:
    if initializer is None:
        return None
    check_callable(initializer, "initializer")
    if isinstance(initargs, str | bytes) or not isinstance(initargs, Iterable):
        raise TypeError(f"initargs must be a tuple of arguments, got {initargs!r}")
    try:
        return bytes(_wire.dumps((initializer, tuple(initargs))))
    except Exception as cause:
        import pickle

        name = getattr(initializer, "__qualname__", type(initializer).__qualname__)
        raise pickle.PicklingError(
            f"initializer ({name}) or its initargs could not be pickled: {cause}"
        ) from cause


def _log_failure(task: Task[Any]) -> None:
    r = task.result_nowait()
    if isinstance(r, Exit) and not isinstance(r.reason, TaskShutdown):
        log.error("parstream: a task failed: %r", r.reason, exc_info=r.reason)


@atexit.register
def _close_all() -> None:
    # Registered after multiprocessing's exit hook (imported with the pool), so
    # it runs first: the workers are gone before that hook joins them.
    try:
        _executor.finish_at_exit()  # pending futures first, as the stdlib does
    finally:
        for sup in list(_live):
            try:
                sup._close("the interpreter is exiting")
            except Exception:  # pragma: no cover
                pass
        _executor.close_all()


__all__ = ["BRUTAL_KILL", "Child", "Supervisor", "cpu_count"]
