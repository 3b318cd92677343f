"""The message format between the parent and its workers, shared by both sides.

Every message is one ``send_bytes`` frame that starts with a kind byte.

* ``RUN`` (parent to worker): a fixed header ``(kind, seq, has_buffers)``,
  ``seq`` the batch's sequence number on that worker (readable before the
  rest is unpickled), then a cloudpickled tuple
  ``(key, fn_bytes | None, count, items_bytes, star, report_each, evict,
  has_bad, log_level, buffers, whole)``, ``items_bytes`` the pickled ``[args, ...]``,
  so the worker loads the function before it unpickles the arguments;
  with ``star`` each entry is an argument tuple, else the single argument;
  ``has_bad`` says some entries are ``BadArgs`` stand-ins; ``buffers`` is
  ``(block_id, sizes)`` for the items' large out-of-band buffers, held (in
  ``buffer_layout``) by the arena block whose descriptor was sent on the
  descriptor channel just before (``_shm``); ``whole``: run every item,
  never stopping at the time budget to give the rest back.
  The function is pickled once per stream or task (``fn_bytes``) and cached in
  the worker under ``key`` (16 random bytes, see ``_functions``); ``evict``
  lists keys the worker may forget.
* ``RESULTS`` (worker to parent): the next items of the batch in order, each
  failing alone, framed by ``_frames.dumps_results`` (shared with Ray); a
  frame whose header says so has its large buffers in a ``memfd`` sent just
  before it, as ``RUN`` does.
* ``LOADED`` (worker to parent, a bare kind byte): the function of a batch
  with a per-item timeout was loaded; the first item's clock restarts.
* ``READY``, ``BAD_BATCH``, ``LOG`` ``(logger, level, text, position)``,
  ``FORGET`` ``key`` (a function the worker failed to load: send it again
  next time), ``RELEASED`` ``[block_id, ...]`` (arena blocks the worker
  has unmapped, see ``_shm``), ``START_FAILED`` ``(exception, traceback_text)`` (the
  initializer raised; the worker then exits): small pickles.
* ``FREED`` ``[block_id, ...]`` (parent to worker, before a ``RUN`` or while
  it idles): result blocks the parent no longer maps, to be written again
  (a negative id: closed, see ``_shm``).
* ``PROMOTE`` (parent to a spare worker, a bare kind byte): the spare,
  booted and waiting, now runs the initializer and says ``READY``; ``STOP``
  or end of file ends it instead.

Errors travel as ``_codec.PackedError``, so one that cannot be pickled in the
worker or rebuilt in the parent still arrives as a ``RemoteError``.
"""

from __future__ import annotations

import _pickle as pickle  # the C module: the pure one imports re (a worker start; issue 12)
import collections
import os
import struct

from parstream._backends._codec import PROTOCOL, dumps
from parstream._backends._frames import (
    RESULTS as RESULTS,
    Collector as Collector,
    Errors as Errors,
    dumps_results as dumps_results,
    has_buffers as has_buffers,
    loads_results as loads_results,
    placement as placement,
    split_buffers as split_buffers,
)

RUN = 1
# RESULTS = 2: a flush of results, framed by ``_frames.dumps_results``
READY = 3
BAD_BATCH = 4
STOP = 5
LOG = 6
FORGET = 7
LOADED = 8
START_FAILED = 9  # worker to parent: the initializer raised; (exception, traceback_text)
RELEASED = 10  # worker to parent: arena blocks it no longer maps; [block_id, ...]
PROMOTE = 11  # parent to a spare worker, a bare kind byte: become a worker now
FREED = 12  # parent to worker: result blocks it no longer maps; [block_id, ...]
# Parent to a worker that has run nothing yet, before its first RUN: the
# sys.path, directory and environment a start now would give (a restart came
# while it started); (path, cwd, environ).
CONTEXT = 13

_RUN_HEADER = struct.Struct("<BQB")  # kind, seq, a descriptor was sent just before

# typing is not imported at run time: it costs every worker start ~3 ms.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, NamedTuple

    class RunMessage(NamedTuple):
        """The body of a ``RUN`` frame (after its header)."""

        key: bytes  # the function's key (see ``_functions``)
        fn_bytes: bytes | None  # the pickled function, if the worker lacks ``key``
        n_items: int  # items in the batch
        items_bytes: bytes  # the pickled list of items
        star: bool  # each item is an argument tuple
        report_each: bool  # one RESULTS per item (a per-item timeout is running)
        evict: list[bytes]  # keys the worker may forget
        has_bad: bool  # some items are ``BadArgs`` stand-ins
        log_level: int  # the parent's root logging level
        # (arena block id, sizes in ``buffer_layout``) of the items' large
        # buffers, in the descriptor sent just before (``_shm``); or None.
        buffers: tuple[int, list[int]] | None
        whole: bool  # run every item, past the time budget (the job is not returnable)

else:  # the same fields, as a plain namedtuple
    RunMessage = collections.namedtuple(
        "RunMessage",
        "key fn_bytes n_items items_bytes star report_each evict has_bad log_level buffers whole",
    )


def wait_readable(fd: int, timeout: float | None = 0.0) -> bool:
    """Whether ``fd`` is readable (or at its end) within ``timeout`` seconds
    (None: no limit). ``poll``, not ``select``, which refuses descriptors
    numbered 1024 or more, as a program holding many sockets gets (POSIX)."""
    import select

    poller = select.poll()
    poller.register(fd, select.POLLIN)
    ms = -1 if timeout is None else min(max(0, int(timeout * 1000 + 0.999)), 2**31 - 1)
    return bool(poller.poll(ms))


def encode(kind: int, obj: Any) -> bytes:
    # Plain pickle first: a worker's READY, LOG and FORGET need no cloudpickle.
    try:
        return bytes((kind,)) + pickle.dumps(obj, PROTOCOL)
    except Exception:
        return bytes((kind,)) + dumps(obj)


def decode(data: bytes) -> Any:
    return pickle.loads(memoryview(data)[1:])


def kind_of(data: bytes) -> int:
    return data[0]


def encode_run(seq: int, message: RunMessage) -> bytes:
    # The message holds only bytes, ints, flags and keys: the C pickler does.
    header = _RUN_HEADER.pack(RUN, seq, 1 if message.buffers else 0)
    return header + pickle.dumps(tuple(message), PROTOCOL)


def run_seq(data: bytes) -> int:
    return int(_RUN_HEADER.unpack_from(data)[1])


def run_has_buffers(data: bytes) -> bool:
    """Whether a descriptor of the batch's buffers was sent just before it."""
    return bool(_RUN_HEADER.unpack_from(data)[2])


def decode_run(data: bytes) -> RunMessage:
    return RunMessage(*pickle.loads(memoryview(data)[_RUN_HEADER.size :]))


class FdConnection:
    """``send_bytes``/``recv_bytes`` on a raw socket fd, in the framing of
    ``multiprocessing.connection.Connection``: both ends of a worker's pipe
    on POSIX. Neither side imports ``multiprocessing.connection`` (~5 ms of
    every new process before its first worker's start, and ~20 ms of every
    worker's), and a frame costs fewer steps than through it."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def fileno(self) -> int:
        return self.fd

    def close(self) -> None:
        """Close the fd; later use raises ``OSError`` (``EBADF``), never
        reaches a file that reused the number."""
        fd, self.fd = self.fd, -1
        if fd >= 0:
            os.close(fd)

    def __del__(self) -> None:
        # As multiprocessing's Connection: a dropped one does not leak its fd.
        try:
            self.close()
        except OSError:
            pass

    def send_bytes(self, data: bytes) -> None:
        if type(data) is not bytes:
            data = bytes(data)
        n = len(data)
        if n > 0x7FFFFFFF:
            self._write(struct.pack("!iQ", -1, n))
            self._write(data)
        elif n > 16384:
            self._write(struct.pack("!i", n))
            self._write(data)
        else:
            self._write(struct.pack("!i", n) + data)

    def _write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(self.fd, view) :]

    def recv_bytes(self) -> bytes:
        """The next frame; ``EOFError`` at end of file."""
        (size,) = struct.unpack("!i", self._read(4))
        if size == -1:
            (size,) = struct.unpack("!Q", self._read(8))
        return self._read(size)

    def _read(self, n: int) -> bytes:
        chunks = []
        while n:
            chunk = os.read(self.fd, min(n, 1 << 20))
            if not chunk:
                raise EOFError
            chunks.append(chunk)
            n -= len(chunk)
        return b"".join(chunks)
