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
results there, so they are delivered, not lost and not run again. Writing
an entry costs ~0.3 us (an int) to ~0.8 us (anything pickled), so workers
journal, and mark one by one, only items that take at least
``JOURNAL_MIN_ITEM_S``. Below that (pure computations of a microsecond),
items run from C a step at a time and the slot holds the step's bounds
(``WINDOW`` .. ``BEGUN``, ``EXACT`` = 0): after a death, the items finished
since the last flush run again and the step runs one item at a time.

The memory is an anonymous ``memfd`` (Linux), mapped on both sides and handed
to the worker as an inherited file descriptor; nothing is left in
``/dev/shm`` whatever kills whom. Where ``memfd_create`` is missing there is
no slot, and the pool falls back to its older, coarser attribution.
"""

from __future__ import annotations

import mmap
import os
import pickle
import struct

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
_WORDS = 8
_DATA = 8 * _WORDS  # where the journal's entries start
JOURNAL_BYTES = 4 << 20  # pages are only allocated as they are written
_SIZE = _DATA + JOURNAL_BYTES
JOURNAL_MIN_ITEM_S = 1e-6
_BIG = 1 << 20  # results this large are flushed at once instead of journaled

_VALUE, _ERROR, _INT = 0, 1, 2
_ENTRY = struct.Struct("<BI")  # kind, payload length
_INT_ENTRY = struct.Struct("<BIq")
_INT_MIN, _INT_MAX = -(2**63), 2**63 - 1


class Slot:
    """The mapped slot; ``words[SEQ]`` and ``words[BEGUN]`` are plain integers."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._map = mmap.mmap(fd, _SIZE)
        self.words = memoryview(self._map).cast("Q")

    def read(self) -> tuple[int, int, int | None]:
        """``(seq, begun, window)``: the batch begun last; how many of its
        items had begun; ``window`` is ``None`` when ``begun`` is exact, else
        the position where the step of tiny items that was running began
        (the culprit is one of ``window .. begun - 1``)."""
        words = self.words
        exact = words[EXACT] == 1
        return words[SEQ], words[BEGUN], None if exact else words[WINDOW]

    # -- the journal: written by the worker --------------------------------

    def journal_reset(self, base: int) -> None:
        words = self.words
        words[J_COUNT] = 0
        words[J_USED] = 0
        words[J_BASE] = base

    def journal_value(self, value: Any) -> bool:
        """Append a finished item's value; False if the journal is full."""
        if type(value) is int and _INT_MIN <= value <= _INT_MAX:
            used = self.words[J_USED]
            end = used + _INT_ENTRY.size
            if end > JOURNAL_BYTES:
                return False
            _INT_ENTRY.pack_into(self._map, _DATA + used, _INT, 8, value)
            self.words[J_USED] = end
            self.words[J_COUNT] += 1
            return True
        nbytes = getattr(value, "nbytes", 0)
        if isinstance(nbytes, int) and nbytes > _BIG:
            return False  # a big array: flushing it now is cheaper than copying it twice
        try:
            data = pickle.dumps(value, protocol=5)
        except Exception:
            from parstream._backends._codec import dumps

            try:
                data = dumps(value)
            except Exception:
                return False  # the flush will report why it cannot be sent
        return self._append(_VALUE, data)

    def journal_error(self, failure: tuple[BaseException, str]) -> bool:
        from parstream._backends._codec import pack_error

        # Unpickles to (exception, traceback), or to a RemoteError keeping the
        # type's name, message and traceback if the exception cannot travel.
        return self._append(_ERROR, pickle.dumps(pack_error(failure), protocol=5))

    def _append(self, kind: int, data: bytes) -> bool:
        used = self.words[J_USED]
        start = used + _ENTRY.size
        end = start + len(data)
        if end > JOURNAL_BYTES:
            return False
        _ENTRY.pack_into(self._map, _DATA + used, kind, len(data))
        self._map[_DATA + start : _DATA + end] = data
        self.words[J_USED] = end
        self.words[J_COUNT] += 1
        return True

    # -- the journal: read by the parent after the worker died ----------------

    def journal(self) -> tuple[int, list[tuple[bool, Any]]]:
        """``(base, [(ok, value_or_failure), ...])`` as the worker left them.

        An entry that cannot be unpickled here becomes a failure of its own.
        """
        base, count = self.words[J_BASE], self.words[J_COUNT]
        out: list[tuple[bool, Any]] = []
        offset = 0
        for _ in range(count):
            kind, length = _ENTRY.unpack_from(self._map, _DATA + offset)
            start = _DATA + offset + _ENTRY.size
            offset += _ENTRY.size + length
            if kind == _INT:
                out.append((True, struct.unpack_from("<q", self._map, start)[0]))
                continue
            try:
                obj = pickle.loads(self._map[start : start + length])
            except Exception as exc:
                err = pickle.UnpicklingError(
                    f"a task's result could not be unpickled in the parent: {exc!r}"
                )
                out.append((False, (err, "")))
                continue
            out.append((kind == _VALUE, obj))
        return base, out

    def close(self) -> None:
        try:
            self.words.release()
            self._map.close()
        except (BufferError, ValueError):
            pass
        try:
            os.close(self.fd)
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
        os.ftruncate(fd, _SIZE)
    except OSError:
        return None
    return Slot(fd)
