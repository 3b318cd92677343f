"""The Ray backend on a real multi-node cluster (the session's ``ray_cluster``).

What the conformance suite cannot show from one process: placement on a
named node, a node dying under a stream, a hung task force-killed on a worker
node, code from ``__main__`` and closures travelling to other nodes, a
module the workers lack, and the driver's death stopping its tasks.
"""

from __future__ import annotations

import fractions
import functools
import gc
import json
import logging
import math
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
import weakref
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from _util import gone, read_line, wait_until

import parstream

if TYPE_CHECKING:
    from collections.abc import Iterator

    from conftest import RayCluster

pytestmark = pytest.mark.slow


@pytest.fixture
def rsup(ray_cluster: RayCluster) -> Iterator[parstream.Supervisor]:
    with parstream.Supervisor(backend="ray") as s:
        yield s


def node_id(_: Any = None) -> str:
    import ray

    return str(ray.get_runtime_context().get_node_id())


def write_pid_then_hang(path: str) -> None:
    Path(path).write_text(str(os.getpid()))
    time.sleep(120)


def slow_square(x: int) -> int:
    time.sleep(0.2)
    return x * x


def test_sizes_and_nodes_come_from_the_cluster(
    rsup: parstream.Supervisor, ray_cluster: RayCluster
) -> None:
    """max_workers is the cluster's CPUs; nodes() lists id, labels and CPUs."""
    assert rsup.max_workers == 2
    nodes = {n.id: n for n in rsup.nodes()}
    for name, nid in ray_cluster.nodes.items():
        assert nodes[nid].labels["wname"] == name
        assert nodes[nid].cpus == 1.0
    assert rsup.worker_pids() == []  # Ray's processes are not ours to signal


@pytest.mark.parametrize("by", ["id", "label"])
def test_node_places_every_item_there(
    rsup: parstream.Supervisor, ray_cluster: RayCluster, by: str
) -> None:
    """node= (an id or a label value) runs the task and every stream item there."""
    target = ray_cluster.nodes["w2"]
    node = target if by == "id" else "w2"
    assert rsup.async_(node_id, node=node).await_(timeout=60) == target
    assert set(rsup.stream_map(node_id, range(20), node=node)) == {target}
    child = rsup.start_child(node_id, node=node)
    assert child.wait(60) == parstream.Ok(target)


def test_an_unknown_node_is_an_error_at_call_time(rsup: parstream.Supervisor) -> None:
    """A node that does not exist: ValueError naming it, before anything runs."""
    with pytest.raises(ValueError, match="no-such-node"):
        rsup.async_(node_id, node="no-such-node")
    with pytest.raises(ValueError, match="no-such-node"):
        rsup.async_stream(node_id, range(3), node="no-such-node")
    with pytest.raises(ValueError, match="no-such-node"):
        rsup.start_child(node_id, node="no-such-node")


def test_node_is_refused_by_backends_without_nodes() -> None:
    with parstream.Supervisor(max_workers=1) as sup, pytest.raises(ValueError, match="no nodes"):
        sup.async_(node_id, node="w1")


def test_a_hung_task_on_a_worker_node_is_force_killed(
    rsup: parstream.Supervisor, tmp_path: Path
) -> None:
    """A per-item timeout force-cancels the task: its process dies, the rest go on."""
    path = str(tmp_path / "pid")
    fn = functools.partial(hang_or_square, path)
    results = list(rsup.async_stream_nolink(fn, [3, -1, 4], timeout=2.0, on_timeout="kill_task"))
    assert results[0] == parstream.Ok(9)
    assert results[2] == parstream.Ok(16)
    assert isinstance(results[1], parstream.Exit)
    assert isinstance(results[1].reason, parstream.TaskTimeout)
    assert gone(int(Path(path).read_text()), within=10)


def hang_or_square(path: str, x: int) -> int:
    if x < 0:
        write_pid_then_hang(path)
    return x * x


def test_shutdown_brutal_kill_kills_the_remote_process(
    rsup: parstream.Supervisor, tmp_path: Path
) -> None:
    path = tmp_path / "pid"
    task = rsup.async_(write_pid_then_hang, str(path))
    wait_until(lambda: path.exists() and path.read_text(), what="the task to start")
    assert task.shutdown(parstream.BRUTAL_KILL) is None
    assert gone(int(path.read_text()), within=10)


def serve_forever(folder: str, name: int) -> None:
    (Path(folder) / str(name)).write_text("up")
    while True:
        time.sleep(0.05)


def test_more_children_than_cpus_all_run_and_tasks_still_run(
    rsup: parstream.Supervisor, tmp_path: Path
) -> None:
    """Children hold their slots for ever. Past the cluster's CPUs a task holds
    none (as the local backend's extra workers oversubscribe the cores), so
    every child runs and a task after them too: Ray used to queue them behind
    the children for ever, and the supervisor stalled."""
    n = rsup.max_workers + 2
    for i in range(n):
        rsup.start_child(
            serve_forever, str(tmp_path), i, restart="permanent", shutdown=parstream.BRUTAL_KILL
        )
    wait_until(lambda: len(list(tmp_path.iterdir())) == n, within=60, what="every child to run")
    assert rsup.async_(pow, 2, 10).await_(timeout=60) == 1024


def test_exceptions_keep_type_and_remote_traceback(rsup: parstream.Supervisor) -> None:
    task = rsup.async_(divide, 1, 0)
    with pytest.raises(ZeroDivisionError) as info:
        task.await_(timeout=60)
    assert isinstance(info.value.__cause__, parstream.RemoteTraceback)
    assert "divide" in str(info.value.__cause__)


def divide(a: int, b: int) -> float:
    return a / b


def test_a_node_dying_fails_only_its_items(ray_cluster: RayCluster, tmp_path: Path) -> None:
    """A node removed mid-stream: NodeDied for the item on it; the rest run elsewhere."""
    cluster = ray_cluster.cluster
    doomed = cluster.add_node(num_cpus=1, labels={"role": "worker", "wname": "doomed"})
    cluster.wait_for_nodes()
    try:
        with parstream.Supervisor(backend="ray") as sup:
            assert sup.max_workers == 3
            # The other two nodes busy for a while: the stream's first item
            # can only start on the doomed node.
            busy = tmp_path / "busy"
            busy.mkdir()
            release = tmp_path / "release"
            for name in ("w1", "w2"):
                sup.async_nolink(note_node_then_wait, str(busy), name, str(release), node=name)
            wait_until(lambda: len(list(busy.iterdir())) == 2, what="the other nodes busy")
            fn = functools.partial(note_node_then_sleep, str(tmp_path))
            stream = sup.async_stream_nolink(fn, range(4), max_concurrency=1, chunksize=1)
            first = tmp_path / "0"
            next_result = iter_in_thread(stream)
            wait_until(lambda: first.exists() and first.read_text(), what="the first item")
            assert first.read_text() == doomed.node_id
            release.touch()  # the other nodes are free for the rest
            cluster.remove_node(doomed, allow_graceful=False)
            results = next_result()
    finally:
        if doomed in cluster.worker_nodes:  # pragma: no cover - removal failed
            cluster.remove_node(doomed)
    assert len(results) == 4
    assert isinstance(results[0], parstream.Exit)
    assert isinstance(results[0].reason, parstream.NodeDied)
    assert results[0].reason.node == doomed.node_id
    rest = [r.value for r in results[1:] if isinstance(r, parstream.Ok)]
    assert len(rest) == 3
    assert {nid for _, nid in rest} <= set(ray_cluster.nodes.values())


def note_node_then_sleep(folder: str, name: Any) -> tuple[int, str]:
    (Path(folder) / str(name)).write_text(node_id())
    time.sleep(2.0)
    return os.getpid(), node_id()


def note_node_then_wait(folder: str, name: str, release: str) -> str:
    """Keep a node busy until ``release`` exists (a minute at most)."""
    (Path(folder) / name).write_text(node_id())
    deadline = time.monotonic() + 60
    while not os.path.exists(release) and time.monotonic() < deadline:
        time.sleep(0.02)
    return name


def iter_in_thread(stream: Iterator[Any]) -> Any:
    """Consume ``stream`` on a thread; the returned call waits for the list."""
    out: list[Any] = []
    thread = threading.Thread(target=lambda: out.extend(stream), daemon=True)
    thread.start()

    def result() -> list[Any]:
        thread.join(timeout=60)
        assert not thread.is_alive()
        return out

    return result


def test_a_module_the_workers_lack_is_named_with_the_fix(
    rsup: parstream.Supervisor, tmp_path: Path
) -> None:
    """A function whose module only the driver can import: the error says how to ship it."""
    (tmp_path / "driver_only_mod.py").write_text("def f(x):\n    return x + 1\n")
    sys.path.insert(0, str(tmp_path))
    try:
        import driver_only_mod  # type: ignore[import-not-found]

        with pytest.raises(ModuleNotFoundError, match="runtime_env"):
            rsup.async_(driver_only_mod.f, 1).await_(timeout=60)
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("driver_only_mod", None)


DRIVER = textwrap.dedent(
    """
    import json, os, sys, time
    import parstream

    address, mode, out = sys.argv[1], sys.argv[2], sys.argv[3]
    backend = parstream.RayBackend(address=address)
    sup = parstream.Supervisor(backend=backend)
    if mode == "main":
        offset = 100
        def add_offset(x):  # defined in __main__, reads a __main__ global
            import ray
            return x + offset, ray.get_runtime_context().get_node_id()
        def closure(k):
            return lambda x: x * k
        got = list(sup.stream_map(add_offset, range(6), chunksize=1))
        got2 = list(sup.stream_map(closure(3), range(4)))
        print(json.dumps({"main": got, "closure": got2}), flush=True)
    elif mode == "shutdown":
        import ray
        child = sup.start_child(time.sleep, 0.2, restart="permanent")
        time.sleep(0.5)
        ray.shutdown()  # the user's own doing, under a live Supervisor
        time.sleep(2.0)  # the child ended meanwhile: its restart finds no Ray
        try:
            sup.async_(abs, -1)
            refused = ""
        except parstream.SupervisorClosed as exc:
            refused = str(exc)
        print(json.dumps({"refused": refused, "ray_up": ray.is_initialized()}), flush=True)
        sup.close()
    else:
        def beat(path):
            while True:
                with open(path, "a") as f:
                    f.write("x")
                time.sleep(0.02)
        sup.async_nolink(beat, out)
        while not os.path.exists(out):
            time.sleep(0.01)
        print("ready", flush=True)
        if mode == "exit":
            sys.exit(0)  # with the task still running: parstream's exit kills it
        time.sleep(120)
    """
)


def run_driver(ray_cluster: RayCluster, mode: str, out: str) -> subprocess.Popen[str]:
    env = {**os.environ, **ray_cluster.env}
    return subprocess.Popen(
        [sys.executable, "-c", DRIVER, ray_cluster.address, mode, out],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )


def test_main_functions_and_closures_run_on_worker_nodes(
    ray_cluster: RayCluster, tmp_path: Path
) -> None:
    """A script's own functions (in __main__) and closures travel by value."""
    proc = run_driver(ray_cluster, "main", str(tmp_path / "unused"))
    out, _ = proc.communicate(timeout=90)
    assert proc.returncode == 0, out
    data = json.loads(out.strip().splitlines()[-1])
    assert [v for v, _ in data["main"]] == [100 + x for x in range(6)]
    assert {nid for _, nid in data["main"]} <= set(ray_cluster.nodes.values())
    assert data["closure"] == [0, 3, 6, 9]


def test_the_drivers_death_stops_its_tasks(ray_cluster: RayCluster, tmp_path: Path) -> None:
    """SIGKILL of the driver: its task on the cluster stops (Ray fate-sharing)."""
    beat = tmp_path / "beat"
    proc = run_driver(ray_cluster, "kill", str(beat))
    try:
        assert proc.stdout is not None
        assert read_line(proc.stdout).strip() == "ready"
        wait_until(lambda: beat.stat().st_size > 3, what="heartbeats")
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        # Anything still running writes 50 beats a second: the file must
        # stop growing (for a whole second) within Ray's clean-up time.
        deadline = time.monotonic() + 30
        size = beat.stat().st_size
        while True:
            time.sleep(1.0)
            now = beat.stat().st_size
            if now == size:
                break
            assert time.monotonic() < deadline, "the task outlived its driver"
            size = now
    finally:
        if proc.poll() is None:  # pragma: no cover
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


def test_exit_with_a_ray_task_running_is_clean(ray_cluster: RayCluster, tmp_path: Path) -> None:
    """Ray's exit hook (registered by ray.init, after parstream's) ran first:
    the event thread then crashed reading a stream of a Ray shut down, and
    its clean-up started Ray again (a second local Ray, a segfault, or a
    connection to another cluster on the machine)."""
    beat = tmp_path / "beat"
    env = {**os.environ, **ray_cluster.env}
    proc = subprocess.run(
        [sys.executable, "-c", DRIVER, ray_cluster.address, "exit", str(beat)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["ready"]
    assert "event thread crashed" not in proc.stderr, proc.stderr[-3000:]
    assert "Started a local Ray instance" not in proc.stderr
    size = beat.stat().st_size
    time.sleep(1.0)
    assert beat.stat().st_size == size, "the task outlived its driver's exit"


def test_a_shut_down_ray_is_not_started_again_behind_the_users_back(
    ray_cluster: RayCluster, tmp_path: Path
) -> None:
    """The user's ray.shutdown() under a live Supervisor: a child's restart
    (on a parstream thread) and the next call went on to ray.put, which
    started a Ray of its own, so the user's next ray.init failed. Now those
    are refused, saying why, and Ray stays down."""
    proc = run_driver(ray_cluster, "shutdown", str(tmp_path / "unused"))
    out, _ = proc.communicate(timeout=90)
    assert proc.returncode == 0, out
    data = json.loads(out.strip().splitlines()[-1])
    assert data["refused"], data  # SupervisorClosed, not a Ray started anew
    assert data["ray_up"] is False, data


def log_then(path: str, x: int) -> int:
    with open(path, "a") as f:
        f.write(f"{x}\n")
    if x == 3:
        os._exit(7)
    if x in (1, 2):
        time.sleep(0.008)
    return x


def test_items_of_5_ms_run_once_across_a_crash_after_faster_ones(
    rsup: parstream.Supervisor, tmp_path: Path
) -> None:
    """A fast item set a window of results sent together, and the 8 ms
    items after it joined that window: the crash after them ran them again.
    An item of EACH_MIN_S or more now goes back at once."""
    path = str(tmp_path / "log")
    out = list(rsup.async_stream_nolink(functools.partial(log_then, path), range(4), chunksize=4))
    assert [type(r).__name__ for r in out] == ["Ok", "Ok", "Ok", "Exit"], out
    last = out[3]
    assert isinstance(last, parstream.Exit)
    assert isinstance(last.reason, parstream.WorkerCrashed)
    runs = [int(x) for x in Path(path).read_text().split()]
    assert sorted(runs) == [0, 1, 2, 3], runs


def fork_and_return(path: str, x: int) -> int:
    if x == 1 and os.fork() == 0:
        Path(path).write_text(str(os.getpid()))
    return x * 10


def test_a_process_a_ray_task_forks_ends_when_it_returns(
    rsup: parstream.Supervisor, tmp_path: Path
) -> None:
    """The forked copy of a Ray task returned into the slice's loop and
    carried on there, unknown to Ray, outliving the Supervisor."""
    path = tmp_path / "child"
    out = list(rsup.stream_map(functools.partial(fork_and_return, str(path)), range(3)))
    assert out == [0, 10, 20]
    wait_until(lambda: path.exists() and path.read_text(), what="the forked child's pid")
    assert gone(int(path.read_text()), within=10)


def test_import_parstream_never_imports_ray() -> None:
    code = (
        "import sys, parstream; parstream.Supervisor; parstream.RayBackend; "
        "parstream.map; assert 'ray' not in sys.modules, 'ray was imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_bad_ray_backend_arguments_fail_at_call_time(ray_cluster: RayCluster) -> None:
    with pytest.raises(TypeError, match="num_cpus_per_task"):
        parstream.RayBackend(num_cpus_per_task="1")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="runtime_env"):
        parstream.RayBackend(runtime_env=["x"])  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="init_kwargs"):
        parstream.RayBackend(init_kwargs=[1])  # type: ignore[arg-type]
    # Given twice, one would silently win.
    with pytest.raises(ValueError, match="address is given twice"):
        parstream.RayBackend(address="auto", init_kwargs={"address": "ray://x:1"})
    with pytest.raises(ValueError, match="runtime_env is given twice"):
        parstream.RayBackend(runtime_env={}, init_kwargs={"runtime_env": {"pip": ["x"]}})
    for cpus in (math.nan, math.inf):
        with pytest.raises(ValueError, match="num_cpus_per_task"):
            parstream.RayBackend(num_cpus_per_task=cpus)
    with pytest.raises(ValueError, match="max_memory_per_worker"):
        parstream.Supervisor(backend="ray", max_memory_per_worker=10**9)
    # Named as the user wrote it: ProcessPoolExecutor's name too.
    with pytest.raises(ValueError, match="max_tasks_per_child"):
        parstream.Supervisor(backend="ray", max_tasks_per_child=5)


# -- regressions from the hostile review ----------------------------------------------


def read_env(name: str) -> str | None:
    return os.environ.get(name)


def test_a_runtime_env_is_honoured_on_an_existing_connection(ray_cluster: RayCluster) -> None:
    """A RayBackend's runtime_env applies to its tasks even though Ray was
    already initialised (by the tests here, as by any earlier backend)."""
    backend = parstream.RayBackend(runtime_env={"env_vars": {"PARSTREAM_T": "yes"}})
    with parstream.Supervisor(backend=backend) as sup:
        assert sup.async_(read_env, "PARSTREAM_T").await_(timeout=120) == "yes"


def test_tasks_too_big_for_every_node_are_refused_at_once(ray_cluster: RayCluster) -> None:
    with pytest.raises(ValueError, match="num_cpus_per_task"):
        parstream.Supervisor(backend=parstream.RayBackend(num_cpus_per_task=2))


def test_a_node_without_cpus_is_refused_at_call_time(
    rsup: parstream.Supervisor, ray_cluster: RayCluster
) -> None:
    """The head has no CPUs: node= naming it is a ValueError, not a task that fails later."""
    with pytest.raises(ValueError, match="CPUs"):
        rsup.async_(node_id, node="head")


def test_a_stream_on_a_node_is_sized_to_that_node(rsup: parstream.Supervisor) -> None:
    """max_concurrency defaults to the node's CPUs with node=, not the cluster's."""
    stream = rsup.async_stream(node_id, range(2), node="w1")
    assert stream.max_concurrency == 1
    assert rsup.async_stream(node_id, range(2)).max_concurrency == 2
    list(stream)


def raise_in_initializer() -> None:
    raise RuntimeError("no database")


def test_an_initializer_that_raises_gives_worker_start_failed(ray_cluster: RayCluster) -> None:
    with parstream.Supervisor(backend="ray", initializer=raise_in_initializer) as sup:
        task = sup.async_(node_id)
        with pytest.raises(parstream.WorkerStartFailed, match="no database") as info:
            task.await_(timeout=120)
    assert isinstance(info.value.__cause__, RuntimeError)


FORKED = textwrap.dedent(
    """
    import os, sys
    import parstream
    address = sys.argv[1]
    backend = parstream.RayBackend(address=address)
    assert parstream.map(abs, [-1], backend=backend) is not None
    assert list(parstream.map(abs, [-1, -2], backend=backend)) == [1, 2]
    pid = os.fork()
    if pid == 0:
        try:
            list(parstream.map(abs, [-3], backend=backend))
        except RuntimeError as exc:
            os._exit(0 if "os.fork()" in str(exc) else 2)
        os._exit(1)
    _, status = os.waitpid(pid, 0)
    print("child", os.waitstatus_to_exitcode(status), flush=True)
    """
)


def test_a_forked_child_of_a_ray_driver_gets_a_clear_error(ray_cluster: RayCluster) -> None:
    """Ray's connection does not survive fork: the child is told so, it does not hang."""
    env = {**os.environ, **ray_cluster.env}
    proc = subprocess.run(
        [sys.executable, "-c", FORKED, ray_cluster.address],
        capture_output=True,
        text=True,
        env=env,
        timeout=90,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == "child 0"


def test_a_brutal_kill_overrides_a_graceful_one_waiting(
    rsup: parstream.Supervisor, tmp_path: Path
) -> None:
    """shutdown(BRUTAL_KILL) while a shutdown(30) waits: the task dies now."""
    path = tmp_path / "pid"
    task = rsup.async_(write_pid_then_hang, str(path))
    wait_until(lambda: path.exists() and path.read_text(), what="the task to start")
    waiting = threading.Thread(target=task.shutdown, args=(30.0,), daemon=True)
    waiting.start()
    time.sleep(0.2)
    task.shutdown(parstream.BRUTAL_KILL)
    waiting.join(20)
    assert not waiting.is_alive()  # it did not wait out its 30 s grace
    assert gone(int(path.read_text()), within=10)


class Held:
    """An argument whose lifetime a test watches (by reference: tests/ is on
    the workers' path)."""


def take(_: Any) -> int:
    return 1


def test_a_finished_tasks_argument_is_not_kept_alive(rsup: parstream.Supervisor) -> None:
    """Once a task has ended and the caller has dropped its argument, the
    driver frees it, as on the local backend. The event thread, waiting idle,
    used to keep its last slot (the job, and with it the arguments) in a
    local variable until the next task came, however large they were."""
    arg = Held()
    ref = weakref.ref(arg)
    assert rsup.async_(take, arg).await_(timeout=60) == 1
    items = [Held() for _ in range(3)]
    refs = [weakref.ref(x) for x in items]
    assert list(rsup.stream_map(take, items, chunksize=1)) == [1, 1, 1]
    del arg, items
    wait_until(
        lambda: gc.collect() >= 0 and ref() is None and all(r() is None for r in refs),
        within=5,
        what="the arguments of finished tasks to be freed",
    )


def pid_after_10ms(_: int) -> int:
    time.sleep(0.01)
    return os.getpid()


def test_an_explicit_chunk_runs_whole_in_one_ray_task(rsup: parstream.Supervisor) -> None:
    """With ``chunksize``, each chunk runs whole in one Ray task (one worker
    process) even past the time budget (8 items of ~10 ms), as locally."""
    pids = list(rsup.stream_map(pid_after_10ms, range(32), chunksize=8))
    assert [len(set(pids[k : k + 8])) for k in range(0, 32, 8)] == [1] * 4, pids


def one_object_twice(i: int) -> list[Any]:
    row = {"item": i}
    return [row, row, fractions.Fraction(i, 7)]


def test_results_that_refer_twice_to_one_object_come_back_whole(
    rsup: parstream.Supervisor,
) -> None:
    """Each result of a flush is rebuilt on its own (976 of 1000 came back
    holding an earlier result's object, as on the local backend)."""
    got = list(rsup.stream_map(one_object_twice, range(200), chunksize=20))
    assert got == [one_object_twice(i) for i in range(200)]


def _kill_the_reader(x: int, home: int) -> int:
    if os.getpid() != home:
        os._exit(11)  # reading this argument kills the worker process
    return x


class KillsItsReader:
    """An argument whose unpickling on a worker kills the worker."""

    def __init__(self, x: int) -> None:
        self.x = x

    def __reduce__(self) -> Any:
        return (_kill_the_reader, (self.x, os.getpid()))


def identity(x: Any) -> Any:
    return x


@pytest.mark.parametrize("chunksize", [5, None])
def test_an_argument_that_kills_its_reader_fails_alone(
    rsup: parstream.Supervisor, chunksize: int | None
) -> None:
    """A worker killed while reading a slice's arguments: only the argument
    that kills fails, with WorkerCrashed; its slice-mates run (as locally),
    where the first items of the slice used to be blamed one after another."""
    items: list[Any] = list(range(40))
    items[27] = KillsItsReader(27)  # not the first of its chunk
    results = list(rsup.async_stream_nolink(identity, items, chunksize=chunksize))
    failed = [i for i, r in enumerate(results) if isinstance(r, parstream.Exit)]
    assert failed == [27], results
    bad = results[27]
    assert isinstance(bad, parstream.Exit)
    assert isinstance(bad.reason, parstream.WorkerCrashed)
    values = [r.value for r in results if isinstance(r, parstream.Ok)]
    assert values == [i for i in range(40) if i != 27]
    assert rsup.stats().tasks_crashed == 1


def crash_once_at(flag: str, x: int) -> int:
    """Item 300 kills its worker the first time it runs (an outside kill, an
    OOM kill); every item is fast enough to run in windows."""
    if x == 300 and not os.path.exists(flag):
        Path(flag).touch()
        os._exit(7)
    return x


def test_a_crash_that_does_not_happen_again_is_reported(
    rsup: parstream.Supervisor, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Tiny items run in windows; a worker dies in one, and every item of the
    window then runs alone without dying. Each item still gets its result,
    and the crash is logged rather than lost (the window's rest went back to
    the stream and ran in a batch again, and nothing was said)."""
    flag = str(tmp_path / "crashed")
    with caplog.at_level(logging.WARNING, logger="parstream"):
        results = list(
            rsup.async_stream_nolink(functools.partial(crash_once_at, flag), range(600))
        )
    assert os.path.exists(flag)
    assert [r.value for r in results if isinstance(r, parstream.Ok)] == list(range(600))
    said = [r.getMessage() for r in caplog.records if "none died" in r.getMessage()]
    assert len(said) == 1, [r.getMessage() for r in caplog.records]
    assert "WorkerCrashed" in said[0]
