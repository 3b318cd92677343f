"""parstream: Elixir's Task and Task.Supervisor for Python, on worker processes.

``parstream.map(fn, items)`` and ``parstream.async_stream(fn, items)`` replace a
slow ``for`` loop; ``async_``/``await_`` run single calls; ``Supervisor`` owns
workers, restarts children and is a ``concurrent.futures.Executor``.
"""

from __future__ import annotations

import os
import sys

TYPE_CHECKING = False  # typing costs every worker start ~3 ms (mypy knows the name)

if TYPE_CHECKING:
    import typing  # (a plain import: the names imported from here are the public ones)

    from parstream._api import (
        async_ as async_,
        async_stream as async_stream,
        async_stream_nolink as async_stream_nolink,
        default_supervisor as default_supervisor,
        map as map,
        restart_workers as restart_workers,
        start as start,
    )
    from parstream._backend import Node as Node, Worker as Worker, cpu_count as cpu_count
    from parstream._backends.inline import InlineBackend as InlineBackend
    from parstream._backends.local import LocalBackend as LocalBackend
    from parstream._backends.ray import RayBackend as RayBackend
    from parstream._children import Child as Child
    from parstream._compare import Comparison as Comparison, compare as compare
    from parstream._errors import (
        NodeDied as NodeDied,
        ParstreamError as ParstreamError,
        ParstreamInternalError as ParstreamInternalError,
        RemoteError as RemoteError,
        RemoteTraceback as RemoteTraceback,
        SupervisorClosed as SupervisorClosed,
        TaskShutdown as TaskShutdown,
        TaskTimeout as TaskTimeout,
        WorkerCrashed as WorkerCrashed,
        WorkerStartFailed as WorkerStartFailed,
    )
    from parstream._results import Exit as Exit, Ok as Ok, Stats as Stats
    from parstream._stream import Stream as Stream
    from parstream._supervisor import Supervisor as Supervisor
    from parstream._task import (
        BRUTAL_KILL as BRUTAL_KILL,
        Task as Task,
        await_ as await_,
        await_many as await_many,
        completed as completed,
        shutdown as shutdown,
        yield_ as yield_,
        yield_many as yield_many,
    )
    from parstream._validate import Options as Options

__version__ = "0.1.0"

__all__ = (
    "BRUTAL_KILL",
    "Child",
    "Comparison",
    "Exit",
    "InlineBackend",
    "LocalBackend",
    "Node",
    "NodeDied",
    "Ok",
    "Options",
    "ParstreamError",
    "ParstreamInternalError",
    "RayBackend",
    "RemoteError",
    "RemoteTraceback",
    "Stats",
    "Stream",
    "Supervisor",
    "SupervisorClosed",
    "Task",
    "TaskShutdown",
    "TaskTimeout",
    "Worker",
    "WorkerCrashed",
    "WorkerStartFailed",
    "async_",
    "async_stream",
    "async_stream_nolink",
    "await_",
    "await_many",
    "compare",
    "completed",
    "cpu_count",
    "default_supervisor",
    "map",
    "restart_workers",
    "shutdown",
    "start",
    "yield_",
    "yield_many",
)

# Where each public name lives. The package loads them on first use (PEP 562),
# so a worker process, which imports only ``parstream._backends.local._worker``,
# does not pay for the parent-side modules at every start, and Ray is never
# imported until a Ray backend is used.
_HOMES = {
    "Node": "_backend",
    "Worker": "_backend",
    "cpu_count": "_backend",
    "InlineBackend": "_backends.inline",
    "LocalBackend": "_backends.local",
    "RayBackend": "_backends.ray",
    "Child": "_children",
    "async_": "_api",
    "async_stream": "_api",
    "async_stream_nolink": "_api",
    "default_supervisor": "_api",
    "map": "_api",
    "restart_workers": "_api",
    "start": "_api",
    "Comparison": "_compare",
    "compare": "_compare",
    "NodeDied": "_errors",
    "ParstreamError": "_errors",
    "ParstreamInternalError": "_errors",
    "RemoteError": "_errors",
    "RemoteTraceback": "_errors",
    "SupervisorClosed": "_errors",
    "TaskShutdown": "_errors",
    "TaskTimeout": "_errors",
    "WorkerCrashed": "_errors",
    "WorkerStartFailed": "_errors",
    "Exit": "_results",
    "Ok": "_results",
    "Stats": "_results",
    "Stream": "_stream",
    "Supervisor": "_supervisor",
    "BRUTAL_KILL": "_task",
    "Task": "_task",
    "await_": "_task",
    "await_many": "_task",
    "completed": "_task",
    "shutdown": "_task",
    "yield_": "_task",
    "yield_many": "_task",
    "Options": "_validate",
}


# Ray's connection does not survive os.fork(): a child of a process that had
# Ray initialised must not use it (it would hang), and the Ray backend refuses
# with a clear error. Noted here, where it costs nothing and runs first.
_forked_with_ray = False


def _note_fork() -> None:
    global _forked_with_ray
    ray = sys.modules.get("ray")
    if ray is not None:
        try:
            _forked_with_ray = _forked_with_ray or bool(ray.is_initialized())
        except Exception:  # pragma: no cover - a broken Ray
            _forked_with_ray = True


# A module another thread is importing at os.fork() stays locked in the child
# for good (its lock's owner does not exist there), and the child hangs at its
# first import of it. parstream imports much on first use, on the caller's
# thread and on the hub's (a thread's first ``parstream.map`` as the main
# thread forked hung the child at its own first call), and so do many
# libraries: a fork waits, a bounded while, for other threads' imports to end.
FORK_IMPORT_WAIT_S = 2.0


def _let_imports_finish() -> None:
    import _thread
    import time

    bootstrap = sys.modules.get("_frozen_importlib") or sys.modules.get("importlib._bootstrap")
    locks = getattr(bootstrap, "_module_locks", None)
    if not isinstance(locks, dict):  # pragma: no cover - another importlib
        return
    me = _thread.get_ident()
    deadline = time.monotonic() + FORK_IMPORT_WAIT_S
    while time.monotonic() < deadline:
        try:
            owners = [getattr(ref(), "owner", None) for ref in list(locks.values())]
        except Exception:  # changed size meanwhile (a finished import's callback)
            continue
        if all(owner is None or owner == me for owner in owners):
            return
        time.sleep(0.001)  # (releases the GIL: the importing thread goes on)


if hasattr(os, "register_at_fork"):
    if not getattr(sys, "_parstream_worker", False):  # (set by a worker's boot)
        # logging's own before-fork hook takes logging's lock. Registered
        # first, it runs after this one (before-hooks run newest first), so
        # the wait never holds that lock against an import that logs (most
        # do: ``getLogger`` at module level), which would stall every fork.
        import logging  # noqa: F401
    os.register_at_fork(before=_let_imports_finish, after_in_child=_note_fork)


def __getattr__(name: str) -> typing.Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'parstream' has no attribute {name!r}")
    # Not importlib.import_module: importing importlib (and warnings) costs
    # every worker start ~0.8 ms, and workers import this package.
    __import__(f"parstream.{home}")
    module = sys.modules[f"parstream.{home}"]
    for public, where in _HOMES.items():
        if where == home:
            obj = getattr(module, public)
            # Tracebacks, reprs and pickles say ``parstream.X``.
            if getattr(obj, "__module__", "").startswith("parstream._"):
                try:
                    obj.__module__ = "parstream"
                except (AttributeError, TypeError):
                    pass
            globals()[public] = obj
    return globals()[name]


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
