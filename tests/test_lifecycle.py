"""Whole-process behaviour, in real subprocesses: parent death, exit, __main__ code."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import psutil
import pytest

import parstream


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def wait_all_gone(pids: list[int], within: float) -> list[int]:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        left = [p for p in pids if alive(p)]
        if not left:
            return []
        time.sleep(0.02)
    return [p for p in pids if alive(p)]


def run_script(body: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(body)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


@pytest.mark.slow
def test_parent_sigkill_takes_busy_workers_down() -> None:
    """SIGKILL of the parent mid 30 s tasks: every worker is gone within a second or two."""
    proc = run_script(
        """
        import json, time, parstream
        tasks = [parstream.async_nolink(time.sleep, 30) for _ in range(2)] if False else None
        sup = parstream.default_supervisor()
        tasks = [sup.async_nolink(time.sleep, 30) for _ in range(2)]
        while any(t.pid is None for t in tasks):
            time.sleep(0.01)
        print(json.dumps(sup.worker_pids()), flush=True)
        time.sleep(60)
        """
    )
    try:
        assert proc.stdout is not None
        pids = json.loads(proc.stdout.readline())
        assert len(pids) >= 2
        assert all(alive(p) for p in pids)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        assert wait_all_gone(pids, 2.0) == []
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()


@pytest.mark.slow
def test_interpreter_exit_is_not_blocked_by_a_hung_task() -> None:
    """A script that ends with a hung task in flight exits promptly and leaves no worker."""
    proc = run_script(
        """
        import json, time, parstream
        task = parstream.async_(time.sleep, 300)
        while task.pid is None:
            time.sleep(0.01)
        print(json.dumps(parstream.default_supervisor().worker_pids()), flush=True)
        task.ignore()
        """
    )
    try:
        assert proc.stdout is not None
        pids = json.loads(proc.stdout.readline())
        t0 = time.monotonic()
        assert proc.wait(15) == 0
        assert time.monotonic() - t0 < 10
        assert wait_all_gone(pids, 3.0) == []
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()


def test_main_module_lambdas_closures_and_classes() -> None:
    """Lambdas, closures and classes defined in __main__ work as tasks and results."""
    proc = run_script(
        """
        import parstream

        class Point:
            def __init__(self, x):
                self.x = x

        offset = 10
        def shifted(x):
            return x + offset

        with parstream.Supervisor(max_workers=2) as sup:
            assert sup.async_(lambda: 41 + 1).await_() == 42
            assert list(sup.stream_map(shifted, [1, 2])) == [11, 12]
            p = sup.async_(Point, 3).await_()
            assert isinstance(p, Point) and p.x == 3
            assert list(sup.stream_map(lambda p: p.x * 2, [Point(1), Point(2)])) == [2, 4]
        print("ok", flush=True)
        """
    )
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert out.strip() == "ok"


def test_no_listening_socket(sup: parstream.Supervisor) -> None:
    """Local mode opens no listening network socket, in the parent or the workers."""
    assert sup.async_(os.getpid).await_() in sup.worker_pids()
    procs = [psutil.Process()] + [psutil.Process(p) for p in sup.worker_pids()]
    for p in procs:
        listening = [c for c in p.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN]
        assert listening == [], (p.pid, listening)


def test_worker_logging_reaches_the_parent_logger(
    sup: parstream.Supervisor, caplog: pytest.LogCaptureFixture
) -> None:
    """A worker's log record arrives on the parent's parstream logger with its item index."""
    import logging

    with caplog.at_level(logging.INFO):
        list(sup.stream_map(_log_item, range(3)))
        deadline = time.monotonic() + 5
        while sum("hello" in r.getMessage() for r in caplog.records) < 3:
            assert time.monotonic() < deadline, caplog.records
            time.sleep(0.02)
    messages = [r.getMessage() for r in caplog.records if r.name == "parstream"]
    assert any("[item 2," in m and "hello 2" in m for m in messages), messages


def _log_item(x: int) -> int:
    import logging

    logging.getLogger("user.code").info("hello %d", x)
    return x
