"""Streams: lazy, back-pressured parallel map with ordered or unordered results.

The consumer's thread does the stream's work inside ``next()``: it cuts input
into chunks, submits each chunk to the pool as one ``Job``, and hands results
out in input or completion order. The pool's hub thread only appends events to
the stream's queue (one per flush from a worker, not per item, stamped with
the flush's cost per item) and enforces per-item timeouts, so timers run on
while the consumer is busy.

Input: a list, tuple, range, dict (view), set, str/bytes or other built-in
container cannot block, so the consumer pulls it inline, a chunk at a time
(so does an sqlite3 cursor, which refuses other threads).
Any other iterable (a generator, a file, a queue, a socket) is pulled on a
daemon *feeder* thread that appends items to a buffer and wakes the consumer,
so a ``next()`` that blocks on the input never delays results that are ready,
and a chunk is cut from what has arrived, never waiting for more while a
worker is idle. The feeder pulls only while there is room (the bound below).
When the input raises, the results of every item pulled before the fault are
delivered first; then the input's own exception is raised from the stream.

Bounds (``_State.fill``): at most ``max_concurrency`` chunks run at once (a
``Gate`` in the pool; batched chunks may wait queued one round ahead), and
at most ``max_concurrency * chunk + buffer_size`` items are pulled but not yet
delivered, so a slow head item or a slow consumer stops the pulling instead of
growing memory. With ``chunksize=None`` the chunk size adapts to the measured
cost per item, learnt from every flush of results (about every 20 ms): 1
while items are slow (exactly Elixir's behaviour), growing for tiny items
until a chunk takes about ``TARGET_CHUNK_S``, dropping at once when the cost
rises. A chunk queued ahead waits for no more than ``TARGET_CHUNK_S`` of the
input's measured pace (an input producing an item every 50 ms gets chunks of
1), and the feeder rests at ``LEVEL_CHUNKS`` rounds ahead. A batch whose items
turn slow stops at the worker's time budget and its unrun rest comes back
(``on_returned``), to be cut into smaller chunks for any free worker.

Leaving early (``close()``, ``break`` then garbage collection, an exception in
the consumer, Ctrl-C) kills the stream's running chunks at once and stops the
feeder: it pulls no further item. A feeder blocked inside the input's
``next()`` is left to finish that one call (the thread is a daemon, so it
never keeps the process alive); the item is dropped and a generator is then
closed on that thread.
"""

from __future__ import annotations

import array
import collections
import contextlib
import contextvars
import itertools
import operator
import queue
import threading
import time
import types
from collections.abc import AsyncIterator, Callable, Generator, Iterable, Iterator
from typing import TYPE_CHECKING, Any, Literal

from parstream import _wire
from parstream._errors import SupervisorClosed, TaskTimeout
from parstream._functions import ship
from parstream._output import settle as settle_output
from parstream._pool import Gate, Job
from parstream._progress import Progress
from parstream._results import Exit, Ok, Result

if TYPE_CHECKING:
    from parstream._pool import Pool

TARGET_CHUNK_S = 0.02  # longer chunks amortise more but balance load worse
MAX_CHUNK = 32768  # caps memory per chunk and the cost of re-running after a crash
TAIL_CHUNK_S = 0.002  # the smallest chunk worth a round trip near the end of a known input
GROWTH = 8  # how fast an automatic chunk may grow between two measurements
BUFFER_CHUNKS = 4  # default buffer_size, in chunks per unit of max_concurrency
WAIT_POLL_S = 0.1  # the consumer's longest sleep: keeps Ctrl-C and close() prompt
FEED_BLOCK_S = 0.001  # the feeder's pull per block; longer amortises, but see FEED_POLL_S
MAX_FEED_BLOCK = 1 << 16
# While the feeder is inside a block of several items, a consumer that waits
# for input looks at the buffer this often: items that came before an input
# stalls mid-block are not held back until the block ends.
FEED_POLL_S = 0.002
# The feeder rests once it has buffered this many chunks per unit of
# max_concurrency: pulling further ahead would only hold the GIL from the hub.
LEVEL_CHUNKS = 2

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

OnTimeout = Literal["exit", "kill_task"]

# Event kinds on a stream's queue: (kind, chunk, values, errors, cost per item)
_RESULTS = 0  # a flush of results from the hub thread
_DONE = 1  # the chunk's job ended
_RETURNED = 2  # the worker stopped the chunk early; its unrun rest came back
_INPUT = 3  # the feeder has input (or its end) for the consumer
Event = tuple[int, Any, Any, Any, float]
_WAKE: Event = (_INPUT, None, None, None, 0.0)
_NEVER = 1 << 62  # a buffer level the feeder never reaches
_SECOND = operator.itemgetter(1)


class _Chunk:
    __slots__ = ("done", "errors", "flushed_at", "inputs", "job", "start", "taken", "values")

    def __init__(self, start: int, inputs: list[Any]) -> None:
        self.start = start
        self.inputs = inputs
        self.values: list[Any] = []
        self.errors: _wire.Errors = {}
        self.taken = 0  # results handed out
        self.done = False
        self.job: Job | None = None
        self.flushed_at = 0.0  # hub thread: when the last flush arrived


class _State:
    """Everything a stream owns; the pool's sink. Holds no reference to the Stream,
    so dropping the Stream object runs its finaliser at once."""

    def __init__(
        self,
        pool: Pool,
        fn: Callable[..., Any],
        iterable: Iterable[Any],
        *,
        linked: bool,
        max_concurrency: int,
        ordered: bool,
        timeout: float | None,
        on_timeout: OnTimeout,
        zip_input_on_exit: bool,
        progress: Any,
        chunksize: int | None,
        buffer_size: int | None,
    ) -> None:
        self.pool = pool
        self.fn = ship(fn)
        self.iterable = iterable
        self.it: Iterator[Any] | None = None
        self.linked = linked
        self.max_concurrency = max_concurrency
        self.ordered = ordered
        self.timeout = timeout
        self.on_timeout = on_timeout
        self.zip_input = zip_input_on_exit
        self.progress_spec = progress
        self.progress: Progress | None = None
        self.fixed_chunk = chunksize
        self.buffer_size = buffer_size
        self.chunk = chunksize or 1
        self.events: queue.SimpleQueue[Event] = queue.SimpleQueue()
        self.pending: collections.deque[_Chunk] = collections.deque()  # ordered: by start
        self.ready: collections.deque[_Chunk] = collections.deque()  # unordered: with results
        self.running: set[_Chunk] = set()
        self.pulled = 0  # items cut into chunks
        self.delivered = 0
        self.exhausted = False
        self.input_error: BaseException | None = None  # what the input raised, once
        self.closed = False
        self.started = False
        self.reserved = 0
        self.length = _length_hint(iterable)
        self.item_cost: float | None = None  # measured seconds per item, chunk overhead included
        self.lock = threading.Lock()  # close() may come from another thread
        self.gate = Gate(max_concurrency)
        self.star = False  # items are argument tuples (Supervisor.map over several iterables)
        # The feeder (inputs that may block). ``buf`` is appended to by the
        # feeder and popped by the consumer; the feeder may pull while its
        # count is below ``allow``, and wakes the consumer (one _WAKE until
        # the consumer clears ``signalled``) once ``len(buf) >= need``.
        self.feeder: threading.Thread | None = None
        self.buf: collections.deque[Any] = collections.deque()
        self.cond = threading.Condition(threading.Lock())
        self.allow = 0
        self.level = 1  # the feeder rests while the buffer holds this many items
        self.need = 1
        self.signalled = False
        self.input_done = False  # the feeder has appended its last item
        self.input_gap: float | None = None  # seconds between two items of the input
        # The feeder's pulls left in its current block; close() empties it.
        self.pull_gate: list[None] = []
        self.feeding = False  # the feeder is inside a block of several items

    # -- sink (hub thread) -----------------------------------------------------

    def on_results(self, job: Job, values: list[Any], errors: _wire.Errors) -> None:
        chunk = job.tag
        if chunk is None:
            return
        # The flush's cost per item, from the parent's clock: a rise in cost
        # is seen within one flush (~FLUSH_INTERVAL_S), not at the job's end.
        now = time.monotonic()
        since = max(job.started_at, chunk.flushed_at)
        chunk.flushed_at = now
        cost = (now - since) / len(values) if values and not job.killed else 0.0
        self.events.put((_RESULTS, chunk, values, errors, cost))

    def on_job_done(self, job: Job) -> None:
        chunk = job.tag
        if chunk is not None:
            self.events.put((_DONE, chunk, None, None, 0.0))

    def on_returned(self, job: Job) -> None:
        """The worker stopped ``job`` at its time budget; the rest is ours to re-cut."""
        chunk = job.tag
        if chunk is not None:
            self.events.put((_RETURNED, chunk, None, None, 0.0))

    # -- consumer side -----------------------------------------------------------

    def start(self) -> None:
        self.started = True
        self.it = iter(self.iterable)
        extra = self.max_concurrency - self.pool.base
        if extra > 0:
            self.reserved = extra
            self.pool.reserve(extra)
        if self.progress_spec is not False:
            self.progress = Progress(self.progress_spec, total=self.length)
        if not _pull_inline(self.iterable):
            self.allow = self.limit()
            self.level = LEVEL_CHUNKS * self.max_concurrency
            # The caller's context variables stay visible to a generator.
            ctx = contextvars.copy_context()
            self.feeder = threading.Thread(
                target=ctx.run, args=(_feed, self), name="parstream-feeder", daemon=True
            )
            self.feeder.start()

    def limit(self) -> int:
        buffer = self.buffer_size
        if buffer is None:
            buffer = BUFFER_CHUNKS * self.max_concurrency * self.chunk
        return self.max_concurrency * self.chunk + buffer

    def next_chunk_size(self) -> int:
        if self.fixed_chunk is not None:
            return self.fixed_chunk
        size = self.chunk
        if self.length is not None:
            # Keep the tail balanced: no chunk above a share of what is left,
            # nor below about TAIL_CHUNK_S of work (each chunk costs a round trip).
            left = self.length - self.pulled
            floor = 1 if self.item_cost is None else int(TAIL_CHUNK_S / max(self.item_cost, 1e-9))
            size = min(size, max(1, floor, left // (2 * self.max_concurrency)))
        return max(1, size)

    def fill(self) -> None:
        """Pull and submit chunks while there is room."""
        if self.feeder is not None:
            self.fill_from_feeder()
            return
        assert self.it is not None
        while not self.exhausted:
            size = self.next_chunk_size()
            # Batched chunks queue one round ahead (the gate keeps at most
            # max_concurrency running), so a worker never waits for this thread.
            ahead = self.max_concurrency if size > 1 else 0
            if len(self.running) >= self.max_concurrency + ahead:
                return
            if self.pulled - self.delivered + size > self.limit():
                return
            inputs: list[Any] = []
            try:
                # extend() keeps what was pulled before a fault.
                inputs.extend(itertools.islice(self.it, size))
            except BaseException as exc:
                self.input_error = exc
                self.exhausted = True
            if not inputs:
                self.exhausted = True
                return
            self.submit(inputs)

    def fill_from_feeder(self) -> None:
        """Cut chunks from what the feeder has buffered; never wait for more
        while a worker could take it."""
        buf = self.buf
        take = buf.popleft
        while True:
            ended = self.input_done  # read before the buffer: then it holds the last item
            while True:
                size = self.next_chunk_size()
                ahead = self.max_concurrency if size > 1 else 0
                running = len(self.running)
                if running >= self.max_concurrency + ahead:
                    need = _NEVER  # a chunk's end wakes us
                    break
                avail = len(buf)
                if not avail:
                    if ended:
                        self.exhausted = True
                        return
                    need = 1 if running < self.max_concurrency else size
                    break
                if running >= self.max_concurrency and not ended:
                    # Every worker is busy: queue a chunk ahead once it is full,
                    # full meaning no more than TARGET_CHUNK_S of the input's pace.
                    gap = self.input_gap
                    enough = size if gap is None else min(size, int(TARGET_CHUNK_S / gap) + 1)
                    if avail < enough:
                        need = enough
                        break
                n = min(size, avail)
                self.submit(list(itertools.starmap(take, itertools.repeat((), n))))
            with self.cond:
                self.allow = self.delivered + self.limit()
                self.level = LEVEL_CHUNKS * self.max_concurrency * self.next_chunk_size()
                self.cond.notify()
            self.need = need
            self.signalled = False
            # The feeder may have appended after we looked, seeing the old flag.
            if len(buf) < need and self.input_done == ended:
                return

    def submit(self, inputs: list[Any]) -> _Chunk:
        chunk = _Chunk(self.pulled, inputs)
        self.pulled += len(inputs)
        self.submit_chunk(chunk)
        if self.ordered:
            self.pending.append(chunk)
        return chunk

    def submit_chunk(self, chunk: _Chunk) -> None:
        inputs = chunk.inputs
        job = Job(
            self.fn,
            inputs if self.zip_input is False else list(inputs),
            self,
            star=self.star,
            timeout=self.timeout,
            first_index=chunk.start,
            tag=chunk,
            gate=self.gate,
        )
        chunk.job = job
        with self.lock:
            if self.closed:
                raise _Closed
            self.running.add(chunk)
            self.pool.submit(job)

    def apply(self, event: Event) -> None:
        kind, chunk, values, errors, cost = event
        if kind == _RESULTS:
            if cost > 0:
                self.learn(cost)
            if errors:
                self.check_failures(chunk, errors)
                base = len(chunk.values)
                for i, e in errors.items():
                    chunk.errors[base + i] = e
            had = chunk.taken < len(chunk.values)
            chunk.values.extend(values)
            if not self.ordered and not had and values:
                self.ready.append(chunk)
            return
        if kind == _INPUT:
            return  # the loop around us fills
        if kind == _RETURNED:
            self.split_returned(chunk)
        elif len(chunk.values) < len(chunk.inputs) and not self.closed:
            # Killed by someone else: its supervisor closed under us.
            raise SupervisorClosed("the supervisor was closed while this stream was running")
        chunk.done = True
        self.running.discard(chunk)
        if chunk.job is not None:
            # Break chunk <-> job: a cycle would keep the chunk's lists
            # alive until a full garbage collection.
            chunk.job.tag = None
            chunk.job = None
        if not self.ordered and chunk.taken >= len(chunk.values) and chunk in self.ready:
            self.ready.remove(chunk)

    def split_returned(self, chunk: _Chunk) -> None:
        """Cut the unrun rest of ``chunk`` into chunks of the size its items now
        need, placed right after it, so every free worker can take some."""
        if self.closed:
            return
        ran = len(chunk.values)
        rest = chunk.inputs[ran:]
        chunk.inputs = chunk.inputs[:ran]
        if not rest:
            return
        share = -(-len(rest) // self.max_concurrency)
        size = max(1, min(self.next_chunk_size(), share))
        at = self.pending.index(chunk) + 1 if self.ordered else 0
        start = chunk.start + ran
        for lo in range(0, len(rest), size):
            piece = _Chunk(start + lo, rest[lo : lo + size])
            self.submit_chunk(piece)
            if self.ordered:
                self.pending.insert(at, piece)
                at += 1

    def check_failures(self, chunk: _Chunk, errors: _wire.Errors) -> None:
        """Linked streams raise a failure at once; so does any timeout under 'exit'."""
        for i in sorted(errors):
            exc = _wire.rebuild_error(errors[i])
            if isinstance(exc, TaskTimeout):
                if self.on_timeout == "exit":
                    raise exc
            elif self.linked:
                raise exc

    def learn(self, cost: float) -> None:
        """Adapt the automatic chunk size to the cost per item of one flush:
        down at once when the cost rises, up by at most GROWTH per flush."""
        if self.fixed_chunk is not None:
            return
        old = self.item_cost
        self.item_cost = cost if old is None or cost > old else (old + cost) / 2
        want = int(TARGET_CHUNK_S / max(self.item_cost, 1e-9))
        self.chunk = max(1, min(want, self.chunk * GROWTH, MAX_CHUNK))

    def wait_event(self) -> None:
        # A bounded wait keeps Ctrl-C prompt on every platform, and notices a
        # close() from another thread (an ``async for`` being cancelled).
        if self.closed:
            raise _Closed
        poll = FEED_POLL_S if self.feeding and self.need != _NEVER else WAIT_POLL_S
        try:
            event = self.events.get(timeout=poll)
        except queue.Empty:
            return
        self.apply(event)
        self.drain_events()

    def drain_events(self) -> None:
        while True:
            try:
                event = self.events.get_nowait()
            except queue.Empty:
                return
            self.apply(event)

    def take(self) -> tuple[_Chunk, int, int] | None:
        """The next run of deliverable results: (chunk, from, to)."""
        if self.ordered:
            while self.pending:
                head = self.pending[0]
                if head.taken < len(head.values):
                    return head, head.taken, len(head.values)
                if head.done:
                    self.pending.popleft()
                    continue
                return None
            return None
        while self.ready:
            chunk = self.ready[0]
            if chunk.taken < len(chunk.values):
                return chunk, chunk.taken, len(chunk.values)
            self.ready.popleft()
        return None

    def finished(self) -> bool:
        return self.exhausted and not self.running and self.take() is None

    def close(self) -> None:
        with self.lock:
            if self.closed:
                return
            self.closed = True
            running = list(self.running)
        # Stop the feeder: no pull starts once its gate is empty.
        self.pull_gate.clear()
        with self.cond:
            self.cond.notify()
        for chunk in running:
            job = chunk.job
            if job is not None:
                self.pool.kill(job, None)
                job.tag = None
                chunk.job = None
        self.running.clear()
        self.pending.clear()
        self.ready.clear()
        self.buf.clear()
        if self.reserved:
            self.pool.release(self.reserved)
            self.reserved = 0
        if self.progress is not None:
            self.progress.close()

    def exit_for(self, chunk: _Chunk, pos: int) -> Exit:
        exc = _wire.rebuild_error(chunk.errors[pos])
        if self.zip_input:
            return Exit(exc, chunk.inputs[pos])
        return Exit(exc)


def _feed(state: _State) -> None:
    """The feeder thread: pull the input while there is room, wake the consumer.

    Only this thread touches the input's iterator (a generator cannot run on
    two threads). It pulls in blocks, at C speed, of about ``FEED_BLOCK_S``
    of the input's pace (one item at a time for a slow input); each item lands
    in the buffer as it comes. Every pull goes through ``pull_gate``, a list that
    ``close()`` empties, so no ``next()`` starts after a close; one that
    blocks when the stream closes is left to return, and its item is dropped.
    The time per item of each block is the input's pace (``input_gap``).
    """
    it = state.it
    assert it is not None
    extend = state.buf.extend
    buf = state.buf
    cond = state.cond
    put = state.events.put
    monotonic = time.monotonic
    fed = 0
    block = 1
    try:
        while True:
            with cond:
                while not state.closed and (fed >= state.allow or len(buf) >= state.level):
                    cond.wait()
                n = min(block, state.allow - fed)
            gate: list[None] = [None] * n
            state.pull_gate = gate
            if state.closed:  # after publishing the gate: a close from now on empties it
                return
            state.feeding = n > 1
            error: BaseException | None = None
            counted = itertools.count()  # moves once per item the input gives
            t0 = monotonic()
            try:
                # zip() takes from the gate first, so an emptied gate stops it
                # before the input's next(), and from the counter last.
                extend(map(_SECOND, zip(gate, it, counted, strict=False)))
            except BaseException as exc:
                error = exc
            dt = monotonic() - t0
            state.feeding = False
            if state.closed:
                return
            got = next(counted)
            fed += got
            if got:
                state.input_gap = dt / got
            if dt > FEED_BLOCK_S:
                block = max(1, int(block * FEED_BLOCK_S / dt))
            elif dt < FEED_BLOCK_S / 2 and got == n:
                block = min(2 * block, MAX_FEED_BLOCK)
            if error is not None:
                state.input_error = error
                return
            if got < n:
                return  # the input is exhausted
            if len(buf) >= state.need and not state.signalled:
                state.signalled = True
                put(_WAKE)
    finally:
        if state.closed:
            if isinstance(it, types.GeneratorType):
                with contextlib.suppress(BaseException):
                    it.close()
        else:
            state.input_done = True
            put(_WAKE)
        state.it = None


class _Closed(Exception):
    """The stream was closed from another thread while its generator waited."""


def _run(state: _State, wrap: bool) -> Generator[Any, None, None]:
    """The stream's generator: yields Ok/Exit (``wrap``) or plain values."""
    try:
        yield from _produce(state, wrap)
    except _Closed:
        return
    finally:
        state.close()


def _produce(state: _State, wrap: bool) -> Generator[Any, None, None]:
    if state.closed:
        return
    state.start()
    progress = state.progress
    while True:
        state.drain_events()
        state.fill()
        span = state.take()
        if span is None:
            if state.finished():
                error, state.input_error = state.input_error, None
                if error is not None:
                    # Every item pulled before the fault has had its result.
                    raise error
                if progress is not None:
                    progress.finish()
                return
            state.wait_event()
            continue
        chunk, lo, hi = span
        settle_output()  # in a kernel: what the workers printed is in the cell first
        chunk.taken = hi
        state.delivered += hi - lo
        if progress is not None:
            progress.update(hi - lo)
        if not chunk.errors:
            if wrap:
                for v in chunk.values[lo:hi]:
                    yield Ok(v)
            else:
                yield from chunk.values[lo:hi]
            continue
        for pos in range(lo, hi):
            if pos in chunk.errors:
                ex = state.exit_for(chunk, pos)
                if not wrap:
                    raise ex.reason
                yield ex
            else:
                v = chunk.values[pos]
                yield Ok(v) if wrap else v


class Stream(Iterator[Result]):
    """A one-shot iterator of ``Ok(value)`` / ``Exit(reason)``, one per input item.

    Build one with ``parstream.async_stream`` or ``Supervisor.async_stream`` /
    ``async_stream_nolink``. Nothing runs until the first ``next()``. Use it
    in a ``for`` loop, ``with`` block or ``async for``; ``close()`` (or leaving
    the ``with`` block, or dropping the stream) kills its running items.
    """

    def __init__(self, state: _State, *, wrap: bool = True) -> None:
        self._state = state
        self._gen: Generator[Any, None, None] = _run(state, wrap)

    def __iter__(self) -> Stream:
        return self

    def __next__(self) -> Result:
        return next(self._gen)  # type: ignore[no-any-return]

    def close(self) -> None:
        """Stop the stream: kill its running items and drop buffered results."""
        self._state.close()
        with contextlib.suppress(ValueError):  # running in another thread: it stops itself
            self._gen.close()

    def __enter__(self) -> Stream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self._state.close()

    def __aiter__(self) -> AsyncIterator[Result]:
        return _aiter(self)

    def __repr__(self) -> str:
        s = self._state
        return f"<Stream pulled={s.pulled} delivered={s.delivered} closed={s.closed}>"


async def _aiter(stream: Stream) -> AsyncIterator[Result]:
    """``async for``: each ``next()`` runs in a helper thread, so the loop stays free."""
    import asyncio

    loop = asyncio.get_running_loop()
    sentinel = object()

    def step() -> Any:
        return next(stream, sentinel)

    try:
        while True:
            item = await loop.run_in_executor(None, step)
            if item is sentinel:
                return
            yield item
    finally:
        stream.close()


def _pull_inline(iterable: Iterable[Any]) -> bool:
    """Whether the consumer pulls ``iterable`` itself: it cannot block, or it
    must not move threads (an sqlite3 cursor checks its thread by default)."""
    kind = type(iterable)
    return kind in _INLINE_TYPES or (kind.__module__, kind.__qualname__) == ("sqlite3", "Cursor")


def _length_hint(iterable: Iterable[Any]) -> int | None:
    try:
        return len(iterable)  # type: ignore[arg-type]
    except TypeError:
        return None
