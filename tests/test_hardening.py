"""The engine off the well-trodden path (issue 8): fork, failed starts, timeouts that
cover loading, callbacks off the hub, idle deaths, the give-up race, one way of
shipping functions, no user data kept, no growth, and exactly-once under crashes."""

from __future__ import annotations

import contextlib
import functools
import gc
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
import warnings
import weakref
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

import _hostile
import psutil
import pytest
from _hostile import (
    Holder,
    SlowToUnpickle,
    append_index,
    append_then_sleep,
    count_instances,
    fail_on_three,
    identity,
    pid_of,
    sleep_then,
)
from _util import fork_and_wait, wait_until

import parstream
from parstream import Exit, Ok

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent


def run_script(code: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(TESTS), env.get("PYTHONPATH", "")])
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        check=False,
    )


# -- 1. fork ----------------------------------------------------------------------


def test_a_forked_child_gets_its_own_default_supervisor() -> None:
    """The child's calls run on workers of its own; the parent's results stay right."""
    assert list(parstream.map(identity, range(20))) == list(range(20))
    parent_workers = set(parstream.default_supervisor().worker_pids())

    def child() -> int:
        sup = parstream.default_supervisor()
        ok = parstream.async_(functools.partial(pow, 3), 2).await_(30) == 9
        ok = ok and list(parstream.map(lambda x: x * 3, range(10))) == [x * 3 for x in range(10)]
        ok = ok and not (set(sup.worker_pids()) & parent_workers)
        sup.close()
        return 0 if ok else 1

    assert fork_and_wait(child) == 0
    assert list(parstream.map(identity, range(200))) == list(range(200))
    assert parstream.async_(identity, "parent").await_(30) == "parent"
    assert set(parstream.default_supervisor().worker_pids()) == parent_workers


def test_an_inherited_supervisor_refuses_use_in_the_child(sup: parstream.Supervisor) -> None:
    """A Supervisor (and a Task) that crossed os.fork() raise a clear error naming it."""
    running = sup.async_nolink(sleep_then, 1.0, "done")

    def child() -> int:
        try:
            sup.async_(identity, 1)
        except parstream.SupervisorClosed as exc:
            if "os.fork()" not in str(exc):
                return 2
        else:
            return 3
        try:
            running.await_(5)
        except parstream.SupervisorClosed:
            pass
        else:
            return 4
        sup.close()  # harmless: the parent's workers are not touched
        return 0

    assert fork_and_wait(child) == 0
    assert running.await_(30) == "done"
    assert list(sup.stream_map(identity, range(100))) == list(range(100))


def test_an_inherited_child_refuses_wait_in_the_forked_process(sup: parstream.Supervisor) -> None:
    """A supervised child that crossed os.fork() can never end in the forked
    process: its wait() waited out the whole timeout (for good without one)
    where an inherited Task's await_ refuses at once."""
    child = sup.start_child(sleep_then, 1.0, "done", restart="temporary")

    def forked() -> int:
        try:
            child.wait(3)
        except parstream.SupervisorClosed as exc:
            return 0 if "os.fork()" in str(exc) else 2
        return 1

    assert fork_and_wait(forked) == 0
    assert child.wait(30) == Ok("done")


@pytest.mark.parametrize("kind", ["async_stream_nolink", "map"])
def test_an_inherited_stream_hands_out_nothing_in_the_child(kind: str) -> None:
    """Results the parent's stream had fetched were handed out in the child
    too (the parent then got the same items): 5-278 of them, before the
    child's next() raised."""
    make = getattr(parstream, kind)
    stream = make(identity, range(1000))
    head = [next(stream) for _ in range(50)]  # tiny items: the rest of a span is fetched

    def child() -> int:
        try:
            next(stream)
        except parstream.SupervisorClosed as exc:
            return 0 if "os.fork()" in str(exc) else 2
        return 1

    assert fork_and_wait(child) == 0
    rest = list(stream)
    got = [r.value if isinstance(r, Ok) else r for r in head + rest]
    assert got == list(range(1000))


def test_every_wait_on_inherited_work_refuses_in_the_child() -> None:
    """Streams, task shutdowns and the many-task waits refuse inherited work with
    ``SupervisorClosed``, as ``await_`` does (each hung in the child, waiting
    for the parent's workers); a shutdown or a ``with`` exit there only drops
    the child's copies."""
    sup = parstream.Supervisor(max_workers=4)
    task = sup.async_nolink(sleep_then, 3.0, "done")
    other = sup.async_nolink(sleep_then, 3.0, "other")
    stream = sup.stream_map(_sleep_for, [0.0] + [1.0] * 3, chunksize=1, max_concurrency=2)
    assert next(stream) == 0.0  # the rest, and both tasks, still running in the parent

    def child() -> int:
        signal.alarm(20)  # a hang ends the child with SIGALRM, not the test run
        waits: list[Any] = [
            lambda: next(stream),
            lambda: task.shutdown(parstream.BRUTAL_KILL),
            lambda: task.shutdown(1.0),
            lambda: parstream.await_many([task, other], 5),
            lambda: parstream.yield_many([task, other], 0.5),
        ]
        for i, wait in enumerate(waits):
            try:
                wait()
            except parstream.SupervisorClosed as exc:
                if "os.fork()" not in str(exc):
                    return 10 + i
            else:
                return 20 + i
        sup.shutdown(wait=True)  # returns: nothing here is this process's to wait for
        with sup:
            pass
        return 0

    try:
        assert fork_and_wait(child) == 0
        assert task.await_(30) == "done"
        assert other.await_(30) == "other"
        assert list(stream) == [1.0] * 3
    finally:
        sup.close()


def _sleep_for(seconds: float) -> float:
    return sleep_then(seconds, seconds)  # type: ignore[no-any-return]


def test_a_forked_child_exits_while_the_parent_has_work_pending() -> None:
    """Interpreter exit in a child does not wait for the parent's pending futures
    and tasks (it did, forever, from the exit hook). ``ProcessPoolExecutor``
    is the control."""
    code = """
        import concurrent.futures, os, sys, time
        import parstream
        from _hostile import sleep_then

        for make in (lambda: concurrent.futures.ProcessPoolExecutor(2),
                     lambda: parstream.Supervisor(max_workers=2)):
            ex = make()
            pending = [ex.submit(sleep_then, 3, 1)]
            if isinstance(ex, parstream.Supervisor):
                pending.append(ex.async_nolink(sleep_then, 3, 2))
            time.sleep(0.5)
            pid = os.fork()
            if pid == 0:
                sys.exit(0)  # the exit hooks run
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline:
                done, status = os.waitpid(pid, os.WNOHANG)
                if done:
                    print(type(ex).__name__, os.waitstatus_to_exitcode(status))
                    break
                time.sleep(0.05)
            else:
                os.kill(pid, 9)
                os.waitpid(pid, 0)
                print(type(ex).__name__, "hung")
            ex.shutdown(wait=False, cancel_futures=True)
            if isinstance(ex, parstream.Supervisor):
                ex.close()
    """
    out = run_script(code, timeout=90)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[:2] == ["ProcessPoolExecutor 0", "Supervisor 0"], out.stdout


def test_a_fork_started_multiprocessing_pool_worker_can_use_parstream() -> None:
    """A worker of a fork-started multiprocessing.Pool calls parstream; the parent is intact."""
    import multiprocessing

    assert list(parstream.map(identity, range(10))) == list(range(10))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        with multiprocessing.get_context("fork").Pool(1) as pool:
            got = pool.apply(_map_in_child, (list(range(30)),))
    assert got == [x * 2 for x in range(30)]
    assert list(parstream.map(identity, range(300))) == list(range(300))


def _map_in_child(items: list[int]) -> list[int]:
    try:
        return list(parstream.map(functools.partial(int.__mul__, 2), items))
    finally:
        parstream.default_supervisor().close()


# -- 2. a failed worker start -------------------------------------------------------


@contextlib.contextmanager
def _in_a_deleted_directory(tmp_path: Path) -> Iterator[Callable[[], None]]:
    """Run the block in a working directory that no longer exists; it gets a
    call that goes back to the old one (also done on the way out)."""
    gone_dir = tmp_path / "gone"
    gone_dir.mkdir()
    old = os.getcwd()
    os.chdir(gone_dir)
    try:
        gone_dir.rmdir()
        yield lambda: os.chdir(old)
    finally:
        os.chdir(old)


def test_failed_worker_starts_surface_and_recover(tmp_path: Path) -> None:
    """No working directory: waiting work fails with the cause, then work runs again."""
    with _in_a_deleted_directory(tmp_path) as back, parstream.Supervisor(max_workers=1) as sup:
        task = sup.async_(identity, 1)
        with pytest.raises(parstream.WorkerStartFailed) as info:
            task.await_(60)
        assert isinstance(info.value.__cause__, OSError)
        assert "could be started" in str(info.value)
        back()
        assert sup.async_(identity, 2).await_(60) == 2
        assert list(sup.stream_map(identity, range(50))) == list(range(50))
        assert sup.stats().workers_alive == 1


def test_a_start_failing_for_want_of_a_directory_starts_no_interpreter(tmp_path: Path) -> None:
    """The working directory is read before a worker's interpreter is started:
    a start that cannot read it leaves no process behind (none unreaped, none
    printing an EOFError traceback for start data it never got)."""
    me = psutil.Process()
    before = {c.pid for c in me.children()}
    with _in_a_deleted_directory(tmp_path) as back, parstream.Supervisor(max_workers=1) as sup:
        with pytest.raises(parstream.WorkerStartFailed):
            sup.async_(identity, 1).await_(60)
        started = []
        for child in me.children():
            if child.pid in before:
                continue
            try:
                if child.name() != "sh":  # the reaper; a failed start is a python
                    started.append((child.pid, child.name(), child.status()))
            except psutil.NoSuchProcess:
                pass
        assert started == []
        back()
        assert sup.async_(identity, 2).await_(60) == 2


def init_unless_flagged(flag: str) -> None:
    """An initializer that raises once ``flag`` exists (a file gone, say)."""
    if os.path.exists(flag):
        raise RuntimeError("the initializer is broken now")


def sleep_then_pid(x: int) -> int:
    time.sleep(0.05)
    return os.getpid()


def test_extra_workers_that_cannot_start_fail_no_work_the_live_ones_do(tmp_path: Path) -> None:
    """A stream asking for more workers than the pool had, whose new workers
    could not start: the queued items failed with WorkerStartFailed while two
    initialised workers sat idle (24-28 of 40), and a linked stream killed
    those workers, after which every call failed."""
    flag = str(tmp_path / "broken")
    with parstream.Supervisor(
        max_workers=2, initializer=init_unless_flagged, initargs=(flag,)
    ) as sup:
        assert len(set(sup.map(sleep_then_pid, range(8)))) >= 1  # two workers up
        Path(flag).touch()  # from now on, no new worker can start
        out = list(sup.async_stream_nolink(sleep_then_pid, range(40), max_concurrency=8))
        assert all(isinstance(r, Ok) for r in out), [r for r in out if not isinstance(r, Ok)][:3]
        assert len(list(sup.stream_map(sleep_then_pid, range(40), max_concurrency=8))) == 40
        assert sup.submit(identity, 5).result(timeout=30) == 5


GENERATION = "none"


def remember_generation(path: str) -> None:
    """A slow initializer that loads what is current when it runs."""
    global GENERATION
    GENERATION = Path(path).read_text()
    time.sleep(0.6)


def generation(_: object) -> str:
    return GENERATION


def test_restart_workers_while_the_initializer_runs_retires_that_worker(tmp_path: Path) -> None:
    """restart_workers() while a worker was still in its initializer (which
    had loaded the old code): it was only marked to retire after its next
    batch, and ran a task submitted after the restart with the old code."""
    path = tmp_path / "generation"
    path.write_text("old")
    with parstream.Supervisor(
        max_workers=1, initializer=remember_generation, initargs=(str(path),)
    ) as sup:
        time.sleep(0.3)  # the worker is inside its initializer, with "old"
        path.write_text("new")
        sup.restart_workers()
        assert sup.async_(generation, 0).await_(30) == "new"


# -- 3. the timeout covers loading the argument ---------------------------------------


def test_item_timeout_covers_unpickling_the_argument(sup: parstream.Supervisor) -> None:
    results = list(
        sup.async_stream_nolink(
            identity, [SlowToUnpickle(60), 1, 2], timeout=1.0, on_timeout="kill_task"
        )
    )
    assert isinstance(results[0], Exit)
    assert isinstance(results[0].reason, parstream.TaskTimeout)
    assert results[1:] == [Ok(1), Ok(2)]


# -- 4. a slow done-callback does not stall the pool ------------------------------------


def test_a_blocking_done_callback_does_not_hold_back_timeouts(sup: parstream.Supervisor) -> None:
    """The callback blocks until a timeout elsewhere has fired: on the hub it never would."""
    released = threading.Event()
    task = sup.async_nolink(identity, "x")

    def block(_: parstream.Task[Any]) -> None:
        released.wait(60)

    task.add_done_callback(block)
    wait_until(task.done, what="the task")
    hung = functools.partial(sleep_then, 30)
    out = list(sup.async_stream_nolink(hung, [0], timeout=0.3, on_timeout="kill_task"))
    released.set()
    assert isinstance(out[0], Exit)
    assert isinstance(out[0].reason, parstream.TaskTimeout)
    assert sup.async_(identity, 5).await_(30) == 5


def test_a_raising_done_callback_is_logged_and_others_run(
    sup: parstream.Supervisor, caplog: pytest.LogCaptureFixture
) -> None:
    seen: list[str] = []
    task = sup.async_nolink(sleep_then, 0.2, 1)

    def broken(_: Any) -> None:
        raise RuntimeError("broken callback")

    task.add_done_callback(broken)
    task.add_done_callback(lambda _: seen.append("second"))
    assert task.await_(30) == 1
    wait_until(lambda: seen == ["second"], what="the second callback")
    assert "broken callback" in caplog.text


# -- 5. an idle worker killed from outside -----------------------------------------------


def test_killing_an_idle_worker_fails_no_innocent_task() -> None:
    with parstream.Supervisor(max_workers=2) as sup:
        for _ in range(10):
            parstream.await_many([sup.async_(pid_of) for _ in range(8)], 60)
            wait_until(lambda: len(sup.worker_pids()) == 2, what="two workers")
            victim = sup.worker_pids()[0]
            os.kill(victim, signal.SIGKILL)
            tasks = [sup.async_(identity, i) for i in range(4)]
            assert [t.await_(60) for t in tasks] == [0, 1, 2, 3]
        assert sup.stats().tasks_crashed == 0


# -- 6. the give-up race ------------------------------------------------------------------


def test_give_up_is_visible_before_the_child_ends() -> None:
    for _ in range(5):
        sup = parstream.Supervisor(max_workers=1, max_restarts=0)
        try:
            child = sup.start_child(os._exit, 1, restart="permanent")
            assert child.wait(60) is not None
            with pytest.raises(parstream.SupervisorClosed, match="gave up"):
                sup.async_(identity, 1)
        finally:
            sup.close()


# -- 12. one way of shipping functions ------------------------------------------------------


def test_bound_method_holding_a_main_function_runs_everywhere() -> None:
    proc = run_script(
        """
        import parstream
        from _hostile import Holder

        def plus_one(x):
            return x + 1

        h = Holder(plus_one)
        with parstream.Supervisor(max_workers=2) as sup:
            assert sup.async_(h.apply, 1).await_(30) == 2
            assert sup.submit(h.apply, 2).result(30) == 3
            assert list(sup.stream_map(h.apply, [3, 4])) == [4, 5]
            assert list(parstream.map(h.apply, [5])) == [6]
        print("ok")
        """
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok"


# -- 13 and 14. nothing of the user's kept, nothing grows ------------------------------------


def test_bound_method_tasks_do_not_keep_their_instances(sup: parstream.Supervisor) -> None:
    refs = []
    for _ in range(5):
        holder = Holder(identity, b"x" * 10_000_000)
        assert sup.async_(holder.size).await_(30) == 10_000_000
        assert list(sup.stream_map(holder.size, [0])) == [10_000_000]
        refs.append(weakref.ref(holder))
        del holder
    gc.collect()
    assert all(r() is None for r in refs)


def test_kept_tasks_do_not_keep_their_arguments(sup: parstream.Supervisor) -> None:
    """Tasks kept in a list and awaited together hold their results, not the
    calls' functions and arguments, once they are done (or killed)."""
    holders = [Holder(identity, b"x" * 1000) for _ in range(12)]
    refs = [weakref.ref(h) for h in holders]
    tasks = [sup.async_(h.size) for h in holders[:4]]
    tasks += [sup.async_nolink(Holder.size, h) for h in holders[4:8]]
    assert parstream.await_many(tasks, 30) == [1000] * 8
    slow = [sup.async_(sleep_then, 30, h) for h in holders[8:]]
    for task in slow:
        assert task.shutdown(parstream.BRUTAL_KILL) is None
    del holders
    gc.collect()
    assert [r() for r in refs] == [None] * 12
    assert len(tasks) + len(slow) == 12  # still kept


def test_finished_children_are_not_kept(sup: parstream.Supervisor) -> None:
    # Checked right after each wait(): the thread that ran the child's end
    # must hold no reference to it once wait() has returned.
    kept = 0
    for i in range(150):
        child = sup.start_child(identity, i)
        assert child.wait(30) == Ok(i)
        ref = weakref.ref(child)
        del child
        gc.collect()
        kept += ref() is not None
    assert sup.children() == []
    assert kept == 0


def test_ended_children_keep_no_call(sup: parstream.Supervisor) -> None:
    """A child kept after it ended (or was terminated) lets go of its call."""
    holders = [Holder(identity, b"x") for _ in range(2)]
    refs = [weakref.ref(h) for h in holders]
    child = sup.start_child(holders[0].size, restart="transient")
    assert child.wait(30) == Ok(1)
    other = sup.start_child(sleep_then, 30, holders[1], restart="permanent")
    assert sup.terminate_child(other)
    del holders
    gc.collect()
    assert [r() for r in refs] == [None, None]  # both children still kept


def test_a_stream_ended_or_raised_keeps_no_input(sup: parstream.Supervisor) -> None:
    """A finished or closed stream, or the exception a failed map raised, kept
    by the caller, does not keep the stream's function and input alive."""
    holders = [Holder(identity, b"x" * n) for n in range(40)]
    refs = [weakref.ref(h) for h in holders]
    method_owner = Holder(identity)
    refs.append(weakref.ref(method_owner))
    done = sup.async_stream(method_owner.size, holders[:20])
    assert len(list(done)) == 20
    closed = sup.async_stream(identity, holders)
    next(closed)
    closed.close()
    with pytest.raises(ValueError, match="item 3") as raised:
        list(sup.stream_map(fail_on_three, holders[:20]))
    del holders, method_owner
    # The traceback's frames held chunks; a worker killed at the close may
    # hold its batch a moment longer, until its death is seen.
    wait_until(
        lambda: gc.collect() >= 0 and all(r() is None for r in refs),
        what="the streams' inputs and function to be freed",
    )
    assert done.chunksize > 0  # still kept
    assert closed.chunksize > 0  # still kept
    assert isinstance(raised.value, ValueError)  # and the exception


def test_timed_waits_do_not_pile_up_on_a_task(sup: parstream.Supervisor) -> None:
    """Each timed-out yield_many takes its wake-up back from the task, as
    concurrent.futures.wait does: twenty of them leave none behind."""
    task = sup.async_nolink(sleep_then, 30, None)
    for _ in range(20):
        parstream.yield_many([task], timeout=0.01)
    assert task._waiters == []
    task.shutdown(parstream.BRUTAL_KILL)


def test_a_worker_drops_a_by_value_function_once_its_calls_end() -> None:
    """A bound method's copies (one per call) do not pile up in the worker."""
    with parstream.Supervisor(max_workers=1) as sup:
        holder = Holder(identity, b"x" * 1000)
        for _ in range(10):
            assert sup.async_(holder.size).await_(30) == 1000
        # Each call shipped a copy of the holder; the worker keeps none of the
        # ended ones (it kept up to 32 of them).
        assert sup.async_(count_instances, "Holder").await_(30) <= 1


def test_supervisors_leave_no_descriptors_behind() -> None:
    """Opening and closing supervisors does not grow the open descriptors."""
    if not os.path.isdir("/proc/self/fd"):
        pytest.skip("needs /proc")

    def fds() -> int:
        return len(os.listdir("/proc/self/fd"))

    with parstream.Supervisor(max_workers=1) as sup:
        sup.async_(identity, 1).await_(30)
    before = fds()
    for _ in range(5):
        with parstream.Supervisor(max_workers=1) as sup:
            sup.async_(identity, 1).await_(30)
        parstream.Supervisor(max_workers=1).close()
    # Each one left two (its hub's wake-up pipe) for good.
    wait_until(lambda: fds() <= before, what="the supervisors' descriptors closed")


# -- exactly once under a crash inside a batch ----------------------------------------------


@pytest.mark.parametrize("run", range(4))
def test_a_crash_inside_a_batch_runs_nothing_twice(tmp_path: Path, run: int) -> None:
    """Each item appends its index; the culprit crashes; nothing runs twice, and
    every item that had not started runs once."""
    log = tmp_path / "ran.log"
    n, culprit = 30_000, 7_000 + 3_001 * run
    fn = functools.partial(append_index, str(log), culprit)
    with parstream.Supervisor(max_workers=2) as sup:
        results = list(sup.async_stream_nolink(fn, range(n)))
    assert len(results) == n
    counts = Counter(int(x) for x in log.read_text().split())
    assert max(counts.values()) == 1, "an item ran twice"
    assert culprit not in counts
    bad = results[culprit]
    assert isinstance(bad, Exit)
    assert isinstance(bad.reason, parstream.WorkerCrashed)
    for i, r in enumerate(results):
        if i == culprit:
            continue
        assert counts[i] == 1, f"item {i} never ran"
        assert r == Ok(i)  # journaled: a finished item's result survives the crash


def test_a_late_hub_does_not_kill_for_an_item_that_finished(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The hub reads item 0's reply late (as when another thread holds the
    GIL), after its deadline and after the worker began item 1: the kill for
    item 0's timeout used to requeue item 1, which then ran twice. Item 0 is
    Ok, item 1 (1 s) times out, and each ran once."""
    from parstream._backends.local import _pool

    read_one = _pool.LocalPool._read_one
    late = threading.Event()

    def late_read_one(self: Any, worker: Any) -> Any:
        started = worker.item_started
        if (
            not late.is_set()
            and worker.job is not None
            and worker.job.timeout is not None
            and worker.items_done == 0
            and started is not None
            and time.monotonic() > started + 0.02  # item 0's reply, not its start
        ):
            late.set()
            time.sleep(0.1)  # past item 0's deadline, and into item 1
            return True  # the reply stays unread this turn
        return read_one(self, worker)

    monkeypatch.setattr(_pool.LocalPool, "_read_one", late_read_one)
    log = tmp_path / "ran.log"
    fn = functools.partial(append_then_sleep, str(log))
    with parstream.Supervisor(max_workers=1) as sup:
        out = list(
            sup.async_stream_nolink(
                fn, [(0, 0.03), (1, 1.0)], timeout=0.045, on_timeout="kill_task", chunksize=2
            )
        )
    assert late.is_set()
    assert out[0] == Ok(0)
    assert isinstance(out[1], Exit)
    assert isinstance(out[1].reason, parstream.TaskTimeout)
    assert Counter(log.read_text().split()) == {"0": 1, "1": 1}


def test_a_busy_worker_killed_from_outside_blames_only_its_item(tmp_path: Path) -> None:
    with parstream.Supervisor(max_workers=2) as sup:
        stream = sup.async_stream_nolink(functools.partial(sleep_then, 0.05), range(40))
        results = []
        for i, r in enumerate(stream):
            results.append(r)
            if i == 5:
                busy = [p for p in sup.worker_pids() if psutil.pid_exists(p)]
                os.kill(busy[0], signal.SIGKILL)
        crashed = [i for i, r in enumerate(results) if isinstance(r, Exit)]
        assert len(results) == 40
        assert len(crashed) <= 1
        assert all(r == Ok(i) for i, r in enumerate(results) if i not in crashed)


def test_journaled_failures_survive_a_later_crash(tmp_path: Path) -> None:
    """Exceptions raised by batch-mates before a crash come back as themselves."""
    log = tmp_path / "ran.log"
    culprit = 4_321
    fn = functools.partial(_hostile.append_raise_or_crash, str(log), culprit)
    with parstream.Supervisor(max_workers=2) as sup:
        results = list(sup.async_stream_nolink(fn, range(10_000)))
    counts = Counter(int(x) for x in log.read_text().split())
    assert max(counts.values()) == 1
    assert len(counts) == 9_999
    for i, r in enumerate(results):
        if i == culprit:
            assert isinstance(r, Exit)
            assert isinstance(r.reason, parstream.WorkerCrashed)
        elif i % 10 == 7:
            assert isinstance(r, Exit)
            assert isinstance(r.reason, ValueError)
            assert str(r.reason) == f"item {i} refuses"
        else:
            assert r == Ok(i)


def test_single_write_items_run_exactly_once_under_a_crash(tmp_path: Path) -> None:
    """Items whose whole work is one write() are still journaled: only the culprit fails."""
    log = tmp_path / "ran.log"
    culprit = 15_000
    fn = functools.partial(_hostile.write_index, str(log), culprit)
    with parstream.Supervisor(max_workers=2) as sup:
        results = list(sup.async_stream_nolink(fn, range(40_000)))
    counts = Counter(int(x) for x in log.read_text().split())
    assert max(counts.values()) == 1
    assert len(counts) == 39_999
    assert [i for i, r in enumerate(results) if isinstance(r, Exit)] == [culprit]


class InterruptsPickling:
    """An argument whose pickling is cut by Ctrl-C (as a big one's often is)."""

    def __reduce__(self) -> Any:
        raise KeyboardInterrupt


def test_ctrl_c_while_submit_pickles_arguments_raises_and_leaves_no_worker_stuck() -> None:
    """Ctrl-C landing while a call's arguments are pickled (in the caller's
    thread) used to become that item's PicklingError, and a Ctrl-C between
    encoding and writing left its worker busy for ever with a batch it never
    got. Now the interrupt propagates and the next call is served."""
    with parstream.Supervisor(max_workers=1) as sup:
        assert sup.async_(abs, -1).await_(timeout=30) == 1  # the worker idle: sent from here
        with pytest.raises(KeyboardInterrupt):
            sup.async_(repr, InterruptsPickling())
        assert sup.async_(abs, -3).await_(timeout=30) == 3


# -- a map closed from another thread -----------------------------------------------------


@pytest.mark.parametrize("method", ["stream_map", "map"])
def test_a_map_closed_from_another_thread_stops_like_a_stream(method: str) -> None:
    """``close()`` on a map (``stream_map``, ``Supervisor.map``) whose ``next()``
    another thread is blocked in (as an ``async for`` being cancelled is) used
    to raise ``ValueError: generator already executing`` and leave every item
    running; now, as for a Stream,
    it kills the running items and the iterating thread's loop ends."""
    with parstream.Supervisor(max_workers=2) as sup:
        results = getattr(sup, method)(_sleep_for, [60.0] * 4, chunksize=1)
        started = threading.Event()
        ended: list[object] = []

        def consume() -> None:
            started.set()
            try:
                ended.append(list(results))
            except BaseException as exc:
                ended.append(exc)

        thread = threading.Thread(target=consume, daemon=True)
        thread.start()
        started.wait()
        wait_until(lambda: any(w.busy for w in sup.workers()), what="an item running")
        results.close()
        thread.join(30)
        assert not thread.is_alive()
        assert ended == [[]]
        wait_until(lambda: not any(w.busy for w in sup.workers()), what="the items' kill")


def test_cancelling_async_for_over_a_map_kills_its_items() -> None:
    """Cancelling an ``async for`` over ``stream_map`` raised ``ValueError`` in
    place of ``CancelledError`` and left the items running."""
    import asyncio

    with parstream.Supervisor(max_workers=2) as sup:

        async def consume() -> None:
            async for _ in sup.stream_map(_sleep_for, [60.0] * 4, chunksize=1):
                pass

        async def main() -> BaseException | None:
            task = asyncio.create_task(consume())
            while not any(w.busy for w in sup.workers()):
                await asyncio.sleep(0.01)
            task.cancel()
            try:
                await task
            except BaseException as exc:
                return exc
            return None

        assert isinstance(asyncio.run(main()), asyncio.CancelledError)
        wait_until(lambda: not any(w.busy for w in sup.workers()), what="the items' kill")


# -- Ctrl-C while a Supervisor is being made -------------------------------------------------


def test_ctrl_c_while_a_supervisor_starts_leaves_no_pool_behind() -> None:
    """Ctrl-C landing anywhere in ``Supervisor()`` (its pool half made: hub
    thread and workers started) or in the finaliser of a dropped one: once
    no Supervisor is left, no worker process nor hub thread is. (They were
    kept for the life of the process: 142 workers after 60 tries.)"""
    proc = run_script(
        """
        import gc, os, signal, threading, time
        import psutil
        import parstream, parstream._executor, parstream._task, parstream._children
        import parstream._backends.local._pool  # (imported: Supervisor() is quick)

        landed = 0
        sup = None
        for i in range(40):
            timer = threading.Timer(0.0005 * (i % 20), os.kill, (os.getpid(), signal.SIGINT))
            try:
                timer.start()
                sup = parstream.Supervisor(max_workers=2)
                time.sleep(0.05)
                sup.shutdown()
            except KeyboardInterrupt:
                landed += 1
            timer.join()
            time.sleep(0.02)
        del sup
        gc.collect()

        def workers_alive():
            found = []
            for p in psutil.Process().children():
                try:
                    if "boot" in " ".join(p.cmdline()) and p.status() != psutil.STATUS_ZOMBIE:
                        found.append(p)
                except psutil.Error:  # gone, or a zombie not yet reaped
                    pass
            return found

        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            workers = workers_alive()
            hubs = [t for t in threading.enumerate() if t.name == "parstream-hub"]
            if not workers and not hubs:
                break
            time.sleep(0.1)
        print("landed", landed, "workers", len(workers), "hubs", len(hubs))
        """,
        timeout=110,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    words = proc.stdout.split()
    assert int(words[1]) > 0, proc.stdout  # some Ctrl-Cs did land
    assert words[2:] == ["workers", "0", "hubs", "0"], proc.stdout + proc.stderr[-2000:]


def test_a_script_ended_by_ctrl_c_dies_by_sigint() -> None:
    """A script that used parstream and ends by an unhandled Ctrl-C dies by
    SIGINT, as Python does (a shell loop running it stops). Closing the pool
    at exit imported psutil, whose exec() made CPython forget the Ctrl-C:
    it exited with status 1."""
    proc = run_script(
        """
        import parstream
        assert list(parstream.map(abs, range(-3, 0))) == [3, 2, 1]
        raise KeyboardInterrupt
        """
    )
    assert proc.returncode == -signal.SIGINT, (proc.returncode, proc.stderr[-2000:])
    assert "KeyboardInterrupt" in proc.stderr


# -- tasks that raise what the item loop itself uses ------------------------------


def stop_at(x: int) -> int:
    if x == 15_000:
        raise StopIteration(f"item {x} gave up")
    return x


def test_a_tiny_item_raising_stop_iteration_fails_alone() -> None:
    """A StopIteration from a task among tiny items (run a step at a time from
    C, where it ended the step as if its input had) fails that item alone,
    as a slow item's does: no result shifted or duplicated, no hang."""
    n = 20_000
    with pytest.raises(RuntimeError) as caught:
        list(parstream.map(stop_at, range(n)))
    assert isinstance(caught.value.__cause__, StopIteration)
    with parstream.Supervisor(max_workers=2) as sup:
        for chunksize in (None, 5_000):
            out = list(sup.async_stream_nolink(stop_at, range(n), chunksize=chunksize))
            assert len(out) == n
            bad = [i for i, r in enumerate(out) if isinstance(r, Exit)]
            assert bad == [15_000]
            failed = out[15_000]
            assert isinstance(failed, Exit)
            assert "gave up" in str(failed.reason)
            assert all(r == Ok(i) for i, r in enumerate(out) if i != 15_000)


class RefusesToTravel:
    def __reduce__(self) -> Any:
        raise SystemExit("this object refuses to be pickled")


def refusing_every_500(x: int) -> Any:
    return RefusesToTravel() if x % 500 == 0 else x


def test_a_result_whose_pickling_raises_a_base_exception_fails_alone() -> None:
    """A result whose ``__reduce__`` raises SystemExit fails its item alone;
    journaling it took two positions (every later result shifted) or killed
    the worker."""
    n = 20_000
    out = list(parstream.async_stream_nolink(refusing_every_500, range(n)))
    assert len(out) == n
    assert [i for i, r in enumerate(out) if isinstance(r, Exit)] == list(range(0, n, 500))
    assert all(r == Ok(i) for i, r in enumerate(out) if i % 500)


def generator_exit_at_five(x: int) -> int:
    if x == 5:
        raise GeneratorExit("task 5 failed")
    return x


def test_a_tasks_generator_exit_fails_a_linked_stream_for_good() -> None:
    """A linked stream failed by a task's GeneratorExit raises it again at
    every later next(), as for any other failure; it ended quietly."""
    stream = parstream.async_stream(generator_exit_at_five, range(50), chunksize=1)
    with pytest.raises(GeneratorExit):
        list(stream)
    for _ in range(2):
        with pytest.raises(GeneratorExit):
            next(stream)
    stream.close()


def test_a_program_holding_over_1024_descriptors_can_use_a_pool() -> None:
    """``select()`` refuses descriptors numbered 1024 or more: the hub crashed."""
    proc = run_script(
        """
        import os, resource, parstream
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft < 1300 and (hard == resource.RLIM_INFINITY or hard >= 1300):
            resource.setrlimit(resource.RLIMIT_NOFILE, (1300, hard))
        keep = [os.open(os.devnull, os.O_RDONLY) for _ in range(1100)]
        print(list(parstream.map(abs, [-1, -2, -3])))
        with parstream.Supervisor(max_workers=2) as sup:
            print(sup.async_(abs, -4).await_(30), list(sup.map(abs, range(-3, 0))))
        """
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split("\n")[:2] == ["[1, 2, 3]", "4 [3, 2, 1]"], proc.stdout


def test_leaving_a_stream_without_a_free_descriptor_still_kills_its_items() -> None:
    """Killing a running item reads /proc to find what the task started;
    with no free descriptor (EMFILE) that failed, psutil's error reached the
    caller from ``close()``, and the worker, stopped before the lookup, was
    left stopped for good, still counted as serving (the next map waited
    ~30 s). Now the worker and its group are killed all the same (found by
    the shared-memory hunt)."""
    proc = run_script(
        """
        import os, resource, time, psutil, parstream

        def slow(seconds):
            time.sleep(seconds)
            return seconds

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(soft, 512), hard))
        with parstream.Supervisor(max_workers=2) as sup:
            stream = sup.stream_map(slow, [0, 30, 30], chunksize=1)
            assert next(stream) == 0
            time.sleep(0.5)  # both slow items running
            hog = []
            try:
                while True:
                    hog.append(os.open(os.devnull, os.O_RDONLY))
            except OSError:
                pass
            try:
                stream.close()
                print("closed")
            except Exception as exc:
                print("close raised", repr(exc))
            for fd in hog:
                os.close(fd)
            stopped = []
            for p in psutil.Process().children(recursive=True):
                try:  # (a killed worker may be reaped meanwhile)
                    if p.status() == psutil.STATUS_STOPPED:
                        stopped.append(p.pid)
                except psutil.NoSuchProcess:
                    pass
            print("stopped", stopped)
            print(list(sup.map(slow, [0.05] * 4, chunksize=1, timeout=20)))
        """
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split("\n")[:3] == ["closed", "stopped []", "[0.05, 0.05, 0.05, 0.05]"], (
        proc.stdout,
        proc.stderr[-3000:],
    )


@pytest.mark.parametrize("method", ["spawn", "forkserver"])
def test_a_spawn_child_of_multiprocessing_can_map_its_main_scripts_functions(
    tmp_path: Path, method: str
) -> None:
    """In a spawn or forkserver child the main script is loaded again as
    ``__mp_main__``; its functions were sent by reference to a module our
    workers lack (ModuleNotFoundError: '__mp_main__'), where the same nesting
    with ProcessPoolExecutor works. They go by value, as ``__main__``'s do
    (found by the nesting hunt)."""
    script = tmp_path / "nested_main.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import multiprocessing as mp
            from concurrent.futures import ProcessPoolExecutor
            import parstream

            class Box:
                def __init__(self, x):
                    self.x = x

            def square(x):
                return x * x

            def unbox(box):
                return box.x

            def nested(n):
                return (
                    list(parstream.map(square, range(n))),
                    parstream.async_(unbox, Box(7)).await_(30),
                )

            if __name__ == "__main__":
                ctx = mp.get_context({method!r})
                with ProcessPoolExecutor(1, mp_context=ctx) as outer:
                    print(outer.submit(nested, 4).result(timeout=60))
            """
        )
    )
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    proc = subprocess.run(
        [sys.executable, str(script)],
        capture_output=True,
        text=True,
        timeout=90,
        env=env,
        cwd=tmp_path,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "([0, 1, 4, 9], 7)", proc.stderr[-3000:]


def test_lines_printed_at_once_by_two_workers_stay_whole() -> None:
    """Workers ran unbuffered (PYTHONUNBUFFERED=1, set for them): print wrote
    the text and the newline apart, and two workers' lines merged ('worker 0
    says hiworker 1 says hi'). They are line-buffered now, and the variable,
    which tasks and what they start saw, is no longer set."""
    code = textwrap.dedent(
        """
        import os, sys, time
        import parstream

        def hello(args):
            x, t0 = args
            while time.time() < t0:
                pass
            print(f"worker {x} says hello")
            return os.environ.get("PYTHONUNBUFFERED")

        if __name__ == "__main__":
            seen = set()
            for _ in range(15):
                t0 = time.time() + 0.1
                seen.update(parstream.map(hello, [(0, t0), (1, t0)], chunksize=1))
            print("env", seen, file=sys.stderr)
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=90, env=env
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert len(lines) == 30
    assert set(lines) == {"worker 0 says hello", "worker 1 says hello"}, lines
    assert "env {None}" in proc.stderr


def fork_and_return_in_both(x: int) -> int:
    if x in (3, 500):
        return -1 if os.fork() == 0 else x
    if x < 10:
        time.sleep(0.01)
    return x


def test_a_process_a_task_forks_does_not_carry_on_as_a_worker() -> None:
    """A task that forks and returns in the child too: the child went on as
    a second worker on the same pipe (its result credited to a later item,
    later values shifted, then 'a function was never sent to this worker').
    It exits as the task returns there, as multiprocessing's fork children do."""
    with parstream.Supervisor(max_workers=2) as sup:
        out = list(sup.async_stream_nolink(fork_and_return_in_both, range(10), chunksize=1))
        assert out == [Ok(i) for i in range(10)]
        assert list(sup.map(fork_and_return_in_both, range(2000))) == list(range(2000))
        assert sup.async_(fork_and_return_in_both, 3).await_(30) == 3
        assert list(sup.map(abs, range(-5, 0))) == [5, 4, 3, 2, 1]


def test_an_interrupt_inside_closing_a_pool_leaves_nothing_behind() -> None:
    """A KeyboardInterrupt landing inside the pool's close, between its
    kills: the pool counted as closed, so the close that followed did
    nothing, and its workers, hub thread and reaper lived as long as the
    process. (Raised where a real signal would land, by a trace function.)"""
    proc = run_script(
        """
        import gc, sys, threading, time, psutil, parstream

        def sq(x):
            return x * x

        def ctrl_c_in_a_kill(frame, event, arg):
            if event == "call" and frame.f_code.co_name == "kill_tree":
                sys.settrace(None)
                raise KeyboardInterrupt

        try:
            with parstream.Supervisor(max_workers=2) as sup:
                assert list(sup.stream_map(sq, range(5))) == [0, 1, 4, 9, 16]
                sys.settrace(ctrl_c_in_a_kill)
        except KeyboardInterrupt:
            pass
        sys.settrace(None)
        del sup
        gc.collect()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            left = psutil.Process().children(recursive=True)
            hubs = [t for t in threading.enumerate() if t.name == "parstream-hub"]
            if not left and not hubs:
                break
            time.sleep(0.1)
        print("children", len(left), "hubs", len(hubs))
        """
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["children", "0", "hubs", "0"], proc.stdout


def test_a_close_that_outwaits_a_slow_hub_leaves_the_workers_to_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``close()`` waits a while for the hub, then returns. A hub still
    settling its workers' deaths (a loaded machine) owns their pipes,
    sentinels and slots: the closing thread used to reap the workers and
    close their sentinels and the arena meanwhile, so numbers were closed
    twice, after new pipes of other pools had reused them (EBADF in a
    worker start, a crashed hub, results crossed between pools). The hub
    now finishes the close itself as it leaves."""
    from parstream._backends.local import _pool

    monkeypatch.setattr(_pool, "HUB_EXIT_WAIT_S", 0.05, raising=False)
    on_death = _pool.LocalPool._on_death
    entered = threading.Event()
    go_on = threading.Event()

    def slow_on_death(self: Any, worker: Any) -> None:
        entered.set()
        go_on.wait(10)
        on_death(self, worker)

    monkeypatch.setattr(_pool.LocalPool, "_on_death", slow_on_death)
    sup = parstream.Supervisor(max_workers=2)
    assert list(sup.map(abs, range(-4, 0))) == [4, 3, 2, 1]
    pool: Any = sup._backend
    workers = list(pool._workers)
    try:
        sup.close()
        assert entered.wait(5)
        # The closing thread touched nothing of what the stalled hub settles.
        assert all(w.process.sentinel >= 0 for w in workers)
        assert not pool._arena._closed
    finally:
        go_on.set()
    wait_until(lambda: not pool._hub.is_alive(), 15, "the hub to leave")
    assert all(w.process.sentinel == -1 and w.process.reaped for w in workers)
    assert pool._arena._closed
    assert pool._close_done


def test_closing_a_block_or_a_slot_twice_leaves_a_reused_number_open() -> None:
    """A second close of an arena block or a progress slot (threads racing to
    close) must not close the file that took its number meanwhile."""
    from parstream._backends.local._shm import Block
    from parstream._backends.local._slot import new_slot

    things: list[Any] = [Block(1, 4096), new_slot()]
    for thing in things:
        if thing is None:
            continue  # no memfd here: no slot
        number = thing.fd
        thing.close()
        other = os.open(os.devnull, os.O_RDONLY)
        try:
            os.dup2(other, number)  # another file takes the number
            thing.close()
            os.fstat(number)  # still open
        finally:
            for fd in {other, number}:
                with contextlib.suppress(OSError):
                    os.close(fd)


def test_asking_for_a_tasks_worker_as_it_dies(monkeypatch: pytest.MonkeyPatch) -> None:
    """``Task.worker`` (and ``Future.running()`` before the hub has marked a
    call running) read the worker's progress slot from the caller's thread;
    the hub closes that slot while it settles the worker's death, and the
    read raised ``ValueError: operation forbidden on released memoryview
    object`` into the caller."""
    from parstream._backends.local import _slot

    close = _slot.Slot.close
    closed = threading.Event()
    go_on = threading.Event()

    def stalling_close(self: Any) -> None:
        close(self)
        if threading.current_thread().name == "parstream-hub" and not closed.is_set():
            closed.set()
            go_on.wait(10)  # the hub pauses with the slot closed, the death unsettled

    monkeypatch.setattr(_slot.Slot, "close", stalling_close)
    with parstream.Supervisor(max_workers=1) as sup:
        task = sup.async_nolink(time.sleep, 30)
        wait_until(lambda: task.worker is not None, 10, "the task to run")
        pid = task.pid
        assert pid is not None
        try:
            os.kill(pid, signal.SIGKILL)
            assert closed.wait(10)
            assert task.worker is None
        finally:
            go_on.set()
        outcome = task.yield_(10)
        assert isinstance(outcome, Exit)
        assert isinstance(outcome.reason, parstream.WorkerCrashed)


def test_a_close_run_on_the_hub_thread_ends_the_pool(monkeypatch: pytest.MonkeyPatch) -> None:
    """A close that runs on the hub thread (a finaliser the collector runs
    there) reaped the workers before the hub had seen them die: it never
    settled their deaths, spun on their dead pipes, and the running call
    never ended. The hub now finishes the close itself."""
    from parstream._backends.local import _pool

    check = _pool.LocalPool._check_deadlines
    wanted = threading.Event()
    closed = threading.Event()

    def closing_check(self: Any) -> None:
        if wanted.is_set() and not closed.is_set():
            closed.set()
            self.close()
        check(self)

    monkeypatch.setattr(_pool.LocalPool, "_check_deadlines", closing_check)
    sup = parstream.Supervisor(max_workers=2)
    try:
        fut = sup.submit(time.sleep, 30)
        wait_until(fut.running, 10, "the call to run")
        pool: Any = sup._backend
        wanted.set()
        pool._wake()
        assert closed.wait(10)
        wait_until(lambda: not pool._hub.is_alive(), 15, "the hub to leave")
        assert pool._close_done
        assert fut.exception(timeout=10) is not None
    finally:
        wanted.clear()
        sup.close()


def test_a_fork_while_another_thread_closes_a_block_does_not_hang_the_child() -> None:
    """The child of ``os.fork()`` closes its copies of the pool's arena blocks
    and wake pipe; a lock another thread held at the fork (closing a block,
    waking the hub) hung the child in ``fork()`` itself."""
    np = pytest.importorskip("numpy")
    from parstream._backends.local import _shm

    with parstream.Supervisor(max_workers=1) as sup:
        assert sup.submit(np.sum, np.ones(1 << 20)).result(timeout=30) == 1 << 20
        pool: Any = sup._backend
        locks = [
            getattr(_shm, "_BLOCK_CLOSE", None),
            pool._arena._lock,
            getattr(pool._wake_w, "_lock", None),
        ]
        held_here = [lock for lock in locks if lock is not None and lock.acquire(timeout=5)]
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)  # fork with threads
                pid = os.fork()
            if pid == 0:  # pragma: no cover - the child
                os._exit(0)
        finally:
            for lock in held_here:
                lock.release()
        deadline = time.monotonic() + 10
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            if time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                pytest.fail("the forked child hung")
            time.sleep(0.01)
        assert os.waitstatus_to_exitcode(status) == 0


def test_a_crashed_hub_leaves_no_group_with_the_reaper(monkeypatch: pytest.MonkeyPatch) -> None:
    """Workers whose deaths a crashed hub never settled were reaped by the
    close with their process groups still on the shared reaper's list: had
    the parent died later, it would have killed groups of that number,
    which by then could be anyone's."""
    from parstream._backends.local import _pool, _reaper

    def broken_on_death(self: Any, worker: Any) -> None:
        raise RuntimeError("a bug in the hub")

    with parstream.Supervisor(max_workers=1) as keep:  # keeps the reaper running
        assert keep.submit(abs, -1).result(timeout=30) == 1
        sup = parstream.Supervisor(max_workers=2)
        fut = sup.submit(time.sleep, 30)
        wait_until(fut.running, 10, "the call to run")
        pids = set(sup.worker_pids())
        assert pids & _reaper._groups
        monkeypatch.setattr(_pool.LocalPool, "_on_death", broken_on_death)
        sup.close()
        pool: Any = sup._backend
        wait_until(lambda: not pool._hub.is_alive(), 15, "the hub to leave")
        assert pool._close_done
        assert not pids & _reaper._groups
        monkeypatch.undo()


FORK_DURING_FIRST_CALL = """
import importlib.machinery, os, signal, sys, threading, time
import parstream

inside = threading.Event()


class SlowLoader:
    def __init__(self, loader):
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        inside.set()
        time.sleep(0.5)  # the first call's import, which the fork lands in
        self.loader.exec_module(module)


class SlowFinder:
    def find_spec(self, name, path=None, target=None):
        if name != "parstream._api":
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        spec.loader = SlowLoader(spec.loader)
        return spec


sys.meta_path.insert(0, SlowFinder())


def first_call():
    assert list(parstream.map(abs, [-1, -2])) == [1, 2]


thread = threading.Thread(target=first_call)
thread.start()
assert inside.wait(30)
pid = os.fork()
if pid == 0:
    signal.alarm(30)
    ok = list(parstream.map(abs, range(-5, 0))) == [5, 4, 3, 2, 1]
    parstream.default_supervisor().close()
    os._exit(0 if ok else 3)
thread.join(60)
parstream.default_supervisor().close()
print("child", os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))
"""


def test_a_fork_during_another_threads_first_call_does_not_hang_the_child() -> None:
    """parstream imports its engine on first use. A thread's first
    ``parstream.map``, caught half-way through those imports by the main
    thread's ``os.fork()``, left their module locks held in the child by a
    thread that does not exist there: the child's own first call hung for
    good. A fork now waits for other threads' imports to end."""
    proc = subprocess.run(
        [sys.executable, "-W", "ignore::DeprecationWarning", "-c", FORK_DURING_FIRST_CALL],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "child 0", (proc.stdout, proc.stderr)  # not -14: SIGALRM


FORK_DURING_AN_IMPORT_THAT_LOGS = """
import os, sys, threading, time
sys.path.insert(0, sys.argv[1])
import parstream
import logging  # imported after parstream: its before-fork hook registered later

started = threading.Event()
thread = threading.Thread(target=lambda: (started.set(), __import__("slow_logging_module")))
thread.start()
started.wait(10)
time.sleep(0.1)  # the import is under way
pid = os.fork()
if pid == 0:
    module = sys.modules.get("slow_logging_module")
    os._exit(0 if getattr(module, "log", None) is not None else 1)
thread.join(30)
print("child", os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))
"""


def test_a_fork_waits_for_an_import_that_logs(tmp_path: Path) -> None:
    """The wait for other threads' imports runs before logging's own
    before-fork hook, which takes logging's lock: the other way round, an
    import that calls ``logging.getLogger`` (most do) waited for the forking
    thread, which waited for it, and every such fork stalled for the whole
    bound and left the child a half-imported module."""
    (tmp_path / "slow_logging_module.py").write_text(
        "import logging, time\ntime.sleep(0.5)\nlog = logging.getLogger(__name__)\n"
    )
    proc = subprocess.run(
        [
            sys.executable,
            "-W",
            "ignore::DeprecationWarning",
            "-c",
            FORK_DURING_AN_IMPORT_THAT_LOGS,
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "child 0", (proc.stdout, proc.stderr)


@pytest.mark.parametrize("fd", [1, 2], ids=["stdout", "stderr"])
def test_a_script_run_with_its_output_closed_gets_its_results(tmp_path: Path, fd: int) -> None:
    """A script started with stdout (``>&-``) or stderr closed: the pool's
    first pipe or memfd took the free number, a worker started with its
    progress slot as that descriptor, and a task writing to it (``os.write``,
    a C library's ``printf``) overwrote the slot. The pool took each worker
    for confused, killed it and started another, for ever. Now the closed
    descriptor is ``/dev/null``, where the task's output goes, as it went
    nowhere before."""
    report = tmp_path / "report"
    code = textwrap.dedent(
        f"""
        import os, sys
        import parstream

        def task(x):
            os.write({fd}, b"hello from the task\\n")
            return x

        def where(_):
            return os.readlink("/proc/self/fd/{fd}")

        out = list(parstream.map(task, range(40), timeout=30))
        seen = parstream.async_(where, 0).await_(30)
        with open(sys.argv[1], "w") as f:
            f.write(repr((out, seen)))
        """
    )
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    proc = subprocess.run(
        ["sh", "-c", f'exec "$0" -c "$1" "$2" {fd}>&-', sys.executable, code, str(report)],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        check=False,
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    assert "internal error" not in proc.stdout + proc.stderr
    out, seen = eval(report.read_text())  # a repr of a list and a str
    assert out == list(range(40))
    assert seen == os.devnull
