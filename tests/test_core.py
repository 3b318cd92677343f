"""Tasks and the Supervisor, with real worker processes (issue 2)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import ctypes
import gc
import logging
import os
import pickle
import signal
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from _util import gone, wait_until

import parstream
from parstream import BRUTAL_KILL, Exit, Ok

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator


def wait_pid(task: parstream.Task[Any]) -> int:
    deadline = time.monotonic() + 10
    while task.pid is None:
        assert time.monotonic() < deadline, "task never started"
        time.sleep(0.005)
    return task.pid


def boom(x: int) -> int:
    raise ValueError(f"boom {x}")


def sleep_return(seconds: float, value: Any) -> Any:
    time.sleep(seconds)
    return value


def ignore_sigterm_then_sleep(seconds: float, ready: str) -> str:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    Path(ready).touch()
    time.sleep(seconds)
    return "finished"


def exit_hard(code: int) -> None:
    os._exit(code)


def segfault() -> None:
    ctypes.string_at(0)


def return_lock() -> Any:
    return threading.Lock()


class OddError(Exception):
    """An exception whose __init__ signature breaks default unpickling."""

    def __init__(self, a: int, b: int) -> None:
        super().__init__(f"{a}-{b}")


def raise_odd() -> None:
    raise OddError(1, 2)


def marked(path: str, value: Any, seconds: float) -> Any:
    """Record one execution (pid in the file name) then return ``value``."""
    Path(path, f"{value}-{os.getpid()}-{time.monotonic_ns()}").touch()
    time.sleep(seconds)
    return value


def fail_until(counter: str, failures: int) -> str:
    """Fail the first ``failures`` calls (counted in a file), then return 'done'."""
    p = Path(counter)
    n = int(p.read_text()) if p.exists() else 0
    p.write_text(str(n + 1))
    if n < failures:
        raise RuntimeError(f"attempt {n}")
    return "done"


def hold_memory(mb: int) -> int:
    global _HELD
    _HELD = bytearray(mb * 2**20)
    return os.getpid()


_HELD: Any = None


def pid_after(seconds: float) -> int:
    time.sleep(seconds)
    return os.getpid()


# -- tasks -------------------------------------------------------------------


def test_await_returns_value(sup: parstream.Supervisor) -> None:
    """await_ returns the task's value."""
    assert sup.async_(pow, 3, 4).await_() == 81


def test_task_exception_keeps_type_and_remote_traceback(sup: parstream.Supervisor) -> None:
    """A task's exception is re-raised with its own type and the worker traceback."""
    task = sup.async_(boom, 7)
    with pytest.raises(ValueError, match="boom 7") as info:
        task.await_()
    cause = info.value.__cause__
    assert isinstance(cause, parstream.RemoteTraceback)
    assert "boom" in str(cause)
    with pytest.raises(ValueError):  # a second await gives the same answer
        task.await_()


def test_await_many_one_deadline_but_one_by_one_works(sup: parstream.Supervisor) -> None:
    """Scenario 9: await_many has one deadline; await_ one by one restarts the clock."""
    tasks = [sup.async_(sleep_return, 0.4 * i, i) for i in range(1, 4)]
    with pytest.raises(parstream.TaskTimeout):
        parstream.await_many(tasks, timeout=0.6)
    tasks = [sup.async_(sleep_return, 0.3 * i, i) for i in range(1, 4)]
    assert [t.await_(3.0) for t in tasks] == [1, 2, 3]


def test_await_many_returns_in_input_order(sup: parstream.Supervisor) -> None:
    """await_many returns values in input order, whatever the finishing order."""
    tasks = [sup.async_(sleep_return, d, i) for i, d in enumerate([0.3, 0.0, 0.15])]
    assert parstream.await_many(tasks, timeout=10) == [0, 1, 2]


def test_await_timeout_kills_the_task(sup: parstream.Supervisor) -> None:
    """await_ past its timeout raises TaskTimeout and kills the worker."""
    task = sup.async_(time.sleep, 30)
    pid = wait_pid(task)
    with pytest.raises(parstream.TaskTimeout) as info:
        task.await_(0.2)
    assert isinstance(info.value, TimeoutError)
    assert gone(pid)
    assert sup.async_(os.getpid).await_() != pid


def test_yield_returns_none_then_ok(sup: parstream.Supervisor) -> None:
    """yield_ returns None while running, then Ok, and never kills."""
    task = sup.async_(sleep_return, 0.5, "v")
    assert task.yield_(0.01) is None
    assert task.yield_(5.0) == Ok("v")


def test_yield_never_raises(sup: parstream.Supervisor) -> None:
    """yield_ returns Exit for a failed task instead of raising."""
    result = sup.async_(boom, 1).yield_(5.0)
    assert isinstance(result, Exit)
    assert isinstance(result.reason, ValueError)


def test_yield_many_kill_task(sup: parstream.Supervisor) -> None:
    """Scenario 10: finished tasks give Ok, the rest None and are killed."""
    tasks = [sup.async_(sleep_return, d, i) for i, d in enumerate([0.05, 0.1, 20, 20])]
    pids = [wait_pid(t) for t in tasks[2:]]
    results = parstream.yield_many(tasks, timeout=1.5, on_timeout="kill_task")
    assert [r for _, r in results] == [Ok(0), Ok(1), None, None]
    assert [t for t, _ in results] == tasks
    assert all(gone(p) for p in pids)


def test_yield_many_limit_returns_early(sup: parstream.Supervisor) -> None:
    """With limit, yield_many returns once that many are done; the others live on."""
    fast = sup.async_(sleep_return, 0.0, "fast")
    slow = sup.async_(sleep_return, 20, "slow")
    results = parstream.yield_many([fast, slow], timeout=5, limit=1, on_timeout="kill_task")
    assert results[0][1] == Ok("fast")
    assert results[1][1] is None
    assert not slow.done()
    assert slow.shutdown(BRUTAL_KILL) is None


def test_shutdown_brutal_kill(sup: parstream.Supervisor) -> None:
    """shutdown(BRUTAL_KILL) returns None and the worker is gone."""
    task = sup.async_(time.sleep, 30)
    pid = wait_pid(task)
    assert task.shutdown(BRUTAL_KILL) is None
    assert gone(pid)


@pytest.mark.slow
def test_shutdown_escalates_to_sigkill(sup: parstream.Supervisor, tmp_path: Path) -> None:
    """Scenario 13: a task ignoring SIGTERM is SIGKILLed after the grace period."""
    ready = tmp_path / "ready"
    task = sup.async_(ignore_sigterm_then_sleep, 30, str(ready))
    pid = wait_pid(task)
    wait_until(ready.exists, what="the task to ignore SIGTERM")
    t0 = time.monotonic()
    assert task.shutdown(1.0) is None
    assert 0.8 <= time.monotonic() - t0 < 20  # the grace, then SIGKILL: not the 30 s
    assert gone(pid)


def test_shutdown_of_finished_task_returns_its_result(sup: parstream.Supervisor) -> None:
    """shutdown on a finished task returns its Ok."""
    task = sup.async_(pow, 2, 3)
    task.await_()
    assert task.shutdown() == Ok(8)


def test_completed() -> None:
    """completed(v) is a finished task."""
    task = parstream.completed(5)
    assert task.done()
    assert task.await_() == 5
    assert task.yield_(0) == Ok(5)


def test_dropped_linked_task_is_killed(sup: parstream.Supervisor) -> None:
    """A linked task whose handle is dropped has its worker killed."""
    task = sup.async_(time.sleep, 30)
    pid = wait_pid(task)
    del task
    gc.collect()
    assert gone(pid)


def test_dropped_nolink_task_runs_on(sup: parstream.Supervisor, tmp_path: Path) -> None:
    """A nolink task whose handle is dropped still runs to the end."""
    sup.async_nolink(marked, str(tmp_path), "kept", 0.2)
    gc.collect()
    deadline = time.monotonic() + 10
    while not list(tmp_path.iterdir()):
        assert time.monotonic() < deadline
        time.sleep(0.02)


def test_await_in_asyncio_and_cancel_kills(sup: parstream.Supervisor) -> None:
    """`await task` works, and cancelling the awaiting coroutine kills the task."""

    async def main() -> int:
        assert await sup.async_(pow, 2, 5) == 32
        task = sup.async_(time.sleep, 30)
        pid = wait_pid(task)
        waiter = asyncio.ensure_future(_await(task))
        await asyncio.sleep(0.1)
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        return pid

    pid = asyncio.run(main())
    assert gone(pid)


async def _await(task: parstream.Task[Any]) -> Any:
    return await task


def test_start_logs_failures(sup: parstream.Supervisor, caplog: pytest.LogCaptureFixture) -> None:
    """start() never raises; a failure is logged on the parstream logger."""
    with caplog.at_level(logging.ERROR, logger="parstream"):
        sup.start(boom, 3)
        deadline = time.monotonic() + 10
        while not any("boom 3" in r.getMessage() + str(r.exc_info) for r in caplog.records):
            assert time.monotonic() < deadline, caplog.records
            time.sleep(0.02)


@pytest.mark.parametrize(
    ("call", "exc", "needle"),
    [
        (lambda: parstream.async_(42), TypeError, "fn"),  # type: ignore[arg-type]
        (lambda: parstream.Supervisor(max_restarts=-1), ValueError, "max_restarts"),
        (lambda: parstream.Supervisor(max_seconds=0), ValueError, "max_seconds"),
        (lambda: parstream.Supervisor(max_seconds=-1), ValueError, "max_seconds must be > 0"),
        (lambda: parstream.Supervisor(max_workers=0), ValueError, "max_workers"),
        (lambda: parstream.Supervisor(max_children="2"), TypeError, "max_children"),  # type: ignore[arg-type]
        (lambda: parstream.yield_many([], on_timeout="x"), ValueError, "on_timeout"),  # type: ignore[arg-type]
        (lambda: parstream.await_many([1]), TypeError, "Task"),  # type: ignore[list-item]
        (lambda: parstream.completed(1).await_(-1), ValueError, "timeout"),
    ],
)
def test_bad_input_fails_at_call_time(call: Any, exc: type[Exception], needle: str) -> None:
    """Bad input raises TypeError/ValueError at once, naming the parameter."""
    with pytest.raises(exc, match=needle):
        call()


def test_numpy_numbers_are_taken_where_ints_and_seconds_are(sup: parstream.Supervisor) -> None:
    """numpy's integers and floats pass wherever an int or a number of seconds
    is asked for, as ``ProcessPoolExecutor`` and ``Future.result`` take them;
    numpy's bool is refused like Python's."""
    import numpy

    np: Any = numpy  # (its scalars are not in the annotations: ints and floats are)
    with parstream.Supervisor(max_workers=np.int64(2), max_restarts=np.int32(3)) as ex:
        assert ex.max_workers == 2
        assert type(ex.max_workers) is int
        assert list(ex.map(abs, [-1, -2, -3], chunksize=np.int64(2), timeout=np.float32(30))) == [
            1,
            2,
            3,
        ]
        assert ex.submit(abs, -4).result(timeout=np.int64(30)) == 4
        stream = ex.stream_map(
            abs,
            [-1, -2],
            max_concurrency=np.int64(3),
            chunksize=np.int32(1),
            timeout=np.float64(9),
        )
        assert list(stream) == [1, 2]
        tasks = [ex.async_(abs, -i) for i in range(3)]
        assert parstream.yield_many(tasks, np.float32(30), limit=np.int64(3))[0][1] == Ok(0)
    for bad in (np.bool_(True), True):
        with pytest.raises(TypeError, match="max_workers"):
            parstream.Supervisor(max_workers=bad)
        with pytest.raises(TypeError, match="timeout"):
            sup.async_(abs, 1).await_(bad)


def test_bad_start_child_arguments(sup: parstream.Supervisor) -> None:
    """start_child validates restart and shutdown."""
    with pytest.raises(ValueError, match="restart"):
        sup.start_child(abs, 1, restart="sometimes")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="shutdown"):
        sup.start_child(abs, 1, shutdown=-1)


def test_unpicklable_function_is_rejected_at_call_time(sup: parstream.Supervisor) -> None:
    """A function that cannot be pickled fails at call time, naming it."""
    lock = threading.Lock()

    def uses_lock() -> bool:
        return lock.locked()

    with pytest.raises(pickle.PicklingError, match="uses_lock"):
        sup.async_(uses_lock)


def test_unpicklable_argument_fails_that_task_alone(sup: parstream.Supervisor) -> None:
    """An unpicklable argument fails its task with a message naming it."""
    bad = sup.async_(id, threading.Lock())
    good = sup.async_(abs, -4)
    with pytest.raises(pickle.PicklingError, match="argument 0"):
        bad.await_(10)
    assert good.await_(10) == 4


def test_unpicklable_result_fails_that_task_alone(sup: parstream.Supervisor) -> None:
    """A result that cannot be pickled fails its task; the worker serves on."""
    with pytest.raises(pickle.PicklingError, match="lock"):
        sup.async_(return_lock).await_(10)
    assert sup.async_(abs, -5).await_(10) == 5


def test_exception_that_cannot_be_rebuilt(sup: parstream.Supervisor) -> None:
    """An exception that does not survive pickling becomes a stand-in keeping its message."""
    with pytest.raises(parstream.RemoteError, match="OddError: 1-2"):
        sup.async_(raise_odd).await_(10)
    assert sup.async_(abs, -6).await_(10) == 6


# -- the fault table -------------------------------------------------------------


FAULTS = ["raise", "exit", "segfault", "sigkill", "hang"]


@pytest.mark.parametrize("fault", FAULTS)
def test_fault_fails_only_its_task(fault: str, tmp_path: Path) -> None:
    """One faulty task fails alone; innocent tasks run exactly once; a new pid serves."""
    with parstream.Supervisor(max_workers=2) as sup:
        fns: dict[str, tuple[Callable[..., Any], tuple[Any, ...]]] = {
            "raise": (boom, (1,)),
            "exit": (exit_hard, (3,)),
            "segfault": (segfault, ()),
            "sigkill": (time.sleep, (30,)),
            "hang": (time.sleep, (30,)),
        }
        fn, args = fns[fault]
        faulty: parstream.Task[Any] = sup.async_(fn, *args)
        innocents = [sup.async_(marked, str(tmp_path), f"i{k}", 0.3) for k in range(3)]
        faulty_pid = wait_pid(faulty)
        if fault == "sigkill":
            os.kill(faulty_pid, signal.SIGKILL)
        expected: dict[str, tuple[type[BaseException], int | None]] = {
            "raise": (ValueError, None),
            "exit": (parstream.WorkerCrashed, 3),
            "segfault": (parstream.WorkerCrashed, -signal.SIGSEGV),
            "sigkill": (parstream.WorkerCrashed, -signal.SIGKILL),
            "hang": (parstream.TaskTimeout, None),
        }
        exc_type, code = expected[fault]
        with pytest.raises(exc_type) as info:
            faulty.await_(0.5 if fault == "hang" else 20)
        if code is not None:
            assert isinstance(info.value, parstream.WorkerCrashed)
            assert info.value.exitcode == code
            assert info.value.pid == faulty_pid
        assert [t.await_(20) for t in innocents] == ["i0", "i1", "i2"]
        runs = sorted(p.name.split("-")[0] for p in tmp_path.iterdir())
        assert runs == ["i0", "i1", "i2"], runs  # each innocent ran exactly once
        if fault != "raise":
            assert gone(faulty_pid)
            assert faulty_pid not in sup.worker_pids()
        new_pid = sup.async_(os.getpid).await_(20)
        assert new_pid != faulty_pid or fault == "raise"
        stats = sup.stats()
        assert stats.tasks_ok >= 4
        counter = {
            "raise": stats.tasks_failed,
            "exit": stats.tasks_crashed,
            "segfault": stats.tasks_crashed,
            "sigkill": stats.tasks_crashed,
            "hang": stats.tasks_timed_out,
        }[fault]
        assert counter == 1


def test_crash_loop_does_not_break_the_supervisor() -> None:
    """Ten temporary tasks that crash their workers never take the supervisor down."""
    with parstream.Supervisor(max_workers=2) as sup:
        tasks = [sup.async_(exit_hard, 1) for _ in range(10)]
        for t in tasks:
            with pytest.raises(parstream.WorkerCrashed):
                t.await_(30)
        assert sup.async_(abs, -1).await_(30) == 1
        assert sup.stats().tasks_crashed == 10


# -- children and restarts -------------------------------------------------------------


def test_transient_child_gives_up_after_max_restarts() -> None:
    """Scenario 11: 3 restarts, then the supervisor gives up and closes."""
    sup = parstream.Supervisor(max_restarts=3, max_seconds=5)
    try:
        child = sup.start_child(boom, 1, restart="transient")
        assert child.wait(30) is not None
        deadline = time.monotonic() + 10
        while not sup.closed:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert child.restarts == 3
        assert sup.stats().restarts == 3
        assert sup.children() == []
        with pytest.raises(parstream.SupervisorClosed, match="restarts"):
            sup.async_(abs, 1)
    finally:
        sup.close()


def test_transient_child_returning_normally_is_not_restarted(sup: parstream.Supervisor) -> None:
    """A transient child that returns is done: no restart."""
    child = sup.start_child(pow, 2, 2, restart="transient")
    assert child.wait(30) == Ok(4)
    assert child.restarts == 0
    assert not sup.closed


def test_transient_child_recovers(sup: parstream.Supervisor, tmp_path: Path) -> None:
    """A transient child failing twice then succeeding ends Ok after 2 restarts."""
    child = sup.start_child(fail_until, str(tmp_path / "n"), 2, restart="transient")
    assert child.wait(30) == Ok("done")
    assert child.restarts == 2
    assert sup.stats().restarts == 2


def test_permanent_child_that_returns_exhausts_the_supervisor() -> None:
    """Scenario 12: a permanent child that returns at once is restarted until give-up."""
    sup = parstream.Supervisor(max_restarts=2, max_seconds=5)
    try:
        sup.start_child(abs, 1, restart="permanent")
        deadline = time.monotonic() + 20
        while not sup.closed:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert sup.stats().restarts == 2
    finally:
        sup.close()


def test_temporary_child_is_never_restarted(sup: parstream.Supervisor) -> None:
    """Temporary children crashing do not count against the restart intensity."""
    children = [sup.start_child(exit_hard, 1) for _ in range(5)]
    for c in children:
        result = c.wait(30)
        assert isinstance(result, Exit)
        assert isinstance(result.reason, parstream.WorkerCrashed)
    assert not sup.closed
    assert sup.stats().restarts == 0


def test_terminate_child(sup: parstream.Supervisor) -> None:
    """terminate_child stops a permanent child for good."""
    child = sup.start_child(time.sleep, 30, restart="permanent", shutdown=BRUTAL_KILL)
    deadline = time.monotonic() + 10
    while child.pid is None:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    pid = child.pid
    assert sup.terminate_child(child) is True
    assert gone(pid)
    assert sup.terminate_child(child) is False
    assert sup.children() == []
    assert child.restarts == 0


def test_max_children(sup: parstream.Supervisor) -> None:
    """max_children caps running children."""
    with parstream.Supervisor(max_workers=1, max_children=1) as small:
        small.start_child(time.sleep, 30, shutdown=BRUTAL_KILL)
        with pytest.raises(ValueError, match="max_children"):
            small.start_child(time.sleep, 30)


def test_closed_supervisor_refuses_work() -> None:
    """After close(), calls raise SupervisorClosed, and the workers are gone."""
    sup = parstream.Supervisor(max_workers=2)
    pids = sup.worker_pids() or [sup.async_(os.getpid).await_()]
    sup.close()
    assert all(gone(p) for p in pids)
    with pytest.raises(parstream.SupervisorClosed):
        sup.async_(abs, 1)
    with pytest.raises(parstream.SupervisorClosed):
        sup.async_stream(abs, [1])


# -- elastic size and recycling -------------------------------------------------------


def test_stream_beyond_max_workers_grows_then_shrinks() -> None:
    """Extra workers start for a wide stream and retire once idle."""
    with parstream.Supervisor(max_workers=1, idle_timeout=0.5) as sup:
        pids = list(sup.stream_map(pid_after, [0.5] * 4, max_concurrency=4))
        assert len(set(pids)) == 4
        deadline = time.monotonic() + 10
        while len(sup.worker_pids()) > 1:
            assert time.monotonic() < deadline, sup.worker_pids()
            time.sleep(0.05)


def test_max_tasks_per_worker_recycles() -> None:
    """Workers are replaced after max_tasks_per_worker items."""
    with parstream.Supervisor(max_workers=1, max_tasks_per_worker=2) as sup:
        pids = [sup.async_(os.getpid).await_(20) for _ in range(6)]
        assert len(set(pids)) >= 3


def test_max_memory_per_worker_recycles() -> None:
    """A worker above max_memory_per_worker is replaced between tasks."""
    with parstream.Supervisor(max_workers=1, max_memory_per_worker=150 * 2**20) as sup:
        fat = sup.async_(hold_memory, 300).await_(20)
        deadline = time.monotonic() + 10
        while True:
            pid = sup.async_(os.getpid).await_(20)
            if pid != fat:
                break
            assert time.monotonic() < deadline
        assert gone(fat)


def test_restart_workers_replaces_every_worker(sup: parstream.Supervisor) -> None:
    """restart_workers() gives fresh worker processes."""
    before = {sup.async_(os.getpid).await_() for _ in range(4)}
    sup.restart_workers()
    for p in before:
        assert gone(p)
    after = sup.async_(os.getpid).await_()
    assert after not in before


# -- the Executor interface ---------------------------------------------------------------


def test_submit_returns_a_future(sup: parstream.Supervisor) -> None:
    """submit() gives a concurrent.futures.Future with result or exception."""
    fut = sup.submit(pow, 2, 8)
    assert isinstance(fut, concurrent.futures.Future)
    assert fut.result(10) == 256
    with pytest.raises(ValueError):
        sup.submit(boom, 2).result(10)
    assert sup.submit(sorted, [3, 1], reverse=True).result(10) == [3, 1]


def test_executor_map_and_run_in_executor(sup: parstream.Supervisor) -> None:
    """Executor.map keeps its contract, and run_in_executor works."""
    assert list(sup.map(pow, [2, 3], [3, 2])) == [8, 9]

    async def main() -> int:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(sup, abs, -9)

    assert asyncio.run(main()) == 9


def test_executor_shutdown_waits() -> None:
    """shutdown(wait=True) lets submitted work finish, then closes."""
    sup = parstream.Supervisor(max_workers=2)
    fut = sup.submit(sleep_return, 0.3, "x")
    sup.shutdown(wait=True)
    assert fut.result(0) == "x"
    assert sup.closed


def test_restart_workers_leaves_a_worker_still_starting() -> None:
    """A worker still starting has run no user code (no initializer): a restart
    leaves it, so restarts in a loop cannot start workers faster than they
    come up (a hostile test had 15-19 processes alive with max_workers=2)."""
    with parstream.Supervisor(max_workers=1) as sup:
        task = sup.async_(os.getpid)  # its worker is starting now (a boot takes ms)
        sup.restart_workers()
        pid = task.await_(30)
        assert sup.async_(os.getpid).await_(30) == pid
        assert sup.stats().workers_started == 1


def environment_variable(name: str) -> str | None:
    return os.environ.get(name)


def test_restart_workers_replaces_a_starting_worker_whose_environment_changed(
    tmp_path: Path,
) -> None:
    """A restart is how a new plugin directory or variable reaches the
    workers: a worker still starting, with the sys.path and environment of
    before, takes the new ones before any task (it kept the old ones and
    served with them; found by the nesting hunt)."""
    import sys

    (tmp_path / "plugin_mod.py").write_text("def value(x):\n    return x * 10\n")
    try:
        with parstream.Supervisor(max_workers=2) as sup:
            # Its workers are starting now (a boot takes tens of ms).
            os.environ["PARSTREAM_TEST_RESTART"] = "new"
            sys.path.insert(0, str(tmp_path))
            import plugin_mod  # type: ignore[import-not-found]

            sup.restart_workers()
            seen = set(sup.map(environment_variable, ["PARSTREAM_TEST_RESTART"] * 20))
            assert seen == {"new"}
            assert list(sup.map(plugin_mod.value, range(4))) == [0, 10, 20, 30]
    finally:
        os.environ.pop("PARSTREAM_TEST_RESTART", None)
        sys.path.remove(str(tmp_path))
        sys.modules.pop("plugin_mod", None)


def test_restart_workers_sees_a_change_made_while_a_worker_was_forked(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The environment a worker started with is read once, before the fork:
    read after it, a change another thread made meanwhile was taken for the
    worker's own, and a restart kept the worker with the old one (found by
    the review)."""
    from parstream._backends.local import _spawn

    fork_exec = _spawn.fork_exec

    def change_meanwhile(*args: Any, **kwargs: Any) -> int:
        pid = fork_exec(*args, **kwargs)
        os.environ["PARSTREAM_TEST_FORKED"] = "new"  # another thread, just after
        return pid

    monkeypatch.setattr(_spawn, "fork_exec", change_meanwhile)
    try:
        with parstream.Supervisor(max_workers=1) as sup:
            sup.restart_workers()
            seen = set(sup.map(environment_variable, ["PARSTREAM_TEST_FORKED"] * 5))
            assert seen == {"new"}
    finally:
        os.environ.pop("PARSTREAM_TEST_FORKED", None)


def test_the_environment_is_read_whole_while_another_thread_deletes_a_variable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``dict(os.environ)`` lists the names, then reads each: one deleted in
    between was a KeyError, which on the hub thread (a spare's promotion)
    ended the pool (found by the review)."""
    from collections.abc import Mapping

    from parstream._backends.local import _spawn

    class Vanishing(Mapping[str, str]):
        """An environment whose GONE is deleted by another thread just after
        the names were listed, the first time."""

        def __init__(self) -> None:
            self.data = {"KEPT": "1", "GONE": "2"}
            self.listed = False

        def __iter__(self) -> Iterator[str]:
            names = list(self.data)
            if not self.listed:
                self.listed = True
                del self.data["GONE"]
            return iter(names)

        def __len__(self) -> int:
            return len(self.data)

        def __getitem__(self, name: str) -> str:
            return self.data[name]

    monkeypatch.setattr(os, "environ", Vanishing())
    environ = _spawn.start_context()[2]
    monkeypatch.undo()
    assert environ == {"KEPT": "1"}


def test_restart_workers_picks_up_an_edited_module(tmp_path: Path) -> None:
    """Workers keep a module they imported; restart_workers() makes them load the edit."""
    import importlib
    import sys

    module = tmp_path / "edited_mod.py"
    module.write_text("def version():\n    return 'v1'\n")
    sys.path.insert(0, str(tmp_path))
    try:
        with parstream.Supervisor(max_workers=1) as sup:
            mod = importlib.import_module("edited_mod")
            assert sup.async_(mod.version).await_(20) == "v1"
            module.write_text("def version():\n    return 'v2'\n")
            os.utime(module, (time.time() + 5, time.time() + 5))  # a newer mtime, surely
            mod = importlib.reload(mod)
            assert mod.version() == "v2"
            # The documented rule: a worker that imported the module keeps it...
            assert sup.async_(mod.version).await_(20) == "v1"
            # ...until restart_workers().
            sup.restart_workers()
            assert sup.async_(mod.version).await_(20) == "v2"
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("edited_mod", None)
