"""Shipping a user's function to workers: one way, for every entry point.

``ship(fn)`` pickles the function once, in the caller's thread (so a function
that cannot be pickled fails at call time, named), and gives it a key: 16
random bytes, so no other process (a forked child, another pool) can produce a
key that a worker would mistake for one of ours. Workers cache unpickled
functions by key; the pool sends the bytes only to workers that lack the key.

* A plain importable function or builtin (``math.sqrt``, ``mymod.work``)
  pickles by reference to a few bytes; those bytes map to one key, so every
  task and stream of it shares the workers' cached copy. Only the reference
  is kept here, never user data.
* Anything else (lambdas, closures, ``__main__`` or notebook code, bound
  methods, ``functools.partial``, callable instances) goes by value with
  cloudpickle and gets a fresh key per call, so it sees the state of the
  moment and its bytes die with its task or stream.
"""

from __future__ import annotations

import _pickle as pickle  # the C module (the pure one costs ~2 ms before the first fork)
import os
import types
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from parstream._backends._codec import PROTOCOL, dumps, pickling_error

if TYPE_CHECKING:
    from collections.abc import Callable

_BY_REFERENCE_LIMIT = 1024


@dataclass(frozen=True, slots=True, weakref_slot=True)
class Shipped:
    """A function ready to send: its key and its pickled bytes."""

    key: bytes
    data: bytes


_by_reference: dict[bytes, Shipped] = {}


def _new_key() -> bytes:
    return os.urandom(16)


def _importable(fn: Any) -> bool:
    if type(fn) not in (types.FunctionType, types.BuiltinFunctionType):
        return False
    owner = getattr(fn, "__self__", None)
    if owner is not None and not isinstance(owner, types.ModuleType):
        return False  # a builtin bound to an object, e.g. ``[].append``
    module = getattr(fn, "__module__", None)
    qualname = getattr(fn, "__qualname__", "<")
    # ``__mp_main__``: the main script, loaded again in a spawn child of
    # multiprocessing; our workers have no such module (see ``_codec``).
    return module not in (None, "__main__", "__mp_main__") and "<" not in qualname


def ship(fn: Callable[..., Any]) -> Shipped:
    """Pickle ``fn`` now; raise ``pickle.PicklingError`` naming it if that fails."""
    if _importable(fn):
        try:
            data = pickle.dumps(fn, protocol=PROTOCOL)
        except Exception:
            pass
        else:
            shipped = _by_reference.get(data)
            if shipped is None:
                if len(_by_reference) >= _BY_REFERENCE_LIMIT:
                    _by_reference.clear()
                shipped = _by_reference[data] = Shipped(_new_key(), data)
            return shipped
    try:
        return Shipped(_new_key(), dumps(fn))
    except Exception as cause:
        raise pickling_error(fn, cause) from cause


def _reset_after_fork() -> None:
    _by_reference.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_after_fork)
