"""The exception hierarchy, and the one error message both the front end and
the backends build (``argument_not_pickled``).

Every class here is raised by parstream itself; a task's own exception is
re-raised with its original type (see ``RemoteTraceback``).
"""

from __future__ import annotations

import _pickle as pickle  # the C module: the pure one imports re (a worker start; issue 12)


class ParstreamError(Exception):
    """Root of every error parstream raises on its own behalf."""


class TaskTimeout(ParstreamError, TimeoutError):
    """Raised (or put in an ``Exit``) when a task ran past its timeout.

    The worker that ran it has been killed, with its whole process tree, and
    replaced; no other task was affected. Raise the timeout or make the task
    faster.
    """

    def __init__(self, message: str, *, index: int | None = None, timeout: float | None = None):
        super().__init__(message)
        self.index = index
        self.timeout = timeout

    def __reduce__(self) -> tuple[object, ...]:
        return (_rebuild_timeout, (str(self), self.index, self.timeout))


def _rebuild_timeout(message: str, index: int | None, timeout: float | None) -> TaskTimeout:
    return TaskTimeout(message, index=index, timeout=timeout)


class WorkerCrashed(ParstreamError):
    """Raised (or put in an ``Exit``) when the worker running a task died.

    ``exitcode`` is the process exit code (negative: killed by that signal).
    Only the task that was running is failed; a replacement worker starts and
    every other task goes on. A segfault points at a C extension, SIGKILL at the
    OOM killer or an outside ``kill``.
    """

    def __init__(self, message: str, *, exitcode: int | None = None, pid: int | None = None):
        super().__init__(message)
        self.exitcode = exitcode
        self.pid = pid

    def __reduce__(self) -> tuple[object, ...]:
        return (_rebuild_crashed, (str(self), self.exitcode, self.pid))


def _rebuild_crashed(message: str, exitcode: int | None, pid: int | None) -> WorkerCrashed:
    return WorkerCrashed(message, exitcode=exitcode, pid=pid)


class WorkerStartFailed(WorkerCrashed):
    """Raised (or put in an ``Exit``) for work that waited while no worker
    process could be started.

    ``__cause__`` is what made the start fail (no working directory, out of
    processes or file descriptors, an interpreter that dies at once, an
    ``initializer`` that raised, whose own exception and worker traceback the
    message carries). parstream goes on retrying with back-off, and work
    submitted after the cause is gone runs normally.
    """

    def __reduce__(self) -> tuple[object, ...]:
        return (_rebuild_start_failed, (str(self), self.exitcode))


def _rebuild_start_failed(message: str, exitcode: int | None) -> WorkerStartFailed:
    return WorkerStartFailed(message, exitcode=exitcode)


class NodeDied(WorkerCrashed):
    """Raised (or put in an ``Exit``) for a task whose cluster node died
    under it (a cluster backend), or that cannot be placed on its ``node=``
    because that node is gone.

    ``node`` is the node's id. Only the items that were on that node fail;
    the rest of a stream goes on on the other nodes.
    """

    def __init__(self, message: str, *, node: str | None = None) -> None:
        super().__init__(message)
        self.node = node

    def __reduce__(self) -> tuple[object, ...]:
        return (_rebuild_node_died, (str(self), self.node))


def _rebuild_node_died(message: str, node: str | None) -> NodeDied:
    return NodeDied(message, node=node)


class TaskShutdown(ParstreamError):
    """Put in an ``Exit`` when a task was shut down or killed on request
    (``Task.shutdown``, ``terminate_child``, a closed stream or supervisor)."""


class SupervisorClosed(ParstreamError, RuntimeError):
    """Raised by every call on a Supervisor that was closed or gave up.

    A Supervisor gives up after more than ``max_restarts`` restarts within
    ``max_seconds``; the message says which. Start a new Supervisor.
    """


class RemoteError(ParstreamError):
    """Stands in for a task's exception that could not travel back as itself.

    Raised (or put in an ``Exit``) in place of an exception that could not be
    pickled in the worker, or not be unpickled in the parent (its class exists
    only in the worker, its ``__init__`` does not accept its own ``args``, it
    holds a lock...). ``type_name`` is the original class's qualified name,
    ``message`` its ``str()``, and the worker's traceback is the
    ``__cause__``, as for any task exception. To get the exception back as
    itself, make it picklable (pass every ``__init__`` argument on to
    ``super().__init__``, or define ``__reduce__``).
    """

    def __init__(self, type_name: str, message: str, reason: str = "") -> None:
        text = f"{type_name}: {message}" if message else type_name
        if reason:
            text += f" (stand-in: the task's exception {reason})"
        super().__init__(text)
        self.type_name = type_name
        self.message = message
        self.reason = reason

    def __reduce__(self) -> tuple[object, ...]:
        return (type(self), (self.type_name, self.message, self.reason))


class RemoteTraceback(Exception):
    """The worker-side traceback of a task's exception, attached as its
    ``__cause__``, so the traceback printed in the parent shows where in the
    task the exception was raised."""

    def __init__(self, tb: str) -> None:
        super().__init__(tb)
        self.tb = tb

    def __str__(self) -> str:
        return "\n\n" + self.tb.rstrip() + "\n"


class ParstreamInternalError(ParstreamError):
    """Raised when parstream broke one of its own rules: this is our bug,
    please report it with the traceback."""


class ArgumentsNotPickled(pickle.PicklingError):
    """A ``PicklingError`` for a call whose arguments could not be sent: the
    call never ran. A supervised child that gets it ends with it instead of
    being restarted (each run would fail the same way)."""


def argument_not_pickled(culprit: str, cause: BaseException) -> pickle.PicklingError:
    """The error of a call whose arguments cannot travel; ``culprit`` names
    the first that fails (``argument 0 (Lock)``), or says ``the arguments``."""
    err = ArgumentsNotPickled(f"{culprit} of this task could not be pickled: {cause!r}")
    err.__cause__ = cause
    return err
