"""Process-tree containment: what a task starts ends with its worker, and with the parent.

Every worker makes itself the leader of its own process group before it says
READY (``_worker.worker_main``), and every process a task starts inherits that
group. So one ``killpg`` reaches a task's whole tree, including a grandchild a
shell left in the background, which a walk of the worker's children misses
once the shell has exited (the grandchild is then the init process's child).

Three ways a group ends::

    worker killed (timeout, kill, close, retire)   kill_tree -> killpg + tree walk
    worker died (crash, outside SIGKILL, exit)     Pool._on_death -> worker_gone
    parent died (SIGKILL, SIGTERM, anything)       the reaper -> killpg each group

The reaper is a tiny separate process (a POSIX shell script; a Python one where
there is no ``/bin/sh``), one per parent process, started
when the first pool opens and shared by all of that process's open pools. The
parent holds the write end of its stdin and tells it ``+pgid`` and ``-pgid`` as
workers start and die; end of file on stdin means the parent is gone, however
it died: the reaper then SIGKILLs every group still registered and exits. This
needs nothing from the worker's own Python code, so it works while a worker is
stuck in C code holding the GIL (the worker itself dies by ``PR_SET_PDEATHSIG``
on Linux, or with its group elsewhere). It lives in a session of its own, so a
terminal's Ctrl-C or hang-up does not reach it, and it ignores SIGTERM (a
``kill -TERM`` of everything, as when a container stops, must leave it to clean
up): it ends only at that end of file, or by SIGKILL. When the last pool
closes, the parent closes the pipe and waits for the reaper to exit, so nothing
is left behind.

A forked child does not keep the parent's pipe open (that would hide the
parent's death): it closes its copy right after the fork, and starts its own
reaper when it opens a pool of its own.

What still escapes: a process a task moves into a new session or group
(``os.setsid()``, ``start_new_session=True``, ``process_group=0``, a daemon's
double fork). ``kill_tree`` still kills it while it is the worker's
descendant, but not once it has been reparented (double-forked), nor when the
worker crashes or the parent dies: it has chosen to outlive the task. A
subprocess a task leaves running after it *returns* lives until its worker
exits (retired, idle-timed out, killed or closed). Windows has no process
groups: there all of this is a no-op and only ``kill_tree``'s walk remains.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading

# The reaper's whole program, as a POSIX shell script: ~1 ms to start, where
# even `python -I -S` takes ~10 ms of a CPU that the first workers, starting at
# the same moment, want (issue 12). Lines are "+pgid" or "-pgid"; a group is
# listed once (a repeated "+" would leave a stale id behind a "-"); ids are
# digits only, so they are never glob patterns; `kill -9 -pgid` is the form
# dash, bash and busybox all take.
REAPER_SH = r"""trap '' INT TERM HUP
groups=" "
while IFS= read -r line; do
  g=${line#?}
  case $g in ''|*[!0-9]*) continue ;; esac
  case $line in
    +*) case $groups in *" $g "*) ;; *) groups="$groups$g " ;; esac ;;
    -*) case $groups in *" $g "*) groups="${groups%% $g *} ${groups#* $g }" ;; esac ;;
  esac
done
for g in $groups; do kill -9 "-$g" 2>/dev/null; done
exit 0
"""
SHELL = "/bin/sh"

# The same in Python, where there is no /bin/sh; -I -S: no site, no user paths.
REAPER_CODE = r"""
import os, signal
for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
    signal.signal(sig, signal.SIG_IGN)
groups = set()
rest = b""
while True:
    try:
        chunk = os.read(0, 65536)
    except OSError:
        break
    if not chunk:
        break
    *lines, rest = (rest + chunk).split(b"\n")
    for line in lines:
        if line[:1] == b"+":
            groups.add(int(line[1:]))
        elif line[:1] == b"-":
            groups.discard(int(line[1:]))
for pgid in groups:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except OSError:
        pass
os._exit(0)
"""
REAPER_EXIT_WAIT_S = 2.0  # a reaper still starting up needs ~50 ms on a loaded machine

_ENABLED = os.name == "posix" and hasattr(os, "killpg")

_lock = threading.Lock()
_owner_pid = os.getpid()
_proc: subprocess.Popen[bytes] | None = None
_holders: set[int] = set()  # id() of the open pools of this process
_groups: set[int] = set()  # registered worker groups (pgid == worker pid)


def acquire(owner: object) -> None:
    """A pool of this process opened: start the reaper if there is none.

    Here rather than at the first worker's start: that would put the
    reaper's exec on the hub thread, competing with the worker's own start.
    """
    if not _ENABLED:
        return
    with _lock:
        _check_pid()
        _holders.add(id(owner))
        _ensure()


def release(owner: object) -> None:
    """A pool closed; after the last one, the reaper kills what is left and exits."""
    global _proc
    if not _ENABLED:
        return
    with _lock:
        _check_pid()
        _holders.discard(id(owner))
        if _holders or _proc is None:
            return
        proc, _proc = _proc, None
        _groups.clear()
    _stop(proc)


def watch(pgid: int) -> None:
    """Register a new worker's group; the reaper kills it if the parent dies."""
    if not _ENABLED:
        return
    with _lock:
        _check_pid()
        _groups.add(pgid)
        _tell(f"+{pgid}\n".encode())


def worker_gone(pid: int) -> None:
    """A worker died, for any reason: kill what its tasks left in its group.

    Call it before the worker is reaped (joined): until then its pid, and so
    its group id, cannot be reused by another process.
    """
    if not _ENABLED:
        return
    kill_group(pid)
    with _lock:
        _check_pid()
        if pid in _groups:
            _groups.discard(pid)
            _tell(f"-{pid}\n".encode())


def kill_group(pgid: int) -> None:
    """SIGKILL process group ``pgid`` (a worker's), never this process's own."""
    if not _ENABLED or pgid <= 0 or pgid == os.getpgrp():
        return
    with contextlib.suppress(OSError):  # no such group: the worker had not made it yet
        os.killpg(pgid, signal.SIGKILL)


def term_group(pid: int) -> None:
    """SIGTERM worker ``pid`` and everything in its group: a graceful stop
    reaches the task's subprocesses too (a shell does the same to a job)."""
    try:
        if not _ENABLED or pid <= 0 or pid == os.getpgrp():
            raise OSError
        os.killpg(pid, signal.SIGTERM)
    except OSError:  # no group (yet): the worker alone
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGTERM)


def reaper_pid() -> int | None:
    """The running reaper's pid, if this process has one (for tests)."""
    proc = _proc
    return proc.pid if proc is not None and _owner_pid == os.getpid() else None


def _tell(line: bytes) -> None:
    """Send a line to the reaper (lock held)."""
    global _proc
    for _attempt in range(2):
        if not _ensure():
            return
        assert _proc is not None
        if _write(_proc, line):
            return
        _discard(_proc)  # it died just now: start a new one, tell it everything
        _proc = None


def _ensure() -> bool:
    """Make sure a live reaper knows every group (lock held); False if none can start.

    A reaper killed from outside (SIGKILL) is replaced the next time a pool
    opens or a worker starts or dies.
    """
    global _proc
    if _proc is not None and _proc.poll() is None:
        return True
    if _proc is not None:
        _discard(_proc)
    _proc = _start()
    if _proc is None:
        return False
    if _write(_proc, b"".join(f"+{g}\n".encode() for g in _groups)):
        return True
    _discard(_proc)
    _proc = None
    return False


def _write(proc: subprocess.Popen[bytes], data: bytes) -> bool:
    stdin = proc.stdin
    assert stdin is not None
    view = memoryview(data)
    try:
        while view:
            view = view[stdin.write(view) or 0 :]
    except (OSError, ValueError):  # a dead reaper's pipe
        return False
    return True


def _discard(proc: subprocess.Popen[bytes]) -> None:
    if proc.stdin is not None:
        with contextlib.suppress(OSError):
            proc.stdin.close()
    with contextlib.suppress(OSError):
        proc.kill()
    proc.wait()


def hold_stdio() -> None:
    """Put ``/dev/null`` on whichever of descriptors 0-2 is closed here (a
    script run with ``>&-``, a daemon that closed them), before this process
    makes a pipe, socket or memfd for a worker or the reaper. Else the first
    of those took the number: a worker started with its progress slot (a
    memfd) as its stdout, and a task's ``os.write(1, ...)``, or a C library's
    ``printf``, wrote over the slot; the parent's own writes to fd 1 went
    into a worker's pipe. Output to a closed descriptor goes nowhere now,
    as it went nowhere before."""
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            try:
                null = os.open(os.devnull, os.O_RDWR)  # the lowest free number: fd, here
            except OSError:  # no /dev/null (a bare chroot): as before
                return
            if null == fd:
                os.set_inheritable(fd, True)  # as stdio is (os.open's are not)
            else:
                os.dup2(null, fd)  # (inheritable)
                os.close(null)


def _start() -> subprocess.Popen[bytes] | None:
    hold_stdio()
    try:
        if os.path.exists(SHELL):
            cmd = [SHELL, "-c", REAPER_SH]
        else:  # pragma: no cover - a POSIX system without /bin/sh
            cmd = [sys.executable, "-I", "-S", "-c", REAPER_CODE]
        return subprocess.Popen(
            cmd,
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            bufsize=0,  # each line reaches the reaper at once
            close_fds=True,
            start_new_session=True,  # no terminal signal reaches it
            cwd="/",  # it must not pin the caller's directory
        )
    except Exception:  # no processes left, no sys.executable (embedded), ...
        import logging

        logging.getLogger("parstream").warning(
            "parstream: could not start the reaper process; subprocesses of tasks "
            "may outlive a parent that is killed",
            exc_info=True,
        )
        return None


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.stdin is not None:
        with contextlib.suppress(OSError):
            proc.stdin.close()
    try:
        proc.wait(REAPER_EXIT_WAIT_S)
    except subprocess.TimeoutExpired:  # pragma: no cover - a wedged reaper
        proc.kill()
        proc.wait()


def _check_pid() -> None:
    """In a forked child, forget the parent's reaper (lock held)."""
    global _owner_pid
    if _owner_pid != os.getpid():
        _forget()


def _forget() -> None:
    global _proc, _owner_pid
    proc, _proc = _proc, None
    if proc is not None and proc.stdin is not None:
        # The parent keeps its own copy of the pipe: closing ours tells the
        # reaper nothing, and keeps a long-lived child from hiding the
        # parent's death.
        with contextlib.suppress(OSError):
            proc.stdin.close()
        proc.returncode = 0  # not our child: never wait for it
    _holders.clear()
    _groups.clear()
    _owner_pid = os.getpid()


def _after_fork_in_child() -> None:
    global _lock
    _lock = threading.Lock()  # another thread may have held it at the fork
    _forget()


if _ENABLED:
    os.register_at_fork(after_in_child=_after_fork_in_child)
