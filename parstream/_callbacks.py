"""The thread that runs users' completion callbacks, so no user code runs on a hub.

A hub thread keeps every deadline of its pool; a done-callback that blocks
for seconds there would delay every other item's timeout and dispatch. Task
callbacks (``Task.add_done_callback``, ``Future`` callbacks, a Supervisor's
child-restart logic) are queued here instead and run in order, one at a time,
on one daemon thread per process; one that raises is logged and the next
runs. A forked child starts its own thread on first use. ``drain`` waits
for what is queued: a Supervisor's ``shutdown(wait=True)`` and the
interpreter's exit do, so no callback of finished work is lost.

At interpreter exit (``exiting``), a daemon thread of the program that
parstream's exit cuts short (reading a stream, awaiting a task) blocks for
good in ``park_if_exiting`` and dies silently with the interpreter; this
thread never does, since exit waits for it.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Callable

log = logging.getLogger("parstream")

DRAIN_SLICE_S = 0.2
_lock = threading.Lock()
_queue: queue.SimpleQueue[tuple[Callable[..., Any], tuple[Any, ...]]] = queue.SimpleQueue()
_thread: threading.Thread | None = None
_pid = 0


def _run() -> None:
    while True:
        fn, args = _queue.get()
        try:
            fn(*args)
        except BaseException:  # SystemExit too: one callback must not end every other's
            log.exception("parstream: a completion callback raised")
        del fn, args  # hold nothing of the user's while waiting for the next


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
    daemon threads still run then.) Not this module's callback thread."""
    if _EXITING.is_set() and threading.current_thread().daemon and not on_callback_thread():
        threading.Event().wait()


def on_callback_thread() -> bool:
    """Whether this is the thread that runs completion callbacks."""
    return _thread is not None and threading.current_thread() is _thread


def call_soon(fn: Callable[..., Any], *args: Any) -> None:
    """Run ``fn(*args)`` on the callback thread, after those queued before it.

    Where no thread can be started (Python 3.12 and later refuse one once
    the interpreter is shutting down: work finishing at exit), it runs here
    and now instead of being lost."""
    if not ensure_started():
        try:
            fn(*args)
        except BaseException:
            log.exception("parstream: a completion callback raised")
        return
    _queue.put((fn, args))


def ensure_started() -> bool:
    """Start the callback thread if it is not running; False if it cannot be."""
    global _thread, _queue, _pid
    if _thread is None or _pid != os.getpid() or not _thread.is_alive():
        with _lock:
            if _thread is None or _pid != os.getpid() or not _thread.is_alive():
                if _pid != os.getpid():
                    _queue = queue.SimpleQueue()
                _pid = os.getpid()
                thread = threading.Thread(target=_run, name="parstream-callbacks", daemon=True)
                try:
                    thread.start()
                except RuntimeError:  # "can't create new thread at interpreter shutdown"
                    return False
                _thread = thread
    return True


def drain() -> None:
    """Return once every callback queued so far has run, as a
    ``ProcessPoolExecutor``'s ``shutdown(wait=True)`` does (its callbacks run
    on the thread it joins). At once on the callback thread itself."""
    thread = _thread
    if thread is None or _pid != os.getpid() or threading.current_thread() is thread:
        return
    ran = threading.Event()
    _queue.put((ran.set, ()))
    while not ran.wait(DRAIN_SLICE_S):  # in slices: Ctrl-C is seen meanwhile
        if not thread.is_alive():  # pragma: no cover - it catches everything
            return


def _after_fork_in_child() -> None:
    global _lock, _thread
    _lock = threading.Lock()
    _thread = None


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
