"""Task handles: one call on one worker, and the ways to wait for it.

A ``Task`` is the backend's ``Sink`` for a one-item ``Job``: the backend's
event thread fills in its result (``Ok``/``Exit``) and sets an event; callers
block on that event
(``await_``, ``yield_``), in asyncio (``await task``) or through callbacks
(``Supervisor.submit``'s futures, child restarts). "Linked" (``async_``) means
the task is killed when its handle is garbage collected unfinished, and
``await_`` raises failures; ``yield_`` never raises.
"""

from __future__ import annotations

import contextlib
import threading
import time
import weakref
from collections.abc import Callable, Generator, Iterable
from typing import TYPE_CHECKING, Any, Final, Generic, Literal, TypeVar

from parstream import _callbacks
from parstream._backend import Job
from parstream._errors import TaskShutdown, TaskTimeout
from parstream._interrupts import held, waking
from parstream._output import settle as settle_output
from parstream._results import Exit, Ok
from parstream._validate import (
    STALL_GRACE_S,
    check_int,
    check_timeout,
    shown,
    stalled,
    wait_seconds,
)

if TYPE_CHECKING:
    import asyncio
    from collections.abc import Mapping
    from types import TracebackType

    from parstream._backend import Backend, End, FnHandle, Worker

T = TypeVar("T")


class _BrutalKill:
    def __repr__(self) -> str:
        return "BRUTAL_KILL"


BRUTAL_KILL: Final = _BrutalKill()
"""Pass as ``shutdown``'s timeout to kill the task at once (SIGKILL)."""

ShutdownTimeout = float | _BrutalKill


def _kill_job(backend: Backend, job: Job) -> None:
    backend.kill(job, None)


class _Latch:
    """A one-shot event made of one lock, held until ``set``.

    ``threading.Event`` wakes a waiter through a ``Condition``: the waiter
    wakes, then blocks again on the condition's own lock, which the setting
    thread still holds, so each task's result paid two context switches.
    Here the waiter wakes owning the lock and passes it on at once.
    """

    __slots__ = ("_flag", "_lock")

    def __init__(self) -> None:
        self._flag = False
        self._lock = threading.Lock()
        self._lock.acquire()

    def is_set(self) -> bool:
        return self._flag

    def set(self) -> None:
        """Release every waiter; call once (``Task._set`` sees to that)."""
        self._flag = True
        self._lock.release()

    def wait(self, timeout: float | None = None) -> bool:
        if self._flag:
            return True
        got = False
        try:
            limit = None if timeout is None else wait_seconds(timeout)
            if limit is None:
                got = self._lock.acquire()
            else:
                got = self._lock.acquire(timeout=max(0.0, limit))
        except BaseException:
            # Ctrl-C can land just after the acquire succeeded, before ``got``
            # says so: once set, pass the lock on anyway, or the other
            # waiters would wait for ever (an extra release is harmless).
            if self._flag:
                self._release()
            raise
        if got:
            self._release()  # the next waiter's turn
        return self._flag

    def _release(self) -> None:
        try:
            self._lock.release()
        except RuntimeError:  # already released by an interrupted waiter
            pass


class _TaskSink:
    """The backend's sink for a task. A linked task's holds it weakly, so the
    backend does not keep the Task alive and dropping the handle runs its
    finaliser (which kills the call)."""

    __slots__ = ("ref",)

    def __init__(self, task: Task[Any], *, weak: bool) -> None:
        self.ref: Callable[[], Task[Any] | None] = weakref.ref(task) if weak else lambda: task

    def on_started(self, at: float) -> None:
        task = self.ref()
        if task is not None:
            task._started = True

    def on_results(
        self, values: list[Any], errors: Mapping[int, BaseException], seconds: float | None
    ) -> None:
        task = self.ref()
        if task is not None:
            task._set(Exit(errors[0]) if errors else Ok(values[0]))

    def on_done(self, end: End, unrun: int) -> None:
        task = self.ref()
        if task is not None:
            task._set(Exit(TaskShutdown("the task was shut down before it returned")))


class Task(Generic[T]):
    """A handle to one call running in a worker process (Elixir's ``%Task{}``).

    Get one from ``parstream.async_`` or ``Supervisor.async_``/``async_nolink``;
    wait for it with ``await_``, ``yield_``, ``await task`` or the module-level
    ``await_many``/``yield_many``.
    """

    def __init__(
        self,
        backend: Backend | None = None,
        fn: FnHandle | None = None,
        args: tuple[Any, ...] = (),
        *,
        linked: bool = False,
        node: str | None = None,
        urgent: bool = False,
        lane: _callbacks.Lane | None = None,
        _completed: bool = False,
    ) -> None:
        if (backend is None or fn is None) and not _completed:
            # A handle with no call behind it would never finish: its await_()
            # would block for good.
            raise TypeError(
                "a Task is not made directly: use parstream.async_(fn, *args), "
                "Supervisor.async_/async_nolink, or parstream.completed(value)"
            )
        self._backend = backend
        self._lane = lane or _callbacks.DEFAULT_LANE  # its Supervisor's callback lane
        self._linked = linked
        self._lock = threading.Lock()
        self._done = _Latch()
        self._result: Ok[T] | Exit | None = None
        self._reason_tb: TracebackType | None = None
        self._callbacks: list[Callable[[Task[T]], None]] = []
        self._waiters: list[Callable[[Task[T]], None]] = []
        self._finalizer: weakref.finalize[Any, Any] | None = None
        self._job: Job | None = None
        self._started = False  # a worker took it (the backend said so)
        if backend is not None and fn is not None:
            sink = _TaskSink(self, weak=linked)
            self._job = Job(fn, [args], sink, star=True, node=node, urgent=urgent)
            if linked:
                self._finalizer = weakref.finalize(self, _kill_job, backend, self._job)
                # Not at exit: weakref's exit hook may run before parstream's,
                # whose kills the daemon threads still waiting must see.
                self._finalizer.atexit = False

    def _set(self, result: Ok[T] | Exit) -> None:
        with self._lock:
            if self._result is not None:
                return
            self._result = result
            if isinstance(result, Exit):
                # Raised again at each await: from this traceback every time,
                # or each raise would add its frames to the cached exception's.
                self._reason_tb = result.reason.__traceback__
            callbacks, self._callbacks = self._callbacks, []
            waiters, self._waiters = self._waiters, []
            # A finished task kept by the caller (a list of them awaited
            # together) must not keep its function and arguments alive.
            self._job = None
        if self._finalizer is not None:
            self._finalizer.detach()
        self._done.set()
        for wake in waiters:
            wake(self)
        # User code never runs on the hub thread that keeps every deadline.
        for cb in callbacks:
            self._lane.call_soon(cb, self)

    def add_done_callback(self, fn: Callable[[Task[T]], None]) -> None:
        """Call ``fn(task)`` once the task has a result.

        Callbacks run in order on the Supervisor's callback thread (never on
        the thread that keeps the pool's timeouts), or at once in the caller's
        thread if the task is already done. One that raises is logged on
        the ``parstream`` logger, in either case, as ``Future``'s are; the
        others still run.
        """
        if not callable(fn):
            raise TypeError(f"fn must be callable, got {type(fn).__name__}: {shown(fn)}")
        with self._lock:
            if self._result is None:
                self._callbacks.append(fn)
                pending = True
            else:
                pending = False
        if pending:
            # The thread that will run it starts now: at the interpreter's
            # exit, Python 3.12 and later refuse to start one.
            self._lane.ensure_started()
            return
        _callbacks.run_logged(fn, self)

    def _add_waiter(self, fn: Callable[[Task[T]], None]) -> None:
        """Like ``add_done_callback`` for parstream's own wake-ups: ``fn`` must be
        quick and never raise; it runs on whichever thread sets the result."""
        with self._lock:
            if self._result is None:
                self._waiters.append(fn)
                return
        fn(self)

    def _remove_waiter(self, fn: Callable[[Task[T]], None]) -> None:
        """Undo ``_add_waiter`` (a wait that gave up): repeated timed waits on
        a long task must not pile up their wake-ups on it."""
        with self._lock:
            try:
                self._waiters.remove(fn)
            except ValueError:  # already called and cleared by _set
                pass

    def _check_reachable(self) -> None:
        """A task inherited through os.fork() can never finish in the child."""
        backend = self._backend
        if backend is not None and backend.forked and not self._done.is_set():
            from parstream._errors import SupervisorClosed

            raise SupervisorClosed(backend.usable() or "the supervisor is closed")

    # -- waiting ----------------------------------------------------------------

    def done(self) -> bool:
        """True once the task has returned, failed or been killed."""
        return self._done.is_set()

    @property
    def pid(self) -> int | None:
        """The pid of the worker running the task now: set once a worker has
        begun it (a task handed to a worker that dies before reading it is
        queued again, not failed, so it has no pid yet), ``None`` otherwise,
        and always ``None`` on a backend that cannot know pids (Ray)."""
        worker = self.worker
        return None if worker is None else worker.pid

    @property
    def worker(self) -> Worker | None:
        """The worker running the task now (``pid``, ``node``), once one has
        begun it; ``None`` otherwise."""
        job = self._job
        if self._backend is None or job is None or self._done.is_set():
            return None
        return self._backend.worker_of(job)

    def result_nowait(self) -> Ok[T] | Exit | None:
        """The result if there is one, else ``None``; never blocks."""
        return self._result

    def await_(self, timeout: float | None = None) -> T:
        """Wait for the task and return its value.

        Args:
            timeout: seconds to wait, ``None`` for no limit. On expiry
                ``TaskTimeout`` is raised and a linked task (``async_``) is
                killed (its worker is replaced). An ``async_nolink`` task
                lives until it ends or its Supervisor closes, as in Elixir:
                it goes on running, and a later ``await_`` can still have its
                result. So does Ctrl-C while waiting (``shutdown()`` stops it).

        Raises:
            TaskTimeout: the task did not finish within ``timeout``.
            WorkerCrashed: the worker died while running the task.
            TaskShutdown: the task was shut down.
            Exception: the task's own exception, original type, with the
                worker's traceback as ``__cause__``.
        """
        timeout = check_timeout(timeout, "timeout")
        self._check_reachable()
        began = time.monotonic()
        try:
            finished = self._done.wait(timeout)
            if not finished and stalled(began + timeout):  # (timeout is not None here)
                finished = self._done.wait(STALL_GRACE_S)
        except BaseException:
            # Ctrl-C while waiting: a linked task must not go on without us.
            self._abandoned(TaskShutdown("the caller was interrupted while awaiting the task"))
            raise
        if not finished:
            message = f"task did not finish within {timeout} s; " + (
                "it was killed"
                if self._linked
                else "it is still running (an async_nolink task ends with its Supervisor)"
            )
            start_error = self._backend.start_error if self._backend is not None else None
            if start_error is not None:
                message += f" (no worker process could be started meanwhile: {start_error!r})"
            err = TaskTimeout(message, timeout=timeout)
            err.__cause__ = start_error
            if not self._linked:
                raise err
            self._kill(err)
        settle_output()  # in a kernel: what the worker printed is in the cell first
        return self._value()

    def yield_(self, timeout: float = 5.0) -> Ok[T] | Exit | None:
        """Wait up to ``timeout`` s; return ``Ok``/``Exit``, or ``None`` if still running.

        Never raises for the task's failures, and never kills it: call again,
        or ``shutdown()`` it.
        """
        timeout = check_timeout(timeout, "timeout", allow_none=False)
        self._check_reachable()
        try:
            finished = self._done.wait(wait_seconds(timeout))
        except BaseException:
            # Ctrl-C while waiting: as with await_, a linked task must not go
            # on without us (a timeout, by contrast, leaves it running).
            self._abandoned(TaskShutdown("the caller was interrupted while yielding on the task"))
            raise
        if finished:
            settle_output()
        return self._result

    def shutdown(self, timeout: ShutdownTimeout = 5.0) -> Ok[T] | Exit | None:
        """Stop the task: ask its worker to stop, kill it after ``timeout`` s.

        Returns ``Ok``/``Exit`` if the task finished first (a reply that raced
        in), else ``None``. ``BRUTAL_KILL`` kills at once. On the local
        backend that is SIGTERM then SIGKILL, and both reach every process the
        task started too (the worker's process group), except one the task
        moved to a session of its own (see the README); on Ray, a force cancel
        after the grace.
        """
        if not isinstance(timeout, _BrutalKill):
            timeout = check_timeout(timeout, "timeout", allow_none=False)
        if self._done.is_set():
            return self._shutdown_result()
        self._check_reachable()
        job = self._job  # None once the result is in
        if self._backend is not None and job is not None:
            grace = 0.0 if isinstance(timeout, _BrutalKill) else timeout
            with held():
                self._backend.kill(job, None, grace=grace)
            try:
                self._done.wait()
            except BaseException:
                # Ctrl-C during the grace: kill at once, then leave.
                with held():
                    self._backend.kill(job, None)
                raise
        return self._shutdown_result()

    def _shutdown_result(self) -> Ok[T] | Exit | None:
        """The result as ``shutdown`` reports it: ``None`` for a task that was
        shut down, on the first call and on every later one."""
        with self._lock:
            result = self._result
        if isinstance(result, Exit) and isinstance(result.reason, TaskShutdown):
            return None
        return result

    def ignore(self) -> Ok[T] | Exit | None:
        """Let the task run on out of reach; return its result if it has one."""
        if self._finalizer is not None:
            self._finalizer.detach()
        return self._result

    def __reduce__(self) -> Any:
        raise TypeError(
            "a parstream Task belongs to the process that started it and cannot be "
            "sent to another one: await it there and send its value"
        )

    def _value(self) -> T:
        """The value, or the task's exception raised (from its own traceback)."""
        result = self._result
        if isinstance(result, Ok):
            return result.value
        assert isinstance(result, Exit)
        if isinstance(result.reason, TaskShutdown):
            _callbacks.park_if_exiting()  # killed by the interpreter's exit
        raise result.reason.with_traceback(self._reason_tb)

    def _abandoned(self, reason: BaseException) -> None:
        """The caller stopped waiting (Ctrl-C, a cancelled coroutine, a
        sibling's failure): a linked task dies with it, as in Elixir; a
        nolink one's lifetime is its Supervisor's alone."""
        if self._linked:
            self._kill(reason)

    def _kill(self, reason: BaseException) -> None:
        with held():  # a second Ctrl-C must not leave the worker running
            job = self._job  # _set lets go of it
            self._set(Exit(reason))
            if self._backend is not None and job is not None:
                self._backend.kill(job, reason)

    def __await__(self) -> Generator[Any, None, T]:
        return self._async_await().__await__()

    async def _async_await(self) -> T:
        import asyncio  # here: workers import this module, and asyncio costs ~15 ms

        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()

        def wake(_: Task[T]) -> None:
            # A loop closed meanwhile has nobody awaiting here: the other
            # waiters and the callbacks must still be woken.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(_resolve, fut)

        self._add_waiter(wake)
        try:
            await waking(fut)
        except BaseException:
            # A nolink task lives on: the waiter, which holds the loop, must not.
            self._remove_waiter(wake)
            if not self.done():
                self._abandoned(TaskShutdown("the awaiting coroutine was cancelled"))
            raise
        settle_output()
        return self._value()

    def __repr__(self) -> str:
        state = "running" if self._result is None else repr(self._result)
        return f"<Task {state}>"


def _resolve(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


def completed(value: T) -> Task[T]:
    """A task that has already returned ``value`` (Elixir's ``Task.completed/1``)."""
    task: Task[T] = Task(_completed=True)
    task._set(Ok(value))
    return task


def _check_task(task: Task[T]) -> Task[T]:
    if not isinstance(task, Task):
        raise TypeError(f"task must be a Task, got {type(task).__name__}")
    return task


def _check_tasks(tasks: Iterable[Task[Any]]) -> list[Task[Any]]:
    if not isinstance(tasks, Iterable):
        raise TypeError(f"tasks must be an iterable of Task, got {type(tasks).__name__}")
    out = list(tasks)
    for t in out:
        if not isinstance(t, Task):
            raise TypeError(f"tasks must contain only Task objects, got {type(t).__name__}")
    return out


def _wait_for(
    tasks: list[Task[Any]], deadline: float | None, enough: Callable[[int, bool], bool]
) -> None:
    """Block until ``enough(done, failed)`` (how many of ``tasks`` are done,
    whether one failed) or the deadline passes. The wake-ups are taken back
    on the way out: repeated timed waits on a long task leave nothing on it."""
    cond = threading.Condition()
    done = [0]
    failed = [False]

    def bump(t: Task[Any]) -> None:
        with cond:
            done[0] += 1
            if isinstance(t.result_nowait(), Exit):
                failed[0] = True
            cond.notify()

    for t in tasks:
        t._add_waiter(bump)
    try:
        with cond:
            graced = False
            while not enough(done[0], failed[0]):
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    if graced or deadline is None or not stalled(deadline):
                        return
                    graced = True
                    deadline = time.monotonic() + STALL_GRACE_S
                    continue
                cond.wait(wait_seconds(remaining))
    finally:
        for t in tasks:
            t._remove_waiter(bump)


def _wait_some(tasks: list[Task[Any]], deadline: float | None, want: int) -> None:
    """Block until ``want`` of ``tasks`` are done or the deadline passes."""
    _wait_for(tasks, deadline, lambda done, _failed: done >= want)


def await_many(tasks: Iterable[Task[Any]], timeout: float | None = None) -> list[Any]:
    """Wait for every task; return their values in input order.

    ``timeout`` is one deadline for the whole call. On a failure, a timeout
    or Ctrl-C the error is raised and the linked tasks still running are
    killed; ``async_nolink`` tasks go on (their Supervisor owns them).

    Raises:
        TaskTimeout: not all tasks finished within ``timeout``.
        Exception: the first failure, as ``Task.await_`` would raise it.
    """
    tasks = _check_tasks(tasks)
    timeout = check_timeout(timeout, "timeout")
    for t in tasks:
        t._check_reachable()
    deadline = None if timeout is None else time.monotonic() + timeout
    try:
        _wait_until_all_or_failure(tasks, deadline)
    except BaseException:
        _kill_rest(tasks, TaskShutdown("await_many was interrupted"))
        raise
    failed = [t for t in tasks if isinstance(t.result_nowait(), Exit)]
    if failed:
        _kill_rest(tasks)
        # A task's own failure, not one killed for a sibling's (by another
        # thread's await_many on the same tasks, say).
        own = [t for t in failed if not getattr(_reason(t), _COLLATERAL, False)]
        (own or failed)[0]._value()  # raises
    if not all(t.done() for t in tasks):
        _kill_rest(tasks, TaskTimeout(f"tasks did not finish within {timeout} s", timeout=timeout))
        raise TaskTimeout(
            f"await_many: not every task finished within {timeout} s", timeout=timeout
        )
    return [t._value() for t in tasks]


def _reason(task: Task[Any]) -> BaseException | None:
    result = task.result_nowait()
    return result.reason if isinstance(result, Exit) else None


def _wait_until_all_or_failure(tasks: list[Task[Any]], deadline: float | None) -> None:
    _wait_for(tasks, deadline, lambda done, failed: failed or done >= len(tasks))


_COLLATERAL = "_parstream_collateral"  # set on the reason of a task killed for a sibling


def _kill_rest(tasks: list[Task[Any]], reason: BaseException | None = None) -> None:
    """Kill the linked tasks not done yet (the caller gave up on them: see
    ``Task._abandoned``); a Ctrl-C meanwhile waits until all are.
    Those still queued go first: killing a running one frees its worker,
    which would start a queued one before its own kill came (the calls not
    started never run)."""
    with held():
        rest = sorted((t for t in tasks if not t.done()), key=lambda t: t._started)
        for t in rest:
            t._abandoned(reason or _sibling_failed())


def _sibling_failed() -> TaskShutdown:
    reason = TaskShutdown("a sibling task in await_many failed")
    setattr(reason, _COLLATERAL, True)
    return reason


OnTimeout = Literal["nothing", "ignore", "kill_task"]


def yield_many(
    tasks: Iterable[Task[Any]],
    timeout: float = 5.0,
    *,
    on_timeout: OnTimeout = "nothing",
    limit: int | None = None,
) -> list[tuple[Task[Any], Ok[Any] | Exit | None]]:
    """Wait up to ``timeout`` s (one deadline) for the tasks; never raises for them.

    Returns ``[(task, Ok | Exit | None), ...]`` in input order, ``None`` for a
    task still running. Those are then left alone (``"nothing"``), detached
    (``"ignore"``) or killed (``"kill_task"``). With ``limit``, returns as soon
    as that many tasks are done, and ``on_timeout`` is not applied.
    """
    tasks = _check_tasks(tasks)
    timeout = check_timeout(timeout, "timeout", allow_none=False)
    if on_timeout not in ("nothing", "ignore", "kill_task"):
        raise ValueError(
            f"on_timeout must be 'nothing', 'ignore' or 'kill_task', got {shown(on_timeout)}"
        )
    limit = check_int(limit, "limit", 1)
    for t in tasks:
        t._check_reachable()
    want = len(tasks) if limit is None else min(limit, len(tasks))
    seconds = wait_seconds(timeout)
    try:
        _wait_some(tasks, None if seconds is None else time.monotonic() + seconds, want)
    except BaseException:
        # Ctrl-C while waiting: as with await_many, the tasks must not go on
        # without us (on_timeout governs a timeout, not an interrupt).
        _kill_rest(tasks, TaskShutdown("yield_many was interrupted"))
        raise
    results = [(t, t.result_nowait()) for t in tasks]
    if limit is None or sum(r is not None for _, r in results) < want:
        late = [t for t, r in results if r is None]
        if on_timeout == "kill_task":
            late.sort(key=lambda t: t._started)  # queued ones first (see _kill_rest)
            for t in late:
                t.shutdown(BRUTAL_KILL)
        elif on_timeout == "ignore":
            for t in late:
                t.ignore()
    return results


def await_(task: Task[T], timeout: float | None = None) -> T:
    """Module-level twin of ``Task.await_``."""
    return _check_task(task).await_(timeout)


def yield_(task: Task[T], timeout: float = 5.0) -> Ok[T] | Exit | None:
    """Module-level twin of ``Task.yield_``."""
    return _check_task(task).yield_(timeout)


def shutdown(task: Task[T], timeout: ShutdownTimeout = 5.0) -> Ok[T] | Exit | None:
    """Module-level twin of ``Task.shutdown``."""
    return _check_task(task).shutdown(timeout)
