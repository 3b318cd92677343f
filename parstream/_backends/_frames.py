"""A flush of results as bytes, for every backend that runs items elsewhere.

``dumps_results`` frames the next items of a batch so that each item fails
alone, in place: a flush of plain values (``int``, ``str``, small tuples of
them...) is one pickle, which cannot fail; any other value is pickled on its
own (its classes once per flush), so one that cannot be pickled where it ran,
or not be unpickled here, fails its own item only, naming its type.
``loads_results`` is the inverse. The header carries the item count, whether
the batch is done, the runner's clock at the flush (``t_next``, the next
item's start; meaningful on one host only), and where the results belong
(``placement``): the batch's number as the runner read it, so the receiver
can check whose results these are before crediting them to anything, and
the position in the batch of the first result. ``EARLY`` marks a flush sent
while an item still runs, of results a later flush sends again: the
receiver takes each result once, by position.

A backend that can move memory beside the frame passes a ``buffer_callback``
(pickle protocol 5): the buffers it keeps out of band are listed in the frame
(their sizes, and which value uses which), the header's flag
``HAS_BUFFERS`` says so, and the receiver hands ``loads_results`` one
memoryview holding them all, laid out by ``buffer_layout``.
"""

from __future__ import annotations

import _pickle as pickle  # the C module: the pure one imports re (a worker start; issue 12)
import io
import struct
import types

from parstream._backends._codec import (
    PROTOCOL,
    PackedError,
    cloud_pickler,
    dumps,
    failure,
    type_name,
)

TYPE_CHECKING = False  # see parstream/__init__.py
if TYPE_CHECKING:
    from typing import Any

RESULTS = 2  # the kind byte a frame starts with (the local wire's RESULTS)
_HEADER = struct.Struct("<BIBdQQ")  # kind, count, flags, t_next, batch, base
_DONE = 1  # flags: the batch is done
HAS_BUFFERS = 2  # flags: out-of-band buffers travel beside this frame
EARLY = 4  # flags: sent while an item runs; a later flush repeats these results
_FLAGS_AT = 5
BUFFER_ALIGN = 64
OOB_MIN_BYTES = 128 * 1024  # smaller buffers cost less in the pickle than beside it

Layout = list[tuple[int, int]]

Errors = dict[int, tuple[BaseException, str]]

# -- results ---------------------------------------------------------------

# Values of these exact types cannot fail to pickle or to unpickle: a flush of
# them travels as one pickle (the fast path for tiny items, ``_PlainPickler``);
# in other flushes, such values (flat containers included) stay in place.
_ATOMIC = frozenset({int, float, bool, type(None), str, bytes, complex})
_CONTAINERS = frozenset({tuple, list, dict})
_ATOMIC_OR_CONTAINER = _ATOMIC | _CONTAINERS
# Objects pickled once per flush, in a table, rather than inside each value.
_SHARED = (type, types.FunctionType, types.BuiltinFunctionType)


def _is_plain(value: Any) -> bool:
    """An atomic value, or a flat container of atomic values."""
    cls = type(value)
    if cls in _ATOMIC:
        return True
    if cls is dict:
        return set(map(type, value)) <= _ATOMIC and set(map(type, value.values())) <= _ATOMIC
    return cls in _CONTAINERS and set(map(type, value)) <= _ATOMIC


class _NotPlain(Exception):
    pass


class _PlainPickler(pickle.Pickler):
    """Pickles a flush whose values are all plain, or raises ``_NotPlain``.

    The C pickler handles ``None``, ``bool``, exact ``int``, ``float``,
    ``str``, ``bytes``, ``bytearray``, ``PickleBuffer`` and the built-in
    containers (sets included) without consulting ``reducer_override``;
    anything else reaches it. So a flush of plain values (which cannot fail
    to unpickle) costs no check at all, and the first other value sends the
    flush down the per-item path. A ``PickleBuffer`` does too (``dumps_plain``
    refuses out-of-band buffers), so it can go through shared memory.
    """

    def reducer_override(self, obj: Any) -> Any:
        if type(obj) is complex:
            return NotImplemented
        raise _NotPlain


def dumps_plain(payload: Any) -> bytes | None:
    """``payload`` pickled by the C pickler alone if it holds only plain
    values (see ``_PlainPickler``); ``None`` at the first other value."""
    buf = io.BytesIO()
    try:
        _PlainPickler(buf, PROTOCOL, buffer_callback=_refuse).dump(payload)
    except Exception:  # _NotPlain; or RecursionError (lists nested thousands deep)...
        return None  # ... which the per-item path then fails alone, by name
    return buf.getvalue()


def _refuse(buffer: Any) -> bool:
    raise _NotPlain


class _Sharing:
    """Classes and functions go to a table shared by the flush (see ``_ValuePacker``)."""

    shared: dict[int, tuple[int, Any]]

    def persistent_id(self, obj: Any) -> int | None:
        if type(obj) in _ATOMIC_OR_CONTAINER or not isinstance(obj, _SHARED):
            return None
        entry = self.shared.get(id(obj))
        if entry is None:
            entry = self.shared[id(obj)] = (len(self.shared), obj)
        return entry[0]


# Subclasses, not an assigned attribute: Python 3.13 made ``persistent_id``
# read-only on pickler instances.
class _FastPickler(_Sharing, pickle.Pickler):
    def __init__(
        self, file: io.BytesIO, shared: dict[int, tuple[int, Any]], buffer_callback: Any
    ) -> None:
        super().__init__(file, PROTOCOL, buffer_callback=buffer_callback)
        self.shared = shared


_cloud_pickler: Any = None


def _new_cloud_pickler(
    file: io.BytesIO, shared: dict[int, tuple[int, Any]], buffer_callback: Any
) -> Any:
    """A ``_Sharing`` cloudpickle pickler; the class is made on first use, so
    a worker imports cloudpickle only when a value needs it."""
    global _cloud_pickler
    if _cloud_pickler is None:

        class _CloudPickler(_Sharing, cloud_pickler()):  # type: ignore[misc]
            def __init__(
                self, file: io.BytesIO, shared: dict[int, tuple[int, Any]], buffer_callback: Any
            ) -> None:
                super().__init__(file, protocol=PROTOCOL, buffer_callback=buffer_callback)
                self.shared = shared

        _cloud_pickler = _CloudPickler
    return _cloud_pickler(file, shared, buffer_callback)


class Collector:
    """A pickler's ``buffer_callback``: big contiguous buffers out of band."""

    __slots__ = ("buffers",)

    def __init__(self) -> None:
        self.buffers: list[memoryview] = []

    def __call__(self, buffer: pickle.PickleBuffer) -> bool:
        try:
            raw = buffer.raw()
        except BufferError:  # not contiguous: the pickle keeps a copy
            return True
        if raw.nbytes < OOB_MIN_BYTES:
            return True
        self.buffers.append(raw)
        return False


def buffer_layout(sizes: list[int]) -> Layout:
    """``(offset, length)`` of each buffer when laid out one after another,
    each at a ``BUFFER_ALIGN``-byte boundary (numpy's alignment and more)."""
    layout: Layout = []
    offset = 0
    for n in sizes:
        layout.append((offset, n))
        offset = (offset + n + BUFFER_ALIGN - 1) // BUFFER_ALIGN * BUFFER_ALIGN
    return layout


def split_buffers(whole: memoryview, sizes: list[int]) -> list[memoryview]:
    """One view per buffer of ``sizes`` in ``whole``, laid out by ``buffer_layout``."""
    return [whole[offset : offset + n] for offset, n in buffer_layout(sizes)]


def placement(data: bytes) -> tuple[int, int, bool]:
    """Where the results of the frame ``data`` belong: the number of their
    batch, the position in it of the first, and whether the frame was sent
    while an item ran (``EARLY``)."""
    _, _, flags, _, batch, base = _HEADER.unpack_from(data)
    return batch, base, bool(flags & EARLY)


def has_buffers(data: bytes) -> bool:
    """Whether the frame ``data`` announces out-of-band buffers beside it."""
    return bool(data[_FLAGS_AT] & HAS_BUFFERS)


class _ValuePacker:
    """Pickles a flush's values one at a time, so each can be unpickled alone.

    Classes and functions inside the values go to a table pickled once per
    flush and are referred to by persistent id: a class pickled by value (one
    defined in ``__main__`` or a notebook) costs ~50 us and ~700 bytes, and
    even one by reference costs the parent a ~1 us import lookup, per item.
    A class that cannot be rebuilt in the parent fails only the items using it.
    The C pickler goes first; cloudpickle's only for a value the C one refuses
    (a lambda inside a ``functools.partial``, a ``property``...).
    """

    def __init__(self, collect: Any = None) -> None:
        self.buf = io.BytesIO()
        self.shared: dict[int, tuple[int, Any]] = {}
        # ``collect``: a buffer_callback with a ``buffers`` list (see the
        # module docstring); ``None`` keeps every buffer in the pickle.
        self.collect = collect
        self.fast = _FastPickler(self.buf, self.shared, collect)
        self.slow: Any = None  # a cloudpickle pickler, made when first needed

    def add(self, value: Any) -> int:
        """Append one value's pickle; its end offset. Raises if it cannot be pickled."""
        buf = self.buf
        start = buf.tell()
        kept = len(self.collect.buffers) if self.collect is not None else 0
        try:
            self.fast.clear_memo()
            self.fast.dump(value)
            return buf.tell()
        except BaseException:
            self._undo(start, kept)
        if self.slow is None:
            self.slow = _new_cloud_pickler(buf, self.shared, self.collect)
        try:
            self.slow.clear_memo()
            self.slow.dump(value)
        except BaseException:
            self._undo(start, kept)
            raise
        return buf.tell()

    def _undo(self, start: int, kept: int) -> None:
        """Forget a value that failed half-way: its bytes and its buffers."""
        self.buf.seek(start)
        self.buf.truncate()
        if self.collect is not None:
            del self.collect.buffers[kept:]

    def table(self) -> list[tuple[str, bytes | None, str]]:
        out: list[tuple[str, bytes | None, str]] = []
        for _, obj in self.shared.values():
            name = type_name(obj) if isinstance(obj, type) else _function_name(obj)
            try:
                out.append((name, dumps(obj), ""))
            except BaseException as cause:
                out.append((name, None, f"could not be pickled in the worker: {cause!r}"))
        return out


def _function_name(fn: Any) -> str:
    module = getattr(fn, "__module__", None)
    name = str(getattr(fn, "__qualname__", None) or getattr(fn, "__name__", "?"))
    return name if module in (None, "builtins") else f"{module}.{name}"


class _SharedTable:
    """The parent's side of ``_ValuePacker``'s table: each entry unpickled
    on first use, a failure kept and raised for every item that uses it."""

    def __init__(self, entries: list[tuple[str, bytes | None, str]]) -> None:
        self.entries = entries
        self.loaded: dict[int, Any] = {}
        self.failed: dict[int, BaseException] = {}

    def persistent_load(self, key: int) -> Any:
        try:
            return self.loaded[key]
        except KeyError:
            pass
        if key in self.failed:
            raise self.failed[key]
        name, data, reason = self.entries[key]
        try:
            if data is None:
                raise pickle.PicklingError(f"{name} {reason}")
            obj = self.loaded[key] = pickle.loads(data)
        except BaseException as cause:
            err = pickle.UnpicklingError(f"{name} could not be rebuilt in the parent: {cause!r}")
            err.__cause__ = cause
            self.failed[key] = err
            raise err from cause
        return obj


class _Unpickler(pickle.Unpickler):
    """Reads one value of a flush (each has an unpickler of its own: see
    ``loads_results``). Slotted, set up by ``_unpickler`` without a Python
    ``__init__``: ~0.7 us less per value, a third of a small value's cost."""

    __slots__ = ("loaded", "shared")
    shared: _SharedTable
    loaded: dict[int, Any]

    def persistent_load(self, pid: Any) -> Any:
        try:
            return self.loaded[pid]
        except KeyError:
            return self.shared.persistent_load(pid)


def _unpickler(
    file: io.BytesIO, shared: _SharedTable, buffers: list[memoryview] | None = None
) -> _Unpickler:
    unpickler = _Unpickler(file, buffers=buffers)
    unpickler.shared = shared
    unpickler.loaded = shared.loaded
    return unpickler


def dumps_results(
    done: bool,
    t_next: float,
    values: list[Any],
    errors: Errors,
    collect: Any = None,
    batch: int = 0,
    base: int = 0,
    early: bool = False,
) -> bytes:
    """Frame a flush of results, so that each item fails alone, in place.

    ``values`` has one entry per item (``None`` where the item failed);
    ``errors`` maps positions in it to ``(exception, traceback_text)``.
    The payload is ``(values, packed, blob, table, errors)``: ``values``
    holds the plain values (see ``_is_plain``) in place; every other value
    is pickled alone into ``blob`` (``packed`` lists ``(position, end
    offset, type name)``) by a ``_ValuePacker``, whose shared ``table`` it
    refers to; errors are ``PackedError``. A value that cannot be pickled
    fails alone.

    With ``collect`` (a ``buffer_callback`` keeping the buffers it takes out
    of band in its ``buffers`` list), a sixth field ``(sizes, spans)`` lists
    those buffers' sizes and, per value, the range of them it uses; the
    caller sends ``collect.buffers`` beside the frame. ``batch``, ``base``
    and ``early``: see ``placement`` (with ``early``, a value that cannot be
    pickled raises, rather than failing its item).
    """
    flags = (_DONE if done else 0) | (EARLY if early else 0)
    if not errors:
        data = dumps_plain((values, None, b"", None, None, None))
        if data is not None:
            return _HEADER.pack(RESULTS, len(values), flags, t_next, batch, base) + data
    plain = list(values)
    packed: list[tuple[int, int, str]] = []
    failed: dict[int, PackedError] = {}
    same: dict[int, PackedError] = {}  # one payload shared by many items packs once
    packer = _ValuePacker(collect)
    spans: dict[int, tuple[int, int]] = {}
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
            name = names[cls] = type_name(cls)
        first = len(collect.buffers) if collect is not None else 0
        try:
            end = packer.add(value)
        except BaseException as cause:
            if early:
                raise  # all or nothing: the batch's own flush reports it
            err = pickle.PicklingError(
                f"the task's result ({name}) could not be pickled "
                f"to send it back from the worker: {cause!r}"
            )
            # The worker's traceback of the failed pickling (the line in
            # ``__getstate__``/``__reduce__``) comes back as the __cause__.
            failed[i] = PackedError(err, failure(cause)[1])
            continue
        packed.append((i, end, name))
        if collect is not None and len(collect.buffers) > first:
            spans[i] = (first, len(collect.buffers))
    oob = None
    if spans:
        flags |= HAS_BUFFERS
        oob = ([b.nbytes for b in collect.buffers], spans)
    frame = (plain, packed, packer.buf.getvalue(), packer.table(), failed, oob)
    head = _HEADER.pack(RESULTS, len(values), flags, t_next, batch, base)
    return head + pickle.dumps(frame, PROTOCOL)


def loads_results(
    data: bytes, buffers: memoryview | BaseException | None = None
) -> tuple[bool, float, list[Any], Errors]:
    """Inverse of ``dumps_results``: each value or error that cannot be
    rebuilt fails its own item, with its type's name in the message.
    ``buffers`` holds the frame's out-of-band buffers (``HAS_BUFFERS``), laid
    out by ``buffer_layout``; else why they could not be received, or
    ``None``."""
    _, count, flags, t_next, _, _ = _HEADER.unpack_from(data)
    done = flags & _DONE
    try:
        values, packed, blob, table, errors, oob = pickle.loads(memoryview(data)[_HEADER.size :])
    except BaseException as cause:  # pragma: no cover - only built-in types and our own
        err = pickle.UnpicklingError(f"a flush of results could not be unpickled: {cause!r}")
        return bool(done), t_next, [None] * count, dict.fromkeys(range(count), (err, ""))
    if not packed:
        return bool(done), t_next, values, errors or {}
    spans: dict[int, tuple[int, int]] = {}
    views: list[memoryview] = []
    if oob is not None:
        sizes, spans = oob
        if isinstance(buffers, memoryview):
            views = split_buffers(buffers, sizes)
    shared = _SharedTable(table)
    file = io.BytesIO(blob)
    start = 0
    for i, end, name in packed:
        file.seek(start)
        span = spans.get(i)
        try:
            # An unpickler of its own for each value, as each was pickled with
            # a fresh memo (``_ValuePacker``). One shared unpickler kept the
            # earlier values' memo entries, and protocol 4's MEMOIZE numbers
            # an entry by their count: a result that referred twice to one
            # object got an earlier result's object in its place. (Clearing an
            # unpickler's memo leaves that count; assigning it a new memo can
            # crash CPython 3.11.) A value with buffers beside the frame gets
            # its share of them.
            if span is None:
                values[i] = _unpickler(file, shared).load()
            elif not views:
                if isinstance(buffers, BaseException):
                    raise EOFError(f"its large buffers could not be received: {buffers!r}")
                raise EOFError("its large buffers did not arrive from the worker")
            else:
                values[i] = _unpickler(file, shared, views[span[0] : span[1]]).load()
        except BaseException as cause:
            err = pickle.UnpicklingError(
                f"the task's result ({name}) could not be unpickled in the parent: {cause!r}"
            )
            err.__cause__ = cause
            errors[i] = (err, "")
        start = end
    if len(errors) > 1:
        errors = dict(sorted(errors.items()))
    return bool(done), t_next, values, errors
