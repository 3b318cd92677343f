"""The fault table of the wire: every pickling phase, on each side, fails alone.

The phases are loky's (``test_reusable_executor``, ``test_cloudpickle_wrapper``)
and CPython's ``test_deadlock``: the function, an argument, a result and an
exception, each failing to pickle on the side that sends it or to unpickle on
the side that receives it; plus the input iterator raising and blocking. Each
phase runs for ``async_`` tasks and for streams, in real worker processes,
next to innocent items that must all come back as if nothing happened.

Whether an object refuses to be rebuilt depends on where it is unpickled:
``IN_PARENT`` is set in the test process only, and a worker imports this
module afresh, so there it keeps its default.
"""

from __future__ import annotations

import pickle
import threading
import time
from typing import TYPE_CHECKING, Any

import pytest
from _util import reason as result_reason, value

import parstream

if TYPE_CHECKING:
    from collections.abc import Iterator

IN_PARENT = [False]


@pytest.fixture(autouse=True)
def in_parent() -> Iterator[None]:
    IN_PARENT[0] = True
    yield
    IN_PARENT[0] = False


class Refusal(Exception):
    """Raised by an object that refuses to be unpickled where it is."""


def _rebuild(cls: type, value: int, refuse_in_parent: bool) -> Any:
    if IN_PARENT[0] == refuse_in_parent:
        where = "parent" if refuse_in_parent else "worker"
        raise Refusal(f"{cls.__name__}({value}) refuses to be unpickled in the {where}")
    return cls(value)


class NoParent:
    """A value that pickles anywhere but cannot be unpickled in the parent."""

    def __init__(self, value: int) -> None:
        self.value = value

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild, (NoParent, self.value, True))


class NoWorker:
    """A value that pickles anywhere but cannot be unpickled in a worker."""

    def __init__(self, value: int) -> None:
        self.value = value

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild, (NoWorker, self.value, False))


class BadState:
    """A value whose ``__setstate__`` raises in the parent (the unpickling of
    a class that changed between the worker's import and the parent's)."""

    def __init__(self, value: int) -> None:
        self.value = value

    def __setstate__(self, state: dict[str, Any]) -> None:
        if IN_PARENT[0]:
            raise Refusal(f"BadState({state['value']}) refuses its state in the parent")
        self.__dict__.update(state)


class FnNoWorker:
    """A callable that cannot be unpickled in a worker."""

    def __init__(self, value: int = 0) -> None:
        self.value = value

    def __call__(self, x: int) -> int:
        return x

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild, (FnNoWorker, self.value, False))


class LockedError(Exception):
    """An exception that cannot be pickled: it holds a lock."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.lock = threading.Lock()


class ParentlessError(Exception):
    """An exception that pickles but cannot be rebuilt in the parent."""

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild_error, (str(self),))


def _rebuild_error(message: str) -> ParentlessError:
    if IN_PARENT[0]:
        raise Refusal("ParentlessError refuses to be unpickled in the parent")
    return ParentlessError(message)


def square(x: int) -> int:
    return x * x


def identity(x: Any) -> Any:
    return x


def value_of(x: Any) -> Any:
    return x if isinstance(x, int) else x.value


CULPRIT = 7


def result_fault(kind: str) -> Any:
    """A function whose result for ``CULPRIT`` has the given fault."""

    def fn(x: int) -> Any:
        if x != CULPRIT:
            return x * x
        if kind == "unpicklable":
            return threading.Lock()
        if kind == "no_parent":
            return NoParent(x)
        if kind == "bad_state":
            return BadState(x)
        if kind == "locked_error":
            raise LockedError(f"item {x} failed with a lock in hand")
        if kind == "parentless_error":
            raise ParentlessError(f"item {x} failed far away")
        raise AssertionError(kind)

    return fn


# What the culprit's Exit holds, per fault: (type, text its str() contains).
RESULT_FAULTS = {
    "unpicklable": (pickle.PicklingError, "could not be pickled"),
    "no_parent": (pickle.UnpicklingError, "NoParent(7) refuses to be unpickled in the parent"),
    "bad_state": (pickle.UnpicklingError, "BadState(7) refuses its state in the parent"),
    "locked_error": (parstream.RemoteError, "LockedError: item 7 failed with a lock in hand"),
    "parentless_error": (parstream.RemoteError, "ParentlessError: item 7 failed far away"),
}


def check_culprit(exc: BaseException, kind: str) -> None:
    exc_type, text = RESULT_FAULTS[kind]
    assert isinstance(exc, exc_type), repr(exc)
    assert text in str(exc), str(exc)
    if exc_type is parstream.RemoteError:
        # The stand-in keeps the type's name, the message and the traceback.
        assert isinstance(exc, parstream.RemoteError)
        assert exc.type_name.endswith(kind.split("_")[0].capitalize() + "Error")
        assert exc.message == text.split(": ", 1)[1]
        cause = exc.__cause__
        assert isinstance(cause, parstream.RemoteTraceback)
        assert "in fn" in cause.tb
        assert exc.type_name.rsplit(".", 1)[1] in cause.tb


# -- results and exceptions ---------------------------------------------------------


@pytest.mark.parametrize("kind", sorted(RESULT_FAULTS))
def test_result_fault_in_a_batch_fails_that_item_alone(
    kind: str, sup: parstream.Supervisor
) -> None:
    """In a batch of tiny items, only the culprit's result fails, at its own index."""
    out = list(sup.async_stream_nolink(result_fault(kind), range(20), chunksize=10))
    assert len(out) == 20
    for i, r in enumerate(out):
        if i == CULPRIT:
            assert isinstance(r, parstream.Exit), r
            check_culprit(r.reason, kind)
        else:
            assert r == parstream.Ok(i * i), (i, r)


@pytest.mark.parametrize("kind", sorted(RESULT_FAULTS))
def test_result_fault_in_a_linked_stream_names_the_right_index(
    kind: str, sup: parstream.Supervisor
) -> None:
    """A linked stream raises the culprit's own error, never a batch-mate's.

    It raises as soon as the failure arrives (a linked task takes its caller
    down), so what it delivered first is a correct prefix of the values
    before the culprit.
    """
    got: list[Any] = []
    exc_type, _ = RESULT_FAULTS[kind]
    with pytest.raises(exc_type) as info:
        got.extend(sup.stream_map(result_fault(kind), range(5000), chunksize=500))
    assert len(got) <= CULPRIT
    assert got == [i * i for i in range(len(got))]
    check_culprit(info.value, kind)  # the message names item 7 where it can
    assert list(sup.stream_map(square, range(100))) == [i * i for i in range(100)]


@pytest.mark.parametrize("kind", sorted(RESULT_FAULTS))
def test_result_fault_in_a_task_fails_that_task_alone(
    kind: str, sup: parstream.Supervisor
) -> None:
    """A task whose result or exception cannot travel fails alone; its neighbours go on."""
    fn = result_fault(kind)
    before = [sup.async_(fn, i) for i in range(3)]
    culprit = sup.async_(fn, CULPRIT)
    after = [sup.async_(fn, i) for i in range(3, 6)]
    exc_type, _ = RESULT_FAULTS[kind]
    with pytest.raises(exc_type) as info:
        culprit.await_(30)
    check_culprit(info.value, kind)
    assert [t.await_(30) for t in before + after] == [i * i for i in range(6)]


def test_many_tiny_results_around_one_that_refuses_the_parent() -> None:
    """The issue's case: 50,000 tiny batch-mates of one bad result all arrive."""
    fn = result_fault("no_parent")
    with parstream.Supervisor(max_workers=2) as sup:
        out = list(sup.async_stream_nolink(fn, range(50_000)))
    bad = [i for i, r in enumerate(out) if isinstance(r, parstream.Exit)]
    assert bad == [CULPRIT]
    reason = result_reason(out[CULPRIT])
    assert isinstance(reason, pickle.UnpicklingError)
    assert "NoParent" in str(reason)
    assert "refuses" in str(reason)
    assert all(value(r) == i * i for i, r in enumerate(out) if i != CULPRIT)


def shapes(x: int) -> Any:
    """Values of every kind, and one (item 12) that refuses the parent."""
    if x == 12:
        return NoParent(x)
    return [
        x,
        (x, "a"),
        {"k": [x, {x}]},
        NoWorker(x),
        square,
        None,
        b"\0" * 70_000,  # bigger than a pickle frame
    ][x % 7]


def test_results_of_every_shape_survive_the_per_item_path(sup: parstream.Supervisor) -> None:
    """Plain, nested, user-class and function values come back equal, next to a bad one."""
    out = list(sup.async_stream_nolink(shapes, range(14), chunksize=14))
    assert isinstance(out[12], parstream.Exit)
    assert "NoParent" in str(out[12].reason)
    values = [value(r) for i, r in enumerate(out) if i != 12]
    for x, v in zip([x for x in range(14) if x != 12], values, strict=True):
        want = shapes(x)
        if isinstance(want, NoWorker):
            assert type(v) is NoWorker
            assert v.value == want.value
        else:
            assert v == want, (x, v)
    assert values[4] is square
    assert values[11] is square


def plain(x: int) -> Any:
    """Built-in values only: they travel in one pickle per flush."""
    return [x, 1.5 * x, f"s{x}", b"b", None, True, 2j * x, (x, [x, {"k": {x}}]), bytearray(b"a")][
        x % 9
    ]


def test_plain_values_of_every_builtin_kind(sup: parstream.Supervisor) -> None:
    """The one-pickle fast path gives back exactly what a plain loop would."""
    assert list(sup.stream_map(plain, range(90), chunksize=90)) == [plain(x) for x in range(90)]


def test_exception_rebuilt_in_the_parent_keeps_its_type(sup: parstream.Supervisor) -> None:
    """The per-item path does not turn a picklable exception into a stand-in."""

    def fail(x: int) -> int:
        if x == 2:
            raise KeyError(f"missing {x}")
        return x

    out = list(sup.async_stream_nolink(fail, range(5), chunksize=5))
    assert isinstance(out[2], parstream.Exit)
    assert type(out[2].reason) is KeyError
    assert out[2].reason.args == ("missing 2",)
    assert isinstance(out[2].reason.__cause__, parstream.RemoteTraceback)
    assert [value(r) for i, r in enumerate(out) if i != 2] == [0, 1, 3, 4]


def test_remote_error_pickles_and_names_itself() -> None:
    """RemoteError survives pickling (a user may ship it on) and is exported."""
    err = parstream.RemoteError("mod.Odd", "the message", "could not be unpickled")
    back = pickle.loads(pickle.dumps(err))
    assert (back.type_name, back.message, back.reason) == ("mod.Odd", "the message", err.reason)
    assert str(back) == str(err)
    assert str(err).startswith("mod.Odd: the message")
    assert isinstance(err, parstream.ParstreamError)
    assert "RemoteError" in parstream.__all__
    assert type(err).__module__ == "parstream"


# -- the function -----------------------------------------------------------------


def test_function_unpicklable_in_the_parent(sup: parstream.Supervisor) -> None:
    """A function that cannot be pickled fails at call time, naming the cause."""
    lock = threading.Lock()

    def holds_lock(x: int) -> Any:
        return (lock, x)

    with pytest.raises(pickle.PicklingError, match=r"holds_lock.*lock"):
        sup.async_(holds_lock, 1)
    with pytest.raises(pickle.PicklingError, match=r"holds_lock.*lock"):
        list(sup.async_stream_nolink(holds_lock, range(3)))
    assert sup.async_(square, 3).await_(30) == 9
    assert list(sup.stream_map(square, range(3))) == [0, 1, 4]


def test_function_that_cannot_be_unpickled_in_the_worker(sup: parstream.Supervisor) -> None:
    """Every item of that function fails with the cause; the worker serves on."""
    fn = FnNoWorker()
    good = [sup.async_(square, i) for i in range(4)]
    task = sup.async_(fn, 1)
    with pytest.raises(Refusal, match="refuses to be unpickled in the worker"):
        task.await_(30)
    out = list(sup.async_stream_nolink(fn, range(6), chunksize=3))
    assert len(out) == 6
    for r in out:
        assert isinstance(r, parstream.Exit)
        assert isinstance(r.reason, Refusal)
    with pytest.raises(Refusal):
        list(sup.stream_map(fn, range(6)))
    assert [t.await_(30) for t in good] == [0, 1, 4, 9]
    assert list(sup.stream_map(square, range(50))) == [i * i for i in range(50)]
    assert sup.stats().tasks_crashed == 0


# -- arguments --------------------------------------------------------------------

ARG_FAULTS = {
    "unpicklable": (pickle.PicklingError, "argument 0"),
    "no_worker": (Refusal, "refuses to be unpickled in the worker"),
}


def make_arg(kind: str, x: int) -> Any:
    if x != CULPRIT:
        return x
    return threading.Lock() if kind == "unpicklable" else NoWorker(x)


@pytest.mark.parametrize("kind", sorted(ARG_FAULTS))
def test_argument_fault_in_a_task(kind: str, sup: parstream.Supervisor) -> None:
    """An argument that cannot travel fails its task alone, before it runs."""
    exc_type, text = ARG_FAULTS[kind]
    before = [sup.async_(value_of, i) for i in range(3)]
    culprit = sup.async_(value_of, make_arg(kind, CULPRIT))
    after = [sup.async_(value_of, i) for i in range(3, 6)]
    with pytest.raises(exc_type, match=text):
        culprit.await_(30)
    assert [t.await_(30) for t in before + after] == list(range(6))


@pytest.mark.parametrize("kind", sorted(ARG_FAULTS))
def test_argument_fault_in_a_stream(kind: str, sup: parstream.Supervisor) -> None:
    """In a batch, the culprit's argument fails that item alone, in place."""
    exc_type, text = ARG_FAULTS[kind]
    items = [make_arg(kind, i) for i in range(20)]
    out = list(sup.async_stream_nolink(value_of, items, chunksize=10))
    for i, r in enumerate(out):
        if i == CULPRIT:
            assert isinstance(r, parstream.Exit), r
            assert isinstance(r.reason, exc_type), r
            assert text in str(r.reason)
        else:
            assert r == parstream.Ok(i), (i, r)
    got: list[int] = []
    with pytest.raises(exc_type, match=text):
        got.extend(sup.stream_map(value_of, items, chunksize=10))
    assert got == list(range(len(got)))
    assert len(got) <= CULPRIT


class LockedOnLoad:
    """An argument whose unpickling in the worker raises an unpicklable exception."""

    def __init__(self, value: int) -> None:
        self.value = value

    def __reduce__(self) -> tuple[Any, ...]:
        return (_raise_locked, (self.value,))


def _raise_locked(value: int) -> LockedOnLoad:
    if not IN_PARENT[0]:
        raise LockedError(f"argument {value} would not load")
    return LockedOnLoad(value)


def test_argument_whose_load_error_cannot_travel(sup: parstream.Supervisor) -> None:
    """The worker's report on an unreadable batch arrives even when its error cannot."""
    items = [LockedOnLoad(i) if i == CULPRIT else i for i in range(12)]
    out = list(sup.async_stream_nolink(value_of, items, chunksize=6))
    for i, r in enumerate(out):
        if i == CULPRIT:
            assert isinstance(r, parstream.Exit), r
            assert isinstance(r.reason, parstream.RemoteError), r
            assert "LockedError: argument 7 would not load" in str(r.reason)
        else:
            assert r == parstream.Ok(i), (i, r)


# -- the input iterator -------------------------------------------------------------


class InputBroke(Exception):
    pass


def raising_input(n: int) -> Iterator[int]:
    yield from range(n)
    raise InputBroke(f"the input broke after {n} items")


def test_input_raising_delivers_every_pulled_result_first(sup: parstream.Supervisor) -> None:
    """All results for the items before the fault, in order, then the input's exception."""
    n = 20_000
    got: list[int] = []
    with pytest.raises(InputBroke, match=f"after {n} items"):
        got.extend(sup.stream_map(square, raising_input(n)))
    assert got == [i * i for i in range(n)]


def test_input_raising_in_a_nolink_stream(sup: parstream.Supervisor) -> None:
    """The input's own exception reaches the consumer; the supervisor serves on."""
    with pytest.raises(InputBroke):
        list(sup.async_stream_nolink(square, raising_input(3)))
    with pytest.raises(InputBroke):
        list(sup.stream_map(square, raising_input(0)))
    assert sup.async_(square, 4).await_(30) == 16
    assert list(sup.stream_map(square, range(5))) == [0, 1, 4, 9, 16]


def slow_input(n: int, pause: float) -> Iterator[int]:
    for i in range(n):
        time.sleep(pause)
        yield i


def test_input_that_blocks_still_delivers(sup: parstream.Supervisor) -> None:
    """A slow input (a queue, a socket) still gets every result, in order."""
    assert list(sup.stream_map(square, slow_input(12, 0.05))) == [i * i for i in range(12)]
    out = list(sup.async_stream_nolink(square, slow_input(6, 0.05), ordered=False))
    assert sorted(value(r) for r in out) == [i * i for i in range(6)]


def test_input_that_blocks_does_not_hold_back_results(sup: parstream.Supervisor) -> None:
    """Results of the items already pulled arrive while the input is blocked."""
    release = threading.Event()
    safety = threading.Timer(10.0, release.set)  # never hang the suite
    safety.start()

    def gated() -> Iterator[int]:
        yield from range(3)
        release.wait()  # an idle socket, an empty queue
        yield from range(3, 5)

    try:
        it = sup.stream_map(square, gated())
        got = [next(it) for _ in range(3)]
        blocked_meanwhile = not release.is_set()
        release.set()
        assert got + list(it) == [i * i for i in range(5)]
        assert blocked_meanwhile, "the first results waited for the input to unblock"
    finally:
        safety.cancel()
        release.set()
