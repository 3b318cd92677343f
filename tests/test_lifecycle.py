"""Whole-process behaviour, in real subprocesses: parent death, exit, Ctrl-C, __main__ code."""

from __future__ import annotations

import json
import logging
import os
import pickle
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from typing import Any

import psutil
import pytest
from _util import read_line, wait_until

import parstream


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def wait_all_gone(pids: list[int], within: float) -> list[int]:
    """Poll until every pid is dead (or a zombie); return those still alive."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        left = [p for p in pids if alive(p)]
        if not left:
            return []
        time.sleep(0.02)
    return [p for p in pids if alive(p)]


PRELUDE = """\
import signal
signal.signal(signal.SIGINT, signal.default_int_handler)
import json, os, sys, time
import parstream

def say(**fields):
    print(json.dumps(fields), flush=True)

def wait_started(task):
    while task.pid is None:
        time.sleep(0.01)
    return task.pid
"""


def run_script(body: str) -> subprocess.Popen[str]:
    """Start ``python -c PRELUDE + body`` in its own session (so killpg reaches only it)."""
    return subprocess.Popen(
        [sys.executable, "-c", PRELUDE + textwrap.dedent(body)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def read_json(proc: subprocess.Popen[str]) -> Any:
    line = read_line(proc.stdout)
    if not line:
        proc.wait(10)
        assert proc.stderr is not None
        pytest.fail(f"script ended early (rc={proc.returncode}): {proc.stderr.read()[-3000:]}")
    return json.loads(line)


def finish(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.communicate()


# -- (a) parent death -------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_parent_death_takes_busy_workers_down(sig: int) -> None:
    """Parent killed mid 30 s tasks on both workers: every worker is gone within ~2 s."""
    proc = run_script(
        """
        sup = parstream.default_supervisor()
        tasks = [sup.async_nolink(time.sleep, 30) for _ in range(2)]
        for t in tasks:
            wait_started(t)
        say(pids=sup.worker_pids(), busy=[t.pid for t in tasks])
        time.sleep(60)
        """
    )
    try:
        msg = read_json(proc)
        pids = msg["pids"]
        assert len(pids) >= 2
        assert set(msg["busy"]) <= set(pids)
        assert all(alive(p) for p in pids)
        os.kill(proc.pid, sig)
        proc.wait(10)
        assert wait_all_gone(pids, 2.5) == []
    finally:
        finish(proc)


# -- (b) interpreter exit ---------------------------------------------------------------

EXIT_ENDINGS = {
    "ignore": "task = parstream.async_(time.sleep, 100)\nwait_started(task)\nSAY\ntask.ignore()\n",
    "fall off the end": "task = parstream.async_(time.sleep, 100)\nwait_started(task)\nSAY\n",
    "nolink": (
        "task = parstream.default_supervisor().async_nolink(time.sleep, 100)\n"
        "wait_started(task)\nSAY\n"
    ),
    "permanent child": (
        "sup = parstream.Supervisor(max_workers=1)\n"
        "child = sup.start_child(time.sleep, 100, restart='permanent')\n"
        "while child.pid is None:\n    time.sleep(0.01)\n"
        "say(pids=sup.worker_pids())\n"
    ),
}


@pytest.mark.slow
@pytest.mark.parametrize("ending", list(EXIT_ENDINGS))
def test_interpreter_exit_is_not_blocked_by_a_hung_task(ending: str) -> None:
    """A script that ends with a hung task in flight exits promptly and leaves no worker."""
    say = "say(pids=parstream.default_supervisor().worker_pids())"
    proc = run_script(EXIT_ENDINGS[ending].replace("SAY", say))
    try:
        pids = read_json(proc)["pids"]
        assert pids
        assert proc.wait(15) == 0  # its task sleeps 100 s: the exit did not wait for it
        assert wait_all_gone(pids, 10.0) == []
    finally:
        finish(proc)


def exits_and_leaves_no_worker(proc: subprocess.Popen[str]) -> tuple[str, str]:
    """After the script's ``say(pids=...)``: it exits by itself with status 0,
    its workers gone; what it printed after that, and its stderr."""
    try:
        pids = read_json(proc)["pids"]
        assert proc.wait(30) == 0
        out, err = proc.communicate()
        assert wait_all_gone(pids, 10.0) == []
        return out, err
    finally:
        finish(proc)


QUEUED_BEHIND = {
    "start": "sup.start(time.sleep, 3600)\n",
    "stream": (
        "stream = iter(sup.async_stream(time.sleep, [3600]))\n"
        "threading.Thread(target=next, args=(stream, None), daemon=True).start()\n"
    ),
}


@pytest.mark.parametrize("what", list(QUEUED_BEHIND))
def test_exit_kills_what_a_pending_future_waits_behind(what: str) -> None:
    """At exit, pending futures run first (as the stdlib's), then everything
    else is killed. A future queued behind a start() task or a stream for a
    worker waited as long as that ran: an hour here, the exit with it. Exit
    now kills those first."""
    proc = run_script(
        "import threading\n"
        "sup = parstream.Supervisor(max_workers=1)\n" + QUEUED_BEHIND[what] + "time.sleep(0.5)\n"
        "future = sup.submit(abs, -7)\n"
        "future.add_done_callback(lambda f: print('future', f.result(), flush=True))\n"
        "say(pids=sup.worker_pids())\n"
    )
    out, err = exits_and_leaves_no_worker(proc)
    assert out.split() == ["future", "7"], (out, err[-2000:])


DAEMON_READERS = {
    "stream": (
        "def consume():\n"
        "    for r in parstream.map(time.sleep, [30] * 4):\n"
        "        print(r, flush=True)\n"
        "    print('the stream ended', flush=True)\n"
    ),
    "task": ("def consume():\n    print(parstream.async_(time.sleep, 30).await_(), flush=True)\n"),
    "await_many": (
        "def consume():\n"
        "    tasks = [parstream.async_(time.sleep, 30) for _ in range(2)]\n"
        "    print(parstream.await_many(tasks), flush=True)\n"
    ),
}


@pytest.mark.parametrize("what", list(DAEMON_READERS))
def test_a_daemon_thread_waiting_on_parstream_at_exit_dies_silently(what: str) -> None:
    """Exit kills the streams and tasks still running, and a daemon thread
    waiting on one got SupervisorClosed or TaskShutdown: a traceback printed
    at exit, whole or cut off (for a stream, in about half the runs). It now
    blocks, as one reading Pool.imap or waiting on apply_async().get()
    does, and dies with the interpreter: no traceback, and no end of a
    stream that would pass its partial results off as whole."""
    for _ in range(2):
        proc = run_script(
            "import atexit, threading, weakref\n"
            # weakref's exit hook registered after parstream's, so it runs
            # first (as it happened to in CI): it ran linked tasks' finalisers,
            # which killed them before parstream's exit began.
            "import parstream._supervisor\n"
            "atexit.register(time.sleep, 0.5)\n"
            "atexit.register(weakref.finalize._exitfunc)\n"
            + DAEMON_READERS[what]
            + "threading.Thread(target=consume, daemon=True).start()\n"
            "time.sleep(1.0)\n"
            "say(pids=parstream.default_supervisor().worker_pids())\n"
        )
        out, err = exits_and_leaves_no_worker(proc)
        assert out == "", out
        assert "Traceback" not in err, err
        assert "Exception in thread" not in err, err


EXIT_WITH_WORK_AROUND_FUTURES = {
    # A done-callback still reading a stream when exit began: the exit waits
    # for callbacks, and the stream was closed under it (made to wait for
    # good, as a daemon thread's is): exit hung.
    "callback reading a stream": (
        """
        def slow(x):
            time.sleep(0.2)
            return x

        def post_process(future):
            sum(parstream.map(slow, range(10)))

        sup = parstream.Supervisor(max_workers=2)
        f = sup.submit(slow, 1)
        f.add_done_callback(post_process)
        print("result", f.result(), flush=True)
        time.sleep(0.5)
        """,
        ["result", "1"],
    ),
    # A Supervisor dropped with a background task and a future queued behind
    # it: exit killed the tasks of live Supervisors only, then waited.
    "dropped supervisor": (
        """
        def work():
            sup = parstream.Supervisor(max_workers=1)
            sup.start(time.sleep, 3600)
            f = sup.submit(abs, -7)
            f.add_done_callback(lambda f: print("future", f.result(), flush=True))

        work()
        time.sleep(0.5)
        """,
        ["future", "7"],
    ),
    # A job that submits itself again from its done-callback: exit waited
    # until it looked at a moment with nothing pending (5 s to over 40 s).
    # New futures are refused at exit, as the stdlib refuses them.
    "job rescheduling itself": (
        """
        def slow(x):
            time.sleep(0.1)
            return x

        ex = parstream.Supervisor(max_workers=2)

        def again(f):
            try:
                ex.submit(slow, f.result() + 1).add_done_callback(again)
            except RuntimeError:
                print("refused", flush=True)

        ex.submit(slow, 0).add_done_callback(again)
        time.sleep(0.5)
        """,
        ["refused"],
    ),
}


@pytest.mark.parametrize("case", list(EXIT_WITH_WORK_AROUND_FUTURES))
def test_exit_with_work_around_pending_futures_is_prompt(case: str) -> None:
    body, want = EXIT_WITH_WORK_AROUND_FUTURES[case]
    proc = run_script(body)
    try:
        out, err = proc.communicate(timeout=40)
    finally:
        finish(proc)
    assert proc.returncode == 0, err[-3000:]
    assert out.split() == want, (out, err[-2000:])


# -- (c) Ctrl-C -------------------------------------------------------------------------

# Each wait announces itself just before it blocks, so the SIGINT lands inside it.
WAITS = {
    "await_": "ready()\ntask.await_()",
    "await_many": "ready()\nparstream.await_many([task, other])",
    "yield_": "ready()\ntask.yield_(60)",
    "yield_many": "ready()\nparstream.yield_many([task, other], 60)",
    "asyncio": (
        "import asyncio\n"
        "async def main():\n"
        "    ready()\n"
        "    return await task\n"
        "asyncio.run(main())"
    ),
}


@pytest.mark.slow
@pytest.mark.parametrize("how", list(WAITS))
def test_ctrl_c_interrupts_the_wait_and_kills_the_task(how: str) -> None:
    """Ctrl-C: KeyboardInterrupt within ~1 s, the task dies, the pool works, no worker survives."""
    wait_code = textwrap.indent(WAITS[how], "    ")
    proc = run_script(
        f"""
sup = parstream.default_supervisor()
task = parstream.async_(time.sleep, 30)
other = parstream.async_(time.sleep, 30)
wait_started(task)
wait_started(other)

def ready():
    # Announce from a timer thread, so the main thread is already blocked in the
    # wait when the test, reading this line, sends SIGINT.
    import threading
    fields = dict(pids=sup.worker_pids(), task=task.pid, other=other.pid)
    threading.Timer(0.3, lambda: say(**fields)).start()

try:
{wait_code}
    say(ki=None)
except KeyboardInterrupt:
    say(ki=time.time(), done=task.done())
say(after=parstream.async_(os.getpid).await_(20))
"""
    )
    try:
        first = read_json(proc)
        pids = first["pids"]
        sent = time.time()
        os.killpg(proc.pid, signal.SIGINT)
        msg = read_json(proc)
        assert msg["ki"] is not None, "the wait returned instead of raising KeyboardInterrupt"
        assert msg["ki"] - sent < 10.0  # not at the end of the task's 30 s
        assert msg["done"], "the interrupted wait left its task running"
        assert wait_all_gone([first["task"]], 10.0) == []
        after = read_json(proc)["after"]
        assert after != first["task"]
        assert proc.wait(15) == 0
        assert wait_all_gone([*pids, after], 3.0) == []
    finally:
        finish(proc)


CLEANUP_CALLS = {
    "map": "list(parstream.map(nap, range(2)))",
    "await_": "parstream.async_(nap, 0).await_()",
    "await_many": "parstream.await_many([parstream.async_(nap, i) for i in range(2)])",
    # asyncio.run has a SIGINT handler of its own (the first cancels the main task).
    "asyncio": "__import__('asyncio').run(awaits())",
}


@pytest.mark.slow
@pytest.mark.parametrize("how", list(CLEANUP_CALLS))
def test_a_second_ctrl_c_during_the_first_ones_cleanup_leaves_nothing_running(how: str) -> None:
    """Two Ctrl-C a few ms apart: the second used to land while the first's
    kill ran (the first kill in a process imports psutil), leaving a worker
    busy for good and the next call waiting behind it. Now it waits for the
    kill, then raises."""
    proc = run_script(
        f"""
import threading
def nap(_):
    time.sleep(60)
async def awaits():
    await parstream.async_(nap, 0)
sup = parstream.default_supervisor()
threading.Timer(0.5, lambda: say(pids=sup.worker_pids())).start()
try:
    try:
        {CLEANUP_CALLS[how]}
    except KeyboardInterrupt:
        time.sleep(2)
except KeyboardInterrupt:
    pass
except RuntimeError as exc:
    # asyncio.run's own race: a second Ctrl-C just as its main task ends can
    # stop its loop in the middle of its cleanup ("Event loop stopped before
    # Future completed"); what is checked here is what parstream left behind.
    if not isinstance(exc.__context__, KeyboardInterrupt):
        raise
deadline = time.monotonic() + 10  # the killed worker's death reaches the hub
while [w for w in sup.workers() if w.busy] and time.monotonic() < deadline:
    time.sleep(0.02)
say(busy=[w.pid for w in sup.workers() if w.busy])
say(after=sorted(parstream.map(abs, [-1, -2])))
"""
    )
    try:
        pids = read_json(proc)["pids"]
        os.killpg(proc.pid, signal.SIGINT)
        time.sleep(0.005)
        os.killpg(proc.pid, signal.SIGINT)
        assert read_json(proc)["busy"] == []
        assert read_json(proc)["after"] == [1, 2]
        assert proc.wait(15) == 0
        assert wait_all_gone(pids, 3.0) == []
    finally:
        finish(proc)


# -- (d) __main__ code --------------------------------------------------------------------


def test_main_module_lambdas_closures_and_classes() -> None:
    """Lambdas, closures and classes defined in a -c script's __main__ work as tasks."""
    proc = run_script(
        """
        class Point:
            def __init__(self, x):
                self.x = x

        offset = 10
        def shifted(x):
            return x + offset

        with parstream.Supervisor(max_workers=2) as sup:
            assert sup.async_(lambda: 41 + 1).await_(30) == 42
            assert sup.async_(lambda: os.getpid()).await_(30) != os.getpid()
            assert sup.async_(shifted, 1).await_(30) == 11
            p = sup.async_(Point, 3).await_(30)
            assert isinstance(p, Point) and p.x == 3
            assert sup.submit(lambda p: p.x * 2, Point(4)).result(30) == 8
            assert list(sup.stream_map(lambda p: p.x * 2, [Point(1), Point(2)])) == [2, 4]
        assert parstream.async_(lambda: "default").await_(30) == "default"
        say(ok=True)
        """
    )
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert json.loads(out.strip().splitlines()[-1]) == {"ok": True}


# -- (e) no network ------------------------------------------------------------------------


def _listening(p: psutil.Process) -> set[Any]:
    return {c.laddr for c in p.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN}


def test_no_listening_socket(sup: parstream.Supervisor) -> None:
    """Local mode opens no listening inet socket, in the parent or any worker.

    (The parent's own, such as a Ray driver's from another test, are left out.)
    """
    before = _listening(psutil.Process())
    pids = set(parstream.await_many([sup.async_(os.getpid) for _ in range(4)], 30))
    assert pids <= set(sup.worker_pids())
    assert _listening(psutil.Process()) <= before
    for pid in sup.worker_pids():
        assert _listening(psutil.Process(pid)) == set(), pid


def test_worker_logging_reaches_the_parent_logger(
    sup: parstream.Supervisor, caplog: pytest.LogCaptureFixture
) -> None:
    """A worker's log record arrives on the parent's parstream logger with its item index."""
    with caplog.at_level(logging.INFO):
        list(sup.stream_map(_log_item, range(3)))
        deadline = time.monotonic() + 5
        while sum("hello" in r.getMessage() for r in caplog.records) < 3:
            assert time.monotonic() < deadline, caplog.records
            time.sleep(0.02)
    messages = [r.getMessage() for r in caplog.records if r.name == "parstream"]
    assert any("[item 2," in m and "hello 2" in m for m in messages), messages


def _log_item(x: int) -> int:
    logging.getLogger("user.code").info("hello %d", x)
    return x


@pytest.mark.parametrize("chunksize", [1, 10, None])
def test_every_log_record_names_its_own_item(
    sup: parstream.Supervisor, caplog: pytest.LogCaptureFixture, chunksize: int | None
) -> None:
    """Inside a batch the index used to lag (the items finished at the last
    flush): 239 of 300 records named the wrong item with chunksize=10."""
    with caplog.at_level(logging.INFO):
        list(sup.stream_map(_log_item, range(60), chunksize=chunksize))
        deadline = time.monotonic() + 10
        while sum("hello" in r.getMessage() for r in caplog.records) < 60:
            assert time.monotonic() < deadline, len(caplog.records)
            time.sleep(0.02)
    wrong = []
    for r in caplog.records:
        m = r.getMessage()
        if r.name == "parstream" and "hello" in m:
            index = int(m.split("[item ", 1)[1].split(",", 1)[0])
            if m.rsplit("hello ", 1)[1] != str(index):
                wrong.append(m)
    assert wrong == []


def _log_rarely(x: int) -> int:
    if x % 9_973 == 5:
        logging.getLogger("user.code").warning("rare %d", x)
    return x


def test_a_log_record_among_tiny_items_names_its_item_or_its_step(
    sup: parstream.Supervisor, caplog: pytest.LogCaptureFixture
) -> None:
    """Among tiny items (run a step at a time) a record named the items
    finished at the last reading of the clock: thousands of items off. It
    names the exact item, or the step (of at most 32 items) it came from."""
    n = 60_000
    want = [x for x in range(n) if x % 9_973 == 5]
    with caplog.at_level(logging.WARNING):
        assert list(sup.stream_map(_log_rarely, range(n))) == list(range(n))
        wait_until(lambda: sum("rare" in r.getMessage() for r in caplog.records) >= len(want), 10)
    for r in caplog.records:
        m = r.getMessage()
        if r.name != "parstream" or "rare" not in m:
            continue
        x = int(m.rsplit("rare ", 1)[1])
        where = m.split("[", 1)[1].split(",", 1)[0]
        if where.startswith("one of items "):
            lo, hi = map(int, where.removeprefix("one of items ").split("-"))
            assert lo <= x <= hi, m
            assert hi - lo < 32, m
        else:
            assert where == f"item {x}", m


def _loaded_by_a_bare_interpreter(names: tuple[str, ...]) -> set[str]:
    """Which of ``names`` this interpreter loads before any code of ours runs.

    A ``.pth`` file in site-packages runs at every start: on the CI machine one
    imports certifi, which imports typing. A worker's start can only promise to
    add none of these; what the interpreter itself brings is the baseline.
    """
    code = f"import sys; print(*[n for n in {names!r} if n in sys.modules])"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    return set(out.stdout.split())


@pytest.mark.parametrize(
    "sent", [b"", pickle.dumps({"path": ["x" * 1000]})[:40]], ids=["nothing", "cut short"]
)
def test_a_worker_whose_parent_died_before_sending_its_start_exits_quietly(sent: bytes) -> None:
    """A worker started just before its parent died finds its start data
    missing or cut short: it exits, without the ``EOFError`` (or
    ``UnpicklingError``) traceback it printed on the user's terminal after
    the program had ended (found by the nesting hunt and the review)."""
    from parstream._backends.local import _spawn

    r, w = os.pipe()
    os.write(w, sent)
    os.close(w)  # the parent is gone
    try:
        proc = subprocess.run(
            [sys.executable, "-c", _spawn.BOOT, str(r)],
            pass_fds=(r,),
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    finally:
        os.close(r)
    assert proc.returncode == 70
    assert proc.stderr == ""


def test_a_fresh_worker_starts_without_the_modules_it_does_not_need() -> None:
    """A worker's start stays light (issue 12): typing, cloudpickle, logging,
    traceback, multiprocessing, enum, signal and importlib come only when a
    task or a failure needs them (a spare imports cloudpickle while it
    waits; the first worker is no spare). Those a bare ``python -c`` already
    loads are left out."""
    import _lazy_logging_funcs as lazy

    baseline = _loaded_by_a_bare_interpreter(lazy.LEFT_OUT_AT_START)
    with parstream.Supervisor(max_workers=1) as s:
        loaded = s.async_(lazy.start_imports_left_out).await_(30)
    assert sorted(set(loaded) - baseline) == []


def test_a_task_that_imports_logging_itself_is_forwarded_at_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A worker starts without logging (issue 12: ~5 ms of its start), yet a
    task that imports logging while it runs has its very first record
    forwarded. (Where the interpreter's own start imports logging, the
    records are forwarded all the same.)"""
    import _lazy_logging_funcs as lazy

    bare = "logging" in _loaded_by_a_bare_interpreter(("logging",))
    with caplog.at_level(logging.WARNING), parstream.Supervisor(max_workers=1) as s:
        assert s.async_(lazy.logging_imported).await_(30) is bare  # a fresh worker
        assert s.async_(lazy.log_after_importing, "first").await_(30) is bare
        assert s.async_(lazy.log_after_importing, "again").await_(30) is True
    with caplog.at_level(logging.WARNING), parstream.Supervisor(max_workers=1) as s:
        # importlib.util.find_spec("logging") imports nothing: the hook stays.
        assert s.async_(lazy.find_then_log, "it").await_(30) is bare
        deadline = time.monotonic() + 5
        while sum("lazy" in r.getMessage() for r in caplog.records) < 3:
            assert time.monotonic() < deadline, caplog.records
            time.sleep(0.02)
    messages = [r.getMessage() for r in caplog.records if r.name == "parstream"]
    assert sum("lazy first" in m for m in messages) == 1, messages
    assert sum("lazy again" in m for m in messages) == 1, messages
    assert sum("found it" in m for m in messages) == 1, messages


def test_a_supervisor_collected_while_its_registry_is_locked_does_not_deadlock() -> None:
    """A dropped Supervisor's finaliser takes the registry lock; a collection
    can run it on a thread inside that lock (3.12 collects between any two
    bytecodes: a CI run hung in ``ExecutorCore.__init__`` so)."""
    import gc

    from parstream import _executor

    s = parstream.Supervisor(max_workers=1)
    s.close()
    with _executor._cores_lock:
        del s
        gc.collect()
    with parstream.Supervisor(max_workers=1) as again:
        assert again.async_(os.getpid).await_(30) > 0


def test_workers_run_with_the_parents_interpreter_flags() -> None:
    """``python -W error`` makes a task's warning an error, as multiprocessing's
    spawn does; workers used to start without the parent's flags."""
    code = textwrap.dedent(
        """
        import warnings, parstream
        def warn():
            warnings.warn("from a task")
            return "no error"
        try:
            print(parstream.async_(warn).await_(30))
        except UserWarning as e:
            print("raised", e)
        """
    )
    out = subprocess.run(
        [sys.executable, "-W", "error", "-c", code], capture_output=True, text=True, timeout=60
    )
    assert out.stdout.strip() == "raised from a task", (out.stdout, out.stderr[-2000:])


def test_processes_a_task_starts_get_a_plain_interpreter() -> None:
    """A worker's interpreter is a plain one, so what a task starts with the
    interpreter's flags (multiprocessing's spawn, loky inside a task, as
    joblib and scikit-learn's ``n_jobs`` do) is one too: site has run, the
    venv's prefix and the builtins are there, and loky's resource tracker
    finds its modules. (Workers started with ``python -S`` once passed the
    flag on, and loky's tracker failed with ModuleNotFoundError.)"""
    root = os.path.dirname(os.path.dirname(os.path.abspath(parstream.__file__)))
    code = textwrap.dedent(
        f"""
        import sys
        sys.path.insert(0, {root!r})
        # a regular install: no import hook but the standard ones
        sys.meta_path[:] = [
            f for f in sys.meta_path
            if (f if isinstance(f, type) else type(f)).__module__
            in ("_frozen_importlib", "_frozen_importlib_external", "_distutils_hack")
        ]
        import json, multiprocessing
        import parstream
        from probe import view

        def in_spawned_child():
            ctx = multiprocessing.get_context("spawn")
            with ctx.Pool(1) as pool:
                return pool.apply(view)

        def with_loky():
            import loky
            ex = loky.get_reusable_executor(max_workers=1)
            try:
                return ex.submit(abs, -3).result(timeout=60)
            finally:
                ex.shutdown(wait=True, kill_workers=True)

        if __name__ == "__main__":
            with parstream.Supervisor(max_workers=1) as s:
                got = [s.async_(in_spawned_child).await_(60), s.async_(with_loky).await_(90)]
            print(json.dumps([got, view()]))
        """
    )
    with tempfile.TemporaryDirectory() as d:
        script = os.path.join(d, "main.py")
        with open(script, "w") as f:
            f.write(code)
        with open(os.path.join(d, "probe.py"), "w") as f:
            f.write(
                "def view():\n"
                "    import builtins, sys\n"
                "    exit = callable(getattr(builtins, 'exit', None))\n"
                "    return [sys.flags.no_site, sys.prefix, exit]\n"
            )
        out = subprocess.run(
            [sys.executable, script], capture_output=True, text=True, timeout=150, cwd=d
        )
    assert out.returncode == 0, out.stderr[-3000:]
    (child, loky_result), here = json.loads(out.stdout)
    assert child == here
    assert loky_result == 3
    assert "Error" not in out.stderr, out.stderr[-3000:]
    assert "Traceback" not in out.stderr, out.stderr[-3000:]
