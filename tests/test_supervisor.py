"""The Supervisor: restart intensity, children, elastic size, recycling, Executor (issue 2)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import os
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from _executor_funcs import at_once
from _util import gone, wait_until

import parstream
from parstream import BRUTAL_KILL, Exit, Ok

if TYPE_CHECKING:
    from collections.abc import Iterator

WAIT_S = 30.0

# -- functions run as tasks --------------------------------------------------------


def fail_now(tag: str) -> None:
    raise ValueError(f"child {tag} failed")


def exit_hard(code: int) -> None:
    os._exit(code)


def sleep_return(seconds: float, value: Any) -> Any:
    time.sleep(seconds)
    return value


def pid_after(seconds: float) -> int:
    time.sleep(seconds)
    return os.getpid()


def fail_until(counter: str, failures: int, seconds: float = 0.0) -> str:
    """Sleep, then fail the first ``failures`` calls (counted in a file), then return."""
    time.sleep(seconds)
    p = Path(counter)
    n = int(p.read_text()) if p.exists() else 0
    p.write_text(str(n + 1))
    if n < failures:
        raise RuntimeError(f"attempt {n}")
    return "done"


def record_run(directory: str, payload: Any) -> None:
    Path(directory, f"run-{os.getpid()}-{time.monotonic_ns()}").touch()


class SlowToPickle:
    """Takes a while to pickle: widens the window in which a restart is being submitted."""

    def __reduce__(self) -> tuple[Any, ...]:
        time.sleep(0.5)
        return (SlowToPickle, ())


_HELD: Any = None


def hold_memory(mb: int) -> int:
    global _HELD
    _HELD = bytearray(mb * 2**20)
    for i in range(0, len(_HELD), 4096):  # touch every page: it must count in the RSS
        _HELD[i] = 1
    return os.getpid()


def task_pid(task: parstream.Task[Any]) -> int:
    wait_until(lambda: task.pid is not None, what="the task to start")
    pid = task.pid
    assert pid is not None
    return pid


def child_pid(child: parstream.Child) -> int:
    wait_until(lambda: child.pid is not None, what="the child to start")
    pid = child.pid
    assert pid is not None
    return pid


# -- restart intensity ------------------------------------------------------------------


def test_give_up_is_visible_as_soon_as_the_child_ends() -> None:
    """Scenario 11: once the crash-looping child has ended, the supervisor is already closed."""
    sup = parstream.Supervisor(max_restarts=3, max_seconds=5, max_workers=1)
    try:
        child = sup.start_child(fail_now, "a", restart="transient")
        result = child.wait(30)
        assert isinstance(result, Exit)
        assert isinstance(result.reason, ValueError)
        assert child.restarts == 3
        assert sup.closed, "the child ended for good but the supervisor still says open"
        with pytest.raises(parstream.SupervisorClosed, match="restarts"):
            sup.async_(abs, 1)
    finally:
        sup.close()


@pytest.mark.parametrize("how", ["gave up", "closed", "terminated"])
def test_an_ended_child_has_its_last_result_once_wait_returns(how: str) -> None:
    """An ended child's ``wait()`` gives how it ended, never ``None`` (which
    ``wait`` also returns on a timeout): the end was signalled at once, its
    result set later on the callback thread, so ``wait`` saw None, then a
    moment later ``Exit(TaskShutdown)``."""
    sup = parstream.Supervisor(max_restarts=1, max_seconds=30, max_workers=2)
    try:
        child = sup.start_child(time.sleep, 30, restart="permanent")
        child_pid(child)
        if how == "gave up":
            sup.start_child(exit_hard, 9, restart="permanent")
            result = child.wait(30)
        else:
            # The callback thread is busy: what it would set comes too late.
            busy, entered = threading.Event(), threading.Event()

            def hold(_: parstream.Task[Any]) -> None:
                entered.set()
                busy.wait(10)

            task = sup.async_(abs, 1)  # (a dropped handle kills a linked task)
            task.add_done_callback(hold)
            assert entered.wait(30)
            try:
                if how == "closed":
                    sup.close()
                else:
                    assert sup.terminate_child(child)
                result = child.wait(0)
            finally:
                busy.set()
        assert not child.alive()
        assert isinstance(result, Exit), result
        assert isinstance(result.reason, parstream.TaskShutdown), result
    finally:
        sup.close()


@pytest.mark.slow
def test_transient_crash_loop_gives_up_and_terminates_every_child() -> None:
    """Scenario 11: exactly 3 restarts, then all children die and every call is refused."""
    sup = parstream.Supervisor(max_restarts=3, max_seconds=5, max_workers=2)
    try:
        bystander = sup.start_child(time.sleep, 30)
        bystander_pid = child_pid(bystander)
        child = sup.start_child(fail_now, "b", restart="transient")
        assert child.wait(30) is not None
        wait_until(lambda: sup.closed, what="the supervisor to give up")
        assert child.restarts == 3
        assert sup.stats().restarts == 3
        wait_until(lambda: not bystander.alive(), within=5, what="the bystander to be ended")
        assert gone(bystander_pid, 5.0)
        assert sup.children() == []
        for call in (
            lambda: sup.async_(abs, 1),
            lambda: sup.async_nolink(abs, 1),
            lambda: sup.start(abs, 1),
            lambda: sup.start_child(abs, 1),
            lambda: sup.submit(abs, 1),
        ):
            with pytest.raises(parstream.SupervisorClosed, match="restarts"):
                call()
        assert sup.worker_pids() == [] or all(gone(p, 5.0) for p in sup.worker_pids())
    finally:
        sup.close()


def test_transient_child_returning_normally_is_not_restarted(sup: parstream.Supervisor) -> None:
    """A transient child that returns, or exits with SystemExit(0), is done: no restart."""
    child = sup.start_child(pow, 2, 2, restart="transient")
    assert child.wait(30) == Ok(4)
    exited = sup.start_child(sys.exit, 0, restart="transient")
    result = exited.wait(30)
    assert isinstance(result, Exit)
    assert isinstance(result.reason, SystemExit)
    assert child.restarts == 0
    assert exited.restarts == 0
    assert sup.stats().restarts == 0
    assert not sup.closed


def test_permanent_child_that_returns_exhausts_the_supervisor() -> None:
    """Scenario 12: a permanent child that returns at once is restarted until give-up."""
    sup = parstream.Supervisor(max_restarts=2, max_seconds=5, max_workers=1)
    try:
        child = sup.start_child(abs, -1, restart="permanent")
        assert child.wait(30) == Ok(1)
        wait_until(lambda: sup.closed, what="the supervisor to give up")
        assert child.restarts == 2
        assert sup.stats().restarts == 2
    finally:
        sup.close()


def test_temporary_children_crashing_never_kill_the_supervisor(
    sup: parstream.Supervisor,
) -> None:
    """Ten temporary children that os._exit are never restarted and never count."""
    children = [sup.start_child(exit_hard, 1) for _ in range(10)]
    for c in children:
        result = c.wait(30)
        assert isinstance(result, Exit)
        assert isinstance(result.reason, parstream.WorkerCrashed)
        assert result.reason.exitcode == 1
        assert c.restarts == 0
    assert not sup.closed
    stats = sup.stats()
    assert stats.restarts == 0
    assert stats.tasks_crashed == 10
    assert sup.async_(abs, -2).await_(20) == 2


def test_transient_child_recovers(sup: parstream.Supervisor, tmp_path: Path) -> None:
    """A transient child failing twice then succeeding ends with Ok after 2 restarts."""
    counter = tmp_path / "n"
    child = sup.start_child(fail_until, str(counter), 2, restart="transient")
    assert child.wait(30) == Ok("done")
    assert child.restarts == 2
    assert counter.read_text() == "3"
    assert sup.stats().restarts == 2
    assert not sup.closed


def test_restart_intensity_is_shared_by_all_children(tmp_path: Path) -> None:
    """Restarts of different children add up to one intensity: 2 + 2 > 3 gives up."""
    sup = parstream.Supervisor(max_restarts=3, max_seconds=5, max_workers=2)
    try:
        a = sup.start_child(fail_until, str(tmp_path / "a"), 2, restart="transient")
        b = sup.start_child(fail_until, str(tmp_path / "b"), 2, restart="transient")
        a.wait(30)
        b.wait(30)
        wait_until(lambda: sup.closed, what="the supervisor to give up")
        assert a.restarts + b.restarts == 3
        assert sup.stats().restarts == 3
    finally:
        sup.close()


@pytest.mark.slow
def test_restarts_spread_wider_than_max_seconds_never_give_up(tmp_path: Path) -> None:
    """Only restarts inside the max_seconds window count: spaced failures are fine."""
    with parstream.Supervisor(max_restarts=1, max_seconds=0.2, max_workers=1) as sup:
        child = sup.start_child(fail_until, str(tmp_path / "n"), 3, 0.4, restart="transient")
        assert child.wait(30) == Ok("done")
        assert child.restarts == 3
        assert not sup.closed


# -- children -----------------------------------------------------------------------


def test_terminate_permanent_child(sup: parstream.Supervisor) -> None:
    """terminate_child stops a permanent child for good: True, then False."""
    child = sup.start_child(time.sleep, 30, restart="permanent", shutdown=BRUTAL_KILL)
    pid = child_pid(child)
    assert sup.terminate_child(child) is True
    assert gone(pid, 3.0)
    assert not child.alive()
    assert child.wait(5) is not None or not child.alive()
    assert sup.terminate_child(child) is False
    assert sup.children() == []
    assert child.restarts == 0
    assert sup.stats().tasks_started == 1
    assert sup.stats().restarts == 0


@pytest.mark.slow
def _terminate(
    sup: parstream.Supervisor, child: parstream.Child, start: threading.Barrier, said: list[bool]
) -> None:
    start.wait(10)
    said.append(sup.terminate_child(child))


def test_terminating_a_child_from_two_threads_at_once_says_true_once(
    sup: parstream.Supervisor,
) -> None:
    """Two threads terminate one child at once: one gets True, the other
    False (it was not found running), as Elixir's second terminate_child
    gets ``{:error, :not_found}``. (Both got True.)"""
    for _ in range(5):
        child = sup.start_child(time.sleep, 30, restart="permanent")
        child_pid(child)
        start = threading.Barrier(2)
        said: list[bool] = []

        threads = [
            threading.Thread(target=_terminate, args=(sup, child, start, said)) for _ in range(2)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert sorted(said) == [False, True]
        assert not child.alive()


def test_terminate_child_during_a_restart_stops_it_for_good(tmp_path: Path) -> None:
    """terminate_child while a permanent child's restart is being submitted: no further run."""
    with parstream.Supervisor(max_workers=1) as sup:
        child = sup.start_child(record_run, str(tmp_path), SlowToPickle(), restart="permanent")
        wait_until(lambda: any(tmp_path.iterdir()), what="the first run")
        # The restart is now being pickled (0.5 s) by the supervisor.
        assert sup.terminate_child(child) is True
        assert not child.alive()
        runs_at_terminate = len(list(tmp_path.iterdir()))
        deadline = time.monotonic() + 2.5
        while time.monotonic() < deadline:
            runs = len(list(tmp_path.iterdir()))
            assert runs == runs_at_terminate, "the terminated child ran again"
            time.sleep(0.05)


def test_terminate_child_of_another_supervisor(sup: parstream.Supervisor) -> None:
    """terminate_child refuses a Child it does not own (False) and a non-Child (TypeError)."""
    with parstream.Supervisor(max_workers=1) as other:
        child = other.start_child(sleep_return, 0.2, "x")
        assert sup.terminate_child(child) is False
        assert child.wait(20) == Ok("x")
    with pytest.raises(TypeError):
        sup.terminate_child("nope")  # type: ignore[arg-type]


def test_max_children_is_enforced() -> None:
    """The third child over max_children=2 is a ValueError; a freed slot can be reused."""
    with parstream.Supervisor(max_workers=1, max_children=2) as sup:
        a = sup.start_child(time.sleep, 30, shutdown=BRUTAL_KILL)
        sup.start_child(time.sleep, 30, shutdown=BRUTAL_KILL)
        with pytest.raises(ValueError, match="max_children"):
            sup.start_child(time.sleep, 30)
        assert len(sup.children()) == 2
        assert sup.terminate_child(a)
        c = sup.start_child(sleep_return, 0.0, "c")
        assert c.wait(20) == Ok("c")


def test_max_children_counts_tasks_too() -> None:
    """As in Elixir, async_, async_nolink and start count against
    max_children, beside children; streams and Executor calls do not. (Only
    start_child was refused.)"""
    with parstream.Supervisor(max_workers=2, max_children=2) as sup:
        child = sup.start_child(time.sleep, 30, shutdown=BRUTAL_KILL)
        task = sup.async_nolink(time.sleep, 30)
        for start in (sup.async_, sup.async_nolink, sup.start, sup.start_child):
            with pytest.raises(ValueError, match=r"max_children \(2\) reached"):
                start(abs, -1)
        assert list(sup.stream_map(abs, [-1, -2])) == [1, 2]
        assert sup.submit(abs, -3).result(20) == 3
        assert task.shutdown(BRUTAL_KILL) is None
        assert sup.async_(abs, -4).await_(20) == 4  # a finished task frees its place
        assert sup.terminate_child(child)
        assert sup.start_child(sleep_return, 0.0, "c").wait(20) == Ok("c")


def test_a_long_child_does_not_starve_tasks() -> None:
    """With max_workers=1, a running child gets its own worker: tasks still run."""
    with parstream.Supervisor(max_workers=1) as sup:
        child = sup.start_child(time.sleep, 30, shutdown=BRUTAL_KILL)
        child_pid(child)
        assert sup.async_(abs, -3).await_(10) == 3


def test_child_whose_restart_cannot_be_pickled_ends_instead_of_hanging(
    tmp_path: Path,
) -> None:
    """A child whose call can no longer be pickled at restart ends with an error; no limbo."""
    state: dict[str, Any] = {}
    ready, go = tmp_path / "ready", tmp_path / "go"

    def flaky() -> None:
        state.get("x")
        ready.touch()
        while not go.exists():
            time.sleep(0.01)
        raise RuntimeError("first run fails")

    with parstream.Supervisor(max_workers=1) as sup:
        child = sup.start_child(flaky, restart="transient")
        wait_until(ready.exists, what="the first run")
        state["x"] = threading.Lock()  # the closure no longer pickles
        go.touch()
        result = child.wait(30)
        assert not child.alive(), "the child is stuck between runs"
        assert isinstance(result, Exit)


# -- elastic size and recycling ---------------------------------------------------------


@pytest.mark.slow
def test_wide_stream_grows_the_pool_then_extras_retire() -> None:
    """max_workers=1, max_concurrency=4: 4 pids serve; idle extras retire after idle_timeout."""
    with parstream.Supervisor(max_workers=1, idle_timeout=0.5) as sup:
        pids = list(sup.stream_map(pid_after, [0.5] * 4, max_concurrency=4))
        assert len(set(pids)) == 4
        wait_until(lambda: len(sup.worker_pids()) == 1, within=8, what="extras to retire")
        (left,) = sup.worker_pids()
        assert left in pids
        retired = set(pids) - {left}
        assert all(gone(p, 5.0) for p in retired)
        assert sup.stats().workers_alive == 1
        # The base worker is not retired by the same clock.
        assert sup.async_(os.getpid).await_(20) == left


def test_max_workers_still_bounds_tasks_after_a_wide_stream(tmp_path: Path) -> None:
    """The workers a wide stream added, idle until their idle_timeout, do not
    run more tasks at once than max_workers once the stream has ended."""
    folder = str(tmp_path)
    with parstream.Supervisor(max_workers=1) as sup:
        assert list(
            sup.stream_map(
                functools.partial(at_once, seconds=0.3), [folder] * 4, max_concurrency=4
            )
        )
        assert len(sup.worker_pids()) > 1  # the extras are still there
        assert max(f.result(30) for f in [sup.submit(at_once, folder, 0.2) for _ in range(4)]) == 1
        tasks = [sup.async_(at_once, folder, 0.2) for _ in range(4)]
        assert max(parstream.await_many(tasks, 30)) == 1
        assert max(sup.stream_map(functools.partial(at_once, seconds=0.2), [folder] * 4)) == 1


def test_max_tasks_per_worker_recycles_between_tasks() -> None:
    """max_tasks_per_worker=2: six tasks use at least 3 workers, none runs more than 2."""
    with parstream.Supervisor(max_workers=1, max_tasks_per_worker=2) as sup:
        pids = [sup.async_(os.getpid).await_(20) for _ in range(6)]
        counts = Counter(pids)
        assert len(counts) >= 3
        assert max(counts.values()) <= 2, counts


def test_max_tasks_per_worker_holds_inside_a_stream() -> None:
    """Batched stream items count too: no worker runs more than max_tasks_per_worker items."""
    with parstream.Supervisor(max_workers=1, max_tasks_per_worker=2) as sup:
        # A lambda travels by value: workers need not import this module, so items
        # are fast from the first one and the stream batches them.
        pids = list(sup.stream_map(lambda _: os.getpid(), range(40)))
        counts = Counter(pids)
        assert max(counts.values()) <= 2, counts


def test_max_memory_per_worker_recycles() -> None:
    """A worker holding 200 MB over a 100 MB limit is replaced before the next task."""
    with parstream.Supervisor(max_workers=1, max_memory_per_worker=100 * 2**20) as sup:
        fat = sup.async_(hold_memory, 200).await_(30)
        assert sup.async_(os.getpid).await_(30) != fat
        assert gone(fat, 5.0)
        lean = sup.async_(os.getpid).await_(30)
        assert sup.async_(os.getpid).await_(30) == lean  # small workers are kept


# -- stats -------------------------------------------------------------------------------


def test_stats_account_for_every_task(sup: parstream.Supervisor) -> None:
    """Every started task ends in exactly one outcome counter, kills included."""
    import gc

    assert sup.async_(abs, -1).await_(20) == 1
    with pytest.raises(ValueError):
        sup.async_(fail_now, "s").await_(20)
    with pytest.raises(parstream.WorkerCrashed):
        sup.async_(exit_hard, 2).await_(20)
    with pytest.raises(parstream.TaskTimeout):
        sup.async_(time.sleep, 30).await_(0.2)
    shot = sup.async_(time.sleep, 30)
    task_pid(shot)
    assert shot.shutdown(BRUTAL_KILL) is None
    dropped = sup.async_(time.sleep, 30)
    dropped_pid = task_pid(dropped)
    del dropped
    gc.collect()
    assert dropped_pid is not None
    assert gone(dropped_pid, 5.0)
    assert sup.async_(abs, -1).await_(20) == 1
    s = sup.stats()
    assert s.tasks_started == 7
    assert (s.tasks_ok, s.tasks_failed, s.tasks_crashed, s.tasks_timed_out) == (2, 1, 1, 1)
    assert s.tasks_killed == 2, s
    # The replacement of the last killed worker may still be on its way.
    wait_until(lambda: sup.stats().workers_alive == 2, what="two workers alive")


# -- closed supervisor --------------------------------------------------------------------


def test_close_fails_in_flight_tasks_and_refuses_new_work() -> None:
    """close() ends running tasks with TaskShutdown, kills workers, refuses later calls."""
    sup = parstream.Supervisor(max_workers=2)
    task = sup.async_(time.sleep, 30)
    queued = [sup.async_(time.sleep, 30) for _ in range(3)]
    wait_until(lambda: task.pid is not None)
    pids = sup.worker_pids()
    sup.close()
    assert sup.closed
    assert all(gone(p, 5.0) for p in pids)
    for t in [task, *queued]:
        with pytest.raises(parstream.TaskShutdown):
            t.await_(5)
    for call in (
        lambda: sup.async_(abs, 1),
        lambda: sup.start_child(abs, 1),
        lambda: sup.async_stream(abs, [1]),
        lambda: sup.submit(abs, 1),
        sup.restart_workers,
    ):
        with pytest.raises(parstream.SupervisorClosed):
            call()
    with pytest.raises(RuntimeError):  # the Executor contract's error type
        sup.submit(abs, 1)
    sup.close()  # idempotent


# -- the Executor interface ------------------------------------------------------------


def test_submit_returns_a_concurrent_future(sup: parstream.Supervisor) -> None:
    """submit() gives a concurrent.futures.Future with result() or exception()."""
    fut = sup.submit(pow, 2, 8)
    assert isinstance(fut, concurrent.futures.Future)
    assert fut.result(20) == 256
    bad = sup.submit(fail_now, "f")
    exc = bad.exception(20)
    assert isinstance(exc, ValueError)
    assert isinstance(exc.__cause__, parstream.RemoteTraceback)
    assert sup.submit(sorted, [3, 1, 2], reverse=True).result(20) == [3, 2, 1]
    done, _ = concurrent.futures.wait([sup.submit(abs, -i) for i in range(4)], timeout=20)
    assert sorted(f.result() for f in done) == [0, 1, 2, 3]


def test_executor_map_keeps_order_and_one_deadline() -> None:
    """Supervisor.map returns in order; its timeout is one deadline for the whole call."""
    with parstream.Supervisor(max_workers=1) as sup:
        assert list(sup.map(pow, [2, 3, 4], [3, 2, 1])) == [8, 9, 4]
        assert list(sup.map(sleep_return, [0.2, 0.0], ["a", "b"], timeout=20)) == ["a", "b"]
        # Each item alone fits in 1 s; together they do not.
        results = sup.map(sleep_return, [0.6, 0.6], ["a", "b"], timeout=1.0)
        with pytest.raises(TimeoutError):
            list(results)


def test_run_in_executor(sup: parstream.Supervisor) -> None:
    """loop.run_in_executor(sup, fn, x) runs fn in a worker."""

    async def main() -> list[int]:
        loop = asyncio.get_running_loop()
        futs = [loop.run_in_executor(sup, pid_after, 0.05) for _ in range(2)]
        return list(await asyncio.gather(*futs))

    pids = asyncio.run(main())
    assert all(p != os.getpid() for p in pids)


def test_executor_shutdown_waits_for_submitted_work() -> None:
    """shutdown(wait=True) lets submitted work finish, then refuses new work."""
    sup = parstream.Supervisor(max_workers=1)
    futs = [sup.submit(sleep_return, 0.2, i) for i in range(3)]
    sup.shutdown(wait=True)
    assert [f.result(0) for f in futs] == [0, 1, 2]
    assert sup.closed
    with pytest.raises(RuntimeError):
        sup.submit(abs, 1)


def test_executor_shutdown_does_not_wait_for_supervised_children() -> None:
    """shutdown(wait=True) waits for submitted futures, not for a long-running child."""
    sup = parstream.Supervisor(max_workers=1)
    try:
        child = sup.start_child(time.sleep, 6)
        child_pid(child)
        fut = sup.submit(sleep_return, 0.2, "f")
        sup.shutdown(wait=True)
        assert fut.result(0) == "f"
        assert not child.alive()
        # Ended by the shutdown (had it waited for the child, this would be Ok).
        result = child.wait(0)
        assert isinstance(result, Exit), "shutdown waited for the child to finish"
        assert isinstance(result.reason, parstream.TaskShutdown)
    finally:
        sup.close()


def test_executor_with_block_waits_for_submitted_futures() -> None:
    """As for every Executor, leaving `with` waits for the futures submitted in it."""
    with parstream.Supervisor(max_workers=1) as ex:
        fut = ex.submit(sleep_return, 0.3, "kept")
    assert fut.result(5) == "kept"


def test_a_child_and_its_restart_run_at_once_with_tasks_queued(tmp_path: Path) -> None:
    """A child gets a worker of its own: its run (and a restart's) does not
    wait behind tasks queued meanwhile. Both used to queue behind them, first
    in first out, here for 30 s each."""
    sup = parstream.Supervisor(max_workers=1)
    try:
        sleepers = [sup.async_(time.sleep, 30) for _ in range(3)]  # one runs, two wait
        child = sup.start_child(fail_until, str(tmp_path / "runs"), 1, restart="transient")
        assert child.wait(20) == Ok("done")
        assert child.restarts == 1
        assert not any(t.done() for t in sleepers)
    finally:
        sup.close()


def fail_after(seconds: float) -> None:
    time.sleep(seconds)
    raise RuntimeError("the child fails")


@pytest.mark.parametrize("kind", ["stream_map", "async_stream", "map"])
def test_a_stream_cut_off_by_a_give_up_says_why(kind: str) -> None:
    """A stream running when the supervisor gives up raises SupervisorClosed
    with the supervisor's reason, as every later call does, not just 'closed'."""
    sup = parstream.Supervisor(max_restarts=0, max_workers=2)
    try:
        stream: Iterator[Any]
        if kind == "stream_map":
            stream = sup.stream_map(time.sleep, [30] * 4)
        elif kind == "async_stream":
            stream = sup.async_stream(time.sleep, [30] * 4)
        else:
            stream = sup.map(time.sleep, [30] * 4)
        sup.start_child(fail_after, 0.5, restart="transient")
        with pytest.raises(parstream.SupervisorClosed, match="gave up"):
            list(stream)
    finally:
        sup.close()


def test_restarts_under_a_backlog_do_not_grow_the_pool_without_bound() -> None:
    """Each restart of a child whose worker took queued work gets one more
    worker, but never more than one per child beyond the reservations."""
    sup = parstream.Supervisor(max_workers=1, max_restarts=1000, max_seconds=1.0)
    try:
        sleepers = [sup.async_(time.sleep, 30) for _ in range(20)]
        child = sup.start_child(sleep_return, 0.05, "again", restart="permanent")
        wait_until(lambda: child.restarts >= 8, within=30, what="eight restarts")
        assert len(sup.workers()) <= 1 + 2 * 1
        assert not any(t.done() for t in sleepers)
    finally:
        sup.close()


# -- found by the children hunt ---------------------------------------------------------


def test_a_child_whose_arguments_cannot_be_sent_ends_with_that_error() -> None:
    """Each run failed before it began, counted as a crash: the supervisor
    gave up (killing the siblings), or restarted it ~1,300 times a second."""
    import pickle

    with parstream.Supervisor(max_restarts=3, max_seconds=5.0) as sup:
        sibling = sup.start_child(time.sleep, 60, restart="permanent")
        for restart in ("transient", "permanent"):
            child = sup.start_child(abs, threading.Lock(), restart=restart)
            result = child.wait(WAIT_S)
            assert isinstance(result, Exit)
            assert isinstance(result.reason, pickle.PicklingError)
            assert child.restarts == 0
        assert not sup.closed
        assert sibling.alive()
        sup.terminate_child(sibling)


def _terminate_politely(path: str) -> None:
    import signal

    def on_term(*_: Any) -> None:
        Path(path).write_text("cleaned up")
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, on_term)
    time.sleep(100)


def _hold_lock(path: str) -> None:
    import fcntl

    f = open(path, "w")  # noqa: SIM115 - held until the process dies
    fcntl.flock(f, fcntl.LOCK_EX)
    Path(path + ".held").touch()
    time.sleep(100)


def _lock_is_held(path: str) -> bool:
    import fcntl

    with open(path, "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        return False


def test_giving_up_terminates_children_with_their_grace_and_they_end_after_it(
    tmp_path: Path,
) -> None:
    """Give-up SIGKILLed every child at once (their shutdown= grace ignored),
    and a child's wait() returned while its worker still ran."""
    polite = str(tmp_path / "polite")
    locked = str(tmp_path / "locked")
    sup = parstream.Supervisor(max_restarts=0)
    try:
        graceful = sup.start_child(_terminate_politely, polite, restart="permanent", shutdown=5.0)
        holder = sup.start_child(_hold_lock, locked, restart="permanent", shutdown=BRUTAL_KILL)
        wait_until(lambda: Path(locked + ".held").exists(), within=WAIT_S, what="lock held")
        time.sleep(0.3)  # the SIGTERM handler is set
        sup.start_child(exit_hard, 1, restart="transient")  # one restart too many
        assert holder.wait(WAIT_S) is not None
        assert not _lock_is_held(locked)  # its worker is gone by the time wait() returns
        assert graceful.wait(WAIT_S) is not None
        assert Path(polite).read_text() == "cleaned up"
        assert sup.closed
    finally:
        sup.close()


def test_every_abnormal_end_of_a_restarted_child_is_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    counter = str(tmp_path / "n")
    with (
        caplog.at_level("ERROR", logger="parstream"),
        parstream.Supervisor(max_restarts=10, max_seconds=60) as sup,
    ):
        child = sup.start_child(fail_until, counter, 2, restart="transient")
        assert child.wait(WAIT_S) == Ok("done")
    failures = [r for r in caplog.records if "attempt" in r.getMessage()]
    assert len(failures) == 2, [r.getMessage() for r in caplog.records]


def _ignore_sigterm() -> None:
    import signal

    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    time.sleep(100)


def test_a_second_terminate_child_answers_once_the_child_is_gone() -> None:
    """It returned False at once while the child still ran and was listed."""
    with parstream.Supervisor() as sup:
        child = sup.start_child(_ignore_sigterm, restart="permanent", shutdown=1.5)
        wait_until(lambda: child.pid is not None, within=WAIT_S, what="child running")
        time.sleep(0.3)
        first = threading.Thread(target=sup.terminate_child, args=(child,))
        first.start()
        wait_until(lambda: not child.alive() or child.terminated, within=WAIT_S, what="ending")
        assert sup.terminate_child(child) is False
        assert not child.alive()
        assert sup.children() == []
        first.join(WAIT_S)


def _crash_soon() -> None:
    time.sleep(0.1)
    raise RuntimeError("child crashed")


def test_a_blocking_callback_elsewhere_does_not_stop_restarts(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A future's callback blocking on one Supervisor stopped every other
    Supervisor's children from being restarted (one shared callback thread)."""
    release = threading.Event()
    with (
        caplog.at_level("CRITICAL", logger="parstream"),
        parstream.Supervisor(max_workers=1) as pool,
        parstream.Supervisor(max_restarts=1000, max_seconds=60) as service,
    ):
        try:
            pool.submit(abs, -1).add_done_callback(lambda _: release.wait(30))
            time.sleep(0.3)
            service.start_child(_crash_soon, restart="permanent")
            wait_until(
                lambda: service.stats().restarts >= 3,
                within=WAIT_S,
                what="restarts while the other supervisor's callback blocks",
            )
        finally:
            release.set()
