"""Property tests: random mixes of delays, failures and crashes keep order and
exactly-once delivery (issue 3)."""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings, strategies as st

import parstream
from parstream import Exit, Ok

BEHAVIOURS = st.one_of(
    st.tuples(st.just("ok"), st.integers(0, 20)),
    st.tuples(st.just("raise"), st.integers(0, 5)),
    st.tuples(st.just("crash"), st.just(0)),
)


def act(args: tuple[str, int, str, int]) -> int:
    folder, index, kind, ms = args
    with open(os.path.join(folder, f"runs-{os.getpid()}"), "a") as f:
        f.write(f"{index}\n")
    time.sleep(ms / 1000)
    if kind == "raise":
        raise ValueError(index)
    if kind == "crash":
        os._exit(3)
    return index


def executions(folder: str) -> list[int]:
    out: list[int] = []
    for p in Path(folder).glob("runs-*"):
        out.extend(int(x) for x in p.read_text().split())
    return sorted(out)


@settings(
    max_examples=12,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    plan=st.lists(BEHAVIOURS, min_size=0, max_size=14),
    ordered=st.booleans(),
    concurrency=st.integers(1, 4),
)
def test_order_and_exactly_once(
    plan: list[tuple[str, int]], ordered: bool, concurrency: int
) -> None:
    """Each input gets one result, classified right, in order (or as a permutation)."""
    with tempfile.TemporaryDirectory() as folder, parstream.Supervisor(max_workers=2) as sup:
        items = [(folder, i, kind, ms) for i, (kind, ms) in enumerate(plan)]
        out: list[Any] = list(
            sup.async_stream_nolink(
                act,
                items,
                ordered=ordered,
                max_concurrency=concurrency,
                zip_input_on_exit=True,
                chunksize=1,
            )
        )
        assert len(out) == len(plan)
        seen = []
        for r in out:
            if isinstance(r, Ok):
                seen.append(r.value)
                assert plan[r.value][0] == "ok"
            else:
                assert isinstance(r, Exit)
                index = r.input[1]
                seen.append(index)
                expected = ValueError if plan[index][0] == "raise" else parstream.WorkerCrashed
                assert isinstance(r.reason, expected), (plan[index], r.reason)
        if ordered:
            assert seen == list(range(len(plan)))
        else:
            assert sorted(seen) == list(range(len(plan)))
        assert executions(folder) == list(range(len(plan)))


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(n=st.integers(0, 3000), fail_at=st.one_of(st.none(), st.integers(0, 2999)))
def test_tiny_batched_items_keep_order(n: int, fail_at: int | None) -> None:
    """Automatic batching keeps exact per-item results, failures included."""
    with parstream.Supervisor(max_workers=2) as sup:
        out = list(sup.async_stream_nolink(_maybe_fail, [(x, fail_at) for x in range(n)]))
    assert len(out) == n
    for x, r in enumerate(out):
        if x == fail_at:
            assert isinstance(r, Exit)
            assert isinstance(r.reason, KeyError)
        else:
            assert r == Ok(x * 2)


def _maybe_fail(args: tuple[int, int | None]) -> int:
    x, fail_at = args
    if x == fail_at:
        raise KeyError(x)
    return x * 2
