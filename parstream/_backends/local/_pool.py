"""The local backend's engine: worker processes on this machine, and the hub
thread that watches them.

``LocalPool`` implements ``parstream._backend.Backend``. What happens to jobs
(the queue, gates, slices, blame after a death) is the shared
``Dispatcher``'s; this module owns the processes. Starting them, their
failures and the process-tree kill live in ``_spawn``; the hub's reading of
worker messages in ``_messages``.

Data flow::

    caller threads                       hub thread (one per pool)
    --------------                       -------------------------
    submit(job) --idle worker?--send-->  wait() on every worker pipe, every
         |                               process sentinel, the wake pipe and
         +--no: queue, wake hub------->  the next deadline; then
                                           RESULTS  -> Dispatcher.deliver
    kill(job)  --SIGKILL tree, wake-->     sentinel -> drain the pipe, read the
                                                       worker's slot: Death
                                           deadline -> kill a hung item's worker
                                           idle     -> next queued job; a busy
                                                       worker may get the next
                                                       chunk of its stream behind
                                                       the running one
                                         then, outside the lock: Outbox.flush
                                         (the sinks), and sleep again

A stream's next chunk can be sent down a busy worker's pipe behind its
running one (``_behind_whom``), so the worker goes on without waiting a round
trip; it becomes the worker's job when the running one ends (``_take_next``)
and runs elsewhere if the worker dies first.

Large arguments do not go through the pipe: ``_encode`` writes them into a
block of the pool's ``_shm.Arena``, lent to the worker until it says
``RELEASED`` or dies (results come back the same way, see ``_shm``).

Each worker has a progress slot (``_slot``) it writes before each batch and
each item, so at a death the pool knows exactly whether the batch was begun
and which item was running, without asking the dead. Workers are started only
from the hub thread, because ``PR_SET_PDEATHSIG`` fires when the *thread*
that started a child exits. Once a first worker is up the pool also keeps a
spare process, booted and waiting, which replaces a dead worker at once
(``_keep_a_spare``).

After ``os.fork()`` the child's copy of a pool is inert: it refuses work
(``usable()`` says why), never signals the parent's workers, and closes its
copies of their pipes.
"""

from __future__ import annotations

import contextlib
import logging
import os
import selectors
import signal
import threading
import time
import weakref
from typing import TYPE_CHECKING, Any

from parstream._backend import (
    BackendClosed,
    Capabilities,
    Counts,
    FnHandle,
    Gate,
    Job,
    Node,
    Worker,
)
from parstream._backends._codec import BadArgs, culprit_error, dumps, warm_up
from parstream._backends._dispatch import Death, Dispatcher, Outbox, run_of, unusable
from parstream._backends._frames import dumps_plain
from parstream._backends.local import _reaper, _shm, _spawn, _wire
from parstream._backends.local._functions import ship
from parstream._backends.local._messages import MessageHandler
from parstream._callbacks import mark_hub_thread
from parstream._errors import ParstreamInternalError
from parstream._interrupts import held

if TYPE_CHECKING:
    from collections.abc import Callable

    from parstream._backend import End, Settings
    from parstream._backends.local._spawn import LocalWorker

log = logging.getLogger("parstream")

FN_CACHE_SIZE = 32  # functions a worker keeps unpickled; more means more worker memory
MAX_WAIT_S = 3600.0  # the hub wakes at least this often, whatever the deadlines say
FUNCTION_LOAD_S = 60.0  # the bound on loading a function, outside any item's timeout
SPARES = _spawn.LIGHT_START  # keep a spare worker (see LocalPool._keep_a_spare)
PREFETCH = True  # send a stream's next chunk behind a busy worker's (LocalPool._behind_whom)
# A worker whose child's run just ended waits this long for the child's
# restart (decided on the callback thread) before taking other work.
CHILD_HOLD_S = 0.05
PLAIN_ITEMS = 16  # up to this many items try the plain pickler first (``_encode``)
HUB_EXIT_WAIT_S = 5.0  # close() waits this long for the hub, then leaves the rest to it
STOP_GRACE_S = 10.0  # a worker told to stop (retired, restarted) is killed if still there then
FIRST_PASS_WAIT_S = 1.0  # a new pool waits this long at most for its first workers' forks
SPARE_BACKOFF_S = (1.0, 60.0)  # first and longest wait after a spare died by itself

_pools: weakref.WeakSet[LocalPool] = weakref.WeakSet()

CAPABILITIES = Capabilities()


class LocalPool(MessageHandler):
    """Worker processes plus the hub thread that watches them."""

    name = "local"
    capabilities = CAPABILITIES

    def __init__(self, settings: Settings, base: int) -> None:
        _reaper.hold_stdio()  # before any pipe of ours can take a closed fd 1
        self.base = base
        self.max_tasks_per_worker = settings.max_tasks_per_worker
        self.max_memory_per_worker = settings.max_memory_per_worker
        self.idle_timeout = settings.idle_timeout
        self._counts = Counts()
        self._outbox = Outbox()
        self._dispatch = Dispatcher(self._counts, self._outbox)
        self._lock = threading.RLock()
        self._workers: list[LocalWorker] = []
        # Processes of stopped workers' tasks in sessions of their own, killed
        # at the end of their grace: (deadline, strays), soonest first.
        self._strays: list[tuple[float, list[tuple[int, int]]]] = []
        self._reserved = 0  # extra workers asked for by streams and children
        self._spares = SPARES
        self._warm = False  # a first worker has been up: keep a spare from now on
        self._spare_next_at = 0.0  # a spare that died by itself: no new one before then
        self._spare_backoff = 0.0
        self._closed = False
        self._close_done = False  # close() went through to the end
        self._hub_gone = False  # the hub thread has left its loop for good
        self._hub_finishes = False  # close() left the rest of the close to the hub
        self._killed_at_close: set[LocalWorker] = set()
        self._pid = os.getpid()
        self._forked = False
        self._arena = _shm.Arena()  # blocks for large arguments (``_shm``)
        # Streams (their gates) whose batch was too big to send behind a running
        # one: encoding a batch only to find that out costs as much as sending it.
        self._too_big: weakref.WeakSet[Gate] = weakref.WeakSet()
        self._starter = _spawn.Starter(
            settings,
            self._counts,
            self._dispatch,
            initializer=_pickle_initializer(settings),
            serving=self._serving,
        )
        self._wake_r, self._wake_w = _wake_pipe()
        self._wake_pending = False
        self._selector: selectors.BaseSelector | None = None
        if os.name == "posix":
            self._selector = selectors.DefaultSelector()
            self._selector.register(self._wake_r.fileno(), selectors.EVENT_READ, ("wake", None))
        self._first_pass = threading.Event()
        self._hub = threading.Thread(target=self._run_hub, name="parstream-hub", daemon=True)
        mark_hub_thread(self._hub)
        try:
            _reaper.acquire(self)
            self._hub.start()
            _pools.add(self)
            # Back to the caller once the first workers' processes are forked:
            # what it does next (the rest of parstream's imports, in a new
            # process) then runs while they boot, instead of holding the
            # interpreter lock the hub needs to fork them (issue 12, cold start).
            self._first_pass.wait(FIRST_PASS_WAIT_S)
        except BaseException:  # Ctrl-C: nobody could ever close this pool
            with held():
                self.close()
            raise

    # -- the Backend surface ------------------------------------------------------

    @property
    def capacity(self) -> int:
        return self.base

    @property
    def forked(self) -> bool:
        return self._forked or self._pid != os.getpid()

    @property
    def start_error(self) -> BaseException | None:
        return self._starter.error

    def usable(self) -> str | None:
        return unusable(self._pid, self._closed, "its workers")

    def prepare(self, fn: Callable[..., Any]) -> FnHandle:
        return FnHandle(fn, ship(fn))

    def submit(self, job: Job) -> None:
        worker: LocalWorker | None = None
        try:
            with self._lock:
                why = self.usable()
                if why is not None:
                    raise BackendClosed(why)
                self._starter.work_arrived()
                self._dispatch.add(job)
                worker = self._idle_worker(held=job.urgent)
                if (
                    worker is None
                    or (job.gate is not None and not job.gate.admits())
                    or not ((job.urgent and self._reserved) or self._has_room())
                    # A worker just freed (or ready) that the hub has not yet
                    # given the queued work: first come, first served.
                    or (not job.urgent and self._dispatch.queue and self._dispatch.any_admitted())
                ):
                    self._dispatch.enqueue(job)
                    self._wake()
                    return
                self._assign(worker, job)
            self._send(worker, job)
            if job.timeout is not None:
                # The hub keeps the deadlines, and may be asleep until a later
                # one (or for good): it must see this one. (A batch with a
                # timeout tells nothing before its first flush, ~20 ms on.)
                self._wake()
        except BaseException:
            # Ctrl-C in this (the caller's) thread once the worker was taken,
            # while the batch was being encoded or written: the worker must not
            # stay busy for ever with a batch it never got whole, and the call
            # that was interrupted does not run. A kill like any other.
            if worker is not None and worker.job is job and not worker.delivered:
                with held():
                    self.kill(job, None)
            raise

    def kill(self, job: Job, reason: BaseException | None, *, grace: float = 0.0) -> None:
        if self.forked:
            return  # never signal the parent's workers from a forked child
        with self._lock:
            worker: LocalWorker | None = self._dispatch.kill_target(job, reason)
            if worker is not None:
                worker.kill_cause = "kill"
                if grace > 0:
                    worker.kill_deadline = time.monotonic() + grace
                    if not worker.exited:
                        # The task's subprocesses too: its group, and those
                        # in a group of their own, noted before the worker
                        # ends and they stop being its descendants.
                        worker.strays = _spawn.strays(worker.pid)
                        _spawn.kill_strays(worker.strays, signal.SIGTERM)
                        _reaper.term_group(worker.pid)
                else:
                    run_of(job).killed = True
                    if not worker.exited:
                        _spawn.kill_tree(worker.pid)
            self._wake()

    def cancel(self, job: Job) -> bool:
        with self._lock:
            return job.state is not None and self._dispatch.withdraw(job)

    def reserve(self, n: int) -> None:
        if self._forked:
            return
        with self._lock:
            self._reserved += n
            self._wake()

    def release(self, n: int) -> None:
        if self._forked:
            return
        with self._lock:
            self._reserved = max(0, self._reserved - n)
            self._wake()  # extra workers may now be surplus: start their idle clocks

    def check_node(self, node: str) -> str:
        raise ValueError(f"node={node!r}: the local backend has no nodes")

    def capacity_on(self, node: str) -> int:
        return self.capacity

    def worker_of(self, job: Job) -> Worker | None:
        run = run_of(job)
        worker: LocalWorker | None = None if run is None else run.holder
        if worker is None or worker.exited or worker.state != "busy" or not worker.begun():
            return None  # handed over, not begun (a death now queues it again), or dead
        return Worker(id=f"pid-{worker.pid}", pid=worker.pid, busy=True)

    def workers(self) -> list[Worker]:
        with self._lock:
            return [
                Worker(id=f"pid-{w.pid}", pid=w.pid, busy=w.state == "busy")
                for w in self._workers
                if w.pid and w.state not in ("dead", "spare")
            ]

    def nodes(self) -> list[Node]:
        return []

    def counts(self) -> Counts:
        with self._lock:
            return Counts(**vars(self._counts))

    def restart_workers(self) -> None:
        """Retire every idle worker and every busy one once its job ends.

        A worker still starting has run no user code unless there is an
        initializer: it stays (retiring it too made a loop of restarts start
        workers faster than they could come up, without bound). As a restart
        is how a new plugin directory or variable reaches the workers, one
        that started with another sys.path, directory or environment is sent
        the current ones when it is READY, before any task."""
        fresh_start = self._starter.initializer is None
        context = _spawn.start_context() if fresh_start else None
        with self._lock:
            for w in self._workers:
                if w.state == "spare":
                    # It has run no user code: killed at once. Asked to stop,
                    # one still booting read the STOP only once booted, and
                    # a loop of restarts piled booting interpreters up.
                    w.state = "retiring"
                    w.kill_cause = "retire"
                    if not w.exited:
                        _spawn.kill_spare(w.pid)
                elif w.state == "idle":
                    self._retire(w)
                elif w.state == "starting" and fresh_start:
                    if w.started_with != context:
                        w.context_due = context
                else:
                    w.retire_requested = True  # after the current batch
            self._wake()

    def close(self) -> None:
        if self.forked:
            self._forget_after_fork()
            return
        # Ctrl-C waits until the pool is closed; and a close cut short all
        # the same (an exception in a kill) is finished by the next call,
        # not taken for done: the workers, the hub and the reaper's hold
        # would otherwise live as long as the process.
        with held():
            with self._lock:
                if self._close_done:
                    return
                if not self._closed:
                    self._closed = True
                    self._dispatch.close_queue()
                workers = list(self._workers)
                for w in workers:
                    if w in self._killed_at_close:
                        continue
                    w.kill_cause = "close"
                    if w.exited:
                        pass
                    elif w.state == "spare":
                        _spawn.kill_spare(w.pid)
                    else:
                        _spawn.kill_tree(w.pid or w.process.pid)
                        _spawn.kill_strays(w.strays)
                        w.strays = []  # (done: not again at its death)
                    self._killed_at_close.add(w)
                # Stopped workers' strays still in their grace: the close ends it.
                pending, self._strays = self._strays, []
                for _, found in pending:
                    _spawn.kill_strays(found)
            self._wake()
            if self._hub.ident is not None:
                on_hub = threading.current_thread() is self._hub
                if not on_hub:
                    self._hub.join(timeout=HUB_EXIT_WAIT_S)
                with self._lock:
                    if not self._hub_gone:
                        # Still settling its workers' deaths (a loaded
                        # machine, or this is the hub: a finaliser it ran):
                        # the hub owns their pipes, sentinels and slots, and
                        # finishes the close as it leaves. Closing them from
                        # here too closed numbers that other pools' new pipes
                        # had reused, crossing their results; reaped here,
                        # the hub never saw them die and spun for good.
                        self._hub_finishes = True
                        return
                self._outbox.flush()  # anything the hub could not deliver
            self._finish_close(workers)

    def _finish_close(self, workers: list[LocalWorker]) -> None:
        """What is left of a close once the hub has gone (or never ran)."""
        for w in workers:
            if not w.exited:
                # Its death never settled (the hub crashed): its descriptors
                # are closed here, and the reaper forgets its group while
                # its pid is still ours.
                w.exited = True
                with w.send_lock:
                    w.close_ends()
                if w.pid and getattr(w.process, "reaped", True) is False:
                    _reaper.worker_gone(w.pid)
            w.process.join(timeout=1.0)
        self._arena.close()
        _reaper.release(self)
        self._close_done = True

    def _forget_after_fork(self) -> None:
        """In a forked child: drop the parent's workers without touching them."""
        if self._forked:
            return
        self._forked = True
        self._closed = True
        self._lock = threading.RLock()  # a parent thread may have held it at fork
        self._outbox.reset()
        for w in self._workers:
            w.close_ends()  # (not under its send lock: a parent thread may have held it)
        self._workers = []
        self._arena.close(forked=True)  # this process's mappings; the parent's stay
        self._dispatch.queue.clear()
        for end in (self._wake_r, self._wake_w):
            if isinstance(end, _WakeEnd):
                end._lock = threading.Lock()  # a parent thread may have held it at fork
            with contextlib.suppress(OSError):
                end.close()
        if self._selector is not None:
            with contextlib.suppress(OSError):
                self._selector.close()
            self._selector = None

    # -- dispatch -----------------------------------------------------------

    def _idle_worker(self, *, held: bool = False) -> LocalWorker | None:
        """An idle worker; with ``held``, also one kept for a child's restart
        (``CHILD_HOLD_S``), which takes only a child's run."""
        now = time.monotonic()
        for w in self._workers:
            if (
                w.state == "idle"
                and w.kill_cause is None
                and not w.exited  # dead, being settled
                and (held or w.held_until <= now)
            ):
                return w
        return None

    def _has_room(self) -> bool:
        """Fewer workers run a job (not one being killed) than ``max_workers``
        plus the reservations: workers a wide stream added and that are not
        retired yet must not run more at once than that."""
        running = sum(w.state == "busy" and w.kill_cause is None for w in self._workers)
        return running < self.base + self._reserved

    def _assign(self, worker: LocalWorker, job: Job) -> None:
        worker.seq += 1  # this slice's number: the worker writes it in its slot on reading it
        worker.state = "busy"
        worker.job = job
        worker.timed_out_index = None
        limit = None
        if self.max_tasks_per_worker:
            # A batch never takes a worker past its limit: the rest of the
            # job goes to the next worker once this one retires.
            limit = self.max_tasks_per_worker - worker.items_done
        run = self._dispatch.begin(job, worker, max_items=limit)
        # The first item's clock starts now, before the worker has unpickled
        # anything: a timeout bounds everything from dispatch to result.
        worker.item_started = run.started_at if job.timeout is not None else None

    def _send(self, worker: LocalWorker, job: Job, *, behind: bool = False) -> bool:
        """Send ``job``'s slice to ``worker``: its current one, or (``behind``)
        the one queued behind it; False if that one would not fit in the
        pipe's buffer (the busy worker reads nothing, and the hub must not
        wait for it: not sent)."""
        with worker.send_lock:
            seq = worker.next_seq if behind else worker.seq
            payload, block = self._encode(worker, job, seq)
            if behind and len(payload) > worker.pipe_room:
                if block is not None:
                    self._arena.unlend(block)
                return False
            try:
                if worker.freed:
                    _send_freed(worker)  # this batch's results may reuse them
                if block is not None:
                    # The items' large buffers: their descriptor goes first.
                    assert worker.fdchan is not None
                    _shm.send(worker.fdchan, block.fd, block.id)
                worker.conn.send_bytes(payload)
                worker.sent = max(worker.sent, seq)  # (``LocalWorker.delivered``)
            except OSError:
                # The worker died under us; its sentinel tells the hub, which
                # sees ``delivered`` is False and queues the whole slice again.
                # The block lent for it is free again (the hub's
                # ``worker_gone`` may have run before it was lent).
                if block is not None:
                    self._arena.unlend(block)
        return True

    def _encode(self, worker: LocalWorker, job: Job, seq: int) -> tuple[bytes, _shm.Block | None]:
        """The ``RUN`` frame, and the arena block lent for its large buffers."""
        run = run_of(job)
        shipped = job.fn.token
        fn_bytes: bytes | None = None
        evict: list[bytes] = []
        key = shipped.key
        if key in worker.fns:
            worker.fns.move_to_end(key)
        else:
            fn_bytes = shipped.data
            # A function by value (a bound method, a closure) whose every
            # task and stream has ended is dropped by the worker too, not
            # kept as one of FN_CACHE_SIZE copies (each call of
            # ``async_(obj.method)`` ships a copy of ``obj`` under a new key).
            evict = [k for k, ref in worker.fns.items() if ref() is None]
            for k in evict:
                del worker.fns[k]
            worker.fns[key] = weakref.ref(shipped)
            worker.unconfirmed.add(key)
            while len(worker.fns) > FN_CACHE_SIZE:
                evict.append(worker.fns.popitem(last=False)[0])
        report_each = job.timeout is not None
        if report_each and fn_bytes is not None:
            # Importing the function's module is not the item's time (a heavy
            # import would time out every first item): the clock restarts
            # when the worker says LOADED, with this bound on the loading.
            worker.item_started = run.started_at + FUNCTION_LOAD_S
        items = run.items[run.cursor : run.sent_end]
        collect = _wire.Collector() if worker.fdchan is not None else None
        # Ctrl-C while pickling, in the caller's thread, is not the items'
        # fault: it goes on up (on the hub, which gets no signals, a
        # KeyboardInterrupt can only be an item's own).
        main = threading.current_thread() is threading.main_thread()
        items_bytes: bytes | None
        try:
            # A task's few plain arguments skip cloudpickle's set-up (~3 us of
            # a round trip); anything else stops the plain pickler at once.
            plain = dumps_plain(items) if len(items) <= PLAIN_ITEMS else None
            items_bytes = plain if plain is not None else dumps(items, collect)
        except BaseException as exc:
            if main and isinstance(exc, KeyboardInterrupt):
                raise
            items_bytes = None
        if items_bytes is None:
            # Some arguments cannot be pickled: each such item fails alone (the
            # worker reports the stand-in's error in its place, keeping order).
            bad: dict[int, Any] = {}
            for i, args in enumerate(items):
                try:
                    dumps(args)
                except BaseException as cause:
                    if main and isinstance(cause, KeyboardInterrupt):
                        raise
                    bad[i] = BadArgs(culprit_error(args if job.star else (args,), cause))
            with self._lock:
                items = self._dispatch.replace_bad(job, bad)
            collect = _wire.Collector() if worker.fdchan is not None else None
            items_bytes = dumps(items, collect)
        block: _shm.Block | None = None
        buffers: tuple[int, list[int]] | None = None
        if collect is not None and collect.buffers:
            try:
                block = self._arena.lend(collect.buffers, worker)
                buffers = (block.id, [b.nbytes for b in collect.buffers])
            except OSError:  # out of memory or descriptors: through the pipe
                items_bytes = dumps(items)
        message = _wire.RunMessage(
            key=key,
            fn_bytes=fn_bytes,
            n_items=len(items),
            items_bytes=items_bytes,
            star=job.star,
            report_each=report_each,
            evict=evict,
            has_bad=run.has_bad,
            log_level=logging.getLogger().getEffectiveLevel(),
            buffers=buffers,
            whole=not job.returnable,
        )
        return _wire.encode_run(seq, message), block

    def _dispatch_queued(self) -> None:
        while True:
            with self._lock:
                if not self._dispatch.queue or self._closed:
                    return
                worker = self._idle_worker()
                room = self._has_room()
                if worker is not None and room:
                    job = self._dispatch.take()
                else:
                    # Children's runs only: on a worker kept for a child's
                    # restart, or past the count (a reserved worker took other
                    # work meanwhile). Workers a wide stream added and that
                    # are not yet retired take nothing more than the count.
                    if worker is None:
                        worker = self._idle_worker(held=True)
                    if worker is None or not (room or self._reserved):
                        break
                    job = self._dispatch.take(urgent_only=True)
                if job is None:
                    return
                self._assign(worker, job)
            # The job's on_started before its RUN: a future is running before
            # its worker can begin (else a result could be seen first).
            self._outbox.flush()
            self._send(worker, job)
        while PREFETCH:
            with self._lock:
                if self._closed:
                    return
                found = self._behind_whom()
                if found is None:
                    return
                worker, job = found
                self._queue_behind(worker, job)
            if not self._send(worker, job, behind=True):
                with self._lock:  # too big to wait in the pipe: back to the queue
                    assert job.gate is not None
                    self._too_big.add(job.gate)  # its stream's chunks are alike: none tried again
                    if worker.next_job is job:
                        worker.next_job = None
                        self._dispatch.unassign(job)
                        self._dispatch.enqueue(job, front=True)

    def _behind_whom(self) -> tuple[LocalWorker, Job] | None:
        """A queued job to send behind a busy worker's running slice, so that
        the worker goes on to it without waiting a round trip (lock held).

        Only a stream's chunk of several items without a timeout, behind a
        chunk of the same stream (the same gate): a stream is only ever
        killed whole, so killing the worker for the queued chunk kills
        nothing the stream still wants. Not while a worker is starting (it
        would take the chunk soon), nor with per-worker limits, nor behind a
        batch whose worker may yet fail to load the function."""
        if self.max_tasks_per_worker or self.max_memory_per_worker:
            return None
        busy = []
        for w in self._workers:
            if w.state == "starting":
                return None
            if (
                w.state == "busy"
                and w.job is not None
                and w.next_job is None
                and w.delivered
                and w.kill_cause is None
                and not w.retire_requested
                and not run_of(w.job).killed
            ):
                busy.append(w)
        if not busy:
            return None
        for job in self._dispatch.queue:
            run = run_of(job)
            if (
                job.timeout is None
                and job.gate is not None
                and len(run.items) - run.cursor >= 2
                and not run.alone()
                and run.isolate_until <= run.cursor
                and job.gate not in self._too_big
            ):
                key = job.fn.token.key
                for w in busy:
                    assert w.job is not None
                    if w.job.gate is job.gate and key in w.fns and key not in w.unconfirmed:
                        self._dispatch.queue.remove(job)
                        return w, job
            if job.gate is None or job.gate.admits():
                return None  # next in line for a free worker: nothing jumps ahead of it
        return None

    def _queue_behind(self, worker: LocalWorker, job: Job) -> None:
        """``job``'s next slice goes to ``worker`` behind its running one (lock held)."""
        worker.next_job = job
        worker.next_seq = worker.seq + 1
        self._dispatch.begin(job, worker, queued=True)

    def _take_next(self, worker: LocalWorker) -> bool:
        """The running slice ended: the one queued behind it, if any, runs now
        (the worker reads it next). False if there is none (lock held)."""
        job = worker.next_job
        if job is None or worker.kill_cause is not None:
            return False  # a dying worker's queued slice is settled at its death
        worker.next_job = None
        worker.job = job
        worker.seq = worker.next_seq
        worker.timed_out_index = None
        worker.item_started = None
        self._dispatch.activate(job)
        return True

    # -- the hub thread -----------------------------------------------------

    def _wake(self) -> None:
        if not self._wake_pending:
            self._wake_pending = True
            with contextlib.suppress(OSError):
                self._wake_w.send_bytes(b"")

    def _run_hub(self) -> None:
        try:
            self._run_hub_loop()
        finally:
            with self._lock:
                self._hub_gone = True
                finish = self._hub_finishes
            if finish:
                self._outbox.flush()
                self._finish_close(list(self._killed_at_close | set(self._workers)))

    def _run_hub_loop(self) -> None:
        try:
            self._hub_loop()
        except BaseException:  # pragma: no cover - a bug in the hub itself
            self._first_pass.set()
            log.exception("parstream hub thread crashed; killing its workers")
            err = ParstreamInternalError("the pool's hub thread crashed; see the parstream log")
            with self._lock:
                self._closed = True
                jobs = list(self._dispatch.queue) + [
                    j for w in self._workers for j in (w.job, w.next_job) if j is not None
                ]
                self._dispatch.queue.clear()
                for w in list(self._workers):
                    if not w.exited:
                        _spawn.kill_tree(w.pid or w.process.pid)
                for job in jobs:
                    run = run_of(job)
                    run.killed = True
                    run.kill_reason = err
                    self._dispatch.finish_killed(job)
            self._outbox.flush()
            self._close_wake_pipe()
            _reaper.release(self)

    def _hub_loop(self) -> None:
        warm = False
        while True:
            with self._lock:
                if self._closed and not self._workers:
                    self._close_selector()
                    done = True
                else:
                    done = False
                    self._spawn_as_needed()
                    timeout = self._next_timeout()
            self._outbox.flush()
            if done:
                self._close_wake_pipe()
                return
            if not warm:
                # The first workers are starting (~30 ms): import what the
                # first dispatch needs now, not between READY and RUN.
                warm = True
                self._first_pass.set()
                warm_up()
            deaths: list[LocalWorker] = []
            for what, w in self._wait(timeout):
                if w is None:
                    # Drain first, then clear the flag: a wake() between the two
                    # would otherwise leave the flag set and no byte to wake us.
                    wake: Any = self._wake_r
                    with contextlib.suppress(OSError, EOFError):
                        while wake.poll():
                            wake.recv_bytes()
                    self._wake_pending = False
                    continue
                if what == "conn":
                    # One message per wake-up: the selector is level-triggered,
                    # so more data wakes it again at once. (Connection.poll()
                    # would build a new selector per call, ~30 us each.)
                    if self._selector is not None:
                        self._read_one(w)
                    else:
                        self._drain(w)
                else:
                    deaths.append(w)
            for w in deaths:
                self._on_death(w)
            # Results to their callers first: the housekeeping below (and
            # the loop's top) would otherwise stand between a worker's reply
            # and the thread waiting for it.
            self._outbox.flush()
            self._check_deadlines()
            self._dispatch_queued()
            for w in self._workers:
                if w.stop_due:
                    w.stop_due = False
                    self._send_stop(w)
                if w.freed and w.state in ("idle", "busy"):
                    with w.send_lock, contextlib.suppress(OSError):
                        _send_freed(w)

    def _wait(self, timeout: float | None) -> list[tuple[str, LocalWorker | None]]:
        """Wait for pipes and sentinels: a persistent epoll/kqueue selector on
        POSIX (no per-wake set-up), ``connection.wait`` elsewhere."""
        if self._selector is not None:
            return [key.data for key, _ in self._selector.select(timeout)]
        objs: dict[Any, tuple[str, LocalWorker | None]] = {self._wake_r: ("wake", None)}
        with self._lock:
            for w in self._workers:
                objs[w.conn] = ("conn", w)
                objs[w.process.sentinel] = ("sentinel", w)
        from multiprocessing import connection

        return [objs[o] for o in connection.wait(list(objs), timeout)]

    def _watch(self, worker: LocalWorker) -> None:
        if self._selector is not None:
            self._selector.register(worker.conn.fileno(), selectors.EVENT_READ, ("conn", worker))
            self._selector.register(
                worker.process.sentinel, selectors.EVENT_READ, ("sentinel", worker)
            )

    def _unwatch(self, worker: LocalWorker) -> None:
        if self._selector is not None:
            for fd in (worker.conn.fileno(), worker.process.sentinel):
                with contextlib.suppress(KeyError, ValueError, OSError):
                    self._selector.unregister(fd)

    def _close_wake_pipe(self) -> None:
        """The hub is leaving for good: nothing reads the pipe any more, and a
        late ``_wake()`` on a closed end fails quietly (OSError)."""
        for end in (self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                end.close()

    def _close_selector(self) -> None:
        if self._selector is not None:
            self._selector.close()
            self._selector = None

    def _next_timeout(self) -> float | None:
        now = time.monotonic()
        best: float | None = None
        next_start = self._starter.next_start_at
        if next_start > now and self._wanted() > 0:
            best = next_start - now
        if self._spares and self._warm and self._spare_next_at > now:
            wait = self._spare_next_at - now  # a spare to start again after a back-off
            best = wait if best is None else min(best, wait)
        if self._strays:
            wait = max(0.0, self._strays[0][0] - now)
            best = wait if best is None else min(best, wait)
        for w in self._workers:
            dl: float | None = None
            if w.kill_deadline is not None:
                dl = w.kill_deadline
            elif w.state == "busy" and w.job is not None and w.item_started is not None:
                if w.job.timeout is not None and w.kill_cause is None:
                    dl = w.item_started + w.job.timeout
            elif w.state == "idle" and w.held_until > now and self._dispatch.queue:
                dl = w.held_until  # free for other work then
            elif w.state == "idle" and self._surplus():
                dl = w.idle_since + self.idle_timeout
            if dl is not None:
                wait = max(0.0, dl - now)
                best = wait if best is None else min(best, wait)
        return MAX_WAIT_S if best is None else min(best, MAX_WAIT_S)

    def _check_deadlines(self) -> None:
        now = time.monotonic()
        with self._lock:
            if self._strays and now >= self._strays[0][0]:
                due = [found for at, found in self._strays if now >= at]
                self._strays = [(at, found) for at, found in self._strays if now < at]
                for found in due:
                    _spawn.kill_strays(found)
            for w in self._workers:
                job = w.job
                if w.kill_deadline is not None and now >= w.kill_deadline:
                    w.kill_deadline = None
                    _spawn.kill_tree(w.pid)
                    _spawn.kill_strays(w.strays)
                    w.strays = []  # (done: not again at its death)
                elif (
                    w.state == "busy"
                    and job is not None
                    and w.kill_cause is None
                    and job.timeout is not None
                    and w.item_started is not None
                    and now >= w.item_started + job.timeout
                ):
                    late = _overrunning(w, job, job.timeout, now)
                    if late is not None:
                        w.kill_cause = "timeout"
                        w.timed_out_index = late
                        _spawn.kill_tree(w.pid)
                elif (
                    w.state == "idle"
                    and now - w.idle_since >= self.idle_timeout
                    and self._surplus()
                ):
                    self._retire(w)

    # -- workers: how many, starting, retiring, deaths -----------------------------

    def _live(self) -> list[LocalWorker]:
        return [w for w in self._workers if w.state in ("starting", "idle", "busy")]

    def _serving(self) -> bool:
        """Whether a ready worker will take queued work: an idle one, or one
        busy with work that ends (not a child's run, which may never)."""
        for w in self._workers:
            if w.state == "idle":
                return True
            if w.state == "busy" and w.job is not None and not w.job.urgent:
                return True
        return False

    def _surplus(self) -> bool:
        """More live workers than the base size plus the reservations."""
        return len(self._live()) > self.base + self._reserved

    def _wanted(self) -> int:
        if self._closed:
            return 0
        # One pass, no lists: the hub asks this at every turn.
        live = idle_or_starting = 0
        for w in self._workers:
            state = w.state
            if state == "busy":
                live += 1
            elif state == "idle" or state == "starting":
                live += 1
                idle_or_starting += 1
        # Keep the base size warm; grow up to the reservations when work waits.
        # A child's run (urgent) waiting with every reserved worker live means
        # its own worker took other work meanwhile (while it restarted): one
        # more worker for it (the spare, at once), which the surplus rule
        # retires once idle; at most as many more as there are reservations,
        # so restarts under a backlog cannot grow the pool without bound.
        queued = len(self._dispatch.queue)
        if self._starter.gave_up and not queued:
            # Starts fail for good (an initializer that raises, say), and the
            # work that waited has failed: the next work tries again
            # (``Starter.work_arrived``); an idle pool does not start a
            # process every ~2 s for ever meanwhile. (A start that failed
            # once, a worker killed while starting, is retried as ever.)
            return 0
        want = max(live, self.base)
        shortfall = queued - idle_or_starting
        if shortfall > 0:
            cap = self.base + self._reserved
            if self._reserved and live >= cap:
                # Only for the children's runs no idle or starting worker will take.
                extra = min(shortfall, self._dispatch.urgent_waiting() - idle_or_starting)
                if extra > 0:
                    cap = min(live + extra, self.base + 2 * self._reserved)
            want = max(want, min(live + shortfall, cap))
        return want - live

    def _spawn_as_needed(self) -> None:
        if self._closed:
            return
        wanted = self._wanted()
        if wanted > 0:
            for spare in [w for w in self._workers if w.state == "spare"]:
                if wanted <= 0 or time.monotonic() < self._starter.next_start_at:
                    break  # (backing off after failed starts: so is promoting)
                if self._starter.promote(spare):
                    wanted -= 1
                else:
                    self._retire(spare)  # started in another sys.path, directory or environment
            for worker in self._starter.start(wanted):
                self._workers.append(worker)
                self._watch(worker)
        self._keep_a_spare()

    def _keep_a_spare(self) -> None:
        """Keep a spare once a first worker is up and has its first work (a
        spare's start must not slow its start, nor the first result), unless
        starts are failing.

        A spare is a worker process booted up to its initializer and then
        waiting; when a worker dies or more are wanted, the spare is promoted
        at once instead of a new process being started (issue 12: a crash's
        replacement serves within a few ms, not a process start's ~50 ms).
        It runs no user code before that, is not in ``workers()``, and counts
        as started only when promoted; it dies with the pool like any worker.
        """
        if not self._spares or self._starter.error is not None:
            return
        if not self._warm:
            if not any(w.state in ("idle", "busy") for w in self._workers):
                return
            self._warm = True
        for w in self._workers:
            if w.state == "spare":
                return
        if time.monotonic() < self._spare_next_at:
            return
        spare = self._starter.start_spare()
        if spare is None:
            self._spare_failed()
            return
        self._workers.append(spare)
        self._watch(spare)

    def _spare_failed(self) -> None:
        """A spare could not start, or died by itself: wait before the next."""
        low, high = SPARE_BACKOFF_S
        self._spare_backoff = min(max(self._spare_backoff * 2, low), high)
        self._spare_next_at = time.monotonic() + self._spare_backoff

    def _after_idle(self, worker: LocalWorker) -> None:
        """Recycle a worker that has just become idle, if its limits say so."""
        with self._lock:
            if worker.state != "idle":
                return
            if (
                worker.retire_requested
                or (self.max_tasks_per_worker and worker.items_done >= self.max_tasks_per_worker)
                or (
                    self.max_memory_per_worker
                    and _spawn.rss(worker.pid) > self.max_memory_per_worker
                )
            ):
                self._retire(worker)

    def _retire(self, worker: LocalWorker) -> None:
        """Take ``worker`` out of service now (under ``self._lock``: no job
        reaches it after this) and have it stop. The STOP itself goes from
        the hub thread, the one that closes a dead worker's connection
        (``_on_death``): from another thread (``restart_workers``) it could
        land on a descriptor number closed and reused meanwhile."""
        worker.state = "retiring"
        worker.kill_cause = "retire"
        if threading.current_thread() is self._hub:
            self._send_stop(worker)
        else:
            worker.stop_due = True
            self._wake()

    def _send_stop(self, worker: LocalWorker) -> None:
        # What its tasks started in a session of their own: killed when it
        # has ended, as its group is (``_on_death``).
        worker.strays = _spawn.strays(worker.pid)
        # It ends at once, its exit hooks run (``_worker.end_now``); one
        # that hangs there is killed, tree and all, rather than kept for good.
        worker.kill_deadline = time.monotonic() + STOP_GRACE_S
        try:
            worker.conn.send_bytes(bytes((_wire.STOP,)))
        except OSError:
            _spawn.kill_tree(worker.pid)

    def _on_death(self, worker: LocalWorker) -> None:
        with self._lock:
            worker.exited = True  # reaped below
        self._drain(worker)
        self._unwatch(worker)
        with worker.send_lock:
            delivered = worker.delivered
            worker.conn.close()
            if worker.fdchan is not None:
                worker.fdchan.close()  # frees any descriptor still in flight
        _reaper.worker_gone(worker.pid)  # before the join: the group id is still ours
        if worker.strays:
            with self._lock:
                deadline = worker.kill_deadline if worker.kill_cause == "kill" else None
                if deadline is not None and time.monotonic() < deadline:
                    # A graceful stop: they have had SIGTERM, and the rest of the grace.
                    self._strays.append((deadline, worker.strays))
                    self._strays.sort(key=lambda entry: entry[0])
                else:
                    _spawn.kill_strays(worker.strays)
        worker.process.join(timeout=1.0)
        self._arena.worker_gone(worker)  # its mappings died with it
        exitcode = worker.process.exitcode
        slot = worker.slot
        begun_seq, begun, window = slot.read() if slot is not None else (-1, -1, None)
        journal = slot.journal() if slot is not None and begun_seq == worker.seq else None
        if slot is not None:
            slot.close()
        with self._lock:
            if worker in self._workers:
                self._workers.remove(worker)
            cause = worker.kill_cause
            was_starting = worker.state == "starting"
            if worker.state == "spare" and cause is None and not self._closed:
                self._spare_failed()
            worker.state = "dead"
            job, worker.job = worker.job, None
            if was_starting and cause is None and not self._closed:
                self._starter.died_starting(worker, exitcode)
            behind, worker.next_job = worker.next_job, None
            if behind is not None:
                # Queued behind the running slice, never begun: it runs
                # elsewhere (after the running one, which settles next and
                # goes first), unless the worker was killed for it or closed.
                self._dispatch.unassign(behind)
                if cause in ("kill", "close") or run_of(behind).killed:
                    run_of(behind).killed = True
                    end: End = "closed" if cause == "close" else "killed"
                    self._dispatch.finish_killed(behind, end)
                else:
                    self._dispatch.enqueue(behind, front=True)
            if job is None:
                return
            self._dispatch.unassign(job)
            death = Death(
                crash=_spawn.crash_error(worker.pid, exitcode),
                worker=f"pid {worker.pid}",
                cause=cause,
                delivered=delivered,
                began=slot is None or begun_seq == worker.seq,
                begun=begun if slot is not None else None,
                window=window,
                journal=journal,
                timed_out_index=worker.timed_out_index,
            )
            self._dispatch.settle_death(job, death)

    def _slice_done(self, worker: LocalWorker, job: Job) -> None:
        """The worker finished its slice of ``job`` (lock held)."""
        worker.job = None
        self._dispatch.unassign(job)
        if self._take_next(worker):
            self._dispatch.slice_done(job)
            return
        worker.state = "idle"
        worker.idle_since = time.monotonic()
        if job.urgent:  # kept a moment for the child's restart, not taken by queued work
            worker.held_until = worker.idle_since + CHILD_HOLD_S
        if worker.kill_cause == "kill" and worker.kill_deadline is not None:
            # A graceful shutdown the reply won: the worker has had SIGTERM,
            # so it is not reused; kill it now rather than at the deadline.
            worker.kill_deadline = None
            _spawn.kill_tree(worker.pid)
        self._dispatch.slice_done(job)

    def _requeue(self, worker: LocalWorker, job: Job) -> None:
        """Take the slice back from a live worker and queue the job first (lock held)."""
        worker.job = None
        self._dispatch.unassign(job)
        if not self._take_next(worker):
            worker.state = "idle"
            worker.idle_since = time.monotonic()
        self._dispatch.enqueue(job, front=True)
        self._wake()


class _WakeEnd:
    """One end of the hub's wake-up pipe on POSIX, with the few methods of a
    ``multiprocessing`` ``Connection`` the hub uses: importing
    ``multiprocessing.connection`` costs ~4 ms before the first worker could
    start (issue 12), and only the selector-less path needs it."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        # A wake-up racing the close must not write to a reused descriptor.
        self._lock = threading.Lock()

    def fileno(self) -> int:
        return self.fd

    def send_bytes(self, data: bytes) -> None:
        with self._lock:
            os.write(self.fd, data or b"\0")  # fd -1 once closed: OSError

    def poll(self) -> bool:
        return _wire.wait_readable(self.fd)

    def recv_bytes(self) -> bytes:
        return os.read(self.fd, 4096)

    def close(self) -> None:
        with self._lock:
            fd, self.fd = self.fd, -1
        if fd >= 0:
            os.close(fd)


def _overrunning(worker: LocalWorker, job: Job, timeout: float, now: float) -> int | None:
    """At the deadline of the item the hub last knew running (``run.cursor``,
    since ``worker.item_started``): the position of the item that overran
    its timeout, or None when the worker's slot shows a later item began,
    and recently: its deadline is then that item's start plus the timeout
    (kept in ``item_started``). The worker reports results in flushes, not
    per item (``run_timed``); killing for the earlier item would blame it
    for a timeout it did not overrun and rerun the item just begun."""
    run = run_of(job)
    slot = worker.slot
    if slot is None:
        return run.cursor
    seq, begun, window = slot.read()
    if seq != worker.seq or window is not None:
        return run.cursor
    position = run.slice_start + begun - 1
    if position < run.cursor:
        return run.cursor
    # The item running (the one the hub knows, or a later one): its own
    # start, not ``item_started``, which an early flush (``send_early``)
    # leaves at an earlier item's.
    since = slot.started()
    if now < since + timeout:
        worker.item_started = since
        return None
    return position


def _wake_pipe() -> tuple[Any, Any]:
    """The hub's wake-up pipe: (read end, write end)."""
    if os.name == "posix":
        r, w = os.pipe()
        return _WakeEnd(r), _WakeEnd(w)
    import multiprocessing

    return multiprocessing.Pipe(duplex=False)


def _pickle_initializer(settings: Settings) -> bytes | None:
    if settings.initializer is None:
        return None
    try:
        return bytes(dumps((settings.initializer, tuple(settings.initargs))))
    except Exception as cause:
        import pickle

        fn = settings.initializer
        name = getattr(fn, "__qualname__", type(fn).__qualname__)
        raise pickle.PicklingError(
            f"initializer ({name}) or its initargs could not be pickled: {cause}"
        ) from cause


def _send_freed(worker: LocalWorker) -> None:
    """Tell ``worker`` which of its result blocks this process no longer maps
    (``_shm.watch``); under ``worker.send_lock``."""
    freed, ids = worker.freed, []
    with contextlib.suppress(IndexError):
        while True:
            ids.append(freed.popleft())
    if ids:
        worker.conn.send_bytes(_wire.encode(_wire.FREED, ids))


def _after_fork_in_child() -> None:
    for pool in list(_pools):
        pool._forget_after_fork()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
