"""Module-level functions: the same calls on a default Supervisor per backend.

The default supervisor of a backend is started on first use and reused
across calls (a notebook's second cell finds warm workers); it is replaced if
it was closed, and shut down at interpreter exit. ``backend=`` picks it
(``"local"`` by default). A child made by ``os.fork()`` (or a fork-started
``multiprocessing`` worker) starts default supervisors of its own, with its
own workers, on its first call; the parent's are left alone.
"""

from __future__ import annotations

import os
import threading
from typing import TYPE_CHECKING, Any, Literal, TypeVar, overload

from parstream._backend import resolve
from parstream._supervisor import Supervisor
from parstream._validate import MapOptions, StreamOptions, check_bool, document_options

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable
    from typing import Unpack

    from parstream._stream import Stream, _Values
    from parstream._task import Task

T = TypeVar("T")

_lock = threading.Lock()
_defaults: dict[Any, Supervisor] = {}


def _after_fork_in_child() -> None:
    global _lock, _defaults
    _lock = threading.Lock()
    _defaults = {}  # the parent's: their backends are inert here


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


@overload
def default_supervisor(backend: Any = None, *, start: Literal[True] = True) -> Supervisor: ...


@overload
def default_supervisor(backend: Any = None, *, start: bool) -> Supervisor | None: ...


def default_supervisor(backend: Any = None, *, start: bool = True) -> Supervisor | None:
    """The Supervisor behind the module-level functions for ``backend``.

    Started on first use; with ``start=False``, None unless one is running.

    Raises:
        TypeError/ValueError: ``backend`` is not a backend name or object.
    """
    check_bool(start, "start")
    key = resolve(backend)  # "local", None and LocalBackend() are one key; equal configs too
    with _lock:
        sup = _defaults.get(key)
        if sup is None or sup.closed:
            if not start:
                return None
            sup = _defaults[key] = Supervisor(backend=backend)
        return sup


def _default(backend: Any) -> Supervisor:
    return default_supervisor(backend)


def async_(
    fn: Callable[..., T], *args: Any, backend: Any = None, node: str | None = None
) -> Task[T]:
    """Run ``fn(*args)`` in a worker and return a linked ``Task``.

    Example::

        task = parstream.async_(sum, [1, 2, 3])
        assert task.await_() == 6
    """
    return _default(backend).async_(fn, *args, node=node)


def start(
    fn: Callable[..., Any], *args: Any, backend: Any = None, node: str | None = None
) -> None:
    """Fire and forget ``fn(*args)``; a failure is logged on the ``parstream`` logger."""
    _default(backend).start(fn, *args, node=node)


def async_stream(
    fn: Callable[..., T],
    iterable: Iterable[Any],
    *,
    backend: Any = None,
    **options: Unpack[StreamOptions],
) -> Stream[T]:
    """``Supervisor.async_stream`` on the default supervisor of ``backend``.

    Example::

        for result in parstream.async_stream(slow_square, range(100)):
            match result:
                case parstream.Ok(value): print(value)
    """
    return _default(backend).async_stream(fn, iterable, **options)


def async_stream_nolink(
    fn: Callable[..., T],
    iterable: Iterable[Any],
    *,
    backend: Any = None,
    **options: Unpack[StreamOptions],
) -> Stream[T]:
    """``Supervisor.async_stream_nolink`` on the default supervisor of ``backend``."""
    return _default(backend).async_stream_nolink(fn, iterable, **options)


def map(
    fn: Callable[..., T],
    iterable: Iterable[Any],
    *,
    backend: Any = None,
    **options: Unpack[MapOptions],
) -> _Values[T]:
    """Parallel, lazy ``map``: values in input order, raising the first failure.

    The drop-in for a slow ``for`` loop. ``timeout`` is per item (unlike
    ``Supervisor.map``, the ``concurrent.futures`` one, where it is one
    deadline). Options as for ``async_stream``, less ``zip_input_on_exit``.

    Example::

        squares = list(parstream.map(slow_square, range(100), progress=True))
    """
    return _default(backend).stream_map(fn, iterable, **options)


def restart_workers(backend: Any = None) -> None:
    """Replace the default supervisor's workers (after editing a module they use)."""
    _default(backend).restart_workers()


for _function, _options in (
    (async_stream, StreamOptions),
    (async_stream_nolink, StreamOptions),
    (map, MapOptions),
):
    document_options(_function, _options.__annotations__)
del _function, _options
