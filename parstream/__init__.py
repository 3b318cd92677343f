"""parstream: Elixir's Task and Task.Supervisor for Python, on worker processes.

``parstream.map(fn, items)`` and ``parstream.async_stream(fn, items)`` replace a
slow ``for`` loop; ``async_``/``await_`` run single calls; ``Supervisor`` owns
workers, restarts children and is a ``concurrent.futures.Executor``.
"""

from __future__ import annotations

from parstream._api import (
    async_ as async_,
)
from parstream._api import (
    async_stream as async_stream,
)
from parstream._api import (
    async_stream_nolink as async_stream_nolink,
)
from parstream._api import (
    default_supervisor as default_supervisor,
)
from parstream._api import (
    map as map,
)
from parstream._api import (
    restart_workers as restart_workers,
)
from parstream._api import (
    start as start,
)
from parstream._errors import (
    ParstreamError as ParstreamError,
)
from parstream._errors import (
    ParstreamInternalError as ParstreamInternalError,
)
from parstream._errors import (
    SupervisorClosed as SupervisorClosed,
)
from parstream._errors import (
    TaskShutdown as TaskShutdown,
)
from parstream._errors import (
    TaskTimeout as TaskTimeout,
)
from parstream._errors import (
    WorkerCrashed as WorkerCrashed,
)
from parstream._results import Exit as Exit
from parstream._results import Ok as Ok
from parstream._results import Stats as Stats
from parstream._stream import Stream as Stream
from parstream._supervisor import Child as Child
from parstream._supervisor import Supervisor as Supervisor
from parstream._supervisor import cpu_count as cpu_count
from parstream._task import (
    BRUTAL_KILL as BRUTAL_KILL,
)
from parstream._task import (
    Task as Task,
)
from parstream._task import (
    await_ as await_,
)
from parstream._task import (
    await_many as await_many,
)
from parstream._task import (
    completed as completed,
)
from parstream._task import (
    shutdown as shutdown,
)
from parstream._task import (
    yield_ as yield_,
)
from parstream._task import (
    yield_many as yield_many,
)
from parstream._wire import RemoteTraceback as RemoteTraceback

__version__ = "0.1.0"

__all__ = (
    "BRUTAL_KILL",
    "Child",
    "Exit",
    "Ok",
    "ParstreamError",
    "ParstreamInternalError",
    "RemoteTraceback",
    "Stats",
    "Stream",
    "Supervisor",
    "SupervisorClosed",
    "Task",
    "TaskShutdown",
    "TaskTimeout",
    "WorkerCrashed",
    "async_",
    "async_stream",
    "async_stream_nolink",
    "await_",
    "await_many",
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

# Tracebacks and reprs say ``parstream.X``, not the private module.
for _name in __all__:
    _obj = globals()[_name]
    if getattr(_obj, "__module__", "").startswith("parstream._"):
        try:
            _obj.__module__ = "parstream"
        except (AttributeError, TypeError):
            pass
del _name, _obj
