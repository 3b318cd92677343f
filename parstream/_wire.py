"""The message format between the parent and its workers, shared by both sides.

Every message is one ``send_bytes`` frame that starts with a kind byte.

* ``RUN`` (parent to worker): a cloudpickled tuple
  ``(fn_id, fn_bytes | None, [args, ...], star, report_each, evict, has_bad,
  log_level)``;
  with ``star`` each entry is an argument tuple, else the single argument;
  ``has_bad`` says some entries are ``BadArgs`` stand-ins.
  The function is pickled once per stream or task (``fn_bytes``) and cached in
  the worker under ``fn_id``; ``evict`` lists ids the worker may forget.
* ``RESULTS`` (worker to parent): a fixed header ``(count, done, t_next)`` and
  then the next ``count`` items of the batch in order (``dumps_results``).
  Each item fails alone, in place: a flush of plain values (``int``, ``str``,
  small tuples of them...) is one pickle, which cannot fail; any other value
  is pickled on its own (its classes once per flush), so one that cannot be
  unpickled in the parent fails its own item only, naming its type.
* ``READY``, ``BAD_BATCH``, ``LOG`` ``(logger, level, text, position)``: small
  pickled tuples.

Errors travel as ``PackedError``: the exception pickled on its own, with its
type's name, message and traceback text, so one that cannot be pickled in the
worker or rebuilt in the parent still arrives as a ``RemoteError`` that keeps
them; ``rebuild_error`` attaches the text as a ``RemoteTraceback``
``__cause__``, the convention of ``concurrent.futures`` and loky.
"""

from __future__ import annotations

import io
import pickle
import struct
import threading
from typing import Any

import cloudpickle

from parstream._errors import RemoteError

RUN = 1
RESULTS = 2
READY = 3
BAD_BATCH = 4
STOP = 5
LOG = 6

_HEADER = struct.Struct("<BIBd")
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


def _type_name(cls: type) -> str:
    module = getattr(cls, "__module__", None)
    name = str(getattr(cls, "__qualname__", None) or getattr(cls, "__name__", "?"))
    return name if module in (None, "builtins") else f"{module}.{name}"


def _text_of(exc: BaseException) -> str:
    try:
        return str(exc)
    except BaseException as cause:
        return f"<str() of the exception raised {type(cause).__name__}>"


class PackedError:
    """A task's exception ready to travel, with a text fallback.

    The exception is pickled on its own, next to its type's name, its message
    and the traceback text; whatever the payload around it, unpickling a
    ``PackedError`` yields ``(exception, traceback_text)`` and never raises:
    an exception that could not be pickled in the worker, or not be rebuilt in
    the parent, comes back as a ``RemoteError`` that keeps the name, message
    and traceback.
    """

    __slots__ = ("fields",)

    def __init__(self, exc: BaseException, tb: str) -> None:
        try:
            data: bytes | None = dumps(exc)
            reason = ""
        except BaseException as cause:
            data = None
            reason = f"could not be pickled in the worker: {cause!r}"
        self.fields = (data, _type_name(type(exc)), _text_of(exc), tb, reason)

    def __reduce__(self) -> tuple[Any, ...]:
        return (_unpack_error, self.fields)


def _unpack_error(
    data: bytes | None, type_name: str, message: str, tb: str, reason: str
) -> tuple[BaseException, str]:
    if data is not None:
        try:
            exc = pickle.loads(data)
        except BaseException as cause:
            reason = f"could not be unpickled in the parent: {cause!r}"
        else:
            if isinstance(exc, BaseException):
                return exc, tb
            reason = f"was unpickled in the parent as a {_type_name(type(exc))}"
    return RemoteError(type_name, message, reason), tb


def pack_error(payload: tuple[BaseException, str]) -> PackedError:
    return PackedError(*payload)


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


Errors = dict[int, tuple[BaseException, str]]

# -- results ---------------------------------------------------------------

# Values of these exact types cannot fail to pickle or to unpickle, so a flush
# of them travels as one pickle (the fast path for tiny items).
_ATOMIC = frozenset({int, float, bool, type(None), str, bytes, complex})
_CONTAINERS = frozenset({tuple, list, dict})
_ATOMIC_OR_CONTAINER = _ATOMIC | _CONTAINERS
PLAIN_CONTAINER_MAX = 64  # longer containers are checked by pickling them alone


def _is_plain(value: Any) -> bool:
    cls = type(value)
    if cls in _ATOMIC:
        return True
    if cls not in _CONTAINERS or len(value) > PLAIN_CONTAINER_MAX:
        return False
    if cls is dict:
        return set(map(type, value)) <= _ATOMIC and set(map(type, value.values())) <= _ATOMIC
    return set(map(type, value)) <= _ATOMIC


def _all_plain(values: list[Any]) -> bool:
    types = set(map(type, values))
    if types <= _ATOMIC:
        return True
    return types <= _ATOMIC_OR_CONTAINER and all(map(_is_plain, values))


class _ItemPickler(cloudpickle.Pickler):  # type: ignore[misc]
    """Pickles one value at a time; classes go to a table shared by the flush.

    Each value must unpickle alone in the parent, but a class pickled by value
    (one defined in ``__main__`` or a notebook) costs ~50 us and ~700 bytes:
    per item, that would be 20 times the cost of a small instance. So a class
    is pickled once per flush, in a table of its own, and items refer to it by
    position (a class that cannot be rebuilt fails only the items using it).
    """

    def __init__(self, file: io.BytesIO, classes: dict[type, int]) -> None:
        super().__init__(file, protocol=PROTOCOL)
        self.classes = classes

    def reducer_override(self, obj: Any) -> Any:
        if isinstance(obj, type):
            key = self.classes.get(obj)
            if key is None:
                key = self.classes[obj] = len(self.classes)
            return _shared_class, (key,)
        return super().reducer_override(obj)


class _Loading(threading.local):
    classes: list[tuple[str, bytes | None, str]] | None = None
    loaded: dict[int, Any] | None = None


_loading = _Loading()


def _shared_class(key: int) -> Any:
    """Called while unpickling an item: its class from the flush's table."""
    classes, loaded = _loading.classes, _loading.loaded
    if classes is None or loaded is None:
        raise pickle.UnpicklingError("a shared class outside of a flush of results")
    if key not in loaded:
        name, data, reason = classes[key]
        if data is None:
            loaded[key] = pickle.PicklingError(f"the class {name} {reason}")
        else:
            try:
                loaded[key] = pickle.loads(data)
            except BaseException as cause:
                err = pickle.UnpicklingError(
                    f"the class {name} could not be unpickled in the parent: {cause!r}"
                )
                err.__cause__ = cause
                loaded[key] = err
    found = loaded[key]
    if isinstance(found, BaseException):
        raise found
    return found


def dumps_results(done: bool, t_next: float, values: list[Any], errors: Errors) -> bytes:
    """Frame a flush of results, so that each item fails alone, in place.

    ``values`` has one entry per item (``None`` where the item failed);
    ``errors`` maps positions in it to ``(exception, traceback_text)``.
    The payload is ``(values, packed, blob, classes, errors)``: ``values``
    holds the plain values (``_ATOMIC``, or small containers of them) in
    place; every other value is pickled alone into ``blob`` (``packed`` lists
    ``(position, end offset, type name)``), its classes into ``classes``;
    errors are ``PackedError``. A value that cannot be pickled fails alone.
    """
    header = _HEADER.pack(RESULTS, len(values), 1 if done else 0, t_next)
    if not errors and _all_plain(values):
        return header + pickle.dumps((values, None, b"", None, None), PROTOCOL)
    plain = list(values)
    packed: list[tuple[int, int, str]] = []
    failed: dict[int, PackedError] = {}
    same: dict[int, PackedError] = {}  # one payload shared by many items packs once
    buf = io.BytesIO()
    classes: dict[type, int] = {}
    pickler = _ItemPickler(buf, classes)
    names: dict[type, str] = {}
    for i, value in enumerate(values):
        if i in errors:
            payload = errors[i]
            pe = same.get(id(payload))
            if pe is None:
                pe = same[id(payload)] = PackedError(*payload)
            failed[i] = pe
            continue
        if _is_plain(value):
            continue
        plain[i] = None
        cls = type(value)
        name = names.get(cls)
        if name is None:
            name = names[cls] = _type_name(cls)
        start = buf.tell()
        try:
            pickler.clear_memo()
            pickler.dump(value)
        except BaseException as cause:
            buf.seek(start)
            buf.truncate()
            err = pickle.PicklingError(
                f"the task's result ({name}) could not be pickled "
                f"to send it back from the worker: {cause}"
            )
            failed[i] = PackedError(err, "")
            continue
        packed.append((i, buf.tell(), name))
    table: list[tuple[str, bytes | None, str]] = []
    for cls in classes:
        try:
            table.append((_type_name(cls), dumps(cls), ""))
        except BaseException as cause:
            table.append((_type_name(cls), None, f"could not be pickled in the worker: {cause!r}"))
    return header + pickle.dumps((plain, packed, buf.getvalue(), table, failed), PROTOCOL)


def loads_results(data: bytes) -> tuple[bool, float, list[Any], Errors]:
    """Inverse of ``dumps_results``: each value or error that cannot be
    rebuilt fails its own item, with its type's name in the message."""
    _, count, done, t_next = _HEADER.unpack_from(data)
    try:
        values, packed, blob, classes, errors = pickle.loads(memoryview(data)[_HEADER.size :])
    except BaseException as cause:  # pragma: no cover - only built-in types and our own
        err = pickle.UnpicklingError(f"a flush of results could not be unpickled: {cause!r}")
        return bool(done), t_next, [None] * count, dict.fromkeys(range(count), (err, ""))
    if not packed:
        return bool(done), t_next, values, errors or {}
    view = memoryview(blob)
    _loading.classes, _loading.loaded = classes, {}
    try:
        start = 0
        for i, end, name in packed:
            try:
                values[i] = pickle.loads(view[start:end])
            except BaseException as cause:
                err = pickle.UnpicklingError(
                    f"the task's result ({name}) could not be unpickled in the parent: {cause!r}"
                )
                err.__cause__ = cause
                errors[i] = (err, "")
            start = end
    finally:
        _loading.classes = _loading.loaded = None
    if len(errors) > 1:
        errors = dict(sorted(errors.items()))
    return bool(done), t_next, values, errors
