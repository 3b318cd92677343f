"""The threads that run users' completion callbacks, so no user code runs on a hub.

A hub thread keeps every deadline of its pool; a done-callback that blocks
for seconds there would delay every other item's timeout and dispatch. Task
callbacks (``Task.add_done_callback``, ``Future`` callbacks, a Supervisor's
child-restart logic) are queued on a ``Lane`` instead and run in order, one
at a time, on that lane's daemon thread; one that raises is logged and the
next runs. Each Supervisor has a lane of its own, so a callback that blocks
holds up only its own Supervisor's callbacks, restarts and ``shutdown``,
as a blocking callback of a ``ProcessPoolExecutor`` holds up only that
executor; work without a Supervisor's lane uses ``DEFAULT_LANE``. A lane's
thread starts on first use and ends once its Supervisor is closed and
nothing is left to run (a forked child starts its own). ``Lane.drain``
waits for what is queued: a Supervisor's ``shutdown(wait=True)`` does, and
the interpreter's exit drains every lane (``drain_all``), so no callback of
finished work is lost.

At interpreter exit (``exiting``), a daemon thread of the program that
parstream's exit cuts short (reading a stream, awaiting a task) blocks for
good in ``park_if_exiting`` and dies silently with the interpreter; a
callback thread never does, since exit waits for it.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import weakref
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Callable

log = logging.getLogger("parstream")

DRAIN_SLICE_S = 0.2
IDLE_S = 0.5  # a closed lane's thread ends after this long with nothing to run

_Item = tuple["Callable[..., Any]", tuple[Any, ...]]


class Lane:
    """A queue of callbacks and the one daemon thread that runs them in order."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._queue: queue.SimpleQueue[_Item] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._closing = False  # its Supervisor closed: the thread ends once idle
        _lanes.add(self)

    def close(self) -> None:
        """Its Supervisor is closed: the thread ends once nothing is left to
        run (callbacks of work ending now still run, on a thread started
        again if need be)."""
        with self._lock:
            self._closing = True
            if self._thread is not None:
                self._queue.put((_nothing, ()))  # wakes it to see that

    def _run(self, items: queue.SimpleQueue[_Item]) -> None:
        while True:
            try:
                # An open Supervisor's thread waits for good, as one thread
                # per process did: a callback added to a future that ends at
                # the interpreter's exit finds it there (3.12 starts none then).
                fn, args = items.get(timeout=IDLE_S if self._closing else None)
            except queue.Empty:
                with self._lock:  # call_soon puts under this lock: nothing slips in
                    if items.empty() and self._thread is threading.current_thread():
                        self._thread = None
                        return
                continue
            _call(fn, args)
            del fn, args  # hold nothing of the user's while waiting for the next

    def _forked(self) -> None:
        """In a child made by ``os.fork()``, before anything else runs there:
        a fresh lock, queue and no thread (the copies are the parent's)."""
        self._lock = threading.Lock()
        self._queue = queue.SimpleQueue()
        self._thread = None

    def _start(self) -> bool:
        """Under the lock: a thread for this lane. False if none can be
        started: Python 3.12 and later refuse one once the interpreter is
        shutting down."""
        if self._thread is not None and self._thread.is_alive():
            return True
        thread = threading.Thread(
            target=self._run, args=(self._queue,), name="parstream-callbacks", daemon=True
        )
        thread._parstream_callbacks = True  # type: ignore[attr-defined]
        try:
            thread.start()
        except RuntimeError:  # "can't create new thread at interpreter shutdown"
            return False
        self._thread = thread
        return True

    def ensure_started(self) -> bool:
        """Start this lane's thread if it is not running; False if it cannot be."""
        with self._lock:
            return self._start()

    def call_soon(self, fn: Callable[..., Any], *args: Any) -> None:
        """Run ``fn(*args)`` on this lane's thread, after those queued before
        it; where no thread can be started, here and now instead of never."""
        with self._lock:
            started = self._start()
            if started:
                self._queue.put((fn, args))
        if not started:
            _call(fn, args)

    def on_thread(self) -> bool:
        return self._thread is not None and threading.current_thread() is self._thread

    def drain(self) -> None:
        """Return once every callback queued here so far has run, as a
        ``ProcessPoolExecutor``'s ``shutdown(wait=True)`` does (its callbacks
        run on the thread it joins). At once on this lane's own thread."""
        if self._thread is None or self.on_thread():
            return
        ran = threading.Event()
        self.call_soon(ran.set)
        while not ran.wait(DRAIN_SLICE_S):  # in slices: Ctrl-C is seen meanwhile
            thread = self._thread
            if thread is None or not thread.is_alive():  # pragma: no cover
                return


def _call(fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
    try:
        fn(*args)
    except BaseException:  # SystemExit too: one callback must not end every other's
        log.exception("parstream: a completion callback raised")


def run_logged(fn: Callable[..., Any], *args: Any) -> None:
    """Run a completion callback here and now, logging an exception it
    raises (a callback added to work already done runs in the caller's
    thread); Ctrl-C there goes on up, as ``Future.add_done_callback``'s does."""
    try:
        fn(*args)
    except Exception:
        log.exception("parstream: a completion callback raised")


def _nothing() -> None:
    pass


_lanes: weakref.WeakSet[Lane] = weakref.WeakSet()
DEFAULT_LANE = Lane()  # for callbacks of work no Supervisor's lane covers


def _after_fork_in_child() -> None:
    for lane in list(_lanes):
        lane._forked()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def drain_all() -> None:
    """Interpreter exit: every lane's queued callbacks have run."""
    for lane in list(_lanes):
        lane.drain()


def mark_hub_thread(thread: threading.Thread) -> None:
    """Record that ``thread`` keeps a pool's time: no user code may run on it."""
    thread._parstream_hub = True  # type: ignore[attr-defined]


def on_hub_thread() -> bool:
    return getattr(threading.current_thread(), "_parstream_hub", False) is True


_EXITING = threading.Event()


def exiting() -> None:
    """The interpreter is exiting (parstream's exit hook has begun)."""
    _EXITING.set()


def is_exiting() -> bool:
    return _EXITING.is_set()


def park_if_exiting() -> None:
    """At interpreter exit, a daemon thread of the program's whose stream or
    task exit has just killed blocks here for good, as one reading
    ``Pool.imap`` or waiting on ``apply_async().get()`` does, and dies
    silently with the interpreter: an error would print a traceback at
    exit, and a stream's end would pass partial results off as whole. (Only
    daemon threads still run then.) Not a callback thread."""
    if _EXITING.is_set() and threading.current_thread().daemon and not on_callback_thread():
        threading.Event().wait()


def on_callback_thread() -> bool:
    """Whether this is a thread that runs completion callbacks (any lane's)."""
    return getattr(threading.current_thread(), "_parstream_callbacks", False) is True
