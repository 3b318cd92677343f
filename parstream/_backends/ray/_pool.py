"""The Ray backend's engine: jobs as streaming-generator tasks on a cluster.

``RayPool`` implements ``parstream._backend.Backend``. The queue, gates,
slices and crash attribution are the shared ``Dispatcher``'s, exactly as on
the local backend; this module turns a slice into one Ray task and watches
it, on the pool's event thread (a task is also launched straight from
``submit`` when a slot is free)::

    caller threads                      event thread
    --------------                      ------------
    prepare(fn): cloudpickle, ray.put   loop:
    submit(job): queue, notify  ----->    take queued jobs while a slot is free:
    kill(job): mark, notify     ----->      run_slice.options(...).remote(...)
                                          ray.wait(generators, 5 ms) (or sleep idle)
                                          per ready message of each generator:
                                            start/loaded -> the item's clock
                                            results      -> Dispatcher.deliver
                                            end          -> Dispatcher.slice_done
                                            Ray error    -> Dispatcher.settle_death
                                          deadlines -> ray.cancel(force=True)
                                          flush the Outbox (the sinks)

A *slot* is one task in flight; there are ``capacity`` (the cluster's CPUs,
or a node's, over ``num_cpus_per_task``) plus what streams and children
reserve. A task holds ``num_cpus_per_task`` CPUs only while fewer than the
cluster's CPUs (at start) are held; beyond that (reserved slots, or a
``max_workers`` above the CPUs) it holds none, as the local backend's extra
workers oversubscribe the cores, and a child's run never holds any: otherwise
Ray would queue it behind tasks that may never end (children, here or of
another supervisor on the cluster), and the supervisor would stall. Every task
has ``max_retries=0`` and ``retry_exceptions=False``: restarts are the
Supervisor's decision. A kill is ``ray.cancel(force=True)`` only, never a
plain cancel first (ray#32954). A per-item timeout counts from the item's
start as the task reports it (its first message, or the previous item's
result): time spent waiting for a Ray worker process does not count.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from parstream._backend import BackendClosed, Capabilities, Counts, FnHandle, Job, Node, Worker
from parstream._backends import _codec, _frames
from parstream._backends._dispatch import Death, Dispatcher, Outbox, run_of, unusable
from parstream._backends.ray._runner import run_slice
from parstream._errors import NodeDied, SupervisorClosed, WorkerCrashed, WorkerStartFailed

if TYPE_CHECKING:
    from collections.abc import Callable

    from parstream._backend import Settings

log = logging.getLogger("parstream")

# The event thread's longest wait while tasks run: a task launched meanwhile
# (from submit) has its messages read this much later at worst.
POLL_S = 0.005

CAPABILITIES = Capabilities(
    partial_results=True,
    timeout_from="start",
    kills=True,
    isolates_crashes=True,
    worker_pids=False,
    restarts_workers=False,
    nodes=True,
    exact_from_s=0.005,  # _runner.EACH_MIN_S
)


@dataclass(eq=False)
class _Slot:
    """One task in flight (written on the event thread, or under the lock)."""

    job: Job
    gen: Any = None  # the task's ObjectRefGenerator
    task_id: str = ""
    node: str | None = None  # where it runs, once it said so
    started: bool = False  # the task began (its first message arrived)
    loaded: bool = False  # it read the function and the items ("loaded")
    window: int = 0  # announced by the last frame (see _runner)
    item_started: float | None = None  # when the running item began
    kill_cause: str | None = None  # timeout, kill, close
    kill_deadline: float | None = None  # a graceful kill is forced then
    timed_out_index: int | None = None
    cpus: float = 0.0  # the CPUs its task holds (0 beyond the cluster's: see above)


class RayPool:
    """Slices of jobs as Ray tasks, watched by one event thread."""

    name = "ray"
    capabilities = CAPABILITIES
    start_error = None

    def __init__(self, settings: Settings, config: Any, *, started_ray: bool) -> None:
        import ray

        self._ray: Any = ray
        self._config = config
        self._started_ray = started_ray
        self._cpus = float(config.num_cpus_per_task)
        self._options: dict[str, Any] = {
            "max_retries": 0,
            "retry_exceptions": False,
            "num_cpus": self._cpus,
            "num_returns": "streaming",
            # The task waits at each yield until this side has taken the
            # message: when it dies, everything it sent before the running
            # item has arrived, so the culprit is known exactly.
            "_generator_backpressure_num_objects": 1,
            # Spread, not packed: a task queued behind a busy (or hung) task
            # on one node would wait while another node is free.
            "scheduling_strategy": "SPREAD",
        }
        from parstream._backends.ray import task_runtime_env

        env = task_runtime_env(config)
        if env is not None:  # Ray runs under another runtime_env: this one per task
            self._options["runtime_env"] = env
        self._remote = ray.remote(run_slice)
        self._counts = Counts()
        self._outbox = Outbox()
        self._dispatch = Dispatcher(self._counts, self._outbox)
        self._lock = threading.Condition(threading.RLock())
        self._slots: list[_Slot] = []
        self._reserved = 0
        self._closed = False
        self._pid = os.getpid()
        self._init = None
        if settings.initializer is not None:
            data = _prepare_bytes((settings.initializer, settings.initargs), "initializer")
            self._init = (os.urandom(16), [ray.put(data)])
        largest = max((n.cpus for n in self.nodes()), default=0.0)
        if self._cpus > largest:
            raise ValueError(
                f"num_cpus_per_task={config.num_cpus_per_task}: no node of the Ray cluster "
                f"has that many CPUs (the largest has {largest:g})"
            )
        self._cpu_slots = self._cluster_capacity(None)  # tasks that may hold CPUs at once
        self.base = settings.max_workers or self._cpu_slots
        self._thread = threading.Thread(target=self._run, name="parstream-ray", daemon=True)
        self._thread.start()

    # -- the Backend surface ------------------------------------------------------

    @property
    def capacity(self) -> int:
        return self.base

    @property
    def forked(self) -> bool:
        return self._pid != os.getpid()

    def usable(self) -> str | None:
        why = unusable(self._pid, self._closed, "its Ray connection and tasks")
        if why is None and not self._ray.is_initialized():
            why = "its Ray connection was shut down (ray.shutdown() ran in this process)"
        return why

    def prepare(self, fn: Callable[..., Any]) -> FnHandle:
        data = _prepare_bytes(fn, "fn")
        why = self.usable()
        if why is not None:
            # ray.put would start a new Ray of its own, on whatever thread
            # asked (a child's restart): the user's next ray.init then failed.
            raise SupervisorClosed(why)
        # By reference inside a list: Ray then leaves it for the worker, which
        # fetches it only if it has not loaded this function before.
        return FnHandle(fn, (os.urandom(16), [self._ray.put(data)]))

    def submit(self, job: Job) -> None:
        with self._lock:
            why = self.usable()
            if why is not None:
                raise BackendClosed(why)
            self._dispatch.add(job)
            self._dispatch.enqueue(job)
            # Launched from here if a slot is free: the event thread may be
            # inside ray.wait for a few ms, and the job need not wait for it.
            try:
                self._dispatch_queued()
            except BaseException:
                # Ctrl-C in this (the caller's) thread: its own call does not
                # run later behind its back (others' go on from the queue).
                self.kill(job, None)
                raise
            self._lock.notify()

    def kill(self, job: Job, reason: BaseException | None, *, grace: float = 0.0) -> None:
        if self.forked:
            return
        with self._lock:
            slot: _Slot | None = self._dispatch.kill_target(job, reason)
            if slot is not None and slot.kill_cause in (None, "kill"):
                slot.kill_cause = "kill"
                if grace > 0:
                    due = time.monotonic() + grace
                    slot.kill_deadline = min(slot.kill_deadline or due, due)
                else:  # at once, also when a graceful kill is already waiting
                    run_of(job).killed = True
                    slot.kill_deadline = 0.0  # the event thread cancels it now
            self._lock.notify()

    def cancel(self, job: Job) -> bool:
        with self._lock:
            return job.state is not None and self._dispatch.withdraw(job)

    def reserve(self, n: int) -> None:
        with self._lock:
            self._reserved += n
            self._lock.notify()

    def release(self, n: int) -> None:
        with self._lock:
            self._reserved = max(0, self._reserved - n)

    def check_node(self, node: str) -> str:
        matches = [n for n in self.nodes() if n.id == node or node in (n.labels or {}).values()]
        if not matches:
            raise ValueError(
                f"node={node!r}: no alive node of the Ray cluster has that id or label value"
            )
        if len(matches) > 1:
            ids = ", ".join(n.id for n in matches)
            raise ValueError(f"node={node!r} names several alive nodes ({ids}); give a node id")
        if matches[0].cpus < self._cpus or matches[0].cpus == 0:
            raise ValueError(
                f"node={node!r} has {matches[0].cpus:g} CPUs: it cannot run a task of "
                f"num_cpus_per_task={self._cpus:g}"
            )
        return matches[0].id

    def capacity_on(self, node: str) -> int:
        return self._cluster_capacity(node)

    def worker_of(self, job: Job) -> Worker | None:
        run = run_of(job)
        slot: _Slot | None = None if run is None else run.holder
        if slot is None or not slot.started:
            return None
        return Worker(id=slot.task_id, pid=None, node=slot.node, busy=True)

    def workers(self) -> list[Worker]:
        with self._lock:
            return [
                Worker(id=s.task_id, pid=None, node=s.node, busy=True)
                for s in self._slots
                if s.started
            ]

    def nodes(self) -> list[Node]:
        out = []
        for n in self._ray.nodes():
            if not n.get("Alive"):
                continue
            labels = {
                k: v for k, v in (n.get("Labels") or {}).items() if not k.startswith("ray.io/")
            }
            cpus = float(n.get("Resources", {}).get("CPU", 0.0))
            out.append(Node(id=n["NodeID"], labels=labels, cpus=cpus))
        return out

    def counts(self) -> Counts:
        with self._lock:
            return Counts(**vars(self._counts))

    def restart_workers(self) -> None:
        pass  # Ray owns its worker processes; each task's function is loaded by key

    def close(self) -> None:
        if self.forked:
            self._closed = True
            return
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._dispatch.close_queue()
            for slot in self._slots:
                if slot.kill_cause is None:
                    slot.kill_cause = "close"
                slot.kill_deadline = 0.0
            self._lock.notify()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout=10.0)
        if self._started_ray:
            from parstream._backends.ray import release_ray

            release_ray()

    # -- capacity ---------------------------------------------------------------

    def _cluster_capacity(self, node: str | None) -> int:
        """Tasks the cluster (or ``node``) runs at once: per node, its CPUs
        over ``num_cpus_per_task``."""
        nodes = [n for n in self.nodes() if node is None or n.id == node]
        if self._cpus <= 0:
            return max(1, len(nodes))
        return max(1, sum(int(n.cpus // self._cpus) for n in nodes))

    # -- the event thread ---------------------------------------------------------

    def _run(self) -> None:
        try:
            self._loop()
        except BaseException:  # pragma: no cover - a bug in the loop itself
            log.exception("parstream: the Ray backend's event thread crashed")
            with self._lock:
                self._closed = True
                # Not once Ray is shut down: its calls would start it again.
                alive = self._ray.is_initialized()
                for slot in self._slots:
                    if alive:
                        with contextlib.suppress(Exception):
                            self._ray.cancel(slot.gen, force=True)
                    run_of(slot.job).killed = True
                    self._dispatch.finish_killed(slot.job, "closed")
                self._slots.clear()
                self._dispatch.close_queue()
            self._outbox.flush()

    def _loop(self) -> None:
        while True:
            self._outbox.flush()  # the sinks: never under the lock
            with self._lock:
                if self._closed and not self._slots:
                    break
                self._dispatch_queued()
                self._kill_due()
                gens = [s.gen for s in self._slots if s.gen is not None]
                if not gens:
                    if not self._outbox:
                        # Idle: submit() and kill() notify. Both change state
                        # under this lock, so no wake-up is lost.
                        self._lock.wait(self._next_wait(None))
                    continue
            try:
                self._ray.wait(gens, num_returns=1, timeout=self._next_wait(POLL_S))
            except Exception:
                if self._ray.is_initialized():
                    raise
                self._lost_ray()  # Ray was shut down under us (at exit, say)
                continue
            try:
                self._read_ready()
            except Exception:
                if self._ray.is_initialized():
                    raise
                self._lost_ray()  # shut down while the messages were read
        self._outbox.flush()

    def _read_ready(self) -> None:
        """Read every task's ready messages. A method of its own so that no
        slot (its job, the user's arguments) stays referenced from the loop's
        frame while the thread waits idle."""
        with self._lock:
            slots = [s for s in self._slots if s.gen is not None]
        for slot in slots:
            self._read(slot)

    def _lost_ray(self) -> None:
        """Ray is gone: every job ends 'closed'; nothing can be asked of it."""
        with self._lock:
            self._closed = True
            for slot in self._slots:
                run_of(slot.job).killed = True
                self._dispatch.unassign(slot.job)
                self._dispatch.finish_killed(slot.job, "closed")
            self._slots.clear()
            self._dispatch.close_queue()

    def _next_wait(self, poll: float | None) -> float | None:
        now = time.monotonic()
        best = poll
        for slot in self._slots:
            due = self._deadline(slot)
            if due is not None:
                wait = max(0.0, due - now)
                best = wait if best is None else min(best, wait)
        return best

    def _deadline(self, slot: _Slot) -> float | None:
        if slot.kill_deadline is not None:
            return slot.kill_deadline
        timeout = slot.job.timeout
        if timeout is None or slot.item_started is None or slot.kill_cause is not None:
            return None
        return slot.item_started + timeout

    def _dispatch_queued(self) -> None:
        """Start queued jobs while slots are free (lock held). A child's run
        (urgent) gets a slot beyond the count if its reserved one was taken
        by other work meanwhile, as on the local backend."""
        while not self._closed:
            limit = self.base + self._reserved
            if len(self._slots) >= limit:
                queue = self._dispatch.queue
                if not (self._reserved and queue and queue[0].urgent):
                    return
            job = self._dispatch.take()
            if job is None:
                return
            slot = _Slot(job)
            self._dispatch.begin(job, slot)
            self._slots.append(slot)
            try:
                self._launch(slot)
            except Exception as exc:  # the task could not even be submitted
                self._slots.remove(slot)
                self._dispatch.unassign(job)
                run_of(job).kill_reason = _as_crash(exc, None)
                run_of(job).killed = True
                self._dispatch.finish_killed(job)
            except BaseException:
                # Ctrl-C on a caller's thread (submit launches too) before the
                # task was launched: the slot must not stay taken for ever.
                if slot.gen is None:
                    self._slots.remove(slot)
                    self._dispatch.unassign(job)
                    self._dispatch.enqueue(job, front=True)
                raise

    def _launch(self, slot: _Slot) -> None:
        job = slot.job
        run = run_of(job)
        items = run.items[run.cursor : run.sent_end]
        try:
            items_bytes = _codec.dumps(items)
        except BaseException:
            bad: dict[int, Any] = {}
            for i, args in enumerate(items):
                try:
                    _codec.dumps(args)
                except BaseException as cause:
                    culprit = _codec.culprit_error(args if job.star else (args,), cause)
                    bad[i] = _codec.BadArgs(culprit)
            items = self._dispatch.replace_bad(job, bad)
            items_bytes = _codec.dumps(items)
        options = self._options
        held = sum(1 for s in self._slots if s.cpus > 0)
        # A child's run holds none at all: it runs for ever, maybe pinned to a
        # node, beside other supervisors' tasks on the same cluster.
        within = held < min(self.base, self._cpu_slots)
        slot.cpus = self._cpus if within and not job.urgent else 0.0
        if slot.cpus != self._cpus:
            options = {**options, "num_cpus": slot.cpus}
        if job.node is not None:
            from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

            options = {
                **options,
                "scheduling_strategy": NodeAffinitySchedulingStrategy(job.node, soft=False),
            }
        key, box = job.fn.token
        each = job.timeout is not None
        slot.gen = self._remote.options(**options).remote(
            key, box, items_bytes, job.star, each, run.has_bad, self._init, not job.returnable
        )
        with contextlib.suppress(Exception):
            slot.task_id = slot.gen.completed().task_id().hex()

    def _kill_due(self) -> None:
        """Cancel the tasks whose time is up (lock held)."""
        now = time.monotonic()
        for slot in self._slots:
            due = self._deadline(slot)
            if due is None or now < due or slot.gen is None:
                continue
            if slot.kill_deadline is None:  # an item's timeout
                slot.kill_cause = "timeout"
                slot.timed_out_index = run_of(slot.job).cursor
            slot.kill_deadline = None
            # Force only: a plain cancel does not stop a sleeping task, and
            # blocks a later force cancel of one holding the GIL (ray#32954).
            with contextlib.suppress(Exception):
                self._ray.cancel(slot.gen, force=True)
            if slot.kill_cause == "close":
                slot.kill_deadline = None

    def _read(self, slot: _Slot) -> None:
        """Handle every message the slot's task has ready."""
        gen = slot.gen
        if gen is None:  # freed meanwhile
            return
        while gen.next_ready() or gen.is_finished():
            try:
                ref = next(gen)
            except StopIteration:
                self._ended(slot, None)
                return
            try:
                message = self._ray.get(ref)
            except Exception as exc:
                self._ended(slot, exc)
                return
            self._on_message(slot, message)

    def _on_message(self, slot: _Slot, message: tuple[Any, ...]) -> None:
        kind = message[0]
        job = slot.job
        now = time.monotonic()
        if kind == "start":
            slot.started = True
            slot.node = message[2]
            # The first item's clock starts with the task (waiting for a Ray
            # worker process does not count); a timed slice restarts it at
            # "loaded", so loading the function counts only until then.
            slot.item_started = now
            return
        if kind == "loaded":
            slot.loaded = True
            slot.item_started = now
            return
        with self._lock:
            run = run_of(job)
            if kind == "results":
                done, _, values, errors = _frames.loads_results(message[1])
                slot.window = message[2]
                slot.item_started = now
                self._dispatch.deliver(job, values, errors, message[3])
                if done:
                    self._slice_done(slot)
            elif kind == "bad" and run.sent_end - run.cursor > 1:
                run.isolate = True  # find the item that cannot be read, one at a time
                self._free(slot)
                self._dispatch.enqueue(job, front=True)
            elif kind in ("bad", "fn_failed", "init_failed"):
                # The function (or the only item) cannot be loaded there, or the
                # initializer raised: every item of the slice fails with that.
                n = run.sent_end - run.cursor
                error = message[1] if kind != "init_failed" else _init_error(message[1])
                self._dispatch.deliver(job, [None] * n, dict.fromkeys(range(n), error))
                self._slice_done(slot)
            elif kind == "returned":
                self._slice_done(slot)

    def _free(self, slot: _Slot) -> None:
        """The slot's task is over (lock held)."""
        if slot in self._slots:
            self._slots.remove(slot)
        if run_of(slot.job).holder is slot:
            self._dispatch.unassign(slot.job)
        slot.gen = None

    def _slice_done(self, slot: _Slot) -> None:
        self._free(slot)
        self._dispatch.slice_done(slot.job)

    def _ended(self, slot: _Slot, error: BaseException | None) -> None:
        """The task's stream ended: normally (all said) or with a Ray error."""
        with self._lock:
            if slot not in self._slots:
                return  # already settled by its last message
            job = slot.job
            self._free(slot)
            run = run_of(job)
            if error is None:
                # Ended without its last frame: treat as a crash of the running item.
                error = WorkerCrashed("the Ray task ended without reporting every item")
            crash = _as_crash(error, slot.node or job.node)
            cause = slot.kill_cause
            if cause is None and (_unrunnable(error) or not isinstance(crash, WorkerCrashed)):
                # Not a death: the task could not run there (its node is gone,
                # parstream is missing on the worker). Every item of the slice
                # fails with that error; none is run again.
                n = run.sent_end - run.cursor
                self._dispatch.deliver(job, [None] * n, dict.fromkeys(range(n), crash))
                self._dispatch.slice_done(job)
                return
            exact = slot.window == 0
            began = slot.started
            position = run.cursor - run.slice_start
            if began and not slot.loaded and run.sent_end - run.slice_start > 1:
                # Died before its items were read (an argument whose loading
                # kills the process): none of them began; the dispatcher finds
                # the culprit one item at a time, as on the local backend.
                exact, position = True, -1
            death = Death(
                crash=crash,
                worker=f"Ray task {slot.task_id[:12]} on node {(slot.node or '?')[:12]}",
                cause=cause,
                delivered=True,
                began=began,
                begun=position + (1 if exact else slot.window),
                window=None if exact else position,
                timed_out_index=slot.timed_out_index,
            )
            self._dispatch.settle_death(job, death)


def _prepare_bytes(obj: Any, what: str) -> bytes:
    try:
        return _codec.dumps(obj)
    except Exception as cause:
        if what == "fn":
            raise _codec.pickling_error(obj, cause) from cause
        name = getattr(obj[0], "__qualname__", type(obj[0]).__qualname__)
        raise pickle.PicklingError(
            f"initializer ({name}) or its initargs could not be pickled: {cause}"
        ) from cause


def _init_error(payload: Any) -> WorkerStartFailed:
    """The initializer raised on a Ray worker: as on the local backend, the
    waiting items get ``WorkerStartFailed`` with its exception as the cause."""
    exc, tb = payload
    cause = _codec.rebuild((exc, tb))
    err = WorkerStartFailed(
        f"the initializer raised on a Ray worker: {exc!r}\n\nWorker traceback:\n{tb.rstrip()}"
    )
    err.__cause__ = cause
    return err


def _unrunnable(error: BaseException) -> bool:
    from ray import exceptions as rx

    return isinstance(error, rx.TaskUnschedulableError)


def _as_crash(error: BaseException, node: str | None) -> BaseException:
    """A Ray error as parstream reports it."""
    from ray import exceptions as rx

    where = f" on node {node}" if node else ""
    if isinstance(error, rx.NodeDiedError | rx.ObjectLostError):
        which = f"node {node}" if node else "the node"
        return NodeDied(
            f"{which}, running this task, died (or its results were lost with it): "
            f"{type(error).__name__}",
            node=node,
        )
    if isinstance(error, rx.WorkerCrashedError):
        return WorkerCrashed(
            f"the Ray worker process running this task{where} died: {error}".strip()
        )
    if isinstance(error, rx.TaskCancelledError):
        return WorkerCrashed(f"the Ray task{where} was cancelled")
    if isinstance(error, rx.TaskUnschedulableError):
        return NodeDied(f"the task cannot be placed{where}: {error}", node=node)
    if isinstance(error, rx.RayTaskError):
        cause = getattr(error, "cause", None)
        text = str(error)
        if "failed to import on the worker" in text or isinstance(cause, ModuleNotFoundError):
            return ModuleNotFoundError(
                "parstream's task runner could not be imported on the Ray worker: install "
                "parstream on every node, or pass RayBackend(runtime_env={'pip': ['parstream']})"
                f"\n\n{text}"
            )
        return cause if isinstance(cause, BaseException) else WorkerCrashed(text)
    return error
