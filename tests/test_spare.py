"""The local pool's spare worker (issue 12).

Once a pool's first worker is up, the pool keeps one more process booted and
waiting; when a worker dies (or more are wanted) the spare is promoted instead
of a new process being started. It must be invisible otherwise: not in
``workers()``, not counted as started, no initializer run, killed with the
pool and with the parent, never promoted into a changed environment.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from typing import TYPE_CHECKING, Any

import psutil
import pytest
from _executor_funcs import get_state, set_state
from _util import gone, read_line, wait_until

import parstream
from parstream._backends.local import _pool

if TYPE_CHECKING:
    from pathlib import Path

    from parstream._backends.local._spawn import LocalWorker

pytestmark = pytest.mark.skipif(not _pool.SPARES, reason="no spare workers on this platform")


def _workers(sup: parstream.Supervisor) -> list[LocalWorker]:
    pool: Any = sup._backend
    with pool._lock:
        return list(pool._workers)


def spare_pid(sup: parstream.Supervisor, within: float = 20.0, other_than: int = 0) -> int:
    """The pid of the pool's spare (other than ``other_than``), once it has
    one (polled: nothing announces it)."""
    found: list[int] = []

    def has_spare() -> bool:
        found[:] = [w.pid for w in _workers(sup) if w.state == "spare" and w.pid != other_than]
        return bool(found)

    wait_until(has_spare, within, what="a spare worker")
    return found[0]


def hold(seconds: float) -> int:
    time.sleep(seconds)
    return os.getpid()


def getenv(name: str) -> str | None:
    return os.environ.get(name)


def busy_pid(task: parstream.Task[Any]) -> int:
    wait_until(lambda: task.pid is not None, 20, what="the task to start")
    assert task.pid is not None
    return task.pid


def test_the_spare_is_not_a_worker_until_a_worker_dies() -> None:
    """The spare is not listed nor counted; a crash promotes it, and a new spare follows."""
    with parstream.Supervisor(max_workers=2) as sup:
        assert sup.async_(os.getpid).await_(30) > 0
        spare = spare_pid(sup)
        assert psutil.pid_exists(spare)
        wait_until(lambda: len(sup.worker_pids()) == 2, what="both workers")
        assert spare not in sup.worker_pids()
        assert sup.stats().workers_started == 2
        victim = sup.async_(hold, 30)
        other = sup.async_(hold, 30)
        pid = busy_pid(victim)
        busy_pid(other)
        os.kill(pid, signal.SIGKILL)
        with pytest.raises(parstream.WorkerCrashed):
            victim.await_(30)
        # Every other worker is busy: only the promoted spare can run this.
        assert sup.async_(os.getpid).await_(30) == spare
        assert spare in sup.worker_pids()
        assert sup.stats().workers_started == 3
        spare_pid(sup, other_than=spare)  # a new spare
        other.shutdown(parstream.BRUTAL_KILL)
    assert gone(spare)


def test_a_spare_runs_no_initializer_until_promoted(tmp_path: Path) -> None:
    """The initializer runs in a spare only once it becomes a worker."""
    with parstream.Supervisor(
        max_workers=1, initializer=set_state, initargs=("init", str(tmp_path))
    ) as sup:
        first = sup.async_(os.getpid).await_(30)
        spare = spare_pid(sup)
        time.sleep(0.5)  # time enough for a spare to have booted
        assert {p.name for p in tmp_path.iterdir()} == {str(first)}
        with pytest.raises(parstream.WorkerCrashed):
            sup.async_(os._exit, 1).await_(30)
        assert sup.async_(get_state, None).await_(30) == "init"
        assert sup.async_(os.getpid).await_(30) == spare
        assert {p.name for p in tmp_path.iterdir()} == {str(first), str(spare)}


def test_a_spare_is_not_promoted_into_a_changed_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A spare started before os.environ changed is replaced by a fresh start."""
    with parstream.Supervisor(max_workers=1) as sup:
        sup.async_(os.getpid).await_(30)
        spare = spare_pid(sup)
        monkeypatch.setenv("PARSTREAM_TEST_SPARE", "changed")
        with pytest.raises(parstream.WorkerCrashed):
            sup.async_(os._exit, 1).await_(30)
        assert sup.async_(getenv, "PARSTREAM_TEST_SPARE").await_(30) == "changed"
        assert sup.async_(os.getpid).await_(30) != spare
        assert gone(spare)


def test_a_relative_sys_path_entry_keeps_meaning_the_start_directory(tmp_path: Path) -> None:
    """``python -c`` puts ``''`` on sys.path: workers started after the
    program changed directory still import its modules from where it started
    (as multiprocessing's ORIGINAL_DIR does), spares and new Supervisors alike."""
    start, elsewhere = tmp_path / "start", tmp_path / "elsewhere"
    start.mkdir()
    elsewhere.mkdir()
    (start / "mymod_rel.py").write_text("def double(x):\n    return 2 * x\n")
    code = textwrap.dedent(
        f"""
        import os, parstream, mymod_rel
        with parstream.Supervisor(max_workers=1) as s:
            print(s.async_(mymod_rel.double, 1).await_(30))
        os.chdir({str(elsewhere)!r})
        with parstream.Supervisor(max_workers=1) as s:
            print(s.async_(mymod_rel.double, 2).await_(30))
        """
    )
    # parstream itself from where it is; the program's modules only through ''.
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(parstream.__file__)))
    command = [sys.executable, "-c", code]
    out = subprocess.run(command, cwd=start, capture_output=True, text=True, timeout=60, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["2", "4"]


def test_restart_workers_replaces_the_spare_too() -> None:
    with parstream.Supervisor(max_workers=1) as sup:
        sup.async_(os.getpid).await_(30)
        spare = spare_pid(sup)
        sup.restart_workers()
        assert gone(spare)
        spare_pid(sup, other_than=spare)


def test_restart_workers_has_the_hub_send_the_stops(monkeypatch: pytest.MonkeyPatch) -> None:
    """restart_workers() runs on the caller's thread; the STOPs it asks for go
    from the hub thread, the only one that closes a dead worker's connection
    (sent from the caller, one could land on a descriptor number closed and
    reused meanwhile). Busy workers stop after their job, idle ones at once,
    and every one of them stops; the spare, which ran no user code, is
    killed (see the next test)."""
    senders: list[str] = []
    send_stop = _pool.LocalPool._send_stop

    def recording(self: _pool.LocalPool, worker: LocalWorker) -> None:
        senders.append(threading.current_thread().name)
        send_stop(self, worker)

    monkeypatch.setattr(_pool.LocalPool, "_send_stop", recording)
    with parstream.Supervisor(max_workers=2) as sup:
        busy = sup.async_(_sleep_then_pid, 0.5)
        idle = sup.async_(os.getpid).await_(30)
        spare = spare_pid(sup)
        sup.restart_workers()
        busy_pid = busy.await_(30)
        for pid in {busy_pid, idle, spare}:
            assert gone(pid), pid
        assert sup.async_(os.getpid).await_(30) not in {busy_pid, idle, spare}
    assert len(senders) >= 2, senders
    assert set(senders) == {"parstream-hub"}, senders


def _worker_processes() -> list[psutil.Process]:
    """This process's parstream workers (not, say, a Ray cluster's processes)."""
    found = []
    for p in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if any("parstream._backends.local._worker" in part for part in p.cmdline()):
                found.append(p)
    return found


def test_a_loop_of_restarts_does_not_pile_up_booting_spares() -> None:
    """Each restart_workers() asked the spare to stop, and a spare still
    booting reads that only once booted, while a new one started at once:
    30 quick restarts left 21-23 processes for max_workers=2, booting for
    seconds. A spare is killed instead."""
    with parstream.Supervisor(max_workers=2) as sup:
        assert list(sup.map(abs, range(-4, 0))) == [4, 3, 2, 1]
        peak = 0
        for _ in range(30):
            sup.restart_workers()
            time.sleep(0.01)
            peak = max(peak, len(_worker_processes()))
        assert peak <= 12, peak  # 2 workers, a spare, a few retiring; it was 21-23
        assert list(sup.map(abs, range(-4, 0))) == [4, 3, 2, 1]


def _sleep_then_pid(seconds: float) -> int:
    time.sleep(seconds)
    return os.getpid()


def test_a_spare_that_dies_is_replaced_later_and_nothing_fails() -> None:
    with parstream.Supervisor(max_workers=1) as sup:
        sup.async_(os.getpid).await_(30)
        spare = spare_pid(sup)
        os.kill(spare, signal.SIGKILL)
        assert gone(spare)
        spare_pid(sup, other_than=spare)  # after a back-off
        assert sup.async_(os.getpid).await_(30) > 0
        assert sup.stats().workers_started == 1


def test_no_spare_when_the_local_pool_has_none(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_pool, "SPARES", False)
    with parstream.Supervisor(max_workers=1) as sup:
        sup.async_(os.getpid).await_(30)
        time.sleep(0.3)
        assert [w.state for w in _workers(sup)] == ["idle"]


PARENT_SCRIPT = textwrap.dedent(
    """
    import json, os, sys, time
    import parstream

    sup = parstream.Supervisor(max_workers=1)
    sup.async_(os.getpid).await_(30)
    pool = sup._backend
    deadline = time.monotonic() + 20
    while True:
        with pool._lock:
            spares = [w.pid for w in pool._workers if w.state == "spare"]
        if spares or time.monotonic() > deadline:
            break
        time.sleep(0.01)
    pids = {"worker": sup.worker_pids()[0], "spare": spares[0]}
    if sys.argv[1] == "1":
        child = os.fork()
        if child == 0:  # a forked child that lives on, holding what it inherited
            time.sleep(60)
            os._exit(0)
        pids["forked"] = child
    print(json.dumps(pids), flush=True)
    time.sleep(60)
    """
)


@pytest.mark.slow
@pytest.mark.parametrize("fork_child", [False, True], ids=["sigkill", "sigkill_with_forked_child"])
def test_the_spare_dies_with_its_parent(tmp_path: Path, fork_child: bool) -> None:
    script = tmp_path / "parent.py"
    script.write_text(PARENT_SCRIPT)
    proc = subprocess.Popen(
        [sys.executable, str(script), str(int(fork_child))],
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    forked = None
    try:
        assert proc.stdout is not None
        line = read_line(proc.stdout)
        assert line, "the parent script died before reporting its pids"
        pids: dict[str, int] = json.loads(line)
        forked = pids.pop("forked", None)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        left = {name: pid for name, pid in pids.items() if not gone(pid, within=10.0)}
        assert left == {}
    finally:
        if forked is not None:
            try:
                os.kill(forked, signal.SIGKILL)
            except OSError:
                pass
        if proc.poll() is None:
            proc.kill()
        proc.communicate()
