"""Ctrl-C held back while parstream stops work in the caller's thread.

Stopping a task or a stream takes several steps in the thread that asked
(marking it killed, signalling each worker's process tree, the first time
after importing psutil). Python raises ``KeyboardInterrupt`` between any two
of them, so a second Ctrl-C landing in the cleanup of the first used to leave
a worker running for good, marked killed, with nothing left that would kill
it. ``held()`` keeps SIGINT back until its block is done, then hands it to
the handler that was in place (Python's default raises ``KeyboardInterrupt``;
``asyncio.run``'s cancels its main task): Ctrl-C still stops the caller, and
the cleanup finishes first. It acts only in the main thread (the one Python
runs signal handlers in) and only while SIGINT has a Python-level handler;
with ``SIG_IGN`` or ``SIG_DFL`` there is nothing to hold back.
"""

from __future__ import annotations

import contextlib
import signal
import threading

TYPE_CHECKING = False  # see parstream/__init__.py
if TYPE_CHECKING:
    from collections.abc import Iterator
    from typing import Any


_holding = False  # a held() block is running (main thread only): nested ones add nothing


@contextlib.contextmanager
def held() -> Iterator[None]:
    """Run the block with SIGINT held back; then give each one that came
    meanwhile to the handler that was in place (which may raise)."""
    global _holding
    if _holding or threading.current_thread() is not threading.main_thread():
        yield
        return
    handler = signal.getsignal(signal.SIGINT)
    if not callable(handler):
        yield
        return
    came: list[tuple[int, Any]] = []
    signal.signal(signal.SIGINT, lambda signum, frame: came.append((signum, frame)))
    _holding = True
    try:
        yield
    except KeyboardInterrupt:
        came.clear()  # already on its way out: a Ctrl-C held meanwhile adds nothing
        raise
    finally:
        _holding = False
        signal.signal(signal.SIGINT, handler)
        for signum, frame in came:
            handler(signum, frame)


WAKE_S = 0.1  # how often an awaiting coroutine lets its event loop run


async def waking(fut: Any) -> Any:
    """``await fut``, waking the event loop every ``WAKE_S`` meanwhile.

    An interrupt in Jupyter (the stop button, at a top-level ``await``) is
    acted on only when the kernel's event loop next wakes: awaiting a future
    that one item's end resolves, the stop waited for that item (seconds,
    minutes). ``fut`` itself is not cancelled by a cancellation here."""
    import asyncio

    while not fut.done():
        await asyncio.wait((fut,), timeout=WAKE_S)
    return fut.result()
