"""Result records handed to users: ``Ok``, ``Exit`` and the ``Stats`` snapshot."""

from __future__ import annotations

import gc
from collections import deque
from dataclasses import dataclass
from functools import partial
from itertools import repeat
from operator import call
from typing import TYPE_CHECKING, Any, Generic, TypeVar

if TYPE_CHECKING:
    from collections.abc import Callable

T = TypeVar("T")


class _NoInput:
    """The one value of ``Exit.input`` when the stream kept no input. Pickled
    and copied by name, so an ``Exit`` saved, copied or sent to another
    process still says ``has_input`` False."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "<no input>"

    def __reduce__(self) -> str:
        return "_NO_INPUT"


_NO_INPUT: Any = _NoInput()


class Ok(Generic[T]):
    """A task that returned ``value``.

    Immutable and hashable (if the value is), compared by value, and matched
    with ``case Ok(value):``. A plain slotted class rather than a dataclass:
    a stream makes one per item, in bulk from C (``oks``), and a direct call
    costs one C call besides its frame.
    """

    __slots__ = ("value",)
    __match_args__ = ("value",)
    value: T

    def __init__(self, value: T) -> None:
        _set_value(self, value)

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"Ok is immutable: cannot set {name!r}")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"Ok is immutable: cannot delete {name!r}")

    def __eq__(self, other: object) -> bool:
        if type(other) is not Ok:
            return NotImplemented
        return bool(self.value == other.value)

    def __hash__(self) -> int:
        return hash((Ok, self.value))

    def __repr__(self) -> str:
        return f"Ok(value={self.value!r})"

    def __reduce__(self) -> tuple[Any, ...]:
        return (Ok, (self.value,))


_set_value = Ok.value.__set__  # type: ignore[misc]  # the slot's own setter, in C
_new = object.__new__


def oks(values: list[Any]) -> list[Ok[Any]]:
    """``[Ok(v) for v in values]``, for a stream's span of results, at C speed.

    ``Ok.__init__`` runs a Python frame per item; here the instances are
    allocated in one C pass and their slot set in another (the slot's own
    setter). The cyclic collector is paused for those two passes: every Ok
    is a tracked object, and a span of tens of thousands would otherwise set
    off a collection every 700, each promoting the span a generation, and
    then full collections: measured, more than building the Ok objects.
    Pausing is safe because nothing else can run meanwhile: the steps are
    called one after another from C (``map(call, steps)``), so no bytecode
    runs in between and no other thread gets the GIL, and the objects built
    run no Python code.
    """
    out: list[Ok[Any]] = []
    steps: tuple[Callable[[], object], ...] = (
        partial(out.extend, map(_new, repeat(Ok, len(values)))),
        partial(any, map(_set_value, out, values)),  # the setter returns None: any() sets all
    )
    if not gc.isenabled():
        deque(map(call, steps), 0)
        return out
    paused: tuple[Callable[[], object], ...] = (gc.disable, *steps, gc.enable)
    try:
        deque(map(call, paused), 0)
    except BaseException:  # MemoryError: the collector runs again
        gc.enable()
        raise
    return out


@dataclass(frozen=True, slots=True)
class Exit:
    """A task that did not return.

    ``reason`` is always an exception instance: the task's own exception (with
    the worker's traceback as ``__cause__``), ``TaskTimeout``, ``WorkerCrashed``
    or ``TaskShutdown``. ``input`` holds the item when the stream was built
    with ``zip_input_on_exit=True``; ``has_input`` says whether it was set.
    """

    reason: BaseException
    input: Any = _NO_INPUT

    @property
    def has_input(self) -> bool:
        return self.input is not _NO_INPUT

    def __repr__(self) -> str:
        if self.has_input:
            return f"Exit(reason={self.reason!r}, input={self.input!r})"
        return f"Exit(reason={self.reason!r})"


Result = Ok[Any] | Exit


@dataclass(frozen=True, slots=True)
class Stats:
    """A snapshot of a Supervisor's counters, from ``Supervisor.stats()``.

    Items are counted one by one (a stream's item is a task here):
    ``tasks_submitted`` were handed to the backend, ``tasks_started`` were
    sent to a worker; each that ended is counted once in ``tasks_ok``,
    ``tasks_failed`` (its own exception, or it could not be sent),
    ``tasks_crashed`` (its worker died), ``tasks_timed_out`` or
    ``tasks_killed`` (killed or withdrawn on request, or dropped when a
    stream was left early).
    """

    tasks_started: int = 0
    tasks_ok: int = 0
    tasks_failed: int = 0
    tasks_crashed: int = 0
    tasks_timed_out: int = 0
    tasks_killed: int = 0
    workers_started: int = 0
    workers_alive: int = 0
    restarts: int = 0
    tasks_submitted: int = 0
