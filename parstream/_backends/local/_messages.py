"""The hub's reading of what workers send (``_wire`` kinds), for ``LocalPool``.

Each message from a worker pipe is handled on the hub thread: ``RESULTS``
move the job on (``Dispatcher.deliver``) and, when the slice is done, free
the worker; ``READY`` makes a starting worker idle; ``LOADED`` restarts a
timed item's clock once its function is loaded; ``FORGET`` and
``BAD_BATCH`` undo what the parent assumed the worker had; ``LOG`` goes to
the parent's ``parstream`` logger with the item's index. A ``RESULTS`` frame
that announces large buffers has them taken from the descriptor channel
first (``_shm``), whatever becomes of the frame.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from typing import TYPE_CHECKING, Any

from parstream._backends._dispatch import run_of
from parstream._backends.local import _spawn, _wire

if TYPE_CHECKING:
    import threading
    from collections.abc import Callable

    from parstream._backend import Job
    from parstream._backends._dispatch import Dispatcher
    from parstream._backends.local._shm import Arena
    from parstream._backends.local._spawn import LocalWorker, Starter

log = logging.getLogger("parstream")


class MessageHandler:
    """Mixed into ``LocalPool``: the attributes below are the pool's."""

    _lock: threading.RLock
    _dispatch: Dispatcher
    _starter: Starter
    _arena: Arena

    def _wake(self) -> None:
        raise NotImplementedError

    def _after_idle(self, worker: LocalWorker) -> None:
        raise NotImplementedError

    def _retire(self, worker: LocalWorker) -> None:
        raise NotImplementedError

    def _slice_done(self, worker: LocalWorker, job: Job) -> None:
        raise NotImplementedError

    def _requeue(self, worker: LocalWorker, job: Job) -> None:
        raise NotImplementedError

    def _read_one(self, worker: LocalWorker) -> bool:
        """Handle one message from a readable pipe; False at end of file."""
        try:
            data = worker.conn.recv_bytes()
        except (EOFError, OSError):
            return False
        self._on_message(worker, data)
        return True

    def _drain(self, worker: LocalWorker) -> None:
        """Handle every message already in the pipe (a dead worker's last words)."""
        while _readable(worker.conn) and self._read_one(worker):
            pass

    def _on_message(self, worker: LocalWorker, data: bytes) -> None:
        kind = _wire.kind_of(data)
        if kind == _wire.RESULTS:
            self._on_results(worker, data)
        elif kind == _wire.READY:
            with self._lock:
                worker.pid = _wire.decode(data)
                if worker.state == "starting":
                    if worker.retire_requested and worker.job is None:
                        # restart_workers() came while its initializer ran (and
                        # may have imported the old code): it serves nothing.
                        self._retire(worker)
                    else:
                        if worker.context_due is not None:
                            # restart_workers() came while it started: the
                            # context of now, read before any task (same pipe).
                            context, worker.context_due = worker.context_due, None
                            with worker.send_lock, contextlib.suppress(OSError):
                                worker.conn.send_bytes(_wire.encode(_wire.CONTEXT, context))
                            worker.started_with = context
                        worker.state = "idle"
                        worker.idle_since = time.monotonic()
                self._starter.ready()
        elif kind == _wire.LOADED:
            if worker.job is not None and worker.job.timeout is not None:
                worker.item_started = time.monotonic()
        elif kind == _wire.FORGET:
            with self._lock:
                worker.fns.pop(_wire.decode(data), None)
        elif kind == _wire.RELEASED:
            self._arena.released(worker, _wire.decode(data))
        elif kind == _wire.START_FAILED:
            worker.init_error = _wire.decode(data)
        elif kind == _wire.LOG:
            name, level, text, position = _wire.decode(data)
            job = worker.job
            where = "item None"
            if job is not None:
                base = job.first_index + run_of(job).slice_start
                if isinstance(position, tuple):  # tiny items: the step it was logged in
                    where = f"one of items {base + position[0]}-{base + position[1]}"
                else:
                    where = f"item {base + position}"
            log.log(level, "[%s, worker %s] %s: %s", where, worker.pid, name, text)
        elif kind == _wire.BAD_BATCH:
            self._on_bad_batch(worker, _wire.decode(data))

    def _on_bad_batch(self, worker: LocalWorker, payload: Any) -> None:
        """The worker could not read the batch (function or arguments)."""
        job = worker.job
        if job is None:
            return
        with worker.send_lock:
            worker.fns.pop(job.fn.token.key, None)  # it holds no copy now
        with self._lock:
            run = run_of(job)
            if run.sent_end - run.cursor <= 1:
                self._dispatch.deliver(job, [None], {0: payload})
                self._slice_done(worker, job)
            else:
                run.isolate = True  # find the item that cannot be read
                self._requeue(worker, job)
        self._after_idle(worker)

    def _on_results(self, worker: LocalWorker, data: bytes) -> None:
        buffers = _receive_buffers(worker, self._wake) if _wire.has_buffers(data) else None
        done, t_next, values, errors = _wire.loads_results(data, buffers)
        del buffers  # the mapping now lives as long as the values viewing it
        worker.unconfirmed.clear()  # its function loaded (or FORGET came first)
        job = worker.job
        if job is None or worker.confused:
            return
        batch, base, early = _wire.placement(data)
        if batch != worker.seq:
            if not early:  # (an early flush may come after its batch's last one)
                self._misattributed(worker, f"the results of batch {batch}")
            return
        # Each result once, by its position in the batch: an early flush (sent
        # while a slow item ran) and the batch's own next flush overlap.
        run = run_of(job)
        skip = run.cursor - run.slice_start - base
        if skip < 0:
            self._misattributed(worker, f"results from position {base}")
            return
        if values and not early:
            worker.item_started = t_next  # the worker's clock: the next item's start
        if skip:
            values = values[skip:]
            errors = {i - skip: e for i, e in errors.items() if i >= skip}
        count = len(values)
        if count:
            with self._lock:
                worker.items_done += count
                self._dispatch.deliver(job, values, errors)
        if done:
            with self._lock:
                self._slice_done(worker, job)
            self._after_idle(worker)

    def _misattributed(self, worker: LocalWorker, what: str) -> None:
        """Results the pool cannot place: of another batch than the one it
        believes the worker runs, or past a gap. A bug of ours, never to be
        credited to the wrong items: they are dropped, and the worker is
        killed, a crash as any other: if its slot says it began the pool's
        batch, the item it ran fails with ``WorkerCrashed`` and what it
        finished unjournaled is reported lost; else the batch runs again
        whole. The batch queued behind it runs again."""
        log.error(
            "parstream internal error: worker %s sent %s while the pool had it "
            "running batch %d from position %d; killing it as a crash",
            worker.pid,
            what,
            worker.seq,
            run_of(worker.job).cursor - run_of(worker.job).slice_start if worker.job else 0,
        )
        with self._lock:
            worker.confused = True
            if not worker.exited:
                _spawn.kill_tree(worker.pid)


def _receive_buffers(
    worker: LocalWorker, wake: Callable[[], None]
) -> memoryview | BaseException | None:
    """The mapped buffers the worker sent just before a results frame
    (``_shm``), or why they cannot be had (the values using them fail with
    it). When the mapping of a reusable block is gone, the hub is woken to
    say ``FREED``. A block that cannot be mapped (past the kernel's count of
    mappings) is copied here and freed at once."""
    from parstream._backends.local import _shm

    if worker.fdchan is None:
        return None
    forked = _shm.forks()  # a fork from here on may copy the mapping
    try:
        fd, block_id = _shm.receive(worker.fdchan)
    except _shm.DescriptorLost as lost:
        if lost.tag:
            worker.freed.append(lost.tag)  # never had here: the worker may reuse it
        return lost
    except (OSError, EOFError, ValueError) as error:
        return error
    try:
        landed, mapped = _shm.LANDING.land(fd)
    except (OSError, EOFError, MemoryError) as error:
        landed, mapped = error, False
    if block_id:
        if mapped:
            _shm.watch(landed, block_id, worker.freed, wake, forked)
        else:
            worker.freed.append(block_id)  # not mapped here: the worker may reuse it
    if isinstance(landed, BaseException):
        return landed
    return memoryview(landed).cast("B")


def _readable(conn: Any) -> bool:
    """Whether ``conn`` has data now, without Connection.poll()'s set-up cost."""
    if os.name == "posix":
        try:
            return _wire.wait_readable(conn.fileno())
        except (OSError, ValueError):
            return False
    try:
        return bool(conn.poll())
    except (OSError, EOFError):
        return False
