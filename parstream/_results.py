"""Result records handed to users: ``Ok``, ``Exit`` and the ``Stats`` snapshot."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Generic, TypeVar

T = TypeVar("T")

_NO_INPUT: Any = type("_NoInput", (), {"__repr__": lambda self: "<no input>"})()


@dataclass(frozen=True, slots=True)
class Ok(Generic[T]):
    """A task that returned ``value``."""

    value: T


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
