"""A worker's progress slot: a few words of memory shared by a worker and its parent.

The worker writes, before it starts anything, which batch it has begun (the
batch's sequence number, taken from the message header, before the message is
unpickled) and how many of that batch's items it has begun. The parent reads
the slot when the worker dies, which is the one moment the worker can no
longer tell it anything: a batch the worker never began is re-queued whole
(the worker was killed idle, or before it read the message); otherwise the
item that was running is the culprit, the items after it never started and
run once elsewhere, and nothing is guessed.

The same memory holds the worker's *journal*: the results of the items it
finished since its last flush of results to the pipe, appended one by one
as they finish. A worker that dies mid-batch leaves its finished items'
results there, so they are delivered, not lost and not run again. Entry
``i`` of a plain ``int`` result is the ``i``-th word of an array (``ints``),
which the worker's item loop writes itself, with the count (~0.1 us);
any other result is appended, pickled and tagged with its entry number, to
a byte area (~0.8 us). Workers journal, and mark one by one, only items
that take at least
``JOURNAL_MIN_ITEM_S``. Below that (pure computations of a microsecond),
items run from C a step at a time and the slot holds the step's bounds
(``WINDOW`` .. ``BEGUN``, ``EXACT`` = 0): after a death, the items finished
since the last flush run again and the step runs one item at a time.

In a batch with a per-item timeout the worker also stamps each item's start
(``STARTED``), so the parent can tell, at an item's deadline, whether that
item is still running or a later one began (and when) without a message per
item.

The memory is an anonymous ``memfd`` (Linux), mapped on both sides and handed
to the worker as an inherited file descriptor; nothing is left in
``/dev/shm`` whatever kills whom. Where ``memfd_create`` is missing there is
no slot, and the pool falls back to its older, coarser attribution.
"""

from __future__ import annotations

import _pickle as pickle  # the C module: the pure one imports re (a worker start; issue 12)
import mmap
import os
import struct

from parstream._backends._frames import OOB_MIN_BYTES, Collector

TYPE_CHECKING = False  # see parstream/__init__.py
if TYPE_CHECKING:
    from typing import Any

SEQ = 0  # the sequence number of the batch the worker has begun
BEGUN = 1  # items of that batch the worker has begun
J_BASE = 2  # the batch position of the journal's first entry
J_COUNT = 3  # entries written (each complete before this is raised)
J_USED = 4  # bytes of the journal in use
WINDOW = 5  # tiny items: the batch position where the current step began
EXACT = 6  # 1 while BEGUN counts items one by one; 0 while it counts steps
STARTED = 7  # batches with a per-item timeout: time.monotonic_ns() at the begun item's start
_WORDS = 8
INT_SLOTS = 1 << 16  # int entries the array holds; later ones go to the byte area
_INTS = 8 * _WORDS  # where the array of int entries starts
_DATA = _INTS + 8 * INT_SLOTS  # where the byte entries start
JOURNAL_BYTES = 4 << 20  # pages are only allocated as they are written
_SIZE = _DATA + JOURNAL_BYTES
JOURNAL_MIN_ITEM_S = 1e-6
# Results this large are flushed at once instead of journaled: copying them
# into the journal would cost more than the flush, which moves them beside
# the pipe (``_shm``) from this size on.
_BIG = OOB_MIN_BYTES

_VALUE, _ERROR = 0, 1
_ENTRY = struct.Struct("<BII")  # kind, payload length, entry number


class Slot:
    """The mapped slot; ``words[SEQ]`` and ``words[BEGUN]`` are plain integers."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._map = mmap.mmap(fd, _SIZE)
        self.words = memoryview(self._map)[:_INTS].cast("Q")
        self.ints = memoryview(self._map)[_INTS:_DATA].cast("q")

    def read(self) -> tuple[int, int, int | None]:
        """``(seq, begun, window)``: the batch begun last; how many of its
        items had begun; ``window`` is ``None`` when ``begun`` is exact, else
        the position where the step of tiny items that was running began
        (the culprit is one of ``window .. begun - 1``)."""
        words = self.words
        exact = words[EXACT] == 1
        return words[SEQ], words[BEGUN], None if exact else words[WINDOW]

    def started(self) -> float:
        """When the item counted by ``BEGUN`` began (``time.monotonic()``'s
        clock, system-wide), in a batch with a per-item timeout. Written
        before ``BEGUN``: read after it, it is that item's start or a later
        item's, never an earlier one's."""
        return self.words[STARTED] / 1e9

    # -- the journal: written by the worker --------------------------------

    def journal_reset(self, base: int) -> None:
        words = self.words
        words[J_COUNT] = 0
        words[J_USED] = 0
        words[J_BASE] = base

    def journal_value(self, value: Any) -> bool:
        """Append a finished item's value; False if the journal is full.

        The worker's item loop writes a plain ``int`` itself, the same way
        (``ints[count] = value``, then the count), without this call."""
        count = self.words[J_COUNT]
        if type(value) is int:
            try:
                self.ints[count] = value
            except (IndexError, ValueError, OverflowError):
                pass  # past the array, or beyond 64 bits: pickled below
            else:
                self.words[J_COUNT] = count + 1
                return True
        nbytes = getattr(value, "nbytes", 0)
        if isinstance(nbytes, int) and nbytes >= _BIG:
            return False  # a big array: flushing it now is cheaper than copying it twice
        big = Collector()  # big buffers inside the value (a tuple of arrays...)
        # Any exception (a ``__reduce__`` may raise SystemExit): the value is
        # the item's result already, and the flush reports why it cannot go.
        try:
            data = pickle.dumps(value, protocol=5, buffer_callback=big)
        except BaseException:
            from parstream._backends._codec import dumps

            try:
                data = dumps(value, big)
            except BaseException:
                return False
        if big.buffers:
            return False  # flushed at once, as a big array is
        return self._append(_VALUE, data)

    def journal_error(self, failure: tuple[BaseException, str]) -> bool:
        from parstream._backends._codec import pack_error

        # Unpickles to (exception, traceback), or to a RemoteError keeping the
        # type's name, message and traceback if the exception cannot travel.
        return self._append(_ERROR, pickle.dumps(pack_error(failure), protocol=5))

    def _append(self, kind: int, data: bytes) -> bool:
        words = self.words
        used = words[J_USED]
        count = words[J_COUNT]
        start = used + _ENTRY.size
        end = start + len(data)
        if end > JOURNAL_BYTES:
            return False
        _ENTRY.pack_into(self._map, _DATA + used, kind, len(data), count)
        self._map[_DATA + start : _DATA + end] = data
        words[J_USED] = end
        words[J_COUNT] = count + 1
        return True

    # -- the journal: read by the parent after the worker died ----------------

    def journal(self) -> tuple[int, list[tuple[bool, Any]]]:
        """``(base, [(ok, value_or_failure), ...])`` as the worker left them.

        An entry that cannot be unpickled here becomes a failure of its own.
        """
        base, count, used = self.words[J_BASE], self.words[J_COUNT], self.words[J_USED]
        tagged: dict[int, tuple[bool, Any]] = {}
        offset = 0
        while offset < used:
            kind, length, number = _ENTRY.unpack_from(self._map, _DATA + offset)
            start = _DATA + offset + _ENTRY.size
            offset += _ENTRY.size + length
            if number >= count:
                break  # written, but not counted: the worker died in between
            try:
                obj = pickle.loads(self._map[start : start + length])
            except Exception as exc:
                err = pickle.UnpicklingError(
                    f"a task's result could not be unpickled in the parent: {exc!r}"
                )
                tagged[number] = (False, (err, ""))
                continue
            tagged[number] = (kind == _VALUE, obj)
        ints = self.ints
        out = [tagged[i] if i in tagged else (True, ints[i]) for i in range(count)]
        return base, out

    def close(self) -> None:
        try:
            self.words.release()
            self.ints.release()
            self._map.close()
        except (BufferError, ValueError):
            pass
        fd, self.fd = self.fd, -1  # once: the number may be reused after
        if fd >= 0:
            try:
                os.close(fd)
            except OSError:
                pass

    def __reduce__(self) -> tuple[Any, ...]:
        # Only while a worker is being started: the fd is handed down to it.
        from loky.backend._posix_reduction import DupFd

        return (_open_in_worker, (DupFd(self.fd),))


def _open_in_worker(dup: Any) -> Slot:
    return Slot(dup.detach())


def new_slot() -> Slot | None:
    create = getattr(os, "memfd_create", None)
    if create is None:
        return None
    try:
        fd = create("parstream-slot", getattr(os, "MFD_CLOEXEC", 0))
        if fd <= 2:  # never at 0-2, where a print would write into it (see _shm)
            from parstream._backends.local._shm import above_stdio

            fd = above_stdio(fd)
        os.ftruncate(fd, _SIZE)
    except OSError:
        return None
    return Slot(fd)
