"""The fault table: one bad task among innocent ones, on a shared 2-worker supervisor (issue 2)."""

from __future__ import annotations

import ctypes
import math
import os
import signal
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from _util import gone, wait_until

import parstream

if TYPE_CHECKING:
    from collections.abc import Callable

# -- functions run as tasks --------------------------------------------------------


def _wait_for(go: str) -> None:
    while not os.path.exists(go):
        time.sleep(0.005)


def raise_in_task(go: str) -> None:
    _wait_for(go)
    raise ValueError("faulty task raised")


def exit_three(go: str) -> None:
    _wait_for(go)
    os._exit(3)


def segfault(go: str) -> None:
    _wait_for(go)
    ctypes.string_at(0)


def sleep_long(go: str) -> None:
    time.sleep(30)


def innocent(directory: str, task_id: str, seconds: float) -> str:
    """Record one execution as a file named (task id, pid, nonce), then return a marker."""
    Path(directory, f"{task_id}-{os.getpid()}-{uuid.uuid4().hex}").touch()
    time.sleep(seconds)
    return f"marker-{task_id}"


def pid_after(seconds: float) -> int:
    time.sleep(seconds)
    return os.getpid()


# -- the table ------------------------------------------------------------------------

# fault: (function, expected exception, expected exit code, outcome counter)
FAULTS: dict[str, tuple[Callable[[str], None], type[BaseException], int | None, str]] = {
    "raise": (raise_in_task, ValueError, None, "tasks_failed"),
    "os._exit(3)": (exit_three, parstream.WorkerCrashed, 3, "tasks_crashed"),
    "segfault": (segfault, parstream.WorkerCrashed, -signal.SIGSEGV, "tasks_crashed"),
    "sigkill": (sleep_long, parstream.WorkerCrashed, -signal.SIGKILL, "tasks_crashed"),
    "hang": (sleep_long, parstream.TaskTimeout, None, "tasks_timed_out"),
}
COUNTERS = ("tasks_failed", "tasks_crashed", "tasks_timed_out", "tasks_killed")


@pytest.mark.parametrize("fault", list(FAULTS))
def test_fault_fails_only_its_task(fault: str, tmp_path: Path) -> None:
    """One faulty task fails alone with the right error; each innocent runs exactly once."""
    fn, exc_type, exitcode, counter = FAULTS[fault]
    with parstream.Supervisor(max_workers=2) as sup:
        go = tmp_path / "go"
        runs_dir = tmp_path / "runs"
        runs_dir.mkdir()
        faulty = sup.async_(fn, str(go))
        innocents = [sup.async_(innocent, str(runs_dir), f"i{k}", 0.3) for k in range(3)]
        wait_until(lambda: faulty.pid is not None, what="the faulty task to start")
        faulty_pid = faulty.pid
        wait_until(lambda: len(sup.worker_pids()) == 2, what="both workers")
        originals = set(sup.worker_pids())
        assert faulty_pid in originals
        go.touch()  # the faulty task strikes now
        if fault == "sigkill":
            assert faulty_pid is not None
            os.kill(faulty_pid, signal.SIGKILL)

        with pytest.raises(exc_type) as info:
            faulty.await_(0.3 if fault == "hang" else 20)
        err = info.value
        if exc_type is parstream.WorkerCrashed:
            assert isinstance(err, parstream.WorkerCrashed)
            assert err.exitcode == exitcode
            assert err.pid == faulty_pid
            assert str(faulty_pid) in str(err)
        elif fault == "raise":
            assert isinstance(err.__cause__, parstream.RemoteTraceback)
        else:
            assert isinstance(err, TimeoutError)

        assert [t.await_(20) for t in innocents] == ["marker-i0", "marker-i1", "marker-i2"]
        runs = Counter(p.name.split("-")[0] for p in runs_dir.iterdir())
        assert runs == {"i0": 1, "i1": 1, "i2": 1}, runs  # exactly once each

        stats = sup.stats()
        assert stats.tasks_started == 4
        assert stats.tasks_ok == 3
        assert {c: getattr(stats, c) for c in COUNTERS} == {
            c: int(c == counter) for c in COUNTERS
        }, stats

        if fault == "raise":
            assert stats.workers_started == 2
            assert set(sup.worker_pids()) == originals
            return

        assert faulty_pid is not None
        assert gone(faulty_pid, 3.0)
        assert faulty_pid not in sup.worker_pids()
        wait_until(lambda: sup.stats().workers_started == 3, what="a replacement worker")
        replacement = set(sup.worker_pids()) - originals
        assert len(replacement) == 1, (originals, sup.worker_pids())
        assert len(sup.worker_pids()) == 2
        # The replacement serves: keep both workers busy until it shows up.
        deadline = time.monotonic() + 15
        while True:
            served = set(parstream.await_many([sup.async_(pid_after, 0.2) for _ in range(2)], 20))
            assert faulty_pid not in served
            if served & replacement:
                break
            assert time.monotonic() < deadline, "the replacement worker never served"
        assert sup.stats().workers_started == 3


def test_many_crashes_at_once_fail_only_their_tasks(tmp_path: Path) -> None:
    """Ten crashing tasks interleaved with ten innocent ones: 10 crashes, 10 values, once each."""
    (tmp_path / "go").touch()
    runs_dir = tmp_path / "runs"
    runs_dir.mkdir()
    with parstream.Supervisor(max_workers=2) as sup:
        tasks: list[parstream.Task[Any]] = []
        for k in range(10):
            tasks.append(sup.async_(exit_three, str(tmp_path / "go")))
            tasks.append(sup.async_(innocent, str(runs_dir), f"i{k}", 0.0))
        crashed = ok = 0
        for t in tasks:
            result = t.yield_(30)
            if isinstance(result, parstream.Ok):
                ok += 1
            else:
                assert isinstance(result, parstream.Exit)
                assert isinstance(result.reason, parstream.WorkerCrashed)
                assert result.reason.exitcode == 3
                crashed += 1
        assert (crashed, ok) == (10, 10)
        runs = Counter(p.name.split("-")[0] for p in runs_dir.iterdir())
        assert runs == {f"i{k}": 1 for k in range(10)}
        stats = sup.stats()
        assert stats.tasks_crashed == 10
        assert stats.tasks_ok == 10
        assert not sup.closed
        assert sup.async_(abs, -1).await_(20) == 1


# -- huge and infinite timeouts ------------------------------------------------------------


def ignore_sigterm_briefly(ready: str) -> str:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    Path(ready).touch()
    time.sleep(0.5)
    return "finished"


def _huge_idle_timeout(value: float, tmp_path: Path) -> None:
    with parstream.Supervisor(max_workers=1, idle_timeout=value) as sup:
        assert list(sup.stream_map(abs, [-1, -2, -3], max_concurrency=3)) == [1, 2, 3]
        for i in range(3):  # several hub turns with idle extra workers
            assert sup.async_(abs, -i).await_(10) == i


def _huge_shutdown_grace(value: float, tmp_path: Path) -> None:
    with parstream.Supervisor(max_workers=1) as sup:
        ready = tmp_path / "ready"
        task = sup.async_(ignore_sigterm_briefly, str(ready))
        wait_until(ready.exists, what="the task to ignore SIGTERM")
        assert task.shutdown(value) == parstream.Ok("finished")  # the reply wins the race
        for i in range(3):
            assert sup.async_(abs, -i).await_(10) == i


def _huge_stream_timeout(value: float, tmp_path: Path) -> None:
    with parstream.Supervisor(max_workers=1) as sup:
        assert list(sup.stream_map(abs, [-1, -2], timeout=value)) == [1, 2]
        for i in range(3):
            assert sup.async_(abs, -i).await_(10) == i


HUGE: dict[str, Callable[[float, Path], None]] = {
    "idle_timeout": _huge_idle_timeout,
    "shutdown grace": _huge_shutdown_grace,
    "stream timeout": _huge_stream_timeout,
}


@pytest.mark.parametrize("value", [1e7, math.inf], ids=["1e7", "inf"])
@pytest.mark.parametrize("where", list(HUGE))
def test_huge_timeouts_do_not_break_the_pool(where: str, value: float, tmp_path: Path) -> None:
    """A month-long (or infinite) timeout works, or is refused up front; the pool survives."""
    try:
        HUGE[where](value, tmp_path)
    except ValueError:
        assert value == math.inf  # refusing infinity at the call is acceptable; 1e7 is not
