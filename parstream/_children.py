"""Supervised children: restart rules and the restart-intensity window.

``Supervisor.start_child`` hands a ``Child`` to ``Children``, which runs it as
a task and, from the task's completion callback (on parstream's callback
thread, never the backend's event thread), applies its restart rule::

    task ends --> temporary, or transient and normal ---> the child ends
              --> otherwise: RestartWindow.allow(now)?
                    yes --> run it again (a new task)
                    no  --> the supervisor gives up: closes with the reason

``RestartWindow`` is Elixir's restart intensity: more than ``max_restarts``
restarts within ``max_seconds`` is too many.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import logging
import threading
import time
import weakref
from typing import TYPE_CHECKING, Any, Literal

from parstream._errors import ArgumentsNotPickled, SupervisorClosed, TaskShutdown
from parstream._results import Exit, Ok
from parstream._validate import check_timeout, wait_seconds

if TYPE_CHECKING:
    from collections.abc import Callable

    from parstream._backend import Backend
    from parstream._supervisor import Supervisor
    from parstream._task import ShutdownTimeout, Task

log = logging.getLogger("parstream")

Restart = Literal["temporary", "transient", "permanent"]
RESTARTS: tuple[Restart, ...] = ("temporary", "transient", "permanent")


class RestartWindow:
    """Restart intensity: at most ``max_restarts`` restarts within ``max_seconds``."""

    def __init__(self, max_restarts: int, max_seconds: float) -> None:
        self.max_restarts = max_restarts
        self.max_seconds = max_seconds
        self.times: collections.deque[float] = collections.deque()

    def allow(self, now: float) -> bool:
        """Record a restart wanted at ``now``; False if that is one too many."""
        self.times.append(now)
        while self.times and now - self.times[0] > self.max_seconds:
            self.times.popleft()
        return len(self.times) <= self.max_restarts


class Child:
    """A supervised child started by ``Supervisor.start_child``.

    ``restart`` decides what happens when its call ends: ``"temporary"``
    never restarts, ``"transient"`` restarts after an abnormal end (an
    exception other than ``SystemExit(0)``, a crash, a timeout), ``"permanent"``
    always restarts.
    """

    def __init__(
        self,
        fn: Callable[..., Any],
        args: tuple[Any, ...],
        restart: Restart,
        shutdown: ShutdownTimeout,
        node: str | None = None,
        backend: Backend | None = None,
    ) -> None:
        # What each run calls: dropped once the child ends for good, so an
        # ended child kept by the caller does not keep its arguments alive.
        self.call: tuple[Callable[..., Any], tuple[Any, ...]] | None = (fn, args)
        self.restart = restart
        self.shutdown_timeout = shutdown
        self.node = node
        self.restarts = 0
        self.task: Task[Any] | None = None
        self.terminated = False
        self.last_result: Ok[Any] | Exit | None = None
        self.ending = False  # under the Children lock; _ended is set after
        self._ended = threading.Event()
        self._backend = backend  # its forked copy can never end in the child

    @property
    def pid(self) -> int | None:
        """The worker pid running the child now, or None between runs (and on
        backends that know no pids)."""
        return self.task.pid if self.task is not None else None

    def alive(self) -> bool:
        """True while the child is running or about to be restarted."""
        return not self._ended.is_set()

    def wait(self, timeout: float | None = None) -> Ok[Any] | Exit | None:
        """Wait until the child ends for good (no more restarts); its last result."""
        seconds = wait_seconds(check_timeout(timeout, "timeout"))
        backend = self._backend
        if backend is not None and backend.forked and not self._ended.is_set():
            # As a Task's await_: waiting would last the whole timeout, or for good.
            raise SupervisorClosed(backend.usable() or "the supervisor is closed")
        self._ended.wait(seconds)
        return self.last_result if self._ended.is_set() else None

    def __repr__(self) -> str:
        return f"<Child {self.restart} restarts={self.restarts} alive={self.alive()}>"


def is_normal(result: Ok[Any] | Exit | None) -> bool:
    """A normal end: a return, ``SystemExit(0)``, or a shutdown asked for."""
    if isinstance(result, Ok):
        return True
    if isinstance(result, Exit):
        reason = result.reason
        if isinstance(reason, SystemExit) and reason.code in (0, None):
            return True
        if isinstance(reason, TaskShutdown):
            return True
    return False


class Children:
    """A Supervisor's children; holds the Supervisor weakly (a child must not
    keep a dropped supervisor alive)."""

    def __init__(self, sup: Supervisor, window: RestartWindow) -> None:
        self._sup = weakref.ref(sup)
        self.window = window
        self.lock = threading.Lock()
        self.running: list[Child] = []
        self.restarts = 0

    def add(self, child: Child, max_children: int | None) -> None:
        with self.lock:
            alive = sum(1 for c in self.running if c.alive())
            if max_children is not None and alive >= max_children:
                raise ValueError(f"max_children ({max_children}) children already running")
            self.running.append(child)

    def alive(self) -> list[Child]:
        with self.lock:
            return [c for c in self.running if c.alive()]

    def run(self, child: Child, *, first: bool = False) -> threading.Event | None:
        """Submit a run of ``child``; if it cannot run, it ends: returns its
        end event then, for the caller to set (see ``_forget``)."""
        sup = self._sup()
        if sup is None:
            return self._forget(child)
        try:
            # Urgent: it runs on the worker reserved for it at once, not
            # behind the tasks queued meanwhile (a restart as much as a start).
            call = child.call
            if call is None:  # ended meanwhile (terminated): it has let go of its call
                return self._forget(child)
            task = sup._make_task(*call, linked=False, node=child.node, urgent=True)
        except SupervisorClosed:
            if first:
                self.end(child)
                raise
            return self._forget(child)
        except Exception as exc:
            if first:  # start_child itself: the caller gets the error
                self.end(child)
                raise
            # The call no longer pickles (its closure changed): the child ends
            # with that error instead of waiting between runs for ever.
            child.last_result = Exit(exc)
            log.error("parstream: could not restart %r: %r", child, exc)
            return self._forget(child)
        with self.lock:
            # terminate_child may have run while the call was being pickled.
            stop = child.terminated or sup.closed
            if not stop:
                child.task = task
        if stop:
            return self._forget(child)
        # Weakly: the callback thread must hold no reference to a child once
        # its end is signalled, or a caller that waited for it and dropped
        # it could still find it alive (the callback's frame outliving wait()).
        task.add_done_callback(
            functools.partial(_child_done, weakref.ref(self), weakref.ref(child))
        )
        try:
            sup._submit_task(task)
        except SupervisorClosed:
            return self._forget(child)
        return None

    def done(self, child: Child, task: Task[Any]) -> threading.Event | None:
        """The child's task ended (callback thread): restart it, or not.

        Returns the child's end event when it ended for good, for the caller
        to set once it holds no reference to the child.
        """
        result = task.result_nowait()
        with self.lock:
            if not child.ending:  # an end from another thread has said how it ended
                child.last_result = result
        sup = self._sup()
        if sup is None or child.terminated or sup.closed:
            return self._forget(child)
        normal = is_normal(result)
        never_ran = isinstance(result, Exit) and isinstance(result.reason, ArgumentsNotPickled)
        if not normal:
            # Every abnormal end is logged, restarted or not (Elixir's error
            # reports): a child crashing now and then must leave a trace.
            log_failure(task)
        if child.restart == "temporary" or (child.restart == "transient" and normal) or never_ran:
            # Arguments that cannot be sent fail every run alike: the child
            # ends with that error rather than restart into a give-up.
            return self._forget(child)
        with self.lock:
            allowed = self.window.allow(time.monotonic())
            if allowed:
                self.restarts += 1
                child.restarts += 1
        if not allowed:
            reason = (
                f"the supervisor gave up: more than {self.window.max_restarts} restarts "
                f"within {self.window.max_seconds} s (last: {child!r} ended with {result!r})"
            )
            log.error("parstream: %s", reason)
            sup._give_up(reason)
            return None
        return self.run(child)

    def end(self, child: Child, reason: str = "the child was terminated") -> None:
        """End ``child`` from a thread that holds it anyway; once this returns,
        it is no longer alive (if another thread was ending it, it is now).

        Its last result is its run's, or, if that run is still being stopped,
        ``Exit(TaskShutdown(reason))``: set before the end is signalled, so
        ``wait()`` never sees an ended child without its result.
        """
        task = child.task
        if task is not None and task.done():
            result = task.result_nowait()
        else:  # being stopped, or never ran (the supervisor closed as it started)
            result = Exit(TaskShutdown(reason))
        self._forget(child, result)
        child._ended.set()

    def _forget(
        self, child: Child, result: Ok[Any] | Exit | None = None
    ) -> threading.Event | None:
        """Everything of a child's end but signalling it (``result``, if given,
        becomes its last): its event, or None if it had already ended."""
        with self.lock:
            if child.ending:
                return None
            child.ending = True
            if result is not None:
                child.last_result = result
            elif child.last_result is None:  # ended before any run: wait() must not say None
                child.last_result = Exit(TaskShutdown("the child ended before it ran"))
            child.call = None  # never run again
            # Ended children are forgotten: a long-lived supervisor running a
            # child per request does not grow.
            with contextlib.suppress(ValueError):
                self.running.remove(child)
        sup = self._sup()
        if sup is not None:
            sup._backend.release(1)
        return child._ended

    def terminate(self, child: Child) -> bool:
        with self.lock:
            # terminated: another thread is ending it now, and said True.
            being_ended = child.terminated and child.alive()
            if child not in self.running or not child.alive() or child.terminated:
                refused = True
            else:
                refused = False
                child.terminated = True
        if refused:
            if being_ended:
                # As Elixir's calls to a supervisor are one at a time: the
                # second answers once the child is gone, not while it still runs.
                child._ended.wait()
            return False
        task = child.task
        if task is not None:
            task.shutdown(child.shutdown_timeout)
        self.end(child)
        return True

    def end_all(self) -> list[Child]:
        """Mark every child terminated (no more restarts); returns them."""
        with self.lock:
            children = [c for c in self.running if c.alive()]
            for c in children:
                c.terminated = True
        return children


def _child_done(
    ref: weakref.ref[Children], child_ref: weakref.ref[Child], task: Task[Any]
) -> None:
    child = child_ref()
    if child is None:  # nobody holds it: it ended (terminated) already
        return
    children = ref()
    if children is None:  # dropped: no more restarts; closing its backend ends the rest
        child.last_result = task.result_nowait()
        ended: threading.Event | None = child._ended
    else:
        ended = children.done(child, task)
    # Signalled last, with the child no longer referenced from this thread.
    del child
    if ended is not None:
        ended.set()


def log_failure(task: Task[Any]) -> None:
    r = task.result_nowait()
    if isinstance(r, Exit) and not isinstance(r.reason, TaskShutdown):
        log.error("parstream: a task failed: %r", r.reason, exc_info=r.reason)
