"""A worker's progress slot: a few words of memory shared by a worker and its parent.

The worker writes, before it starts anything, which batch it has begun (the
batch's sequence number, taken from the message header, before the message is
unpickled) and how many of that batch's items it has begun. The parent reads
the slot when the worker dies, which is the one moment the worker can no
longer tell it anything: a batch the worker never began is re-queued whole
(the worker was killed idle, or before it read the message); otherwise the
item that was running is the culprit, the items after it never started and
run once elsewhere, and nothing is guessed.

The memory is an anonymous ``memfd`` (Linux), mapped on both sides and handed
to the worker as an inherited file descriptor; nothing is left in
``/dev/shm`` whatever kills whom. Where ``memfd_create`` is missing there is
no slot, and the pool falls back to its older, coarser attribution.
"""

from __future__ import annotations

import mmap
import os
from typing import Any

SEQ = 0  # the sequence number of the batch the worker has begun
BEGUN = 1  # items of that batch the worker has begun
_WORDS = 2
_SIZE = 8 * _WORDS


class Slot:
    """The mapped slot; ``words[SEQ]`` and ``words[BEGUN]`` are plain integers."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._map = mmap.mmap(fd, _SIZE)
        self.words = memoryview(self._map).cast("Q")

    def read(self) -> tuple[int, int]:
        return self.words[SEQ], self.words[BEGUN]

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
