"""The ``concurrent.futures.Executor`` side of a Supervisor: futures, ``map``, shutdown.

``Supervisor.submit`` builds a one-item ``Job`` whose sink is a ``_FutureSink``;
``Supervisor.map`` builds a ``MapState``, a stream (``_stream._State``) with
``Executor.map``'s whole-call deadline. Nothing here holds the Supervisor, so a
dropped one can be garbage collected; ``ExecutorCore`` is what its finaliser
and the interpreter-exit hook need to finish submitted work and then release
the workers::

    Supervisor --holds--> ExecutorCore --holds--> Backend, pending futures, tasks
        ^                      ^
        | weakref.finalize     | _cores (until its backend is closed)
        +-> release(core): finish the futures in a thread, then close the backend

A future stays pending until a worker takes its job (``Sink.on_started``), so
``cancel()`` succeeds exactly while ``Backend.cancel`` can still withdraw the
job: a cancelled call never runs.
"""

from __future__ import annotations

import concurrent.futures
import logging
import os
import threading
import time
from typing import TYPE_CHECKING, Any

from parstream._backend import Job
from parstream._callbacks import Lane, drain_all, on_hub_thread
from parstream._errors import SupervisorClosed, TaskShutdown
from parstream._interrupts import held
from parstream._output import settle as settle_output
from parstream._stream import WAIT_POLL_S, _State, _Values, values
from parstream._validate import STALL_GRACE_S, Options, stalled

if TYPE_CHECKING:
    import weakref
    from collections.abc import Callable, Iterable, Mapping

    from parstream._backend import Backend, End, FnHandle
    from parstream._task import Task

log = logging.getLogger("parstream")

_cores: set[ExecutorCore] = set()  # cores whose backend is still open
# Re-entrant: a dropped Supervisor's finaliser (``release``) takes it, and a
# collection may run it on a thread that already holds it (seen on 3.12, where
# the collector runs between any two bytecodes).
_cores_lock = threading.RLock()
_cancelling = threading.Lock()  # one Future.cancel() at a time (``_Future.cancel``)
WAIT_SLICE_S = 0.2  # waits at exit in slices, so Ctrl-C is seen on every platform
SETTLING_S = 1.0  # the longest a finished future's sink may take to let go of it


def _clamp(timeout: Any) -> Any:
    """A timeout for ``Future.result``/``exception``: a number beyond
    ``threading.TIMEOUT_MAX`` (``inf`` included) becomes it, where the
    standard library's wait raises ``OverflowError``; anything else passes
    as it is, to be judged as ``concurrent.futures`` judges it."""
    number = isinstance(timeout, int | float) and not isinstance(timeout, bool)
    return threading.TIMEOUT_MAX if number and timeout > threading.TIMEOUT_MAX else timeout


def _wait_with_grace(wait: Callable[[Any], Any], timeout: Any) -> Any:
    """``wait(timeout)`` (a Future's ``result`` or ``exception``), once more
    for ``STALL_GRACE_S`` if it ran out long after its time: this process
    was stopped (``_validate.stalled``), and the hub, woken with it, may
    hold the result. A finite timeout past ``threading.TIMEOUT_MAX`` waits
    that long, as asked, instead of raising ``OverflowError``."""
    began = time.monotonic()
    try:
        return wait(_clamp(timeout))
    except concurrent.futures.TimeoutError:
        number = isinstance(timeout, int | float) and not isinstance(timeout, bool)
        if not (number and timeout >= 0 and stalled(began + timeout)):
            raise
        return wait(STALL_GRACE_S)


class _Future(concurrent.futures.Future[Any]):
    """A Future whose ``cancel()`` withdraws its job from the backend's queue."""

    def __init__(
        self, backend: Backend, lane: Lane, forget: Callable[[_Future], None] | None = None
    ) -> None:
        super().__init__()
        self._ps_backend = backend
        self._ps_lane = lane  # its Supervisor's callback lane
        self._ps_job: Job | None = None
        self._ps_forget = forget  # the executor's pending set lets go of it
        self._ps_holding = False  # cancel() runs the done-callbacks once out of its lock

    def _ps_settled(self) -> None:
        """Done (or cancelled), its job already let go: the executor's set of
        pending futures lets go of it too."""
        forget, self._ps_forget = self._ps_forget, None
        if forget is not None:
            forget(self)

    def running(self) -> bool:
        # A call handed straight to an idle worker is marked running by the
        # hub (its on_started), which may be asleep until the result comes:
        # ask the backend whether a worker has begun it instead.
        if super().running():
            return True
        job = self._ps_job
        return job is not None and not self.done() and self._ps_backend.worker_of(job) is not None

    def __repr__(self) -> str:
        # The base class shows its own state, still PENDING for a call that
        # went straight to an idle worker until the hub hears of it.
        text = super().__repr__()
        if super().running() or self.done() or not self.running():
            return text
        return text.replace("state=pending", "state=running", 1)

    def cancel(self) -> bool:
        if self.cancelled():
            return True
        if self.running() or self.done():
            return self.cancelled()  # (cancelled by another thread just now)
        # One cancel at a time: a second thread's, while the first had
        # withdrawn the job but not yet marked the future, returned False for
        # a future that ended cancelled (the stdlib's says True to both).
        with _cancelling:
            if self.cancelled():
                return True
            # The backend decides atomically: withdrawn means no worker took it, ever.
            if self._ps_job is None or not self._ps_backend.cancel(self._ps_job):
                return self.cancelled()
            self._ps_job = None  # withdrawn: its function and arguments go with it
            # The done-callbacks run after the lock is let go: one may cancel
            # another future (which takes the lock again).
            self._ps_holding = True
            try:
                if not super().cancel():  # pragma: no cover - nothing else settles a pending one
                    return False
            finally:
                self._ps_holding = False
            # What an executor does on dequeuing a cancelled future: wake wait()
            # and as_completed() at once, not only the done-callbacks.
            self.set_running_or_notify_cancel()
        self._ps_settled()
        self._invoke_callbacks()
        return True

    def add_done_callback(self, fn: Callable[[concurrent.futures.Future[Any]], object]) -> None:
        # The thread that will run it starts now: at the interpreter's exit,
        # Python 3.12 and later refuse to start one.
        if not self.done():
            self._ps_lane.ensure_started()
        super().add_done_callback(fn)

    def result(self, timeout: float | None = None) -> Any:
        value = _wait_with_grace(super().result, timeout)
        settle_output()  # in a kernel: what the worker printed is in the cell first
        return value

    def exception(self, timeout: float | None = None) -> BaseException | None:
        error: BaseException | None = _wait_with_grace(super().exception, timeout)
        return error

    def _invoke_callbacks(self) -> None:
        # Settled on a hub thread: the user's done-callbacks must not run on
        # the thread that keeps every deadline; wait()/as_completed() waiters
        # were already woken by the base class. With none, nothing is queued:
        # the callback thread would hold the future (and its result) after
        # the caller has taken the result and let go of both.
        if not self._done_callbacks or self._ps_holding:  # type: ignore[attr-defined]
            return
        if on_hub_thread():
            self._ps_lane.call_soon(super()._invoke_callbacks)  # type: ignore[misc]
        else:
            super()._invoke_callbacks()  # type: ignore[misc]


class _FutureSink:
    """The backend's sink for a submitted call: settles its Future."""

    __slots__ = ("future",)

    def __init__(self, future: _Future) -> None:
        self.future = future

    def on_started(self, at: float) -> None:
        f = self.future
        # Taken by a worker: nothing can withdraw it now, and a future kept by
        # the caller must not keep the call's function and arguments alive
        # (the standard library's futures hold neither).
        f._ps_job = None
        # The base class's own state, not our running() (which asks the
        # backend, and would leave it PENDING, as repr() then shows).
        if not concurrent.futures.Future.running(f) and not f.done():
            f.set_running_or_notify_cancel()

    def on_results(
        self, values: list[Any], errors: Mapping[int, BaseException], seconds: float | None
    ) -> None:
        self.future._ps_job = None
        try:
            if errors:
                self.future.set_exception(errors[0])
            else:
                self.future.set_result(values[0])
        except concurrent.futures.InvalidStateError:  # pragma: no cover - settled already
            pass
        self.future._ps_settled()

    def on_done(self, end: End, unrun: int) -> None:
        self.future._ps_job = None
        if not self.future.done():
            try:
                self.future.set_exception(
                    TaskShutdown("the call was killed before it returned (supervisor closed)")
                )
            except concurrent.futures.InvalidStateError:  # pragma: no cover
                pass
        self.future._ps_settled()


class ExecutorCore:
    """The backend plus the work a shutdown waits for; never refers to the Supervisor."""

    def __init__(self, backend: Backend, tasks: weakref.WeakSet[Task[Any]]) -> None:
        self.backend = backend
        self.closed = False
        self.tasks = tasks  # the supervisor's one-off tasks (not its children)
        self.lock = threading.Lock()
        self.lane = Lane()  # the callbacks of this Supervisor's futures, tasks and children
        # In submission order (a dict): cancel_pending withdraws the oldest
        # first, the next a worker would take, each from the queue's front.
        self.futures: dict[_Future, None] = {}
        with _cores_lock:
            _cores.add(self)

    def submit(self, fn: FnHandle, args: tuple[Any, ...]) -> _Future:
        if _exiting and not self.backend.forked:
            # As the stdlib's executors: a done-callback that submits again
            # at exit (a job that reschedules itself) would keep exit waiting.
            raise SupervisorClosed("cannot schedule new futures after interpreter shutdown")
        future = _Future(self.backend, self.lane, self._forget)
        job = future._ps_job = Job(fn, [args], _FutureSink(future), star=True)
        with self.lock:
            self.futures[future] = None
        try:
            self.backend.submit(job)
        except BaseException:
            with self.lock:
                self.futures.pop(future, None)
            raise
        return future

    def _forget(self, future: _Future) -> None:
        with self.lock:
            self.futures.pop(future, None)

    def pending_futures(self) -> list[_Future]:
        with self.lock:
            return [f for f in self.futures if not f.done()]

    def cancel_pending(self) -> None:
        """Cancel every future no worker has taken yet; running ones go on."""
        for f in self.pending_futures():
            f.cancel()

    def wait_futures(self) -> None:
        """Until every submitted future is done (new ones included), and its
        sink has let go of it: by then its done-callbacks are queued."""
        settling_until = None
        while True:
            pending = self.pending_futures()
            if pending:
                concurrent.futures.wait(pending, timeout=WAIT_SLICE_S)
                continue
            with self.lock:
                settling = bool(self.futures)
            if not settling:
                return
            # Done, and its sink between settling it and letting go of it (a
            # few microseconds); bounded, should a future never be let go of.
            now = time.monotonic()
            if settling_until is None:
                settling_until = now + SETTLING_S
            elif now > settling_until:  # pragma: no cover
                return
            time.sleep(0.001)

    def wait_all(self) -> None:
        """Until every submitted future and every tracked task is done."""
        while True:
            self.wait_futures()
            tasks = [t for t in list(self.tasks) if not t.done()]
            if not tasks:
                if not self.pending_futures():
                    return
                continue
            for t in tasks:
                while not t._done.wait(WAIT_SLICE_S):
                    pass

    def close_backend(self) -> None:
        if not self.backend.forked:  # a forked copy's futures (and lock) are the parent's
            self.cancel_pending()
        self.closed = True
        self.backend.close()
        self.lane.close()
        with _cores_lock:
            _cores.discard(self)


def release(core: ExecutorCore) -> None:
    """A dropped Supervisor's finaliser: like ``shutdown(wait=False)``, submitted
    work still completes, then the workers are closed (from a helper thread:
    the collection may run on any thread, the hub's included)."""
    if core.closed:
        with _cores_lock:
            _cores.discard(core)
        return

    def finish() -> None:
        try:
            core.wait_all()
        finally:
            core.close_backend()

    # A finaliser's exception is only printed: a Ctrl-C landing while the
    # thread starts would leave the workers running for good.
    with held():
        threading.Thread(target=finish, name="parstream-release", daemon=True).start()


_exiting = False  # the interpreter is exiting: no new futures


def finish_at_exit() -> None:
    """Interpreter exit: let pending submitted futures run to completion first,
    as ``ProcessPoolExecutor`` does, refusing new ones; Ctrl-C during that
    wait kills everything. Then every remaining backend (tasks, children,
    streams) is closed.

    The one-off tasks of every executor are killed before the wait (the
    queued ones first), those of a Supervisor already dropped included: a
    future queued behind one that never ends would keep exit waiting."""
    global _exiting
    _exiting = True
    try:
        with _cores_lock:
            cores = [c for c in _cores if not c.backend.forked]
        tasks = [t for c in cores for t in list(c.tasks) if not t.done()]
        tasks.sort(key=lambda t: t._started)
        for t in tasks:
            t._kill(TaskShutdown("the interpreter is exiting"))
        while True:
            with _cores_lock:
                # Not those inherited through os.fork(): their futures are the
                # parent's, and a child that waited for them would never exit.
                cores = [c for c in _cores if not c.backend.forked]
            pending = [f for c in cores for f in c.pending_futures()]
            if not pending:
                break
            concurrent.futures.wait(pending, timeout=WAIT_SLICE_S)
        for core in cores:
            core.wait_futures()
        drain_all()  # their done-callbacks, as the standard library's exit runs them
    finally:
        close_all()


def close_all() -> None:
    with _cores_lock:
        cores = list(_cores)
    for core in cores:
        try:
            core.close_backend()
        except Exception:  # pragma: no cover
            log.exception("parstream: closing a backend at exit failed")


class MapState(_State):
    """A stream with ``Executor.map``'s deadline and Python 3.14's ``buffersize``.

    The deadline is ``timeout`` seconds from the stream's start (the first
    ``next()``), not from the call to ``map``: nothing runs before that, so
    a map held unread a while (the stdlib's computes meanwhile) must not be
    out of time before it has begun.
    """

    def __init__(self, *args: Any, timeout: float | None, cap: int | None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.timeout = timeout
        self.deadline: float | None = None
        self.graced = False  # the deadline was moved once for a stopped process
        self.stalled_wait = False  # a wait overran: this process was stopped
        self.timed_out: BaseException | None = None  # the deadline's TimeoutError, once raised
        self.cap = cap  # most items pulled and not yet yielded

    def start(self) -> None:
        if self.timeout is not None:
            self.deadline = time.monotonic() + self.timeout
        super().start()

    def limit(self) -> int:
        base = super().limit()
        return base if self.cap is None else min(base, self.cap)

    def next_chunk_size(self) -> int:
        size = super().next_chunk_size()
        if self.cap is None:
            return size
        if self.options.chunksize is None:
            # Automatic chunks share the budget among the workers: one chunk
            # as big as ``buffersize`` would leave the others idle (the
            # calls ran one worker at a time, 2x slower on 2 workers).
            return max(1, min(size, self.cap // self.max_concurrency))
        return max(1, min(size, self.cap))

    def ends_iteration(self, error: BaseException) -> bool:
        # As the standard library's map generator: an item's exception raised
        # at its position, or the deadline, ends it; a closed supervisor, an
        # input that raised or Ctrl-C are still raised to every next().
        own = self.raised_at_position
        # (A task's StopIteration reaches here as the RuntimeError that a
        # generator makes of it, PEP 479, with the original as its cause.)
        return (own is not None and (error is own or error.__cause__ is own)) or (
            error is self.timed_out
        )

    def can_start(self) -> bool:
        # Past the deadline no call starts: those running are waited for no
        # longer (``wait_event``). On the inline backend a call runs inside
        # the submit that this guards, so it is also where the deadline is
        # seen at all: results already in hand are delivered first, then the
        # wait for the next raises.
        return self.deadline is None or time.monotonic() < self.deadline

    def wait_event(self) -> None:
        # The base class waits one short poll at a time, so the deadline is
        # checked at least that often.
        if self.deadline is not None and self.stalled_wait and not self.graced:
            # This process was stopped while it waited: results that came
            # meanwhile are taken before the deadline is held against them.
            # (Not for a loop that came back late: the stdlib raises there.)
            self.graced = True
            self.deadline = max(self.deadline, time.monotonic() + STALL_GRACE_S)
        if self.deadline is not None and time.monotonic() >= self.deadline:
            # Results already come are delivered first (on the inline backend
            # the calls ran in this thread, their results posted meanwhile).
            self.drain_events()
            if self.results.take() is not None:
                return
            # Leaving the generator closes the stream: running calls are
            # killed, queued ones withdrawn, unpulled ones never pulled.
            self.timed_out = concurrent.futures.TimeoutError(
                "Supervisor.map: the results did not all arrive within the timeout"
            )
            raise self.timed_out
        began = time.monotonic()
        super().wait_event()
        # The wait is a poll of at most WAIT_POLL_S: one that took far longer
        # was a process not let run (stopped by Ctrl-Z or SIGSTOP).
        if self.deadline is not None and stalled(began + WAIT_POLL_S):
            self.stalled_wait = True


def start_map(
    owner: object,
    backend: Backend,
    fn: FnHandle,
    iterables: tuple[Iterable[Any], ...],
    max_concurrency: int,
    timeout: float | None,
    chunksize: int | None,
    buffersize: int | None,
    why_closed: Callable[[], str | None] | None = None,
) -> _Values[Any]:
    """``Supervisor.map``'s iterator (arguments already checked)."""
    star = len(iterables) != 1
    source = zip(*iterables, strict=False) if star else iterables[0]
    state = MapState(
        backend,
        fn,
        source,
        Options(chunksize=chunksize),
        linked=False,  # failures are raised at their position, not on arrival
        max_concurrency=max_concurrency,
        star=star,  # one iterable: single arguments, the same path as parstream.map
        timeout=timeout,
        why_closed=why_closed,
        cap=None if buffersize is None else buffersize * (chunksize or 1),
    )
    return values(state, owner)


__all__ = ["ExecutorCore", "MapState", "finish_at_exit", "release", "start_map"]


def _reset_after_fork() -> None:
    """In a forked child: a parent thread may have held the registry's lock at the fork."""
    global _cores_lock, _cancelling
    _cores_lock = threading.RLock()
    _cancelling = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_after_fork)
