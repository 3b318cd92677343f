"""Module-level functions: the same calls on a default Supervisor.

The default supervisor is started on first use and reused across calls (a
notebook's second cell finds warm workers); it is replaced if it was closed,
and shut down at interpreter exit. A child made by ``os.fork()`` (or a
fork-started ``multiprocessing`` worker) starts a default supervisor of its
own, with its own workers, on its first call; the parent's is left alone.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

from parstream._stream import OnTimeout, Stream
from parstream._supervisor import Supervisor
from parstream._task import Task

T = TypeVar("T")

_lock = threading.Lock()
_default: Supervisor | None = None


def _after_fork_in_child() -> None:
    global _lock, _default
    _lock = threading.Lock()
    _default = None  # the parent's: its pool is inert here


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def default_supervisor() -> Supervisor:
    """The Supervisor behind the module-level functions, started on first use."""
    global _default
    with _lock:
        if _default is None or _default.closed:
            _default = Supervisor()
        return _default


def async_(fn: Callable[..., T], *args: Any) -> Task[T]:
    """Run ``fn(*args)`` in a worker and return a linked ``Task``.

    Example::

        task = parstream.async_(sum, [1, 2, 3])
        assert task.await_() == 6
    """
    return default_supervisor().async_(fn, *args)


def start(fn: Callable[..., Any], *args: Any) -> None:
    """Fire and forget ``fn(*args)``; a failure is logged on the ``parstream`` logger."""
    default_supervisor().start(fn, *args)


def async_stream(
    fn: Callable[..., Any],
    iterable: Iterable[Any],
    *,
    max_concurrency: int | None = None,
    ordered: bool = True,
    timeout: float | None = None,
    on_timeout: OnTimeout = "exit",
    zip_input_on_exit: bool = False,
    progress: Any = False,
    chunksize: int | None = None,
    buffer_size: int | None = None,
) -> Stream:
    """``Supervisor.async_stream`` on the default supervisor.

    Example::

        for result in parstream.async_stream(slow_square, range(100)):
            match result:
                case parstream.Ok(value): print(value)
    """
    return default_supervisor().async_stream(
        fn,
        iterable,
        max_concurrency=max_concurrency,
        ordered=ordered,
        timeout=timeout,
        on_timeout=on_timeout,
        zip_input_on_exit=zip_input_on_exit,
        progress=progress,
        chunksize=chunksize,
        buffer_size=buffer_size,
    )


def async_stream_nolink(
    fn: Callable[..., Any],
    iterable: Iterable[Any],
    *,
    max_concurrency: int | None = None,
    ordered: bool = True,
    timeout: float | None = None,
    on_timeout: OnTimeout = "exit",
    zip_input_on_exit: bool = False,
    progress: Any = False,
    chunksize: int | None = None,
    buffer_size: int | None = None,
) -> Stream:
    """``Supervisor.async_stream_nolink`` on the default supervisor."""
    return default_supervisor().async_stream_nolink(
        fn,
        iterable,
        max_concurrency=max_concurrency,
        ordered=ordered,
        timeout=timeout,
        on_timeout=on_timeout,
        zip_input_on_exit=zip_input_on_exit,
        progress=progress,
        chunksize=chunksize,
        buffer_size=buffer_size,
    )


def map(
    fn: Callable[..., T],
    iterable: Iterable[Any],
    *,
    max_concurrency: int | None = None,
    ordered: bool = True,
    timeout: float | None = None,
    on_timeout: OnTimeout = "exit",
    progress: Any = False,
    chunksize: int | None = None,
    buffer_size: int | None = None,
) -> Iterator[T]:
    """Parallel, lazy ``map``: values in input order, raising the first failure.

    The drop-in for a slow ``for`` loop. ``timeout`` is per item (unlike
    ``Supervisor.map``, the ``concurrent.futures`` one, where it is one
    deadline). Options as for ``async_stream``.

    Example::

        squares = list(parstream.map(slow_square, range(100), progress=True))
    """
    return default_supervisor().stream_map(
        fn,
        iterable,
        max_concurrency=max_concurrency,
        ordered=ordered,
        timeout=timeout,
        on_timeout=on_timeout,
        progress=progress,
        chunksize=chunksize,
        buffer_size=buffer_size,
    )


def restart_workers() -> None:
    """Replace the default supervisor's workers (after editing a module they use)."""
    default_supervisor().restart_workers()
