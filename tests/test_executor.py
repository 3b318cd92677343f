"""The concurrent.futures.Executor contract, on ProcessPoolExecutor and Supervisor (issue 11).

Every contract test runs on both: the stdlib is the control, so a test that
fails on ``ProcessPoolExecutor`` is wrong, not the stdlib. Calls synchronise
through files (``mark_then_wait``): a call leaves a mark when it starts and
waits for a release file, so "running" and "pending" are known, not guessed.
The tests after the contract section are parstream's own: the lazy map, the
initializer, Ctrl-C.
"""

from __future__ import annotations

import concurrent.futures as cf
import functools
import gc
import itertools
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
import weakref
from pathlib import Path
from typing import TYPE_CHECKING, Any

import _executor_funcs as f
import psutil
import pytest
from _util import gone, read_line, wait_until

import parstream
from parstream._backends.local._spawn import START_BACKOFF_S

if TYPE_CHECKING:
    from collections.abc import Iterator

KINDS = ["stdlib", "parstream"]
TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent


def make(kind: str, workers: int = 2, **kw: Any) -> cf.Executor:
    if kind == "stdlib":
        return cf.ProcessPoolExecutor(max_workers=workers, **kw)
    return parstream.Supervisor(max_workers=workers, **kw)


@pytest.fixture(params=KINDS)
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def wait_file(path: Path, within: float = 30.0) -> None:
    deadline = time.monotonic() + within
    while not path.exists():
        assert time.monotonic() < deadline, f"{path.name} never appeared"
        time.sleep(0.01)


def new_children(before: set[int]) -> list[int]:
    out = []
    for p in psutil.Process().children(recursive=True):
        try:
            if p.pid in before or "resource_tracker" in " ".join(p.cmdline()):
                continue
        except psutil.Error:
            continue
        out.append(p.pid)
    return out


def consume(it: Any, into: list[Any]) -> None:
    """Append what ``it`` yields to ``into`` until it ends or raises."""
    for x in it:
        into.append(x)  # noqa: PERF402 - one at a time: keep what came before a raise


class Gate:
    """Marks and a release file in ``tmp_path`` for ``mark_then_wait`` calls."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.release_path = folder / "release"

    def mark(self, name: str) -> Path:
        return self.folder / f"mark-{name}"

    def submit(self, ex: cf.Executor, name: str) -> cf.Future[Any]:
        return ex.submit(f.mark_then_wait, str(self.mark(name)), str(self.release_path))

    def release(self) -> None:
        self.release_path.touch()

    def __enter__(self) -> Gate:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()  # a failed test must not leave calls waiting


@pytest.fixture
def gate(tmp_path: Path) -> Iterator[Gate]:
    with Gate(tmp_path) as g:
        yield g


# -- submit, result, cancel -----------------------------------------------------------


def test_submit_result_and_exception(kind: str) -> None:
    """result() gives the value; a raising call's exception() and result() give its error."""
    with make(kind) as ex:
        assert ex.submit(f.square, 7).result(timeout=30) == 49
        bad = ex.submit(f.raise_value_error, "nope")
        err = bad.exception(timeout=30)
        assert isinstance(err, ValueError)
        assert str(err) == "nope"
        with pytest.raises(ValueError, match="nope"):
            bad.result()
        assert bad.done()
        assert not bad.cancelled()


def test_submit_kwargs(kind: str) -> None:
    """Keyword arguments reach the call."""
    with make(kind) as ex:
        assert ex.submit(f.with_kwargs, 1, c=3).result(timeout=30) == (1, 0, 3)
        assert ex.submit(f.with_kwargs, a=1, b=2).result(timeout=30) == (1, 2, 0)


def test_an_unpicklable_keyword_argument_fails_its_future_not_submit(kind: str) -> None:
    """As with a positional one: submit returns, the future holds the error
    (parstream's names the keyword), and the executor goes on."""
    with make(kind) as ex:
        fut = ex.submit(f.with_kwargs, 1, b=threading.Lock())  # type: ignore[arg-type]
        err = fut.exception(timeout=30)
        assert err is not None
        assert ex.submit(f.with_kwargs, 1, b=2).result(timeout=30) == (1, 2, 0)
    if kind == "parstream":
        assert "keyword argument 'b' (lock)" in str(err), err


def _cancel_all(
    start: threading.Barrier, futures: list[cf.Future[Any]], said: dict[int, list[bool]], k: int
) -> None:
    start.wait(10)
    said[k] = [fut.cancel() for fut in futures]


def test_two_threads_cancelling_the_same_futures_both_succeed(kind: str, tmp_path: Path) -> None:
    """``cancel()`` from two threads at once on pending futures: both calls
    return True for every future that ends cancelled, as the stdlib's do.
    (The second returned False while the first was between withdrawing the
    call and marking the future: 17-20 of 600 here.)"""
    switch = sys.getswitchinterval()
    with make(kind, workers=1) as ex, Gate(tmp_path) as gate:
        gate.submit(ex, "blocker")
        queued = [gate.submit(ex, f"q{i}") for i in range(2)]  # the stdlib's call queue
        sys.setswitchinterval(1e-6)  # thread switches between any two steps
        try:
            wrong = 0
            for _ in range(30):
                futures = [ex.submit(pow, 2, i) for i in range(20)]
                said: dict[int, list[bool]] = {0: [], 1: []}
                start = threading.Barrier(2)
                threads = [
                    threading.Thread(target=_cancel_all, args=(start, futures, said, k))
                    for k in (0, 1)
                ]
                for t in threads:
                    t.start()
                for t in threads:
                    t.join(30)
                for i, fut in enumerate(futures):
                    assert fut.cancelled()
                    wrong += not (said[0][i] and said[1][i])
        finally:
            sys.setswitchinterval(switch)
        assert wrong == 0
        for fut in queued:
            fut.cancel()


def test_a_done_callback_may_cancel_another_future(kind: str, tmp_path: Path) -> None:
    """``a``'s done-callback cancels ``b``: ``a.cancel()`` returns and ``b`` is
    cancelled. (parstream ran the callbacks under the lock that cancel() takes:
    this cancel, and every later one in the process, hung.)"""
    with make(kind, workers=1) as ex, Gate(tmp_path) as gate:
        gate.submit(ex, "blocker")
        queued = [gate.submit(ex, f"q{i}") for i in range(2)]  # the stdlib's call queue
        a, b, c = (ex.submit(pow, 2, i) for i in range(3))
        a.add_done_callback(lambda _: b.cancel())
        outcome: list[bool] = []
        thread = threading.Thread(target=lambda: outcome.append(a.cancel()), daemon=True)
        thread.start()
        thread.join(10)
        assert outcome == [True]
        assert b.cancelled()
        assert c.cancel() is True  # a later, unrelated cancel
        for fut in queued:
            fut.cancel()


def test_cancel_pending_and_running(kind: str, tmp_path: Path) -> None:
    """A running future cannot be cancelled; a pending one can, and then never runs."""
    with make(kind, workers=1) as ex, Gate(tmp_path) as gate:
        first = gate.submit(ex, "first")
        # The stdlib hands calls to its queue ahead (max_workers + 1 of them
        # behind the running one) and marks them running; the fourth is
        # pending in both executors.
        queued = [gate.submit(ex, f"q{i}") for i in range(2)]
        last = gate.submit(ex, "last")
        wait_file(gate.mark("first"))
        assert first.running()
        assert not last.running()
        assert not last.done()
        called: list[cf.Future[Any]] = []
        last.add_done_callback(called.append)
        assert first.cancel() is False
        assert last.cancel() is True
        assert last.cancelled()
        assert last.done()
        assert not last.running()
        assert called == [last]
        assert last.cancel() is True  # again: still cancelled
        with pytest.raises(cf.CancelledError):
            last.result()
        gate.release()
        assert first.result(timeout=30) == str(gate.mark("first"))
        assert [q.result(timeout=30) for q in queued] == [
            str(gate.mark("q0")),
            str(gate.mark("q1")),
        ]
        assert first.cancel() is False  # finished
    assert not gate.mark("last").exists()


def test_a_call_an_idle_worker_began_is_running(kind: str, tmp_path: Path) -> None:
    """running() is True once the call has begun, also when it went straight
    to an idle worker (no queue in between), and False once it is done."""
    with make(kind, workers=1) as ex, Gate(tmp_path) as gate:
        assert ex.submit(f.getpid).result(timeout=30) > 0  # the worker is up
        time.sleep(0.3)  # and idle, with nothing else going on
        fut = gate.submit(ex, "a")
        wait_file(gate.mark("a"))
        assert fut.running()
        assert fut.cancel() is False
        gate.release()
        assert fut.result(timeout=30) == str(gate.mark("a"))
        assert not fut.running()


def test_done_callbacks(kind: str, tmp_path: Path) -> None:
    """A callback runs once with its future on completion, and at once if added after."""
    with make(kind) as ex, Gate(tmp_path) as gate:
        seen: list[cf.Future[Any]] = []
        fut = gate.submit(ex, "a")
        fut.add_done_callback(seen.append)
        assert seen == []
        gate.release()
        fut.result(timeout=30)
        deadline = time.monotonic() + 10
        while not seen:  # the executor's thread may still be running callbacks
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert seen == [fut]
        late: list[cf.Future[Any]] = []
        fut.add_done_callback(late.append)
        assert late == [fut]


def test_kept_futures_do_not_keep_their_arguments(kind: str, tmp_path: Path) -> None:
    """A future the caller keeps holds its result, not the call's arguments:
    gone once it is done (checked right after result()) or, once the queue
    has moved on, cancelled."""
    with make(kind, workers=1) as ex, Gate(tmp_path) as gate:
        kept: list[cf.Future[Any]] = []
        alive = 0
        for _ in range(60):
            blob = f.Blob(1000)
            ref = weakref.ref(blob)
            kept.append(ex.submit(f.blob_size, blob))
            assert kept[-1].result(timeout=30) == 1000
            del blob
            gc.collect()
            alive += ref() is not None
        assert alive == 0
        # Behind a running call and the stdlib's queued-ahead ones: pending.
        gate.submit(ex, "first")
        queued = [gate.submit(ex, f"q{i}") for i in range(2)]
        blob = f.Blob(1000)
        ref = weakref.ref(blob)
        pending = ex.submit(f.blob_size, blob)
        del blob
        wait_file(gate.mark("first"))
        assert pending.cancel() is True
        gate.release()
        cf.wait(queued, timeout=30)
        deadline = time.monotonic() + 10  # the stdlib drops it when its queue moves
        while gc.collect() >= 0 and ref() is not None:
            assert time.monotonic() < deadline, "a cancelled future keeps its arguments"
            time.sleep(0.01)
        assert pending.cancelled()


def test_a_result_taken_and_dropped_is_freed(kind: str) -> None:
    """Once result() has returned and the caller dropped the future and the
    value, nothing of the executor's holds the value (no thread still on it)."""
    with make(kind) as ex:
        alive = 0
        for _ in range(100):
            value = ex.submit(f.make_blob, 1000).result(timeout=30)
            ref = weakref.ref(value)
            del value  # no collection: it goes at once, unless something holds it
            alive += ref() is not None
        assert alive == 0


def test_wait_three_modes(kind: str, tmp_path: Path) -> None:
    """wait() with FIRST_COMPLETED, FIRST_EXCEPTION and ALL_COMPLETED."""
    with make(kind) as ex, Gate(tmp_path) as gate:
        blocked = gate.submit(ex, "blocked")
        wait_file(gate.mark("blocked"))
        quick = ex.submit(f.square, 3)
        done, not_done = cf.wait([blocked, quick], timeout=30, return_when=cf.FIRST_COMPLETED)
        assert done == {quick}
        assert not_done == {blocked}
        failing = ex.submit(f.raise_value_error, "x")
        done, not_done = cf.wait([blocked, failing], timeout=30, return_when=cf.FIRST_EXCEPTION)
        assert done == {failing}
        assert not_done == {blocked}
        done, not_done = cf.wait([blocked, quick], timeout=0.2, return_when=cf.ALL_COMPLETED)
        assert not_done == {blocked}
        gate.release()
        done, not_done = cf.wait([blocked, quick, failing], timeout=30)
        assert done == {blocked, quick, failing}
        assert not_done == set()


def test_as_completed_timeout_and_duplicates(kind: str, tmp_path: Path) -> None:
    """as_completed yields a duplicated future once, then raises TimeoutError on time."""
    with make(kind) as ex, Gate(tmp_path) as gate:
        blocked = gate.submit(ex, "blocked")
        quick = ex.submit(f.square, 4)
        assert quick.result(timeout=30) == 16
        got: list[Any] = []
        with pytest.raises(cf.TimeoutError):
            consume(cf.as_completed([quick, blocked, quick], timeout=0.5), got)
        assert got == [quick]
        gate.release()
        assert set(cf.as_completed([quick, blocked, quick], timeout=30)) == {quick, blocked}


# -- map --------------------------------------------------------------------------------


def test_map_order_zip_and_empty(kind: str) -> None:
    """Results in input order; several iterables zipped to the shortest; empty input."""
    with make(kind) as ex:
        assert list(ex.map(f.square, range(50))) == [x * x for x in range(50)]
        assert list(ex.map(f.add, [1, 2, 3], (10, 20))) == [11, 22]
        assert list(ex.map(f.add, iter([1, 2]), range(10, 100))) == [11, 13]
        assert list(ex.map(f.square, [])) == []
        assert list(ex.map(f.square)) == []


def test_map_exception_at_its_position(kind: str) -> None:
    """The first exception is raised where its item is, after the earlier results."""
    with make(kind) as ex:
        got: list[Any] = []
        with pytest.raises(ValueError, match="bad item 3"):
            consume(ex.map(f.fail_at, range(8), [3] * 8), got)
        assert got == [0, 1, 2]


@pytest.mark.slow
def test_map_timeout_is_one_deadline_and_cancels_the_rest(kind: str, tmp_path: Path) -> None:
    """map(timeout=) raises TimeoutError on time, and calls not yet started never run."""
    n = 8
    with make(kind, workers=1) as ex:
        results = ex.map(f.mark_sleep, [str(tmp_path)] * n, range(n), [0.6] * n, timeout=0.3)
        with pytest.raises(cf.TimeoutError):
            list(results)
        ex.shutdown(wait=True)  # whatever was still meant to run has run now
    started = {int(p.name.split("-")[1]) for p in tmp_path.glob("started-*")}
    # The stdlib had handed at most its queue (max_workers + 1 calls) out; the
    # calls behind those were cancelled.
    assert started <= {0, 1, 2, 3}, started
    assert not any((tmp_path / f"started-{i}").exists() for i in range(4, n))


def test_map_read_after_a_pause_longer_than_its_timeout_still_delivers(kind: str) -> None:
    """The stdlib computes during the pause; parstream's lazy map starts at the
    first next(), and its deadline counts from there, so neither times out."""
    with make(kind) as ex:
        results = ex.map(f.sleep_return, [0.1] * 3, range(3), timeout=2.0)
        time.sleep(2.5)
        assert list(results) == [0, 1, 2]


def test_map_negative_timeout_is_a_deadline_already_past(kind: str) -> None:
    """timeout=deadline - now may be negative: not an error at call time, a
    TimeoutError for the first result not ready."""
    with make(kind) as ex:
        results = ex.map(f.sleep_return, [1.0] * 2, range(2), timeout=-1)
        with pytest.raises(cf.TimeoutError):
            next(results)


# -- shutdown, with, after shutdown -----------------------------------------------------


def test_shutdown_wait_true_finishes_queued_work(kind: str) -> None:
    """shutdown(wait=True) returns after every submitted call, queued ones included."""
    ex = make(kind, workers=1)
    futs = [ex.submit(f.sleep_return, 0.1, i) for i in range(4)]
    ex.shutdown(wait=True)
    assert all(fut.done() for fut in futs)
    assert [fut.result() for fut in futs] == [0, 1, 2, 3]


def test_shutdown_wait_false_returns_and_work_completes(kind: str, gate: Gate) -> None:
    """shutdown(wait=False) returns at once; submitted work still completes."""
    ex = make(kind, workers=1)
    blocked = gate.submit(ex, "a")
    queued = ex.submit(f.sleep_return, 0.0, "queued")
    ex.shutdown(wait=False)
    assert not blocked.done()  # it waits for the release file, made only now
    gate.release()
    assert blocked.result(timeout=30) == str(gate.mark("a"))
    assert queued.result(timeout=30) == "queued"


def test_shutdown_cancel_futures(kind: str, gate: Gate) -> None:
    """cancel_futures=True: pending futures are cancelled, the running one finishes."""
    ex = make(kind, workers=1)
    running = gate.submit(ex, "running")
    for i in range(2):  # queued: the stdlib may already count them as running
        gate.submit(ex, f"q{i}")
    pending = [gate.submit(ex, f"p{i}") for i in range(3)]
    wait_file(gate.mark("running"))
    ex.shutdown(wait=False, cancel_futures=True)
    deadline = time.monotonic() + 30
    while not all(p.cancelled() for p in pending):  # the stdlib's manager thread cancels them
        assert time.monotonic() < deadline, pending
        time.sleep(0.01)
    gate.release()
    assert running.result(timeout=30) == str(gate.mark("running"))
    ex.shutdown(wait=True)
    assert not any(gate.mark(f"p{i}").exists() for i in range(3))


def test_with_block_waits_for_submitted_work(kind: str) -> None:
    """Leaving a with block is shutdown(wait=True): queued calls finish, none is killed."""
    with make(kind, workers=1) as ex:
        futs = [ex.submit(f.sleep_return, 0.1, i) for i in range(3)]
    assert [fut.result(timeout=0) for fut in futs] == [0, 1, 2]


def test_submit_and_map_after_shutdown_raise_runtime_error(kind: str) -> None:
    """After shutdown, submit() and map() raise RuntimeError."""
    ex = make(kind)
    ex.submit(f.square, 2).result(timeout=30)
    ex.shutdown()
    with pytest.raises(RuntimeError):
        ex.submit(f.square, 2)
    with pytest.raises(RuntimeError):
        ex.map(f.square, [1])
    ex.shutdown()  # a second shutdown is harmless


def test_shutdown_returns_once_done_callbacks_have_run(kind: str) -> None:
    """Leaving the ``with`` block (``shutdown(wait=True)``): every done-callback
    of the work it waited for has run (parstream returned with most still
    queued on its callback thread)."""
    called: list[int] = []

    def note(fut: cf.Future[int]) -> None:
        time.sleep(0.002)
        called.append(fut.result())

    with make(kind) as ex:
        for i in range(100):
            ex.submit(f.square, i).add_done_callback(note)
    assert sorted(called) == [i * i for i in range(100)]


def test_a_callback_raising_system_exit_stops_no_other_callback() -> None:
    """A done-callback that raises SystemExit is logged; the callbacks of
    other futures, other supervisors' included, still run (they stopped for
    good: one thread runs them all)."""
    with parstream.Supervisor(max_workers=1) as first:
        first.submit(f.square, 2).add_done_callback(lambda _: sys.exit("stop"))
    called: list[int] = []
    with parstream.Supervisor(max_workers=1) as second:
        for i in range(3):
            second.submit(f.square, i).add_done_callback(lambda fut: called.append(fut.result()))
    assert sorted(called) == [0, 1, 4]


# -- dropped executors and interpreter exit ---------------------------------------------


def _drop(kind: str, mid_map: bool) -> list[int]:
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    ex = make(kind)
    assert sorted(ex.map(f.square, range(20))) == [x * x for x in range(20)]
    assert ex.submit(f.square, 3).result(timeout=30) == 9
    if mid_map:
        it = ex.map(f.square, range(10_000))
        assert next(it) == 0
        del it
    pids = new_children(before)
    assert pids
    del ex
    return pids


@pytest.mark.parametrize("mid_map", [False, True], ids=["idle", "mid-map"])
def test_dropped_executor_releases_its_workers(kind: str, mid_map: bool) -> None:
    """A used executor dropped without shutdown is collected and its workers exit."""
    pids = _drop(kind, mid_map)
    gc.collect()
    assert all(gone(p, within=15) for p in pids), pids


EXIT_SCRIPTS = {
    "pending": """
        for i in range(3):
            ex.submit(f.mark_sleep, folder, i, 0.2)
    """,
    "idle": """
        assert ex.submit(f.square, 3).result() == 9
    """,
    "callbacks": """
        called = open(folder + "/called", "w")
        def note(fut):
            time.sleep(0.002)
            called.write(f"{fut.result()}\\n")
            called.flush()
        for i in range(100):
            ex.submit(f.square, i).add_done_callback(note)
    """,
    "dropped": """
        it = ex.map(f.square, range(100_000))
        assert next(it) == 0
        futs = [ex.submit(f.mark_sleep, folder, i, 0.2) for i in range(3)]
        del ex, it
        gc.collect()
    """,
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(EXIT_SCRIPTS))
def test_interpreter_exit(kind: str, case: str, tmp_path: Path) -> None:
    """A script that ends with an executor alive (or dropped) exits, pending work done."""
    make_ex = (
        "concurrent.futures.ProcessPoolExecutor(max_workers=1)"
        if kind == "stdlib"
        else "parstream.Supervisor(max_workers=1)"
    )
    body = textwrap.dedent(
        f"""
        import concurrent.futures, gc, parstream, time
        import _executor_funcs as f
        folder = {str(tmp_path)!r}
        ex = {make_ex}
        """
    ) + textwrap.dedent(EXIT_SCRIPTS[case])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(TESTS), str(ROOT)]))
    proc = subprocess.run(
        [sys.executable, "-c", body],
        env=env,
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    if case == "callbacks":  # every done-callback ran before the exit
        lines = (tmp_path / "called").read_text().split()
        assert sorted(map(int, lines)) == [i * i for i in range(100)], proc.stderr[-2000:]
    elif case != "idle":
        done = sorted(p.name for p in tmp_path.glob("done-*"))
        assert done == ["done-0", "done-1", "done-2"], (done, proc.stderr[-2000:])


def test_a_main_functions_remote_traceback_names_its_file_and_line(
    kind: str, tmp_path: Path
) -> None:
    """A function from the script itself (sent by value) fails in a worker:
    the remote traceback names the script, the line and its source, as the
    standard library's does (cloudpickle 3.1.2+ names the file
    ``<dynamic-code>`` unless told otherwise)."""
    make_ex = (
        "concurrent.futures.ProcessPoolExecutor(max_workers=1)"
        if kind == "stdlib"
        else "parstream.Supervisor(max_workers=1)"
    )
    script = tmp_path / "parse_script.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import concurrent.futures, traceback, parstream

            def parse(text):
                return int(text)  # the failing line

            if __name__ == "__main__":
                with {make_ex} as ex:
                    futures = [ex.submit(parse, "x")]
                    if {kind == "parstream"}:  # the standard library cannot send a lambda
                        futures.append(ex.submit(lambda: parse("y")))
                    for fut in futures:
                        print("".join(traceback.format_exception(fut.exception().__cause__)))
            """
        )
    )
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run(
        [sys.executable, str(script)],
        env=env,
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    calls = 2 if kind == "parstream" else 1
    assert proc.stdout.count(f'File "{script}", line 5, in parse') == calls, proc.stdout
    assert proc.stdout.count("return int(text)  # the failing line") == calls, proc.stdout
    assert "<dynamic-code>" not in proc.stdout


# -- parstream's own: the lazy map ------------------------------------------------------


def test_map_pulls_an_infinite_input_lazily() -> None:
    """map over itertools.count() returns at once and pulls only ahead by a bound."""
    pulls = [0]

    def counted() -> Iterator[int]:
        for i in itertools.count():
            pulls[0] += 1
            yield i

    with parstream.Supervisor(max_workers=2) as ex:
        it = ex.map(f.square, counted(), buffersize=16)
        assert pulls[0] == 0  # nothing before the first next()
        for consumed, value in enumerate(itertools.islice(it, 500), 1):
            assert value == (consumed - 1) ** 2
            assert pulls[0] <= consumed + 16, (consumed, pulls[0])
        del it  # closes the generator, and with it the stream
        # Default bound: the stream's own (max_concurrency chunks plus a buffer).
        pulls[0] = 0
        got = list(itertools.islice(ex.map(f.square, counted()), 3000))
        assert got == [x * x for x in range(3000)]
        assert pulls[0] < 3000 + 5 * 2 * 32768


def test_map_with_a_small_buffersize_keeps_every_worker_busy(tmp_path: Path) -> None:
    """``buffersize=4`` on 2 workers: as in Python 3.14, 4 calls may be in
    flight, so both workers run at once. (Automatic chunks grew to the whole
    budget: one chunk at a time, one worker at a time.)"""
    with parstream.Supervisor(max_workers=2) as ex:
        list(ex.map(f.square, range(100)))  # both workers up
        seen = list(ex.map(f.at_once, [str(tmp_path)] * 12, buffersize=4))
    assert max(seen) == 2, seen


def test_a_dropped_supervisor_lives_while_its_map_and_streams_do() -> None:
    """Iterating map() or a stream of an unreferenced supervisor works to the end."""
    results = parstream.Supervisor(max_workers=1).map(f.square, range(3000))
    stream = parstream.Supervisor(max_workers=1).async_stream(f.square, range(300))
    gc.collect()
    assert list(results) == [x * x for x in range(3000)]
    assert [r.value for r in stream] == [x * x for x in range(300)]  # type: ignore[union-attr]
    del results, stream
    gc.collect()  # then both release their workers (checked by conftest's fixture)


def test_map_honours_chunksize() -> None:
    """With chunksize, each run of that many consecutive calls shares one worker."""
    with parstream.Supervisor(max_workers=2) as ex:
        pids = list(ex.map(f.getpid, range(40), chunksize=8))
        for k in range(0, 40, 8):
            assert len(set(pids[k : k + 8])) == 1, pids


def test_map_validates_arguments_at_call_time() -> None:
    """Bad map arguments raise at the call, naming the parameter."""
    with parstream.Supervisor(max_workers=1) as ex:
        with pytest.raises(TypeError, match="fn"):
            ex.map(3, [1])  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="iterables"):
            ex.map(f.square, 3)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="timeout"):
            ex.map(f.square, [1], timeout=float("nan"))
        with pytest.raises(TypeError, match="timeout"):
            ex.map(f.square, [1], timeout="1")  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="chunksize"):
            ex.map(f.square, [1], chunksize=0)
        with pytest.raises(ValueError, match="buffersize"):
            ex.map(f.square, [1], buffersize=0)
        with pytest.raises(TypeError, match="buffersize"):
            ex.map(f.square, [1], buffersize=1.5)  # type: ignore[arg-type]


def test_stream_map_is_kept() -> None:
    """stream_map, the parstream.map twin, still works on a supervisor."""
    with parstream.Supervisor(max_workers=1) as ex:
        assert list(ex.stream_map(f.square, range(5))) == [0, 1, 4, 9, 16]


# -- parstream's own: initializer, constructor ------------------------------------------


def test_initializer_state_is_seen_by_tasks() -> None:
    """The initializer runs in each worker before its first task."""
    with parstream.Supervisor(max_workers=2, initializer=f.set_state, initargs=("ready",)) as ex:
        assert ex.submit(f.get_state).result(timeout=30) == "ready"
        assert set(ex.map(f.get_state, range(100))) == {"ready"}
        assert ex.async_(f.get_state, None).await_(30) == "ready"


def test_initializer_reruns_in_a_replacement_worker(tmp_path: Path) -> None:
    """After a crash, the replacement worker runs the initializer before its first task."""
    with parstream.Supervisor(
        max_workers=1, initializer=f.set_state, initargs=("again", str(tmp_path))
    ) as ex:
        first = ex.submit(f.getpid).result(timeout=30)
        with pytest.raises(parstream.WorkerCrashed):
            ex.submit(f.exit_hard, 1).result(timeout=30)
        assert ex.submit(f.get_state).result(timeout=30) == "again"
        second = ex.submit(f.getpid).result(timeout=30)
    assert second != first
    marks = {p.name for p in tmp_path.iterdir()}
    assert {str(first), str(second)} <= marks


def test_raising_initializer_is_reported_and_the_supervisor_recovers(tmp_path: Path) -> None:
    """A raising initializer fails the waiting calls with its error; fixed, it recovers."""
    marker = tmp_path / "broken"
    marker.touch()
    with parstream.Supervisor(
        max_workers=1, initializer=f.fail_while_exists, initargs=(str(marker),)
    ) as ex:
        fut = ex.submit(f.square, 2)
        with pytest.raises(parstream.WorkerStartFailed) as info:
            fut.result(timeout=60)
        err = info.value
        assert isinstance(err, parstream.WorkerCrashed)
        assert "RuntimeError" in str(err)
        assert "initializer refused" in str(err)
        assert "fail_while_exists" in str(err)  # the worker traceback
        assert isinstance(err.__cause__, RuntimeError)
        assert isinstance(err.__cause__.__cause__, parstream.RemoteTraceback)
        assert not ex.closed
        with pytest.raises(parstream.WorkerStartFailed):
            list(ex.map(f.square, range(3)))
        # Idle, it starts no process until the next call (it started one
        # every ~2 s for ever, running the initializer each time).
        started = ex.stats().workers_started
        time.sleep(3 * START_BACKOFF_S[1])
        assert ex.stats().workers_started == started
        marker.unlink()
        assert ex.submit(f.square, 3).result(timeout=60) == 9
        assert ex.submit(f.get_state).result(timeout=30) == "initialized"


def test_constructor_checks_initializer_and_alias() -> None:
    """Bad initializer/initargs and conflicting max_tasks_* fail at construction."""
    with pytest.raises(TypeError, match="initializer"):
        parstream.Supervisor(initializer=3)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="initargs"):
        parstream.Supervisor(initializer=f.set_state, initargs=5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_tasks_per_child"):
        parstream.Supervisor(max_tasks_per_worker=2, max_tasks_per_child=3)
    with pytest.raises(ValueError, match="max_tasks_per_child"):
        parstream.Supervisor(max_tasks_per_child=0)


def test_mp_context_spawn_is_accepted_and_fork_refused() -> None:
    """ProcessPoolExecutor code passing mp_context keeps working where the
    context means what parstream's workers are (fresh interpreters); a fork
    context, whose inheritance they cannot give, is refused at the call."""
    import multiprocessing

    spawn = multiprocessing.get_context("spawn")
    with parstream.Supervisor(max_workers=1, mp_context=spawn) as ex:
        assert ex.submit(f.square, 4).result(timeout=30) == 16
    with pytest.raises(ValueError, match="mp_context"):
        parstream.Supervisor(mp_context=multiprocessing.get_context("fork"))
    with pytest.raises(TypeError, match="mp_context"):
        parstream.Supervisor(mp_context="spawn")


def test_max_tasks_per_child_recycles() -> None:
    """max_tasks_per_child is the stdlib's name for max_tasks_per_worker."""
    with parstream.Supervisor(max_workers=1, max_tasks_per_child=2) as ex:
        pids = [ex.submit(f.getpid).result(timeout=30) for _ in range(6)]
    assert len(set(pids)) >= 3


# -- parstream's own: close, Ctrl-C, children ---------------------------------------------


def test_close_cancels_pending_and_kills_running(gate: Gate) -> None:
    """close() kills at once: pending futures cancelled, running ones fail TaskShutdown."""
    ex = parstream.Supervisor(max_workers=1)
    running = gate.submit(ex, "running")
    pending = gate.submit(ex, "pending")
    wait_file(gate.mark("running"))
    ex.close()
    assert pending.cancelled()
    assert isinstance(running.exception(timeout=30), parstream.TaskShutdown)
    assert not gate.mark("pending").exists()


def test_cancelled_future_wakes_wait_at_once(gate: Gate) -> None:
    """A pending future cancelled is done for wait() and as_completed() at once."""
    with parstream.Supervisor(max_workers=1) as ex:
        running = gate.submit(ex, "running")
        pending = gate.submit(ex, "pending")
        wait_file(gate.mark("running"))
        assert pending.cancel()
        done, _ = cf.wait([pending], timeout=0)
        assert done == {pending}
        assert list(cf.as_completed([pending], timeout=0)) == [pending]
        gate.release()
        running.result(timeout=30)


def test_shutdown_waits_for_start_tasks(tmp_path: Path) -> None:
    """shutdown(wait=True) also lets fire-and-forget start() tasks finish."""
    ex = parstream.Supervisor(max_workers=1)
    ex.start(f.mark_sleep, str(tmp_path), 0, 0.2)
    ex.start(f.mark_sleep, str(tmp_path), 1, 0.0)
    ex.shutdown(wait=True)
    assert (tmp_path / "done-0").exists()
    assert (tmp_path / "done-1").exists()


def test_keyboard_interrupt_leaving_with_kills_at_once(gate: Gate) -> None:
    """A KeyboardInterrupt leaving the block kills instead of waiting (the one deviation)."""
    box: dict[str, Any] = {}

    def interrupted() -> None:
        with parstream.Supervisor(max_workers=1) as ex:
            box["ex"] = ex
            box["running"] = gate.submit(ex, "running")
            wait_file(gate.mark("running"))
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        interrupted()
    ex, running = box["ex"], box["running"]
    assert ex.closed
    assert isinstance(running.exception(timeout=0), parstream.TaskShutdown)


def test_with_block_ends_children_with_their_grace() -> None:
    """On leaving the block, children are not restarted and end by their shutdown grace."""
    with parstream.Supervisor(max_workers=1) as ex:
        child = ex.start_child(f.sleep_return, 30, "x", restart="permanent", shutdown=0.5)
        deadline = time.monotonic() + 30
        while child.pid is None:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        pid = child.pid
    assert not child.alive()
    assert child.restarts == 0
    assert gone(pid)


@pytest.mark.slow
def test_ctrl_c_at_exit_kills_pending_work(tmp_path: Path) -> None:
    """Ctrl-C while exit waits for pending futures kills them and the script ends."""
    body = textwrap.dedent(
        f"""
        import faulthandler, json, signal, time, parstream
        import _executor_funcs as f
        # As in a terminal: a shell's background job inherits SIGINT ignored,
        # and Python then installs no KeyboardInterrupt handler at all.
        signal.signal(signal.SIGINT, signal.default_int_handler)
        faulthandler.register(signal.SIGUSR1, all_threads=True)  # stacks, if it hangs
        ex = parstream.Supervisor(max_workers=1)
        fut = ex.submit(f.mark_then_wait, {str(tmp_path / "m")!r}, {str(tmp_path / "r")!r}, 120)
        while not fut.running():
            time.sleep(0.01)
        print(json.dumps(ex.worker_pids()), flush=True)
        """
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(TESTS), str(ROOT)]))
    proc = subprocess.Popen(
        [sys.executable, "-c", body],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        assert proc.stdout is not None
        import json

        pids = json.loads(read_line(proc.stdout))
        wait_file(tmp_path / "m")
        time.sleep(0.3)  # let the script reach its exit hook
        assert proc.poll() is None  # waiting for the pending future, as the stdlib does
        os.kill(proc.pid, signal.SIGINT)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGUSR1)
            time.sleep(1.0)
            proc.kill()
            _, err = proc.communicate()
            pytest.fail(f"the script did not end after Ctrl-C; its threads:\n{err[-6000:]}")
        assert all(gone(p) for p in pids), pids
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()


# -- found by the Executor hunt ---------------------------------------------------------


def test_map_ends_after_the_exception_at_its_position(kind: str) -> None:
    """After raising an item's exception, the stdlib's map is finished. It
    was raised again at every next(), its traceback a few frames longer each
    time: a loop skipping failed items never ended, and grew."""
    import traceback

    with make(kind, workers=2) as ex:
        it = ex.map(f.fail_at, range(6), itertools.repeat(3))
        got = [next(it) for _ in range(3)]
        with pytest.raises(ValueError) as first:
            next(it)
        frames = len(traceback.extract_tb(first.value.__traceback__))
        assert got == [0, 1, 2]
        with pytest.raises(StopIteration):
            next(it)
        assert list(it) == []
        assert len(traceback.extract_tb(first.value.__traceback__)) == frames


def test_map_ends_after_its_timeout(kind: str) -> None:
    with make(kind, workers=1) as ex:
        it = ex.map(f.sleep_return, [0.0, 5.0, 0.0], [1, 2, 3], timeout=0.5)
        assert next(it) == 1
        with pytest.raises(cf.TimeoutError):
            next(it)
        assert list(it) == []


def test_a_linked_failure_raised_again_keeps_its_traceback() -> None:
    """parstream.map raises its failure to every next() (threads sharing it
    all see it), but the traceback no longer grows with each raise."""
    import traceback

    it = parstream.map(functools.partial(f.fail_at, bad=1), [1, 2, 3])
    lengths = []
    for _ in range(5):
        with pytest.raises(ValueError) as info:
            next(it)
        lengths.append(len(traceback.extract_tb(info.value.__traceback__)))
    assert max(lengths[1:]) == min(lengths[1:]), lengths


def test_cancelling_many_queued_futures_cancels_them_all(tmp_path: Path) -> None:
    """Cancelling scanned the whole queue for each (quadratic: 14 s for
    20,000 here); oldest first now, each from the queue's front. What
    counts here: every queued one is cancelled, none runs. (The stdlib's
    lets the few in its call queue run.)"""
    with make("parstream", workers=1) as ex, Gate(tmp_path) as gate:
        blocker = gate.submit(ex, "busy")
        wait_file(gate.mark("busy"))
        queued = [ex.submit(f.touch, str(tmp_path / f"ran-{i}")) for i in range(3000)]
        assert all(q.cancel() for q in reversed(queued[1500:]))
        ex.shutdown(wait=False, cancel_futures=True)
        assert all(q.cancelled() for q in queued)
        gate.release()
        assert blocker.result(timeout=30)
    assert not list(tmp_path.glob("ran-*"))


def test_a_running_futures_repr_says_running(kind: str, tmp_path: Path) -> None:
    with make(kind, workers=1) as ex, Gate(tmp_path) as gate:
        ex.submit(f.getpid).result(timeout=30)
        fut = gate.submit(ex, "a")
        wait_file(gate.mark("a"))
        wait_until(lambda: "state=running" in repr(fut), within=10.0, what="running")
        gate.release()
        fut.result(timeout=30)


def test_a_blocking_callback_holds_up_only_its_own_executor(kind: str) -> None:
    """All Supervisors shared one callback thread: a callback that blocked on
    one stalled every other's callbacks and shutdown()."""
    a, b = make(kind, workers=1), make(kind, workers=1)
    release = threading.Event()
    try:
        a.submit(f.square, 1).add_done_callback(lambda _: release.wait(30))
        time.sleep(0.3)
        seen: list[int] = []
        got = b.submit(f.square, 2)
        got.add_done_callback(lambda fut: seen.append(fut.result()))
        assert got.result(timeout=30) == 4
        done = threading.Thread(target=b.shutdown)
        done.start()
        done.join(20)
        assert not done.is_alive(), "b.shutdown() waited for a's callback"
        assert seen == [4]
    finally:
        release.set()
        a.shutdown()
        b.shutdown()


def test_shutdown_in_a_callback_waits_for_its_own_callbacks(kind: str) -> None:
    """A shutdown(wait=True) run from another executor's done-callback
    returned before its own futures' callbacks had run."""
    outer = make(kind, workers=1)
    report: list[list[int]] = []
    finished = threading.Event()

    def on_done(_: Any) -> None:
        collected: list[int] = []
        with make(kind, workers=2) as inner:
            for i in range(5):
                inner.submit(f.sleep_return, 0.05, i).add_done_callback(
                    lambda g: collected.append(g.result())
                )
        report.append(sorted(collected))
        finished.set()

    try:
        outer.submit(f.square, 0).add_done_callback(on_done)
        assert finished.wait(60)
        assert report == [[0, 1, 2, 3, 4]]
    finally:
        outer.shutdown()


def stop_iteration_at(x: int, bad: int) -> int:
    if x == bad:
        raise StopIteration("from the task")
    return x


def test_map_ends_after_a_stop_iteration_at_its_position(kind: str) -> None:
    """A task's StopIteration reaches the caller as RuntimeError (as any
    generator makes it); the map then ends, as the stdlib's does (it raised
    the RuntimeError at every next() after)."""
    with make(kind, workers=2) as ex:
        it = ex.map(stop_iteration_at, range(4), itertools.repeat(1))
        assert next(it) == 0
        with pytest.raises(RuntimeError):
            next(it)
        assert list(it) == []


def test_a_slow_loop_past_the_deadline_gets_the_timeout(kind: str) -> None:
    """The grace for a stopped process was given to a loop that simply came
    back late to next(): an item finished after the deadline was delivered
    where the stdlib raises TimeoutError."""
    with make(kind, workers=2) as ex:
        ex.submit(f.square, 1).result(timeout=30)
        it = ex.map(f.sleep_return, [0.0, 1.5], [0, 1], timeout=1.0)
        assert next(it) == 0
        time.sleep(1.4)  # the loop's body, past the deadline
        with pytest.raises(cf.TimeoutError):
            next(it)


def test_a_call_never_overtakes_one_queued_before_it(tmp_path: Path) -> None:
    """A call submitted while a worker had just freed, before the hub gave
    it the call queued first, took that worker itself and ran first (in the
    two-threads cancel test under CI load: a later call ran, so it could not
    be cancelled). Calls start in the order they were submitted, as the
    standard library's do."""
    from parstream._backends.local import _pool

    log = tmp_path / "order"
    dispatch = _pool.LocalPool._dispatch_queued
    paused = threading.Event()

    def pausable_dispatch(self: Any) -> None:
        if not paused.is_set():
            dispatch(self)

    with parstream.Supervisor(max_workers=1) as ex:
        assert ex.submit(f.square, 2).result(timeout=30) == 4
        pool: Any = ex._backend
        _pool.LocalPool._dispatch_queued = pausable_dispatch  # type: ignore[method-assign]
        try:
            busy = ex.submit(time.sleep, 0.3)
            wait_until(lambda: any(w.state == "busy" for w in pool._workers), 10, "busy")
            paused.set()  # the hub hands out no queued call for now
            first = ex.submit(f.append_line, str(log), "first")
            busy.result(timeout=30)
            wait_until(lambda: any(w.state == "idle" for w in pool._workers), 10, "idle")
            second = ex.submit(f.append_line, str(log), "second")
            time.sleep(0.3)  # (the later call, if it took the free worker, has run)
        finally:
            paused.clear()
            _pool.LocalPool._dispatch_queued = dispatch  # type: ignore[method-assign]
            pool._wake()
        first.result(timeout=30)
        second.result(timeout=30)
    assert log.read_text().split() == ["first", "second"]
