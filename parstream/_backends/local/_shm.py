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
* Results (worker to parent) go in a memfd of the worker's ``Outgoing``,
  written by the worker, so that cost is paid in parallel. The parent's
  pages live exactly as long as its arrays viewing them; when the last one
  goes (``watch``: a finalizer on the mapping), the parent says ``FREED`` and
  the worker writes the next results into the same memfd: a fresh page costs
  the kernel ~5 times the copy into it. A block the parent still maps when
  it forks is never written again (the child's copy of the mapping would
  see it: ``forks``), and past ``OUTGOING_LENT`` blocks in the parent's hands
  a flush gets a one-off memfd, closed here once sent.

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
import struct
import sys
import threading

from parstream._backends._frames import Layout, buffer_layout

TYPE_CHECKING = False  # see parstream/__init__.py
if TYPE_CHECKING:
    from typing import Any

RECV_TIMEOUT_S = 30.0  # the descriptor is sent before its message: this is a bug's bound
ARENA_IDLE_BYTES = 64 << 20  # idle blocks kept for reuse beyond this are closed
_BLOCK_GRAIN = 1 << 20
OUTGOING_LENT = 64  # result blocks a worker keeps for reuse while the parent maps them
OUTGOING_IDLE_BYTES = 32 << 20  # a worker closes freed result blocks beyond this
_OUTGOING_GRAIN = 256 << 10
_TAG = struct.Struct("<q")  # sent with each descriptor: a result block's id, or 0

AVAILABLE = hasattr(os, "memfd_create") and hasattr(socket, "send_fds")


def _extent(buffers: list[memoryview]) -> tuple[Layout, int]:
    """Where ``buffers`` lie one after another (``buffer_layout``), and the bytes they span."""
    layout = buffer_layout([b.nbytes for b in buffers])
    return layout, max(offset + n for offset, n in layout)


def _write(fd: int, buffers: list[memoryview], layout: Layout) -> None:
    for view, (offset, _) in zip(buffers, layout, strict=True):
        while view:
            written = os.pwrite(fd, view, offset)
            view = view[written:]
            offset += written


def _new_memfd(name: str) -> int:
    return above_stdio(os.memfd_create(name, os.MFD_CLOEXEC))


def above_stdio(fd: int) -> int:
    """``fd``, moved above 0-2 if it landed there (it is closed then).

    A task that closed its stdout (``with open(1, "w")``, a daemon's
    clean-up) frees fd 1, and the next descriptor made takes it: a memfd
    there would take every later ``print`` into shared memory that the
    parent's arrays view, changing results already delivered.
    """
    if fd > 2:
        return fd
    import fcntl

    try:
        return fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 3)
    finally:
        os.close(fd)


def pack(buffers: list[memoryview]) -> int:
    """A new ``memfd`` holding ``buffers``, laid out by ``buffer_layout``."""
    fd = _new_memfd("parstream-data")
    try:
        _write(fd, buffers, _extent(buffers)[0])
    except BaseException:
        os.close(fd)
        raise
    return fd


class Outgoing:
    """A worker's memfds for results: lent to the parent with each flush, and
    written again once the parent has said ``FREED`` (its mapping is gone)."""

    def __init__(self) -> None:
        self._free: list[tuple[int, int, int]] = []  # (block id, fd, size)
        self._lent: dict[int, tuple[int, int]] = {}  # block id -> (fd, size)
        self._next_id = 1

    def pack(self, buffers: list[memoryview]) -> tuple[int, int]:
        """``(fd, block_id)`` of a memfd holding ``buffers``. A block id of 0
        is a one-off memfd: the caller closes ``fd`` once it is sent; else
        the fd stays here, lent until ``freed``."""
        layout, need = _extent(buffers)
        want = -(-need // _OUTGOING_GRAIN) * _OUTGOING_GRAIN
        fits = [entry for entry in self._free if entry[2] >= need]
        if fits:
            entry = min(fits, key=lambda e: e[2])
            self._free.remove(entry)
            block_id, fd, size = entry
        elif len(self._lent) < OUTGOING_LENT:
            fd, size = _new_memfd("parstream-data"), 0
            block_id = self._next_id
            self._next_id += 1
        else:
            return pack(buffers), 0
        if size != want:
            # A new block, or a bigger one cut to size: the parent's mapping of
            # a small result must not keep the pages of a big one alive.
            try:
                os.ftruncate(fd, want)
            except BaseException:
                os.close(fd)
                raise
            size = want
        try:
            _write(fd, buffers, layout)
        except BaseException:
            self._free.append((block_id, fd, size))
            raise
        self._lent[block_id] = (fd, size)
        return fd, block_id

    def freed(self, block_ids: list[int]) -> None:
        """The parent no longer maps these blocks: a positive id may be
        written again, a negative one (mapped in a process it forked) is closed."""
        for tag in block_ids:
            entry = self._lent.pop(abs(tag), None)
            if entry is None:
                continue
            if tag > 0:
                self._free.append((abs(tag), *entry))
            else:
                os.close(entry[0])
        idle = sum(size for _, _, size in self._free)
        while idle > OUTGOING_IDLE_BYTES:
            _, fd, size = self._free.pop(0)
            os.close(fd)
            idle -= size

    def drop_idle(self) -> None:
        """Close the blocks kept for reuse (out of descriptors: they hold some)."""
        free, self._free = self._free, []
        for _, fd, _ in free:
            os.close(fd)


_forks = 0  # how often this process forked: blocks mapped before a fork are never reused


def _forking() -> None:
    global _forks
    _forks += 1


def _after_fork_in_child() -> None:
    # Another thread of the parent may have held them at the fork: the child
    # closes its copies of the parent's blocks (``LocalPool._forget_after_fork``).
    global _BLOCK_CLOSE, _BLOCKS_LOCK
    _BLOCK_CLOSE = threading.Lock()
    _BLOCKS_LOCK = threading.Lock()
    if "LANDING" in globals():
        LANDING.after_fork_in_child()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(before=_forking, after_in_child=_after_fork_in_child)


def forks() -> int:
    """How often this process has forked so far (read before mapping a result)."""
    return _forks


def watch(mapping: Any, block_id: int, freed: Any, wake: Any, forked: int) -> None:
    """When ``mapping`` (of the worker's result block ``block_id``) is gone,
    append the block's id to ``freed`` (a deque) for the worker, negative if
    this process forked since ``forks()`` said ``forked``, and call
    ``wake()`` (a bound method, held weakly: results may outlive their pool)."""
    import weakref

    note = weakref.finalize(
        mapping, _note_freed, freed, block_id, forked, weakref.WeakMethod(wake)
    )
    note.atexit = False  # at exit nobody is left to tell


def _note_freed(freed: Any, block_id: int, forks: int, wake: Any) -> None:
    # Any thread, whenever the last view goes: append and wake, nothing more.
    freed.append(block_id if forks == _forks else -block_id)
    method = wake()
    if method is not None:
        method()


_BLOCK_CLOSE = threading.Lock()  # a block closes once, whichever threads race to close it


class Block:
    """One reusable memfd of the parent's ``Arena``, mapped shared here."""

    __slots__ = ("fd", "id", "lent_to", "mapping", "size", "view")

    def __init__(self, block_id: int, size: int) -> None:
        self.id = block_id
        self.size = size
        self.fd = _new_memfd("parstream-args")
        try:
            os.ftruncate(self.fd, size)
            self.mapping = mmap.mmap(self.fd, size)
        except BaseException:
            os.close(self.fd)
            raise
        self.view = memoryview(self.mapping)
        self.lent_to: Any = None
        _count_blocks(1)

    def write(self, buffers: list[memoryview], layout: Layout) -> None:
        view = self.view
        for raw, (offset, n) in zip(buffers, layout, strict=True):
            view[offset : offset + n] = raw

    def close(self) -> None:
        """Unmap and close; a second call does nothing (closing the number
        again could close another file that reused it)."""
        with _BLOCK_CLOSE:
            fd, self.fd = self.fd, -1
        if fd < 0:
            return
        try:
            self.view.release()
            self.mapping.close()
        except BufferError:  # pragma: no cover - a writer still copying: freed with it
            pass
        os.close(fd)
        _count_blocks(-1)


_blocks = 0  # Blocks open in this process, every arena's
_BLOCKS_LOCK = threading.Lock()


def _count_blocks(change: int) -> None:
    global _blocks
    with _BLOCKS_LOCK:
        _blocks += change


def _room_for_block() -> bool:
    """Whether this process may open another block: each holds two
    descriptors here (its memfd, and the ``dup`` its ``mmap`` keeps), and
    tasks that keep their arguments keep their blocks lent; a quarter of
    the descriptor limit stays free for everything else, every pool's
    workers and the user's own files included (past it, arguments go through
    the pipe). Counted from /proc where there is one (the whole process),
    else from the blocks of every arena; the limit is read each time (it
    may be raised meanwhile)."""
    import resource

    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if soft == resource.RLIM_INFINITY or soft > 1 << 20:
        soft = 1 << 20
    try:
        used = len(os.listdir("/proc/self/fd"))
    except FileNotFoundError:  # no /proc: our blocks alone, within 3/8 of the limit
        return 2 * (_blocks + 1) <= soft * 3 // 4
    except OSError:  # EMFILE itself
        return False
    return soft - used - 2 >= max(16, soft // 4)


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
        it or dies. Raises ``OSError`` when memory or descriptors run out, or
        too few descriptors would be left (``_room_for_block``)."""
        layout, need = _extent(buffers)
        victim: Block | None = None
        with self._lock:
            fits = [b for b in self._free if b.size >= need]
            block = min(fits, key=lambda b: b.size) if fits else None
            if block is not None:
                self._free.remove(block)
            else:
                if not _room_for_block():
                    if not self._free:
                        raise OSError(
                            f"{len(self._lent)} argument blocks are lent to workers "
                            "(tasks keep their arguments): no descriptors to spare for another"
                        )
                    victim = min(self._free, key=lambda b: b.size)  # idle, and too small
                    self._free.remove(victim)
                block_id = self._next_id
                self._next_id += 1
        if victim is not None:
            victim.close()
            if not _room_for_block():
                raise OSError("no descriptors to spare for another argument block")
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
        """``block`` never reached its worker: free again, unless the
        worker's death (``worker_gone``) or the close took it back first
        (freed twice, it would be lent to two workers at once)."""
        with self._lock:
            if self._lent.pop(block.id, None) is None:
                return
        self._give_back(block)

    def released(self, worker: Any, block_ids: list[int]) -> None:
        """``worker`` no longer maps these blocks; a negative id is a block a
        process the worker forked may still read: closed, never written again."""
        with self._lock:
            blocks = [(i > 0, self._lent.pop(abs(i))) for i in block_ids if abs(i) in self._lent]
        for reuse, block in blocks:
            if reuse:
                self._give_back(block)
            else:
                block.lent_to = None
                block.close()

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

    def close(self, *, forked: bool = False) -> None:
        """Close every block; a worker still mapping one keeps its pages until it unmaps.
        ``forked``: in a child made by ``os.fork()``, whose copy of the lock
        another thread of the parent may have held at the fork."""
        if forked:
            self._lock = threading.Lock()
        with self._lock:
            self._closed = True
            blocks = self._free + list(self._lent.values())
            self._free, self._lent = [], {}
        for block in blocks:
            block.close()


def send(channel: socket.socket, fd: int, tag: int = 0) -> None:
    """Hand (a duplicate of) ``fd`` to the other end of ``channel``, with ``tag``."""
    socket.send_fds(channel, [_TAG.pack(tag)], [fd])


class DescriptorLost(OSError):
    """The tag came but not its descriptor: this process has no free
    descriptor (``EMFILE``), so the kernel dropped it. ``tag`` says which
    block it was, for the sender to take back."""

    def __init__(self, tag: int) -> None:
        super().__init__(
            "its descriptor could not be received: this process has no free file "
            "descriptor (EMFILE); close some, or raise the limit (ulimit -n)"
        )
        self.tag = tag


def receive(channel: socket.socket) -> tuple[int, int]:
    """The next descriptor sent on ``channel``, and its tag."""
    data, fds, _, _ = socket.recv_fds(channel, _TAG.size, 1)
    if not fds:
        if data:
            while len(data) < _TAG.size:
                more = channel.recv(_TAG.size - len(data))
                if not more:
                    break
                data += more
            else:
                raise DescriptorLost(_TAG.unpack(data)[0])
        raise EOFError("the descriptor channel closed before the announced buffers arrived")
    while len(data) < _TAG.size:  # a stream socket may split the tag
        more = channel.recv(_TAG.size - len(data))
        if not more:
            os.close(fds[0])
            raise EOFError("the descriptor channel closed inside a descriptor's tag")
        data += more
    return above_stdio(fds[0]), _TAG.unpack(data)[0]


def mapped(fd: int, *, closable: bool = True) -> Any:
    """All of ``fd``, mapped copy-on-write; ``fd`` is closed (the mapping
    keeps the memory until it is closed, or its last view released).

    ``closable``: an ``mmap.mmap``, whose ``close()`` is refused while an
    array views it (the worker's release of argument blocks relies on that).
    Otherwise (the parent's results) any object exporting the mapping as its
    buffer, unmapped once it and every view of it are gone, and holding no
    descriptor: an ``mmap.mmap`` keeps a ``dup`` of its file's descriptor
    while it lives (until 3.13's ``trackfd=False``), so a user holding a
    thousand results would hold a thousand descriptors, and at the usual limit
    of 1024 the next result could not even be received. Before 3.13 such a
    mapping is made with libc's ``mmap`` through ctypes.
    """
    try:
        return _map(fd, closable)
    finally:
        os.close(fd)


def _map(fd: int, closable: bool) -> Any:
    """``mapped``, leaving ``fd`` open."""
    size = os.fstat(fd).st_size
    # Not MAP_POPULATE: on a writable private mapping it would copy every
    # page; reads map the shared pages (in runs, by fault-around) and only
    # pages written are copied.
    prot = mmap.PROT_READ | mmap.PROT_WRITE
    if sys.version_info >= (3, 13):
        return mmap.mmap(fd, size, flags=mmap.MAP_PRIVATE, prot=prot, trackfd=False)
    if not closable:
        return _ctypes_mapping(fd, size, prot)
    return mmap.mmap(fd, size, flags=mmap.MAP_PRIVATE, prot=prot)


_libc: Any = None


class Landing:
    """Where the parent puts results' buffers: each flush's block mapped on
    its own (no copy), until this process holds so many mappings that the
    kernel's limit (``vm.max_map_count``, 65,530 by default: a user keeping
    some 65,000 large results) comes near; from then on they are copied into
    slabs of ``SLAB_BYTES``, many results to one mapping, and a slab lives
    as long as any result in it. Shared by every pool of the process: the
    limit is the process's.

    The count of live mappings is kept without a lock: it is a heuristic,
    and its decrement runs in a finaliser, which the collector may run on a
    thread inside any allocation, this class's own included."""

    SLAB_BYTES = 64 << 20
    CHECK_FROM = 1024  # live mappings of ours below which the limit is not read
    CHECK_EVERY = 256

    def __init__(self) -> None:
        self._lock = threading.Lock()  # the slab's bookkeeping only; no allocation under it
        self.live = 0  # result mappings of ours still viewed (about: no lock)
        self._made = 0
        self._copying = False
        self._slab: memoryview | None = None
        self._used = 0

    def land(self, fd: int) -> tuple[Any, bool]:
        """All of ``fd``, a worker's result block: mapped (``True``), or
        copied (``False``) past the mapping budget or where it cannot be
        mapped. ``fd`` is closed."""
        try:
            if not self._should_copy():
                try:
                    mapping = _map(fd, closable=False)
                except (OSError, ValueError):
                    pass  # the kernel's count of mappings reached: copied
                else:
                    self._mapped_one(mapping)
                    return mapping, True
            return self._copy(fd), False
        finally:
            os.close(fd)

    def _should_copy(self) -> bool:
        if self.live < self.CHECK_FROM:
            if self._copying:
                self._copying = False
                self._slab = None  # results in it keep it; this need not
            return False
        self._made += 1
        if self._made % self.CHECK_EVERY == 1:
            self._copying = _mappings() > _max_mappings() // 2
        return self._copying

    def _mapped_one(self, mapping: Any) -> None:
        import weakref

        self.live += 1
        weakref.finalize(mapping, self._unmapped).atexit = False

    def _unmapped(self) -> None:
        self.live -= 1

    def _copy(self, fd: int) -> memoryview:
        """All of ``fd`` in this process's memory (in a slab unless big)."""
        size = os.fstat(fd).st_size
        big = size > self.SLAB_BYTES // 8
        view = memoryview(bytearray(size)) if big else self._take(size)
        done = 0
        while done < size:
            n = os.preadv(fd, [view[done:]], done)
            if n <= 0:
                raise EOFError(f"a result block ended at {done} of its {size} bytes")
            done += n
        return view

    def _take(self, size: int) -> memoryview:
        """``size`` bytes of the current slab (64-byte aligned), a new slab if it is full."""
        need = -(-size // 64) * 64
        fresh: memoryview | None = None
        while True:
            with self._lock:
                slab = self._slab
                if slab is not None and self._used + need <= self.SLAB_BYTES:
                    start = self._used
                    self._used += need
                    break
                if fresh is not None:
                    self._slab, self._used = fresh, need
                    slab, start = fresh, 0
                    break
            fresh = memoryview(bytearray(self.SLAB_BYTES))  # outside the lock
        return slab[start : start + size]

    def after_fork_in_child(self) -> None:
        self._lock = threading.Lock()  # a thread of the parent may have held it


def _mappings() -> int:
    try:
        with open("/proc/self/maps", "rb") as maps:
            return sum(chunk.count(b"\n") for chunk in iter(lambda: maps.read(1 << 20), b""))
    except OSError:
        return 0


def _max_mappings() -> int:
    try:
        with open("/proc/sys/vm/max_map_count") as f:
            return int(f.read())
    except (OSError, ValueError):
        return 1 << 62


LANDING = Landing()


def _ctypes_mapping(fd: int, size: int, prot: int) -> Any:
    import ctypes
    import weakref

    global _libc
    if _libc is None:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mmap.restype = ctypes.c_void_p
        libc.mmap.argtypes = (
            ctypes.c_void_p,
            ctypes.c_size_t,
            ctypes.c_int,
            ctypes.c_int,
            ctypes.c_int,
            ctypes.c_long,
        )
        libc.munmap.restype = ctypes.c_int
        libc.munmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t)
        _libc = libc
    if size <= 0:
        raise ValueError("cannot map an empty file")
    addr = _libc.mmap(None, size, prot, mmap.MAP_PRIVATE, fd, 0)
    if addr is None or addr == ctypes.c_void_p(-1).value:
        errno = ctypes.get_errno()
        raise OSError(errno, os.strerror(errno))
    mapping = (ctypes.c_char * size).from_address(addr)
    weakref.finalize(mapping, _libc.munmap, addr, size).atexit = False
    return mapping


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
