"""The message format between the parent and its workers, shared by both sides.

Every message is one ``send_bytes`` frame that starts with a kind byte.

* ``RUN`` (parent to worker): a fixed header ``(kind, seq)``, ``seq`` the
  batch's sequence number on that worker (readable before the rest is
  unpickled), then a cloudpickled tuple
  ``(key, fn_bytes | None, count, items_bytes, star, report_each, evict,
  has_bad, log_level)``, ``items_bytes`` the pickled ``[args, ...]``, so the
  worker loads the function before it unpickles the arguments;
  with ``star`` each entry is an argument tuple, else the single argument;
  ``has_bad`` says some entries are ``BadArgs`` stand-ins.
  The function is pickled once per stream or task (``fn_bytes``) and cached in
  the worker under ``key`` (16 random bytes, see ``_functions``); ``evict``
  lists keys the worker may forget.
* ``RESULTS`` (worker to parent): a fixed header ``(count, done, t_next)`` and
  then a pickled ``(values, errors)`` for the next ``count`` items of the batch
  in order: ``values`` has one entry per item, ``errors`` maps the positions of
  failed items to their error. The header stays readable even when
  the payload cannot be unpickled in the parent, so those items fail alone.
* ``LOADED`` (worker to parent, a bare kind byte): the function of a batch
  with a per-item timeout was loaded; the first item's clock restarts.
* ``READY``, ``BAD_BATCH``, ``LOG`` ``(logger, level, text, position)``,
  ``FORGET`` ``key`` (a function the worker failed to load: send it again
  next time), ``START_FAILED`` ``(exception, traceback_text)`` (the
  initializer raised; the worker then exits): small pickles.

Errors travel as ``(exception, traceback_text)``; ``rebuild_error`` attaches
the text as a ``RemoteTraceback`` ``__cause__``, the convention of
``concurrent.futures`` and loky.
"""

from __future__ import annotations

import pickle
import struct
from typing import Any

import cloudpickle

RUN = 1
RESULTS = 2
READY = 3
BAD_BATCH = 4
STOP = 5
LOG = 6
FORGET = 7
LOADED = 8
START_FAILED = 9  # worker to parent: the initializer raised; (exception, traceback_text)

_HEADER = struct.Struct("<BIBd")
_RUN_HEADER = struct.Struct("<BQ")
PROTOCOL = 5


def dumps(obj: Any) -> bytes:
    """Pickle with cloudpickle, so lambdas, closures and ``__main__`` code travel."""
    return cloudpickle.dumps(obj, protocol=PROTOCOL)  # type: ignore[no-any-return]


def encode(kind: int, obj: Any) -> bytes:
    return bytes((kind,)) + dumps(obj)


def decode(data: bytes) -> Any:
    return pickle.loads(memoryview(data)[1:])


def kind_of(data: bytes) -> int:
    return data[0]


def encode_run(seq: int, message: tuple[Any, ...]) -> bytes:
    return _RUN_HEADER.pack(RUN, seq) + dumps(message)


def run_seq(data: bytes) -> int:
    return int(_RUN_HEADER.unpack_from(data)[1])


def decode_run(data: bytes) -> Any:
    return pickle.loads(memoryview(data)[_RUN_HEADER.size :])


class RemoteTraceback(Exception):
    """The worker-side traceback of a task's exception, attached as ``__cause__``."""

    def __init__(self, tb: str) -> None:
        super().__init__(tb)
        self.tb = tb

    def __str__(self) -> str:
        return "\n\n" + self.tb.rstrip() + "\n"


def rebuild_error(payload: tuple[BaseException, str]) -> BaseException:
    exc, tb = payload
    if tb:
        exc.__cause__ = RemoteTraceback(tb)
    return exc


def _stand_in(exc: BaseException, cause: BaseException) -> BaseException:
    return pickle.PicklingError(
        f"the task raised {type(exc).__qualname__}({str(exc)!r}), "
        f"which could not be sent back from the worker: {cause!r}"
    )


class BadArgs:
    """Stands in for an item whose arguments could not be pickled in the parent.

    The worker reports ``error`` for that item without running it, so results
    stay in input order and every item gets exactly one.
    """

    __slots__ = ("error",)

    def __init__(self, error: BaseException) -> None:
        self.error = error

    def __reduce__(self) -> tuple[Any, ...]:
        return (BadArgs, (self.error,))


def _portable_error(payload: tuple[BaseException, str]) -> tuple[BaseException, str]:
    exc, tb = payload
    try:
        pickle.loads(cloudpickle.dumps(exc, protocol=PROTOCOL))
    except BaseException as cause:
        return _stand_in(exc, cause), tb
    return payload


Errors = dict[int, tuple[BaseException, str]]


def dumps_results(done: bool, t_next: float, values: list[Any], errors: Errors) -> bytes:
    """Frame a flush of results; values that cannot be pickled fail alone.

    ``values`` has one entry per item (``None`` where the item failed);
    ``errors`` maps positions in it to ``(exception, traceback_text)``.
    """
    errors = {i: _portable_error(p) for i, p in errors.items()}
    header = _HEADER.pack(RESULTS, len(values), 1 if done else 0, t_next)
    try:
        return header + dumps((values, errors))
    except BaseException:
        pass
    values = list(values)
    for i, value in enumerate(values):
        if i in errors:
            continue
        try:
            cloudpickle.dumps(value, protocol=PROTOCOL)
        except BaseException as cause:
            err = pickle.PicklingError(
                f"the task's result {type(value).__qualname__} could not be pickled "
                f"to send it back from the worker: {cause}"
            )
            values[i] = None
            errors[i] = (err, "")
    return header + dumps((values, errors))


def loads_results(data: bytes) -> tuple[bool, float, list[Any], Errors]:
    """Inverse of ``dumps_results``; an unreadable payload fails each of its items."""
    _, count, done, t_next = _HEADER.unpack_from(data)
    try:
        values, errors = pickle.loads(memoryview(data)[_HEADER.size :])
    except BaseException as cause:
        err = pickle.UnpicklingError(
            f"a task's result could not be unpickled in the parent: {cause!r}"
        )
        values = [None] * count
        errors = dict.fromkeys(range(count), (err, ""))
    return bool(done), t_next, values, errors
