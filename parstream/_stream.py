"""Streams: lazy, back-pressured parallel map with ordered or unordered results.

The consumer's thread does the stream's work inside ``next()``: it cuts input
into chunks (``_chunks.ChunkSizer``), submits each chunk to the backend as one
``Job``, and hands results out in input or completion order
(``_chunks.ReorderBuffer``). The backend's event thread only appends events
to the stream's queue (one per flush from a worker, not per item, stamped
with the flush's cost per item) and enforces per-item timeouts, so timers run
on while the consumer is busy. Input that may block is pulled on a feeder
thread (``_feeder``); when the input raises, the results of every item pulled
before the fault are delivered first, then the input's own exception is
raised from the stream.

Bounds (``_State.fill``): at most ``max_concurrency`` chunks run at once (a
``Gate`` in the backend; up to as many more wait queued in the backend, so a
worker that finishes one gets the next from the backend's event thread, not
a round trip through the consumer's), and
at most ``max_concurrency * chunk + buffer_size`` items are pulled but not yet
delivered, so a slow head item or a slow consumer stops the pulling instead of
growing memory. A chunk queued ahead waits for no more than ``TARGET_CHUNK_S``
of the input's measured pace (an input producing an item every 50 ms gets
chunks of 1), and the feeder rests at ``LEVEL_CHUNKS`` rounds ahead. A batch
whose items turn slow stops at the worker's time budget and its unrun rest
comes back (``on_done("returned")``), to be cut into smaller chunks for any
free worker.

Leaving early (``close()``, ``break`` then garbage collection, an exception in
the consumer, Ctrl-C) kills the stream's running chunks at once and stops the
feeder: it pulls no further item.
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import os
import queue
import sys
import threading
import weakref
from collections.abc import AsyncIterator, Callable, Generator, Iterable, Iterator
from operator import length_hint
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from parstream import _callbacks
from parstream._backend import BackendClosed, Gate, Job
from parstream._chunks import (
    DROPPED,
    INPUT,
    RESULTS,
    RETURNED,
    TARGET_CHUNK_S,
    Chunk,
    ChunkSizer,
    Event,
    ReorderBuffer,
)
from parstream._errors import SupervisorClosed, TaskTimeout
from parstream._feeder import FEED_POLL_S, NEVER, Feeder, pulls_inline
from parstream._interrupts import held, waking
from parstream._output import settle as settle_output
from parstream._progress import Progress
from parstream._results import Exit, Ok, oks

if TYPE_CHECKING:
    from types import TracebackType

    from parstream._backend import Backend, FnHandle
    from parstream._validate import Options

T = TypeVar("T")

BUFFER_CHUNKS = 4  # default buffer_size, in chunks per unit of max_concurrency
WAIT_POLL_S = 0.1  # the consumer's longest sleep: keeps Ctrl-C and close() prompt
# The feeder rests once it has buffered this many chunks per unit of
# max_concurrency: pulling further ahead would only hold the GIL from the hub.
LEVEL_CHUNKS = 2


class _State:
    """Everything a stream owns. Holds no reference to the Stream, so dropping
    the Stream object runs its finaliser at once; the backend holds only the
    chunks (the sinks), never this."""

    def __init__(
        self,
        backend: Backend,
        fn: FnHandle,
        iterable: Iterable[Any],
        options: Options,
        *,
        linked: bool,
        max_concurrency: int,
        star: bool = False,
        why_closed: Callable[[], str | None] | None = None,
    ) -> None:
        self.backend = backend
        # The owner's reason for closing (a supervisor that gave up says why).
        self.why_closed = why_closed
        self.fn = fn
        self.iterable = iterable
        self.it: Iterator[Any] | None = None
        # A list input is cut by slicing (``fill``), not through ``it``.
        self.seq: list[Any] | None = iterable if type(iterable) is list else None
        self.linked = linked
        self.options = options
        self.max_concurrency = max_concurrency
        self.ordered = options.ordered
        self.zip_input = options.zip_input_on_exit
        self.buffer_size = options.buffer_size
        self.star = star  # items are argument tuples (Supervisor.map over several iterables)
        self.progress: Progress | None = None
        # Items handed out in spans but not yet taken by the consumer (the
        # spans' current iterator, ``_Spans.unconsumed``, held weakly): the
        # bar counts spans, and a stream left early takes those back.
        # (A list, for its atomic pop: taken once.)
        self.unconsumed: list[Callable[[], Callable[[], int] | None]] = []
        self.length = _length_hint(iterable)
        self.sizer = ChunkSizer(options.chunksize, max_concurrency, self.length)
        self.events: queue.SimpleQueue[Event] = queue.SimpleQueue()
        self.results = ReorderBuffer(options.ordered)
        self.running: set[Chunk] = set()
        self.pulled = 0  # items cut into chunks
        self.delivered = 0
        self.exhausted = False
        self.input_error: BaseException | None = None  # what the input raised, once
        self.closed = False
        self.started = False
        self.reserved = 0
        self.lock = threading.Lock()  # close() may come from another thread
        self.gate = Gate(max_concurrency)
        self.feeder: Feeder | None = None
        # The span being handed out: close() empties it, so a consumer
        # iterating it stops at once.
        self.span: list[Any] = []
        self.raised_at_position: BaseException | None = None  # an item's own, by map
        # A failure the stream raises (linked, or a timeout under "exit"),
        # once the results that came before it in its flush are handed out.
        self.failing: BaseException | None = None

    def can_start(self) -> bool:
        """Whether a new chunk may be submitted now (``Executor.map``'s
        deadline says no once it has passed: ``_executor.MapState``)."""
        return True

    def ends_iteration(self, error: BaseException) -> bool:
        """Whether ``error``, once raised by ``next()``, ends the iteration
        (later calls find the end) rather than being raised again: never
        here; ``Executor.map``'s own do (``_executor.MapState``)."""
        return False

    # -- consumer side -----------------------------------------------------------

    def start(self) -> None:
        self.started = True
        # The input's length now, not when the stream was made: a stream is
        # lazy, and a list that grew meanwhile is read whole (a progress
        # total taken at the call showed 20/10).
        self.length = self.sizer.length = _length_hint(self.iterable)
        self.it = iter(self.iterable)
        extra = self.max_concurrency - self.backend.capacity
        if extra > 0:
            self.reserved = extra
            self.backend.reserve(extra)
        if self.options.progress is not False:
            with held():  # Ctrl-C once it is drawn: close() still finds it
                self.progress = Progress(self.options.progress, total=self.length)
        if not pulls_inline(self.iterable):
            self.feeder = Feeder(self.it, self.events, LEVEL_CHUNKS * self.max_concurrency)
            self.feeder.start(self.limit())

    def limit(self) -> int:
        buffer = self.buffer_size
        if buffer is None:
            buffer = BUFFER_CHUNKS * self.max_concurrency * self.sizer.chunk
        return self.max_concurrency * self.sizer.chunk + buffer

    def next_chunk_size(self) -> int:
        return self.sizer.next_size(self.pulled)

    def fill(self) -> None:
        """Pull and submit chunks while there is room."""
        if self.feeder is not None:
            self.fill_from_feeder(self.feeder)
            return
        assert self.it is not None
        while not self.exhausted and self.can_start():
            size = self.next_chunk_size()
            # Chunks queue one round ahead (the gate keeps at most
            # max_concurrency running), so a worker never waits for this thread.
            if len(self.running) >= 2 * self.max_concurrency:
                return
            if self.pulled - self.delivered + size > self.limit():
                return
            inputs: list[Any] = []
            try:
                if self.seq is not None:
                    # A list is cut by slicing, at C speed, by position as its
                    # iterator goes; a short slice ends the input, as the
                    # iterator's end would (items appended later are not run).
                    inputs = self.seq[self.pulled : self.pulled + size]
                    if len(inputs) < size:
                        self.exhausted = True
                else:
                    # extend() keeps what was pulled before a fault.
                    inputs.extend(itertools.islice(self.it, size))
            except BaseException as exc:
                self.input_error = exc
                self.exhausted = True
            if not inputs:
                self.exhausted = True
                return
            self.submit(inputs)

    def fill_from_feeder(self, feeder: Feeder) -> None:
        """Cut chunks from what the feeder has buffered; never wait for more
        while a worker could take it."""
        buf = feeder.buf
        take = buf.popleft
        # An explicit chunksize is the user's unit of work: its chunks are
        # whole (the last may be short), however slowly the input comes.
        explicit = self.options.chunksize is not None
        while True:
            ended = feeder.done  # read before the buffer: then it holds the last item
            while True:
                size = self.next_chunk_size()
                running = len(self.running)
                if running >= 2 * self.max_concurrency:  # one round queued ahead
                    need = NEVER  # a chunk's end wakes us
                    break
                avail = len(buf)
                if not avail:
                    if ended:
                        self.exhausted = True
                        self.input_error = feeder.error
                        return
                    need = size if explicit or running >= self.max_concurrency else 1
                    break
                if explicit and avail < size and not ended:
                    need = size
                    break
                if running >= self.max_concurrency and not ended:
                    # Every worker is busy: queue a chunk ahead once it is full,
                    # full meaning no more than TARGET_CHUNK_S of the input's pace.
                    gap = feeder.gap
                    enough = size if gap is None else min(size, int(TARGET_CHUNK_S / gap) + 1)
                    if avail < enough:
                        need = enough
                        break
                if not self.can_start():
                    need = NEVER  # nothing more starts: the wait for results decides
                    break
                n = min(size, avail)
                self.submit(list(itertools.starmap(take, itertools.repeat((), n))))
            level = LEVEL_CHUNKS * self.max_concurrency * self.next_chunk_size()
            feeder.set_bounds(self.delivered + self.limit(), level)
            feeder.need = need
            feeder.signalled = False
            # The feeder may have appended after we looked, seeing the old flag.
            if len(buf) < need and feeder.done == ended:
                return

    def submit(
        self, inputs: list[Any], *, start: int | None = None, after: Chunk | None = None
    ) -> Chunk:
        """Submit ``inputs`` as a chunk: the next of the input, or (``start``,
        ``after``) a piece of a returned chunk, placed right after ``after``."""
        if start is None:
            start = self.pulled
            self.pulled += len(inputs)
        chunk = Chunk(start, inputs, self.events)
        job = Job(
            self.fn,
            inputs if self.zip_input is False else list(inputs),
            chunk,
            star=self.star,
            timeout=self.options.timeout,
            gate=self.gate,
            first_index=chunk.start,
            # An explicit chunksize is the user's unit of work: each chunk runs
            # whole on one worker (the standard library's contract). Adaptive
            # chunks come back at the worker's time budget, to be re-cut.
            returnable=self.options.chunksize is None,
            node=self.options.node,
        )
        chunk.job = job
        with self.lock:
            if self.closed:
                raise _Closed
            self.running.add(chunk)
        self.results.submitted(chunk, after=after)
        try:
            self.backend.submit(job)
        except BackendClosed as exc:
            raise SupervisorClosed(str(exc)) from None
        if self.closed:  # closed from another thread while we submitted
            self.backend.kill(job, None)
        return chunk

    def apply(self, event: Event) -> None:
        if self.failing is not None:
            # The stream ends with that failure: nothing after it counts (a
            # chunk's end would let the results of later chunks pass it).
            return
        kind, chunk, values, errors, cost = event
        if kind == RESULTS:
            self.sizer.learn(cost)
            if errors:
                cut = self.check_failures(errors)
                if cut is not None:
                    # What finished before the failure in this flush is
                    # handed out first (in-process, one flush is the whole
                    # batch); the failure then ends the stream.
                    values = values[:cut]
                    errors = {i: e for i, e in errors.items() if i < cut}
                base = len(chunk.values)
                for i, e in errors.items():
                    chunk.errors[base + i] = e
            before = len(chunk.values)
            if before:
                chunk.values.extend(values)
            else:
                chunk.values = values  # the sink's own list (see Sink.on_results)
            self.results.arrived(chunk, before)
            return
        if kind == INPUT:
            return  # the loop around us fills
        if kind == RETURNED:
            self.split_returned(chunk)
        elif chunk.closed_under and not self.closed:
            why = self.why_closed() if self.why_closed is not None else None
            raise SupervisorClosed(
                f"{why} (while this stream was running)"
                if why
                else "the supervisor was closed while this stream was running"
            )
        chunk.done = True
        self.running.discard(chunk)
        if chunk.job is not None:
            # Break chunk <-> job: a cycle would keep the chunk's lists
            # alive until a full garbage collection.
            chunk.job = None
        self.results.ended(chunk)

    def split_returned(self, chunk: Chunk) -> None:
        """Cut the unrun rest of ``chunk`` into chunks of the size its items now
        need, placed right after it, so every free worker can take some."""
        if self.closed or not chunk.unrun or not self.can_start():
            return
        ran = len(chunk.inputs) - chunk.unrun
        rest = chunk.inputs[ran:]
        chunk.inputs = chunk.inputs[:ran]
        share = -(-len(rest) // self.max_concurrency)
        size = max(1, min(self.next_chunk_size(), share))
        start = chunk.start + ran
        after = chunk
        for lo in range(0, len(rest), size):
            after = self.submit(rest[lo : lo + size], start=start + lo, after=after)

    def check_failures(self, errors: dict[int, BaseException]) -> int | None:
        """Linked streams raise a failure as soon as it comes; so does any
        timeout under 'exit'. The first such in a flush becomes ``failing``;
        returns its position in the flush, or None."""
        for i in sorted(errors):
            exc = errors[i]
            if isinstance(exc, TaskTimeout):
                if self.options.on_timeout == "exit":
                    self.failing = exc
                    return i
            elif self.linked:
                self.failing = exc
                return i
        return None

    def wait_event(self) -> None:
        # A bounded wait keeps Ctrl-C prompt on every platform, and notices a
        # close() from another thread (an ``async for`` being cancelled).
        if self.closed:
            raise _Closed
        if self.backend.forked:  # the parent's workers: nothing will ever come here
            raise SupervisorClosed(self.backend.usable() or "the supervisor is closed")
        feeder = self.feeder
        busy = feeder is not None and feeder.feeding and feeder.need != NEVER
        try:
            event = self.events.get(timeout=FEED_POLL_S if busy else WAIT_POLL_S)
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

    def finished(self) -> bool:
        return self.exhausted and not self.running and self.results.take() is None

    def close(self) -> None:
        with self.lock:
            if self.closed:
                return
            self.closed = True
            running = list(self.running)
        if self.feeder is not None:
            self.feeder.stop()
        # Chunks still queued in the backend first: killing a running one
        # frees its worker, which would otherwise start a queued chunk
        # before its own kill came (Ctrl-C must start nothing new).
        running.sort(key=lambda chunk: chunk.started_at > 0)
        for chunk in running:
            chunk.events = DROPPED  # their ends are no one's concern now
        with held() if running else contextlib.nullcontext():  # a second Ctrl-C waits
            for chunk in running:
                job = chunk.job
                if job is not None:
                    self.backend.kill(job, None)
                    chunk.job = None
        self.running.clear()
        self.results.clear()
        self.take_back_unconsumed()  # before the span it reads is cleared
        self.span.clear()
        if self.reserved:
            self.backend.release(self.reserved)
            self.reserved = 0
        if self.progress is not None:
            self.progress.close()

    def take_back_unconsumed(self) -> None:
        """Once, as the stream closes: the bar counted whole spans as they
        were handed out; what the loop never took (a ``break``) comes off."""
        try:
            link = self.unconsumed.pop()  # once: a close and the spans' finaliser may race
        except IndexError:
            return
        count = link()
        left = count() if count is not None else 0
        if left and self.progress is not None:
            with contextlib.suppress(Exception):  # a user's bar: never in the close's way
                self.progress.update(-left)

    def release(self) -> None:
        """Let go of the function and the input once the stream's generator
        has ended (it alone uses them): a Stream kept after its end, or an
        exception raised from it (whose traceback holds this state through
        the generator's frames), must not keep them alive."""
        self.fn = None  # type: ignore[assignment]
        self.iterable = ()
        self.seq = None
        self.it = None
        # Events nobody will read, each holding its chunk and its inputs
        # (the chunks still running at the close post nothing more).
        with contextlib.suppress(queue.Empty):
            while True:
                self.events.get_nowait()

    def exit_for(self, chunk: Chunk, pos: int) -> Exit:
        exc = chunk.errors[pos]
        if self.zip_input:
            return Exit(exc, chunk.inputs[pos])
        return Exit(exc)


class _Closed(Exception):
    """The stream was closed from another thread while its generator waited."""


def _park_at_exit() -> None:
    """A stream closed under its reader at interpreter exit: a daemon thread
    blocks for good (``_callbacks.park_if_exiting``); parstream's callback
    thread, which exit waits for, gets ``SupervisorClosed``, as the stdlib's
    executors refuse work at exit."""
    if not _callbacks.is_exiting():
        return
    _callbacks.park_if_exiting()
    raise SupervisorClosed("the interpreter is exiting (while this stream was running)") from None


def run_stream(state: _State, wrap: bool) -> Generator[list[Any], None, None]:
    """The stream's generator of *spans*: lists of consecutive results, as
    Ok/Exit (``wrap``) or plain values. A caller iterates the items with
    ``itertools.chain.from_iterable``, at C speed: no generator frame is
    resumed per item, only per span."""
    try:
        yield from _produce(state, wrap)
        if state.closed:  # from another thread: an end in name only
            _park_at_exit()
    except _Closed:
        _park_at_exit()
        return
    except BaseException as exc:
        if isinstance(exc, SupervisorClosed):
            _park_at_exit()
        # The caller may keep the error (``except E as e``, a notebook's last
        # error), and its traceback the frames it passed through here, whose
        # locals hold chunks and their inputs: those frames let go of them.
        _clear_own_frames(exc.__traceback__)
        raise
    finally:
        state.close()
        state.release()


def _close(state: _State, spans: Generator[list[Any], None, None]) -> None:
    """``close()`` of a ``Stream`` and of ``map``'s values. From another thread
    (an ``async for`` being cancelled) the generator is running there and
    cannot be closed here: closing the state kills the items, and that thread
    stops itself. A generator never started has no ``finally`` to release
    the state, so this does."""
    state.close()
    with contextlib.suppress(ValueError):  # running in another thread
        spans.close()
        state.release()


_OWN = os.path.dirname(os.path.abspath(__file__)) + os.sep  # parstream's own files


def _clear_own_frames(tb: TracebackType | None) -> None:
    """Clear the locals of parstream's finished frames in ``tb``; the user's
    own frames (a task run in-process, an input generator) keep theirs."""
    while tb is not None:
        frame = tb.tb_frame
        if frame.f_code.co_filename.startswith(_OWN):
            with contextlib.suppress(RuntimeError):  # still running (this one)
                frame.clear()
        tb = tb.tb_next


def _produce(state: _State, wrap: bool) -> Generator[list[Any], None, None]:
    if state.closed:
        return
    state.start()
    progress = state.progress
    results = state.results
    while True:
        state.drain_events()
        if state.failing is None:
            state.fill()
        span = results.take()
        if span is None:
            if state.failing is not None:
                # Nothing more to hand out before it: not waiting for
                # earlier items still running (README: "first to arrive").
                raise state.failing
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
            end = hi
            if chunk.errors and not wrap:
                # Values are delivered up to a failure, which is then raised:
                # the bar counts those, as a bar around a for loop would.
                end = min((p for p in chunk.errors if lo <= p < hi), default=hi)
            progress.update(end - lo)
        if not chunk.errors:
            # A finished chunk handed out whole is not copied: nothing adds
            # to its list any more.
            whole = lo == 0 and chunk.done and hi == len(chunk.values)
            out = chunk.values if whole else chunk.values[lo:hi]
            state.span = out = oks(out) if wrap else out
            yield out
            continue
        out = state.span = []
        for pos in range(lo, hi):
            if pos in chunk.errors:
                ex = state.exit_for(chunk, pos)
                if not wrap:
                    if out:
                        yield out  # the values before the failure, then the failure
                    state.raised_at_position = ex.reason
                    raise ex.reason
                out.append(ex)
            else:
                v = chunk.values[pos]
                out.append(Ok(v) if wrap else v)
        yield out


class _Spans:
    """A stream's spans for any number of consuming threads.

    Each thread iterates its own ``itertools.chain.from_iterable`` over this
    one source (``_Chains``): a chain is not safe to share between threads
    while its source blocks (two threads fetching at once overwrite each
    other's span, and a failed fetch ends the chain for everyone, silently).
    Every chain takes its items from the same current span iterator first, so
    a stream handed from thread to thread (``async for`` runs each ``next()``
    in some helper thread) goes on in order, and threads iterating at once
    share the items: each exactly once, none lost. One thread at a time runs
    the generator; the others wait for it, then take from what it fetched.

    A stream that failed (a linked failure, its supervisor closed, its input
    raised, even ``SystemExit`` from a task or Ctrl-C) raises that error to
    every ``next()`` after, in any thread: a generator that raised only
    ends, and the other threads would have seen a clean end with their
    items missing. (Raised again with its first traceback: raising one
    object again and again grew it by a few frames a time.) Except where
    ``ends(error)`` says the error ends the iteration, as
    ``Executor.map``'s does: an item's own exception raised at its position,
    the deadline; then later calls find the end, as the standard library's
    generator's do (a loop skipping failed items would never end).
    """

    __slots__ = (
        "__weakref__",
        "_current",
        "_ends",
        "_fetcher",
        "_gen",
        "_lock",
        "_state",
        "_tb",
        "ended",
        "failure",
    )

    def __init__(
        self,
        gen: Generator[list[Any], None, None],
        ends: Callable[[BaseException], bool] | None = None,
        state: _State | None = None,
    ) -> None:
        self._gen = gen
        self._current: Iterator[Any] = iter(())
        self._lock = threading.Lock()
        self._ends = ends
        self._state = state  # (whose feeder thread must not wait on this stream)
        if state is not None:
            state.unconsumed[:] = [weakref.WeakMethod(self.unconsumed)]
        self._fetcher: int | None = None  # the thread running the generator
        self.failure: BaseException | None = None
        self._tb: TracebackType | None = None
        self.ended = False
        _all_spans.add(self)

    def _inherited(self) -> None:
        """In a child made by ``os.fork()``: the results fetched are the
        parent's to hand out. The chains take items from the current span
        without asking, so it is emptied here, and every next() after raises."""
        self._lock = threading.Lock()  # another thread may have held it at the fork
        collections.deque(self._current, 0)
        self.failure = SupervisorClosed(
            "this stream reached this process through os.fork(); its items and "
            "workers belong to the parent process. Start a new stream in the child"
        )

    def unconsumed(self) -> int:
        """Items of the current span no consumer has taken yet."""
        return length_hint(self._current)

    def __del__(self) -> None:
        # Dropped (a ``break`` out of ``for x in parstream.map(...)``): the
        # stream closes after this, once its generator is let go, when the
        # weak link to here is already gone; the bar is set right now.
        state = self._state
        if state is not None and state.progress is not None and not state.closed:
            with contextlib.suppress(Exception):
                state.take_back_unconsumed()

    def __iter__(self) -> _Spans:
        return self

    def __next__(self) -> Iterator[Any]:
        current = self._current
        if length_hint(current):
            return current
        me = threading.get_ident()
        feeder = self._state.feeder if self._state is not None else None
        if self._fetcher == me or (
            # (the thread itself: a finished feeder's id may be a new thread's)
            feeder is not None and feeder.thread is threading.current_thread()
        ):
            # The stream's own input iterates it (on the consumer's thread, or
            # on the feeder's): it would wait for itself for ever. Raised in
            # the input, it ends the stream as the input's error, as a
            # generator that runs itself gets "generator already executing".
            raise ValueError("a stream's input iterated the stream itself")
        with self._lock:
            current = self._current
            if length_hint(current):  # fetched by another thread meanwhile
                return current
            if self.failure is not None:
                if self.ended:
                    raise StopIteration
                raise self.failure.with_traceback(self._tb)
            self._fetcher = me
            try:
                span = next(self._gen)
            except StopIteration:
                raise
            except BaseException as exc:  # a task's GeneratorExit too: the stream failed
                self.failure, self._tb = exc, exc.__traceback__
                self.ended = self._ends is not None and self._ends(exc)
                raise
            finally:
                self._fetcher = None
            current = self._current = iter(span)
            return current


_all_spans: weakref.WeakSet[_Spans] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for spans in list(_all_spans):
        spans._inherited()
    _all_spans.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


class _Chains(threading.local):
    """The calling thread's chain of items over a stream's ``_Spans``."""

    def __init__(self, spans: _Spans) -> None:
        self.spans = spans
        self.items = itertools.chain.from_iterable(spans)

    def live(self) -> Iterator[Any]:
        """This thread's chain; a new one once the stream failed: a chain
        whose source raised is spent, and would end as if all was well."""
        if self.spans.failure is not None:
            self.items = itertools.chain.from_iterable(self.spans)
        return self.items

    def next(self) -> Any:
        try:
            return next(self.items)
        except StopIteration:
            return next(self.live())  # the end, or the stream's failure again


class Stream(Iterator["Ok[T] | Exit"], Generic[T]):
    """A one-shot iterator of ``Ok(value)`` / ``Exit(reason)``, one per input item.

    Build one with ``parstream.async_stream`` or ``Supervisor.async_stream`` /
    ``async_stream_nolink``. Nothing runs until the first ``next()``. Use it
    in a ``for`` loop, ``with`` block or ``async for``; ``close()`` (or leaving
    the ``with`` block, or dropping the stream) kills its running items.
    """

    def __init__(self, state: _State, owner: object = None) -> None:
        self._state = state
        # The generator holds the Supervisor (and its workers) alive until the
        # stream ends, fails or is closed: not for as long as this object.
        self._spans = _spans_of(state, owner, records=True)
        self._chains = _Chains(_Spans(self._spans, state=state))

    def __iter__(self) -> Iterator[Ok[T] | Exit]:
        # The items at C speed: no Python-level __next__ per item. The empty
        # repeat() holds the Stream while the loop runs (dropping it would
        # close the stream); leaving the loop early closes nothing: the
        # stream can be iterated on later, and closes when dropped.
        keep: Iterator[Any] = itertools.repeat(self, 0)
        return itertools.chain(self._chains.live(), keep)

    def __next__(self) -> Ok[T] | Exit:
        return self._chains.next()  # type: ignore[no-any-return]

    def close(self) -> None:
        """Stop the stream: kill its running items and drop buffered results."""
        _close(self._state, self._spans)

    def __enter__(self) -> Stream[T]:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self._state.close()

    @property
    def max_concurrency(self) -> int:
        """Items (or chunks) running at once at most: the ``max_concurrency``
        given, else the supervisor's size (a node's CPUs with ``node=``)."""
        return self._state.max_concurrency

    @property
    def chunksize(self) -> int:
        """Items per message to a worker now: the fixed ``chunksize``, or the
        automatic size learnt so far from the measured cost per item."""
        return self._state.sizer.chunk

    def __reduce__(self) -> Any:
        raise _not_sent()

    def __copy__(self) -> Any:
        return self  # one stream, as before: copy.copy gave an alias of its state

    def __aiter__(self) -> AsyncIterator[Ok[T] | Exit]:
        return _aiter(self)

    def __repr__(self) -> str:
        s = self._state
        return f"<Stream pulled={s.pulled} delivered={s.delivered} closed={s.closed}>"


def _not_sent() -> TypeError:
    return TypeError(
        "a parstream stream belongs to the process that made it and cannot be sent "
        "to another one: pass its items (list(stream)), or the iterable and make "
        "the stream there"
    )


def values(state: _State, owner: object) -> _Values[Any]:
    """The plain values of a stream (``map``), raising the first failure.

    The items at C speed, a span at a time (see ``run_stream``): a
    Python-level step per item would cost more than a tiny item's own work.
    Holds ``owner`` (the Supervisor), whose workers the stream needs, while
    alive."""
    return _Values(_spans_of(state, owner), state)


class _Values(Iterator[T]):
    """``map``'s iterator: a for loop (or ``list``) gets the chain of spans
    itself, so no Python-level ``__next__`` runs per item; ``next()`` takes
    from the same chain. ``close()`` stops the stream, as a generator's would;
    ``with`` and ``async for`` work as on a ``Stream``.
    """

    __slots__ = ("_chains", "_spans", "_state")

    def __init__(self, spans: Generator[list[Any], None, None], state: _State) -> None:
        self._spans = spans
        self._state = state
        self._chains = _Chains(_Spans(spans, state.ends_iteration, state))

    def __iter__(self) -> Iterator[T]:
        return self._chains.live()

    def __next__(self) -> T:
        return self._chains.next()  # type: ignore[no-any-return]

    def close(self) -> None:
        """Stop the stream: kill its running items and drop buffered results."""
        _close(self._state, self._spans)

    def __enter__(self) -> _Values[T]:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __reduce__(self) -> Any:
        raise _not_sent()

    def __copy__(self) -> Any:
        return self  # one stream, as before: copy.copy gave an alias of its state

    def __aiter__(self) -> AsyncIterator[T]:
        return _aiter(self)


def _spans_of(
    state: _State, owner: object, *, records: bool = False
) -> Generator[list[Any], None, None]:
    """``run_stream``'s spans, holding ``owner`` until they end."""
    gen = run_stream(state, records)
    try:
        yield from gen
    finally:
        gen.close()
        state.close()
        del owner


def _aiter(stream: Stream[Any] | _Values[Any]) -> AsyncIterator[Any]:
    """``async for``: each ``next()`` runs in a helper thread of this loop's
    own (``_Stepper``), so the event loop stays free, and so does asyncio's
    default executor, which many waiting streams would otherwise fill."""
    return _AsyncSteps(stream)


class _AsyncSteps:
    """The async iterator ``async for`` gets: a plain object, not an async
    generator. Leaving the loop drops it at once, in the task that ran the
    loop, so ``__del__`` can tell a ``break`` (closes nothing: the stream
    can be iterated on later, as after a for loop's) from a cancellation in
    the loop's body (``task.cancelling()``: it closes the stream, which stops
    its items). An async generator is finalised later, by a task of its own
    that asyncio schedules: by then ``asyncio.timeout`` or a ``TaskGroup``
    had uncancelled the task, so their cancellation passed for a break, and
    ``asyncio.run`` ending cancelled that task, so a break passed for a
    cancellation and closed a held stream. A loop closed with the iteration
    unfinished drops it too, and its helper thread ends."""

    __slots__ = ("_stepper", "_stream", "_task")

    def __init__(self, stream: Stream[Any] | _Values[Any]) -> None:
        self._stream = stream
        self._stepper = _Stepper(stream)
        self._task: Any = None

    def __aiter__(self) -> _AsyncSteps:
        return self

    async def __anext__(self) -> Any:
        import asyncio

        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        # Weakly: the task holds its coroutine, which holds this object.
        self._task = None if task is None else weakref.ref(task)
        try:
            item = await waking(self._stepper.step(loop))
        except BaseException:
            # Cancelled while the helper thread waits in next(), which holds
            # the stream: closing it is what stops the items running. (Or
            # the stream failed: it is closed already.)
            self._stream.close()
            self._stepper.stop()
            raise
        if item is _Stepper.END:
            self._stepper.stop()
            raise StopAsyncIteration
        return item

    def __del__(self) -> None:
        self._stepper.stop()
        task = self._task() if self._task is not None else None
        asyncio = sys.modules.get("asyncio")
        if task is None or asyncio is None:
            return
        try:
            current = asyncio.current_task()
        except RuntimeError:  # no loop runs here: dropped by a collection, a closed loop
            return
        if current is task and task.cancelling():
            self._stream.close()


class _Stepper:
    """One daemon thread that runs an async iteration's ``next()`` calls, one
    at a time, handing each outcome to the loop's future. A daemon: it never
    holds up the interpreter's exit, nor ``asyncio.run``'s end."""

    END: Any = object()

    def __init__(self, stream: Iterator[Any]) -> None:
        self._stream = stream
        self._requests: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None

    def step(self, loop: Any) -> Any:
        future = loop.create_future()
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._run, args=(self._requests,), name="parstream-async-for", daemon=True
            )
            self._thread.start()
        self._requests.put((loop, future))
        return future

    def stop(self) -> None:
        """End the helper thread (once it has served what was asked); a
        later ``step`` starts another, with a queue of its own."""
        if self._thread is not None:
            self._requests.put(None)
            self._requests = queue.SimpleQueue()
            self._thread = None

    def _run(self, requests: queue.SimpleQueue[Any]) -> None:
        while True:
            request = requests.get()
            if request is None:
                return
            loop, future = request
            try:
                outcome: tuple[Any, Any] = (_settle_value, next(self._stream, self.END))
            except BaseException as exc:
                outcome = (_settle_error, exc)
            try:
                loop.call_soon_threadsafe(outcome[0], future, outcome[1])
            except RuntimeError:  # the loop is closed: nobody waits any more
                pass
            del request, loop, future, outcome


def _settle_value(future: Any, value: Any) -> None:
    if not future.done():
        future.set_result(value)


def _settle_error(future: Any, exc: BaseException) -> None:
    if not future.done():
        future.set_exception(exc)


def _length_hint(iterable: Iterable[Any]) -> int | None:
    """``len(iterable)`` as a hint (a progress total, the first chunk's size):
    None where it has none, or its ``__len__`` raises or lies out of range;
    a for loop never asks, so neither may a failing one stop the run."""
    try:
        return len(iterable)  # type: ignore[arg-type]
    except Exception:
        return None
