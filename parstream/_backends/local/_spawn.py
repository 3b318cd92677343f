"""Local worker processes: starting them, failed starts, and killing a tree.

``Starter.start(n)`` starts worker processes on the hub thread only
(``PR_SET_PDEATHSIG`` is tied to the starting thread), each with a duplex
pipe and a progress slot, registered with the reaper. On POSIX a worker is a
fresh interpreter exec'd straight into ``BOOT``, which takes this process's
``sys.path`` and working directory and imports only the worker's own
modules: about half the start-up of loky's bootstrap, which imports much of
multiprocessing and concurrent.futures (issue 12). Elsewhere loky's process
context starts it. Nothing is forked from this process. A start
that fails (an exception in the parent, or a process that dies before it is
ready) is retried with back-off; more than ``max_start_failures`` failures
within ``start_failure_window`` seconds fail the queued jobs with
``WorkerStartFailed`` (the cause attached), and the next good start ends the
episode.

``Starter.start_spare()`` starts a spare the same way, which boots and waits
short of its initializer; ``Starter.promote()`` makes it a starting worker
(see ``LocalPool._keep_a_spare``).
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from parstream._backends._codec import rebuild
from parstream._backends.local import _reaper, _shm, _wire
from parstream._backends.local._slot import Slot, new_slot
from parstream._backends.local._worker import worker_main
from parstream._errors import WorkerCrashed, WorkerStartFailed

if TYPE_CHECKING:
    import socket
    from collections.abc import Callable, Iterator

    from parstream._backend import Counts, Job, Settings
    from parstream._backends._dispatch import Dispatcher

log = logging.getLogger("parstream")

START_BACKOFF_S = (0.05, 2.0)  # first and longest wait between failed worker starts

# What a new worker interpreter runs: read the parent's preparation (a pickled
# dict on an inherited fd), take its sys.path and working directory, start.
BOOT = (
    "import os,sys,_pickle\n"
    "try:\n"
    " with os.fdopen(int(sys.argv[1]),'rb') as f: d=_pickle.load(f)\n"
    "except (EOFError,_pickle.UnpicklingError): os._exit(70)\n"  # the parent died mid-way
    "sys.path[:]=d['path']\n"
    "os.chdir(d['cwd'])\n"
    "sys._parstream_worker=True\n"  # (parstream/__init__.py: not the parent's fork set-up)
    "from parstream._backends.local._worker import boot\n"
    "boot(d)\n"
)
LIGHT_START = os.name == "posix"
PIPE_ROOM_MAX = 32 << 10  # bytes a batch sent behind a running one may take of the pipe

# glibc's malloc, tuned for the worker: by default it returns a freed block of
# ~1 MiB to the kernel at once (munmap, or trimming the heap's top), so a task
# making numpy temporaries of that size faults every page in again on each
# call; page faults being dear here, that doubled an rfft of a 1 MiB array
# (issue 12, ``benchmarks`` numpy rows). Blocks under 16 MiB come from the heap
# and up to 32 MiB of freed heap stays for reuse: where glibc's own adaptive
# thresholds end up after one large block, from the start. Read by glibc when
# the process starts (other C libraries ignore them); a variable the user set
# is left as it is, and the worker removes the ones added here from its
# environment once running, so what tasks start does not inherit them.
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(16 << 20), "MALLOC_TRIM_THRESHOLD_": str(32 << 20)}


def _pidfds_work() -> bool:
    try:
        os.close(os.pidfd_open(os.getpid()))
    except (AttributeError, OSError):  # not Linux, or a kernel before 5.3
        return False
    return True


PIDFDS = _pidfds_work()


class _Process:
    """A worker started from ``BOOT``: its pid, an exit sentinel (a pidfd,
    readable once it has exited whatever its children hold open; else a pipe
    only it holds), and its exit code once reaped."""

    def __init__(self, pid: int, sentinel: int) -> None:
        self.pid = pid
        self.sentinel = sentinel
        self.exitcode: int | None = None
        self.reaped = False
        self._lock = threading.Lock()  # one reaper and one close of the sentinel

    def _reap(self, flags: int) -> None:
        if self.reaped:
            return
        try:
            pid, status = os.waitpid(self.pid, flags)
        except ChildProcessError:  # reaped by someone else: the code is unknown
            self.reaped = True
            return
        if pid == self.pid:
            self.reaped = True
            self.exitcode = os.waitstatus_to_exitcode(status)

    def join(self, timeout: float | None = None) -> None:
        """Wait (up to ``timeout``) for it to exit, and reap it. Safe from
        several threads: the sentinel's number is closed once, never again
        after another file reused it."""
        sentinel = self.sentinel
        if not self.reaped and sentinel >= 0:
            with contextlib.suppress(OSError, ValueError):
                _wire.wait_readable(sentinel, timeout)
        with self._lock:
            self._reap(os.WNOHANG)
            if not self.reaped or self.sentinel < 0:
                return
            sentinel, self.sentinel = self.sentinel, -1
        with contextlib.suppress(OSError):
            os.close(sentinel)


@dataclass(eq=False)
class LocalWorker:
    """One worker process, as the hub sees it (written under the pool's lock)."""

    process: Any
    conn: Any
    state: str = "starting"  # spare, starting, idle, busy, retiring, dead
    pid: int = 0
    job: Job | None = None
    item_started: float | None = None  # when the running item began (jobs with a timeout)
    timed_out_index: int | None = None
    kill_cause: str | None = None  # timeout, kill, close, retire
    kill_deadline: float | None = None  # a graceful kill turns forced then
    # Its descendants in another process group (a task's start_new_session
    # subprocess), with their start times, noted when it was told to stop:
    # once it exits they are no longer its descendants, and kill_tree would
    # miss them (``strays``).
    strays: list[tuple[int, int]] = field(default_factory=list)
    idle_since: float = 0.0
    held_until: float = 0.0  # ran a child's run: kept for its restart until then
    items_done: int = 0
    retire_requested: bool = False
    stop_due: bool = False  # retired off the hub thread: the hub sends its STOP
    # The hub is reaping it: from then on its pid may belong to another
    # process, so no thread signals it (set under the pool's lock).
    exited: bool = False
    # The functions it holds unpickled (LRU), each with a weak reference to
    # its ``Shipped`` (``_pool._encode`` evicts those nobody here holds).
    fns: collections.OrderedDict[bytes, Any] = field(default_factory=collections.OrderedDict)
    send_lock: threading.Lock = field(default_factory=threading.Lock)
    slot: Slot | None = None
    seq: int = 0  # sequence number of the last batch sent
    init_error: tuple[BaseException, str] | None = None  # the initializer raised
    fdchan: socket.socket | None = None  # the descriptor channel (``_shm``), if any
    started_with: Any = None  # the sys.path, directory and environment it started with
    context_due: Any = None  # a newer one, sent on READY (``restart_workers``)
    # A slice sent behind the running one (``LocalPool._behind_whom``): the job,
    # its batch's sequence number, and whether it reached the pipe.
    next_job: Job | None = None
    next_seq: int = 0
    # The highest sequence number of a batch written whole to its pipe (under
    # ``send_lock``). Whether a slice reached the pipe is read from it, never
    # set apart: a thread descheduled after its write must not mark as
    # delivered a slice given to the worker since (see ``delivered``).
    sent: int = 0
    pipe_room: int = 0  # the largest batch sent behind a running one (0: none)
    # It sent the results of a batch the pool did not have it running (a bug
    # of ours): killed, and nothing more it sends is credited to anything.
    confused: bool = False
    # Functions sent with a batch that has not answered yet: none is sent
    # behind such a batch, whose worker may yet fail to load it (FORGET).
    unconfirmed: set[bytes] = field(default_factory=set)
    # Its result blocks this process no longer maps, to say FREED (``_shm.watch``).
    freed: collections.deque[int] = field(default_factory=collections.deque)

    def close_ends(self) -> None:
        """Close this process's ends of the worker's pipe, descriptor channel
        and progress slot (a worker whose death the hub never settled, or
        the parent's, in a forked child)."""
        with contextlib.suppress(OSError):
            self.conn.close()
        if self.fdchan is not None:
            self.fdchan.close()
        if self.slot is not None:
            self.slot.close()

    @property
    def delivered(self) -> bool:
        """The current slice reached the pipe. (A flag set after the write
        was set by a thread that was descheduled after writing an earlier
        slice too; the hub then sent the next chunk behind one not yet
        written, the worker ran them swapped, and each got the other's
        results.)"""
        return self.sent >= self.seq

    @property
    def next_delivered(self) -> bool:
        """The slice queued behind the running one reached the pipe."""
        return self.sent >= self.next_seq

    def begun(self) -> bool:
        """Whether the worker has begun its current slice (read its header).
        False once the hub has closed the slot of a worker that died."""
        if self.slot is None:
            return True
        try:
            return self.slot.read()[0] == self.seq
        except ValueError:  # released: the hub is settling its death
            return False


class Starter:
    """Starts workers and keeps the account of failed starts (pool lock held)."""

    def __init__(
        self,
        settings: Settings,
        counts: Counts,
        dispatch: Dispatcher,
        *,
        initializer: bytes | None,
        serving: Callable[[], bool] = lambda: False,
    ) -> None:
        self.initializer = initializer  # pickled (fn, args), run by each worker before READY
        # Whether a live worker will take the queued work (pool lock held):
        # then failing starts only stop the pool growing, and fail no work.
        self.serving = serving
        self.counts = counts
        self.dispatch = dispatch
        self.max_failures = settings.max_start_failures
        self.window = settings.start_failure_window
        self.failures: collections.deque[float] = collections.deque()
        self.error: BaseException | None = None  # why the last start failed, while failing
        self.detail = ""  # the worker traceback of a raising initializer
        self.next_start_at = 0.0
        self.backoff = 0.0
        self.gave_up = False  # so many starts failed that the waiting work was failed

    def work_arrived(self) -> None:
        """New work during a run of failed starts: try again soon rather than
        at the end of a long back-off, so a fixed cause (a working directory
        back, an initializer that no longer raises) is noticed at once."""
        if self.error is not None:
            soon = time.monotonic() + START_BACKOFF_S[0]
            self.next_start_at = min(self.next_start_at, soon)

    def start(self, n: int) -> Iterator[LocalWorker]:
        """Start up to ``n`` workers, unless backing off after a failure."""
        if n <= 0 or time.monotonic() < self.next_start_at:
            return
        for _ in range(n):
            try:
                worker = self._start_one()
            except Exception as exc:
                # Out of processes or descriptors, no working directory, a
                # broken interpreter: retry later, and tell the waiting work.
                self.failed(exc)
                return
            yield worker

    def start_spare(self) -> LocalWorker | None:
        """Start a spare worker: booted, then waiting for ``PROMOTE`` (not
        counted as started until promoted); None if it could not start."""
        if not LIGHT_START:
            return None
        try:
            worker = self._start_light(spare=True)
        except Exception:
            log.debug("parstream: could not start a spare worker", exc_info=True)
            return None
        worker.state = "spare"
        return worker

    def promote(self, worker: LocalWorker) -> bool:
        """Make a spare a starting worker: False if it cannot serve as one
        (the parent's sys.path, directory or environment changed since it
        started, so it would not be the worker a start now gives)."""
        if worker.started_with != start_context():
            return False
        worker.state = "starting"
        with worker.send_lock:
            try:
                worker.conn.send_bytes(bytes((_wire.PROMOTE,)))
            except OSError:
                pass  # it died: its sentinel reports a failed start
        self.counts.workers_started += 1
        return True

    def _start_one(self) -> LocalWorker:
        if LIGHT_START:
            return self._start_light()
        _reaper.hold_stdio()
        from loky.backend.context import get_context

        ctx = get_context("loky")
        context = start_context()  # what loky's process takes from this one, near enough
        parent_conn, child_conn = ctx.Pipe(duplex=True)
        slot = new_slot()
        try:
            process = ctx.Process(
                target=worker_main,
                args=(child_conn, os.getpid(), slot, self.initializer),
                name="parstream-worker",
            )
            with _allow_children_of_daemon():
                process.start()
        except BaseException:
            parent_conn.close()
            child_conn.close()
            if slot is not None:
                slot.close()
            raise
        _reaper.watch(process.pid)
        child_conn.close()
        self.counts.workers_started += 1
        return LocalWorker(
            process=process,
            conn=parent_conn,
            pid=process.pid,
            slot=slot,
            started_with=context,
        )

    def _start_light(self, spare: bool = False) -> LocalWorker:
        import _pickle as pickle  # the pure module would be imported before the first fork
        import socket
        import sys

        _reaper.hold_stdio()
        parent_sock, child_sock = socket.socketpair()
        fdchan, fdchan_child = _shm.channel_pair()
        slot = new_slot()
        prep_r, prep_w = os.pipe()
        sentinel_r = sentinel_w = -1
        pid = sentinel = -1
        child_fd = child_sock.fileno()
        try:
            keep = [child_fd, prep_r] + ([slot.fd] if slot is not None else [])
            if fdchan_child is not None:
                keep.append(fdchan_child.fileno())
            if not PIDFDS:  # pragma: no cover - not Linux, or an old kernel
                sentinel_r, sentinel_w = os.pipe()
                keep.append(sentinel_w)
            # fork_exec does not wait for the exec to be confirmed:
            # a process another thread forks meanwhile (a fork-started Pool)
            # would hold that confirmation pipe open, and the hub with it.
            # Before the fork: with no working directory, getcwd() fails here,
            # not after an interpreter was started that nobody would reap.
            os.getcwd()
            # One snapshot for the child and for the record (``started_with``),
            # which ``restart_workers`` compares: another thread may change
            # the environment or sys.path while this one starts the worker.
            context = start_context()
            path, cwd, environ = context
            added = {k: v for k, v in MALLOC_ENV.items() if k not in environ}
            cmd = [sys.executable, *_interpreter_flags(), "-c", BOOT, str(prep_r)]
            pid = fork_exec(cmd, keep, env={**environ, **added})
            sentinel = os.pidfd_open(pid) if sentinel_w < 0 else sentinel_r
            prep = {
                "spare": spare,
                "path": path,
                "cwd": cwd,
                "conn": child_fd,
                "slot": None if slot is None else slot.fd,
                "fdchan": None if fdchan_child is None else fdchan_child.fileno(),
                "parent": os.getpid(),
                "init": self.initializer,
                "drop_env": list(added),
            }
            data = pickle.dumps(prep, protocol=5)
            # A pipe holds 64 KiB: a larger initializer is written from a thread,
            # so the hub never waits for a worker to start.
            if len(data) < 60_000:
                _write_all(prep_w, data, close=False)
            else:
                args = (prep_w, data, True)
                threading.Thread(target=_write_all, args=args, daemon=True).start()
                prep_w = -1  # the thread closes it
        except BaseException:
            if pid > 0:  # started, but it will never get its start data: end and reap it
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
                    os.waitpid(pid, 0)
            if sentinel >= 0 and sentinel != sentinel_r:
                os.close(sentinel)  # the pidfd
            parent_sock.close()
            if fdchan is not None:
                fdchan.close()
            if slot is not None:
                slot.close()
            if sentinel_r >= 0:
                os.close(sentinel_r)
            raise
        finally:
            child_sock.close()
            if fdchan_child is not None:
                fdchan_child.close()
            os.close(prep_r)
            for fd in (prep_w, sentinel_w):
                if fd >= 0:
                    os.close(fd)
        _reaper.watch(pid)
        if not spare:
            self.counts.workers_started += 1
        # What a batch sent behind a running one may take of the pipe's buffer:
        # the worker reads nothing while it runs, and the hub must never wait.
        room = min(PIPE_ROOM_MAX, parent_sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) // 4)
        conn = _wire.FdConnection(parent_sock.detach())
        return LocalWorker(
            process=_Process(pid, sentinel),
            conn=conn,
            pid=pid,
            slot=slot,
            fdchan=fdchan,
            pipe_room=room,
            started_with=context,
        )

    def ready(self) -> None:
        """A worker said READY: starts work again."""
        if self.error is not None:
            log.info("parstream: worker processes start again")
        self.failures.clear()
        self.error = None
        self.gave_up = False
        self.detail = ""
        self.backoff = 0.0
        self.next_start_at = 0.0

    def died_starting(self, worker: LocalWorker, exitcode: int | None) -> None:
        if worker.init_error is not None:
            cause: BaseException = rebuild(worker.init_error)
            self.detail = worker.init_error[1]
        else:
            cause = WorkerStartFailed(
                f"a worker process (pid {worker.pid}) exited with code {exitcode} "
                "before it was ready; see its stderr for the cause",
                exitcode=exitcode,
            )
        self.failed(cause)

    def failed(self, cause: BaseException) -> None:
        """A worker could not be started: back off, maybe fail the queue."""
        now = time.monotonic()
        first = self.error is None
        self.error = cause
        self.counts.worker_start_failures += 1
        self.failures.append(now)
        while self.failures and now - self.failures[0] > self.window:
            self.failures.popleft()
        low, high = START_BACKOFF_S
        self.backoff = min(max(self.backoff * 2, low), high)
        self.next_start_at = now + self.backoff
        if first:
            log.error("parstream: could not start a worker process: %r (retrying)", cause)
        if len(self.failures) > self.max_failures:
            self.gave_up = True
            # Extra workers that cannot start fail no work the live ones will
            # do: max_concurrency is a bound, not a promise of processes.
            if not self.serving():
                self.dispatch.fail_queue(self._give_up_error(cause))

    def _give_up_error(self, cause: BaseException) -> WorkerStartFailed:
        message = (
            f"no worker process could be started ({len(self.failures)} failures "
            f"within {self.window:g} s): {cause!r}; parstream keeps retrying"
        )
        if self.detail:
            message += f"\n\nWorker traceback:\n{self.detail.rstrip()}"
        err = WorkerStartFailed(message, exitcode=getattr(cause, "exitcode", None))
        err.__cause__ = cause
        return err


def _interpreter_flags() -> list[str]:
    """This interpreter's command-line flags (``-W error``, ``-X dev``, ``-O``...),
    for the worker's, as multiprocessing's spawn passes them."""
    import subprocess

    flags: list[str] = getattr(subprocess, "_args_from_interpreter_flags", list)()
    return flags


def fork_exec(cmd: list[str], keep_fds: list[int], env: dict[str, str]) -> int:
    """Start ``cmd`` with only ``keep_fds`` (and 0-2) inherited, and ``env``
    as its whole environment; its pid.

    loky's ``fork_exec``, copied: importing it imports all of loky (~30 ms,
    on the hub thread, before the first worker could start; issue 12). The
    arguments of ``_posixsubprocess.fork_exec`` change with the Python version.
    """
    import _posixsubprocess
    import subprocess
    import sys

    args = [os.fsencode(arg) for arg in cmd]
    encoded_env = [os.fsencode(f"{k}={v}") for k, v in env.items()]
    keep = tuple(sorted(map(int, keep_fds)))
    allow_vfork: list[Any] = []
    if sys.version_info < (3, 14):  # 3.14 dropped the argument (and vfork is the default)
        allow_vfork.append(getattr(subprocess, "_USE_VFORK", True))
    call: Any = _posixsubprocess.fork_exec  # private: typeshed knows one version's arguments
    # The worker's stdin is /dev/null, as multiprocessing's: a task reading
    # it gets end of file, instead of taking the parent's input or, from a
    # terminal, being stopped by SIGTTIN (the worker is not in the
    # terminal's foreground group).
    devnull = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    errpipe_read, errpipe_write = os.pipe()
    try:
        pid: int = call(
            args,  # args
            args[0:1],  # executable_list
            True,  # close_fds
            keep,  # pass_fds
            None,  # cwd
            encoded_env,  # env
            devnull,  # p2cread
            -1,  # p2cwrite
            -1,  # c2pread
            -1,  # c2pwrite
            -1,  # errread
            -1,  # errwrite
            errpipe_read,
            errpipe_write,
            False,  # restore_signal
            False,  # call_setsid
            0,  # pgid_to_set: a group of its own from the start (see worker_main)
            None,  # gid
            None,  # extra_groups
            None,  # uid
            -1,  # child_umask
            None,  # preexec_fn
            *allow_vfork,
        )
    finally:
        os.close(errpipe_read)
        os.close(errpipe_write)
        os.close(devnull)
    return pid


def start_context() -> tuple[list[str], str, dict[str, str]]:
    """What a new worker takes from this process when it starts: its
    ``sys.path`` (relative entries made absolute), directory and environment."""
    import sys

    try:
        cwd = os.getcwd()
    except OSError:  # no working directory: a start now would fail too
        cwd = ""
    origin = _original_dir() or cwd
    return [p or origin for p in sys.path], cwd, _environ()


def _environ() -> dict[str, str]:
    """A copy of ``os.environ``. ``dict(os.environ)`` lists the keys, then
    reads each: a variable another thread deletes meanwhile is a KeyError
    (on the hub, in ``promote``, that ended the pool). Retried; the bytes
    mapping underneath is copied in one C call as a last resort."""
    for _ in range(20):
        try:
            return dict(os.environ)
        except KeyError:
            continue
    data: Any = getattr(os.environ, "_data", {})
    return {os.fsdecode(k): os.fsdecode(v) for k, v in dict(data).items()}


try:
    _IMPORT_DIR: str | None = os.getcwd()
except OSError:  # pragma: no cover - no working directory
    _IMPORT_DIR = None


def _original_dir() -> str | None:
    """The directory a relative ``sys.path`` entry (``''`` under ``python -c``,
    the REPL, Jupyter) means, however the process has changed directory
    since: multiprocessing's ``ORIGINAL_DIR`` (the working directory when it
    was first imported) if it is imported, else the one when this module
    was. Importing multiprocessing for it would cost a new process ~9 ms
    before its first worker starts (issue 12)."""
    import sys

    mp_process = sys.modules.get("multiprocessing.process")
    return getattr(mp_process, "ORIGINAL_DIR", None) or _IMPORT_DIR


def _write_all(fd: int, data: bytes, close: bool) -> None:
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
    except OSError:  # the worker died first: its death is reported as a failed start
        pass
    finally:
        if close:
            with contextlib.suppress(OSError):
                os.close(fd)


def kill_tree(pid: int) -> None:
    """SIGKILL a worker and every process its tasks started: its process group
    (which reaches a shell's background grandchild), then, for processes that
    moved to another group, its descendants as they were before the kill.

    The worker is stopped first (SIGSTOP), so that while its descendants are
    looked up it can finish no item and send no result: a timeout decided
    is a timeout delivered, and a task cannot start more processes then."""
    with contextlib.suppress(OSError):
        os.kill(pid, signal.SIGSTOP)
    try:
        children = _below(pid)
    except Exception as exc:
        # No free descriptor (EMFILE) to read /proc, say: the worker and its
        # group are killed all the same (else the worker stayed stopped for
        # good and the caller got psutil's error); only a descendant that left
        # the group can outlive it.
        log.warning("parstream: could not list the processes below worker %d: %r", pid, exc)
        children = []
    _reaper.kill_group(pid)
    for child in reversed(children):
        # A descendant that leads a group of its own (a worker of parstream
        # nested in a task, a subprocess started in a new session) takes its
        # group with it, as the worker does: that group holds what it
        # started, a shell's background job included, and the one process
        # that would kill it at its death (a nested pool's reaper) is among
        # those killed here.
        with contextlib.suppress(OSError):
            if os.getpgid(child) == child:
                _reaper.kill_group(child)
        with contextlib.suppress(OSError):
            os.kill(child, signal.SIGKILL)
    with contextlib.suppress(OSError):
        os.kill(pid, signal.SIGKILL)


def strays(pid: int) -> list[tuple[int, int]]:
    """Worker ``pid``'s descendants outside its process group, each with its
    start time (``kill_strays`` tells them from a later process with the same
    pid). Read while the worker still lives: a worker stopped gracefully or
    retired ends, and what it started in a new session is then reparented,
    out of ``kill_tree``'s reach. Empty where there is no /proc."""
    try:
        children = _descendants(pid) or []
    except Exception:  # no free descriptor, say: the group is still killed
        return []
    out = []
    for child in children:
        group, started = _stat(child)  # one read: both of the same process
        if started is not None and group != pid:
            out.append((child, started))
    return out


def kill_strays(found: list[tuple[int, int]], sig: int = signal.SIGKILL) -> None:
    """Send ``sig`` to each of ``strays``' processes that is still the same one."""
    for child, started in found:
        if _stat(child)[1] == started:
            with contextlib.suppress(OSError):
                os.kill(child, sig)


def _stat(pid: int) -> tuple[int | None, int | None]:
    """``pid``'s process group and start time (clock ticks since boot), from
    /proc; ``(None, None)`` if it is gone or there is no /proc."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
        fields = stat[stat.rindex(b")") + 2 :].split()  # after the command's name
        return int(fields[2]), int(fields[19])
    except (OSError, ValueError, IndexError):
        return None, None


def _below(pid: int) -> list[int]:
    """``pid``'s descendants, parents first: from /proc, else psutil."""
    children = _descendants(pid)
    if children is None:  # no /proc: psutil (here: workers import this package)
        import psutil

        try:
            procs = psutil.Process(pid).children(recursive=True)
        except psutil.Error:
            procs = []
        children = [p.pid for p in procs]
    return children


def _descendants(pid: int) -> list[int] | None:
    """``pid``'s descendants, parents before children, read from /proc; None
    without it. (Not psutil: importing it at the interpreter's exit runs
    ``exec``, which makes CPython forget that the program ended by Ctrl-C:
    it exited with status 1, not by SIGINT, and a shell loop went on.)

    Read from each thread's ``children`` file where the kernel has them
    (a few files, not a stat of every process: ~5 ms on a busy machine)."""
    found: list[int] = []
    todo = [pid]
    while todo:
        parent = todo.pop()
        children = _children_of(parent)
        if children is None:
            return _descendants_by_scan(pid)
        found.extend(children)
        todo.extend(children)
    return found


def _children_of(pid: int) -> list[int] | None:
    """``pid``'s children from ``/proc/PID/task/*/children``; None where the
    kernel does not keep those files (``CONFIG_PROC_CHILDREN``)."""
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except FileNotFoundError:
        return []  # gone
    except OSError:
        return None
    children: list[int] = []
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/children", "rb") as f:
                children.extend(int(c) for c in f.read().split())
        except FileNotFoundError:
            if not os.path.exists(f"/proc/{pid}/task/{tid}"):
                continue  # the thread ended meanwhile
            return None  # no such files on this kernel
        except (OSError, ValueError):
            continue
    return children


def _descendants_by_scan(pid: int) -> list[int] | None:
    """``_descendants`` by reading every process's parent from /proc."""
    try:
        names = os.listdir("/proc")
    except OSError:
        return None
    below: dict[int, list[int]] = {}
    for name in names:
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as stat:
                data = stat.read()
            # "pid (comm) state ppid ...": comm may hold spaces and parentheses
            ppid = int(data[data.rindex(b")") + 2 :].split()[1])
        except (OSError, ValueError, IndexError):
            continue  # gone meanwhile
        below.setdefault(ppid, []).append(int(name))
    found: list[int] = []
    todo = [pid]
    while todo:
        for child in below.get(todo.pop(), ()):
            found.append(child)
            todo.append(child)
    return found


def kill_spare(pid: int) -> None:
    """SIGKILL a spare worker. It has run no user code, so nothing below it
    needs finding (``kill_tree``'s walk of /proc costs ~1.5 ms a worker)."""
    with contextlib.suppress(OSError):
        os.kill(pid, signal.SIGKILL)


def rss(pid: int) -> int:
    """A worker's resident memory in bytes (0 if it cannot be read, as
    without a free descriptor: EMFILE is an OSError, not a psutil.Error)."""
    try:
        import psutil

        return int(psutil.Process(pid).memory_info().rss)
    except Exception:
        return 0


def crash_error(pid: int, exitcode: int | None) -> WorkerCrashed:
    """The error for the item a dead worker was running: signal and likely cause."""
    if exitcode is not None and exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = f"signal {-exitcode}"
        cause = {
            "SIGSEGV": "a segfault, usually in a C extension",
            "SIGKILL": "killed from outside, often by the OOM killer",
            "SIGBUS": "a bus error, usually in a C extension",
            "SIGABRT": "an abort, usually a failed C assertion",
        }.get(name, "killed by a signal")
        how = f"{name} ({cause})"
    else:
        how = f"exit code {exitcode} (the task called os._exit or the interpreter died)"
    return WorkerCrashed(
        f"the worker (pid {pid}) running this task died: {how}", exitcode=exitcode, pid=pid
    )


@contextlib.contextmanager
def _allow_children_of_daemon() -> Iterator[None]:
    """Let a daemonic process (a ``multiprocessing.Pool`` worker) start workers.

    multiprocessing refuses children to daemonic processes so that none is
    orphaned when the daemon is terminated; ours die with their parent
    (``PR_SET_PDEATHSIG`` and a parent-pid watch), so the rule's reason does
    not apply. The flag is lifted only while the hub starts one worker.
    """
    import multiprocessing

    config = multiprocessing.current_process()._config  # type: ignore[attr-defined]
    daemon = config.pop("daemon", None)
    try:
        yield
    finally:
        if daemon is not None:
            config["daemon"] = daemon
