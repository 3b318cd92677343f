"""The fast layer: parstream's policies as plain objects, no process started.

The reorder buffer, chunk sizing, the restart-intensity window, gates and
the queue, crash attribution, option validation, and the import boundary
between the front end and the backends. Each test runs in milliseconds.
"""

from __future__ import annotations

import ast
import queue
import re
from pathlib import Path
from typing import Any

import pytest

import parstream
from parstream._backend import Counts, End, FnHandle, Gate, Job
from parstream._backends._dispatch import Death, Dispatcher, Outbox, run_of
from parstream._children import RestartWindow, is_normal
from parstream._chunks import MAX_CHUNK, TARGET_CHUNK_S, Chunk, ChunkSizer, ReorderBuffer
from parstream._validate import Options

PACKAGE = Path(parstream.__file__).parent


# -- the reorder buffer ---------------------------------------------------------


def chunk(start: int, n: int) -> Chunk:
    return Chunk(start, list(range(start, start + n)), queue.SimpleQueue())


def arrive(buffer: ReorderBuffer, c: Chunk, values: list[Any], *, done: bool = False) -> None:
    before = len(c.values)
    c.values.extend(values)
    buffer.arrived(c, before)
    if done:
        c.done = True
        buffer.ended(c)


def drain(buffer: ReorderBuffer) -> list[Any]:
    out: list[Any] = []
    while (span := buffer.take()) is not None:
        c, lo, hi = span
        out.extend(c.values[lo:hi])
        c.taken = hi
    return out


def test_ordered_buffer_holds_later_chunks_behind_the_head() -> None:
    buffer = ReorderBuffer(ordered=True)
    a, b = chunk(0, 2), chunk(2, 2)
    buffer.submitted(a)
    buffer.submitted(b)
    arrive(buffer, b, [20, 30], done=True)
    assert drain(buffer) == []  # the head has nothing yet
    arrive(buffer, a, [0])
    assert drain(buffer) == [0]
    arrive(buffer, a, [10], done=True)
    assert drain(buffer) == [10, 20, 30]


def test_ordered_buffer_places_pieces_of_a_returned_chunk_after_it() -> None:
    buffer = ReorderBuffer(ordered=True)
    a, b = chunk(0, 4), chunk(4, 1)
    buffer.submitted(a)
    buffer.submitted(b)
    p1, p2 = chunk(2, 1), chunk(3, 1)
    buffer.submitted(p1, after=a)
    buffer.submitted(p2, after=p1)
    arrive(buffer, b, ["e"], done=True)
    arrive(buffer, p2, ["d"], done=True)
    arrive(buffer, a, ["a", "b"], done=True)
    arrive(buffer, p1, ["c"], done=True)
    assert drain(buffer) == ["a", "b", "c", "d", "e"]


def test_unordered_buffer_hands_out_as_results_come() -> None:
    buffer = ReorderBuffer(ordered=False)
    a, b = chunk(0, 2), chunk(2, 2)
    arrive(buffer, b, [3])
    arrive(buffer, a, [1])
    assert drain(buffer) == [3, 1]
    arrive(buffer, b, [4], done=True)
    assert drain(buffer) == [4]


# -- chunk sizing ------------------------------------------------------------------


def test_chunks_stay_one_while_items_are_slow() -> None:
    sizer = ChunkSizer(None, max_concurrency=4, length=None)
    for _ in range(5):
        sizer.learn(0.05)
    assert sizer.next_size(0) == 1


def test_chunks_grow_at_most_eightfold_per_flush_for_tiny_items() -> None:
    sizer = ChunkSizer(None, max_concurrency=2, length=None)
    sizes = []
    for _ in range(6):
        sizer.learn(1e-7)
        sizes.append(sizer.next_size(0))
    assert sizes == [8, 64, 512, 4096, MAX_CHUNK, MAX_CHUNK]


def test_chunks_drop_at_once_when_items_turn_slow() -> None:
    sizer = ChunkSizer(None, max_concurrency=2, length=None)
    for _ in range(6):
        sizer.learn(1e-6)
    assert sizer.next_size(0) > 1000
    sizer.learn(TARGET_CHUNK_S)  # one flush of slow items
    assert sizer.next_size(0) == 1


def test_chunks_near_the_end_of_a_known_input_are_a_fair_share() -> None:
    sizer = ChunkSizer(None, max_concurrency=2, length=10_000)
    for _ in range(6):
        sizer.learn(1e-4)  # 200 items a chunk
    assert sizer.next_size(0) == 200
    assert sizer.next_size(9_800) == 50  # 200 left over 2 workers, halved again
    assert sizer.next_size(9_990) == 20  # but not below ~2 ms of work


def test_a_fixed_chunksize_never_changes() -> None:
    sizer = ChunkSizer(7, max_concurrency=2, length=100)
    sizer.learn(1e-7)
    assert sizer.next_size(99) == 7


# -- the restart-intensity window --------------------------------------------------------


def test_restart_window_allows_max_restarts_within_max_seconds() -> None:
    window = RestartWindow(max_restarts=3, max_seconds=5.0)
    assert [window.allow(t) for t in (0.0, 1.0, 2.0)] == [True, True, True]
    assert not window.allow(3.0)  # a fourth within 5 s


def test_restart_window_forgets_restarts_older_than_max_seconds() -> None:
    window = RestartWindow(max_restarts=1, max_seconds=1.0)
    assert window.allow(0.0)
    assert window.allow(1.5)
    assert not window.allow(2.0)


def test_what_counts_as_a_normal_end() -> None:
    assert is_normal(parstream.Ok(1))
    assert is_normal(parstream.Exit(SystemExit(0)))
    assert is_normal(parstream.Exit(parstream.TaskShutdown("asked")))
    assert not is_normal(parstream.Exit(SystemExit(2)))
    assert not is_normal(parstream.Exit(ValueError()))


# -- gates, the queue and crash attribution (the shared dispatch policy) -------------


class Sink:
    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []

    def on_started(self, at: float) -> None:
        self.calls.append(("started", None))

    def on_results(self, values: list[Any], errors: Any, seconds: float | None) -> None:
        self.calls.append(("results", (list(values), dict(errors))))

    def on_done(self, end: End, unrun: int) -> None:
        self.calls.append(("done", (end, unrun)))


def make_job(n: int, gate: Gate | None = None, **kw: Any) -> tuple[Job, Sink]:
    sink = Sink()
    return Job(FnHandle(abs), list(range(n)), sink, gate=gate, **kw), sink


def dispatcher() -> tuple[Dispatcher, Outbox]:
    outbox = Outbox()
    return Dispatcher(Counts(), outbox), outbox


def test_a_gate_admits_at_most_its_limit() -> None:
    d, _ = dispatcher()
    gate = Gate(2)
    jobs = [make_job(1, gate)[0] for _ in range(4)]
    for job in jobs:
        d.add(job)
        d.enqueue(job)
    for worker in ("w1", "w2"):
        taken = d.take()
        assert taken is not None
        d.begin(taken, worker)  # a worker takes it: the gate counts it
    assert d.take() is None  # two queued, gated
    d.unassign(jobs[0])
    assert d.take() is jobs[2]


def test_ungated_jobs_pass_gated_ones_waiting() -> None:
    d, _ = dispatcher()
    gate = Gate(1)
    gate.active = 1
    blocked, free = make_job(1, gate)[0], make_job(1)[0]
    for job in (blocked, free):
        d.add(job)
        d.enqueue(job)
    assert d.take() is free


def test_a_crash_in_an_exact_slice_blames_the_item_that_began_last() -> None:
    d, outbox = dispatcher()
    job, sink = make_job(10)
    d.add(job)
    run = d.begin(job, "w")
    d.deliver(job, [0, 1, 2], {})
    d.unassign(job)
    crash = parstream.WorkerCrashed("died")
    d.settle_death(job, Death(crash=crash, begun=4))  # item 3 was running
    assert run_of(job).cursor == 4
    assert d.queue[0] is job  # items 4.. never began: queued again
    outbox.flush()
    results = [payload for kind, payload in sink.calls if kind == "results"]
    assert results[-1] == ([None], {0: crash})
    assert run.sent_end == 10


def test_a_death_before_the_slice_began_requeues_it_whole() -> None:
    d, _ = dispatcher()
    job, _ = make_job(5)
    d.add(job)
    d.begin(job, "w")
    d.unassign(job)
    d.settle_death(job, Death(crash=parstream.WorkerCrashed("x"), began=False, begun=0))
    assert run_of(job).cursor == 0
    assert list(d.queue) == [job]


def test_a_crash_within_a_window_isolates_that_window() -> None:
    d, _ = dispatcher()
    job, _ = make_job(100)
    d.add(job)
    run = d.begin(job, "w")
    d.deliver(job, list(range(40)), {})
    d.unassign(job)
    d.settle_death(job, Death(crash=parstream.WorkerCrashed("x"), begun=40 + 25, window=40))
    assert (run.isolate_from, run.isolate_until) == (40, 65)
    d.take()
    d.begin(job, "w2")
    assert run.sent_end == 41  # one item at a time inside the window


def test_a_killed_job_gets_its_reason_for_each_unreported_item() -> None:
    d, outbox = dispatcher()
    job, sink = make_job(3)
    d.add(job)
    d.enqueue(job)
    reason = parstream.TaskShutdown("stop")
    d.kill_queued(job, reason)
    outbox.flush()
    assert sink.calls == [
        ("results", ([None] * 3, dict.fromkeys(range(3), reason))),
        ("done", ("killed", 0)),
    ]


def test_a_returned_rest_goes_back_to_the_sink() -> None:
    d, outbox = dispatcher()
    job, sink = make_job(10, returnable=True)
    d.add(job)
    d.begin(job, "w")
    d.deliver(job, [0, 1, 2, 3], {})
    d.unassign(job)
    d.slice_done(job)
    outbox.flush()
    assert sink.calls[-1] == ("done", ("returned", 6))


# -- options -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("given", "error", "match"),
    [
        ({"max_concurrency": 0}, ValueError, "max_concurrency must be >= 1"),
        ({"max_concurrency": 1.5}, TypeError, "max_concurrency"),
        ({"ordered": "yes"}, TypeError, "ordered must be a bool"),
        ({"timeout": 0}, ValueError, "timeout must be > 0"),
        ({"timeout": float("nan")}, ValueError, "NaN"),
        ({"on_timeout": "ignore"}, ValueError, "on_timeout must be 'exit' or 'kill_task'"),
        ({"progress": 3}, TypeError, "progress"),
        ({"chunksize": 0}, ValueError, "chunksize"),
        ({"buffer_size": -1}, ValueError, "buffer_size"),
        ({"node": 3}, TypeError, "node"),
        ({"chunk_size": 3}, TypeError, "unexpected keyword argument 'chunk_size'"),
    ],
)
def test_options_are_checked_as_one_record(given: dict[str, Any], error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        Options.of(given)


def test_options_normalise_an_infinite_timeout() -> None:
    assert Options.of({"timeout": float("inf")}).timeout is None
    assert Options.of({"timeout": 2}).timeout == 2.0


def test_map_refuses_zip_input_on_exit() -> None:
    with pytest.raises(TypeError, match="zip_input_on_exit"):
        parstream.map(abs, [1], zip_input_on_exit=True)  # type: ignore[call-arg]


# -- the seam ---------------------------------------------------------------------------

FRONT_END = ("_task", "_stream", "_supervisor", "_executor", "_chunks", "_feeder", "_children")
# What the front end may import of parstream: the seam and shared, engine-free parts.
ALLOWED = {
    "parstream",
    "parstream._backend",
    "parstream._errors",
    "parstream._results",
    "parstream._validate",
    "parstream._callbacks",
    "parstream._output",
    "parstream._progress",
    *(f"parstream.{m}" for m in FRONT_END),
}
MECHANICS = re.compile(
    r"\bsignal\b|\bSIG[A-Z]+|os\.kill|killpg|getpid|Pipe\(|fn_bytes|\bShipped\b"
)
# The only places that mention pids: read-throughs of the backend's Worker record.
PID_READERS = {
    ("_task", "pid"),
    ("_task", "shutdown"),
    ("_supervisor", "worker_pids"),
    ("_supervisor", "workers"),
    ("_children", "pid"),
}


@pytest.mark.parametrize("module", FRONT_END)
def test_the_front_end_imports_only_the_seam(module: str) -> None:
    """No front-end module imports a backend, nor signals, pipes or function bytes."""
    source = (PACKAGE / f"{module}.py").read_text()
    tree = ast.parse(source)
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        for name in names:
            if name.startswith("parstream"):
                assert name in ALLOWED, f"{module} imports {name}"
            assert name not in ("signal", "loky", "psutil", "ray", "cloudpickle"), name
    code = "\n".join(line for line in source.splitlines() if not line.lstrip().startswith("#"))
    assert not MECHANICS.search(re.sub(r'"""[\s\S]*?"""', "", code)), module
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            body = ast.get_source_segment(source, node) or ""
            without_docs = re.sub(r'"""[\s\S]*?"""', "", body)
            if re.search(r"\bpids?\b", without_docs):
                assert (module, node.name) in PID_READERS, (module, node.name)


@pytest.mark.parametrize("limit", [None, "1"])
def test_cpu_count_follows_lokys_rule(monkeypatch: pytest.MonkeyPatch, limit: str | None) -> None:
    """parstream's cpu_count (kept free of the loky import) agrees with loky's."""
    import loky

    if limit is None:
        monkeypatch.delenv("LOKY_MAX_CPU_COUNT", raising=False)
    else:
        monkeypatch.setenv("LOKY_MAX_CPU_COUNT", limit)
    assert parstream.cpu_count() == loky.cpu_count()
