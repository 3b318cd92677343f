"""Notebooks executed by a real Jupyter kernel, and parstream's behaviour inside one (issue 5).

The kernel runs this test's interpreter (a kernelspec made for the test, so a
user-level one cannot shadow it), with ``PYTEST_CURRENT_TEST`` scrubbed from
its environment (ipykernel turns off the fd capture that brings worker output
into cells when it sees it), over IPC rather than TCP, and is shut down
immediately rather than gracefully (which costs seconds once workers were
used).
"""

from __future__ import annotations

import json
import os
import queue
import sys
import textwrap
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psutil
import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
jupyter_client = pytest.importorskip("jupyter_client")

from jupyter_client.kernelspec import KernelSpecManager  # noqa: E402
from nbclient.exceptions import CellExecutionError  # noqa: E402

if TYPE_CHECKING:
    from collections.abc import Iterator

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))

pytestmark = [
    pytest.mark.notebook,
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    pytest.mark.filterwarnings("ignore::ResourceWarning"),
    # nbclient and jupyter_client leave zmq sockets to the garbage collector.
    pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning"),
]


def kernel_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTEST_CURRENT_TEST"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    return env


def kernel_manager(tmp: Path) -> Any:
    """A KernelManager for this interpreter, over IPC, from a kernelspec of our own."""
    spec_dir = tmp / "kernels" / "parstream-test"
    spec_dir.mkdir(parents=True, exist_ok=True)
    spec = {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "parstream test",
        "language": "python",
    }
    (spec_dir / "kernel.json").write_text(json.dumps(spec))
    ksm = KernelSpecManager(kernel_dirs=[str(tmp / "kernels")])
    return jupyter_client.KernelManager(
        kernel_name="parstream-test",
        kernel_spec_manager=ksm,
        transport="ipc",
        ip=str(tmp / "ipc"),
    )


def descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return []


def busy(procs: list[psutil.Process]) -> list[int]:
    """Pids using more than half a core over 0.2 s."""
    for p in procs:
        try:
            p.cpu_percent(None)
        except psutil.Error:
            pass
    time.sleep(0.2)
    out = []
    for p in procs:
        try:
            if p.cpu_percent(None) > 50:
                out.append(p.pid)
        except psutil.Error:
            pass
    return out


def all_gone(pids: list[int], within: float) -> list[int]:
    deadline = time.monotonic() + within
    left = pids
    while left and time.monotonic() < deadline:
        left = []
        for pid in pids:
            try:
                if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                    left.append(pid)
            except psutil.Error:
                pass
        time.sleep(0.05)
    return left


@pytest.mark.slow
@pytest.mark.timeout(240)
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_runs_in_a_real_kernel(path: Path, tmp_path: Path) -> None:
    """Every cell runs without error; afterwards no worker is busy and none survives."""
    nb = nbformat.read(path, as_version=4)
    km = kernel_manager(tmp_path)
    client = nbclient.NotebookClient(
        nb,
        km=km,
        timeout=180,
        shutdown_kernel="immediate",
        resources={"metadata": {"path": str(path.parent)}},
    )
    failure: str | None = None
    leftover: list[int] = []
    with client.setup_kernel(env=kernel_env()):
        kernel = psutil.Process(km.provisioner.process.pid)
        every_child = descendants(kernel.pid)
        assert os.path.realpath(kernel.cmdline()[0]) == os.path.realpath(sys.executable)
        try:
            for index, cell in enumerate(nb.cells):
                client.execute_cell(cell, index)
        except CellExecutionError as exc:
            failure = f"{exc.ename}: {exc.evalue} (in {path.name})\n{exc}"
        if failure is None:
            children = descendants(kernel.pid)
            assert busy(children) == [], "workers still busy after the last cell"
            leftover = [c.pid for c in children]
        # nbclient shuts down only kernels it started itself; this one is ours.
        client.kc.stop_channels()
        km.shutdown_kernel(now=True)
    leftover += [c.pid for c in every_child]
    nbformat.write(nb, tmp_path / path.name)
    if failure is not None:
        pytest.fail(failure, pytrace=False)
    assert all_gone(leftover, 10.0) == []
    if path.name == "compare.ipynb":
        # Each Comparison cell rendered through _repr_html_: table, bars and advice.
        pages = [
            out["data"]["text/html"]
            for cell in nb.cells
            if cell.cell_type == "code"
            for out in cell.outputs
            if "text/html" in out.get("data", {})
        ]
        tables = [p for p in pages if '<table class="parstream-compare-table">' in p]
        assert len(tables) == 3, pages
        assert all("<b>advice</b>:" in p and "background:#c44e52" in p for p in tables)


class Kernel:
    """A live kernel driven cell by cell, as a notebook front end would."""

    def __init__(self, tmp: Path) -> None:
        self.km = kernel_manager(tmp)
        self.km.start_kernel(env=kernel_env())
        self.kc = self.km.client()
        self.kc.start_channels()
        self.kc.wait_for_ready(timeout=60)
        self.pid = self.km.provisioner.process.pid

    def start(self, code: str) -> str:
        return str(self.kc.execute(textwrap.dedent(code)))

    def reply(self, msg_id: str, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"no reply within {timeout} s")
            try:
                msg = self.kc.get_shell_msg(timeout=remaining)
            except queue.Empty:
                continue
            if msg["parent_header"].get("msg_id") == msg_id:
                return dict(msg["content"])

    def run(self, code: str, timeout: float = 60) -> tuple[dict[str, Any], str]:
        """Run a cell; return its reply and everything it printed."""
        msg_id = self.start(code)
        content = self.reply(msg_id, timeout)
        out = []
        # Worker output reaches the kernel through its fd-capture thread and
        # may trail the idle status; it still carries this cell's header (so a
        # front end shows it in this cell), so listen until the channel is quiet.
        while True:
            try:
                msg = self.kc.get_iopub_msg(timeout=0.5)
            except queue.Empty:
                break
            if msg["parent_header"].get("msg_id") == msg_id and msg["msg_type"] == "stream":
                out.append(msg["content"]["text"])
        return content, "".join(out)

    def close(self) -> None:
        pids = [c.pid for c in descendants(self.pid)]
        self.kc.stop_channels()
        self.km.shutdown_kernel(now=True)
        assert all_gone(pids, 10.0) == []


@pytest.fixture
def kernel(tmp_path: Path) -> Iterator[Kernel]:
    k = Kernel(tmp_path)
    try:
        yield k
    finally:
        k.close()


SETUP = """
import os, time, pathlib, parstream
MARKS = pathlib.Path({marks!r})

def slow(x):
    (MARKS / f"start-{{x}}").touch()
    time.sleep(3)
    (MARKS / f"done-{{x}}").touch()
    return x
"""

INTERRUPTED = {
    "async_stream": "list(parstream.async_stream(slow, range(20), max_concurrency=2))",
    "map": "list(parstream.map(slow, range(20)))",
    "await_": "parstream.async_(slow, 0).await_()",
    # Top-level awaits: the kernel cancels the cell's coroutine when its event
    # loop next wakes, which waited for the running item's end (seconds).
    "await task": "await parstream.async_(slow, 0)",
    "async for": "async for r in parstream.async_stream(slow, range(20)):\n    pass",
}


@pytest.mark.slow
@pytest.mark.timeout(120)
@pytest.mark.parametrize("call", list(INTERRUPTED))
def test_interrupt_stops_everything(kernel: Kernel, tmp_path: Path, call: str) -> None:
    """An interrupt returns before the running items could finish, runs nothing
    more, and leaves a healthy pool."""
    marks = tmp_path / "marks"
    marks.mkdir()
    content, _ = kernel.run(SETUP.format(marks=str(marks)))
    assert content["status"] == "ok", content
    kernel.run("parstream.default_supervisor().async_(abs, -1).await_()")  # warm workers
    msg_id = kernel.start(INTERRUPTED[call])
    deadline = time.monotonic() + 30
    while not list(marks.glob("start-*")):
        assert time.monotonic() < deadline
        time.sleep(0.02)
    time.sleep(0.5)
    kernel.km.interrupt_kernel()
    reply = kernel.reply(msg_id, timeout=10)
    assert reply["status"] == "error"
    # ipykernel cancels a top-level await: CancelledError, its KeyboardInterrupt.
    assert reply["ename"] in ("KeyboardInterrupt", "CancelledError")
    started = sorted(p.name for p in marks.glob("start-*"))
    time.sleep(3.5)  # longer than a task: anything still running would finish now
    assert sorted(p.name for p in marks.glob("start-*")) == started
    # The interrupt came ~0.5 s into 3 s items: none of those running ended.
    assert list(marks.glob("done-*")) == []
    assert busy(descendants(kernel.pid)) == []
    content, out = kernel.run("print(list(parstream.map(abs, range(-4, 4))))")
    assert content["status"] == "ok", content
    assert "[4, 3, 2, 1, 0, 1, 2, 3]" in out


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_notebook_code_output_and_await(kernel: Kernel) -> None:
    """Cell-defined classes and lambdas work; worker prints land in the cell, in order."""
    content, out = kernel.run(
        """
        import parstream

        class Point:
            def __init__(self, x):
                self.x = x

        def shout(x):
            print(f"worker says {x}")
            return Point(x)

        points = list(parstream.map(shout, range(4), max_concurrency=1))
        print(all(isinstance(p, Point) for p in points), [p.x for p in points])
        print(list(parstream.map(lambda v: v * 3, [1, 2])))
        """
    )
    assert content["status"] == "ok", content
    lines = [line for line in out.splitlines() if line.startswith("worker says")]
    assert lines == [f"worker says {x}" for x in range(4)]
    assert "True [0, 1, 2, 3]" in out
    assert "[3, 6]" in out
    content, out = kernel.run(
        """
        value = await parstream.async_(pow, 2, 10)
        got = [r.value async for r in parstream.async_stream(abs, [-1, -2])]
        print(value, got)
        """
    )
    assert content["status"] == "ok", content
    assert "1024 [1, 2]" in out


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_a_tasks_traceback_shows_the_cells_source(kernel: Kernel) -> None:
    """The worker's part of a task's traceback named the cell's frame with
    no code line (the cell's source is in the kernel's linecache only); the
    stdlib's fork pool shows it."""
    content, _ = kernel.run(
        """
        import parstream

        def inner(x):
            y = x * 2
            raise ValueError(f"bad {y}")
        """
    )
    assert content["status"] == "ok", content
    content, out = kernel.run(
        """
        try:
            list(parstream.map(inner, [1]))
        except ValueError as e:
            text = str(e.__cause__)
        print("SOURCE SHOWN" if 'raise ValueError(f"bad {y}")' in text else text)
        """
    )
    assert content["status"] == "ok", content
    assert "SOURCE SHOWN" in out, out


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_worker_output_comes_before_what_the_cell_prints_next(kernel: Kernel) -> None:
    """Issue 8, item 15: a task's output reaches the cell before the cell's next print,
    each on its own line, even when the kernel's fd-forwarding thread lags (Python 3.13)."""
    rounds = 150
    content, out = kernel.run(
        f"""
        import parstream

        def shout(x):
            print(f"worker says {{x}}")
            return x

        for i in range({rounds}):
            values = list(parstream.map(shout, range(3), max_concurrency=1))
            print(f"cell got {{values}} in round {{i}}")
        """
    )
    assert content["status"] == "ok", content
    expected = []
    for i in range(rounds):
        expected += [f"worker says {x}" for x in range(3)] + [f"cell got [0, 1, 2] in round {i}"]
    lines = out.splitlines()
    pairs = zip(lines, expected, strict=False)
    wrong = next((k for k, (a, b) in enumerate(pairs) if a != b), len(expected))
    assert lines == expected, lines[max(0, wrong - 4) : wrong + 4]
