"""Argument checks for every public entry point: one place, one wording.

Each check raises ``TypeError`` for a wrong type and ``ValueError`` for a
wrong value, naming the parameter, at call time. ``Options`` is the one
record of a stream's options (``async_stream``, ``async_stream_nolink``,
``map`` and their Supervisor twins take them as ``**options``), validated as
a whole by ``Options.of``.
"""

from __future__ import annotations

import functools
import math
import operator
import sys
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, fields
from typing import Any, Literal, TypedDict, overload

OnTimeout = Literal["exit", "kill_task"]


# Code flags (``inspect.CO_*``; ``inspect`` itself costs ~10 ms to import).
_MAKES = {0x80: "a coroutine", 0x200: "an async generator", 0x20: "a generator"}


def shown(value: Any, limit: int = 200) -> str:
    """``repr(value)`` for an error message: cut short, and never raising
    (an object whose ``__repr__`` fails must not hide the real error)."""
    try:
        text = repr(value)
    except Exception:
        return f"<{type(value).__name__} object>"
    return text if len(text) <= limit else text[:limit] + "..."


def check_callable(fn: Any, name: str = "fn") -> None:
    """``fn`` is callable, and not a function whose calls make a coroutine
    or generator: a worker would get an object that cannot travel back (a
    coroutine never awaited, on the local and Ray backends) or hand back
    something unrun (in-process), whatever the items."""
    if not callable(fn):
        raise TypeError(f"{name} must be callable, got {type(fn).__name__}: {shown(fn)}")
    inner = fn
    while isinstance(inner, functools.partial):
        inner = inner.func
    target = getattr(inner, "__func__", inner)
    code = getattr(target, "__code__", None)
    if code is None and not isinstance(inner, type):
        # An instance whose class defines ``async def __call__`` (or a generator one).
        call = type(inner).__call__
        code = getattr(getattr(call, "__func__", call), "__code__", None)
    flags = getattr(code, "co_flags", 0)
    for flag, what in _MAKES.items():
        if isinstance(flags, int) and flags & flag:
            label = getattr(inner, "__qualname__", None) or shown(inner)
            raise TypeError(
                f"{name} ({label}) returns {what} when called, which parstream would not run: "
                "a worker calls the function and sends back what it returns. Pass a plain "
                "function (for an async one, e.g. one that calls asyncio.run on it)"
            )


def check_iterable(value: Any, name: str) -> None:
    if isinstance(value, Iterable):
        return
    if hasattr(type(value), "__getitem__"):
        # The old sequence protocol (items 0, 1, ... up to IndexError), which
        # a for loop, map() and Executor.map take too: iter() makes its
        # iterator without calling __getitem__, and refuses ``__iter__ = None``.
        try:
            iter(value)
        except TypeError:
            pass
        else:
            return
    raise TypeError(f"{name} must be iterable, got {type(value).__name__}")


def check_bool(value: Any, name: str) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {shown(value)}")
    return value


def check_choice(value: Any, name: str, choices: tuple[str, ...]) -> Any:
    if value not in choices:
        wanted = ", ".join(repr(c) for c in choices[:-1]) + f" or {choices[-1]!r}"
        raise ValueError(f"{name} must be {wanted}, got {shown(value)}")
    return value


def _integral(value: Any) -> int | None:
    """``value`` as an ``int`` if it is an integer (numpy's included), not a bool."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return int(value)
    import numbers  # (not at import: ~1 ms of every start)

    if isinstance(value, numbers.Integral):
        return int(operator.index(value))
    return None


def real_number(value: Any) -> float | int | None:
    """``value`` as an ``int`` or ``float`` if it is a real number (numpy's
    included), not a bool."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return value
    import numbers

    if isinstance(value, numbers.Integral):
        return operator.index(value)
    if isinstance(value, numbers.Real):
        return float(value)
    return None


@overload
def check_int(value: Any, name: str, minimum: int, *, allow_none: Literal[False]) -> int: ...


@overload
def check_int(value: Any, name: str, minimum: int, *, allow_none: bool = True) -> int | None: ...


def check_int(value: Any, name: str, minimum: int, *, allow_none: bool = True) -> int | None:
    """An int >= ``minimum`` (or ``None``), as an ``int``: numpy's integers are
    taken, as the standard library takes them; bools are refused."""
    if value is None and allow_none:
        return None
    number = _integral(value)
    if number is None:
        kinds = "an int or None" if allow_none else "an int"
        raise TypeError(f"{name} must be {kinds}, got {shown(value)}")
    if number < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {number}")
    if number > sys.maxsize:  # islice, range and the like refuse more
        raise ValueError(f"{name} must be <= sys.maxsize ({sys.maxsize}), got {number}")
    return number


def check_timeout(value: Any, name: str, *, allow_none: bool = True) -> Any:
    """A number of seconds >= 0, as a float (or ``None``). ``inf`` means no
    limit: it becomes ``None`` where ``None`` is allowed, and stays ``inf``
    elsewhere (see ``wait_seconds``). NaN is refused."""
    if value is None:
        if allow_none:
            return None
        raise TypeError(f"{name} must be a number of seconds, got None")
    given = value
    value = real_number(value)
    if value is None:
        what = "a number of seconds or None" if allow_none else "a number of seconds"
        raise TypeError(f"{name} must be {what}, got {shown(given)}")
    if isinstance(value, float) and math.isnan(value):
        raise ValueError(f"{name} must be a number of seconds, got NaN")
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {shown(given)}")
    try:
        seconds = float(value)
    except OverflowError:  # an int beyond any float: as good as no limit
        seconds = math.inf
    if math.isinf(seconds) and allow_none:
        return None
    return seconds


def check_positive_seconds(value: Any, name: str) -> float:
    """A number of seconds > 0 (``inf`` allowed)."""
    real = real_number(value)
    if real is not None and not (isinstance(real, float) and math.isnan(real)) and real <= 0:
        raise ValueError(f"{name} must be > 0, got {shown(value)}")  # (not ">= 0" for -1)
    seconds: float = check_timeout(value, name, allow_none=False)
    if seconds <= 0:
        raise ValueError(f"{name} must be > 0, got {shown(value)}")
    return seconds


def check_node(value: Any) -> str | None:
    if value is not None and not isinstance(value, str):
        raise TypeError(f"node must be a node id or label value (str) or None, got {shown(value)}")
    return value


# A wait that wakes this long after its deadline was not let run (the process
# stopped by Ctrl-Z or SIGSTOP, a suspended VM): the backend's event thread,
# woken at the same moment, may hold results that came meanwhile. It gets
# STALL_GRACE_S to hand them over before the timeout is acted on (a finished
# task killed, a map's results refused).
STALL_S = 0.25
STALL_GRACE_S = 0.2


def stalled(deadline: float) -> bool:
    """Whether a wait for ``deadline`` woke so late that this process cannot
    have been running (see ``STALL_S``)."""
    return time.monotonic() - deadline > STALL_S


def wait_seconds(timeout: float | None) -> float | None:
    """A checked timeout as ``threading`` waits take it: no limit is ``None``,
    and a finite one beyond ``threading.TIMEOUT_MAX`` (~292 years), which
    those waits refuse with ``OverflowError``, is cut to it."""
    if timeout is None or math.isinf(timeout):
        return None
    return min(timeout, threading.TIMEOUT_MAX)


class StreamOptions(TypedDict, total=False):
    """The options of ``async_stream``/``async_stream_nolink`` (see ``Options``)."""

    max_concurrency: int | None
    ordered: bool
    timeout: float | None
    on_timeout: OnTimeout
    zip_input_on_exit: bool
    progress: Any
    chunksize: int | None
    buffer_size: int | None
    node: str | None


class MapOptions(TypedDict, total=False):
    """The options of ``parstream.map`` (``async_stream``'s, less ``zip_input_on_exit``)."""

    max_concurrency: int | None
    ordered: bool
    timeout: float | None
    on_timeout: OnTimeout
    progress: Any
    chunksize: int | None
    buffer_size: int | None
    node: str | None


@dataclass(frozen=True, slots=True)
class Options:
    """A stream's options, validated.

    Attributes:
        max_concurrency: items running at once (default: the supervisor's
            ``max_workers``); may exceed the cores, for I/O-bound items.
        ordered: yield in input order (True) or completion order.
        timeout: per item; the item's worker is killed and replaced on
            overrun (from the item's start, or from dispatch on a backend
            that cannot know the start).
        on_timeout: ``"exit"`` raises ``TaskTimeout`` from the iterator;
            ``"kill_task"`` yields ``Exit(TaskTimeout)`` and goes on.
        zip_input_on_exit: put the input item on every ``Exit``.
        progress: True, a dict of tqdm options, or a tqdm instance.
        chunksize: items per message to a worker; None adapts it to the
            measured cost per item (1 while items are slow).
        buffer_size: results that may wait behind a slow head item (or a
            slow consumer) before pulling stops; default
            ``4 * max_concurrency * chunk``.
        node: run every item on this node (backends with nodes).
    """

    max_concurrency: int | None = None
    ordered: bool = True
    timeout: float | None = None
    on_timeout: OnTimeout = "exit"
    zip_input_on_exit: bool = False
    progress: Any = False
    chunksize: int | None = None
    buffer_size: int | None = None
    node: str | None = None

    @classmethod
    def of(cls, given: Mapping[str, Any], *, allowed: Iterable[str] | None = None) -> Options:
        """Validate keyword options; ``allowed`` limits which names are taken."""
        names = {f.name for f in fields(cls)} if allowed is None else set(allowed)
        for name in given:
            if name not in names:
                raise TypeError(
                    f"unexpected keyword argument {name!r}; the options are "
                    + ", ".join(sorted(names))
                )
        opts = cls(**given)
        for name in ("max_concurrency", "chunksize", "buffer_size"):
            value = getattr(opts, name)
            checked = check_int(value, name, 0 if name == "buffer_size" else 1)
            if checked is not value:
                object.__setattr__(opts, name, checked)
        check_bool(opts.ordered, "ordered")
        timeout = check_timeout(opts.timeout, "timeout")
        if timeout == 0:
            raise ValueError("timeout must be > 0 or None, got 0")
        check_choice(opts.on_timeout, "on_timeout", ("exit", "kill_task"))
        check_bool(opts.zip_input_on_exit, "zip_input_on_exit")
        check_progress(opts.progress)
        check_node(opts.node)
        if timeout != opts.timeout:
            object.__setattr__(opts, "timeout", timeout)
        return opts


def document_options(fn: Any, names: Iterable[str]) -> Any:
    """Give ``fn``, which takes its stream options as ``**options``, the
    signature the README documents: each option a keyword-only parameter with
    its default, so ``help()``, ``inspect.signature`` and editors show them."""
    import inspect  # already imported by dataclasses

    sig = inspect.signature(fn)
    params = [p for p in sig.parameters.values() if p.kind is not p.VAR_KEYWORD]
    defaults = {f.name: f.default for f in fields(Options)}
    params += [
        inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, default=defaults[n]) for n in names
    ]
    fn.__signature__ = sig.replace(parameters=params)
    return fn


def check_progress(value: Any) -> Any:
    """``progress`` is True, False, a dict of tqdm options, or a tqdm-like bar."""
    if value is True or value is False:
        return value
    if isinstance(value, dict):
        unknown = [k for k in value if not isinstance(k, str) or k not in _tqdm_options()]
        if unknown:
            raise TypeError(f"progress: not a tqdm option: {', '.join(map(repr, unknown))}")
        _try_bar(value)
        return value
    if isinstance(value, type):
        # tqdm.tqdm itself has update and close too: as an instance it would
        # fail at the first item, and set a total on the class for good.
        raise TypeError(
            f"progress takes a bar, not a bar class: pass {value.__name__}(...) (a tqdm "
            f"instance), or True or a dict of options for parstream's own bar; got {shown(value)}"
        )
    if hasattr(value, "update") and hasattr(value, "close"):
        return value
    raise TypeError(
        "progress must be True, False, a dict of tqdm options or a tqdm instance, "
        f"got {shown(value)}"
    )


def _try_bar(options: dict[str, Any]) -> None:
    """Draw and close a throwaway text bar with ``options``: tqdm checks most
    of its options only when it draws, so a bad value (``ncols="x"``) failed
    at the stream's first ``next()``, naming nothing of ours. The bar writes
    to memory, so ``file`` and ``write_bytes`` are checked here instead; the
    widget's ``display`` is left out (a text bar has none)."""
    import io
    import warnings

    _check_bar_file(options)
    left_out = ("file", "write_bytes", "display", "disable")
    trial = {k: v for k, v in options.items() if k not in left_out}
    trial.setdefault("total", 2)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tqdm's own warnings come with the real bar
            bar = _trial_bar_class()(file=io.StringIO(), **trial)
            bar.update(1)
            bar.refresh()
            bar.close()
    except Exception as exc:
        kind = ValueError if isinstance(exc, ValueError) else TypeError
        raise kind(f"progress: tqdm refused the options {shown(options)}: {exc}") from exc


def _check_bar_file(options: dict[str, Any]) -> None:
    """``file`` is a text stream (or, with ``write_bytes=True``, a binary
    one) and ``write_bytes`` a bool: tqdm finds out only when it first
    writes, in the consumer's thread, holding its lock."""
    import io

    write_bytes = options.get("write_bytes", False)
    if write_bytes is not None and not isinstance(write_bytes, bool):
        raise TypeError(f"progress: write_bytes must be a bool, got {shown(write_bytes)}")
    if "file" not in options or options["file"] is None:
        return
    file = options["file"]
    if not callable(getattr(file, "write", None)):
        raise TypeError(f"progress: file must have a write() method, got {shown(file)}")
    binary = isinstance(file, io.RawIOBase | io.BufferedIOBase)
    if binary and not write_bytes:
        raise TypeError(
            f"progress: file {shown(file)} takes bytes: pass write_bytes=True, or a text stream"
        )


def _trial_bar_class() -> Any:
    """tqdm's text bar for one trial, with a lock and a set of bars of its
    own: tqdm takes its class-wide lock to draw and does not let go of it
    when drawing raises, so a refused option left every later bar, in any
    other thread, waiting for that lock for good (and a trial bar must not
    take a place among the user's bars)."""
    import threading
    import weakref

    attrs = {"_lock": threading.RLock(), "_instances": weakref.WeakSet()}
    return type("TrialBar", (_trial_bar_base(),), attrs)


@functools.cache
def _trial_bar_base() -> Any:
    """tqdm's text bar, less its finaliser (a bar whose ``__init__`` failed
    half-way would print an error from ``__del__`` when collected) and its
    monitor thread."""
    from tqdm.std import tqdm

    class TrialBar(tqdm):  # type: ignore[misc]
        monitor_interval = 0

        def __del__(self) -> None:
            pass

    return TrialBar


def _tqdm_options() -> frozenset[str]:
    """The keyword options a tqdm bar takes (the notebook's also ``display``)."""
    import inspect

    from tqdm.std import tqdm

    params = inspect.signature(tqdm.__init__).parameters.values()
    named = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    return frozenset(named - {"self"} | {"display"})
