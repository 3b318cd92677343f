"""The local backend: worker processes on this machine.

Modules: ``_pool`` (the engine and its hub thread), ``_spawn`` (starting
workers, failed starts, killing a process tree), ``_messages`` (the hub's
reading of worker messages), ``_worker`` (the child's loop), ``_wire`` (the
message format), ``_slot`` (a worker's progress slot in shared memory),
``_reaper`` (kills every worker group if the parent dies), ``_functions``
(shipping a user's function once per worker).

This module stays light: worker processes import it on their way to
``_worker``; the engine is imported only when a Supervisor opens one.
"""

from __future__ import annotations

TYPE_CHECKING = False  # see parstream/__init__.py

if TYPE_CHECKING:
    from parstream._backend import Backend, Settings


class LocalBackend:
    """Worker processes on this machine (the default backend).

    Each worker is a fresh Python process (loky's context, no fork of the
    parent), in a process group of its own, killed with its whole tree on a
    timeout or a kill, replaced when it dies, and never outliving the parent.
    Every promise of the backend contract holds, with exact crash attribution.

    Example::

        sup = parstream.Supervisor(backend=parstream.LocalBackend())
    """

    # A plain class, not a dataclass: workers import this module, and
    # dataclasses costs them ~10 ms at every start.
    name = "local"

    def __eq__(self, other: object) -> bool:
        return type(other) is LocalBackend

    def __hash__(self) -> int:
        return hash(LocalBackend)

    def __repr__(self) -> str:
        return "LocalBackend()"

    def open(self, settings: Settings) -> Backend:
        from parstream._backend import cpu_count
        from parstream._backends.local._pool import LocalPool

        return LocalPool(settings, settings.max_workers or cpu_count())
