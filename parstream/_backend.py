"""The seam between parstream's front end and the engines that run its work.

The front end (``_task``, ``_stream``, ``_executor``, ``_supervisor``) imports
this module and nothing of any engine: no pids, pipes, signals, function
bytes or pool internals cross it. An engine (a *backend*: local worker
processes, Ray, the in-process debugging one) implements ``Backend``; the
user picks one with ``backend=`` (a name or a ``BackendConfig``), and each
``Supervisor`` opens its own ``Backend`` from it.

Data flow of one job::

    front end (caller threads)              backend
    --------------------------              -------
    fn_h = backend.prepare(fn)       ---->  ship or register fn now; a function
                                            that cannot travel fails here, named
    backend.submit(Job(fn_h, items,  ---->  queue it (gates hold); run its items
                       sink, ...))          in order on one worker at a time
    backend.kill(job, reason)        ---->  force: the running item's worker dies
    backend.cancel(job)              ---->  withdraw it if no worker took it
                                     <----  sink.on_started(at)         a worker took it
                                     <----  sink.on_results(vals, errs) next items, in order
                                     <----  sink.on_done(end, unrun)    exactly once, last

What every backend guarantees (``tests/test_conformance.py`` checks each one):

* ``prepare(fn)`` ships or registers the function now and raises
  ``pickle.PicklingError`` naming it if it cannot travel.
* Exactly one outcome per item, in input order, then exactly one
  ``on_done``. ``on_results`` carries errors ready to raise: the task's own
  exception with its original type and the remote traceback as
  ``__cause__``; ``WorkerCrashed`` (or a subclass) when the worker died;
  ``TaskTimeout`` past the per-item timeout; the pickling error of that item
  alone.
* Sinks are called only from the backend's own event thread, never under a
  backend lock, never inline from ``submit``/``kill``/``cancel`` or a garbage
  collection; that thread keeps time and never runs user code (the front end
  hands user callbacks to ``_callbacks``).
* ``kill`` forces (never a soft cancel), is idempotent, and frees the job's
  slot before ``on_done``. With a reason, every unreported item gets it as
  its error; without, they are dropped (``on_done("killed", n)``).
* A ``Gate`` holds: at most ``limit`` of the jobs sharing it run at once.
* A backend never retries an item that began by itself: restarts are the
  Supervisor's decision. (Items that never began on a worker that died are
  run elsewhere; that is not a retry.)
* Nothing it started outlives ``close()``.

``Capabilities`` says where a backend differs (``tests`` and users read it):
the inline backend cannot kill or isolate, Ray measures timeouts from
dispatch and knows no pids.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Protocol, runtime_checkable

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping, Sequence

End = Literal["finished", "returned", "killed", "closed"]
"""How a job ended, as ``Sink.on_done`` hears it:

* ``finished``: every item has had its outcome.
* ``returned``: the worker stopped early (its batch ran past the time budget);
  the last ``unrun`` items never ran and are the sink's to submit again
  (only for jobs with ``returnable=True``).
* ``killed``: ``kill(job, None)``: the last ``unrun`` items were dropped.
* ``closed``: the backend closed (or gave up) under the job; ``unrun`` dropped.
"""


class BackendClosed(Exception):
    """Raised by a backend's ``submit`` once it is closed, or in a process that
    inherited it through ``os.fork()``; the message says which. The
    Supervisor turns it into ``SupervisorClosed``."""


class Sink(Protocol):
    """Receives one job's outcomes, from the backend's event thread only.

    Implementations must be quick, must not raise, and must run no user code.
    """

    def on_started(self, at: float) -> None:
        """A worker took the job (``at``: the backend's ``time.monotonic()``);
        again if the job is taken again after a worker died under it."""

    def on_results(
        self, values: list[Any], errors: Mapping[int, BaseException], seconds: float | None
    ) -> None:
        """The job's next ``len(values)`` items, in order; ``errors`` maps
        positions in ``values`` to the exception of that item. ``seconds``:
        how long these items ran where they ran, if the backend measured it
        (else the sink measures on its own clock). ``values`` is the sink's
        from then on: the backend keeps no reference to it."""

    def on_done(self, end: End, unrun: int) -> None:
        """The job ended (see ``End``); called exactly once, last."""


@dataclass(eq=False)
class Gate:
    """At most ``limit`` of the jobs sharing a gate run at once; the others
    wait queued in the backend, so a stream can queue work one round ahead of
    its concurrency and a worker starts it the moment it frees."""

    limit: int
    active: int = 0

    def admits(self) -> bool:
        return self.active < self.limit


@dataclass(eq=False)
class Job:
    """Items for one function, run in order on one worker at a time.

    ``items`` holds argument tuples (``star``) or single arguments. ``timeout``
    is per item (from its start or from dispatch: ``Capabilities``).
    ``first_index`` numbers the items in messages. ``returnable``: the sink
    takes back an unrun rest (``on_done("returned", n)``); a job that is not
    returnable runs whole on one worker, as the standard library's ``map``
    runs a chunk, unless a crash, a kill or ``max_tasks_per_worker`` cuts it.
    ``node`` places the job on a node of a backend that has nodes. ``urgent``: a supervised
    child's run, queued ahead of every other job, so it takes the worker
    reserved for it at once instead of waiting behind queued work. ``state``
    belongs to the backend that runs the job; nobody else reads it.
    """

    fn: FnHandle
    items: list[Any]
    sink: Sink
    star: bool = False
    timeout: float | None = None
    gate: Gate | None = None
    first_index: int = 0
    returnable: bool = False
    node: str | None = None
    urgent: bool = False
    state: Any = field(default=None, repr=False)


@dataclass(frozen=True, slots=True)
class FnHandle:
    """A function made ready by ``Backend.prepare``: ``fn`` itself (for errors
    and the in-process backend) and the backend's own ``token`` for it."""

    fn: Callable[..., Any]
    token: Any = None


@dataclass(frozen=True, slots=True)
class Capabilities:
    """What a backend can promise; where one cannot, its docstring says why.

    Attributes:
        partial_results: a batch's items come back as they finish, so a crash
            fails only the item that was running.
        timeout_from: ``"start"``: an item's timeout counts from when it
            starts; ``"dispatch"``: from when it was sent (queueing included).
        kills: ``kill`` and per-item timeouts stop a running item.
        isolates_crashes: a crashing item takes down only its worker.
        worker_pids: ``Worker.pid`` is known.
        restarts_workers: ``restart_workers()`` replaces the worker processes.
        nodes: jobs can be placed with ``node=``.
        pickles: functions, arguments and results travel pickled (and fail
            to, naming the culprit); the inline backend passes them as they are.
        exact_from_s: items that take at least this long run exactly once even
            when their worker dies in the middle of a batch; faster ones that
            had finished since the last flush of results may run again after
            such a death (at most one flush, about 20 ms of work).
    """

    partial_results: bool = True
    timeout_from: Literal["start", "dispatch"] = "start"
    kills: bool = True
    isolates_crashes: bool = True
    worker_pids: bool = True
    restarts_workers: bool = True
    nodes: bool = False
    pickles: bool = True
    exact_from_s: float = 1e-6


@dataclass(frozen=True, slots=True)
class Worker:
    """One worker of a Supervisor's backend, from ``Supervisor.workers()``.

    Attributes:
        id: the backend's name for it (stable while it lives).
        pid: its process id, or None where the backend cannot know it.
        node: the node it runs on (backends with nodes), else None.
        busy: running a task now.
    """

    id: str
    pid: int | None = None
    node: str | None = None
    busy: bool = False


@dataclass(frozen=True, slots=True)
class Node:
    """A node of a cluster backend, from ``Supervisor.nodes()``.

    Attributes:
        id: the node's id (hex).
        labels: its labels.
        cpus: its CPU count.
    """

    id: str
    labels: Mapping[str, str]
    cpus: float


@dataclass
class Counts:
    """Item and worker counters a backend keeps (written under its lock)."""

    submitted: int = 0
    started: int = 0
    ok: int = 0
    failed: int = 0
    crashed: int = 0
    timed_out: int = 0
    killed: int = 0
    workers_started: int = 0
    worker_start_failures: int = 0


@dataclass(frozen=True)
class Settings:
    """What a Supervisor asks of the backend it opens (validated by it)."""

    max_workers: int | None = None
    max_tasks_per_worker: int | None = None
    max_memory_per_worker: int | None = None
    idle_timeout: float = 10.0
    initializer: Callable[..., Any] | None = None
    initargs: tuple[Any, ...] = ()
    max_start_failures: int = 3
    start_failure_window: float = 5.0


class Backend(Protocol):
    """One Supervisor's engine: see the module docstring for the contract."""

    @property
    def name(self) -> str: ...

    @property
    def capabilities(self) -> Capabilities: ...

    @property
    def forked(self) -> bool:
        """True in a copy that reached this process through ``os.fork()``: it
        never runs anything here (``usable()`` says so)."""

    @property
    def capacity(self) -> int:
        """Jobs it runs at once by default: the default ``max_concurrency``."""

    @property
    def start_error(self) -> BaseException | None:
        """Why workers cannot be started right now, while that lasts."""

    def usable(self) -> str | None:
        """None, or why no work can be submitted (closed, forked)."""

    def prepare(self, fn: Callable[..., Any]) -> FnHandle: ...

    def submit(self, job: Job) -> None: ...

    def kill(self, job: Job, reason: BaseException | None, *, grace: float = 0.0) -> None:
        """Stop ``job`` (see the contract). With ``grace``, the job gets
        ``grace`` seconds to end by itself before it is forced (the local
        backend also SIGTERMs its worker's group at once; Ray has no safe way
        to ask, so it waits); results sent meanwhile still count."""

    def cancel(self, job: Job) -> bool:
        """Withdraw ``job`` if no worker has taken it; True if withdrawn (its
        sink then hears nothing more)."""

    def reserve(self, n: int) -> None:
        """Allow ``n`` more concurrent jobs than ``capacity`` while needed."""

    def release(self, n: int) -> None: ...

    def check_node(self, node: str) -> str:
        """The id of the alive node ``node`` names (an id or a label value)
        that can run a task; ``ValueError`` naming it if there is none."""

    def capacity_on(self, node: str) -> int:
        """Jobs it runs at once on ``node`` by default (its CPUs)."""

    def worker_of(self, job: Job) -> Worker | None:
        """The worker that has begun ``job``'s current items, if any."""

    def workers(self) -> list[Worker]: ...

    def nodes(self) -> list[Node]: ...

    def counts(self) -> Counts: ...

    def restart_workers(self) -> None: ...

    def close(self) -> None: ...


@runtime_checkable
class BackendConfig(Protocol):
    """What ``backend=`` takes besides a name: ``LocalBackend()``,
    ``InlineBackend()``, ``RayBackend(...)``. Cheap to build; each Supervisor
    calls ``open`` for an engine of its own."""

    @property
    def name(self) -> str: ...

    def open(self, settings: Settings) -> Backend: ...


def cpu_count() -> int:
    """CPUs this process may use: the least of the machine's CPUs, the
    affinity mask, a cgroup CPU quota (rounded up) and ``LOKY_MAX_CPU_COUNT``;
    at least 1. This is ``loky.cpu_count()``'s rule, kept here because
    importing loky costs ~30 ms at the first Supervisor (issue 12)."""
    import os

    machine = os.cpu_count() or 1
    counts = [machine, _cgroup_cpus(machine)]
    if hasattr(os, "sched_getaffinity"):
        counts.append(len(os.sched_getaffinity(0)))
    counts.append(int(os.environ.get("LOKY_MAX_CPU_COUNT", machine)))
    return max(1, min(counts))


def _cgroup_cpus(machine: int) -> int:
    """The cgroup CPU bandwidth limit (v2 ``cpu.max``, else v1), rounded up."""
    import math

    def read(path: str) -> str | None:
        try:
            with open(path) as f:
                return f.read().strip()
        except OSError:
            return None

    quota = period = None
    v2 = read("/sys/fs/cgroup/cpu.max")
    if v2 is not None and len(v2.split()) == 2:
        quota, period = v2.split()
    if quota is None:
        quota = read("/sys/fs/cgroup/cpu/cpu.cfs_quota_us")
        period = read("/sys/fs/cgroup/cpu/cpu.cfs_period_us")
    if quota is None or period is None or quota == "max":
        return machine
    try:
        q, p = int(quota), int(period)
    except ValueError:
        return machine
    return math.ceil(q / p) if q > 0 and p > 0 else machine


# Names ``backend=`` accepts, and where their config class lives (imported on
# first use, so ``import parstream`` never imports Ray).
_NAMES = {
    "local": ("parstream._backends.local", "LocalBackend"),
    "inline": ("parstream._backends.inline", "InlineBackend"),
    "ray": ("parstream._backends.ray", "RayBackend"),
}


def backend_names() -> Sequence[str]:
    return tuple(_NAMES)


def resolve(backend: Any) -> BackendConfig:
    """A ``BackendConfig`` for what the user passed as ``backend=``.

    Raises:
        TypeError: neither a name nor a backend object.
        ValueError: an unknown name.
    """
    from parstream._validate import shown

    if backend is None:
        backend = "local"
    if isinstance(backend, str):
        where = _NAMES.get(backend)
        if where is None:
            names = ", ".join(repr(n) for n in _NAMES)
            raise ValueError(
                f"backend must be one of {names} or a backend object, got {shown(backend)}"
            )
        module = importlib.import_module(where[0])
        config: BackendConfig = getattr(module, where[1])()
        return config
    if isinstance(backend, type):
        raise TypeError(
            f"backend must be a backend object, got the class {backend.__name__}: "
            f"pass an instance, e.g. backend=parstream.{backend.__name__}()"
        )
    if isinstance(backend, BackendConfig):
        return backend
    raise TypeError(
        "backend must be a name ('local', 'inline', 'ray') or a backend object such as "
        f"parstream.RayBackend(...), got {type(backend).__name__}: {shown(backend)}"
    )
