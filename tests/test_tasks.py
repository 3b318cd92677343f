"""Task primitives against real workers: await, yield, shutdown, asyncio, bad input (issue 2)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import gc
import importlib
import logging
import math
import os
import pickle
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psutil
import pytest
from _util import gone, wait_until

import parstream
from parstream import BRUTAL_KILL, Exit, Ok

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

# -- functions run as tasks (module level: pickled by reference) -----------------


def sleep_return(seconds: float, value: Any) -> Any:
    time.sleep(seconds)
    return value


def raise_in_worker_deliberately(x: int) -> None:
    raise ValueError(f"deliberate {x}")


def exit_hard(code: int) -> None:
    os._exit(code)


def ignore_sigterm(ready: str, seconds: float) -> str:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    Path(ready).touch()
    time.sleep(seconds)
    return "finished"


class _Terminated(Exception):
    pass


def _raise_terminated(signum: int, frame: Any) -> None:
    raise _Terminated


def clean_up_on_sigterm(ready: str) -> str:
    """Turn SIGTERM into a normal return: the reply races the kill and wins."""
    signal.signal(signal.SIGTERM, _raise_terminated)
    Path(ready).touch()
    try:
        time.sleep(30)
    except _Terminated:
        return "cleaned up"
    return "slept"


def spawn_grandchild_then_sleep(pid_file: str) -> None:
    child = subprocess.Popen(["sleep", "30"])
    tmp = pid_file + ".tmp"
    Path(tmp).write_text(str(child.pid))
    os.replace(tmp, pid_file)
    time.sleep(30)


def pid_after(seconds: float) -> int:
    time.sleep(seconds)
    return os.getpid()


def touch_after(path: str, seconds: float) -> None:
    time.sleep(seconds)
    Path(path).touch()


def add_sys_path(path: str) -> None:
    sys.path.insert(0, path)
    importlib.invalidate_caches()


def return_lock() -> Any:
    return threading.Lock()


def identity(x: Any) -> Any:
    return x


class TwoArgError(Exception):
    """Default exception pickling calls cls(*args): one arg for a two-arg __init__."""

    def __init__(self, a: int, b: int) -> None:
        super().__init__(f"{a}/{b}")


def raise_two_arg_error() -> None:
    raise TwoArgError(1, 2)


def raise_with_lock_payload() -> None:
    raise ValueError(threading.Lock())


_PARENT_PID = os.getpid()


def _rebuild_only_in_parent(parent_pid: int) -> NotInWorker:
    if os.getpid() != parent_pid:
        raise RuntimeError("NotInWorker cannot be rebuilt in a worker")
    return NotInWorker()


def _rebuild_only_in_worker(parent_pid: int) -> NotInParent:
    if os.getpid() == parent_pid:
        raise RuntimeError("NotInParent cannot be rebuilt in the parent")
    return NotInParent(parent_pid)


class NotInWorker:
    """Pickles fine in the parent, blows up when unpickled in a worker."""

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild_only_in_parent, (_PARENT_PID,))


class NotInParent:
    """Made in a worker, pickles fine there, blows up when unpickled in the parent."""

    def __init__(self, parent_pid: int) -> None:
        self.parent_pid = parent_pid

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild_only_in_worker, (self.parent_pid,))


def make_not_in_parent(parent_pid: int) -> NotInParent:
    return NotInParent(parent_pid)


# -- helpers ---------------------------------------------------------------------


def running_pid(task: parstream.Task[Any]) -> int:
    wait_until(lambda: task.pid is not None, what="the task to start")
    pid = task.pid
    assert pid is not None
    return pid


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


# -- await -------------------------------------------------------------------------


def test_await_returns_value(sup: parstream.Supervisor) -> None:
    """await_ returns the task's value, and a second await_ returns it again."""
    task = sup.async_(pow, 3, 4)
    assert task.await_() == 81
    assert task.await_(0) == 81
    assert parstream.await_(task) == 81
    assert task.done()


def test_exception_keeps_type_and_remote_traceback(sup: parstream.Supervisor) -> None:
    """A task's exception comes back with its own type; __cause__ is the worker traceback."""
    task = sup.async_(raise_in_worker_deliberately, 7)
    with pytest.raises(ValueError, match="deliberate 7") as info:
        task.await_(20)
    assert type(info.value) is ValueError
    cause = info.value.__cause__
    assert isinstance(cause, parstream.RemoteTraceback)
    assert "raise_in_worker_deliberately" in str(cause)
    assert "ValueError: deliberate 7" in str(cause)
    with pytest.raises(ValueError, match="deliberate 7"):
        task.await_(0)


def test_await_many_returns_input_order(sup: parstream.Supervisor) -> None:
    """await_many gives values in input order whatever order the tasks finish in."""
    tasks = [sup.async_(sleep_return, d, i) for i, d in enumerate([0.4, 0.0, 0.2, 0.0])]
    assert parstream.await_many(tasks, timeout=20) == [0, 1, 2, 3]
    assert parstream.await_many([]) == []


@pytest.mark.slow
def test_await_many_has_one_deadline_but_await_one_by_one_works(
    sup: parstream.Supervisor,
) -> None:
    """Scenario 9: await_many(ts, 1.0) times out; awaiting one by one restarts the clock."""
    # Warm both workers (they import this module on first use) so the clock
    # measures the tasks, not a worker start on a busy machine.
    parstream.await_many([sup.async_(sleep_return, 0.3, 0) for _ in range(2)], 30)
    tasks = [sup.async_(sleep_return, 0.4 * i, i) for i in range(1, 6)]
    t0 = time.monotonic()
    with pytest.raises(parstream.TaskTimeout) as info:
        parstream.await_many(tasks, 1.0)
    elapsed = time.monotonic() - t0
    assert isinstance(info.value, TimeoutError)
    assert 0.9 <= elapsed < 8.0, elapsed
    # The unfinished ones were killed, not left running.
    assert all(t.done() for t in tasks)
    assert tasks[0].yield_(0) == Ok(1)
    last = tasks[-1].yield_(0)
    assert isinstance(last, Exit)
    assert isinstance(last.reason, parstream.TaskTimeout)

    tasks = [sup.async_(sleep_return, 0.4 * i, i) for i in range(1, 6)]
    assert [parstream.await_(t, 3.0) for t in tasks] == [1, 2, 3, 4, 5]


def test_await_many_raises_first_failure_at_once_and_kills_the_rest(
    sup: parstream.Supervisor,
) -> None:
    """A failing task makes await_many raise promptly, and the still-running task is killed."""
    slow = sup.async_(time.sleep, 30)
    slow_pid = running_pid(slow)
    bad = sup.async_(raise_in_worker_deliberately, 3)
    t0 = time.monotonic()
    with pytest.raises(ValueError, match="deliberate 3"):
        parstream.await_many([slow, bad])
    assert time.monotonic() - t0 < 10
    assert gone(slow_pid, 3.0)
    assert isinstance(slow.yield_(0), Exit)
    # Awaiting the same tasks again (another thread's await_many, say) raises
    # the task's own failure, not the kill of the task before it in the list.
    with pytest.raises(ValueError, match="deliberate 3"):
        parstream.await_many([slow, bad])


def mark_then_sleep(folder: str, name: str) -> None:
    Path(folder, f"start-{name}").touch()
    time.sleep(30)


@pytest.mark.parametrize("how", ["await_many", "yield_many"])
def test_tasks_still_queued_when_the_wait_ends_never_start(
    sup: parstream.Supervisor, tmp_path: Path, how: str
) -> None:
    """await_many's timeout and yield_many's kill_task kill the queued tasks
    before the running ones: a running one's kill freed its worker, which
    started a queued task before that one's kill came."""
    assert sup.async_(abs, -1).await_(30) == 1  # warm: the spare worker is booting
    tasks = [sup.async_(mark_then_sleep, str(tmp_path), str(i)) for i in range(6)]
    wait_until(lambda: len(list(tmp_path.iterdir())) >= 2, 30, "two tasks running")
    time.sleep(0.5)  # the spare has booted: a freed worker is replaced at once
    if how == "await_many":
        with pytest.raises(parstream.TaskTimeout):
            parstream.await_many(tasks, timeout=0.05)
    else:
        parstream.yield_many(tasks, timeout=0.05, on_timeout="kill_task")
    assert all(isinstance(t.yield_(0), Exit) for t in tasks)
    time.sleep(1.0)  # time for a queued task to have started, were one to
    assert sorted(p.name for p in tmp_path.iterdir()) == ["start-0", "start-1"]


# -- yield ---------------------------------------------------------------------------


def test_yield_returns_none_then_ok(sup: parstream.Supervisor) -> None:
    """yield_ returns None while the task runs, leaves it running, then returns Ok."""
    task = sup.async_(sleep_return, 0.5, "v")
    assert task.yield_(0.01) is None
    assert not task.done()
    assert parstream.yield_(task, 20) == Ok("v")
    assert task.yield_(0) == Ok("v")


def test_yield_never_raises(sup: parstream.Supervisor) -> None:
    """yield_ hands back failures and crashes as Exit instead of raising them."""
    failed = sup.async_(raise_in_worker_deliberately, 1).yield_(20)
    assert isinstance(failed, Exit)
    assert isinstance(failed.reason, ValueError)
    assert isinstance(failed.reason.__cause__, parstream.RemoteTraceback)
    crashed = sup.async_(exit_hard, 4).yield_(20)
    assert isinstance(crashed, Exit)
    assert isinstance(crashed.reason, parstream.WorkerCrashed)
    assert crashed.reason.exitcode == 4


@pytest.mark.slow
def test_yield_many_kill_task_and_limit() -> None:
    """Scenario 10: one deadline, Ok prefix then None-and-killed; limit returns early."""
    with parstream.Supervisor(max_workers=10) as sup:
        # Warm up until ten concurrent tasks land on ten distinct, ready workers.
        deadline = time.monotonic() + 30
        while True:
            pids = parstream.await_many([sup.async_(pid_after, 0.3) for _ in range(10)], 20)
            if len(set(pids)) == 10:
                break
            assert time.monotonic() < deadline, pids

        tasks = [sup.async_(sleep_return, 0.2 * i, i) for i in range(1, 11)]
        pids = [running_pid(t) for t in tasks]
        t0 = time.monotonic()
        results = parstream.yield_many(tasks, 1.1, on_timeout="kill_task")
        elapsed = time.monotonic() - t0
        assert 1.0 <= elapsed < 8.0, elapsed
        assert [t for t, _ in results] == tasks  # input order
        statuses = [r for _, r in results]
        n_ok = sum(isinstance(r, Ok) for r in statuses)
        assert statuses[:n_ok] == [Ok(i) for i in range(1, n_ok + 1)], statuses
        assert all(r is None for r in statuses[n_ok:]), statuses
        assert 3 <= n_ok <= 6, statuses  # 1..3 surely done, 7..10 surely not
        for t, pid in zip(tasks[n_ok:], pids[n_ok:], strict=True):
            assert t.done()
            assert gone(pid, 3.0), pid

        tasks = [sup.async_(sleep_return, 0.15 * i, i) for i in range(1, 7)]
        results = parstream.yield_many(tasks, 20, on_timeout="kill_task", limit=3)
        statuses = [r for _, r in results]
        assert sum(r is not None for r in statuses) >= 3
        assert statuses[:3] == [Ok(1), Ok(2), Ok(3)], statuses
        rest = [t for t, r in results if r is None]
        assert rest, "limit=3 should return before the slow tasks finish"
        # Not killed: they finish normally.
        assert [t.await_(20) for t in rest] == [i for i in range(1, 7) if statuses[i - 1] is None]


# -- shutdown --------------------------------------------------------------------------


def test_shutdown_brutal_kill_returns_none_and_kills_the_worker(
    sup: parstream.Supervisor,
) -> None:
    """shutdown(BRUTAL_KILL) returns None, the worker dies, and await_ says TaskShutdown."""
    task = sup.async_(time.sleep, 30)
    pid = running_pid(task)
    assert parstream.shutdown(task, BRUTAL_KILL) is None
    assert gone(pid, 3.0)
    assert task.done()
    with pytest.raises(parstream.TaskShutdown):
        task.await_(0)
    assert sup.async_(abs, -2).await_(20) == 2


def test_a_second_shutdown_says_what_the_first_said(sup: parstream.Supervisor) -> None:
    """Shutting a task down twice, or from two threads, returns None every time:
    not None first and Exit(TaskShutdown) after."""
    task = sup.async_(time.sleep, 30)
    running_pid(task)
    assert task.shutdown(BRUTAL_KILL) is None
    assert task.shutdown() is None
    assert parstream.shutdown(task, BRUTAL_KILL) is None
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        other = sup.async_(time.sleep, 30)
        running_pid(other)
        both = list(pool.map(lambda _: other.shutdown(1.0), range(2)))
    assert both == [None, None]


@pytest.mark.slow
def test_shutdown_escalates_to_sigkill_after_the_grace(
    sup: parstream.Supervisor, tmp_path: Path
) -> None:
    """Scenario 13: a task ignoring SIGTERM is SIGKILLed after ~2 s; shutdown returns None."""
    ready = tmp_path / "ready"
    task = sup.async_(ignore_sigterm, str(ready), 30)
    pid = running_pid(task)
    wait_until(ready.exists, what="the task to ignore SIGTERM")
    t0 = time.monotonic()
    assert task.shutdown(2.0) is None
    elapsed = time.monotonic() - t0
    assert 1.5 <= elapsed < 10.0, elapsed
    assert gone(pid, 3.0)
    assert sup.async_(abs, -3).await_(20) == 3


def test_shutdown_of_a_finished_task_returns_its_result(sup: parstream.Supervisor) -> None:
    """shutdown on a finished task returns its Ok, or its Exit if it failed."""
    ok = sup.async_(pow, 2, 5)
    assert ok.await_(20) == 32
    assert ok.shutdown(2.0) == Ok(32)
    assert ok.shutdown(BRUTAL_KILL) == Ok(32)
    failed = sup.async_(raise_in_worker_deliberately, 2)
    assert isinstance(failed.yield_(20), Exit)
    result = failed.shutdown()
    assert isinstance(result, Exit)
    assert isinstance(result.reason, ValueError)


def test_graceful_shutdown_reply_wins_and_frees_the_worker(tmp_path: Path) -> None:
    """A task returning on SIGTERM gives Ok; its worker is not held for the rest of the grace."""
    with parstream.Supervisor(max_workers=1) as sup:
        ready = tmp_path / "ready"
        task = sup.async_(clean_up_on_sigterm, str(ready))
        running_pid(task)
        wait_until(ready.exists, what="the SIGTERM handler")
        assert task.shutdown(10.0) == Ok("cleaned up")
        # The next task must not wait out the 10 s grace of a task that already ended.
        assert sup.async_(abs, -4).await_(8.0) == 4


@pytest.mark.parametrize("how", ["brutal_kill", "grace", "await_timeout"])
def test_killing_a_task_kills_the_processes_it_started(
    how: str, sup: parstream.Supervisor, tmp_path: Path
) -> None:
    """Every way of killing a task takes down the subprocesses it started, too."""
    pid_file = tmp_path / "grandchild"
    task = sup.async_(spawn_grandchild_then_sleep, str(pid_file))
    worker = running_pid(task)
    wait_until(pid_file.exists, what="the grandchild")
    grandchild = int(pid_file.read_text())
    try:
        if how == "brutal_kill":
            assert task.shutdown(BRUTAL_KILL) is None
        elif how == "grace":
            assert task.shutdown(2.0) is None
        else:
            with pytest.raises(parstream.TaskTimeout):
                task.await_(0.2)
        assert gone(worker, 5.0)
        assert gone(grandchild, 5.0), f"grandchild {grandchild} outlived its killed task"
    finally:
        if alive(grandchild):
            os.kill(grandchild, signal.SIGKILL)


# -- completed, linked tasks, asyncio -----------------------------------------------------


def test_completed() -> None:
    """completed(v) can be awaited, yielded, shut down and awaited in asyncio."""
    task = parstream.completed({"a": 1})
    assert task.done()
    assert task.pid is None
    assert task.await_() == {"a": 1}
    assert task.yield_(0) == Ok({"a": 1})
    assert task.shutdown() == Ok({"a": 1})
    assert parstream.await_many([task, parstream.completed(2)], 0) == [{"a": 1}, 2]

    async def main() -> Any:
        return await parstream.completed("x")

    assert asyncio.run(main()) == "x"


def test_a_task_is_not_made_directly() -> None:
    """`parstream.Task()` would be a handle no call ever finishes."""
    with pytest.raises(TypeError, match="completed"):
        parstream.Task()
    assert parstream.completed(3).await_(0) == 3


def test_dropped_linked_task_kills_its_worker(sup: parstream.Supervisor) -> None:
    """A linked task whose handle is garbage collected unfinished gets its worker killed."""
    task = sup.async_(time.sleep, 30)
    pid = running_pid(task)
    del task
    gc.collect()
    assert gone(pid, 3.0)
    assert sup.async_(abs, -5).await_(20) == 5


def test_dropped_nolink_task_runs_on(sup: parstream.Supervisor, tmp_path: Path) -> None:
    """An async_nolink task whose handle is dropped still runs to completion."""
    marker = tmp_path / "done"
    task = sup.async_nolink(touch_after, str(marker), 0.3)
    running_pid(task)
    del task
    gc.collect()
    wait_until(marker.exists, what="the dropped nolink task to finish")


def wait_for_file(path: str) -> str:
    while not os.path.exists(path):
        time.sleep(0.01)
    return "finished"


def test_a_nolink_task_outlives_the_waits_its_caller_gives_up(
    sup: parstream.Supervisor, tmp_path: Path
) -> None:
    """Elixir: a timeout in `await` kills a linked task only; an async_nolink
    task is its Supervisor's. An await_ that times out, an await_many that
    times out and an awaiting coroutine that is cancelled leave it running,
    and a later await_ gets its result."""
    go = tmp_path / "go"
    task = sup.async_nolink(wait_for_file, str(go))
    pid = running_pid(task)
    with pytest.raises(parstream.TaskTimeout, match="still running"):
        task.await_(0.2)
    with pytest.raises(parstream.TaskTimeout):
        parstream.await_many([task], 0.2)

    async def give_up() -> None:
        await asyncio.wait_for(_await_task(task), 0.2)

    with pytest.raises(TimeoutError):
        asyncio.run(give_up())
    assert not task.done()
    assert task.pid == pid
    assert alive(pid)

    async def poll() -> None:  # a polling loop's wait_for: none of its wake-ups stay
        for _ in range(20):
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(_await_task(task), 0.01)

    asyncio.run(poll())
    assert task._waiters == []
    go.touch()
    assert task.await_(30) == "finished"

    # The linked control: the same timeout kills it.
    linked = sup.async_(wait_for_file, str(tmp_path / "never"))
    pid = running_pid(linked)
    with pytest.raises(parstream.TaskTimeout, match="killed"):
        linked.await_(0.2)
    assert gone(pid, 3.0)


async def _await_task(task: parstream.Task[Any]) -> Any:
    return await task


def test_await_in_asyncio(sup: parstream.Supervisor) -> None:
    """`await task` works in asyncio, alone and through gather, failures included."""

    async def main() -> list[Any]:
        one = await sup.async_(pow, 2, 3)
        many = await asyncio.gather(*(sup.async_(sleep_return, 0.1, i) for i in range(3)))
        with pytest.raises(ValueError, match="deliberate 9"):
            await sup.async_(raise_in_worker_deliberately, 9)
        return [one, *many]

    assert asyncio.run(main()) == [8, 0, 1, 2]


def test_an_awaiting_event_loop_closed_early_leaves_other_waiters_be(
    sup: parstream.Supervisor,
) -> None:
    """A coroutine awaits a task, then its event loop is closed while the task
    still runs (nobody cancelled the coroutine): when the task ends, another
    thread's ``await_many`` and the done-callbacks still get it. (Waking the
    closed loop raised "Event loop is closed" inside the task's completion,
    so the other waiter hung and no callback ran.)"""
    task = sup.async_(sleep_return, 0.5, "v")
    loop = asyncio.new_event_loop()
    reached = threading.Event()

    async def waiter() -> Any:
        reached.set()
        return await task

    pending = loop.create_task(waiter())
    while not reached.is_set():
        loop.run_until_complete(asyncio.sleep(0))
    loop.run_until_complete(asyncio.sleep(0))  # the coroutine now waits in ``await task``
    loop.close()
    called: list[Any] = []
    task.add_done_callback(lambda t: called.append(t.await_(0)))
    got: list[Any] = []
    other = threading.Thread(target=lambda: got.append(parstream.await_many([task], 30)))
    other.start()
    other.join(60)
    assert not other.is_alive()
    assert got == [["v"]]
    wait_until(lambda: called == ["v"], what="the done-callback")
    del pending


def test_cancelling_the_awaiting_coroutine_kills_the_worker(sup: parstream.Supervisor) -> None:
    """Cancelling a coroutine blocked in `await task` kills the task's worker."""

    async def main() -> int:
        task = sup.async_(time.sleep, 30)
        waiter = asyncio.ensure_future(_await_task(task))
        while task.pid is None:
            await asyncio.sleep(0.01)
        pid = task.pid
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        assert task.done()
        return pid

    pid = asyncio.run(main())
    assert gone(pid, 3.0)


def test_asyncio_wait_for_timeout_kills_the_worker(sup: parstream.Supervisor) -> None:
    """asyncio.wait_for(task, 0.3) raises TimeoutError and the task's worker dies."""
    pids: list[int] = []

    async def main() -> None:
        task = sup.async_(time.sleep, 30)
        while task.pid is None:
            await asyncio.sleep(0.01)
        pids.append(task.pid)
        await asyncio.wait_for(_await_task(task), 0.3)

    with pytest.raises(TimeoutError):
        asyncio.run(main())
    assert gone(pids[0], 3.0)
    assert sup.async_(abs, -6).await_(20) == 6


# -- start ------------------------------------------------------------------------------


class _Seen(logging.Handler):
    """Sets an event on an ERROR record from the parstream logger."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.event = threading.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if record.name == "parstream":
            self.event.set()


@contextlib.contextmanager
def _error_seen() -> Iterator[threading.Event]:
    # On the root logger and added after caplog's handler, so caplog has the
    # record by the time the event is set.
    handler = _Seen()
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        yield handler.event
    finally:
        root.removeHandler(handler)


def test_start_logs_failures_and_never_raises(caplog: pytest.LogCaptureFixture) -> None:
    """start() of a raising fn returns None at once and logs the failure on 'parstream'."""
    with caplog.at_level(logging.ERROR, logger="parstream"), _error_seen() as seen:
        parstream.start(raise_in_worker_deliberately, 5)
        assert seen.wait(20)
    records = [r for r in caplog.records if r.name == "parstream"]
    assert records
    text = " ".join(r.getMessage() for r in records) + " ".join(
        repr(r.exc_info[1]) for r in records if r.exc_info
    )
    assert "deliberate 5" in text


def test_start_of_a_crashing_fn_logs_worker_crash(
    sup: parstream.Supervisor, caplog: pytest.LogCaptureFixture
) -> None:
    """start() of a fn that kills its worker logs a WorkerCrashed; the pool goes on."""
    with caplog.at_level(logging.ERROR, logger="parstream"), _error_seen() as seen:
        sup.start(exit_hard, 9)
        assert seen.wait(20)
    assert any(
        r.exc_info and isinstance(r.exc_info[1], parstream.WorkerCrashed)
        for r in caplog.records
        if r.name == "parstream"
    )
    assert sup.async_(abs, -7).await_(20) == 7


# -- bad input -------------------------------------------------------------------------------


def _supervisor(**options: Any) -> None:
    parstream.Supervisor(**options).close()


BAD_CALLS: list[tuple[str, Callable[[], object], type[Exception], str]] = [
    ("async_ not callable", lambda: parstream.async_(42), TypeError, "fn"),  # type: ignore[arg-type]
    ("max_restarts<0", lambda: _supervisor(max_restarts=-1), ValueError, "max_restarts"),
    ("max_seconds=0", lambda: _supervisor(max_seconds=0), ValueError, "max_seconds"),
    ("max_workers=0", lambda: _supervisor(max_workers=0), ValueError, "max_workers"),
    ("max_children=0", lambda: _supervisor(max_children=0), ValueError, "max_children"),
    ("max_restarts float", lambda: _supervisor(max_restarts=1.5), TypeError, "max_restarts"),
    ("idle_timeout<0", lambda: _supervisor(idle_timeout=-1), ValueError, "idle_timeout"),
    (
        "on_timeout",
        lambda: parstream.yield_many([], on_timeout="x"),  # type: ignore[arg-type]
        ValueError,
        "on_timeout",
    ),
    ("limit=0", lambda: parstream.yield_many([], limit=0), ValueError, "limit"),
    ("await_many non-task", lambda: parstream.await_many([1]), TypeError, "Task"),  # type: ignore[list-item]
    ("await_ non-task", lambda: parstream.await_(1), TypeError, "Task"),  # type: ignore[arg-type]
    ("max_seconds nan", lambda: _supervisor(max_seconds=math.nan), ValueError, "max_seconds"),
    (
        "default_supervisor start=1",
        lambda: parstream.default_supervisor(start=1),  # type: ignore[call-overload]
        TypeError,
        "start",
    ),
    ("compare backend=1", lambda: parstream.compare(abs, [1], backend=1), TypeError, "backend"),  # type: ignore[arg-type]
    ("await_ None", lambda: parstream.await_(None), TypeError, "task must be a Task"),  # type: ignore[arg-type]
    ("shutdown None", lambda: parstream.shutdown(None), TypeError, "task must be a Task"),  # type: ignore[arg-type]
    # A function whose calls make a coroutine or a generator: nothing a worker
    # could send back (a coroutine never awaited), whatever the items.
    (
        "async_ coroutine fn",
        lambda: parstream.async_(coroutine_fn, 1),
        TypeError,
        "fn .*coroutine",
    ),
    ("map coroutine fn", lambda: parstream.map(coroutine_fn, [1]), TypeError, "fn .*coroutine"),
    (
        "stream of a generator fn",
        lambda: parstream.async_stream(generator_fn, [1]),
        TypeError,
        "fn .*generator",
    ),
    (
        "submit a bound async method",
        lambda: parstream.default_supervisor().submit(HasAsync().method, 1),
        TypeError,
        "fn .*coroutine",
    ),
    (
        "start a partial of a coroutine fn",
        lambda: parstream.start(functools.partial(coroutine_fn, 1)),
        TypeError,
        "fn .*coroutine",
    ),
]


async def coroutine_fn(x: int) -> int:
    return x


def generator_fn(x: int) -> Iterator[int]:
    yield x


class HasAsync:
    async def method(self, x: int) -> int:
        return x


@pytest.mark.parametrize(
    ("call", "exc", "needle"),
    [pytest.param(c, e, n, id=i) for i, c, e, n in BAD_CALLS],
)
def test_bad_input_fails_at_call_time(
    call: Callable[[], object], exc: type[Exception], needle: str
) -> None:
    """Bad arguments raise TypeError/ValueError at the call, naming the argument."""
    with pytest.raises(exc, match=needle):
        call()


@pytest.mark.parametrize("method", ["await_", "yield_", "shutdown"])
def test_nan_timeout_is_rejected_and_leaves_the_task_alone(
    method: str, sup: parstream.Supervisor
) -> None:
    """A NaN timeout is a ValueError at the call; it neither kills nor times out the task."""
    task = sup.async_(sleep_return, 0.3, "v")
    with pytest.raises(ValueError, match="timeout"):
        getattr(task, method)(math.nan)
    assert task.await_(20) == "v"


@pytest.mark.parametrize("method", ["await_", "yield_"])
def test_infinite_timeout_means_no_limit_or_is_rejected_cleanly(
    method: str, sup: parstream.Supervisor
) -> None:
    """math.inf as a timeout either waits without limit or is refused without harming the task."""
    task = sup.async_(sleep_return, 0.3, "v")
    try:
        result = getattr(task, method)(math.inf)
    except (ValueError, TypeError):
        assert task.await_(20) == "v"  # refused up front; the task ran on
    else:
        assert result in ("v", Ok("v"))


HUGE_WAITS: list[tuple[str, Callable[[parstream.Supervisor], object], object]] = [
    ("await_", lambda s: s.async_(sleep_return, 0.3, "v").await_(1e10), "v"),
    ("yield_", lambda s: s.async_(sleep_return, 0.3, "v").yield_(1e10), Ok("v")),
    (
        "await_many",
        lambda s: parstream.await_many([s.async_(sleep_return, 0.3, "v")], 1e10),
        ["v"],
    ),
    (
        "yield_many",
        lambda s: [r for _, r in parstream.yield_many([s.async_(sleep_return, 0.3, "v")], 1e10)],
        [Ok("v")],
    ),
    ("Child.wait", lambda s: s.start_child(sleep_return, 0.3, "v").wait(1e10), Ok("v")),
    ("Future.result", lambda s: s.submit(sleep_return, 0.3, "v").result(1e10), "v"),
    ("Future.result inf", lambda s: s.submit(sleep_return, 0.3, "v").result(math.inf), "v"),
    ("Future.exception", lambda s: s.submit(sleep_return, 0.3, "v").exception(1e10), None),
]


@pytest.mark.parametrize(
    ("call", "expected"), [pytest.param(c, e, id=i) for i, c, e in HUGE_WAITS]
)
def test_a_timeout_beyond_the_platform_limit_waits_for_the_result(
    call: Callable[[parstream.Supervisor], object], expected: object, sup: parstream.Supervisor
) -> None:
    """A finite timeout of centuries (past threading.TIMEOUT_MAX) waits like no limit.
    Every one of these raised OverflowError from inside ``threading`` before."""
    assert call(sup) == expected


def test_child_wait_checks_its_timeout(sup: parstream.Supervisor) -> None:
    """Child.wait refuses a timeout that is not a number of seconds >= 0, naming it."""
    child = sup.start_child(sleep_return, 0.2, "v")
    for bad, exc in (("1", TypeError), (-1, ValueError), (math.nan, ValueError)):
        with pytest.raises(exc, match="timeout"):
            child.wait(bad)  # type: ignore[arg-type]
    assert child.wait(30) == Ok("v")


def test_every_thread_awaiting_one_task_gets_its_value(sup: parstream.Supervisor) -> None:
    """Eight threads block in await_ (some with a timeout) on one task; all wake with its value."""
    task = sup.async_nolink(sleep_return, 0.5, "v")
    got: list[object] = []
    lock = threading.Lock()

    def wait(timeout: float | None) -> None:
        value = task.await_(timeout)
        with lock:
            got.append(value)

    threads = [threading.Thread(target=wait, args=(None if i % 2 else 30.0,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert got == ["v"] * 8
    assert task.await_(0) == "v"  # and later waits return at once
    assert task.done()


def test_await_with_a_short_timeout_times_out_while_another_thread_waits_on(
    sup: parstream.Supervisor,
) -> None:
    """A waiter whose timeout ends does not disturb one still waiting on the same task."""
    task = sup.async_nolink(sleep_return, 0.6, "v")
    assert task.yield_(0.05) is None  # timed out: None, and the task runs on
    other: list[object] = []
    t = threading.Thread(target=lambda: other.append(task.await_(30)))
    t.start()
    assert task.yield_(0.05) is None
    t.join(30)
    assert other == ["v"]


# -- pickling ----------------------------------------------------------------------------------


def test_unpicklable_function_is_rejected_at_call_time(sup: parstream.Supervisor) -> None:
    """A lambda closing over a Lock fails at async_ with a PicklingError naming it."""
    lock = threading.Lock()

    def uses_lock() -> bool:
        return lock.locked()

    with pytest.raises(pickle.PicklingError, match=r"uses_lock.*lock"):
        sup.async_(uses_lock)
    with pytest.raises(pickle.PicklingError, match="lambda"):
        sup.async_(lambda: lock.locked())
    assert sup.async_(abs, -8).await_(20) == 8


def test_unpicklable_argument_fails_that_task_alone(sup: parstream.Supervisor) -> None:
    """A Lock argument fails only its task, with a PicklingError naming the argument."""
    good = [sup.async_(sleep_return, 0.1, i) for i in range(3)]
    bad0 = sup.async_(identity, threading.Lock())
    bad1 = sup.async_(sleep_return, 0.0, threading.Lock())
    with pytest.raises(pickle.PicklingError, match="argument 0"):
        bad0.await_(20)
    with pytest.raises(pickle.PicklingError, match="argument 1"):
        bad1.await_(20)
    assert [t.await_(20) for t in good] == [0, 1, 2]
    assert sup.async_(abs, -9).await_(20) == 9


def test_unpicklable_result_fails_that_task_alone() -> None:
    """A Lock result fails its task with a PicklingError; the same worker serves the next."""
    with parstream.Supervisor(max_workers=1) as sup:
        pid = sup.async_(os.getpid).await_(20)
        with pytest.raises(pickle.PicklingError, match="lock"):
            sup.async_(return_lock).await_(20)
        assert sup.async_(os.getpid).await_(20) == pid
        assert sup.stats().tasks_crashed == 0


def test_exception_that_cannot_be_rebuilt_is_reported_clearly(sup: parstream.Supervisor) -> None:
    """An exception that cannot be rebuilt keeps its type's name, message and traceback."""
    with pytest.raises(parstream.RemoteError, match=r"TwoArgError.*1/2") as info:
        sup.async_(raise_two_arg_error).await_(20)
    assert isinstance(info.value.__cause__, parstream.RemoteTraceback)
    with pytest.raises(parstream.RemoteError, match="ValueError"):
        sup.async_(raise_with_lock_payload).await_(20)
    assert sup.async_(abs, -11).await_(20) == 11
    assert sup.stats().tasks_crashed == 0


def test_argument_that_cannot_be_unpickled_in_the_worker(sup: parstream.Supervisor) -> None:
    """An argument whose unpickling fails in the worker fails its task with that error."""
    with pytest.raises(RuntimeError, match="cannot be rebuilt in a worker"):
        sup.async_(identity, NotInWorker()).await_(20)
    assert sup.async_(abs, -12).await_(20) == 12
    assert sup.stats().tasks_crashed == 0


def test_result_that_cannot_be_unpickled_in_the_parent(sup: parstream.Supervisor) -> None:
    """A result whose unpickling fails in the parent fails its task alone, clearly."""
    with pytest.raises(pickle.UnpicklingError, match="cannot be rebuilt in the parent"):
        sup.async_(make_not_in_parent, os.getpid()).await_(20)
    assert sup.async_(abs, -13).await_(20) == 13


def test_function_that_failed_to_load_in_a_worker_is_sent_again(tmp_path: Path) -> None:
    """After a worker failed to load a function, the next call sends it again (no stale cache)."""
    module = tmp_path / "only_in_parent_mod.py"
    module.write_text("def answer():\n    return 42\n")
    with parstream.Supervisor(max_workers=1) as sup:
        worker = sup.async_(os.getpid).await_(20)  # the worker exists before sys.path changes
        sys.path.insert(0, str(tmp_path))
        try:
            import only_in_parent_mod  # type: ignore[import-not-found]

            with pytest.raises(ModuleNotFoundError, match="only_in_parent_mod"):
                sup.async_(only_in_parent_mod.answer).await_(20)
            # Make the module importable in that same worker, then call again.
            sup.async_(add_sys_path, str(tmp_path)).await_(20)
            assert sup.async_(os.getpid).await_(20) == worker
            assert sup.async_(only_in_parent_mod.answer).await_(20) == 42
        finally:
            sys.path.remove(str(tmp_path))
            sys.modules.pop("only_in_parent_mod", None)


def test_a_raising_done_callback_does_not_starve_await_many(sup: parstream.Supervisor) -> None:
    """One broken add_done_callback callback must not keep await_many from waking."""

    def broken(_: parstream.Task[Any]) -> None:
        raise RuntimeError("broken callback")

    task = sup.async_(sleep_return, 0.2, "v")
    task.add_done_callback(broken)
    t0 = time.monotonic()
    assert parstream.await_many([task], 6) == ["v"]
    assert time.monotonic() - t0 < 4, "await_many slept to its deadline"


def test_awaiting_a_failed_task_again_raises_the_same_sized_traceback() -> None:
    """The cached exception is raised at each await; its traceback used to
    grow by the awaiting frames every time (3, 6, 9, ...)."""
    import traceback

    with parstream.Supervisor(max_workers=1) as sup:
        task = sup.async_nolink(raise_in_worker_deliberately, 1)
        sizes = []
        for _ in range(3):
            with pytest.raises(ValueError, match="deliberate 1") as info:
                task.await_()
            sizes.append(len(traceback.extract_tb(info.value.__traceback__)))
        with pytest.raises(ValueError):
            parstream.await_many([task])
        with pytest.raises(ValueError) as again:
            task.await_()
    assert sizes[0] == sizes[1] == sizes[2]
    assert len(traceback.extract_tb(again.value.__traceback__)) == sizes[0]


def test_a_task_or_supervisor_sent_to_a_worker_fails_saying_why() -> None:
    """Passing a Task (to await it in a worker) or the Supervisor fails that
    item with a PicklingError that says they stay in their process."""
    with parstream.Supervisor(max_workers=1) as sup:
        done = sup.async_(abs, -1)
        assert done.await_(timeout=30) == 1
        for arg, words in ((done, "await it there"), (sup, "a supervisor of the worker's own")):
            result = sup.async_nolink(repr, arg).yield_(30)
            assert isinstance(result, parstream.Exit)
            assert isinstance(result.reason, pickle.PicklingError)
            assert words in str(result.reason), result.reason


STOPPED_PARENT = """
import os, subprocess, sys, time
import parstream

def quick(x):
    time.sleep(0.5)
    return x

how = sys.argv[1]
sup = parstream.Supervisor(max_workers=2)
sup.async_(abs, 1).await_(30)  # the workers are up
me = os.getpid()
stopper = subprocess.Popen(
    ["sh", "-c", f"read go; kill -s STOP {me}; sleep 1.5; kill -s CONT {me}"],
    stdin=subprocess.PIPE,
)
if how == "future":
    futures = [sup.submit(quick, 7), sup.submit(quick, 8)]
    while not all(f.running() for f in futures):
        time.sleep(0.005)
else:
    tasks = [sup.async_(quick, 7), sup.async_(quick, 8)]
    while any(t.pid is None for t in tasks):
        time.sleep(0.005)
stopper.stdin.write(b"go\\n")
stopper.stdin.flush()
# Stopped within milliseconds: the tasks finish 0.5 s in, the deadline
# passes 1 s in, and this process runs again 1.5 s in.
if how == "future":
    print([f.result(timeout=1.0) for f in futures])
elif how == "await_":
    print([t.await_(timeout=1.0) for t in tasks])
elif how == "await_many":
    print(parstream.await_many(tasks, timeout=1.0))
else:
    print([r.value for _, r in parstream.yield_many(tasks, 1.0, on_timeout="kill_task")])
stopper.wait()
sup.close()
"""


@pytest.mark.parametrize("how", ["await_", "await_many", "yield_many", "future"])
def test_a_parent_stopped_past_the_deadline_keeps_the_results_that_came(how: str) -> None:
    """Ctrl-Z (SIGSTOP) past a wait's deadline, the task long finished: on
    SIGCONT the waiting thread woke first and killed it for TaskTimeout,
    before the event thread could read its result (the stdlib's
    ``Future.result(timeout)`` returns it)."""
    proc = subprocess.run(
        [sys.executable, "-c", STOPPED_PARENT, how],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["[7,", "8]"], proc.stderr[-3000:]


@pytest.mark.parametrize("backend", ["local", "inline"])
def test_a_done_callback_added_late_is_logged_not_raised(
    backend: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A callback added to a task already done runs at once, in the caller's
    thread; one that raised there reached the caller (always, in-process,
    where tasks are done when async_ returns), where Future's is logged. A
    callback that is not callable was taken, and failed later or with a
    bare TypeError."""

    def broken(_: parstream.Task[Any]) -> None:
        raise RuntimeError("broken late callback")

    seen: list[int] = []
    with parstream.Supervisor(max_workers=1, backend=backend) as sup:
        task = sup.async_(abs, -3)
        assert task.await_(30) == 3
        with caplog.at_level(logging.ERROR, logger="parstream"):
            task.add_done_callback(broken)
        task.add_done_callback(lambda t: seen.append(t.await_()))
        with pytest.raises(TypeError, match="fn must be callable"):
            task.add_done_callback("not callable")  # type: ignore[arg-type]
    assert "broken late callback" in caplog.text
    assert seen == [3]
