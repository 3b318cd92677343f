"""The worker process: the child loop, and nothing else.

It imports no parent-side code (only ``_wire``, the shared message format), so a
worker starts fast and cannot deadlock on parent state.

Data flow, one duplex pipe per worker, one batch running at a time (the
parent may have sent the next one behind it: the worker reads it when done)::

    parent --RUN[seq](key, fn_bytes?, count, items_bytes, ...)----> worker
              worker: slot.SEQ = seq; load fn (FORGET key if that fails;
                      LOADED if timed); unpickle items (BAD_BATCH if not)
    worker --RESULTS(count, done, t_next, values, errors)---------> parent
              per item: slot.BEGUN += 1 before it; its result journaled
              in the slot after it, between flushes (see ``_slot``)
    worker --RELEASED([block_id, ...])-----------------------------> parent
              after a batch: the arena blocks nothing here views any more
    parent --FREED([block_id, ...])--------------------------------> worker
              between batches: result blocks the parent no longer maps

Large buffers (numpy arrays) travel beside the pipe, in shared memory whose
descriptor comes over the descriptor channel just before the message that
announces it (``_shm``): a batch's arguments in a block of the parent's
arena, mapped here copy-on-write; a flush's results in a memfd of this
worker's ``_shm.Outgoing``, written again once the parent says ``FREED``.

The worker runs a batch's items in order. Results go back in flushes: after
every item when ``report_each`` is set (streams with a per-item timeout, so the
parent always knows which item is running and since when), otherwise when
``FLUSH_INTERVAL_S`` has passed or the batch ends. ``t_next`` is the worker's
``time.monotonic()`` at the flush, i.e. the start of the next item: the clock is
system-wide, so the parent can compare it with its own.

Log records of any level at or above the parent's root level are forwarded
to the parent (``LOG`` messages) with the position of the running item.

Safety: SIGINT is ignored (the parent decides what an interrupt kills), the
worker dies with its parent (``PR_SET_PDEATHSIG`` on Linux plus a parent-pid
watch everywhere), and output is
not stranded in a buffer when the worker is killed: the worker's stdout and
stderr are line-buffered (``_whole_lines``: each line one write, so lines
from two workers never merge) and flushed before every flush of results.
Only a line not yet ended when the worker is killed is lost.

The worker leads a process group of its own, which every process a task
starts inherits, so killing the group kills what the task started (``_reaper``).
"""

from __future__ import annotations

import _pickle as pickle  # the C module: the pure one imports re (a worker start; issue 12)
import os
import sys
import threading
import time
from itertools import islice

from parstream._backends import _codec
from parstream._backends._codec import failure as _failure
from parstream._backends.local import _wire
from parstream._backends.local._slot import (
    BEGUN,
    EXACT,
    J_COUNT,
    JOURNAL_MIN_ITEM_S,
    SEQ,
    STARTED,
    WINDOW,
    Slot,
)

TYPE_CHECKING = False  # see parstream/__init__.py
if TYPE_CHECKING:
    import signal
    from collections.abc import Callable
    from typing import Any
else:
    import _signal as signal  # the C module: ``signal`` imports enum (~2 ms of a worker start)

# A flush per item costs a message per item; a long interval delays results.
FLUSH_INTERVAL_S = 0.02
PARENT_POLL_S = 0.25
# A batch that has run this long with items left stops and sends them back
# unrun (``done`` with fewer results than items), so the parent can spread
# items that turned slow over free workers; shorter costs more round trips.
# About 3x the stream's chunk target (issue 8, item 10).
BATCH_BUDGET_S = 0.06
TINY_STEP = 32  # tiny items run from C this many at a time; a crash is placed within one step
# An item running this long past the last flush: the ticker sends what its
# batch-mates finished before it (``_Live``), not held back until it ends.
EARLY_AFTER_S = 2 * FLUSH_INTERVAL_S


class _Live:
    """A running batch's results since its last flush, for the ticker thread:
    the main loop's own list and dict (they grow as items finish; an error
    is set before its item's place is appended), the first one's position
    in the batch, the batch's number, when the flush was, and how many of
    them the ticker has sent early. Replaced at every flush."""

    __slots__ = ("base", "batch", "errors", "given_up", "sent", "since", "values")

    def __init__(
        self, values: list[Any], errors: _wire.Errors, base: int, batch: int, since: float
    ) -> None:
        self.values = values
        self.errors = errors
        self.base = base
        self.batch = batch
        self.since = since
        self.sent = 0
        self.given_up = False  # a result could not go early: none of this record does


def _die_with_parent(parent_pid: int) -> None:
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            pr_set_pdeathsig = 1
            libc.prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0)
        except Exception:  # pragma: no cover - prctl missing
            pass
    if os.getppid() != parent_pid:
        os._exit(70)

    def watch() -> None:
        while True:
            time.sleep(PARENT_POLL_S)
            if os.getppid() != parent_pid:
                os._exit(70)

    threading.Thread(target=watch, name="parstream-parent-watch", daemon=True).start()


# Set in a process that a task forked (``os.register_at_fork``), which goes
# on from the fork inside the task. Should the task return there, that process
# must not carry on as a second worker on the same pipe and slot (its result
# credited to another item, the batch's later items run twice): it exits as
# the task returns (``_leave_forked_child``), as multiprocessing's fork
# children do when their target returns.
_FORKED = [False]


def _forked_by_a_task() -> None:
    _FORKED[0] = True


def _leave_forked_child() -> None:
    _flush_std()
    os._exit(0)


def _whole_lines() -> None:
    """Line-buffer stdout and stderr, whatever ``PYTHONUNBUFFERED`` says: a
    line is written whole, in one write (unbuffered, ``print`` writes the
    text and the newline apart, and two workers' lines merged), and is out
    at once. Nothing is set in the environment: tasks and what they start
    see the parent's."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.reconfigure(line_buffering=True, write_through=False)  # type: ignore[union-attr]
        except Exception:
            pass  # None, or not a TextIOWrapper: left as it is


def _flush_std() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            if stream is not None:
                stream.flush()
        except Exception:
            pass


_Forward: Any = None  # the handler class, made once logging is imported


def _forward_handler(runner: _Runner) -> Any:
    """A ``logging.Handler`` shipping records to the parent, tagged with the
    item being run (its class made on first use: see ``_WhenImported``)."""
    global _Forward
    if _Forward is None:
        import logging

        class Forward(logging.Handler):
            def __init__(self, runner: _Runner) -> None:
                super().__init__()
                self.runner = runner

            def emit(self, record: logging.LogRecord) -> None:
                try:
                    text = record.getMessage()
                    if record.exc_info:
                        import traceback

                        text += "\n" + "".join(traceback.format_exception(*record.exc_info))
                    payload = (record.name, record.levelno, text, self.runner.running_index())
                    self.runner.send(_wire.encode(_wire.LOG, payload))
                except Exception:
                    self.handleError(record)

        _Forward = Forward
    return _Forward(runner)


class _WhenImported:
    """A one-shot ``sys.meta_path`` entry that calls ``then()`` as soon as
    anything imports ``module``, right after the module has run.

    A worker starts without ``logging`` (~5 ms of every worker's start, issue
    12), yet its log forwarding is in place before any code can log: a task's
    module importing logging at its top, a task importing it while it runs,
    a library doing so lazily.
    """

    def __init__(self, module: str, then: Callable[[], None]) -> None:
        self.module = module
        self.then = then

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> Any:
        if name != self.module:
            return None
        for finder in list(sys.meta_path):
            find = getattr(finder, "find_spec", None)
            if finder is self or find is None:
                continue
            spec = find(name, path, target)
            if spec is not None:
                break
        else:
            return None
        loader = spec.loader
        run = getattr(loader, "exec_module", None)
        if run is None:  # pragma: no cover - a legacy loader: run_batch looks
            return spec
        own = "exec_module" in getattr(loader, "__dict__", ())

        def exec_then(module: Any) -> None:
            # One shot, and only once the module has run: a find_spec that
            # imports nothing (importlib.util.find_spec) leaves the hook in
            # place. The loader gets its own method back first.
            try:
                if own:
                    loader.exec_module = run
                else:
                    del loader.exec_module
            except AttributeError:  # pragma: no cover
                pass
            run(module)
            self.fire()

        try:
            loader.exec_module = exec_then
        except AttributeError:  # pragma: no cover - a slotted loader: run_batch looks
            pass
        return spec

    def fire(self) -> None:
        try:
            sys.meta_path.remove(self)
        except ValueError:  # fired already
            return
        try:
            self.then()
        except Exception:  # pragma: no cover - never fail the user's import
            pass


class ParstreamProtocolError(RuntimeError):
    """The parent broke the message protocol (a parstream bug)."""


class _Runner:
    def __init__(self, conn: Any, slot: Slot | None, fdchan: int | None = None) -> None:
        self.conn = conn
        self.slot = slot
        # The descriptor channel's fd (large buffers beside the pipe, see
        # ``_shm``), and its socket once first used.
        self.fdchan = fdchan
        self.channel: Any = None
        # Arena blocks mapped here: (block id, mapping, this process's fork
        # count then), unmapped and RELEASED once nothing views them
        # (``release_blocks``).
        self.blocks: list[tuple[int, Any, int]] = []
        self.outgoing: Any = None  # memfds for results (``_shm.Outgoing``), once needed
        self.buffers_error: BaseException | None = None  # why a batch's buffers did not come
        self.words: Any = slot.words if slot is not None else [0] * 8
        self.functions: dict[bytes, Any] = {}
        # Per function: whether its last batch ended journaling (items slow
        # enough for the journal to be cheap); a new batch starts from that.
        self.journaled: dict[bytes, bool] = {}
        self.position = 0  # items of the current batch finished so far
        self.budget = BATCH_BUDGET_S  # the batch stops past this, giving the rest back
        self.lock = threading.Lock()  # log records may come from any thread
        # run_flushing reads the clock when len(values) reaches check[0]; the
        # ticker thread zeroes it every FLUSH_INTERVAL_S while a batch runs, so
        # items that turn slow are noticed within an interval, not a stride.
        self.check = [1]
        self.batch_running = threading.Event()
        self.ticker: threading.Thread | None = None
        self.live: _Live | None = None  # what the ticker may send early
        # Log records go to the parent once logging is imported (at once if
        # it is); the root logger then takes the parent's level, as each
        # batch says it.
        self.log_level: int | None = None
        self.forwarding = False
        self.forwarding_lock = threading.Lock()
        if "logging" in sys.modules:
            self.forward_logging()
        else:
            sys.meta_path.insert(0, _WhenImported("logging", self.forward_logging))

    def forward_logging(self) -> None:
        """Add the handler that ships records to the parent (once)."""
        import logging

        with self.forwarding_lock:
            if self.forwarding:
                return
            self.forwarding = True
            root = logging.getLogger()
            root.addHandler(_forward_handler(self))
            if self.log_level is not None and root.level != self.log_level:
                root.setLevel(self.log_level)

    def running_index(self) -> int | tuple[int, int]:
        """The batch position of the item running now, for its log records:
        exact while items are marked one by one (``BEGUN``); for tiny items,
        run a step at a time, the step's first and last positions."""
        words = self.words
        begun = int(words[BEGUN])
        if begun <= 0:
            return self.position
        if words[EXACT]:
            return begun - 1
        return int(words[WINDOW]), begun - 1

    def send(self, data: bytes) -> None:
        if _FORKED[0]:
            return  # a process a task forked: the pipe is the worker's, not its
        with self.lock:
            self.conn.send_bytes(data)

    def send_results(self, values: list[Any], errors: _wire.Errors, done: bool) -> None:
        """The results of the batch's items ``position - len(values)`` on."""
        if _FORKED[0]:
            _leave_forked_child()
        # Output first: what an item printed is out before its result is, so it
        # lands in the right notebook cell and survives a kill right after.
        _flush_std()
        now = time.monotonic()
        batch = self.words[SEQ]  # the parent checks whose results these are
        base = self.position - len(values)
        if self.fdchan is None:
            self.send(_wire.dumps_results(done, now, values, errors, batch=batch, base=base))
            return
        collect = _wire.Collector()
        frame = _wire.dumps_results(done, now, values, errors, collect, batch, base)
        if not collect.buffers:
            self.send(frame)
            return
        from parstream._backends.local import _shm

        if self.outgoing is None:
            self.outgoing = _shm.Outgoing()
        try:
            fd, block_id = self.outgoing.pack(collect.buffers)
        except OSError:  # out of memory or descriptors: all through the pipe
            self.send(_wire.dumps_results(done, now, values, errors, batch=batch, base=base))
            return
        del collect
        try:
            with self.lock:  # the descriptor, then the frame that announces it
                _shm.send(self.open_channel(), fd, block_id)
                self.conn.send_bytes(frame)
        finally:
            if not block_id:
                os.close(fd)  # a one-off: the parent's mapping keeps the pages

    def open_channel(self) -> Any:
        if self.channel is None:
            from parstream._backends.local import _shm

            assert self.fdchan is not None
            self.channel = _shm.open_channel(self.fdchan)
        return self.channel

    def receive_buffers(self) -> Any:
        """The mapping of the arena block sent just before the batch read,
        or ``None`` if it could not be received."""
        from parstream._backends.local import _shm

        self.buffers_error = None
        try:
            return _shm.mapped(_shm.receive(self.open_channel())[0])
        except _shm.DescriptorLost as lost:
            # Out of descriptors: the parent takes its block back at once,
            # and the result blocks kept for reuse give theirs up.
            self.buffers_error = lost
            self.send(_wire.encode(_wire.RELEASED, [lost.tag]))
            if self.outgoing is not None:
                self.outgoing.drop_idle()
            return None
        except (OSError, EOFError, ValueError) as exc:
            self.buffers_error = exc
            return None

    def release_blocks(self) -> None:
        """Unmap the arena blocks nothing views any more; tell the parent.

        A block mapped before this process forked (a task forked a child) is
        released negated: the child's copy-on-write view still reads the
        block's file, so the parent must never write it again."""
        from parstream._backends.local import _shm

        released, kept = [], []
        for block_id, mapping, forks in self.blocks:
            try:
                mapping.close()  # refused while an array still views it
            except BufferError:
                kept.append((block_id, mapping, forks))
            else:
                released.append(block_id if forks == _shm.forks() else -block_id)
        self.blocks = kept
        if released:
            self.send(_wire.encode(_wire.RELEASED, released))

    def load_function(self, key: bytes, data: bytes | None, evict: list[bytes]) -> Any:
        for old in evict:
            self.functions.pop(old, None)
            self.journaled.pop(old, None)
        fn = self.functions.get(key)
        if fn is None:
            if data is None:
                raise ParstreamProtocolError("a function was never sent to this worker")
            try:
                fn = pickle.loads(data)
            except BaseException:
                # The parent thinks we hold it now: tell it we do not, so the
                # next call sends the bytes again (the cause may be fixed).
                self.send(_wire.encode(_wire.FORGET, key))
                raise
            self.functions[key] = fn
        return fn

    def run_batch(self, message: _wire.RunMessage, mapping: Any = None) -> None:
        (
            key,
            data,
            count,
            items_bytes,
            star,
            report_each,
            evict,
            has_bad,
            log_level,
            buffers,
            whole,
        ) = message
        self.log_level = log_level
        self.budget = float("inf") if whole else BATCH_BUDGET_S
        if self.forwarding:
            root = sys.modules["logging"].getLogger()
            if root.level != log_level:  # setLevel clears every logger's cache: not per batch
                root.setLevel(log_level)
        elif "logging" in sys.modules:  # imported past the hook (a legacy loader)
            self.forward_logging()
        self.position = 0
        try:
            fn = self.load_function(key, data, evict)
        except BaseException as exc:
            # The function cannot be rebuilt here: every item fails with that
            # cause, and the worker stays healthy.
            err = _failure(exc)
            self.position = count
            self.send_results([None] * count, dict.fromkeys(range(count), err), True)
            return
        if report_each and data is not None:
            # Loading the function (importing its module) is not the item's
            # time: the parent restarts the item's clock now.
            self.send(bytes((_wire.LOADED,)))
        try:
            if buffers is not None:
                if mapping is None:
                    raise EOFError(
                        "the batch's large buffers did not arrive from the parent"
                    ) from self.buffers_error
                views = _wire.split_buffers(memoryview(mapping), buffers[1])
                items = pickle.loads(items_bytes, buffers=views)
            else:
                items = pickle.loads(items_bytes)
        except BaseException as exc:
            # Arguments that cannot be rebuilt in the worker: tell the
            # parent, which isolates the culprit item by item.
            self.send(_wire.encode(_wire.BAD_BATCH, _codec.pack_error(_failure(exc))))
            return
        if has_bad:
            bad = _codec.BadArgs

            def call(args: Any) -> Any:
                if type(args) is bad:
                    raise args.error
                return fn(*args) if star else fn(args)

        elif star:

            def call(args: Any) -> Any:
                return fn(*args)

        else:
            call = fn
        if report_each:
            if self.slot is not None:
                self.run_timed(call, items)
            else:
                self.run_reporting_each(call, items)
        elif len(items) == 1:
            self.run_one(call, items[0])
        else:
            self.journaled[key] = self.run_flushing(call, items, self.journaled.get(key, True))

    def run_one(self, call: Any, args: Any) -> None:
        """A batch of one (a task): marked begun, run, its result sent at once,
        so nothing is there to journal."""
        self.words[BEGUN] = 1
        try:
            values, errors = [call(args)], {}
        except BaseException as exc:
            values, errors = [None], {0: _failure(exc)}
        self.position = 1
        self.send_results(values, errors, True)

    def run_reporting_each(self, call: Any, items: list[Any]) -> None:
        """One message per item, so the parent always knows which item runs since when."""
        self.send_results([], {}, False)
        started = time.monotonic()
        words = self.words
        for begun, args in enumerate(items, 1):
            words[BEGUN] = begun
            try:
                result: list[Any] = [call(args)]
                errors: _wire.Errors = {}
            except BaseException as exc:
                result, errors = [None], {0: _failure(exc)}
            self.position += 1
            self.send_results(result, errors, False)
            if self.position < len(items) and time.monotonic() - started >= self.budget:
                break  # over budget: the rest goes back unrun
        self.send_results([], {}, True)

    def run_timed(self, call: Any, items: list[Any]) -> None:
        """A batch with a per-item timeout, on a slot: each item's start is
        stamped in the slot (``STARTED``, then ``BEGUN``) and its result
        journaled, and results go back every ``FLUSH_INTERVAL_S``, not per
        item. The parent reads the stamp at an item's deadline: a kill then
        blames the item that overran, and the journal delivers those
        finished before it (a message per item cost 60-150 us)."""
        slot = self.slot
        assert slot is not None
        clock = time.monotonic_ns
        words = self.words
        journal_value, journal_error = slot.journal_value, slot.journal_error
        ints = slot.ints
        interval = int(FLUSH_INTERVAL_S * 1e9)
        budget = self.budget * 1e9
        values: list[Any] = []
        append = values.append
        errors: _wire.Errors = {}
        done = 0  # items finished in earlier flushes
        words[EXACT] = 1
        now = last = started = clock()
        total = len(items)
        forked = _FORKED
        batch = words[SEQ]
        if total > 1:
            self.live = _Live(values, errors, 0, batch, time.monotonic())
            self.start_ticker()
        for begun, args in enumerate(items, 1):
            words[STARTED] = now  # before BEGUN: see Slot.started
            words[BEGUN] = begun
            try:
                value = call(args)
            except BaseException as exc:
                if forked[0]:
                    _leave_forked_child()
                failure = _failure(exc)
                errors[len(values)] = failure
                append(None)
                kept = journal_error(failure)
            else:
                if forked[0]:
                    _leave_forked_child()
                append(value)
                kept = True
                if type(value) is int:  # entry ``begun - done - 1``, as in run_flushing
                    try:
                        ints[begun - done - 1] = value
                        words[J_COUNT] = begun - done
                    except (IndexError, ValueError, OverflowError):
                        kept = journal_value(value)
                else:
                    kept = journal_value(value)
            now = clock()
            if begun < total and (not kept or now - last >= interval):
                # Flushed before the next item begins: nothing is journaled
                # after an entry that was not.
                done = self.position = begun
                self.send_results(values, errors, False)
                values, errors = [], {}
                append = values.append
                slot.journal_reset(done)
                now = last = clock()
                self.live = _Live(values, errors, done, batch, time.monotonic())
            if begun < total and now - started >= budget:
                break  # over budget: the rest goes back unrun
        self.live = None
        self.batch_running.clear()
        self.position = done + len(values)
        self.send_results(values, errors, True)

    def start_ticker(self) -> None:
        if self.ticker is None:
            self.ticker = threading.Thread(target=self.tick, name="parstream-tick", daemon=True)
            self.ticker.start()
        self.batch_running.set()

    def tick(self) -> None:
        while True:
            self.batch_running.wait()
            time.sleep(FLUSH_INTERVAL_S)
            self.check[0] = 0
            live = self.live
            if live is not None and time.monotonic() - live.since >= EARLY_AFTER_S:
                self.send_early(live)

    def send_early(self, live: _Live) -> None:
        """On the ticker's thread, while an item runs on past the interval:
        what its batch-mates finished since the last flush goes now, not when
        the slow one ends (a later flush sends them again; the parent takes
        each result once, by position). Only through the pipe: skipped when
        a result has large buffers (the batch's own flush sends them through
        shared memory), or cannot be pickled now."""
        sent, n = live.sent, len(live.values)
        if n <= sent or live.given_up or _FORKED[0]:
            return
        values = live.values[sent:n]
        collect = _wire.Collector()
        try:
            errors = {i - sent: e for i, e in dict(live.errors).items() if sent <= i < n}
            frame = _wire.dumps_results(
                False,
                time.monotonic(),
                values,
                errors,
                collect,
                batch=live.batch,
                base=live.base + sent,
                early=True,
            )
        except BaseException:  # a value changed under us, say: the batch's flush sends it
            live.given_up = True  # (not pickled again every interval; nothing after it
            return  # goes early either: the parent takes results in order)
        if collect.buffers:
            live.given_up = True
            return
        _flush_std()
        self.send(frame)
        live.sent = n

    def run_flushing(self, call: Any, items: list[Any], journal_first: bool = True) -> bool:
        """Results go back every ``FLUSH_INTERVAL_S`` and at the end.

        Items run in one of two modes, chosen at each reading of the clock:

        * slow items (``JOURNAL_MIN_ITEM_S`` or more): a Python loop that
          marks each item begun in the slot before it runs and journals its
          result after, so a crash anywhere loses nothing and runs nothing
          twice;
        * tiny items: steps of ``TINY_STEP`` items run from C
          (``list.extend(map(...))``, no bytecode per item); the slot holds
          the step's bounds, so a crash is placed within one step.

        The clock is read only every ``stride`` items, a stride re-estimated at
        each reading to land a few readings per interval: a clock read per item
        would cost more than a tiny item itself. The ticker thread forces a
        reading every interval (``check``), and past ``BATCH_BUDGET_S`` (not
        for a batch the parent sent ``whole``) the batch stops, leaving its
        unrun items to the parent. An exception fails its item alone and the
        batch goes on. Returns whether the batch ended journaling (the next
        batch of the function starts so).
        """
        monotonic = time.monotonic
        values: list[Any] = []
        errors: _wire.Errors = {}
        append = values.append
        it = iter(items)
        stride = 1
        check = self.check
        check[0] = 1
        total = len(items)
        if total > 1:
            self.start_ticker()
        # After waking the ticker: its thread takes the GIL for a moment, and
        # counted in the first step of tiny items, that made them look slow
        # (~1 us each) in ~10% of batches, which then journaled their next
        # few thousand items at ~4x the cost of each (issue 12).
        last = started = monotonic()
        done = 0  # items finished in earlier flushes
        words = self.words
        batch = words[SEQ]
        self.live = _Live(values, errors, 0, batch, started)
        slot = self.slot
        keep = slot is not None and journal_first  # journal (and mark one by one)?
        journal = slot.journal_value if slot is not None else None
        ints = slot.ints if slot is not None else None
        full = False  # the journal is full: flush now
        step = TINY_STEP
        forked = _FORKED
        while done + len(values) < total:
            pos = done + len(values)
            try:
                if full:
                    # The journal is full: flush before running more, so no
                    # entry is ever written past one that was not.
                    pass
                elif keep:
                    words[EXACT] = 1
                    for begun, args in enumerate(it, pos + 1):
                        words[BEGUN] = begun  # before the item: the parent's record of a crash
                        value = call(args)
                        if forked[0]:
                            _leave_forked_child()
                        append(value)
                        # Journal it. A plain int is entry ``begun - done - 1``
                        # of the slot's int array, written here: a call per
                        # item would cost 8% of a 4 us item.
                        if type(value) is int:
                            try:
                                ints[begun - done - 1] = value  # type: ignore[index]
                                words[J_COUNT] = begun - done
                            except (IndexError, ValueError, OverflowError):
                                pass  # past the array, or beyond 64 bits
                            else:
                                if begun - done >= check[0]:
                                    break
                                continue
                        if not journal(value):  # type: ignore[misc]
                            full = True
                            check[0] = 0
                        if len(values) >= check[0]:
                            break
                else:
                    words[EXACT] = 0
                    while len(values) < check[0] and pos < total:
                        words[WINDOW] = pos
                        end = min(pos + step, total)
                        words[BEGUN] = end
                        values.extend(map(call, islice(it, step)))
                        if forked[0]:
                            _leave_forked_child()
                        pos = done + len(values)
                        if pos < end:
                            # An item raised StopIteration, which ended the
                            # step as if its input had (``extend`` takes it
                            # so): that item, already taken from ``it``, runs
                            # again alone for its exception, the one a slow
                            # item would give.
                            try:
                                append(call(items[pos]))
                            except BaseException as exc:
                                errors[len(values)] = _failure(exc)
                                append(None)
                            pos += 1
            except BaseException as exc:
                if forked[0]:
                    _leave_forked_child()
                failure = _failure(exc)
                errors[len(values)] = failure
                append(None)
                if keep and slot is not None and not slot.journal_error(failure):
                    full = True
                    check[0] = 0
                if len(values) < check[0]:
                    continue
            if done + len(values) >= total:
                break
            now = monotonic()
            if now - started >= self.budget:
                break  # over budget: the rest goes back unrun
            elapsed = now - last
            slow = elapsed >= JOURNAL_MIN_ITEM_S * max(1, len(values))
            if elapsed >= FLUSH_INTERVAL_S or full:
                stride = max(1, int(len(values) * FLUSH_INTERVAL_S / max(elapsed, 1e-9) / 4))
                done += len(values)
                self.position = done
                self.send_results(values, errors, False)
                values, errors = [], {}
                append = values.append
                last = now
                self.live = _Live(values, errors, done, batch, now)
                check[0] = stride
                full = False
                if slot is not None:
                    slot.journal_reset(done)
            else:
                if elapsed > 0:
                    rate = len(values) / elapsed
                    stride = max(1, int(rate * FLUSH_INTERVAL_S / 4))
                check[0] = len(values) + stride
            if slot is not None and slow != keep:
                keep = slow
                if keep:
                    # Journal what is pending too: the entries run on from
                    # the last flush, with no gap.
                    slot.journal_reset(done)
                    for i, pending in enumerate(values):
                        earlier = errors.get(i)
                        ok = (
                            slot.journal_error(earlier)
                            if earlier is not None
                            else slot.journal_value(pending)
                        )
                        if not ok:
                            full = True
                            check[0] = 0
                            break
            self.position = done + len(values)
        self.live = None
        self.batch_running.clear()
        self.position = done + len(values)
        self.send_results(values, errors, True)
        return keep

    def loop(self) -> None:
        while True:
            try:
                raw = self.conn.recv_bytes()
            except (EOFError, OSError):
                return
            kind = _wire.kind_of(raw)
            if kind == _wire.STOP:
                return
            if kind == _wire.FREED:
                if self.outgoing is not None:
                    self.outgoing.freed(_wire.decode(raw))
                continue
            if kind == _wire.CONTEXT:
                _take_context(*_wire.decode(raw))
                continue
            # The batch's large buffers were sent just before it: take them
            # first, whatever happens to the batch.
            mapping = None
            if _wire.run_has_buffers(raw):
                mapping = self.receive_buffers()
            # Mark the batch begun before unpickling it: from here on, a death
            # is this batch's doing, not an idle worker's.
            self.words[BEGUN] = 0
            self.words[EXACT] = 1
            if self.slot is not None:
                self.slot.journal_reset(0)  # no entry of an earlier batch survives
            self.words[SEQ] = _wire.run_seq(raw)
            try:
                message = _wire.decode_run(raw)
            except BaseException as exc:
                # Arguments that cannot be rebuilt in the worker: tell the
                # parent, which isolates the culprit item by item.
                self.send(_wire.encode(_wire.BAD_BATCH, _codec.pack_error(_failure(exc))))
                continue
            if mapping is not None and message.buffers is not None:
                from parstream._backends.local import _shm

                self.blocks.append((message.buffers[0], mapping, _shm.forks()))
            self.run_batch(message, mapping)
            if self.blocks:
                del mapping  # the batch's arrays are gone, unless a task kept one
                self.release_blocks()


def _take_context(path: list[str], cwd: str, environ: dict[str, str]) -> None:
    """Take the parent's sys.path, directory and environment of now, as a
    start now would (before any task: ``restart_workers`` while it started)."""
    sys.path[:] = path
    try:
        os.chdir(cwd)
    except OSError:  # gone meanwhile: a start now would fail; the old one stays
        pass
    for name in [n for n in os.environ if n not in environ]:
        os.environ.pop(name, None)
    os.environ.update(environ)


def _run_initializer(conn: Any, initializer: bytes) -> None:
    """Run the pickled ``(fn, args)`` once, before READY; if it raises, report
    ``START_FAILED`` with its error and exit non-zero (a failed start)."""
    try:
        fn, args = pickle.loads(initializer)
        fn(*args)
    except BaseException as exc:
        payload = _codec.pack_error(_failure(exc))
        try:
            conn.send_bytes(_wire.encode(_wire.START_FAILED, payload))
        finally:
            _flush_std()
            os._exit(3)


def _ignore_signal(signum: int, frame: Any) -> None:
    pass


def worker_main(
    conn: Any,
    parent_pid: int,
    slot: Slot | None = None,
    initializer: bytes | None = None,
    spare: bool = False,
    fdchan: int | None = None,
) -> None:
    """Entry point of a worker process (the target given to loky's Process).

    A ``spare`` gets ready up to the initializer, then waits: ``PROMOTE``
    makes it a worker (initializer, ``READY``), ``STOP`` or end of file
    ends it. So a spare never runs user code unless it is promoted.
    """
    # A process group of its own, before any task runs: everything a task
    # starts inherits it, so the parent (and the reaper) can kill it all.
    # (A worker exec'd by _spawn.fork_exec is in it from the start.)
    if hasattr(os, "setpgid"):
        try:
            os.setpgid(0, 0)
        except OSError:  # pragma: no cover - already a session leader
            pass
    # Ctrl-C is the parent's to handle (the terminal's, and a kernel
    # interrupt, reach the foreground group, which this is not): a handler
    # that does nothing, not SIG_IGN, which what a task starts would inherit
    # through exec (a task could then not stop its own child with SIGINT).
    signal.signal(signal.SIGINT, _ignore_signal)
    if hasattr(signal, "SIGTTOU"):
        # A background group may still write to the terminal and set its
        # modes (stty, getpass; print under ``stty tostop``), and a read of
        # it fails, instead of the kernel stopping the worker for good.
        signal.signal(signal.SIGTTOU, signal.SIG_IGN)
        signal.signal(signal.SIGTTIN, signal.SIG_IGN)
    _die_with_parent(parent_pid)
    _whole_lines()
    if hasattr(os, "register_at_fork"):
        os.register_at_fork(after_in_child=_forked_by_a_task)
    runner = _Runner(conn, slot, fdchan)
    if spare:
        # Off anyone's critical path: what a first error or closure needs.
        import cloudpickle  # noqa: F401

        try:
            raw = conn.recv_bytes()
        except (EOFError, OSError):
            return
        if _wire.kind_of(raw) != _wire.PROMOTE:
            return  # STOP
    if initializer is not None:
        _run_initializer(conn, initializer)
    conn.send_bytes(_wire.encode(_wire.READY, os.getpid()))
    try:
        runner.loop()
    finally:
        _flush_std()
    end_now()


def end_now() -> None:
    """The worker's work is over (``STOP``, or the parent closed the pipe):
    end as Python's exit would, its exit hooks run, but without waiting for
    threads a task left running. A forgotten non-daemon thread kept a
    retired worker, and everything in its group, alive for good: more
    workers than ``max_workers``, one per retirement."""
    import atexit

    try:
        atexit._run_exitfuncs()
    finally:
        _flush_std()
        os._exit(0)


def boot(prep: dict[str, Any]) -> None:
    """Entry point of a worker started by ``_spawn`` (see ``BOOT``): the
    parent's ``sys.path`` and working directory are already in place."""
    for name in prep.get("drop_env", ()):
        os.environ.pop(name, None)  # read by the C library at start; not for tasks
    slot_fd = prep["slot"]
    slot = Slot(slot_fd) if slot_fd is not None else None
    conn = _wire.FdConnection(prep["conn"])
    worker_main(
        conn, prep["parent"], slot, prep["init"], prep.get("spare", False), prep.get("fdchan")
    )
