"""Odd values and odd objects a user may hand over: found by the odd-values hunt.

An ``Exit`` that keeps no input must survive pickling and copying; a
``__len__`` that raises or lies is only a hint; an object whose ``__repr__``
raises must not hide a validation error; a callable object with ``async def
__call__`` is refused as an ``async def`` function is; a result that cannot
be pickled says why, with the worker's traceback of the failure.
"""

from __future__ import annotations

import copy
import fractions
import pickle
from typing import Any

import cloudpickle
import pytest

import parstream
from parstream import Exit

WAIT_S = 30.0


def fail_on_one(x: int) -> int:
    if x == 1:
        raise ValueError("bad")
    return x


def identity(x: Any) -> Any:
    return x


def test_an_exit_without_input_survives_pickling_copying_and_a_worker() -> None:
    results = list(parstream.async_stream_nolink(fail_on_one, range(3)))
    failed = results[1]
    assert isinstance(failed, Exit)
    assert not failed.has_input
    back = pickle.loads(pickle.dumps(results))  # refused before: the sentinel had no name
    assert not back[1].has_input
    assert back[0] == results[0]
    assert not copy.deepcopy(failed).has_input
    assert not copy.copy(failed).has_input
    assert not cloudpickle.loads(cloudpickle.dumps(failed)).has_input
    assert not parstream.async_(identity, failed).await_(WAIT_S).has_input


class Rows:
    """Iterates three rows; its ``__len__`` raises or lies (a lazy query's count)."""

    def __init__(self, claim: Any) -> None:
        self.claim = claim

    def __iter__(self) -> Any:
        return iter([1, 2, 3])

    def __len__(self) -> int:
        if isinstance(self.claim, Exception):
            raise self.claim
        return int(self.claim)


@pytest.mark.parametrize("claim", [RuntimeError("count failed"), -1, 2**63, 2])
@pytest.mark.parametrize("backend", ["local", "inline"])
def test_a_len_that_raises_or_lies_is_only_a_hint(claim: Any, backend: str) -> None:
    assert list(map(identity, Rows(claim))) == [1, 2, 3]  # the control never asks
    assert list(parstream.map(identity, Rows(claim), backend=backend)) == [1, 2, 3]
    got = list(parstream.async_stream(identity, Rows(claim), backend=backend))
    assert got == [parstream.Ok(1), parstream.Ok(2), parstream.Ok(3)]
    sup = parstream.default_supervisor(backend)
    assert list(sup.map(identity, Rows(claim))) == [1, 2, 3]


class BadRepr:
    def __repr__(self) -> str:
        raise RuntimeError("connection closed")


BAD: Any = BadRepr()  # typed Any: handed where the type checker would refuse it


@pytest.mark.parametrize(
    "call",
    [
        lambda: parstream.map(BAD, [1]),
        lambda: parstream.async_(BAD),
        lambda: parstream.map(identity, [1], timeout=BAD),
        lambda: parstream.map(identity, [1], max_concurrency=BAD),
        lambda: parstream.default_supervisor().submit(BAD),
        lambda: parstream.Supervisor(initargs=BAD),
        lambda: parstream.map(identity, [1], backend=BAD),
    ],
)
def test_a_value_whose_repr_raises_gets_the_validation_error(call: Any) -> None:
    with pytest.raises(TypeError, match="BadRepr object"):
        call()


def test_a_huge_bad_value_is_shown_cut_short() -> None:
    with pytest.raises(TypeError, match="fn must be callable") as info:
        parstream.map(list(range(100_000)), [1])  # type: ignore[arg-type]
    assert len(str(info.value)) < 400


class AsyncHandler:
    async def __call__(self, x: int) -> int:
        return x * 2


class GeneratorHandler:
    def __call__(self, x: int) -> Any:
        yield x


@pytest.mark.parametrize("handler", [AsyncHandler(), GeneratorHandler()])
@pytest.mark.parametrize("backend", ["local", "inline"])
def test_a_callable_object_whose_call_is_async_is_refused(handler: Any, backend: str) -> None:
    """Local failed each item with a PicklingError of the coroutine; inline
    returned coroutines never awaited."""
    with pytest.raises(TypeError, match=r"fn \(.*\) returns a"):
        parstream.map(handler, [1, 2], backend=backend)
    with pytest.raises(TypeError, match=r"fn \(.*\) returns a"):
        parstream.async_(handler, 1, backend=backend)


class RefusesPickling:
    def __getstate__(self) -> Any:
        raise NotImplementedError


def make_refusing(_: Any) -> RefusesPickling:
    return RefusesPickling()


def test_a_result_that_cannot_be_pickled_says_why_with_the_workers_traceback() -> None:
    with pytest.raises(pickle.PicklingError) as info:
        parstream.async_(make_refusing, 1).await_(WAIT_S)
    assert "NotImplementedError()" in str(info.value)  # the message ended in ": " before
    assert "__getstate__" in str(info.value.__cause__)  # the line that refused


def one_object_twice(i: int) -> list[Any]:
    """A result that refers twice to one object, beside a value the plain
    pickler refuses (so the flush packs each result alone)."""
    row = {"item": i}
    return [row, row, fractions.Fraction(i, 7)]


@pytest.mark.parametrize("backend", ["local", "inline"])
@pytest.mark.parametrize("chunksize", [None, 16])
def test_results_that_refer_twice_to_one_object_come_back_whole(
    backend: str, chunksize: int | None
) -> None:
    """Each result of a flush is rebuilt on its own: every reference inside it
    is to its own objects. 949 of 1000 such results came back holding an
    earlier result's object (found by the shared-memory hunt)."""
    got = list(parstream.map(one_object_twice, range(300), chunksize=chunksize, backend=backend))
    assert got == [one_object_twice(i) for i in range(300)]
    assert all(r[0] is r[1] for r in got)  # still one object, as pickle keeps it


def test_a_stream_sent_to_a_task_says_it_belongs_to_its_process() -> None:
    """As a Supervisor or a Task does; it failed on a weakref inside."""
    with parstream.Supervisor(max_workers=1) as sup:
        for stream in (sup.async_stream(abs, [-1]), sup.stream_map(abs, [-1])):
            with pytest.raises(TypeError, match="stream belongs to the process that made it"):
                pickle.dumps(stream)
            with pytest.raises(pickle.PicklingError, match="stream belongs"):
                sup.async_(list, stream).await_(WAIT_S)
            assert copy.copy(stream) is stream  # one stream: copy.copy gave an alias before
            assert list(stream) in ([parstream.Ok(1)], [1])  # still usable here


def raise_with_frame_like_message(name: str) -> None:
    raise ValueError(f'could not parse\n  File "{name}", line 1, in <module>\nend')


@pytest.mark.parametrize("kind", ["nul", "fifo"])
def test_an_error_message_that_looks_like_a_frame_is_only_text(tmp_path: Any, kind: str) -> None:
    """Filling a task's traceback with the parent's source lines read the
    files its message named, on the hub thread: a NUL in the name crashed
    the hub (the pool closed), a FIFO blocked it for good."""
    import os

    name = "a\x00b"
    if kind == "fifo":
        name = str(tmp_path / "fifo")
        os.mkfifo(name)
    with parstream.Supervisor(max_workers=1) as sup:
        with pytest.raises(ValueError, match="could not parse"):
            sup.async_(raise_with_frame_like_message, name).await_(WAIT_S)
        assert sup.async_(identity, 8).await_(WAIT_S) == 8
