"""Worker output in a Jupyter kernel lands before the result that followed it.

ipykernel (6+) points the kernel's fd 1 and 2 at pipes and forwards what
arrives there from a thread of its own (``OutStream._watch_pipe_fd``) into the
same buffer that the cell's ``print`` writes to. Workers inherit those fds,
and a worker flushes its output before it sends a result, so the bytes are in
the pipe before the result is. But nothing made the forwarding thread read
them before the cell went on: on a busy kernel (and on Python 3.13 almost
always) that thread lags behind, and the cell's next ``print`` reached the
buffer first, even in the middle of a worker's line (``print`` writes the
text and the newline separately).

``settle()`` runs in the caller's thread just before a result is handed to
user code (``Task.await_``/``yield_``/``await``, ``Future.result``, each run
of a stream's results), never on a hub thread that keeps deadlines: it waits
until the pipe is empty and the forwarding thread is back in ``read()`` on it
(so it has written every earlier chunk into the buffer), sleeping in short
steps that let that thread run. It is bounded (``SETTLE_MAX_S``) and costs one
``getattr`` when not in a kernel with fd capture.
"""

from __future__ import annotations

import struct
import sys
import time
from typing import Any

try:
    import fcntl
    import termios
except ImportError:  # pragma: no cover - Windows: ipykernel captures no fds there
    fcntl = termios = None  # type: ignore[assignment]

SETTLE_MAX_S = 0.25  # never hold a result back longer for output forwarding
_STEP_MAX_S = 0.005

_proc_works: bool | None = None  # whether /proc shows what a thread blocks on


def _watched(stream: Any) -> tuple[int, Any] | None:
    fd = getattr(stream, "_fid", None)
    thread = getattr(stream, "watch_fd_thread", None)
    if not isinstance(fd, int) or thread is None or not getattr(stream, "_should_watch", False):
        return None
    return fd, thread


def _pending(fd: int) -> int:
    try:
        raw = fcntl.ioctl(fd, termios.FIONREAD, b"\0\0\0\0")
    except OSError:
        return 0
    return int(struct.unpack("i", raw)[0])


def _reading(thread: Any, fd: int) -> bool | None:
    """Whether ``thread`` is blocked in a system call on ``fd``; None: unknown."""
    global _proc_works
    if _proc_works is False or not thread.is_alive():
        return None
    try:
        with open(f"/proc/self/task/{thread.native_id}/syscall", "rb") as f:
            fields = f.read().split()
    except OSError:
        _proc_works = False
        return None
    _proc_works = True
    # "<nr> <arg0> ..." while blocked in a call, "running" otherwise. The
    # forwarding thread only reads ``fd`` and writes another fd, and waits for
    # the GIL on a futex whose first argument is an address.
    return len(fields) > 1 and fields[0] != b"running" and fields[1] == b"0x%x" % fd


def settle() -> None:
    """Wait (briefly) until the kernel has forwarded worker output already written."""
    watched = [w for w in (_watched(sys.stdout), _watched(sys.stderr)) if w is not None]
    if not watched or fcntl is None:
        return
    deadline = time.monotonic() + SETTLE_MAX_S
    step = 0.0001
    for fd, thread in watched:
        while True:
            if _pending(fd) == 0:
                reading = _reading(thread, fd)
                if reading:
                    break
                if reading is None:
                    # No way to see the thread's state: give it one slice.
                    time.sleep(0.001)
                    break
            if time.monotonic() >= deadline:
                return
            time.sleep(step)
            step = min(step * 2, _STEP_MAX_S)
