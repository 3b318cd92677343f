"""Streams: lazy, back-pressured parallel map with ordered or unordered results.

The consumer's thread does all the stream's work inside ``next()``: it pulls
input, cuts it into chunks, submits each chunk to the pool as one ``Job``, and
hands results out in input or completion order. The pool's hub thread only
appends ``(chunk, values, errors)`` events to the stream's queue (one event per
flush from a worker, not per item) and enforces per-item timeouts, so timers
run on while the consumer is busy.

Bounds (``_State.fill``): at most ``max_concurrency`` chunks run at once (a
``Gate`` in the pool; batched chunks may wait queued one round ahead), and
at most ``max_concurrency * chunk + buffer_size`` items are pulled but not yet
delivered, so a slow head item or a slow consumer stops the pulling instead of
growing memory. With ``chunksize=None`` the chunk size adapts to the measured
cost per item: 1 while items are slow (exactly Elixir's behaviour), growing
for tiny items until a chunk takes about ``TARGET_CHUNK_S``.

Leaving early (``close()``, ``break`` then garbage collection, an exception in
the consumer, Ctrl-C) kills the stream's running chunks at once.
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import queue
import threading
from collections.abc import AsyncIterator, Callable, Generator, Iterable, Iterator
from typing import TYPE_CHECKING, Any, Literal

from parstream import _wire
from parstream._errors import SupervisorClosed, TaskTimeout
from parstream._functions import ship
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

OnTimeout = Literal["exit", "kill_task"]


class _Chunk:
    __slots__ = ("done", "errors", "inputs", "job", "start", "taken", "values")

    def __init__(self, start: int, inputs: list[Any]) -> None:
        self.start = start
        self.inputs = inputs
        self.values: list[Any] = []
        self.errors: _wire.Errors = {}
        self.taken = 0  # results handed out
        self.done = False
        self.job: Job | None = None


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
        self.events: queue.SimpleQueue[tuple[_Chunk, list[Any] | None, _wire.Errors]] = (
            queue.SimpleQueue()
        )
        self.pending: collections.deque[_Chunk] = collections.deque()  # ordered: by start
        self.ready: collections.deque[_Chunk] = collections.deque()  # unordered: with results
        self.running: set[_Chunk] = set()
        self.pulled = 0
        self.delivered = 0
        self.exhausted = False
        self.closed = False
        self.started = False
        self.reserved = 0
        self.length = _length_hint(iterable)
        self.item_cost: float | None = None  # measured seconds per item, chunk overhead included
        self.lock = threading.Lock()  # close() may come from another thread
        self.gate = Gate(max_concurrency)
        self.star = False  # items are argument tuples (Supervisor.map over several iterables)

    # -- sink (hub thread) -----------------------------------------------------

    def on_results(self, job: Job, values: list[Any], errors: _wire.Errors) -> None:
        if job.tag is not None:
            self.events.put((job.tag, values, errors))

    def on_job_done(self, job: Job) -> None:
        if job.tag is not None:
            self.events.put((job.tag, None, {}))

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
            inputs = list(itertools.islice(self.it, size))
            if not inputs:
                self.exhausted = True
                return
            chunk = _Chunk(self.pulled, inputs)
            self.pulled += len(inputs)
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
                if self.ordered:
                    self.pending.append(chunk)
                self.pool.submit(job)

    def apply(self, event: tuple[_Chunk, list[Any] | None, _wire.Errors]) -> None:
        chunk, values, errors = event
        if values is None:
            if len(chunk.values) < len(chunk.inputs) and not self.closed:
                # Killed by someone else: its supervisor closed under us.
                raise SupervisorClosed("the supervisor was closed while this stream was running")
            chunk.done = True
            self.running.discard(chunk)
            if chunk.job is not None:
                self.learn(chunk.job)
                # Break chunk <-> job: a cycle would keep the chunk's lists
                # alive until a full garbage collection.
                chunk.job.tag = None
                chunk.job = None
            if not self.ordered and chunk.taken >= len(chunk.values) and chunk in self.ready:
                self.ready.remove(chunk)
            return
        if errors:
            self.check_failures(chunk, errors)
            base = len(chunk.values)
            for i, e in errors.items():
                chunk.errors[base + i] = e
        had = chunk.taken < len(chunk.values)
        chunk.values.extend(values)
        if not self.ordered and not had and values:
            self.ready.append(chunk)

    def check_failures(self, chunk: _Chunk, errors: _wire.Errors) -> None:
        """Linked streams raise a failure at once; so does any timeout under 'exit'."""
        for i in sorted(errors):
            exc = _wire.rebuild_error(errors[i])
            if isinstance(exc, TaskTimeout):
                if self.on_timeout == "exit":
                    raise exc
            elif self.linked:
                raise exc

    def learn(self, job: Job) -> None:
        """Adapt the automatic chunk size to the measured cost of an item."""
        if self.fixed_chunk is not None or not job.items or job.busy_time <= 0:
            return
        cost = job.busy_time / len(job.items)
        self.item_cost = cost if self.item_cost is None else (self.item_cost + cost) / 2
        want = int(TARGET_CHUNK_S / max(self.item_cost, 1e-9))
        self.chunk = max(1, min(want, self.chunk * GROWTH, MAX_CHUNK))

    def wait_event(self) -> None:
        # A bounded wait keeps Ctrl-C prompt on every platform, and notices a
        # close() from another thread (an ``async for`` being cancelled).
        while True:
            if self.closed:
                raise _Closed
            try:
                event = self.events.get(timeout=0.1)
                break
            except queue.Empty:
                continue
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
        for chunk in running:
            job = chunk.job
            if job is not None:
                self.pool.kill(job, None)
                job.tag = None
                chunk.job = None
        self.running.clear()
        self.pending.clear()
        self.ready.clear()
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
                if progress is not None:
                    progress.finish()
                return
            state.wait_event()
            continue
        chunk, lo, hi = span
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


def _length_hint(iterable: Iterable[Any]) -> int | None:
    try:
        return len(iterable)  # type: ignore[arg-type]
    except TypeError:
        return None
