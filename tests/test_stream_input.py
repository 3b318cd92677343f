"""How streams pull their input: a slow input never holds back results, an
input that raises keeps the results before it, and a batch whose items turn
slow spreads over the workers (issue 8, items 7, 8 and 10)."""

from __future__ import annotations

import functools
import gc
import itertools
import os
import pickle
import subprocess
import sys
import textwrap
import threading
import time
import traceback
from typing import TYPE_CHECKING, Any

import pytest
from _util import value

import parstream
from parstream import Exit, Ok

if TYPE_CHECKING:
    from collections.abc import Iterable, Iterator
    from pathlib import Path


def square(x: int) -> int:
    return x * x


def sleep_ret(x: float) -> float:
    time.sleep(x)
    return x


def log_run(folder: str, x: int) -> None:
    """Append ``x`` and this process's pid to ``folder``/runs (one line per run)."""
    fd = os.open(os.path.join(folder, "runs"), os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    try:
        os.write(fd, f"{x} {os.getpid()}\n".encode())
    finally:
        os.close(fd)


def tiny_then_slow(folder: str, first_slow: int, x: int) -> Any:
    """Tiny below ``first_slow``; from there ~5 ms, logging (index, pid) once per run."""
    if x < first_slow:
        return x
    time.sleep(0.005)
    log_run(folder, x)
    return x


def _feeders() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "parstream-feeder"]


# -- item 7: a slow input never holds back finished results ----------------------------------


@pytest.mark.parametrize("kind", ["map", "ordered", "unordered", "nolink"])
def test_each_result_comes_before_the_next_item_is_produced(
    sup: parstream.Supervisor, kind: str
) -> None:
    """The input produces item i+1 only once result i was received: a pull that
    blocks the consumer (today's inline pull) deadlocks here."""
    n = 12
    received = [threading.Event() for _ in range(n)]

    def source() -> Iterator[int]:
        for i in range(n):
            if i and not received[i - 1].wait(20):
                raise RuntimeError(f"result {i - 1} was held back until the next item came")
            yield i

    if kind == "map":
        values: Iterator[int] = sup.stream_map(square, source())
    elif kind == "nolink":
        values = (value(r) for r in sup.async_stream_nolink(square, source()))
    else:
        values = (value(r) for r in sup.async_stream(square, source(), ordered=kind == "ordered"))
    got = []
    for v in values:
        got.append(v)
        received[len(got) - 1].set()
    assert got == [i * i for i in range(n)]


def test_a_burst_then_a_slow_input(sup: parstream.Supervisor) -> None:
    """Tiny items that arrive one at a time are sent one per chunk: each result
    comes back while the input still waits for the consumer."""
    n = 30
    received = [threading.Event() for _ in range(n)]

    def source() -> Iterator[int]:
        # First a burst, so the chunk size grows from the items' cost...
        yield from range(5000)
        # ...then an input whose next item waits for the previous result.
        for i in range(n):
            if i and not received[i - 1].wait(20):
                raise RuntimeError(f"result {i - 1} was held back in a chunk")
            yield 5000 + i

    got = 0
    for v in sup.stream_map(square, source()):
        if v >= 5000 * 5000:
            received[got].set()
            got += 1
    assert got == n


def test_inline_inputs_use_no_feeder_thread(sup: parstream.Supervisor) -> None:
    """A list or range is pulled on the consumer's thread; a generator gets a
    feeder thread that ends with its input."""
    inline: list[Iterable[int]] = [[1, 2, 3], range(3), (1, 2, 3), {1: 0, 2: 0}.keys()]
    for items in inline:
        for _ in sup.stream_map(square, items):
            assert not _feeders()
    threads = []

    def source() -> Iterator[int]:
        for x in range(3):
            threads.append(threading.current_thread().name)
            yield x

    assert list(sup.stream_map(square, source())) == [0, 1, 4]
    assert threads == ["parstream-feeder"] * 3
    for t in _feeders():
        t.join(5)
    assert not _feeders()


def test_an_sqlite_cursor_stays_on_its_thread(sup: parstream.Supervisor) -> None:
    """An sqlite3 cursor refuses other threads: it is pulled inline."""
    import sqlite3

    db = sqlite3.connect(":memory:")
    try:
        db.execute("create table t (x integer)")
        db.executemany("insert into t values (?)", [(i,) for i in range(100)])
        rows = db.execute("select x from t order by x")
        assert list(sup.stream_map(sum, rows)) == list(range(100))
    finally:
        db.close()


def test_close_stops_the_feeder_and_closes_the_generator(sup: parstream.Supervisor) -> None:
    """A generator blocked in next() when the stream closes finishes that one
    call, is pulled no further and is closed on the feeder thread."""
    pulled: list[int] = []
    release = threading.Event()
    finalised = threading.Event()

    def source() -> Iterator[int]:
        try:
            for i in itertools.count():
                if i == 5:
                    release.wait(20)
                pulled.append(i)
                yield i
        finally:
            finalised.set()

    stream = sup.async_stream(square, source())
    assert [next(stream) for _ in range(3)] == [Ok(0), Ok(1), Ok(4)]
    stream.close()
    release.set()
    assert finalised.wait(10)
    for t in _feeders():
        t.join(5)
    assert not _feeders()
    assert pulled == [0, 1, 2, 3, 4, 5]


def test_break_closes_the_generator_on_the_feeder(sup: parstream.Supervisor) -> None:
    """Leaving a for loop early (the stream is then dropped) stops the feeder
    and closes the generator, which is pulled no further."""
    pulled: list[int] = []
    finalised = threading.Event()

    def source() -> Iterator[int]:
        try:
            for i in itertools.count():
                pulled.append(i)
                yield i
        finally:
            finalised.set()

    for r in sup.async_stream(square, source(), chunksize=1, buffer_size=2):
        if r == Ok(81):
            break
    gc.collect()
    assert finalised.wait(10)
    for t in _feeders():
        t.join(5)
    assert not _feeders()
    assert len(pulled) <= 10 + 2 + 2  # delivered + buffer + max_concurrency


def test_a_blocked_input_does_not_keep_the_process_alive(tmp_path: Path) -> None:
    """Leaving a stream whose input blocks forever still lets the script exit."""
    script = tmp_path / "blocked.py"
    script.write_text(
        textwrap.dedent(
            """
            import threading
            import parstream

            def source():
                yield 1
                yield 2
                threading.Event().wait()  # blocks for good
                yield 3

            if __name__ == "__main__":
                for v in parstream.map(abs, source()):
                    if v == 2:
                        break
                print("left", flush=True)
            """
        )
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    out = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=60, env=env
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "left"


def test_back_pressure_holds_with_a_feeder(sup: parstream.Supervisor) -> None:
    """The feeder pulls no further ahead than the stream's bound."""
    pulled = 0

    def source() -> Iterator[float]:
        nonlocal pulled
        for _ in itertools.count():
            pulled += 1
            yield 0.0

    stream = sup.async_stream(sleep_ret, source(), max_concurrency=2, chunksize=1, buffer_size=3)
    for consumed, _ in enumerate(itertools.islice(stream, 50), 1):
        assert pulled - consumed <= 2 + 3
    stream.close()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("n", [0, 1, 2, 5, 100])
@pytest.mark.parametrize("bounds", [(1, 1, 0), (2, 1, 0), (2, None, 1)])
def test_a_generator_ends_under_tight_bounds(
    sup: parstream.Supervisor, n: int, bounds: tuple[int, int | None, int]
) -> None:
    """The feeder sees the input's end whatever the room it had left."""
    concurrency, chunksize, buffer_size = bounds
    out = sup.stream_map(
        square,
        (x for x in range(n)),
        max_concurrency=concurrency,
        chunksize=chunksize,
        buffer_size=buffer_size,
    )
    assert list(out) == [x * x for x in range(n)]


# -- item 8: an input that raises keeps the results before it --------------------------------


class InputFault(Exception):
    pass


def faulty(n: int, at: int) -> Iterator[int]:
    for i in range(n):
        if i == at:
            raise InputFault(f"input broke at {i}")
        yield i


@pytest.mark.parametrize("kind", ["map", "ordered", "unordered", "nolink", "nolink-unordered"])
def test_input_fault_comes_after_every_earlier_result(
    sup: parstream.Supervisor, kind: str
) -> None:
    """50,000 tiny items, the input raising at 40,000: all 40,000 results are
    delivered (in order when ordered), then the input's own exception."""
    at = 40_000
    ordered = not kind.endswith("unordered")
    got: list[int] = []

    def consume() -> None:
        if kind == "map":
            got.extend(sup.stream_map(square, faulty(50_000, at)))
            return
        make = sup.async_stream_nolink if kind.startswith("nolink") else sup.async_stream
        for r in make(square, faulty(50_000, at), ordered=ordered):
            assert isinstance(r, Ok)
            got.append(r.value)

    with pytest.raises(InputFault, match="input broke at 40000") as info:
        consume()
    expected = [i * i for i in range(at)]
    assert (got if ordered else sorted(got)) == expected
    frames = [f.name for f in traceback.extract_tb(info.value.__traceback__)]
    assert "faulty" in frames  # the input's own traceback


def test_input_fault_at_the_first_item(sup: parstream.Supervisor) -> None:
    """An input that raises before its first item raises from the first next()."""
    with pytest.raises(InputFault):
        next(sup.async_stream(square, faulty(10, 0)))


def test_a_task_failure_before_the_input_fault_comes_first(sup: parstream.Supervisor) -> None:
    """Linked: a failed item pulled before the fault is raised, as a loop would."""

    def source() -> Iterator[Any]:
        yield 1
        yield "not a number"
        raise InputFault("late")

    with pytest.raises(TypeError):
        list(sup.stream_map(functools.partial(pow, 2), source()))


# -- item 10: items that turn slow spread over the workers -----------------------------------


@pytest.mark.parametrize(
    ("tiny", "timeout", "ordered", "source_kind"),
    [
        (100_000, None, True, "generator"),
        (100_000, None, False, "generator"),
        (5_000, 30.0, True, "generator"),
        (100_000, None, True, "list"),
    ],
)
def test_slow_items_after_tiny_ones_use_every_worker(
    sup: parstream.Supervisor,
    tmp_path: Path,
    tiny: int,
    timeout: float | None,
    ordered: bool,
    source_kind: str,
) -> None:
    """Tiny items, then 200 of ~5 ms: the chunk size learnt from the tiny ones
    does not pin the slow ones to one worker, and each item runs exactly once,
    in its place."""
    fn = functools.partial(tiny_then_slow, str(tmp_path), tiny)
    numbers = range(tiny + 200)
    source = (x for x in numbers) if source_kind == "generator" else list(numbers)
    out = list(sup.stream_map(fn, source, timeout=timeout, ordered=ordered))
    assert (out if ordered else sorted(out)) == list(range(tiny + 200))
    runs = [line.split() for line in (tmp_path / "runs").read_text().splitlines()]
    assert sorted(int(x) for x, _ in runs) == list(range(tiny, tiny + 200))
    pids = {pid for _, pid in runs}
    assert len(pids) == 2, f"all 200 slow items ran on {pids}"


def test_a_returned_batch_keeps_its_unpicklable_item(sup: parstream.Supervisor) -> None:
    """A batch stopped at the worker's time budget keeps each item's failure:
    an unpicklable argument sent again still fails as itself. (Tiny items
    first, so that the adaptive chunks hold the slow item and the lock
    together; an explicit chunksize is never stopped early.)"""
    tiny = 20_000
    items: list[Any] = [0.0] * tiny + [0.2, threading.Lock(), 0.0]
    out = list(sup.async_stream_nolink(sleep_ret, items))
    assert out[: tiny + 1] == [Ok(0.0)] * tiny + [Ok(0.2)]
    failed = out[tiny + 1]
    assert isinstance(failed, Exit)
    assert isinstance(failed.reason, pickle.PicklingError)
    assert out[tiny + 2] == Ok(0.0)


def sleepy_or_raise(folder: str, first_slow: int, x: int) -> int:
    """Tiny below ``first_slow``; from there ~10 ms, logging each run once;
    multiples of 7 raise."""
    if x < first_slow:
        return x
    time.sleep(0.01)
    log_run(folder, x)
    if x % 7 == 0:
        raise ValueError(x)
    return x


@pytest.mark.parametrize("ordered", [True, False])
def test_a_batch_stopped_early_keeps_order_and_failures(
    sup: parstream.Supervisor, tmp_path: Path, ordered: bool
) -> None:
    """Adaptive chunks learnt on tiny items, then items of ~10 ms, outlast the
    worker's time budget: their unrun rest is re-cut and spread, and every
    item still gets its own result (failures in their places) and runs
    exactly once."""
    tiny = 20_000
    fn = functools.partial(sleepy_or_raise, str(tmp_path), tiny)
    out = list(sup.async_stream_nolink(fn, range(tiny + 60), ordered=ordered))
    assert len(out) == tiny + 60
    got = {}
    for r in out:
        if isinstance(r, Exit):
            assert isinstance(r.reason, ValueError)
            got[r.reason.args[0]] = "raised"
        else:
            got[r.value] = "ok"
    assert got == {x: "raised" if x % 7 == 0 and x >= tiny else "ok" for x in range(tiny + 60)}
    if ordered:
        keys = [r.reason.args[0] if isinstance(r, Exit) else r.value for r in out]
        assert keys == list(range(tiny + 60))
    runs = [line.split() for line in (tmp_path / "runs").read_text().splitlines()]
    assert sorted(int(x) for x, _ in runs) == list(range(tiny, tiny + 60))
    assert len({pid for _, pid in runs}) == 2


def log_pid(folder: str, x: int) -> int:
    """~10 ms, logging (x, pid) once per run."""
    time.sleep(0.01)
    log_run(folder, x)
    return os.getpid()


def paced(n: int, gap_s: float) -> Iterator[int]:
    for i in range(n):
        time.sleep(gap_s)
        yield i


@pytest.mark.parametrize("source", ["range", "generator", "slow generator"])
@pytest.mark.parametrize("timeout", [None, 30.0])
@pytest.mark.parametrize("entry", ["map", "async_stream", "Supervisor.map"])
def test_an_explicit_chunk_runs_whole_on_one_worker(
    sup: parstream.Supervisor, tmp_path: Path, entry: str, timeout: float | None, source: str
) -> None:
    """With ``chunksize``, each chunk is one unit of work on one worker, as in
    ``ProcessPoolExecutor.map``, even when it outlasts the worker's time
    budget (8 items of ~10 ms); each item runs once. Chunks used to be cut
    at the budget and their rest spread over the workers; from a generator
    (pulled on the feeder thread) they were cut at whatever it held, a slow
    one's into chunks of 1 (found by the delivery hunt)."""
    fn = functools.partial(log_pid, str(tmp_path))
    items: Iterable[int] = range(40)
    if source == "generator":
        items = (i for i in range(40))
    elif source == "slow generator":
        items = paced(40, 0.002)
    if entry == "map":
        pids = list(sup.stream_map(fn, items, chunksize=8, timeout=timeout))
    elif entry == "async_stream":
        stream = sup.async_stream(fn, items, chunksize=8, timeout=timeout)
        pids = [r.value for r in stream if isinstance(r, Ok)]
    else:
        pids = list(sup.map(fn, items, chunksize=8, timeout=timeout))
    assert [len(set(pids[k : k + 8])) for k in range(0, 40, 8)] == [1] * 5, pids
    runs = [line.split() for line in (tmp_path / "runs").read_text().splitlines()]
    assert sorted(int(x) for x, _ in runs) == list(range(40))


def test_a_list_input_ends_where_its_iterator_would() -> None:
    """A list is cut by slicing, yet behaves as its iterator: once a chunk
    came up short, items appended later are not run (control: islice)."""
    work = [0]
    seen = []
    with parstream.Supervisor(backend="inline") as s:
        stream = s.async_stream(abs, work, chunksize=2, buffer_size=0, max_concurrency=1)
        for result in stream:
            seen.append(result.value)  # type: ignore[union-attr]
            if len(work) < 3:
                work.append(len(work) * 10)
    control_list = [0]
    it = iter(control_list)
    control = list(itertools.islice(it, 2))  # the short first chunk
    control_list.append(10)
    control += itertools.islice(it, 2)  # the iterator has ended: nothing
    assert seen == control == [0]


@pytest.mark.parametrize("build", ["async_stream", "stream_map"])
def test_an_input_that_iterates_its_own_stream_fails_instead_of_hanging(
    sup: parstream.Supervisor, build: str
) -> None:
    """An input generator that (by mistake) iterates the stream it feeds
    waited, on the feeder's thread, for the consumer, which waited for it:
    for ever. It now gets a ``ValueError``, the stream's input error (as a
    generator that runs itself gets "generator already executing")."""
    holder: dict[str, Any] = {}

    def feeds_on_itself() -> Iterator[int]:
        yield -1
        yield from holder["stream"]

    stream = holder["stream"] = getattr(sup, build)(abs, feeds_on_itself())
    first = next(stream)
    assert (value(first) if build == "async_stream" else first) == 1
    with pytest.raises(ValueError, match="iterated the stream itself"):
        next(stream)


def test_a_new_thread_with_a_finished_feeders_id_may_iterate_the_stream() -> None:
    """Thread ids are reused: a thread made after the feeder ended (its input
    spent) may get the feeder's id, and was taken for the feeder iterating
    its own stream (``ValueError``)."""

    def spent() -> Iterator[int]:
        yield from range(4)

    with parstream.Supervisor(max_workers=2) as sup:
        stream = sup.stream_map(sleep_ret, (0.25 * i for i in spent()))
        assert next(stream) == 0
        feeder = stream._state.feeder
        assert feeder is not None
        feeder.thread.join(10)  # the input is spent: the feeder ended
        ids: list[int] = []
        out: list[Any] = []

        def consume() -> None:
            ids.append(threading.get_ident())
            out.extend(stream)

        thread = threading.Thread(target=consume)
        thread.start()
        thread.join(30)
        assert out == [0.25, 0.5, 0.75]
    if ids != [feeder.thread.ident]:
        pytest.skip("this C library gave the new thread another id: nothing was shown")
