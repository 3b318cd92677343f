"""The policy every backend shares: the queue, gates, slices, and who is to
blame when a worker dies.

A backend owns its workers (processes, Ray tasks) and the thread that
watches them; this module owns what happens to *jobs*, so every backend
attributes crashes the same way::

    submit(job) -> add(): a Run on job.state -> enqueue()
    free worker -> take() (the first job whose gate admits it)
                -> begin(job, holder): the slice [cursor, sent_end) to send
    results     -> deliver(job, values, errors): cursor moves on, sink told
    slice ends  -> unassign(); slice_done(): finished, returned, or queued again
    worker dies -> unassign(); settle_death(job, Death(...)): from what the
                   backend knows (how many items of the slice began, results
                   it left behind), the culprit fails alone, unrun items are
                   queued again, nothing runs twice
    kill        -> finish_killed(): the reason for every unreported item

Sink calls are never made here: they are posted to an ``Outbox`` that the
backend's event thread flushes outside its lock. Every method runs under the
backend's lock (the ``Outbox`` has its own).
"""

from __future__ import annotations

import collections
import logging
import os
import threading
import time
import types
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from parstream._backends._codec import rebuild
from parstream._errors import TaskTimeout, WorkerCrashed, WorkerStartFailed

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping

    from parstream._backend import Counts, End, Job

log = logging.getLogger("parstream")

Errors = dict[int, Any]  # position -> exception, or (exception, traceback text)


class Outbox:
    """Sink calls waiting for the event thread, in order."""

    def __init__(self) -> None:
        self._notes: collections.deque[tuple[Callable[..., None], tuple[Any, ...]]] = (
            collections.deque()
        )
        self._lock = threading.Lock()

    def post(self, fn: Callable[..., None], *args: Any) -> None:
        self._notes.append((fn, args))

    def __bool__(self) -> bool:
        return bool(self._notes)

    def flush(self) -> None:
        """Run what was posted (on the event thread, no backend lock held)."""
        with self._lock:
            notes = self._notes
            while notes:
                fn, args = notes.popleft()
                try:
                    fn(*args)
                except Exception:  # pragma: no cover - a sink must not break the backend
                    log.exception("parstream: a job's completion handler failed")

    def reset(self) -> None:
        """After ``os.fork()``: the parent's notes are not the child's."""
        self._notes = collections.deque()
        self._lock = threading.Lock()


class Run:
    """A job's progress, on ``job.state``; written under the backend's lock."""

    __slots__ = (
        "counted",
        "cursor",
        "finished",
        "has_bad",
        "holder",
        "isolate",
        "isolate_from",
        "isolate_until",
        "items",
        "kill_reason",
        "killed",
        "sent_end",
        "sent_high",
        "slice_start",
        "started_at",
        "unexplained",
    )

    def __init__(self, job: Job) -> None:
        self.items = job.items  # copied before any stand-in replaces an item
        self.cursor = 0  # first item not yet reported
        self.sent_end = 0  # end of the slice on a worker
        self.sent_high = 0  # highest sent_end so far (for ``Counts.started``)
        self.slice_start = 0  # the cursor when the slice was sent
        self.isolate = False  # run one item at a time (after an ambiguous crash)
        self.isolate_from = 0  # run items one at a time from here ...
        self.isolate_until = 0  # ... up to here (a step of tiny items that crashed)
        self.has_bad = False  # some items were replaced by stand-ins
        self.finished = False
        self.killed = False
        self.kill_reason: BaseException | None = None
        self.holder: Any = None  # the backend's worker running the slice
        self.counted = False  # the slice counts against the job's gate
        self.started_at = 0.0  # when the slice was sent
        self.unexplained: Death | None = None  # a crash the items run alone may not repeat

    def alone(self) -> bool:
        return self.isolate or self.isolate_from <= self.cursor < self.isolate_until


def unusable(origin_pid: int, closed: bool, owns: str) -> str | None:
    """``Backend.usable()`` for a backend made in process ``origin_pid`` whose
    ``owns`` (its workers, a Ray connection) belong to that process."""
    if origin_pid != os.getpid():
        return (
            f"this Supervisor was created in process {origin_pid} and reached process "
            f"{os.getpid()} through os.fork(); {owns} belong to the parent. Create a new "
            "Supervisor in the child (parstream's module-level functions do so)"
        )
    if closed:
        return "the supervisor is closed"
    return None


def run_of(job: Job) -> Run:
    run: Run = job.state
    return run


@dataclass
class Death:
    """What a backend knows of a worker that died holding a job's slice.

    Attributes:
        crash: the error for the item that was running (a ``WorkerCrashed``).
        worker: how messages name the worker, e.g. ``"pid 4242"``.
        cause: why it died: ``"timeout"``, ``"kill"``, ``"close"``, or None
            (a crash).
        delivered: the slice reached the worker (False: send it again whole).
        began: the worker began the slice (it had it, and started reading it).
        begun: how many of the slice's items it began, exactly; None when the
            backend cannot tell (coarse attribution: several items run one at
            a time to find the culprit).
        window: for tiny items run a step at a time, the slice position where
            the running step began (the culprit is in ``window .. begun-1``).
        journal: ``(base, [(ok, value_or_failure), ...])``: results finished
            after the last ones delivered, from slice position ``base``.
        timed_out_index: the job position whose timeout killed the worker.
    """

    crash: BaseException
    worker: str = "worker"
    cause: str | None = None
    delivered: bool = True
    began: bool = True
    begun: int | None = None
    window: int | None = None
    journal: tuple[int, list[tuple[bool, Any]]] | None = None
    timed_out_index: int | None = None


class Dispatcher:
    """Jobs waiting and running, and what happens to them."""

    def __init__(self, counts: Counts, outbox: Outbox) -> None:
        self.counts = counts
        self.outbox = outbox
        self.queue: collections.deque[Job] = collections.deque()

    # -- the queue -------------------------------------------------------------

    def add(self, job: Job) -> None:
        job.state = Run(job)
        self.counts.submitted += len(job.items)

    def enqueue(self, job: Job, *, front: bool = False) -> None:
        """Queue ``job`` last, or (``front``, or a child's ``urgent`` run) at
        the front: behind the urgent jobs already waiting, so children's runs
        keep their order and stay ahead of everything else."""
        queue = self.queue
        if not (front or job.urgent):
            queue.append(job)
            return
        queue.insert(self.urgent_waiting(), job)

    def urgent_waiting(self) -> int:
        """Children's runs waiting: the urgent jobs at the front of the queue."""
        n = 0
        for job in self.queue:
            if not job.urgent:
                break
            n += 1
        return n

    def any_admitted(self) -> bool:
        """Whether a queued job could start now (its gate admits it): a new
        job must not take a free worker ahead of it."""
        return any(job.gate is None or job.gate.admits() for job in self.queue)

    def take(self, *, urgent_only: bool = False) -> Job | None:
        """The first queued job whose gate admits it, taken off the queue;
        with ``urgent_only``, a child's run or nothing."""
        if urgent_only:
            return self.queue.popleft() if self.urgent_waiting() else None
        for i, job in enumerate(self.queue):
            if job.gate is None or job.gate.admits():
                del self.queue[i]
                return job
        return None

    def _unqueue(self, job: Job) -> bool:
        """Take ``job`` off the queue; False if it is not there. At either end
        in O(1): cancelling many queued calls, oldest or newest first, must
        not scan the whole queue for each (quadratic: 14 s for 20,000)."""
        queue = self.queue
        if not queue:
            return False
        if queue[0] is job:
            queue.popleft()
            return True
        if queue[-1] is job:
            queue.pop()
            return True
        try:
            queue.remove(job)
        except ValueError:
            return False
        return True

    def withdraw(self, job: Job) -> bool:
        """Take ``job`` off the queue if no worker ever began it (``cancel``)."""
        run = run_of(job)
        if run.finished or run.killed or run.holder is not None or run.started_at:
            return False
        if not self._unqueue(job):
            return False
        run.finished = run.killed = True
        self.counts.killed += len(run.items) - run.cursor
        run.cursor = len(run.items)
        return True

    # -- a slice on a worker ------------------------------------------------------

    def begin(
        self, job: Job, holder: Any, *, max_items: int | None = None, queued: bool = False
    ) -> Run:
        """Give ``job``'s next slice to ``holder``; returns the run, whose
        ``cursor .. sent_end`` is the slice to send. ``queued``: the slice
        waits on ``holder`` behind the one it runs; ``activate`` when it starts."""
        run = run_of(job)
        if not queued:
            _count(job, run)
        run.holder = holder
        run.slice_start = run.cursor
        end = len(run.items) if not run.alone() else run.cursor + 1
        if run.cursor < run.isolate_from:
            end = min(end, run.isolate_from)  # a batch up to the crashed step
        if max_items is not None:
            end = min(end, run.cursor + max(1, max_items))
        run.sent_end = min(end, len(run.items))
        if run.sent_end > run.sent_high:
            self.counts.started += run.sent_end - max(run.sent_high, run.cursor)
            run.sent_high = run.sent_end
        run.started_at = time.monotonic()
        self.outbox.post(job.sink.on_started, run.started_at)
        return run

    def activate(self, job: Job) -> None:
        """A slice ``begin`` queued on its worker now runs there."""
        run = run_of(job)
        _count(job, run)
        run.started_at = time.monotonic()
        self.outbox.post(job.sink.on_started, run.started_at)

    def unassign(self, job: Job) -> None:
        """The slice left its worker (ended, or the worker died)."""
        run = run_of(job)
        if run.counted and job.gate is not None:
            job.gate.active -= 1
        run.counted = False
        run.holder = None

    def replace_bad(self, job: Job, bad: dict[int, Any]) -> list[Any]:
        """Put stand-ins at slice positions ``bad`` (items that cannot be sent);
        returns the slice's items."""
        run = run_of(job)
        if not run.has_bad:
            run.items = list(run.items)  # the caller's list stays as it was
            run.has_bad = True
        for pos, stand_in in bad.items():
            run.items[run.cursor + pos] = stand_in
        return run.items[run.cursor : run.sent_end]

    # -- outcomes ------------------------------------------------------------------

    def deliver(
        self, job: Job, values: list[Any], errors: Errors, seconds: float | None = None
    ) -> None:
        """The slice's next ``len(values)`` items are done (in ``seconds``, if known)."""
        if not values:
            return
        run = run_of(job)
        run.cursor += len(values)
        self.counts.failed += len(errors)
        self.counts.ok += len(values) - len(errors)
        if run.unexplained is not None and run.cursor >= run.isolate_until:
            self._unexplained(job)
        if not run.killed:
            self._post_results(job, values, errors, seconds)

    def _unexplained(self, job: Job) -> None:
        """Every item of a step in which a worker died ran again alone, and
        none died: the crash was no item's to keep (a kill from outside, or
        one that does not happen twice). Say so rather than let it vanish."""
        run = run_of(job)
        death, run.unexplained = run.unexplained, None
        assert death is not None
        log.warning(
            "parstream: a worker (%s) died while running items %d-%d of a batch "
            "(%r); they were run again one at a time, each to its end, and none "
            "died, so no item was failed for it",
            death.worker,
            job.first_index + run.isolate_from,
            job.first_index + run.isolate_until - 1,
            death.crash,
        )

    def _post_results(
        self, job: Job, values: list[Any], errors: Errors, seconds: float | None = None
    ) -> None:
        ready: Mapping[int, BaseException] = (
            {i: _ready(e) for i, e in errors.items()} if errors else _NO_ERRORS
        )
        self.outbox.post(job.sink.on_results, values, ready, seconds)

    def fail_next(self, job: Job, error: BaseException, counter: str) -> None:
        """Fail the item at the job's cursor with ``error``."""
        run = run_of(job)
        if run.cursor >= len(run.items):
            return
        run.cursor += 1
        run.unexplained = None  # (found: this one)
        if run.killed:
            return
        setattr(self.counts, counter, getattr(self.counts, counter) + 1)
        self.outbox.post(job.sink.on_results, [None], {0: error}, None)

    def slice_done(self, job: Job) -> None:
        """The worker finished its slice (after ``unassign``): the job ends,
        returns its unrun rest to the sink, or is queued for the rest."""
        run = run_of(job)
        if run.killed:
            self.finish_killed(job)
        elif run.cursor >= len(run.items):
            self._end(job, "finished", 0)
        elif job.returnable and not (run.alone() or run.has_bad):
            # The worker stopped at its time budget: the sink re-cuts the
            # unrun rest, so items that turned slow spread over every free
            # worker instead of staying on this one.
            unrun = len(run.items) - run.cursor
            self.counts.started -= max(0, run.sent_high - run.cursor)
            self.counts.submitted -= unrun
            run.cursor = len(run.items)
            self._end(job, "returned", unrun)
        else:
            self.queue.appendleft(job)

    def kill_target(self, job: Job, reason: BaseException | None) -> Any:
        """``kill``'s policy: None if there is nothing (more) to do, a job no
        worker held being ended here; else the holder whose worker the
        backend must stop (``reason`` is kept for the unreported items)."""
        run: Run | None = job.state
        if run is None or run.finished or run.killed:
            return None
        run.kill_reason = reason
        if run.holder is None:
            self.kill_queued(job, reason)
        return run.holder

    def kill_queued(self, job: Job, reason: BaseException | None) -> None:
        """``kill`` of a job no worker holds."""
        run = run_of(job)
        run.killed = True
        run.kill_reason = reason
        self._unqueue(job)
        self.finish_killed(job)

    def finish_killed(self, job: Job, end: End = "killed") -> None:
        """End a killed job: the reason for each unreported item, or drop them."""
        run = run_of(job)
        if run.finished:
            return
        run.finished = True
        n = len(run.items) - run.cursor
        reason = run.kill_reason
        if isinstance(reason, TaskTimeout):
            self.counts.timed_out += n
        elif isinstance(reason, WorkerStartFailed):
            self.counts.failed += n
        else:
            self.counts.killed += n
        run.cursor = len(run.items)
        if reason is not None and n > 0:
            self.outbox.post(
                job.sink.on_results, [None] * n, dict.fromkeys(range(n), reason), None
            )
            n = 0
        self.outbox.post(job.sink.on_done, end, n)

    def _end(self, job: Job, end: End, unrun: int) -> None:
        run_of(job).finished = True
        self.outbox.post(job.sink.on_done, end, unrun)

    def fail_queue(self, error: BaseException) -> None:
        """Every queued job fails with ``error`` (workers cannot be started)."""
        while self.queue:
            job = self.queue.popleft()
            run = run_of(job)
            run.killed = True
            run.kill_reason = error
            self.finish_killed(job)

    def close_queue(self) -> list[Job]:
        """The backend closes: queued jobs end as ``closed``."""
        queued = list(self.queue)
        self.queue.clear()
        for job in queued:
            run = run_of(job)
            run.killed = True
            self.finish_killed(job, "closed")
        return queued

    # -- a worker died holding a slice ----------------------------------------------

    def settle_death(self, job: Job, death: Death) -> None:
        """Settle ``job`` after its worker died (``unassign`` done)."""
        run = run_of(job)
        if run.finished:
            return
        if run.killed or death.cause in ("kill", "close"):
            run.killed = True
            self.finish_killed(job, "closed" if death.cause == "close" else "killed")
            return
        if not death.delivered or run.cursor >= run.sent_end:
            self.queue.appendleft(job)
            return
        if death.begun is not None:
            self._blame_exactly(job, death)
        else:
            self._blame_coarsely(job, death)
        if run.cursor >= len(run.items):
            self._end(job, "finished", 0)
        else:
            self.queue.appendleft(job)

    def timeout_error(self, job: Job, worker: str) -> TaskTimeout:
        index = job.first_index + run_of(job).cursor
        return TaskTimeout(
            f"item {index} ran longer than its timeout of {job.timeout} s; its worker "
            f"({worker}) was killed and replaced",
            index=index,
            timeout=job.timeout,
        )

    def _blame_exactly(self, job: Job, death: Death) -> None:
        """The backend knows how many items of the slice began: the last one
        began is the culprit, every later one never started and is queued
        again, so nothing runs twice. For tiny items run a step at a time
        (``window``), the items before the step are settled so, and the
        step's items run again one at a time, which finds the culprit."""
        run = run_of(job)
        if not death.began:
            return  # the worker never began this slice: queued again whole
        assert death.begun is not None
        end = min(run.slice_start + death.begun, run.sent_end)
        if death.window is not None:
            start = run.slice_start + death.window
            if start >= end or end <= run.cursor:
                return  # died between steps, after reporting what it ran
            self._settle_finished(job, death, run.cursor, start)
            run.isolate_from = max(start, run.cursor)
            run.isolate_until = max(run.isolate_until, end)
            if death.cause is None:  # not a kill parstream made
                run.unexplained = death
            return
        culprit = end - 1  # index in run.items
        if death.begun == 0:
            # Died while reading the batch (a function or argument whose
            # loading kills the process): find the culprit one item at a time.
            if run.sent_end - run.cursor == 1:
                culprit = run.cursor
            else:
                run.isolate = True
                return
        if culprit < run.cursor:
            return  # died between items, after reporting the last one it ran
        self._settle_finished(job, death, culprit, culprit)
        if run.cursor > culprit:
            return  # the last item begun had finished: nothing to blame
        if death.cause == "timeout":
            if culprit == death.timed_out_index:
                self.fail_next(job, self.timeout_error(job, death.worker), "timed_out")
            # else: the late item finished just before the kill, and the one
            # after it had barely begun; that one is queued again.
        else:
            self.fail_next(job, death.crash, "crashed")

    def _settle_finished(self, job: Job, death: Death, until: int, culprit: int) -> None:
        """Deliver the items finished before ``until``: from the journal where
        it has them, else as lost. None runs again."""
        run = run_of(job)
        base, entries = death.journal if death.journal is not None else (0, [])
        base += run.slice_start
        values: list[Any] = []
        errors: Errors = {}
        lost = WorkerCrashed(
            f"this item finished, but its result was lost: its worker ({death.worker}) "
            f"died while running item {job.first_index + culprit} of the same batch, "
            "before sending the results; the item was not run again",
            exitcode=getattr(death.crash, "exitcode", None),
            pid=getattr(death.crash, "pid", None),
        )
        position = run.cursor
        raised = 0  # items whose own exception the journal kept
        while position < until or base <= position < base + len(entries):
            if base <= position < base + len(entries):
                ok, outcome = entries[position - base]
                if ok:
                    values.append(outcome)
                else:
                    errors[len(values)] = outcome
                    values.append(None)
                    raised += 1
            else:
                errors[len(values)] = lost
                values.append(None)
            position += 1
        if values:
            run.cursor += len(values)
            self.counts.failed += raised
            self.counts.crashed += len(errors) - raised
            self.counts.ok += len(values) - len(errors)
            if not run.killed:
                self._post_results(job, values, errors)

    def _blame_coarsely(self, job: Job, death: Death) -> None:
        """Without exact evidence: blame from what was reported."""
        run = run_of(job)
        if death.cause == "timeout":
            if death.timed_out_index == run.cursor:
                self.fail_next(job, self.timeout_error(job, death.worker), "timed_out")
        elif job.timeout is not None or run.sent_end - run.cursor == 1 or run.isolate:
            self.fail_next(job, death.crash, "crashed")
        else:
            # Several items were on the worker and we cannot tell which one
            # took it down: run them one at a time to find out.
            run.isolate = True


_NO_ERRORS: Mapping[int, BaseException] = types.MappingProxyType({})


def _count(job: Job, run: Run) -> None:
    """The slice now counts against the job's gate (once; ``unassign`` undoes it)."""
    if job.gate is not None and not run.counted:
        job.gate.active += 1
        run.counted = True


def _ready(error: Any) -> BaseException:
    """An error as a sink gets it: the exception, remote traceback attached."""
    if isinstance(error, BaseException):
        return error
    return rebuild(error)
