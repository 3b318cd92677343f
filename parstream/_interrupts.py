"""Ctrl-C held back while parstream stops work in the caller's thread.

Stopping a task or a stream takes several steps in the thread that asked
(marking it killed, signalling each worker's process tree, the first time
after importing psutil). Python raises ``KeyboardInterrupt`` between any two
of them, so a second Ctrl-C landing in the cleanup of the first used to leave
a worker running for good, marked killed, with nothing left that would kill
it. ``held()`` keeps SIGINT's ``KeyboardInterrupt`` back until its block is
done, then raises it: Ctrl-C still stops the caller, and the cleanup
finishes first. It acts only in the main thread (the one Python runs signal
handlers in) and only while SIGINT has Python's default handler; otherwise it
does nothing.
"""

from __future__ import annotations

import contextlib
import signal
import threading

TYPE_CHECKING = False  # see parstream/__init__.py
if TYPE_CHECKING:
    from collections.abc import Iterator


@contextlib.contextmanager
def held() -> Iterator[None]:
    """Run the block with Ctrl-C held back; raise ``KeyboardInterrupt`` after
    it if one came meanwhile."""
    if (
        threading.current_thread() is not threading.main_thread()
        or signal.getsignal(signal.SIGINT) is not signal.default_int_handler
    ):
        yield
        return
    came: list[int] = []
    signal.signal(signal.SIGINT, lambda signum, _frame: came.append(signum))
    try:
        yield
    except KeyboardInterrupt:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        raise
    except BaseException:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        if came:
            raise KeyboardInterrupt from None
        raise
    signal.signal(signal.SIGINT, signal.default_int_handler)
    if came:
        raise KeyboardInterrupt
