"""The worker process: the child loop, and nothing else.

It imports no parent-side code (only ``_wire``, the shared message format), so a
worker starts fast and cannot deadlock on parent state.

Data flow, one duplex pipe per worker, one batch in flight at a time::

    parent --RUN(fn_id, fn_bytes?, [args, ...], report_each, evict)--> worker
    worker --RESULTS(count, done, t_next, [(status, payload), ...])--> parent

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
never stranded in a buffer when the worker is killed: workers run with
``PYTHONUNBUFFERED=1`` and flush again before every flush of results.
"""

from __future__ import annotations

import logging
import os
import pickle
import signal
import sys
import threading
import time
import traceback
from typing import Any

from parstream import _wire

# A flush per item costs a message per item; a long interval delays results.
FLUSH_INTERVAL_S = 0.02
PARENT_POLL_S = 0.25


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


def _flush_std() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            if stream is not None:
                stream.flush()
        except Exception:
            pass


def _failure(exc: BaseException) -> tuple[BaseException, str]:
    tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    exc.__traceback__ = None
    return exc, tb


class _Unloadable:
    """Cached in place of a function that could not be unpickled here."""

    __slots__ = ("payload",)

    def __init__(self, payload: tuple[BaseException, str]) -> None:
        self.payload = payload


class _FunctionFailed(Exception):
    """Raised by ``load_function`` for a cached ``_Unloadable``."""

    def __init__(self, payload: tuple[BaseException, str]) -> None:
        super().__init__(payload[0])
        self.payload = payload


class _Forward(logging.Handler):
    """Ships log records to the parent, tagged with the item being run."""

    def __init__(self, runner: _Runner) -> None:
        super().__init__()
        self.runner = runner

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = record.getMessage()
            if record.exc_info:
                text += "\n" + "".join(traceback.format_exception(*record.exc_info))
            payload = (record.name, record.levelno, text, self.runner.position)
            self.runner.send(_wire.encode(_wire.LOG, payload))
        except Exception:
            self.handleError(record)


class _Runner:
    def __init__(self, conn: Any) -> None:
        self.conn = conn
        self.functions: dict[int, Any] = {}
        self.position = 0  # items of the current batch finished so far
        self.lock = threading.Lock()  # log records may come from any thread
        root = logging.getLogger()
        root.addHandler(_Forward(self))

    def send(self, data: bytes) -> None:
        with self.lock:
            self.conn.send_bytes(data)

    def send_results(self, values: list[Any], errors: _wire.Errors, done: bool) -> None:
        # Output first: what an item printed is out before its result is, so it
        # lands in the right notebook cell and survives a kill right after.
        _flush_std()
        self.send(_wire.dumps_results(done, time.monotonic(), values, errors))

    def load_function(self, fn_id: int, fn_bytes: bytes | None, evict: list[int]) -> Any:
        for old in evict:
            self.functions.pop(old, None)
        fn = self.functions.get(fn_id)
        if fn is None:
            if fn_bytes is None:
                raise RuntimeError(f"function {fn_id} was never sent to this worker")
            try:
                fn = pickle.loads(fn_bytes)
            except BaseException as exc:
                # The parent sends the function once per worker: the next
                # batches of this function must fail with the same cause.
                fn = _Unloadable(_failure(exc))
            self.functions[fn_id] = fn
        if type(fn) is _Unloadable:
            raise _FunctionFailed(fn.payload)
        return fn

    def run_batch(self, message: tuple[Any, ...]) -> None:
        fn_id, fn_bytes, items, star, report_each, evict, has_bad, log_level = message
        logging.getLogger().setLevel(log_level)
        self.position = 0
        try:
            fn = self.load_function(fn_id, fn_bytes, evict)
        except BaseException as exc:
            # The function cannot be rebuilt here: every item fails with that
            # cause, and the worker stays healthy.
            err = exc.payload if isinstance(exc, _FunctionFailed) else _failure(exc)
            self.send_results([None] * len(items), dict.fromkeys(range(len(items)), err), True)
            return
        if has_bad:
            bad = _wire.BadArgs

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
            self.run_reporting_each(call, items)
        else:
            self.run_flushing(call, items)

    def run_reporting_each(self, call: Any, items: list[Any]) -> None:
        """One message per item, so the parent always knows which item runs since when."""
        self.send_results([], {}, False)
        for args in items:
            try:
                result: list[Any] = [call(args)]
                errors: _wire.Errors = {}
            except BaseException as exc:
                result, errors = [None], {0: _failure(exc)}
            self.position += 1
            self.send_results(result, errors, False)
        self.send_results([], {}, True)

    def run_flushing(self, call: Any, items: list[Any]) -> None:
        """Results go back every ``FLUSH_INTERVAL_S`` and at the end.

        The clock is read only every ``stride`` items, a stride re-estimated at
        each reading to land a few readings per interval: a clock read per item
        would cost more than a tiny item itself. The ``try`` sits outside the
        inner loop for the same reason; an exception resumes after its item.
        """
        monotonic = time.monotonic
        values: list[Any] = []
        errors: _wire.Errors = {}
        append = values.append
        it = iter(items)
        last = monotonic()
        stride = 1
        check_at = 1
        done = 0  # items finished in earlier flushes
        while True:
            try:
                for args in it:
                    append(call(args))
                    if len(values) >= check_at:
                        now = monotonic()
                        elapsed = now - last
                        if elapsed >= FLUSH_INTERVAL_S:
                            stride = max(1, int(len(values) * FLUSH_INTERVAL_S / elapsed / 4))
                            done += len(values)
                            self.position = done
                            self.send_results(values, errors, False)
                            values, errors = [], {}
                            append = values.append
                            last = now
                            check_at = stride
                        else:
                            if elapsed > 0:
                                rate = len(values) / elapsed
                                stride = max(1, int(rate * FLUSH_INTERVAL_S / 4))
                            check_at = len(values) + stride
                        self.position = done + len(values)
                break
            except BaseException as exc:
                errors[len(values)] = _failure(exc)
                append(None)
        self.position = done + len(values)
        self.send_results(values, errors, True)

    def loop(self) -> None:
        while True:
            try:
                raw = self.conn.recv_bytes()
            except (EOFError, OSError):
                return
            kind = _wire.kind_of(raw)
            if kind == _wire.STOP:
                return
            try:
                message = _wire.decode(raw)
            except BaseException as exc:
                # Arguments that cannot be rebuilt in the worker: tell the
                # parent, which isolates the culprit item by item.
                self.send(_wire.encode(_wire.BAD_BATCH, _wire.pack_error(_failure(exc))))
                continue
            self.run_batch(message)


def worker_main(conn: Any, parent_pid: int) -> None:
    """Entry point of a worker process (the target given to loky's Process)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _die_with_parent(parent_pid)
    runner = _Runner(conn)
    conn.send_bytes(_wire.encode(_wire.READY, os.getpid()))
    try:
        runner.loop()
    finally:
        _flush_std()
