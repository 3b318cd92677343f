"""Large buffers beside the pipe: pickle-5 out-of-band buffers in anonymous shared memory.

A numpy array (anything whose pickle offers a ``PickleBuffer``) of at least
``_frames.OOB_MIN_BYTES`` is not copied into the pickle stream: the
pickler's ``buffer_callback`` (``_frames.Collector``) takes it out of band,
and the message carries only the buffers' sizes (they lie one after
another, as ``_frames.buffer_layout`` says) in a ``memfd`` whose descriptor
travels over the worker's *descriptor channel* (a Unix socket pair beside
the message pipe, ``SCM_RIGHTS``) just before the message. The receiver
takes the descriptor (``receive``), maps it copy-on-write (``mapped``) and
unpickles with one memoryview per buffer: the array it gets views the shared
pages, is writable, and its writes stay its own, as with a copy.

Two directions, two ways of owning the memory:

* Arguments (parent to worker) are written into a block of the pool's
  ``Arena``: memfds the parent keeps mapped and reuses, because a fresh
  page costs the kernel ~10 times the copy into it. A block is *lent* to
  the worker the batch goes to; the worker unmaps it once nothing of the
  batch views it any more (it tries after each batch, so an argument a task
  kept alive keeps its block lent) and says ``RELEASED``; a worker's death
  returns all its blocks. A block is never written while lent.
* Results (worker to parent) go in a fresh memfd per flush (``pack``),
  written by the worker, so that cost is paid in parallel; the worker
  closes its descriptor once sent, and the pages live exactly as long as
  the parent's arrays viewing them.

Nothing is ever left in ``/dev/shm``: a memfd has no name, and its memory is
freed when its last descriptor and mapping are gone, whatever kills whom. A
descriptor in flight belongs to the socket: if the receiver dies, or the
parent closes a dead worker's channel, the kernel drops it. A mapping is
only unmapped when its last exported buffer is released, so nothing is
freed while in use.

Order keeps the two streams in step: one sender thread at a time writes the
descriptor, then the message that announces it (``RUN`` or ``RESULTS``, by
a flag in its header); the receiver takes exactly one descriptor for each
such message, before anything else can fail.
"""

from __future__ import annotations

import mmap
import os
import socket
import threading

from parstream._backends._frames import Layout, buffer_layout

TYPE_CHECKING = False  # see parstream/__init__.py
if TYPE_CHECKING:
    from typing import Any

RECV_TIMEOUT_S = 30.0  # the descriptor is sent before its message: this is a bug's bound
ARENA_IDLE_BYTES = 64 << 20  # idle blocks kept for reuse beyond this are closed
_BLOCK_GRAIN = 1 << 20

AVAILABLE = hasattr(os, "memfd_create") and hasattr(socket, "send_fds")


def _write(fd: int, buffers: list[memoryview]) -> None:
    layout = buffer_layout([b.nbytes for b in buffers])
    for view, (offset, _) in zip(buffers, layout, strict=True):
        while view:
            written = os.pwrite(fd, view, offset)
            view = view[written:]
            offset += written


def pack(buffers: list[memoryview]) -> int:
    """A new ``memfd`` holding ``buffers``, laid out by ``buffer_layout``."""
    fd = os.memfd_create("parstream-data", os.MFD_CLOEXEC)
    try:
        _write(fd, buffers)
    except BaseException:
        os.close(fd)
        raise
    return fd


class Block:
    """One reusable memfd of the parent's ``Arena``, mapped shared here."""

    __slots__ = ("fd", "id", "lent_to", "mapping", "size", "view")

    def __init__(self, block_id: int, size: int) -> None:
        self.id = block_id
        self.size = size
        self.fd = os.memfd_create("parstream-args", os.MFD_CLOEXEC)
        try:
            os.ftruncate(self.fd, size)
            self.mapping = mmap.mmap(self.fd, size)
        except BaseException:
            os.close(self.fd)
            raise
        self.view = memoryview(self.mapping)
        self.lent_to: Any = None

    def write(self, buffers: list[memoryview], layout: Layout) -> None:
        view = self.view
        for raw, (offset, n) in zip(buffers, layout, strict=True):
            view[offset : offset + n] = raw

    def close(self) -> None:
        try:
            self.view.release()
            self.mapping.close()
        except BufferError:  # pragma: no cover - a writer still copying: freed with it
            pass
        os.close(self.fd)


class Arena:
    """The parent's reusable blocks for arguments, lent to one worker at a time."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._free: list[Block] = []
        self._lent: dict[int, Block] = {}
        self._next_id = 1
        self._closed = False

    def lend(self, buffers: list[memoryview], worker: Any) -> Block:
        """A block holding ``buffers``, lent to ``worker`` until it releases
        it or dies. Raises ``OSError`` when memory or descriptors run out."""
        layout = buffer_layout([b.nbytes for b in buffers])
        need = max(offset + n for offset, n in layout)
        with self._lock:
            fits = [b for b in self._free if b.size >= need]
            block = min(fits, key=lambda b: b.size) if fits else None
            if block is not None:
                self._free.remove(block)
            else:
                block_id = self._next_id
                self._next_id += 1
        if block is None:
            size = -(-need // _BLOCK_GRAIN) * _BLOCK_GRAIN
            block = Block(block_id, size)
        try:
            block.write(buffers, layout)
        except BaseException:
            self._give_back(block)
            raise
        with self._lock:
            if not self._closed:
                block.lent_to = worker
                self._lent[block.id] = block
                return block
        block.close()  # the pool closed meanwhile
        raise OSError("the pool's arena is closed")

    def unlend(self, block: Block) -> None:
        """``block`` never reached its worker: free again."""
        with self._lock:
            self._lent.pop(block.id, None)
        self._give_back(block)

    def released(self, worker: Any, block_ids: list[int]) -> None:
        """``worker`` no longer maps these blocks."""
        with self._lock:
            blocks = [self._lent.pop(i) for i in block_ids if i in self._lent]
        for block in blocks:
            self._give_back(block)

    def worker_gone(self, worker: Any) -> None:
        """A dead worker maps nothing: every block lent to it is free."""
        with self._lock:
            mine = [b for b in self._lent.values() if b.lent_to is worker]
            for block in mine:
                del self._lent[block.id]
        for block in mine:
            self._give_back(block)

    def _give_back(self, block: Block) -> None:
        block.lent_to = None
        with self._lock:
            if not self._closed:
                self._free.append(block)
                idle = sum(b.size for b in self._free)
                if idle <= ARENA_IDLE_BYTES:
                    return
                self._free.remove(block)
        block.close()

    def close(self) -> None:
        """Close every block; a worker still mapping one keeps its pages until it unmaps."""
        with self._lock:
            self._closed = True
            blocks = self._free + list(self._lent.values())
            self._free, self._lent = [], {}
        for block in blocks:
            block.close()


def send(channel: socket.socket, fd: int) -> None:
    """Hand (a duplicate of) ``fd`` to the other end of ``channel``."""
    socket.send_fds(channel, [b"F"], [fd])


def receive(channel: socket.socket) -> int:
    """The next descriptor sent on ``channel``."""
    _, fds, _, _ = socket.recv_fds(channel, 1, 1)
    if not fds:
        raise EOFError("the descriptor channel closed before the announced buffers arrived")
    return fds[0]


def mapped(fd: int) -> mmap.mmap:
    """All of ``fd``, mapped copy-on-write; ``fd`` is closed (the mapping
    keeps the memory until it is closed, or its last view released)."""
    try:
        size = os.fstat(fd).st_size
        # Not MAP_POPULATE: on a writable private mapping it would copy every
        # page; reads map the shared pages (in runs, by fault-around) and
        # only pages written are copied.
        return mmap.mmap(fd, size, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    finally:
        os.close(fd)


def channel_pair() -> tuple[socket.socket, socket.socket] | tuple[None, None]:
    """The parent's and the worker's end of a descriptor channel, if the
    platform can pass descriptors and make anonymous memory."""
    if not AVAILABLE:
        return None, None
    parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    parent.settimeout(RECV_TIMEOUT_S)
    return parent, child


def open_channel(fd: int) -> Any:
    """The worker's end, from its inherited descriptor."""
    channel = socket.socket(fileno=fd)
    channel.settimeout(RECV_TIMEOUT_S)
    return channel
