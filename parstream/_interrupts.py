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
import weakref

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


WAKE_S = 0.1  # how often an event loop with parstream awaits in it is woken


async def waking(fut: Any) -> Any:
    """``await fut``, the event loop woken every ``WAKE_S`` meanwhile.

    An interrupt in Jupyter (the stop button, at a top-level ``await``) is
    acted on only when the kernel's event loop next wakes: awaiting a future
    that one item's end resolves, the stop waited for that item (seconds,
    minutes). One ticker task per loop does the waking, for all the
    awaits in it, and ends with the last of them."""
    import asyncio

    loop = asyncio.get_running_loop()
    waiting = _awaits.get(loop, 0)
    _awaits[loop] = waiting + 1
    if not waiting:
        ticker = loop.create_task(_tick(loop))
        _tickers.add(ticker)  # held until done: a task nobody holds may be collected
        ticker.add_done_callback(_tickers.discard)
    try:
        return await fut
    finally:
        _awaits[loop] -= 1


async def _tick(loop: Any) -> None:
    import asyncio

    while _awaits.get(loop, 0) > 0:
        await asyncio.sleep(WAKE_S)
    _awaits.pop(loop, None)


_awaits: weakref.WeakKeyDictionary[Any, int] = weakref.WeakKeyDictionary()
_tickers: set[Any] = set()
