"""A task's own subprocesses end with it, however it ends (issue 8, item 11).

Each task starts a direct subprocess and a shell-backgrounded one (whose shell
exits at once, so it is no longer the worker's descendant), records their pids
in a file, and hangs. Each way of ending must leave none of them running.
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
from pathlib import Path
from typing import Any

import psutil
import pytest
from _util import gone, read_line, wait_until

import parstream
from parstream import BRUTAL_KILL, Exit, WorkerCrashed
from parstream._backends.local import _reaper

GONE_WITHIN_S = 10.0  # a poll's limit: only a failure waits it out


def background_sleep() -> int:
    """Start a shell's background ``sleep`` (the shell exits at once); its pid."""
    out = subprocess.run(
        ["sh", "-c", "sleep 60 >/dev/null 2>&1 & echo $!"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return int(out)


def spawn_and_hang(path: str, leave_group: bool = False) -> None:
    """Start a direct and a shell-backgrounded ``sleep``, record the pids, hang."""
    direct = subprocess.Popen(["sleep", "60"], stdout=subprocess.DEVNULL)
    background = background_sleep()
    pids = {"worker": os.getpid(), "direct": direct.pid, "background": background}
    if leave_group:
        pids["own_group"] = subprocess.Popen(["sleep", "60"], process_group=0).pid
    Path(path + ".tmp").write_text(json.dumps(pids))
    os.replace(path + ".tmp", path)
    time.sleep(60)


def spawn_or_return(arg: str | None) -> int:
    if arg is None:
        return 0
    spawn_and_hang(arg)
    return 1


def read_pids(path: Path, within: float = 20.0) -> dict[str, int]:
    deadline = time.monotonic() + within
    while not path.exists():
        assert time.monotonic() < deadline, "the task never recorded its subprocesses"
        time.sleep(0.01)
    pids: dict[str, int] = json.loads(path.read_text())
    assert all(_alive(pid) for pid in pids.values()), pids
    return pids


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def assert_all_gone(pids: dict[str, int]) -> None:
    left = {name: pid for name, pid in pids.items() if not gone(pid, within=GONE_WITHIN_S)}
    assert left == {}, f"still running {GONE_WITHIN_S} s after the end: {left}"


@pytest.fixture
def recorded() -> Any:
    """Pids recorded by a test; any ``sleep`` left of them is killed afterwards."""
    pids: list[int] = []
    yield pids
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            p = psutil.Process(pid)
            if p.name() == "sleep":
                p.kill()


def test_timeout_kills_the_task_tree(
    sup: parstream.Supervisor, tmp_path: Path, recorded: list[int]
) -> None:
    """A per-item timeout with on_timeout="kill_task" kills every subprocess of the item."""
    path = tmp_path / "pids"
    stream = sup.async_stream_nolink(
        spawn_and_hang, [str(path)], timeout=3.0, on_timeout="kill_task"
    )
    out = list(stream)  # the item records its pids well before its timeout
    assert len(out) == 1, out
    assert isinstance(out[0], Exit), out
    assert isinstance(out[0].reason, parstream.TaskTimeout), out
    pids = json.loads(path.read_text())
    recorded.extend(pids.values())
    assert_all_gone(pids)


@pytest.mark.parametrize("how", [BRUTAL_KILL, 0.5], ids=["brutal_kill", "sigterm_grace"])
def test_task_shutdown_kills_the_task_tree(
    sup: parstream.Supervisor, tmp_path: Path, recorded: list[int], how: Any
) -> None:
    """Task.shutdown, brutal or with a grace period, kills every subprocess of the task."""
    path = tmp_path / "pids"
    task = sup.async_nolink(spawn_and_hang, str(path))
    pids = read_pids(path)
    recorded.extend(pids.values())
    assert task.shutdown(how) is None
    assert_all_gone(pids)


def trap_sigterm_and_hang(path: str) -> None:
    """A shell that records a SIGTERM, in a worker that survives SIGTERM."""
    # A handler, not SIG_IGN: an ignored signal stays ignored across exec,
    # and a shell cannot trap a signal ignored on entry.
    signal.signal(signal.SIGTERM, lambda *_: None)
    # The trap is in place once the shell has made ``.trap``.
    script = f'trap "echo TERM > {path}.term; exit 0" TERM; : > {path}.trap; sleep 60 & wait'
    shell = subprocess.Popen(["sh", "-c", script])
    Path(path + ".tmp").write_text(json.dumps({"worker": os.getpid(), "shell": shell.pid}))
    os.replace(path + ".tmp", path)
    time.sleep(60)


def test_graceful_shutdown_sends_sigterm_to_the_task_subprocesses(
    sup: parstream.Supervisor, tmp_path: Path, recorded: list[int]
) -> None:
    """Task.shutdown(grace) SIGTERMs the worker's whole group first, so subprocesses
    get their chance to clean up too, and SIGKILLs the group after the grace."""
    path = tmp_path / "pids"
    task = sup.async_nolink(trap_sigterm_and_hang, str(path))
    pids = read_pids(path)
    recorded.extend(pids.values())
    wait_until((tmp_path / "pids.trap").exists, 20, what="the shell to install its trap")
    assert task.shutdown(1.0) is None
    assert_all_gone(pids)
    assert (tmp_path / "pids.term").read_text().strip() == "TERM"


def test_close_kills_the_task_tree(tmp_path: Path, recorded: list[int]) -> None:
    """Closing the supervisor kills every subprocess of its running tasks."""
    sup = parstream.Supervisor(max_workers=1)
    try:
        path = tmp_path / "pids"
        sup.async_nolink(spawn_and_hang, str(path))
        pids = read_pids(path)
        recorded.extend(pids.values())
    finally:
        sup.close()
    assert_all_gone(pids)


def test_leaving_a_stream_early_kills_the_task_tree(
    sup: parstream.Supervisor, tmp_path: Path, recorded: list[int]
) -> None:
    """Closing a stream with an item still running kills that item's subprocesses."""
    path = tmp_path / "pids"
    values = sup.stream_map(spawn_or_return, [None, str(path)], max_concurrency=2)
    assert next(values) == 0
    pids = read_pids(path)
    recorded.extend(pids.values())
    values.close()
    assert_all_gone(pids)


def test_worker_killed_from_outside_takes_its_group(
    sup: parstream.Supervisor, tmp_path: Path, recorded: list[int]
) -> None:
    """A worker that dies by an outside SIGKILL (the OOM killer) takes its group with it."""
    path = tmp_path / "pids"
    task = sup.async_nolink(spawn_and_hang, str(path))
    pids = read_pids(path)
    recorded.extend(pids.values())
    os.kill(pids["worker"], signal.SIGKILL)
    result = task.yield_(10.0)
    assert isinstance(result, Exit), result
    assert isinstance(result.reason, WorkerCrashed), result
    assert_all_gone(pids)


def test_kill_reaches_a_subprocess_that_left_the_group(
    sup: parstream.Supervisor, tmp_path: Path, recorded: list[int]
) -> None:
    """A subprocess in a process group of its own is still killed with its worker."""
    path = tmp_path / "pids"
    task = sup.async_nolink(spawn_and_hang, str(path), True)
    pids = read_pids(path)
    recorded.extend(pids.values())
    assert os.getpgid(pids["own_group"]) != pids["worker"]
    task.shutdown(BRUTAL_KILL)
    assert_all_gone(pids)


def nest_spawn_and_hang(path: str) -> None:
    """parstream inside a task: the inner task starts the subprocesses."""
    with parstream.Supervisor(max_workers=1) as inner:
        inner.async_(spawn_and_hang, path).await_()


def leave_background(path: str) -> None:
    background = background_sleep()
    Path(path).write_text(json.dumps({"inner_worker": os.getpid(), "background": background}))


def nest_leave_background(path: str) -> None:
    """parstream inside a task, on the worker's default supervisor, which
    outlives the task: its task leaves a shell background job and returns."""
    parstream.async_(leave_background, path).await_()


@pytest.mark.parametrize("how", ["timeout", "close"])
def test_a_nested_pools_task_tree_goes_with_the_outer_task(
    tmp_path: Path, recorded: list[int], how: str
) -> None:
    """A task using parstream itself: its workers lead groups of their own,
    and killing the outer worker's tree killed them one by one, never their
    groups, and killed the nested pool's reaper (which would have) with
    them: the inner task's shell background job was left running."""
    path = tmp_path / "pids"
    with parstream.Supervisor(max_workers=1) as sup:
        if how == "timeout":
            stream = sup.async_stream_nolink(
                nest_spawn_and_hang, [str(path)], timeout=8.0, on_timeout="kill_task"
            )
            out = list(stream)
            assert isinstance(out[0], Exit), out
            assert isinstance(out[0].reason, parstream.TaskTimeout), out
            pids = json.loads(path.read_text())
        else:
            # The outer task has returned; the nested pool's idle worker
            # holds the background job its task left, until the close.
            assert sup.async_(nest_leave_background, str(path)).await_(60) is None
            pids = read_pids(path)
            sup.close()
        recorded.extend(pids.values())
        assert_all_gone(pids)


def leave_a_thread_and_a_subprocess(path: str) -> int:
    """Return, leaving a non-daemon thread, a ``sleep`` in the worker's group
    and an exit hook that writes a file."""
    import atexit

    threading.Thread(target=time.sleep, args=(60,)).start()
    sleeper = subprocess.Popen(["sleep", "60"])
    atexit.register(Path(f"{path}.{os.getpid()}.hook").write_text, "ran")
    Path(f"{path}.{os.getpid()}").write_text(json.dumps({"sleep": sleeper.pid}))
    return os.getpid()


def test_a_retired_worker_ends_though_its_task_left_a_thread(
    tmp_path: Path, recorded: list[int]
) -> None:
    """A worker told to stop returned from its loop, and the interpreter's
    exit then waited for the non-daemon thread a task had left: the retired
    worker never ended, nor what its group held, one more worker per
    retirement beyond max_workers. It now ends at once; its exit hooks
    still run."""
    path = str(tmp_path / "left")
    with parstream.Supervisor(max_workers=1, max_tasks_per_worker=1) as sup:
        workers = list(sup.map(leave_a_thread_and_a_subprocess, [path] * 3, chunksize=1))
        assert len(set(workers)) == 3
        pids = {f"worker {w}": w for w in workers[:2]}
        for w in workers[:2]:
            pids[f"sleep of {w}"] = json.loads(Path(f"{path}.{w}").read_text())["sleep"]
        recorded.extend(pids.values())
        assert_all_gone(pids)  # while the pool runs on
        for w in workers[:2]:
            assert Path(f"{path}.{w}.hook").read_text() == "ran"
        wait_until(lambda: sup.stats().workers_alive <= 1, what="one worker alive")


def start_stubborn_session(path: str, hang: bool = True) -> None:
    """Start a ``sleep`` in a session of its own that ignores SIGTERM (an
    ignored signal stays ignored across exec), record the pids, then hang or
    return."""
    before = signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        stray = subprocess.Popen(["sleep", "60"], start_new_session=True)
    finally:
        signal.signal(signal.SIGTERM, before)
    Path(path + ".tmp").write_text(json.dumps({"worker": os.getpid(), "session": stray.pid}))
    os.replace(path + ".tmp", path)
    if hang:
        time.sleep(60)


@pytest.mark.parametrize("how", ["shutdown_grace", "terminate_child", "retire", "close_in_grace"])
def test_a_stopped_worker_takes_its_tasks_new_session_with_it(
    tmp_path: Path, recorded: list[int], how: str
) -> None:
    """A worker stopped with a grace period (Task.shutdown(s), terminate_child)
    or retired ends by itself, and what its task started in a new session is
    then no longer its descendant: those were left running, though parstream
    stopped the worker. They are noted before, SIGTERMed with the group, and
    SIGKILLed at the end of the grace (this one ignores SIGTERM)."""
    path = tmp_path / "pids"
    limit = 1 if how == "retire" else None
    with parstream.Supervisor(max_workers=1, max_tasks_per_worker=limit) as sup:
        if how == "shutdown_grace":
            task = sup.async_nolink(start_stubborn_session, str(path))
            pids = read_pids(path)
            recorded.extend(pids.values())
            assert task.shutdown(0.5) is None
        elif how == "close_in_grace":
            # The worker dies of its SIGTERM at once; the pool closes while
            # the stray (which ignores it) still has 30 s of grace: the close
            # ends the grace.
            task = sup.async_nolink(start_stubborn_session, str(path))
            pids = read_pids(path)
            recorded.extend(pids.values())
            assert task.shutdown(30) is None
        elif how == "terminate_child":
            child = sup.start_child(start_stubborn_session, str(path), shutdown=0.5)
            pids = read_pids(path)
            recorded.extend(pids.values())
            sup.terminate_child(child)
        else:
            sup.async_(start_stubborn_session, str(path), False).await_(60)
            pids = json.loads(path.read_text())
            recorded.extend(pids.values())
        if how != "close_in_grace":
            assert_all_gone(pids)  # while the pool runs on
    assert_all_gone(pids)


def test_the_reaper_is_shared_and_exits_with_the_last_pool() -> None:
    """One reaper serves every pool of a process, and is gone once the last one closes."""
    with parstream.Supervisor(max_workers=1) as one:
        one.async_(os.getpid).await_()
        reaper = _reaper.reaper_pid()
        assert reaper is not None
        assert _alive(reaper)
        with parstream.Supervisor(max_workers=1) as two:
            two.async_(os.getpid).await_()
            assert _reaper.reaper_pid() == reaper
        assert _alive(reaper)  # the first pool is still open
        assert one.async_(os.getpid).await_() > 0
    assert _reaper.reaper_pid() is None
    assert gone(reaper, within=GONE_WITHIN_S)


PARENT_SCRIPT = textwrap.dedent(
    """
    import ctypes, json, os, subprocess, sys, time
    import parstream
    from parstream._backends.local import _reaper

    folder, hold_gil, fork_child, kill_reaper = sys.argv[1], *(a == "1" for a in sys.argv[2:])

    def spawn_and_hang(path):
        direct = subprocess.Popen(["sleep", "60"], stdout=subprocess.DEVNULL)
        out = subprocess.run(
            ["sh", "-c", "sleep 60 >/dev/null 2>&1 & echo $!"],
            capture_output=True, text=True, check=True,
        ).stdout
        pids = {"worker": os.getpid(), "direct": direct.pid, "background": int(out)}
        with open(path + ".tmp", "w") as f:
            json.dump(pids, f)
        os.replace(path + ".tmp", path)
        if hold_gil:
            ctypes.PyDLL(None).sleep(60)  # libc sleep with the GIL held
        time.sleep(60)

    sup = parstream.Supervisor(max_workers=2)
    paths = [os.path.join(folder, f"pids{i}") for i in range(2)]
    tasks = [sup.async_nolink(spawn_and_hang, p) for p in paths]
    while not all(os.path.exists(p) for p in paths):
        time.sleep(0.01)
    pids = {}
    for i, p in enumerate(paths):
        for name, pid in json.load(open(p)).items():
            pids[f"{name}{i}"] = pid
    if kill_reaper:  # someone SIGKILLs the reaper: the next pool to open replaces it
        dead = _reaper.reaper_pid()
        os.kill(dead, 9)
        os.waitid(os.P_PID, dead, os.WEXITED | os.WNOWAIT)  # dead, not yet reaped
        other = parstream.Supervisor(max_workers=1)
    reaper = _reaper.reaper_pid()
    if reaper is not None:  # (test_the_reaper_is_shared... checks there is one)
        pids["reaper"] = reaper
    if fork_child:
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
@pytest.mark.parametrize(
    ("sig", "hold_gil", "fork_child", "term_all", "kill_reaper"),
    [
        (signal.SIGTERM, False, False, False, False),
        (signal.SIGKILL, False, False, False, False),
        (signal.SIGKILL, True, False, False, False),
        (signal.SIGKILL, False, True, False, False),
        (signal.SIGTERM, False, False, True, False),
        (signal.SIGKILL, False, False, False, True),
    ],
    ids=[
        "sigterm",
        "sigkill",
        "sigkill_worker_holds_gil",
        "sigkill_with_forked_child",
        "sigterm_to_the_reaper_too",
        "sigkill_after_the_reaper_was_replaced",
    ],
)
def test_parent_death_kills_every_task_tree(
    tmp_path: Path,
    recorded: list[int],
    sig: int,
    hold_gil: bool,
    fork_child: bool,
    term_all: bool,
    kill_reaper: bool,
) -> None:
    """The parent dies by a signal: its workers, their subprocesses and its reaper all go."""
    script = tmp_path / "parent.py"
    script.write_text(PARENT_SCRIPT)
    flags = [str(int(flag)) for flag in (hold_gil, fork_child, kill_reaper)]
    proc = subprocess.Popen(
        [sys.executable, str(script), str(tmp_path), *flags],
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
        recorded.extend(pids.values())
        assert all(_alive(pid) for pid in pids.values()), pids
        if term_all:  # as when a container stops: the reaper must stay to clean up
            os.kill(pids["reaper"], signal.SIGTERM)
        os.kill(proc.pid, sig)
        proc.wait(10)
        assert_all_gone(pids)
        if forked is not None:
            assert _alive(forked)  # it really did hold the inherited pipe all along
    finally:
        if forked is not None:
            with contextlib.suppress(OSError):
                os.kill(forked, signal.SIGKILL)
        if proc.poll() is None:
            proc.kill()
        proc.communicate()


FORK_SCRIPT = textwrap.dedent(
    """
    import json, os, subprocess, sys, time
    import parstream
    from parstream._backends.local import _reaper

    def spawn_and_hang(path):
        direct = subprocess.Popen(["sleep", "60"], stdout=subprocess.DEVNULL)
        out = subprocess.run(
            ["sh", "-c", "sleep 60 >/dev/null 2>&1 & echo $!"],
            capture_output=True, text=True, check=True,
        ).stdout
        pids = {"worker": os.getpid(), "direct": direct.pid, "background": int(out)}
        with open(path + ".tmp", "w") as f:
            json.dump(pids, f)
        os.replace(path + ".tmp", path)
        time.sleep(60)

    with parstream.Supervisor(max_workers=1) as sup:
        sup.async_(os.getpid).await_()
        parent_reaper = _reaper.reaper_pid()
        r, w = os.pipe()
        child = os.fork()
        if child == 0:
            os.close(r)
            path = os.path.join(sys.argv[1], "pids")
            mine = parstream.Supervisor(max_workers=1)
            mine.async_nolink(spawn_and_hang, path)
            while not os.path.exists(path):
                time.sleep(0.01)
            pids = json.load(open(path))
            pids["reaper"] = _reaper.reaper_pid()
            os.write(w, (json.dumps(pids) + "\\n").encode())
            time.sleep(60)
            os._exit(0)
        os.close(w)
        pids = json.loads(os.fdopen(r).readline())
        print(json.dumps({"parent_reaper": parent_reaper, "child": child, **pids}), flush=True)
        sys.stdin.readline()
        os.waitpid(child, 0)
    """
)


@pytest.mark.slow
def test_a_forked_child_has_its_own_reaper(tmp_path: Path, recorded: list[int]) -> None:
    """A forked child's pools get a reaper of their own, which acts when the child dies."""
    script = tmp_path / "fork.py"
    script.write_text(FORK_SCRIPT)
    proc = subprocess.Popen(
        [sys.executable, str(script), str(tmp_path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        assert proc.stdout is not None
        assert proc.stdin is not None
        line = read_line(proc.stdout)
        assert line, "the script died before reporting its pids"
        pids: dict[str, int] = json.loads(line)
        parent_reaper = pids.pop("parent_reaper")
        child = pids.pop("child")
        recorded.extend([*pids.values(), child])
        assert pids["reaper"] != parent_reaper
        assert all(_alive(pid) for pid in [*pids.values(), parent_reaper]), pids
        os.kill(child, signal.SIGKILL)
        assert_all_gone(pids)
        assert _alive(parent_reaper)  # the parent's pool is still open
        proc.stdin.close()
        assert proc.wait(20) == 0
        assert gone(parent_reaper, within=GONE_WITHIN_S)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        for pipe in (proc.stdin, proc.stdout):
            if pipe is not None:
                pipe.close()


@pytest.mark.skipif(not os.path.exists(_reaper.SHELL), reason="no /bin/sh")
def test_the_shell_reaper_kills_exactly_the_groups_still_registered() -> None:
    """The reaper script's bookkeeping: a group added twice and removed once is
    gone; malformed lines are ignored; what is left is killed at end of file."""
    script = _reaper.REAPER_SH.replace('kill -9 "-$g"', 'echo "$g"')
    assert script != _reaper.REAPER_SH
    lines = "+12\n+34\n+12\n-12\n+x1\n-\n+\n+56\n+78\n-56\n-99\n+7\n"
    out = subprocess.run(
        [_reaper.SHELL, "-c", script], input=lines, capture_output=True, text=True, check=True
    ).stdout
    assert sorted(out.split()) == ["34", "7", "78"]


# -- what a task inherits: signals, stdin, the terminal ------------------------------------


def stop_a_child_with_sigint(_: Any) -> int:
    child = subprocess.Popen(["sleep", "30"])
    time.sleep(0.2)
    child.send_signal(signal.SIGINT)
    try:
        return child.wait(timeout=10)
    except subprocess.TimeoutExpired:
        child.kill()
        child.wait()
        return 0  # it ignored SIGINT


def read_stdin(_: Any) -> str:
    return sys.stdin.read() + os.read(0, 100).decode()


def test_a_task_can_stop_its_child_with_sigint_and_reads_no_stdin() -> None:
    """What a task starts gets SIGINT's default action (the worker ignored it
    with SIG_IGN, which exec passes on: ``Popen.send_signal(SIGINT)`` did
    nothing), and a task's stdin is /dev/null, as multiprocessing's, not
    the parent's input."""
    with parstream.Supervisor(max_workers=1) as sup:
        assert sup.async_(stop_a_child_with_sigint, None).await_(30) == -signal.SIGINT
        assert sup.async_(read_stdin, None).await_(30) == ""


TTY_SCRIPT = """
import os, sys
import parstream

def speak(_):
    print("worker speaks", flush=True)
    return 42

def ask(_):
    try:
        return input("name? ")
    except EOFError:
        return "EOF"

if __name__ == "__main__":
    os.system("stty tostop")  # a background process that writes is stopped
    with parstream.Supervisor(max_workers=1) as sup:
        said, answer = sup.async_(speak, 0).await_(20), sup.async_(ask, 0).await_(20)
        print("results:", said, answer, flush=True)
"""


@pytest.mark.skipif(not hasattr(os, "openpty"), reason="needs a pseudo-terminal")
def test_tasks_run_from_a_terminal_are_not_stopped_by_it(tmp_path: Path) -> None:
    """Run in a terminal (with ``stty tostop``), a task that prints, or asks
    for input, is not stopped by SIGTTOU/SIGTTIN (the worker's own process
    group is not the terminal's foreground one): it printed nothing and hung
    until killed; input() got end of file only through the stdlib."""
    import pty
    import select

    script = tmp_path / "tty_script.py"
    script.write_text(TTY_SCRIPT)
    env = dict(os.environ, PYTHONPATH=str(Path(parstream.__file__).resolve().parents[1]))
    pid, fd = pty.fork()
    if pid == 0:  # pragma: no cover - the child
        os.execve(sys.executable, [sys.executable, str(script)], env)
    out = b""
    deadline = time.monotonic() + 60
    try:
        while b"results:" not in out or not out.endswith(b"\n"):
            assert time.monotonic() < deadline, out
            ready, _, _ = select.select([fd], [], [], 0.2)
            if ready:
                try:
                    data = os.read(fd, 4096)
                except OSError:
                    break
                if not data:
                    break
                out += data
    finally:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        os.close(fd)
    text = out.decode(errors="replace")
    assert "worker speaks" in text, text
    assert "results: 42 EOF" in text, text


def test_kill_tree_stops_the_worker_before_looking_for_its_descendants(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Looking a worker's descendants up takes milliseconds (a read of every
    process on some kernels); a worker left running meanwhile finished the
    item being timed out and sent its result, delivered as Ok though it
    overran. It is stopped first."""
    from parstream._backends.local import _spawn

    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    events: list[Any] = []
    lookup, kill = _spawn._descendants, os.kill

    def looking(pid: int) -> list[int] | None:
        events.append(("lookup", pid))
        return lookup(pid)

    def killing(pid: int, sig: int) -> None:
        events.append(("kill", pid, sig))
        kill(pid, sig)

    monkeypatch.setattr(_spawn, "_descendants", looking)
    monkeypatch.setattr(os, "kill", killing)  # the one _spawn calls
    try:
        _spawn.kill_tree(proc.pid)
        monkeypatch.undo()
        assert proc.wait(timeout=10) == -signal.SIGKILL
        assert events[:2] == [("kill", proc.pid, signal.SIGSTOP), ("lookup", proc.pid)], events
    finally:
        monkeypatch.undo()
        with contextlib.suppress(OSError):
            proc.kill()
        proc.wait()
