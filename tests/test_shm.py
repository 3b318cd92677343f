"""Large arrays beside the pipe (issue 12): arguments and results above the
out-of-band threshold travel in anonymous shared memory (``_shm``).

Each test checks the values, and that the memory is really shared (the
mappings are visible in ``/proc``), used exactly as long as something views
it, never overwritten while a task still holds it, and gone afterwards:
no descriptor, no mapping, nothing in ``/dev/shm``.
"""

from __future__ import annotations

import gc
import os
import signal
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
from _util import fork_and_wait, wait_until

import parstream

np = pytest.importorskip("numpy")

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="memfd and /proc are Linux's"
)

N = 40_000  # float64 elements: 320 KB, above the out-of-band threshold


def _maps(tag: str, pid: int | str = "self") -> int:
    """Mappings of a parstream memfd named ``tag`` in process ``pid``."""
    with open(f"/proc/{pid}/maps") as f:
        return sum(f"memfd:{tag}" in line for line in f)


def _memfds(kind: str = "") -> int:
    """Descriptors of parstream memfds (of ``kind``: data, args...) open in this process."""
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}").startswith(f"/memfd:parstream-{kind}"):
                count += 1
        except OSError:
            pass
    return count


def _dev_shm() -> set[str]:
    return set(os.listdir("/dev/shm")) if os.path.isdir("/dev/shm") else set()


# -- tasks ------------------------------------------------------------------


def bump_and_sum(a: Any) -> tuple[Any, float, bool]:
    shared = _maps("parstream-args") > 0  # the argument is a view of the block
    a += 1  # arguments are writable, as copies are
    return a, float(a.sum()), shared


def make(n: int) -> Any:
    return np.arange(n, dtype=np.float64)


def worker_state(_: Any) -> tuple[int, int]:
    """(argument blocks, result memfds) still mapped or open in this worker."""
    fds = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            fds += os.readlink(f"/proc/self/fd/{fd}").startswith("/memfd:parstream-data")
        except OSError:
            pass
    return _maps("parstream-args"), fds


_kept: list[tuple[Any, float]] = []


def keep_and_check(a: Any) -> bool:
    """Keeps its argument alive, and checks every argument kept so far."""
    _kept.append((a, float(a.sum())))
    return all(float(x.sum()) == s for x, s in _kept)


def die_on_negative(a: Any) -> float:
    if a[0] < 0:
        os.kill(os.getpid(), signal.SIGKILL)
    return float(a.sum())


def describe(a: Any) -> tuple[float, tuple[int, ...], bool, bool]:
    return float(a.sum()), a.shape, a.flags.c_contiguous, a.flags.f_contiguous


# -- tests ------------------------------------------------------------------


def test_arrays_travel_shared_both_ways(sup: parstream.Supervisor) -> None:
    shm_before = _dev_shm()
    arrays = [np.arange(N, dtype=np.float64) * i for i in range(6)]
    before = [a.copy() for a in arrays]
    out = list(sup.map(bump_and_sum, arrays))
    for a, b, (r, total, shared) in zip(arrays, before, out, strict=True):
        assert shared, "the argument did not come through shared memory"
        np.testing.assert_array_equal(a, b)  # the task's writes stayed its own
        np.testing.assert_array_equal(r, b + 1)
        assert total == float((b + 1).sum())
        assert r.flags.writeable
    assert _maps("parstream-data") >= 1, "the results did not come through shared memory"
    out[0][0][:] = -1  # the parent's results are its own too
    np.testing.assert_array_equal(out[1][0], before[1] + 1)
    assert _dev_shm() == shm_before


def test_a_result_maps_exactly_as_long_as_it_is_viewed(sup: parstream.Supervisor) -> None:
    out = list(sup.map(make, [N] * 5))
    assert _maps("parstream-data") >= 1
    view = out[3][10:20]  # a view of one result keeps its pages
    del out
    gc.collect()
    np.testing.assert_array_equal(view, np.arange(10, 20, dtype=np.float64))
    del view
    gc.collect()
    assert _maps("parstream-data") == 0
    assert _memfds() == 0 or all(
        "parstream-data" not in os.readlink(f"/proc/self/fd/{fd}")
        for fd in os.listdir("/proc/self/fd")
        if os.path.exists(f"/proc/self/fd/{fd}")
    )


def test_results_outlive_their_supervisor() -> None:
    with parstream.Supervisor(max_workers=2) as s:
        out = list(s.map(make, [N] * 3))
    gc.collect()
    for r in out:
        np.testing.assert_array_equal(r, np.arange(N, dtype=np.float64))
    del out, r
    gc.collect()
    assert _maps("parstream-data") == 0
    assert _maps("parstream-args") == 0
    assert _memfds() == 0


def test_an_argument_a_task_keeps_is_never_overwritten() -> None:
    # One worker, one item a batch: every later batch would reuse the first
    # block if it were given back while the task still holds a view of it.
    with parstream.Supervisor(max_workers=1) as s:
        arrays = [np.full(N, float(i)) for i in range(12)]
        assert all(s.map(keep_and_check, arrays, chunksize=1))
        assert all(s.map(keep_and_check, [np.full(N, -1.0)] * 3, chunksize=1))
    assert _memfds() == 0


def fork_a_reader(a: Any, path: str) -> float:
    """Fork a child that records what the argument holds once told to."""
    if os.fork() == 0:
        try:
            while not os.path.exists(path + ".go"):
                time.sleep(0.01)
            with open(path + ".tmp", "w") as f:
                f.write(repr(sorted(set(a[:: N // 100].tolist()))))
            os.rename(path + ".tmp", path)
        finally:
            os._exit(0)
    return float(a[0])


def sum_of(a: Any) -> float:
    return float(a.sum())


def test_a_process_a_task_forked_keeps_its_argument(tmp_path: Path) -> None:
    """A task forks a child that reads the argument after the task returned.
    The argument's block used to be given back and rewritten by the next
    batches, which the child's copy-on-write view then read. Such a block is
    now closed, not reused: the child reads its value, as with a copy."""
    path = str(tmp_path / "seen")
    with parstream.Supervisor(max_workers=1) as s:
        assert s.async_(fork_a_reader, np.full(N, 1.0), path).await_(timeout=30) == 1.0
        for i in range(2, 8):
            assert list(s.map(sum_of, [np.full(N, float(i))])) == [N * i]
        Path(path + ".go").touch()
        wait_until(lambda: os.path.exists(path), within=20, what="the forked reader")
    assert Path(path).read_text() == "[1.0]"


def test_workers_unmap_arguments_and_close_results(sup: parstream.Supervisor) -> None:
    arrays = [np.full(N, float(i)) for i in range(20)]
    for _ in range(3):
        assert list(sup.map(np.sum, arrays)) == [float(i) * N for i in range(20)]
    # Small items: no block of their own; every earlier block was released.
    for args_mapped, result_fds in sup.map(worker_state, range(8), chunksize=1):
        assert args_mapped == 0
        assert result_fds == 0


def test_a_worker_killed_with_a_block_loses_only_its_item() -> None:
    arrays = [np.full(N, float(i)) for i in range(10)]
    arrays[4] = np.full(N, -1.0)
    with parstream.Supervisor(max_workers=2) as s:
        results = list(s.async_stream_nolink(die_on_negative, arrays, max_concurrency=2))
        # The pool goes on, reusing what the dead worker was lent.
        assert list(s.map(np.sum, arrays[:4])) == [float(i) * N for i in range(4)]
    for i, r in enumerate(results):
        if i == 4:
            assert isinstance(r, parstream.Exit)
            assert isinstance(r.reason, parstream.WorkerCrashed)
        else:
            assert r == parstream.Ok(float(i) * N)
    gc.collect()
    assert _memfds() == 0
    assert _maps("parstream-args") == 0


def test_a_stream_left_early_leaves_nothing() -> None:
    with parstream.Supervisor(max_workers=2) as s:
        stream = s.stream_map(make, [N] * 200)
        for i, _r in enumerate(stream):
            if i == 3:
                break
        del stream, _r
    gc.collect()
    assert _maps("parstream-data") == 0
    assert _memfds() == 0


def test_uncommon_layouts_arrive_intact(sup: parstream.Supervisor) -> None:
    strided = np.arange(2 * N, dtype=np.float64)[::2]  # not contiguous: pickled in band
    fortran = np.asfortranarray(np.arange(N, dtype=np.float64).reshape(200, -1))
    frozen = np.arange(N, dtype=np.float64)
    frozen.flags.writeable = False
    ints = np.arange(N, dtype=np.int32)
    items = [strided, fortran, frozen, ints]
    out = list(sup.map(describe, items))
    assert out[0] == (float(strided.sum()), (N,), True, True)
    assert out[1] == (float(fortran.sum()), (200, N // 200), False, True)
    assert out[2][0] == float(frozen.sum())
    assert out[3][0] == float(ints.sum())
    # And back, with a structured dtype and a mix of small and large.
    rec = np.zeros(N, dtype=[("a", "i4"), ("b", "f8")])
    rec["a"] = 7
    back = list(sup.map(lambda x: x, [rec, 3, np.ones(5)]))
    np.testing.assert_array_equal(back[0], rec)
    assert back[1] == 3
    np.testing.assert_array_equal(back[2], np.ones(5))


# -- hostile values and processes --------------------------------------------

_PARENT = os.getpid()


def _refuse_here() -> Any:
    if os.getpid() == _PARENT:
        raise RuntimeError("refuses to unpickle in the parent")
    return "fine"


class RefusesInParent:
    def __reduce__(self) -> tuple[Any, ...]:
        return (_refuse_here, ())


def array_or_bad(i: int) -> Any:
    """Every third result cannot travel: it cannot be pickled in the worker
    (a lock) or cannot be rebuilt in the parent; each holds a big array."""
    import threading

    a = np.full(N, float(i))
    if i % 3 == 1:
        return (a, threading.Lock())
    if i % 3 == 2:
        return (a, RefusesInParent())
    return (a, i)


def test_a_bad_value_beside_big_buffers_fails_alone(sup: parstream.Supervisor) -> None:
    results = list(sup.async_stream_nolink(array_or_bad, range(30)))
    for i, r in enumerate(results):
        if i % 3 == 0:
            assert isinstance(r, parstream.Ok), r
            a, j = r.value
            assert j == i
            np.testing.assert_array_equal(a, np.full(N, float(i)))
        else:
            assert isinstance(r, parstream.Exit), r
            text = str(r.reason)
            assert ("could not be pickled" in text) or ("could not be unpickled" in text), text


def test_a_forked_child_sends_arrays_through_its_own_pool() -> None:
    arrays = [np.full(N, float(i)) for i in range(8)]
    assert list(parstream.map(np.sum, arrays)) == [float(i) * N for i in range(8)]

    def child() -> int:
        out = list(parstream.map(np.sum, arrays))
        back = list(parstream.map(make, [N] * 3))
        ok = out == [float(i) * N for i in range(8)]
        ok = ok and all(np.array_equal(b, np.arange(N, dtype=np.float64)) for b in back)
        parstream.default_supervisor().close()
        return 0 if ok else 1

    assert fork_and_wait(child) == 0
    # The parent's pool and arena are untouched by the child's.
    assert list(parstream.map(np.sum, arrays)) == [float(i) * N for i in range(8)]


# -- result blocks, reused ------------------------------------------------------


def full(i: int) -> Any:
    return np.full(N, float(i))


def _result_fds(s: parstream.Supervisor) -> int:
    """Result memfds the (single) worker holds, lent or free."""
    return int(s.async_(worker_state, None).await_(30)[1])


def test_a_result_block_is_written_again_only_once_freed() -> None:
    with parstream.Supervisor(max_workers=1) as s:
        kept = list(s.map(full, range(20), chunksize=1))
        lent = _result_fds(s)
        assert lent >= 20  # one block per flush, all still mapped here
        more = list(s.map(full, range(100, 120), chunksize=1))
        for i, r in enumerate(kept):  # nothing written into a block still mapped
            np.testing.assert_array_equal(r, np.full(N, float(i)))
        assert _result_fds(s) >= 40
        del kept, more, r
        gc.collect()
        before = _result_fds(s)
        for _ in range(3):  # freed: written again, no new memfds
            out = list(s.map(full, range(30), chunksize=1))
            for i, r in enumerate(out):
                np.testing.assert_array_equal(r, np.full(N, float(i)))
            del out, r
            gc.collect()
        assert _result_fds(s) <= before
    gc.collect()
    assert _maps("parstream-data") == 0


def bytes_of(n: int) -> Any:
    return np.full(n, 7, dtype=np.uint8)


def _mapped_bytes(a: Any) -> int:
    """The length of the shared mapping a result array views."""
    base = a
    while isinstance(base, np.ndarray) and base.base is not None:
        base = base.base
    assert isinstance(base, memoryview), type(base)
    return memoryview(base.obj).nbytes  # the whole mapping (an mmap, or libc's before 3.13)


def test_a_small_result_in_a_reused_block_keeps_only_its_own_pages() -> None:
    with parstream.Supervisor(max_workers=1) as s:
        big = s.async_(bytes_of, 8 << 20).await_(30)
        assert _mapped_bytes(big) >= 8 << 20
        del big
        gc.collect()
        small = s.async_(bytes_of, 200 << 10).await_(30)  # into the big one's block
        assert (small == 7).all()
        assert _mapped_bytes(small) < 1 << 20  # not the 8 MiB of the block before
    del small


def test_a_parent_holding_many_results_gets_them_all_intact() -> None:
    # Past the blocks a worker lends (``_shm.OUTGOING_LENT``), one-off memfds.
    with parstream.Supervisor(max_workers=1) as s:
        out = list(s.map(full, range(150), chunksize=1))
        for i, r in enumerate(out):
            np.testing.assert_array_equal(r, np.full(N, float(i)))
        assert _result_fds(s) <= 64 + 2
        # Held results hold no descriptor here: an mmap would keep a dup of
        # its memfd, and a thousand results would reach the usual limit.
        assert _memfds("data") == 0
    del out, r
    gc.collect()
    assert _maps("parstream-data") == 0


def test_results_a_forked_child_inherited_are_never_overwritten() -> None:
    """A child forked while results are mapped keeps their pages: the blocks
    behind them are never written again, even once the parent frees them."""
    with parstream.Supervisor(max_workers=1) as s:
        held = list(s.map(full, range(10), chunksize=1))
        go_r, go_w = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: wait for the parent to reuse what it can, then check
            code = 1
            try:
                os.close(go_w)
                os.read(go_r, 1)
                intact = all(
                    bool((r == float(i)).all()) and r.shape == (N,) for i, r in enumerate(held)
                )
                code = 0 if intact else 3
            finally:
                os._exit(code)
        os.close(go_r)
        try:
            del held
            gc.collect()
            for _ in range(3):
                out = list(s.map(full, range(1000, 1010), chunksize=1))
                del out
                gc.collect()
        finally:
            os.write(go_w, b"x")
            os.close(go_w)
            _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, "the child saw its results change"


# -- the workers' malloc ------------------------------------------------------


def _env_seen(_: object = None) -> tuple[dict[str, str], dict[str, str], str]:
    """What this worker's C library read at its start (its initial
    environment), what tasks see in ``os.environ``, and what a subprocess gets."""
    import subprocess

    with open(f"/proc/{os.getpid()}/environ", "rb") as f:
        initial = dict(
            entry.decode().split("=", 1) for entry in f.read().split(b"\0") if b"=" in entry
        )
    seen = {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")}
    child = subprocess.run(
        [sys.executable, "-c", "import os; print(sorted(k for k in os.environ if 'MALLOC' in k))"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    return {k: v for k, v in initial.items() if k.startswith("MALLOC_")}, seen, child


@pytest.mark.skipif(
    not os.confstr("CS_GNU_LIBC_VERSION") if hasattr(os, "confstr") else True,
    reason="glibc's malloc settings",
)
def test_workers_keep_freed_memory_for_reuse_without_showing_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The workers' glibc keeps blocks of a few MiB on its heap (a numpy
    temporary is not faulted in again on every call), set through the
    environment it starts with; tasks and what they start do not see it, and
    a setting of the user's own wins."""
    for name in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_"):
        monkeypatch.delenv(name, raising=False)
    with parstream.Supervisor(max_workers=1) as sup:
        initial, seen, child = sup.async_(_env_seen).await_(30)
    assert initial == {
        "MALLOC_MMAP_THRESHOLD_": str(16 << 20),
        "MALLOC_TRIM_THRESHOLD_": str(32 << 20),
    }
    assert seen == {}
    assert child == "[]"

    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "12345")
    with parstream.Supervisor(max_workers=1) as sup:
        initial, seen, child = sup.async_(_env_seen).await_(30)
    assert initial["MALLOC_TRIM_THRESHOLD_"] == "12345"
    assert seen == {"MALLOC_TRIM_THRESHOLD_": "12345"}  # the user's: left in place
    assert child == "['MALLOC_TRIM_THRESHOLD_']"


def close_stdio(fds: list[int]) -> None:
    for fd in fds:
        os.close(fd)


def filled(i: int) -> Any:
    return np.full(1 << 15, i, dtype=np.int64)  # 256 KiB: through shared memory


def say_then_fill(i: int) -> Any:
    try:
        os.write(1, f"computing {i}\n".encode())
    except OSError:  # fd 1 closed: the task's own affair
        pass
    return filled(i)


@pytest.mark.parametrize("closed", [[1], [0, 1, 2]])
def test_a_task_that_closes_stdout_cannot_write_into_results(closed: list[int]) -> None:
    """A task closes fd 1 (``with open(1, "w")``, say): the worker's next
    shared-memory block must not take fd 1, where later prints would write
    into arrays the parent already holds (they changed after delivery)."""
    with parstream.Supervisor(max_workers=1) as sup:
        sup.async_(close_stdio, closed).await_(30)
        first = list(sup.map(filled, range(8)))
        later = list(sup.map(say_then_fill, range(8)))
        for i, (a, b) in enumerate(zip(first, later, strict=True)):
            assert (a == i).all(), (i, a[:4])
            assert (b == i).all(), (i, b[:4])


def test_a_worker_out_of_descriptors_gives_its_argument_block_back() -> None:
    """A worker with no free descriptor cannot receive a batch's arguments'
    memfd: the items fail saying so (EMFILE), the parent's block comes back
    (each failure kept 1 MiB and two descriptors), and once the results the
    worker's blocks served are dropped, the worker recovers (it kept the
    descriptors of its idle result blocks open)."""
    import subprocess
    import textwrap

    code = textwrap.dedent(
        """
        import gc, os, resource, time
        import numpy as np
        import parstream

        resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))  # the workers inherit it

        def make(i):
            return np.full(1 << 15, float(i))

        def total(a):
            return float(a.sum())

        def blocks():
            with open(f"/proc/{os.getpid()}/maps") as maps:
                return sum("parstream-args" in line for line in maps)

        def failures(sup, n):
            why = set()
            for _ in range(n):
                try:
                    sup.async_(total, np.ones(1 << 15)).await_(30)
                except EOFError as e:
                    why.add("EMFILE" in str(e.__cause__))
            return why

        with parstream.Supervisor(max_workers=1) as sup:
            assert not failures(sup, 1)
            held = list(sup.map(make, range(100)))
            assert failures(sup, 5) == {True}, "out of descriptors, and saying so"
            assert blocks() <= 2, blocks()
            del held
            gc.collect()
            time.sleep(0.5)
            failures(sup, 1)  # the worker gives up its idle blocks' descriptors
            assert not failures(sup, 5)
        print("ok")
        """
    )
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join([root, env.get("PYTHONPATH", "")])
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "ok"


def test_a_block_taken_back_at_a_death_is_not_freed_twice() -> None:
    """A call that lent a block to a worker that died under it gives the
    block back, and so does the hub's ``worker_gone`` for the dead worker;
    whichever came second used to free it again, and the next two calls
    were lent the one block at once (each could overwrite the other's
    arguments)."""
    from parstream._backends.local._shm import Arena

    arena = Arena()
    worker = object()
    try:
        block = arena.lend([memoryview(bytes(1000))], worker)
        arena.worker_gone(worker)
        arena.unlend(block)
        first = arena.lend([memoryview(bytes(1000))], object())
        second = arena.lend([memoryview(bytes(1000))], object())
        assert first is not second
    finally:
        arena.close()


def _run_script(code: str, module: Path | None = None) -> str:
    """Run ``code`` in a fresh interpreter (its limits stay its own); its
    stdout. ``module``: a file whose folder goes on the path, for functions
    the workers import by name (a script's own travel with cloudpickle)."""
    import subprocess

    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[1])
    extra = [str(module.parent)] if module is not None else []
    env["PYTHONPATH"] = os.pathsep.join([*extra, root, env.get("PYTHONPATH", "")])
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=240,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout.strip()


def _max_map_count() -> int:
    try:
        return int(Path("/proc/sys/vm/max_map_count").read_text())
    except (OSError, ValueError):
        return 0


@pytest.mark.skipif(
    not 4000 < _max_map_count() <= 1 << 18, reason="needs a kernel mapping limit to reach"
)
def test_results_arrive_when_no_more_mappings_can_be_made() -> None:
    """A parent holding many large results nears the kernel's count of
    mappings (``vm.max_map_count``, 65,530 by default: some 65,000 results):
    each result mapped on its own would fail past it. The rest are copied,
    many to a mapping, and arrive intact, as ProcessPoolExecutor's would."""
    out = _run_script(
        """
        import mmap
        import numpy as np
        import parstream

        def full(i):
            return np.full(17_000, float(i))  # 136 KB: beside the pipe

        def maps():
            with open("/proc/self/maps") as f:
                return sum(1 for _ in f)

        limit = int(open("/proc/sys/vm/max_map_count").read())
        with parstream.Supervisor(max_workers=1) as sup:
            assert (sup.async_(full, 1).await_(60) == 1).all()
            # Stand-ins for more results held: small mappings, alternating in
            # protection so that the kernel cannot merge neighbours.
            hold = [
                mmap.mmap(-1, 4096, prot=mmap.PROT_READ | (mmap.PROT_WRITE * (i % 2)))
                for i in range(limit - maps() - 1500)
            ]
            got = list(sup.async_stream_nolink(full, range(2000), chunksize=1))
            bad = [r for r in got if not isinstance(r, parstream.Ok)]
            assert not bad, (len(bad), bad[0])
            assert all((r.value == i).all() for i, r in enumerate(got))
            got[-1].value[:] = -1  # a copied result is writable, and its own
            assert (got[-2].value == 1998).all()
            assert maps() < limit
            del hold
        print("ok")
        """
    )
    assert out == "ok"


def test_arguments_tasks_keep_leave_the_parent_descriptors() -> None:
    """Tasks that keep their (large) arguments keep their arena blocks lent,
    two descriptors each here: past a bound, arguments go through the pipe,
    and the parent can still open files, start processes and receive
    results."""
    out = _run_script(
        """
        import os, resource, subprocess
        import numpy as np
        import parstream

        resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))

        def keep(a):
            import builtins
            builtins.__dict__.setdefault("_kept", []).append(a)
            return float(a[0])

        def full(i):
            return np.full(40_000, float(i))

        # Two pools: the bound is the process's, not each arena's.
        one = parstream.Supervisor(max_workers=2)
        two = parstream.Supervisor(max_workers=2)
        with one, two:
            for i in range(150):
                for sup in (one, two):
                    assert sup.async_(keep, np.full(40_000, float(i))).await_(60) == i
            assert 256 - len(os.listdir("/proc/self/fd")) >= 256 // 4 - 4
            subprocess.run(["true"], check=True)
            for sup in (one, two):
                assert all((r == i).all() for i, r in enumerate(sup.map(full, range(20))))
        print("ok")
        """
    )
    assert out == "ok"


def test_results_lost_to_the_parents_descriptor_limit_free_their_blocks() -> None:
    """A parent out of descriptors cannot receive a result's memfd: those
    items fail, saying so, and the worker gets the block back for the next
    results instead of keeping it (and its memory) lent to the end."""
    out = _run_script(
        """
        import gc, os, resource
        import numpy as np
        import parstream

        resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))

        def make(i):
            return np.full(1 << 20, float(i))  # 8 MiB

        def result_fds(_):
            n = 0
            for fd in os.listdir("/proc/self/fd"):
                try:
                    n += os.readlink(f"/proc/self/fd/{fd}").startswith("/memfd:parstream-data")
                except OSError:
                    pass
            return n

        with parstream.Supervisor(max_workers=1) as sup:
            assert sup.async_(result_fds, 0).await_(60) == 0
            hog = []
            try:
                while True:
                    hog.append(open(os.devnull))
            except OSError:
                pass
            got = list(sup.async_stream_nolink(make, range(20), chunksize=1))
            for f in hog:
                f.close()
            failed = [r for r in got if not isinstance(r, parstream.Ok)]
            assert failed, "the parent had no descriptor to receive them"
            assert all("EMFILE" in str(r.reason) for r in failed), failed[0]
            del got, failed
            gc.collect()
            assert all((sup.async_(make, i).await_(60) == i).all() for i in range(3))
            held = sup.async_(result_fds, 0).await_(60)
            assert held <= 6, held  # 32 MiB of idle blocks at most, not one per failure
        print("ok")
        """
    )
    assert out == "ok"


def test_a_worker_a_task_left_without_descriptors_reports_instead_of_dying(
    tmp_path: Path,
) -> None:
    """A task leaked its worker's descriptors; the next batch's arguments
    cannot be received there. The item fails saying so (EMFILE), from the
    same worker: formatting and pickling that failure used to import
    ``traceback`` and cloudpickle, which needs a descriptor, and the worker
    died as if the task had called ``os._exit``. (The functions are
    imported by name, so that nothing brought cloudpickle in before.)"""
    module = tmp_path / "fd_hog_tasks.py"
    module.write_text(
        textwrap.dedent(
            """
            import os, resource

            kept = []

            def total(a):
                return float(a.sum()), os.getpid()

            def hog(_):
                soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
                resource.setrlimit(resource.RLIMIT_NOFILE, (128, hard))
                try:
                    while True:
                        kept.append(open(os.devnull))
                except OSError:
                    pass
                return os.getpid()
            """
        )
    )
    out = _run_script(
        """
        import numpy as np
        import parstream
        from fd_hog_tasks import hog, total

        a = np.ones(1 << 16)  # 512 KiB: beside the pipe
        with parstream.Supervisor(max_workers=1) as sup:
            value, pid = sup.async_(total, a).await_(60)
            assert sup.async_(hog, 0).await_(60) == pid
            try:
                sup.async_(total, a).await_(60)
            except EOFError as e:
                assert "EMFILE" in str(e.__cause__), repr(e.__cause__)
            else:
                raise AssertionError("received without a descriptor?")
            assert [w.pid for w in sup.workers()] == [pid]
        print("ok")
        """,
        module,
    )
    assert out == "ok"
