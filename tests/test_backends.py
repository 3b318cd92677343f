"""Choosing a backend, and the inline backend as a user debugging with it.

Regression tests for the hostile review of the backend seam: closing an
inline supervisor while its work runs on another thread, nested inline
calls, tasks done when ``async_`` returns, restarts off the callback
thread, default supervisors shared by equal configs, and clear errors for
backends passed wrongly.
"""

from __future__ import annotations

import concurrent.futures
import functools
import threading
import time
from typing import TYPE_CHECKING, Any

import pytest

import parstream

if TYPE_CHECKING:
    from concurrent.futures import Future

WAIT_S = 30.0


def square(x: int) -> int:
    return x * x


def slow(x: int) -> int:
    time.sleep(0.2)
    return x


def test_a_backend_class_instead_of_an_instance_is_named() -> None:
    with pytest.raises(
        TypeError, match=r"pass an instance, e.g. backend=parstream.RayBackend\(\)"
    ):
        parstream.Supervisor(backend=parstream.RayBackend)


@pytest.mark.parametrize("bad", ["rya", 3, object()])
def test_a_bad_backend_fails_at_call_time(bad: Any) -> None:
    with pytest.raises((TypeError, ValueError), match="backend"):
        parstream.Supervisor(backend=bad)
    with pytest.raises((TypeError, ValueError), match="backend"):
        parstream.map(square, [1], backend=bad)


def test_equal_backend_configs_share_one_default_supervisor() -> None:
    """'local', None and LocalBackend() are one default supervisor, not three pools."""
    a = parstream.default_supervisor()
    assert parstream.default_supervisor("local") is a
    assert parstream.default_supervisor(parstream.LocalBackend()) is a
    b = parstream.default_supervisor("inline")
    assert parstream.default_supervisor(parstream.InlineBackend()) is b
    a.close()
    b.close()


def test_inline_runs_in_the_callers_thread() -> None:
    """An inline task runs on the thread that asked for it (pdb, profilers)."""
    me = threading.get_ident()
    assert set(parstream.map(lambda _: threading.get_ident(), range(5), backend="inline")) == {me}


def test_inline_task_is_done_when_async_returns() -> None:
    with parstream.Supervisor(backend="inline") as sup:
        tasks = [sup.async_(square, i) for i in range(50)]
        assert all(t.done() for t in tasks)
        sup.close()  # nothing had to be killed
        assert [t.await_() for t in tasks] == [i * i for i in range(50)]


def nested(x: int) -> int:
    return sum(parstream.map(square, range(x), backend="inline"))


def test_inline_tasks_may_use_parstream_inline() -> None:
    """A nested map inside an inline task runs inside the outer item, as in a loop."""
    assert list(parstream.map(nested, range(4), backend="inline")) == [0, 0, 1, 5]
    with parstream.Supervisor(backend="inline") as sup:
        inner = sup.async_(lambda: sup.async_(square, 6).await_())
        assert inner.await_(WAIT_S) == 36


def waits_on_a_thread_of_its_own(x: int) -> list[int]:
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        job = pool.submit(lambda: list(parstream.map(square, [x, x + 1], backend="inline")))
        return job.result(WAIT_S)


def submits_from_a_thread(sup: parstream.Supervisor, x: int) -> int:
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(lambda: sup.submit(square, x).result(WAIT_S)).result(WAIT_S)


def test_an_inline_task_may_wait_on_parstream_work_from_another_thread() -> None:
    """A task that submits inline work from a thread it starts, and waits for
    it, gets it: the running item does not keep the backend to itself."""
    got = list(parstream.map(waits_on_a_thread_of_its_own, range(3), backend="inline"))
    assert got == [[0, 1], [1, 4], [4, 9]]
    with parstream.Supervisor(backend="inline") as sup:
        assert sup.async_(submits_from_a_thread, sup, 5).await_(WAIT_S) == 25
        assert list(sup.stream_map(functools.partial(submits_from_a_thread, sup), range(3))) == [
            0,
            1,
            4,
        ]


def test_inline_close_from_another_thread_ends_the_running_stream() -> None:
    """close() while a stream runs on another thread: it stops, no hang."""
    sup = parstream.Supervisor(backend="inline")
    got: list[Any] = []
    errors: list[BaseException] = []

    def consume() -> None:
        try:
            got.extend(sup.stream_map(slow, range(20)))
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=consume)
    thread.start()
    time.sleep(0.5)
    sup.close()
    thread.join(WAIT_S)
    assert not thread.is_alive()
    assert errors
    assert isinstance(errors[0], parstream.SupervisorClosed)
    assert len(got) < 20


def test_inline_close_from_another_thread_settles_a_pending_future() -> None:
    sup = parstream.Supervisor(backend="inline")
    futures: list[Future[int]] = []
    started = threading.Event()

    def slow_once_started(x: int) -> int:
        started.set()
        return slow(x)

    thread = threading.Thread(target=lambda: futures.append(sup.submit(slow_once_started, 1)))
    thread.start()
    assert started.wait(WAIT_S)
    sup.close()
    thread.join(WAIT_S)
    assert futures[0].result(WAIT_S) == 1  # it was running: it finishes, and says so


def closes_its_supervisor(sup: parstream.Supervisor, x: int) -> int:
    if x == 1:
        sup.close()
    return x


def test_an_inline_task_that_closes_its_own_supervisor_does_not_hang() -> None:
    sup = parstream.Supervisor(backend="inline")
    with pytest.raises(parstream.SupervisorClosed):
        list(sup.stream_map(lambda x: closes_its_supervisor(sup, x), range(3)))


def test_inline_restarts_do_not_stall_other_callbacks() -> None:
    """A permanent inline child restarts off the callback thread: another
    supervisor's future callback still runs at once."""
    with parstream.Supervisor(backend="inline", max_restarts=50, max_seconds=60) as inline:
        child = inline.start_child(slow, 1, restart="permanent")
        with parstream.Supervisor(max_workers=1) as local:
            local.submit(square, 1).result(WAIT_S)  # warm
            fired = threading.Event()
            t0 = time.monotonic()
            local.submit(square, 2).add_done_callback(lambda _: fired.set())
            assert fired.wait(WAIT_S)
            assert time.monotonic() - t0 < 1.0  # not behind a 0.2 s restart loop
        assert inline.terminate_child(child)


def raise_then_crash(path: str, x: int) -> int:
    import os

    if x == 5:
        os._exit(3)
    if x == 2:
        raise ValueError("two")
    with open(path, "a") as f:
        f.write(f"{x}\n")
    return x


def test_stats_count_a_recovered_exception_as_failed(tmp_path: Any) -> None:
    """After a crash mid-batch, an item's own exception from the journal is 'failed'."""
    import functools

    with parstream.Supervisor(max_workers=1) as sup:
        fn = functools.partial(raise_then_crash, str(tmp_path / "log"))
        out = list(sup.async_stream_nolink(fn, range(8), chunksize=8))
        stats = sup.stats()
    assert isinstance(out[2], parstream.Exit)
    assert isinstance(out[2].reason, ValueError)
    assert isinstance(out[5], parstream.Exit)
    assert isinstance(out[5].reason, parstream.WorkerCrashed)
    assert stats.tasks_failed == 1
    assert stats.tasks_crashed == 1
    assert stats.tasks_ok == 6


def test_inline_map_timeout_is_reported_and_starts_no_call_after_it() -> None:
    """``Supervisor.map(timeout=)`` on inline: each call runs inside the map's
    own next(), so the deadline was never waited on and every call ran."""
    ran: list[int] = []

    def work(x: int) -> int:
        ran.append(x)
        time.sleep(0.1)
        return x

    with parstream.Supervisor(backend="inline") as ex:
        results = ex.map(work, range(20), timeout=0.35)
        got = [next(results), next(results)]
        with pytest.raises(concurrent.futures.TimeoutError):
            got.extend(results)
        assert got == ran[: len(got)]
        assert 2 <= len(ran) < 20
        assert list(ex.map(square, range(4), timeout=30)) == [0, 1, 4, 9]


def test_inline_map_timeout_starts_no_call_after_the_deadline_and_hands_out_results() -> None:
    """One fill() submitted several chunks, each run at once, past the
    deadline; and results in hand were dropped for the TimeoutError."""
    began = time.monotonic()
    starts: list[float] = []

    def work(seconds: float) -> float:
        starts.append(time.monotonic() - began)
        time.sleep(seconds)
        return seconds

    with parstream.Supervisor(backend="inline") as ex:
        began = time.monotonic()
        got: list[Any] = []
        results = ex.map(work, [0.1, 1.0, 0.1, 0.1, 0.1], timeout=0.5)
        with pytest.raises(concurrent.futures.TimeoutError):
            got.extend(results)
    assert got == [0.1, 1.0]  # what ran is delivered, then the timeout
    assert len(starts) == 2  # nothing started once the deadline had passed


def test_inline_runner_threads_end_with_their_supervisor() -> None:
    """A child restarted on inline runs on a runner thread; it outlived close()."""
    state = {"n": 0}

    def crash_once() -> str:
        state["n"] += 1
        if state["n"] % 2:
            raise RuntimeError("the first run fails")
        return "ok"

    def runners() -> int:
        return sum(t.name == "parstream-inline-runner" for t in threading.enumerate())

    before = runners()
    for _ in range(3):
        with parstream.Supervisor(backend="inline") as sup:
            child = sup.start_child(crash_once, restart="transient")
            assert child.wait(WAIT_S) == parstream.Ok("ok")
    deadline = time.monotonic() + WAIT_S
    while runners() > before and time.monotonic() < deadline:
        time.sleep(0.01)
    assert runners() == before


def test_inline_initializer_that_raises_fails_the_work_not_the_supervisor() -> None:
    """As on worker processes: the calls get ``WorkerStartFailed`` with the
    initializer's exception as ``__cause__``, and the next call tries it
    again; ``Supervisor()`` itself raised the initializer's error before."""
    calls: list[int] = []

    def init() -> None:
        calls.append(1)
        if len(calls) < 3:
            raise OSError("model file missing")

    with parstream.Supervisor(backend="inline", initializer=init) as sup:
        with pytest.raises(parstream.WorkerStartFailed) as info:
            sup.submit(square, 3).result(WAIT_S)
        assert isinstance(info.value.__cause__, OSError)
        assert not sup.closed
        assert list(sup.map(square, range(3))) == [0, 1, 4]
        assert list(sup.map(square, range(3))) == [0, 1, 4]
    assert len(calls) == 3  # run until it did not raise, then never again


def test_inline_accepts_the_worker_options_of_code_written_for_workers() -> None:
    """Debugging code written for worker processes must not need editing:
    ``max_workers=4`` and the recycling options were refused on inline."""
    options: dict[str, Any] = {
        "max_workers": 4,
        "max_tasks_per_child": 10,
        "max_memory_per_worker": 1 << 30,
    }
    with parstream.Supervisor(backend="inline", **options) as ex:
        assert list(ex.map(square, range(5))) == [0, 1, 4, 9, 16]
        assert ex.submit(square, 7).result(WAIT_S) == 49
