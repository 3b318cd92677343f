"""A stream's chunks: how big they are, how their results come back, and in
which order they are handed out.

* ``Chunk``: a run of consecutive input items submitted as one ``Job``; it is
  the job's ``Sink``, and turns each backend call into an event on the
  stream's queue (the backend's event thread never touches the stream).
* ``ChunkSizer``: the automatic chunk size, learnt from the measured cost per
  item of every flush of results: 1 while items are slow (Elixir's
  behaviour), growing for tiny items until a chunk takes ``TARGET_CHUNK_S``,
  dropping at once when the cost rises; near the end of a known input, no
  chunk above a fair share of what is left.
* ``ReorderBuffer``: which results may be handed out next. Ordered: the head
  chunk's results, in input order (a slow head item holds the rest back;
  the stream bounds how much may wait). Unordered: any chunk with results,
  as they came.

None of this starts processes: ``tests/test_units.py`` drives it directly.
"""

from __future__ import annotations

import collections
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import queue
    from collections.abc import Mapping

    from parstream._backend import End, Job

TARGET_CHUNK_S = 0.02  # longer chunks amortise more but balance load worse
MAX_CHUNK = 32768  # caps memory per chunk and the cost of re-running after a crash
TAIL_CHUNK_S = 0.002  # the smallest chunk worth a round trip near the end of a known input
GROWTH = 8  # how fast an automatic chunk may grow between two measurements

# Event kinds on a stream's queue: (kind, chunk, values, errors, cost per item)
RESULTS = 0  # a flush of results
DONE = 1  # the chunk's job ended
RETURNED = 2  # the worker stopped the chunk early; its unrun rest came back
INPUT = 3  # the feeder has input (or its end) for the consumer
Event = tuple[int, Any, Any, Any, float]


class _Dropped:
    """Where the chunks of a closed stream post their events: nowhere."""

    __slots__ = ()

    def put(self, event: Event) -> None:
        pass


DROPPED: Any = _Dropped()


class Chunk:
    """Consecutive input items ``start ..`` run as one job; the job's sink."""

    __slots__ = (
        "closed_under",
        "done",
        "errors",
        "events",
        "flushed_at",
        "inputs",
        "job",
        "start",
        "started_at",
        "taken",
        "unrun",
        "values",
    )

    def __init__(self, start: int, inputs: list[Any], events: queue.SimpleQueue[Event]) -> None:
        self.start = start
        self.inputs = inputs
        self.events = events
        self.values: list[Any] = []
        self.errors: dict[int, BaseException] = {}
        self.taken = 0  # results handed out
        self.done = False
        self.job: Job | None = None
        self.started_at = 0.0  # event thread: when a worker took the job
        self.flushed_at = 0.0  # event thread: when the last flush arrived
        self.unrun = 0  # items handed back (returned) or dropped when the job ended
        self.closed_under = False  # the backend closed under the job

    # -- Sink: the backend's event thread ---------------------------------------

    def on_started(self, at: float) -> None:
        self.started_at = at
        self.flushed_at = 0.0

    def on_results(
        self, values: list[Any], errors: Mapping[int, BaseException], seconds: float | None
    ) -> None:
        # The flush's cost per item: as the backend measured it where the
        # items ran, else from this side's clock (chunk overhead included). A
        # rise in cost is seen within one flush (about 20 ms), not at the end.
        now = time.monotonic()
        cost = 0.0
        if len(errors) < len(values):
            if seconds is not None:
                cost = seconds / len(values)
            elif self.started_at:
                since = max(self.started_at, self.flushed_at)
                cost = (now - since) / len(values)
        self.flushed_at = now
        self.events.put((RESULTS, self, values, errors, cost))

    def on_done(self, end: End, unrun: int) -> None:
        self.unrun = unrun
        self.closed_under = end in ("closed", "killed") and unrun > 0
        self.events.put((RETURNED if end == "returned" else DONE, self, None, None, 0.0))

    def __repr__(self) -> str:
        return f"<Chunk {self.start}+{len(self.inputs)} got={len(self.values)} done={self.done}>"


class ChunkSizer:
    """The automatic chunk size (or the fixed one), from measured costs."""

    def __init__(self, fixed: int | None, max_concurrency: int, length: int | None) -> None:
        self.fixed = fixed
        self.chunk = fixed or 1
        self.max_concurrency = max_concurrency
        self.length = length  # of the input, when known
        self.item_cost: float | None = None  # seconds per item, chunk overhead included

    def learn(self, cost: float) -> None:
        """Adapt to the cost per item of one flush: down at once when it
        rises, up by at most ``GROWTH`` per flush."""
        if self.fixed is not None or cost <= 0:
            return
        old = self.item_cost
        self.item_cost = cost if old is None or cost > old else (old + cost) / 2
        want = int(TARGET_CHUNK_S / max(self.item_cost, 1e-9))
        self.chunk = max(1, min(want, self.chunk * GROWTH, MAX_CHUNK))

    def next_size(self, pulled: int) -> int:
        """The size of the next chunk, ``pulled`` items having been cut."""
        if self.fixed is not None:
            return self.fixed
        size = self.chunk
        if self.length is not None:
            # Keep the tail balanced: no chunk above a share of what is left,
            # nor below about TAIL_CHUNK_S of work (each chunk costs a round trip).
            left = self.length - pulled
            cost = self.item_cost
            floor = 1 if cost is None else int(TAIL_CHUNK_S / max(cost, 1e-9))
            size = min(size, max(1, floor, left // (2 * self.max_concurrency)))
        return max(1, size)


class ReorderBuffer:
    """Chunks with results to hand out, in input order or as they came."""

    def __init__(self, ordered: bool) -> None:
        self.ordered = ordered
        self.pending: collections.deque[Chunk] = collections.deque()  # ordered: by start
        self.ready: collections.deque[Chunk] = collections.deque()  # unordered: with results

    def submitted(self, chunk: Chunk, *, after: Chunk | None = None) -> None:
        """A new chunk (ordered: at the end, or right after ``after``'s pieces)."""
        if not self.ordered:
            return
        if after is None:
            self.pending.append(chunk)
        else:
            self.pending.insert(self.pending.index(after) + 1, chunk)

    def arrived(self, chunk: Chunk, before: int) -> None:
        """``chunk`` got results; it had ``before`` results then."""
        if not self.ordered and chunk.taken >= before and len(chunk.values) > before:
            self.ready.append(chunk)

    def ended(self, chunk: Chunk) -> None:
        if not self.ordered and chunk.taken >= len(chunk.values) and chunk in self.ready:
            self.ready.remove(chunk)

    def take(self) -> tuple[Chunk, int, int] | None:
        """The next run of deliverable results: (chunk, from, to)."""
        if self.ordered:
            pending = self.pending
            while pending:
                head = pending[0]
                if head.taken < len(head.values):
                    return head, head.taken, len(head.values)
                if head.done:
                    pending.popleft()
                    continue
                return None
            return None
        ready = self.ready
        while ready:
            chunk = ready[0]
            if chunk.taken < len(chunk.values):
                return chunk, chunk.taken, len(chunk.values)
            ready.popleft()
        return None

    def clear(self) -> None:
        self.pending.clear()
        self.ready.clear()
