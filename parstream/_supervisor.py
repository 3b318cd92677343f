"""The Supervisor: the public owner of a backend, its tasks, children and streams.

It validates every call, then wires the parts, all through the
``parstream._backend`` seam: ``async_`` makes a ``Task`` (a one-item ``Job``);
``async_stream`` and ``map`` build a ``Stream`` (``_stream``); ``start_child``
hands a ``Child`` to ``_children``, which applies the restart rules and the
restart intensity (more than ``max_restarts`` in ``max_seconds`` makes the
supervisor give up: it terminates its children and closes). It is also a
``concurrent.futures.Executor``: ``submit``, ``map`` and ``shutdown`` delegate
to ``_executor`` (futures, the map stream, what a shutdown waits for).

Lock order: the Supervisor's lock guards only its own bookkeeping and is never
held while calling into the backend.
"""

from __future__ import annotations

import _pickle as pickle  # the C module (the pure one costs ~2 ms before the first fork)
import atexit
import concurrent.futures
import dataclasses
import functools
import os
import sys
import threading
import weakref
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, TypeVar

from parstream._backend import BackendClosed, Settings, resolve
from parstream._errors import SupervisorClosed, TaskShutdown, argument_not_pickled
from parstream._interrupts import held
from parstream._validate import (
    MapOptions,
    Options,
    StreamOptions,
    check_callable,
    check_choice,
    check_int,
    check_iterable,
    check_node,
    check_positive_seconds,
    check_timeout,
    document_options,
    real_number,
    shown,
)

# The rest of the front end (_executor, _children, _results, _stream, _task)
# is imported where it is used, the first time by a Supervisor's __init__ once
# its backend is open: a new process's first workers then boot on the other
# cores while these ~5 ms of imports run, instead of after them (issue 12).
if TYPE_CHECKING:
    from typing import Unpack

    from parstream._backend import Backend, Node, Worker
    from parstream._children import Child, Restart
    from parstream._results import Stats
    from parstream._stream import Stream, _State, _Values
    from parstream._task import ShutdownTimeout, Task

T = TypeVar("T")

if os.name != "posix":
    # Before our exit hook is registered: atexit runs hooks last-registered
    # first, so ours then runs before multiprocessing's, which would otherwise
    # join the (live, non-daemonic) workers and wait for ever. On POSIX the
    # workers are not multiprocessing's (``_spawn.LIGHT_START``), and the
    # import would cost every new process ~9 ms before its first worker starts.
    import multiprocessing.util  # noqa: F401

_live: weakref.WeakSet[Supervisor] = weakref.WeakSet()
_MAP_OPTIONS = frozenset(MapOptions.__annotations__)


class Supervisor(concurrent.futures.Executor):
    """Owns workers and supervises the tasks, children and streams run on them.

    Args:
        max_restarts: restarts allowed within ``max_seconds`` before the
            supervisor gives up (terminates its children and closes). Failed
            worker starts count in a window of the same size: past it, the
            work waiting for a worker fails with ``WorkerStartFailed`` (the
            supervisor itself stays open, retries with back-off and recovers
            once workers start again).
        max_seconds: the window for ``max_restarts``, in seconds (> 0).
        max_children: cap on what runs under the supervisor at once:
            children (``start_child``) and tasks (``async_``,
            ``async_nolink``, ``start``), as in Elixir; one more raises
            ``ValueError``. Streams and ``Executor`` calls are not counted
            (``max_concurrency`` bounds a stream). None = no cap.
        max_workers: workers kept warm; default ``cpu_count()`` (the
            backend's size: the cluster's CPUs on Ray, 1 inline). A stream
            asking for more concurrency, and each running child, get extra
            workers, which retire after ``idle_timeout`` s idle.
        backend: where the work runs: ``"local"`` (worker processes, the
            default), ``"inline"`` (this process, for debuggers and
            profilers), ``"ray"``, or a backend object such as
            ``parstream.RayBackend(address=...)``.
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
        mp_context: accepted for ``ProcessPoolExecutor`` code: a
            ``multiprocessing`` context whose start method is ``"spawn"`` or
            ``"forkserver"`` (or None). Workers always start as fresh
            interpreters, as with ``"spawn"``; ``"fork"`` is refused, since
            nothing would be inherited (use ``initializer`` for that).

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
        backend: Any = None,
        max_tasks_per_worker: int | None = None,
        max_memory_per_worker: int | None = None,
        idle_timeout: float = 10.0,
        initializer: Callable[..., Any] | None = None,
        initargs: Iterable[Any] = (),
        max_tasks_per_child: int | None = None,
        mp_context: Any = None,
    ) -> None:
        max_restarts = check_int(max_restarts, "max_restarts", 0, allow_none=False)
        max_seconds = check_positive_seconds(max_seconds, "max_seconds")
        max_children = check_int(max_children, "max_children", 1)
        max_workers = check_int(max_workers, "max_workers", 1)
        max_tasks_per_worker = check_int(max_tasks_per_worker, "max_tasks_per_worker", 1)
        max_tasks_per_child = check_int(max_tasks_per_child, "max_tasks_per_child", 1)
        if max_tasks_per_child is not None:
            if max_tasks_per_worker is not None and max_tasks_per_worker != max_tasks_per_child:
                raise ValueError(
                    "max_tasks_per_child is an alias of max_tasks_per_worker; give one, "
                    f"got {max_tasks_per_worker} and {max_tasks_per_child}"
                )
            max_tasks_per_worker = max_tasks_per_child
        if initializer is not None:
            check_callable(initializer, "initializer")
        if isinstance(initargs, str | bytes) or not isinstance(initargs, Iterable):
            raise TypeError(f"initargs must be a tuple of arguments, got {shown(initargs)}")
        max_memory_per_worker = check_int(max_memory_per_worker, "max_memory_per_worker", 1)
        _check_mp_context(mp_context)
        idle_timeout = check_timeout(idle_timeout, "idle_timeout", allow_none=False)
        config = resolve(backend)
        settings = Settings(
            max_workers=max_workers,
            max_tasks_per_worker=max_tasks_per_worker,
            max_memory_per_worker=max_memory_per_worker,
            idle_timeout=idle_timeout,
            initializer=initializer,
            initargs=tuple(initargs),
            max_start_failures=max_restarts,
            start_failure_window=max_seconds,
        )
        self.max_restarts = max_restarts
        self.max_seconds = max_seconds
        self.max_children = max_children
        self._lock = threading.Lock()
        self._closed_reason: str | None = None
        self._tasks: weakref.WeakSet[Task[Any]] = weakref.WeakSet()
        self._streams: weakref.WeakSet[_State] = weakref.WeakSet()  # killed first at exit
        self._admitting = threading.Lock()  # max_children: counted and added at once
        self._backend: Backend = config.open(settings)
        if self._backend.name == "ray":
            # ray.init registered Ray's own exit hook (ray.shutdown) after
            # parstream's: registered again, parstream's runs first, while
            # Ray can still kill what is running.
            atexit.unregister(_close_all)
            atexit.register(_close_all)
        try:
            from parstream import _executor
            from parstream._children import Children, RestartWindow
            from parstream._task import Task

            self._task_type = Task  # (an import per async_ would cost ~1 us of its round trip)
            self.max_workers = self._backend.capacity
            self._children = Children(self, RestartWindow(max_restarts, max_seconds))
            self._core = _executor.ExecutorCore(self._backend, self._tasks)
            # Dropped unreferenced: finish submitted work, then release the workers.
            weakref.finalize(self, _executor.release, self._core).atexit = False
            _live.add(self)
        except BaseException:  # Ctrl-C while importing: the backend is open, and nobody's
            with held():
                self._backend.close()
            raise

    @property
    def backend(self) -> str:
        """The name of the backend this supervisor runs on."""
        return self._backend.name

    # -- tasks ---------------------------------------------------------------

    def _check_open(self) -> None:
        why = self._backend.usable() if self._backend.forked else None
        if why is not None:
            raise SupervisorClosed(why)
        if self._closed_reason is not None:
            raise SupervisorClosed(self._closed_reason)

    def _check_node(self, node: str | None) -> str | None:
        node = check_node(node)
        if node is None:
            return None
        if not self._backend.capabilities.nodes:
            raise ValueError(
                f"node={node!r}: the {self._backend.name} backend has no nodes; "
                "node= needs a cluster backend (backend='ray')"
            )
        return self._backend.check_node(node)

    def _make_task(
        self,
        fn: Callable[..., T],
        args: tuple[Any, ...],
        *,
        linked: bool,
        track: bool = False,
        node: str | None = None,
        urgent: bool = False,
    ) -> Task[T]:
        """A task for ``fn(*args)``, its function prepared now; not yet submitted."""
        check_callable(fn)
        self._check_open()
        task: Task[T] = self._task_type(
            self._backend,
            self._backend.prepare(fn),
            args,
            linked=linked,
            node=node,
            urgent=urgent,
            lane=self._core.lane,
        )
        if track:  # shutdown(wait=True) waits for it (children end by their own rules)
            self._tasks.add(task)
        return task

    def _submit_task(self, task: Task[Any]) -> None:
        job = task._job
        if job is None:  # already ended (killed before it was submitted)
            return
        try:
            self._backend.submit(job)
        except BackendClosed as exc:
            raise SupervisorClosed(self._closed_reason or str(exc)) from None

    def _task(
        self, fn: Callable[..., T], args: tuple[Any, ...], linked: bool, node: str | None
    ) -> Task[T]:
        node = self._check_node(node)
        if self.max_children is None:
            task = self._make_task(fn, args, linked=linked, track=True, node=node)
        else:
            with self._admitting:  # counted and tracked in one step
                self._room_for_children()
                task = self._make_task(fn, args, linked=linked, track=True, node=node)
        self._submit_task(task)
        return task

    def _room_for_children(self) -> int | None:
        """The cap on children now: ``max_children`` less the running tasks
        (they count too, as in Elixir); ``ValueError`` if nothing may start."""
        cap = self.max_children
        if cap is None:
            return None
        tasks = sum(1 for t in list(self._tasks) if not t.done())
        children = len(self._children.alive())
        if children + tasks >= cap:
            raise ValueError(
                f"max_children ({cap}) reached: {children} children and {tasks} tasks "
                "(async_, async_nolink, start) running"
            )
        return cap - tasks

    def async_(self, fn: Callable[..., T], *args: Any, node: str | None = None) -> Task[T]:
        """Run ``fn(*args)`` in a worker; a linked task (killed if its handle is dropped).

        Args:
            node: run it on this node (a node id or label value; backends
                with nodes only).

        Raises:
            TypeError: ``fn`` is not callable.
            ValueError: ``node`` does not exist or has died.
            pickle.PicklingError: ``fn`` cannot be pickled (the culprit is named).
            SupervisorClosed: the supervisor was closed or gave up.
        """
        return self._task(fn, args, True, node)

    def async_nolink(self, fn: Callable[..., T], *args: Any, node: str | None = None) -> Task[T]:
        """Like ``async_``, but the task lives on if its handle is dropped."""
        return self._task(fn, args, False, node)

    def start(self, fn: Callable[..., Any], *args: Any, node: str | None = None) -> None:
        """Fire and forget: a failure is logged on the ``parstream`` logger, never raised."""
        from parstream._children import log_failure

        self._task(fn, args, False, node).add_done_callback(log_failure)

    # -- children ------------------------------------------------------------

    def start_child(
        self,
        fn: Callable[..., Any],
        *args: Any,
        restart: Restart = "temporary",
        shutdown: ShutdownTimeout = 5.0,
        node: str | None = None,
    ) -> Child:
        """Start a supervised child running ``fn(*args)``; see ``Child`` for ``restart``.

        Raises:
            ValueError: unknown ``restart``, negative ``shutdown``, an unknown
                ``node``, or ``max_children`` reached.
            SupervisorClosed: the supervisor was closed or gave up.
        """
        from parstream._children import RESTARTS, Child
        from parstream._task import _BrutalKill

        check_callable(fn)
        check_choice(restart, "restart", RESTARTS)
        if not isinstance(shutdown, _BrutalKill):
            shutdown = check_timeout(shutdown, "shutdown", allow_none=False)
        node = self._check_node(node)
        self._check_open()
        child = Child(fn, args, restart, shutdown, node, self._backend)
        with self._admitting:
            self._children.add(child, self._room_for_children())
        self._backend.reserve(1)
        ended = self._children.run(child, first=True)
        if ended is not None:  # closed meanwhile: it never ran
            ended.set()
        return child

    def children(self) -> list[Child]:
        """The children still running (or between restarts)."""
        return self._children.alive()

    def terminate_child(self, child: Child) -> bool:
        """Stop ``child`` (never restarted, even if permanent); False if not found."""
        from parstream._children import Child

        if not isinstance(child, Child):
            raise TypeError(f"child must be a Child, got {type(child).__name__}")
        return self._children.terminate(child)

    def _give_up(self, reason: str) -> None:
        # Closed before anyone can see the child end: from the moment a
        # waiter wakes, every new call raises SupervisorClosed.
        with self._lock:
            if self._closed_reason is None:
                self._closed_reason = reason
        # As Elixir's supervisor terminates its children when it gives up:
        # each with its own shutdown grace (a SIGTERM handler gets to run),
        # and each ends only once its run has.
        children, ending = self._stop_children()
        for task in ending:
            task._done.wait()
        for child in children:
            self._children.end(child, reason)
        self._close(reason)

    # -- streams -----------------------------------------------------------------

    def _state(
        self,
        fn: Callable[..., Any],
        iterable: Iterable[Any],
        options: Options,
        *,
        linked: bool,
    ) -> _State:
        check_callable(fn)
        check_iterable(iterable, "iterable")
        node = self._check_node(options.node)
        if node != options.node:
            options = dataclasses.replace(options, node=node)
        self._check_open()
        from parstream._stream import _State

        state = _State(
            self._backend,
            self._backend.prepare(fn),
            iterable,
            options,
            linked=linked,
            max_concurrency=options.max_concurrency
            or (self._backend.capacity_on(node) if node is not None else self.max_workers),
            why_closed=self._why_closed(),
        )
        self._streams.add(state)
        return state

    def _why_closed(self) -> Callable[[], str | None]:
        """For a stream: why this supervisor closed (it holds no reference to us)."""
        ref = weakref.ref(self)

        def why() -> str | None:
            sup = ref()
            return None if sup is None else sup._closed_reason

        return why

    def async_stream(
        self,
        fn: Callable[..., T],
        iterable: Iterable[Any],
        **options: Unpack[StreamOptions],
    ) -> Stream[T]:
        """Run ``fn(item)`` for each item, in parallel, lazily; yield ``Ok``/``Exit``.

        Linked: the first task failure is raised from the iterator (original
        type, worker traceback as ``__cause__``) and the rest are killed.

        Options (keyword-only; see ``parstream.Options`` for each):
        ``max_concurrency``, ``ordered``, ``timeout`` (per item; the item's
        worker is killed and replaced on overrun), ``on_timeout``
        (``"exit"`` raises ``TaskTimeout``, ``"kill_task"`` yields an
        ``Exit`` and goes on), ``zip_input_on_exit``, ``progress``,
        ``chunksize``, ``buffer_size``, ``node``.

        Raises:
            TypeError/ValueError: a bad argument or option, named, at call time.
            SupervisorClosed: the supervisor was closed or gave up.
        """
        from parstream._stream import Stream

        state = self._state(fn, iterable, Options.of(options), linked=True)
        return Stream(state, owner=self)

    def async_stream_nolink(
        self,
        fn: Callable[..., T],
        iterable: Iterable[Any],
        **options: Unpack[StreamOptions],
    ) -> Stream[T]:
        """Like ``async_stream``, but failures come back as ``Exit`` items and the
        stream goes on; every input gets exactly one result. A timeout under
        ``on_timeout="exit"`` still raises (as in Elixir)."""
        from parstream._stream import Stream

        state = self._state(fn, iterable, Options.of(options), linked=False)
        return Stream(state, owner=self)

    def stream_map(
        self,
        fn: Callable[..., T],
        iterable: Iterable[Any],
        **options: Unpack[MapOptions],
    ) -> _Values[T]:
        """The plain-values stream (``parstream.map`` on this supervisor): values in
        input order, raising the first failure. ``timeout`` is per item;
        the options are ``async_stream``'s, less ``zip_input_on_exit``."""
        from parstream._stream import values

        opts = Options.of(options, allowed=_MAP_OPTIONS)
        return values(self._state(fn, iterable, opts, linked=True), self)

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
        if kwargs:
            try:
                prepared = self._backend.prepare(functools.partial(fn, *args, **kwargs))
            except pickle.PicklingError as exc:
                # As for a positional argument: the function itself fails
                # here, named; an argument that cannot travel fails the future.
                self._backend.prepare(fn)
                return _failed_future(self._argument_error(fn, args, kwargs, exc))
        else:
            prepared = self._backend.prepare(fn)
        try:
            return self._core.submit(prepared, () if kwargs else args)
        except BackendClosed as exc:
            raise SupervisorClosed(self._closed_reason or str(exc)) from None

    def _argument_error(
        self, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any], exc: Exception
    ) -> pickle.PicklingError:
        """The error for a call whose arguments cannot travel, naming the first
        that fails on its own (found through the backend's own ``prepare``)."""
        probes = [(f"argument {i}", a, functools.partial(fn, a)) for i, a in enumerate(args)]
        probes += [
            (f"keyword argument {k!r}", v, functools.partial(fn, **{k: v}))
            for k, v in kwargs.items()
        ]
        culprit = "the arguments"
        for what, value, probe in probes:
            try:
                self._backend.prepare(probe)
            except pickle.PicklingError:
                culprit = f"{what} ({type(value).__qualname__})"
                break
        return argument_not_pickled(culprit, exc.__cause__ or exc)

    def map(
        self,
        fn: Callable[..., T],
        *iterables: Iterable[Any],
        timeout: float | None = None,
        chunksize: int | None = None,
        buffersize: int | None = None,
    ) -> _Values[T]:
        """``Executor.map`` on the stream engine: ``fn(*args)`` for the items of
        ``iterables`` zipped (to the shortest), values in input order.

        Lazy and bounded, unlike the stdlib's eager ``map``: items are pulled as
        results are consumed, so an endless input is fine. The first exception
        is raised at its position; the calls after it are then stopped.

        Args:
            timeout: one deadline for the whole call, ``timeout`` seconds
                from the first ``next()`` (when the lazy map starts work): a
                result not there by then raises ``TimeoutError``, the calls
                running are killed and those not started never run. A
                negative value is a deadline already past, as in the stdlib.
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
            check_iterable(it, "iterables")
        number = real_number(timeout)
        if number is not None and number < 0:
            # As with the stdlib (``timeout=deadline - now``): a deadline
            # already past, so the first result not ready raises TimeoutError.
            timeout = 0.0
        timeout = check_timeout(timeout, "timeout")
        chunksize = check_int(chunksize, "chunksize", 1)
        buffersize = check_int(buffersize, "buffersize", 1)
        self._check_open()
        from parstream import _executor

        results = _executor.start_map(
            self,
            self._backend,
            self._backend.prepare(fn),
            iterables,
            self.max_workers,
            timeout,
            chunksize,
            buffersize,
            self._why_closed(),
        )
        self._streams.add(results._state)
        return results

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """``Executor.shutdown``: refuse new work, let submitted work finish, then close.

        Submitted futures and ``async_``/``start`` tasks run to completion;
        children are not restarted and each ends with its own ``shutdown``
        grace. ``wait=False`` returns at once and all that happens in the
        background. ``cancel_futures=True`` cancels the futures no worker has
        taken yet (running ones finish). Ctrl-C while waiting kills everything.
        In a child inherited through ``os.fork()`` it only drops this
        process's copies: the work is the parent's.
        """
        if self._backend.forked:
            self._close("the supervisor was shut down")
            return
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

    def _stop_children(self) -> tuple[list[Child], list[Task[Any]]]:
        """No child restarts from now; each running one is killed with its own
        shutdown grace. The children, and the runs being stopped."""
        from parstream._task import _BrutalKill

        children = self._children.end_all()
        ending = []
        for c in children:
            task = c.task
            job = task._job if task is not None else None
            if task is not None and job is not None and not task.done():
                grace = 0.0 if isinstance(c.shutdown_timeout, _BrutalKill) else c.shutdown_timeout
                self._backend.kill(job, None, grace=grace)
                ending.append(task)
        return children, ending

    def _finish(self) -> None:
        children, ending = self._stop_children()
        self._core.wait_all()
        for task in ending:
            task._done.wait()
        for c in children:
            self._children.end(c)
        # The done-callbacks of what finished have run when shutdown returns,
        # as with the standard library's executors.
        self._core.lane.drain()
        self._close(self._closed_reason or "the supervisor was shut down")

    # -- observing ---------------------------------------------------------------

    def stats(self) -> Stats:
        """A snapshot of this supervisor's counters."""
        from parstream._results import Stats

        c = self._backend.counts()
        return Stats(
            tasks_submitted=c.submitted,
            tasks_started=c.started,
            tasks_ok=c.ok,
            tasks_failed=c.failed,
            tasks_crashed=c.crashed,
            tasks_timed_out=c.timed_out,
            tasks_killed=c.killed,
            workers_started=c.workers_started,
            workers_alive=len(self._backend.workers()),
            restarts=self._children.restarts,
        )

    def workers(self) -> list[Worker]:
        """A snapshot of the live workers (``pid`` is None where the backend
        cannot know it)."""
        return self._backend.workers()

    def worker_pids(self) -> list[int]:
        """Pids of the live worker processes (empty where pids are unknown)."""
        return [w.pid for w in self._backend.workers() if w.pid is not None]

    def nodes(self) -> list[Node]:
        """The alive nodes of a cluster backend (empty for backends without nodes)."""
        return self._backend.nodes()

    def restart_workers(self) -> None:
        """Replace every worker (idle ones now, busy ones after their task).

        Workers import a module once; after editing a module your tasks use,
        call this so the next tasks run the new code.
        """
        self._check_open()
        self._backend.restart_workers()

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
        self._core.cancel_pending()  # outside held(): it runs their done-callbacks
        with held():  # Ctrl-C again (or a first one) waits until everything is killed
            self._close("the supervisor was closed")

    def _close(self, reason: str) -> None:
        if self._backend.forked:
            # A forked child's copy: its lock may have been held at the fork,
            # and the workers are the parent's. Only drop our copies.
            self._backend.close()
            _live.discard(self)
            return
        with self._lock:
            if self._closed_reason is None:
                self._closed_reason = reason
        children = self._children.end_all()  # none restarts from now
        from parstream._results import Exit

        for t in list(self._tasks):
            if not t.done():
                t._set(Exit(TaskShutdown(reason)))
        try:
            self._core.close_backend()
        finally:
            # Ended once their workers are: a child's wait() returns when its
            # run has stopped, not while it still holds what it holds.
            for child in children:
                self._children.end(child, reason)
            _live.discard(self)

    def _stop_for_exit(self) -> None:
        """Interpreter exit, before the pending futures are waited for: kill
        what exit kills anyway (children, streams), so that no future waits
        behind it for a worker, for as long as it runs. (One-off tasks are
        the executor core's to kill: ``_executor.finish_at_exit``.)"""
        reason = "the interpreter is exiting"
        for child in self._children.end_all():
            task = child.task
            self._children.end(child, reason)
            if task is not None and not task.done():
                task._kill(TaskShutdown(reason))
        for state in list(self._streams):
            state.close()

    def __enter__(self) -> Supervisor:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        if exc_type is not None and not issubclass(exc_type, Exception):
            self.close()  # Ctrl-C: kill at once rather than wait
        else:
            self.shutdown(wait=True)

    def __reduce__(self) -> Any:
        raise TypeError(
            "a Supervisor belongs to the process that made it and cannot be sent to "
            "another one; inside a task, parstream.map and async_ use a supervisor of "
            "the worker's own"
        )

    def __repr__(self) -> str:
        state = "closed" if self.closed else "open"
        return f"<Supervisor {state} backend={self.backend} max_workers={self.max_workers}>"


for _method, _options in (
    (Supervisor.async_stream, StreamOptions),
    (Supervisor.async_stream_nolink, StreamOptions),
    (Supervisor.stream_map, MapOptions),
):
    document_options(_method, _options.__annotations__)
del _method, _options


def _close_all() -> None:
    # Registered after multiprocessing's exit hook (imported above), so it
    # runs first: the workers are gone before that hook joins them.
    if not _live and "parstream._executor" not in sys.modules:
        return  # no Supervisor was ever opened here
    from parstream import _callbacks, _executor

    _callbacks.exiting()  # a daemon thread still reading a stream blocks from now on
    for sup in list(_live):
        try:
            sup._stop_for_exit()
        except Exception:  # pragma: no cover
            pass
    try:
        _executor.finish_at_exit()  # pending futures first, as the stdlib does
    finally:
        for sup in list(_live):
            try:
                sup._close("the interpreter is exiting")
            except Exception:  # pragma: no cover
                pass
        _executor.close_all()


atexit.register(_close_all)


def _failed_future(error: BaseException) -> concurrent.futures.Future[Any]:
    """A future that failed before it could be submitted (its arguments cannot travel)."""
    future: concurrent.futures.Future[Any] = concurrent.futures.Future()
    future.set_running_or_notify_cancel()
    future.set_exception(error)
    return future


def _check_mp_context(context: Any) -> None:
    """``mp_context``: None or a spawn/forkserver ``multiprocessing`` context."""
    if context is None:
        return
    method = getattr(context, "get_start_method", None)
    if not callable(method):
        raise TypeError(
            f"mp_context must be a multiprocessing context or None, got {shown(context)}"
        )
    # allow_none: asking the default context plainly would fix the process's
    # start method for good, as a side effect.
    name = method(allow_none=True)
    if name is None:
        import multiprocessing

        name = multiprocessing.get_all_start_methods()[0]  # the platform's default
    if name not in ("spawn", "forkserver"):
        raise ValueError(
            f"mp_context: parstream's workers always start as fresh interpreters, so a "
            f"{name!r} context's inheritance cannot be had; pass a 'spawn' or 'forkserver' "
            "context, or none, and set worker state up with initializer="
        )
