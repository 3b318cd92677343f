"""The fast layer: parstream's policies as plain objects, no process started.

The reorder buffer, chunk sizing, the restart-intensity window, gates and
the queue, crash attribution, option validation, and the import boundary
between the front end and the backends. Each test runs in milliseconds.
"""

from __future__ import annotations

import ast
import gc
import logging
import pickle
import queue
import re
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

import pytest

import parstream
from parstream._backend import Counts, End, FnHandle, Gate, Job
from parstream._backends._dispatch import Death, Dispatcher, Outbox, run_of
from parstream._backends._frames import loads_results
from parstream._backends.local import _worker
from parstream._backends.local._pool import _overrunning
from parstream._backends.local._slot import (
    BEGUN,
    EXACT,
    INT_SLOTS,
    J_COUNT,
    J_USED,
    SEQ,
    STARTED,
    new_slot,
)
from parstream._children import RestartWindow, is_normal
from parstream._chunks import MAX_CHUNK, TARGET_CHUNK_S, Chunk, ChunkSizer, ReorderBuffer
from parstream._results import Ok, oks
from parstream._validate import Options

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

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
    "parstream._interrupts",
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


# -- Ok records built in bulk ---------------------------------------------------------------


@pytest.mark.parametrize("collecting", [True, False])
def test_oks_builds_real_ok_records_and_leaves_the_collector_as_it_was(collecting: bool) -> None:
    values: list[Any] = [1, "a", None, [2, 3], (4,)]
    was = gc.isenabled()
    try:
        if not collecting:
            gc.disable()
        built = oks(values)
        assert gc.isenabled() is collecting
    finally:
        if was:
            gc.enable()
    assert built == [Ok(v) for v in values]
    assert all(type(r) is Ok for r in built)
    assert [r.value for r in built] == values
    assert built[3].value is values[3]
    assert hash(built[0]) == hash(Ok(1))
    assert pickle.loads(pickle.dumps(built)) == built
    match built[1]:
        case Ok(value):
            assert value == "a"
        case _:
            pytest.fail("Ok built in bulk does not match case Ok(value)")
    with pytest.raises(AttributeError):
        built[0].value = 2
    assert oks([]) == []


# -- the worker's journal --------------------------------------------------------------------


def test_journal_keeps_every_kind_of_entry_in_order() -> None:
    """Ints go to the slot's int array, anything else to the byte area tagged
    with its entry number; read back in one order, by entry number."""
    slot = new_slot()
    if slot is None:
        pytest.skip("no memfd_create here: the pool runs without a slot")
    try:
        slot.journal_reset(7)
        big = 1 << 70
        boom = (ValueError("boom"), "traceback text")
        assert slot.journal_value(5)
        assert slot.journal_value("five")
        assert slot.journal_value(True)  # a bool stays a bool, not the int 1
        assert slot.journal_error(boom)
        assert slot.journal_value(big)  # beyond 64 bits: pickled
        assert slot.journal_value(-(2**63))
        # As the worker's item loop writes an int itself: the entry, then the count.
        count = slot.words[J_COUNT]
        slot.ints[count] = 42
        slot.words[J_COUNT] = count + 1
        base, entries = slot.journal()
        assert base == 7
        assert [ok for ok, _ in entries] == [True, True, True, False, True, True, True]
        values = [v for ok, v in entries if ok]
        assert values == [5, "five", True, big, -(2**63), 42]
        assert type(values[2]) is bool
        error, text = entries[3][1]
        assert isinstance(error, ValueError)
        assert str(error) == "boom"
        assert text == "traceback text"
        slot.journal_reset(0)
        assert slot.journal() == (0, [])
    finally:
        slot.close()


def test_journal_ignores_an_entry_written_but_not_counted() -> None:
    """A worker that dies between writing an entry and counting it leaves the
    entry unread (its item is then the one that was running)."""
    slot = new_slot()
    if slot is None:
        pytest.skip("no memfd_create here: the pool runs without a slot")
    try:
        slot.journal_reset(0)
        assert slot.journal_value(1)
        assert slot.journal_value("two")
        slot.ints[2] = 3  # written, never counted
        slot.words[J_COUNT] = 1  # as if "two" had been written but not counted
        assert slot.journal() == (0, [(True, 1)])
    finally:
        slot.close()


def test_journal_ints_past_the_array_go_to_the_byte_area() -> None:
    slot = new_slot()
    if slot is None:
        pytest.skip("no memfd_create here: the pool runs without a slot")
    try:
        slot.journal_reset(0)
        slot.words[J_COUNT] = INT_SLOTS - 1
        assert slot.journal_value(10)
        assert slot.journal_value(11)  # entry INT_SLOTS: no room in the array
        assert slot.words[J_USED] > 0
        _, entries = slot.journal()
        assert entries[-2:] == [(True, 10), (True, 11)]
    finally:
        slot.close()


BIG = b"x" * 1_500_000  # pickled into the journal's byte area: three fill it


def mixed_outcome(i: int) -> Any:
    kind = i % 8
    if kind in (1, 5):
        return bytes([i]) * 1_500_000
    if kind == 3:
        return 1 << 70
    if kind == 6:
        return f"s{i}"
    if kind == 7:
        return ValueError(f"item {i}")
    return i


def big_then_ints(i: int) -> Any:
    # The loop starts unjournaled, a step of items at a time; at its first
    # reading of the clock they turn out slow enough to journal, and their
    # results overflow the journal. Ints come next.
    time.sleep(0.0001)
    return BIG if i < _worker.TINY_STEP else i


@pytest.fixture
def runner_on_a_slot() -> Iterator[tuple[Any, Any, list[bytes]]]:
    """A worker's item loop in this process, on a slot of its own, and the
    frames it sends; its log forwarding taken back after the test."""
    slot = new_slot()
    if slot is None:
        pytest.skip("no memfd_create here: the pool runs without a slot")
    sent: list[bytes] = []

    class Conn:
        def send_bytes(self, data: bytes) -> None:
            sent.append(bytes(data))

    try:
        yield _worker._Runner(Conn(), slot), slot, sent
    finally:
        logging.getLogger().removeHandler(
            next(h for h in logging.getLogger().handlers if isinstance(h, _worker._Forward))
        )
        slot.close()


@pytest.mark.parametrize(
    ("outcome", "journal_first", "timed"),
    [(mixed_outcome, True, False), (big_then_ints, False, False), (mixed_outcome, True, True)],
)
def test_worker_journal_holds_only_true_results_at_every_step(
    outcome: Callable[[int], Any],
    journal_first: bool,
    timed: bool,
    runner_on_a_slot: tuple[Any, Any, list[bytes]],
) -> None:
    """Run a batch through the worker's item loop in this process and read the
    journal as a dying worker would leave it, before every item and every
    flush: each entry counted is the result of the item at its position.
    Results fill the journal over and over; ints, big ints, strings and
    errors mix. The loop for a per-item timeout (``timed``) also stamps each
    item's start in the slot before the item runs."""
    runner, slot, sent = runner_on_a_slot
    outcomes: list[Any] = []  # what each item returned or raised, by position
    checked = 0

    def check_journal() -> None:
        nonlocal checked
        base, entries = slot.journal()
        for k, (ok, got) in enumerate(entries):
            want = outcomes[base + k]
            if isinstance(want, ValueError):
                assert not ok
                assert str(got[0]) == str(want)
            else:
                assert ok
                assert got == want
            checked += 1

    previous_end = time.monotonic()

    def item(i: int) -> Any:
        nonlocal previous_end
        check_journal()  # as a death inside this item would leave it
        if timed:
            # The parent's deadline check sees this item begun, since then.
            assert slot.words[BEGUN] == i + 1
            assert previous_end <= slot.started() <= time.monotonic()
        result = outcome(i)
        previous_end = time.monotonic()
        outcomes.append(result)
        if isinstance(result, ValueError):
            raise result
        return result

    send_results = runner.send_results

    def flush(values: list[Any], errors: Any, done: bool) -> None:
        check_journal()  # as a death between the last item and its flush would leave it
        send_results(values, errors, done)

    runner.send_results = flush
    if timed:
        runner.run_timed(item, list(range(60)))
    else:
        runner.run_flushing(item, list(range(60)), journal_first)
    got: list[Any] = []
    for data in sent:
        _, _, values, errors = loads_results(data)
        for i, v in enumerate(values):
            got.append(("err", str(errors[i][0])) if i in errors else ("ok", v))
    ran = len(got)
    assert ran >= 1
    assert got == [
        ("err", str(o)) if isinstance(o, ValueError) else ("ok", o) for o in outcomes[:ran]
    ]
    assert checked > 0


def test_a_timed_batch_reports_in_flushes_not_per_item(
    runner_on_a_slot: tuple[Any, Any, list[bytes]],
) -> None:
    """A batch with a per-item timeout sends its results in flushes (a
    message per item cost 60-150 us, 12-150 times the work of small items),
    every item's start stamped in the slot instead."""
    runner, slot, sent = runner_on_a_slot
    runner.run_timed(abs, list(range(-500, 500)))
    values = [v for data in sent for v in loads_results(data)[2]]
    assert values == [abs(i) for i in range(-500, 500)]
    assert len(sent) < 50
    assert slot.words[BEGUN] == 1000


def _run_on_a_fake_clock(
    runner: Any,
    slot: Any,
    cost_s: Callable[[int], float],
    n: int,
    ticker_wake_s: float = 0.0,
) -> list[int]:
    """Run ``n`` items through the item loop, unjournaled at first, on a clock
    that item ``i`` advances by ``cost_s(i)`` and waking the ticker thread by
    ``ticker_wake_s``: whatever this machine's load, the loop sees exactly
    those durations. Returns, per item, whether it ran journaled (``EXACT``
    set while it ran)."""
    now = [1000.0]
    modes: list[int] = []

    def item(i: int) -> int:
        modes.append(slot.words[EXACT])
        now[0] += cost_s(i)
        return i

    start_ticker = runner.start_ticker

    def slow_start() -> None:
        start_ticker()
        now[0] += ticker_wake_s  # its thread takes the GIL for a moment

    runner.start_ticker = slow_start
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(time, "monotonic", lambda: now[0])  # the loop reads time.monotonic
        runner.run_flushing(item, list(range(n)), False)
    return modes


def test_waking_the_ticker_does_not_count_in_the_first_step_of_tiny_items(
    runner_on_a_slot: tuple[Any, Any, list[bytes]],
) -> None:
    """The ticker thread, woken at a batch's start, takes the GIL for a
    moment. Counted in the first step of tiny items, it made ~10% of batches
    look slow (~1 us an item) and journal their next few thousand items, at
    ~4x the cost of each (issue 12)."""
    runner, slot, _ = runner_on_a_slot
    modes = _run_on_a_fake_clock(runner, slot, lambda i: 1e-7, 20_000, ticker_wake_s=5e-5)
    assert len(modes) == 20_000
    assert sum(modes) == 0


def test_slow_items_in_an_unjournaled_batch_are_journaled_after_one_step(
    runner_on_a_slot: tuple[Any, Any, list[bytes]],
) -> None:
    """Items that turn out slow (here 50 us each) in a batch begun
    unjournaled are journaled from the second step on."""
    runner, slot, _ = runner_on_a_slot
    modes = _run_on_a_fake_clock(runner, slot, lambda i: 5e-5, 400)
    step = _worker.TINY_STEP
    assert modes[:step] == [0] * step
    assert modes[step:] == [1] * (400 - step)


def test_the_hub_finds_the_late_item_and_its_start_in_the_slot() -> None:
    """At the deadline of the item the hub last knew running, the slot says
    whether that item overran or a later one began (and when)."""
    slot = new_slot()
    if slot is None:
        pytest.skip("no memfd_create here: the pool runs without a slot")
    try:
        worker = SimpleNamespace(slot=slot, seq=5, item_started=100.0)
        job: Any = SimpleNamespace(state=SimpleNamespace(cursor=10, slice_start=8))
        words = slot.words
        words[SEQ], words[EXACT] = 5, 1
        words[STARTED], words[BEGUN] = 100_000_000_000, 3  # position 10 runs since 100.0
        assert _overrunning(worker, job, 1.0, 101.0) == 10  # type: ignore[arg-type]
        words[STARTED], words[BEGUN] = 100_800_000_000, 5  # position 12 began at 100.8
        assert _overrunning(worker, job, 1.0, 101.0) is None  # type: ignore[arg-type]
        assert worker.item_started == pytest.approx(100.8)
        assert _overrunning(worker, job, 1.0, 102.0) == 12  # type: ignore[arg-type]
        words[SEQ] = 4  # the worker has not begun this batch: the hub's own record
        assert _overrunning(worker, job, 1.0, 102.0) == 10  # type: ignore[arg-type]
    finally:
        slot.close()


@pytest.mark.parametrize("limit", [None, "1"])
def test_cpu_count_follows_lokys_rule(monkeypatch: pytest.MonkeyPatch, limit: str | None) -> None:
    """parstream's cpu_count (kept free of the loky import) agrees with loky's."""
    import loky

    if limit is None:
        monkeypatch.delenv("LOKY_MAX_CPU_COUNT", raising=False)
    else:
        monkeypatch.setenv("LOKY_MAX_CPU_COUNT", limit)
    assert parstream.cpu_count() == loky.cpu_count()


# -- a task's latch ------------------------------------------------------------------


class _Interrupt(Exception):
    pass


def test_an_interrupted_waiter_does_not_strand_the_other_waiters() -> None:
    """An exception (Ctrl-C, say) landing in a waiter just as the latch wakes
    it must not keep the latch's lock: the other waiters wake all the same."""
    import ctypes

    from parstream._task import _Latch

    latch = _Latch()
    woke: list[object] = []

    def first() -> None:
        try:
            latch.wait()
        except _Interrupt:
            woke.append("interrupted")

    def second() -> None:
        woke.append(latch.wait())

    threads = [threading.Thread(target=f, daemon=True) for f in (first, second)]
    for t in threads:
        t.start()
    time.sleep(0.2)  # both blocked in the lock
    ident = ctypes.c_ulong(threads[0].ident or 0)
    assert ctypes.pythonapi.PyThreadState_SetAsyncExc(ident, ctypes.py_object(_Interrupt)) == 1
    latch.set()
    for t in threads:
        t.join(5)
    assert not threads[1].is_alive(), "the second waiter was stranded"
    assert sorted(map(str, woke)) == ["True", "interrupted"]
    assert latch.wait(0) is True  # and later waits return at once


@pytest.mark.parametrize(
    "fn",
    [
        parstream.async_stream,
        parstream.async_stream_nolink,
        parstream.map,
        parstream.Supervisor.async_stream,
        parstream.Supervisor.async_stream_nolink,
        parstream.Supervisor.stream_map,
    ],
    ids=lambda fn: fn.__qualname__,
)
def test_stream_options_are_in_the_signature_with_their_defaults(fn: Any) -> None:
    """The README's signature: each option a keyword-only parameter, as
    ``inspect.signature`` and ``help()`` show it."""
    import inspect

    params = inspect.signature(fn).parameters
    expected = {
        "max_concurrency": None,
        "ordered": True,
        "timeout": None,
        "on_timeout": "exit",
        "progress": False,
        "chunksize": None,
        "buffer_size": None,
    }
    if "map" not in fn.__name__:
        expected["zip_input_on_exit"] = False
    else:
        assert "zip_input_on_exit" not in params
    for name, default in expected.items():
        assert params[name].kind is inspect.Parameter.KEYWORD_ONLY, name
        assert params[name].default == default, name
    assert not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def test_map_chunks_share_a_small_buffersize_among_the_workers() -> None:
    """``Supervisor.map(buffersize=4)`` on 2 workers: an automatic chunk grown
    for tiny items is cut to 2, so two chunks fit the budget at once (one
    chunk took all 4, and the calls ran one worker at a time). An explicit
    chunksize keeps its size."""
    from parstream._executor import MapState
    from parstream._validate import Options

    state = MapState(
        None, None, iter(()), Options(), linked=False, max_concurrency=2, timeout=None, cap=4
    )
    state.sizer.chunk = 4096  # grown on tiny items
    assert state.next_chunk_size() == 2
    explicit = MapState(
        None,
        None,
        iter(()),
        Options(chunksize=3),
        linked=False,
        max_concurrency=2,
        timeout=None,
        cap=12,
    )
    assert explicit.next_chunk_size() == 3
