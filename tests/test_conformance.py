"""The backend contract (``parstream._backend``), checked on every backend.

Each test drives a ``Backend`` directly through its protocol with a recording
sink, so what is checked is the contract itself: exactly one outcome per item
in order then one ``on_done``, errors ready to raise, sinks called only from
the backend's own thread and never inside ``submit``/``kill``, kills that
force and are idempotent, gates that hold, no retry behind the Supervisor's
back, nothing left after ``close()``. Where a backend cannot promise
something, its ``Capabilities`` say so and the test says why it is skipped.
The last tests run the public API on each backend.
"""

from __future__ import annotations

import os
import pickle
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

import parstream
from parstream._backend import Backend, End, Gate, Job, Settings, resolve

if TYPE_CHECKING:
    from collections.abc import Iterator

WAIT_S = 60.0


class Recorder:
    """A sink that records every call, with the thread it came on."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []
        self.values: list[Any] = []
        self.errors: dict[int, BaseException] = {}
        self.threads: set[int] = set()
        self.ended = threading.Event()
        self.end: tuple[End, int] | None = None
        self.after_end = 0  # calls after on_done: must stay 0
        self.in_submit: set[int] = set()  # threads inside submit() now

    def _note(self, what: str, payload: Any) -> None:
        self.threads.add(threading.get_ident())
        if self.ended.is_set():
            self.after_end += 1
        if threading.get_ident() in self.in_submit:  # called by submit itself
            self.calls.append(("INLINE", what))
        self.calls.append((what, payload))

    def on_started(self, at: float) -> None:
        self._note("started", at)

    def on_results(self, values: list[Any], errors: Any, seconds: float | None) -> None:
        self._note("results", len(values))
        base = len(self.values)
        for i, e in errors.items():
            self.errors[base + i] = e
        self.values.extend(values)

    def on_done(self, end: End, unrun: int) -> None:
        self._note("done", (end, unrun))
        self.end = (end, unrun)
        self.ended.set()

    def wait(self) -> tuple[End, int]:
        assert self.ended.wait(WAIT_S), f"no on_done: {self.calls}"
        assert self.end is not None
        return self.end


@pytest.fixture
def backend(backend_name: str) -> Iterator[Backend]:
    b = resolve(backend_name).open(Settings(max_workers=None if backend_name == "inline" else 2))
    try:
        yield b
    finally:
        b.close()


def run_job(backend: Backend, fn: Any, items: list[Any], **kw: Any) -> tuple[Job, Recorder]:
    rec = Recorder()
    job = Job(backend.prepare(fn), items, rec, **kw)
    rec.in_submit.add(threading.get_ident())
    try:
        backend.submit(job)
    finally:
        rec.in_submit.discard(threading.get_ident())
    return job, rec


def need(backend: Backend, capability: str, why: str) -> None:
    if not getattr(backend.capabilities, capability):
        pytest.skip(f"the {backend.name} backend: {why}")


# -- functions the workers run (importable: module level) ----------------------


def square(x: int) -> int:
    return x * x


def fail_on_multiples_of_seven(x: int) -> int:
    if x % 7 == 0:
        raise KeyError(f"item {x}")
    return x


def record_then(path: str, x: int, seconds: float = 0.0) -> int:
    """Append ``x`` to ``path`` (one O_APPEND write), then sleep."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, f"{x}\n".encode())
    finally:
        os.close(fd)
    if seconds:
        time.sleep(seconds)
    return x


def record_or_crash(path: str, crash_at: int, seconds: float, x: int) -> int:
    if x == crash_at:
        os._exit(7)
    return record_then(path, x, seconds)


def write_pid_and_sleep(path: str, seconds: float) -> int:
    Path(path).write_text(str(os.getpid()))
    time.sleep(seconds)
    return os.getpid()


def span(path: str, x: int) -> int:
    """Record when this item starts and ends, to measure concurrency."""
    record_then(path, 1)
    time.sleep(0.15)
    record_then(path, -1)
    return x


def unpicklable_result(_: Any) -> Any:
    return threading.Lock()


def recorded(path: Path) -> list[int]:
    return [int(line) for line in path.read_text().split()] if path.exists() else []


# -- the contract ------------------------------------------------------------------


def test_prepare_names_a_function_that_cannot_travel(backend: Backend) -> None:
    """prepare() fails at once, naming the function, if it cannot be pickled."""
    need(backend, "pickles", "nothing travels, so nothing fails to")
    lock = threading.Lock()

    def holds_a_lock(x: int) -> Any:
        return lock, x

    with pytest.raises(pickle.PicklingError, match="holds_a_lock"):
        backend.prepare(holds_a_lock)


def test_one_outcome_per_item_in_order_then_one_done(backend: Backend) -> None:
    """Every item gets exactly one outcome, in input order, then on_done once."""
    items = list(range(1, 60))
    _, rec = run_job(backend, fail_on_multiples_of_seven, items)
    assert rec.wait() == ("finished", 0)
    assert len(rec.values) == len(items)
    assert sorted(rec.errors) == [i for i, x in enumerate(items) if x % 7 == 0]
    for i, x in enumerate(items):
        if x % 7:
            assert rec.values[i] == x
    assert [c for c, _ in rec.calls].count("done") == 1
    assert rec.after_end == 0


def test_errors_arrive_ready_to_raise(backend: Backend) -> None:
    """A task's exception keeps its type; a remote one carries its traceback as cause."""
    _, rec = run_job(backend, fail_on_multiples_of_seven, [7])
    rec.wait()
    err = rec.errors[0]
    assert isinstance(err, KeyError)
    if backend.capabilities.pickles:
        assert isinstance(err.__cause__, parstream.RemoteTraceback)
        assert "fail_on_multiples_of_seven" in str(err.__cause__)


def test_sinks_run_on_the_backends_thread_never_inside_submit(backend: Backend) -> None:
    """Sink calls come from one thread that is not the caller's, never inline."""
    _, rec = run_job(backend, square, list(range(20)))
    rec.wait()
    assert threading.get_ident() not in rec.threads
    assert len(rec.threads) == 1
    assert not [c for c in rec.calls if c[0] == "INLINE"]
    assert rec.values == [x * x for x in range(20)]


def test_kill_forces_is_idempotent_and_frees_the_slot(backend: Backend, tmp_path: Path) -> None:
    """kill() stops a running item at once; the slot frees before on_done."""
    need(backend, "kills", "a running item cannot be stopped in-process")
    pid_file = tmp_path / "pid"
    job, rec = run_job(backend, write_pid_and_sleep, [(str(pid_file), 60.0)], star=True)
    other, other_rec = run_job(
        backend, write_pid_and_sleep, [(str(tmp_path / "o"), 60.0)], star=True
    )
    deadline = time.monotonic() + WAIT_S
    while backend.worker_of(job) is None:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    backend.kill(job, None)
    backend.kill(job, None)  # idempotent
    assert rec.wait() == ("killed", 1)
    # Its slot is free: a new job runs while the other still sleeps.
    _, third = run_job(backend, square, [3])
    assert third.wait() == ("finished", 0)
    assert third.values == [9]
    assert not other_rec.ended.is_set()
    backend.kill(other, parstream.TaskShutdown("stop"))
    assert other_rec.wait() == ("killed", 0)
    assert isinstance(other_rec.errors[0], parstream.TaskShutdown)  # the reason, per item


def test_kill_of_a_queued_job_drops_it(backend: Backend, tmp_path: Path) -> None:
    """A job no worker took ends 'killed' with its items dropped, none run."""
    need(backend, "kills", "jobs run inside submit: none is ever queued")
    gate = Gate(1)
    log = tmp_path / "log"
    _, first = run_job(backend, record_then, [(str(log), 1, 1.0)], star=True, gate=gate)
    queued, rec = run_job(
        backend, record_then, [(str(log), 2), (str(log), 3)], star=True, gate=gate
    )
    backend.kill(queued, None)
    assert rec.wait() == ("killed", 2)
    first.wait()
    assert recorded(log) == [1]


def test_cancel_withdraws_a_job_no_worker_took(backend: Backend, tmp_path: Path) -> None:
    """cancel() of a queued job: it never runs and its sink hears nothing."""
    need(backend, "kills", "jobs run inside submit: none is ever queued")
    gate = Gate(1)
    log = tmp_path / "log"
    _, first = run_job(backend, record_then, [(str(log), 1, 0.5)], star=True, gate=gate)
    queued, rec = run_job(backend, record_then, [(str(log), 2)], star=True, gate=gate)
    assert backend.cancel(queued)
    first.wait()
    time.sleep(0.2)
    assert not rec.ended.is_set()
    assert [c for c, _ in rec.calls] == []
    assert recorded(log) == [1]


def test_gates_hold(backend: Backend, tmp_path: Path) -> None:
    """At most `limit` jobs of a gate run at once, however many workers there are."""
    log = tmp_path / "spans"
    gate = Gate(1)
    recs = [run_job(backend, span, [(str(log), i)], star=True, gate=gate)[1] for i in range(4)]
    for rec in recs:
        rec.wait()
    running = peak = 0
    for step in recorded(log):
        running += step
        peak = max(peak, running)
    assert peak == 1


def test_a_crash_fails_its_item_alone_and_nothing_runs_twice(
    backend: Backend, tmp_path: Path
) -> None:
    """A worker death: WorkerCrashed for that item; no other item lost or repeated."""
    need(backend, "isolates_crashes", "a crash takes the caller down with it")
    log = tmp_path / "log"
    # Items slow enough for this backend to promise exactly-once across a death.
    seconds = 2 * backend.capabilities.exact_from_s
    items = [(str(log), 13, seconds, x) for x in range(30)]
    _, rec = run_job(backend, record_or_crash, items, star=True)
    assert rec.wait() == ("finished", 0)
    assert list(rec.errors) == [13]
    assert isinstance(rec.errors[13], parstream.WorkerCrashed)
    assert sorted(recorded(log)) == [x for x in range(30) if x != 13]  # each once
    assert [rec.values[i] for i in range(30) if i != 13] == [x for x in range(30) if x != 13]


def test_no_retry_behind_the_supervisors_back(backend: Backend, tmp_path: Path) -> None:
    """A crashing single item is reported once, and ran once."""
    need(backend, "isolates_crashes", "a crash takes the caller down with it")
    log = tmp_path / "log"

    _, rec = run_job(backend, record_then_crash, [(str(log),)], star=True)
    assert rec.wait() == ("finished", 0)
    assert isinstance(rec.errors[0], parstream.WorkerCrashed)
    assert recorded(log) == [1]


def record_then_crash(path: str) -> None:
    record_then(path, 1)
    os._exit(9)


def test_a_timeout_kills_only_the_late_item(backend: Backend) -> None:
    """Per-item timeout: TaskTimeout for the hung item; the others run."""
    need(backend, "kills", "timeouts are reported, not enforced, in-process")
    items = [(0.0, 1), (60.0, 2), (0.0, 3)]
    _, rec = run_job(backend, sleep_return, items, star=True, timeout=1.0)
    assert rec.wait() == ("finished", 0)
    assert list(rec.errors) == [1]
    assert isinstance(rec.errors[1], parstream.TaskTimeout)
    assert rec.values[0] == 1
    assert rec.values[2] == 3


def sleep_return(seconds: float, value: Any) -> Any:
    time.sleep(seconds)
    return value


def test_an_unpicklable_result_fails_alone(backend: Backend) -> None:
    """A result that cannot travel back fails its own item, naming its type."""
    need(backend, "pickles", "results are not pickled")
    _, rec = run_job(backend, unpicklable_result, [1, 2])
    rec.wait()
    assert sorted(rec.errors) == [0, 1]
    assert "lock" in str(rec.errors[0]).lower()


def nested(depth: int) -> list[Any]:
    value: list[Any] = []
    for _ in range(depth):
        value = [value]
    return value


def test_a_result_nested_too_deep_to_pickle_fails_alone(backend: Backend) -> None:
    """Plain lists nested 5,000 deep (RecursionError in the pickler): that item
    fails with PicklingError, its batch-mates keep theirs, no worker dies
    (the fast path for plain results let the error kill the worker)."""
    need(backend, "pickles", "results are not pickled")
    _, rec = run_job(backend, nested, [3, 5000, 3])
    assert rec.wait() == ("finished", 0)
    assert list(rec.errors) == [1]
    assert isinstance(rec.errors[1], pickle.PicklingError)
    assert rec.values[0] == rec.values[2] == nested(3)
    assert backend.counts().crashed == 0


def test_close_leaves_nothing_running(backend: Backend, tmp_path: Path) -> None:
    """close() ends every job ('closed') and the worker that ran it."""
    pid_file = tmp_path / "pid"
    if not backend.capabilities.kills:
        pytest.skip(f"the {backend.name} backend runs jobs inside submit")
    _, rec = run_job(backend, write_pid_and_sleep, [(str(pid_file), 60.0)], star=True)
    deadline = time.monotonic() + WAIT_S
    while not pid_file.exists() or not pid_file.read_text():
        assert time.monotonic() < deadline
        time.sleep(0.01)
    pid = int(pid_file.read_text())
    backend.close()
    assert rec.wait() == ("closed", 1)
    from _util import gone

    assert gone(pid, within=10.0)


# -- the public API on each backend ------------------------------------------------


def test_public_api_on_each_backend(backend_name: str) -> None:
    """The same user code on every backend: tasks, streams, map, futures."""
    with parstream.Supervisor(backend=backend_name) as sup:
        assert sup.backend == backend_name
        assert sup.async_(square, 7).await_() == 49
        assert list(sup.stream_map(square, range(50))) == [x * x for x in range(50)]
        results = list(sup.async_stream_nolink(fail_on_multiples_of_seven, range(1, 15)))
        assert [type(r).__name__ for r in results].count("Exit") == 2
        assert sup.submit(square, 5).result(timeout=WAIT_S) == 25
        assert list(sup.map(square, range(5))) == [0, 1, 4, 9, 16]
        child = sup.start_child(square, 3)
        assert child.wait(WAIT_S) == parstream.Ok(9)
        stats = sup.stats()
        assert stats.tasks_ok >= 50 + 12 + 1 + 1 + 5 + 1


def test_module_functions_take_backend(backend_name: str) -> None:
    """parstream.map(..., backend=) runs on that backend's default supervisor."""
    assert list(parstream.map(square, range(10), backend=backend_name)) == [
        x * x for x in range(10)
    ]
    assert parstream.default_supervisor(backend_name).backend == backend_name
    parstream.default_supervisor(backend_name).close()


class Abort(BaseException):
    """A BaseException that is not an interrupt (pytest's outcomes, gevent's Timeout)."""


def abort_on_three(x: int) -> int:
    if x == 3:
        raise Abort(x)
    return x


def test_a_base_exception_fails_its_item_alone(backend_name: str) -> None:
    """On every backend, inline too: only KeyboardInterrupt is an interrupt."""
    with parstream.Supervisor(backend=backend_name) as sup:
        results = list(sup.async_stream_nolink(abort_on_three, range(6)))
    assert [r.value for r in results if isinstance(r, parstream.Ok)] == [0, 1, 2, 4, 5]
    assert isinstance(results[3], parstream.Exit)
    assert isinstance(results[3].reason, Abort)
