"""A stream's input: pulled inline when it cannot block, else on a feeder thread.

A list, tuple, range, dict (view), set, str/bytes or other built-in container
cannot block, so the stream's consumer pulls it inline, a chunk at a time
(so does an sqlite3 cursor, which refuses other threads). Any other iterable
(a generator, a file, a queue, a socket) is pulled by a daemon *feeder*
thread that appends items to ``buf`` and wakes the consumer, so a ``next()``
that blocks on the input never delays results that are ready, and a chunk is
cut from what has arrived. The feeder pulls only while the consumer allows
(``allow``, the stream's bound) and rests once ``level`` items wait.

Only the feeder thread touches the input's iterator (a generator cannot run
on two threads). It pulls in blocks, at C speed, of about ``FEED_BLOCK_S`` of
the input's pace (one item at a time for a slow input); the time per item of
each block is the input's pace (``gap``). Every pull goes through
``pull_gate``, a list that ``stop()`` empties, so no ``next()`` starts after
a stop; one that blocks when the stream closes is left to return (the thread
is a daemon), its item is dropped and a generator is then closed.
"""

from __future__ import annotations

import array
import collections
import contextlib
import contextvars
import itertools
import operator
import threading
import time
import types
from typing import TYPE_CHECKING, Any

from parstream._chunks import INPUT

if TYPE_CHECKING:
    import queue
    from collections.abc import Iterable, Iterator

    from parstream._chunks import Event

FEED_BLOCK_S = 0.001  # the feeder's pull per block; longer amortises, but see FEED_POLL_S
MAX_FEED_BLOCK = 1 << 16
# While the feeder is inside a block of several items, a consumer that waits
# for input looks at the buffer this often: items that came before an input
# stalls mid-block are not held back until the block ends.
FEED_POLL_S = 0.002
NEVER = 1 << 62  # a buffer level the feeder never reaches
WAKE: Event = (INPUT, None, None, None, 0.0)
_SECOND = operator.itemgetter(1)

# Built-in containers whose iterators never block: pulled inline, without a
# feeder thread (exact types: a subclass may override __iter__).
_INLINE_TYPES = frozenset(
    {
        list,
        tuple,
        range,
        str,
        bytes,
        bytearray,
        memoryview,
        dict,
        set,
        frozenset,
        collections.deque,
        array.array,
        type({}.keys()),
        type({}.values()),
        type({}.items()),
        # ... and their iterators
        type(iter([])),
        type(iter(())),
        type(iter(range(0))),
        type(iter(range(1 << 64))),
        type(iter("")),
        type(iter({})),
        type(iter({}.values())),
        type(iter({}.items())),
        type(iter(set())),
        # endless but never blocking: pulled inline like a range
        itertools.count,
        itertools.repeat,
    }
)


def pulls_inline(iterable: Iterable[Any]) -> bool:
    """Whether the consumer pulls ``iterable`` itself: it cannot block, or it
    must not move threads (an sqlite3 cursor checks its thread by default)."""
    kind = type(iterable)
    return kind in _INLINE_TYPES or (kind.__module__, kind.__qualname__) == ("sqlite3", "Cursor")


class Feeder:
    """The feeder thread and the buffer it fills (see the module docstring).

    The consumer pops ``buf``; it may let the feeder pull while its count is
    below ``allow``, and is woken (one ``WAKE`` until it clears
    ``signalled``) once ``len(buf) >= need``.
    """

    def __init__(self, it: Iterator[Any], events: queue.SimpleQueue[Event], level: int) -> None:
        self.it: Iterator[Any] | None = it
        self.events = events
        self.buf: collections.deque[Any] = collections.deque()
        self.cond = threading.Condition(threading.Lock())
        self.allow = 0
        self.level = level  # the feeder rests while the buffer holds this many items
        self.need = 1
        self.signalled = False
        self.done = False  # the feeder has appended its last item
        self.error: BaseException | None = None  # what the input raised
        self.gap: float | None = None  # seconds between two items of the input
        self.pull_gate: list[None] = []  # pulls left in the current block
        self.feeding = False  # inside a block of several items
        self.stopped = False
        # The caller's context variables stay visible to a generator.
        ctx = contextvars.copy_context()
        self.thread = threading.Thread(
            target=ctx.run, args=(self.run,), name="parstream-feeder", daemon=True
        )

    def start(self, allow: int) -> None:
        self.allow = allow
        self.thread.start()

    def set_bounds(self, allow: int, level: int) -> None:
        with self.cond:
            self.allow = allow
            self.level = level
            self.cond.notify()

    def stop(self) -> None:
        """Pull nothing more: no pull starts once the gate is empty."""
        self.stopped = True
        self.pull_gate.clear()
        with self.cond:
            self.cond.notify()
        self.buf.clear()

    def run(self) -> None:
        it = self.it
        assert it is not None
        extend = self.buf.extend
        buf = self.buf
        cond = self.cond
        put = self.events.put
        monotonic = time.monotonic
        fed = 0
        block = 1
        try:
            while True:
                with cond:
                    while not self.stopped and (fed >= self.allow or len(buf) >= self.level):
                        cond.wait()
                    n = min(block, self.allow - fed)
                gate: list[None] = [None] * n
                self.pull_gate = gate
                if self.stopped:  # after publishing the gate: a stop from now on empties it
                    return
                self.feeding = n > 1
                error: BaseException | None = None
                counted = itertools.count()  # moves once per item the input gives
                t0 = monotonic()
                try:
                    # zip() takes from the gate first, so an emptied gate stops
                    # it before the input's next(), and from the counter last.
                    extend(map(_SECOND, zip(gate, it, counted, strict=False)))
                except BaseException as exc:
                    error = exc
                dt = monotonic() - t0
                self.feeding = False
                if self.stopped:
                    return
                got = next(counted)
                fed += got
                if got:
                    self.gap = dt / got
                if dt > FEED_BLOCK_S:
                    block = max(1, int(block * FEED_BLOCK_S / dt))
                elif dt < FEED_BLOCK_S / 2 and got == n:
                    block = min(2 * block, MAX_FEED_BLOCK)
                if error is not None:
                    self.error = error
                    return
                if got < n:
                    return  # the input is exhausted
                if len(buf) >= self.need and not self.signalled:
                    self.signalled = True
                    put(WAKE)
        finally:
            if self.stopped:
                if isinstance(it, types.GeneratorType):
                    with contextlib.suppress(BaseException):
                        it.close()
            else:
                self.done = True
                put(WAKE)
            self.it = None
