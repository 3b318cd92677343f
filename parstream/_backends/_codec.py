"""How a task's exception travels from wherever it ran, for every backend.

``failure(exc)`` captures an exception and its traceback text where it was
raised; ``PackedError`` carries that pair through pickle whatever the
exception is made of; ``rebuild(payload)`` gives back the exception, ready
to raise, with the remote traceback as its ``__cause__`` (the convention of
``concurrent.futures`` and loky). An exception that cannot be pickled where
it was raised, or not be rebuilt where it arrives, comes back as a
``RemoteError`` that keeps its type's name, message and traceback.
"""

from __future__ import annotations

import _pickle as pickle  # the C module: the pure one imports re (a worker start; issue 12)

from parstream._errors import RemoteError, RemoteTraceback, argument_not_pickled

TYPE_CHECKING = False  # see parstream/__init__.py
if TYPE_CHECKING:
    from typing import Any

PROTOCOL = 5

Failure = tuple[BaseException, str]


def dumps(obj: Any, buffer_callback: Any = None) -> bytes:
    """Pickle with cloudpickle, so lambdas, closures and ``__main__`` code
    travel; ``buffer_callback`` as ``pickle.dumps``'s (out-of-band buffers).

    cloudpickle is imported on first use: a worker starts without it (~10 ms
    of every worker start, issue 12) until it needs it.
    """
    import io

    file = io.BytesIO()
    cloud_pickler()(file, protocol=PROTOCOL, buffer_callback=buffer_callback).dump(obj)
    return file.getvalue()


_DYNAMIC_FILE = "<dynamic-code>"
_cloud_pickler: Any = None


def cloud_pickler() -> Any:
    """cloudpickle's ``Pickler``, keeping the file name of the code it sends by
    value (a function from ``__main__``, a notebook cell, a lambda).

    cloudpickle 3.1.2 and later name every such code object's file
    ``<dynamic-code>``, so a task's traceback said ``File "<dynamic-code>",
    line 5`` where ``ProcessPoolExecutor``'s names the script and shows the
    line. The class is made on first use (it imports cloudpickle).
    """
    global _cloud_pickler
    if _cloud_pickler is None:
        import sys
        import types
        from collections import ChainMap

        import cloudpickle

        # In a spawn or forkserver child of multiprocessing the main script is
        # loaded again as ``__mp_main__``, a module no worker of ours has: its
        # functions and classes go by value, as ``__main__``'s do.
        mp_main = sys.modules.get("__mp_main__")
        if mp_main is not None:
            try:
                cloudpickle.register_pickle_by_value(mp_main)
            except (ValueError, TypeError):  # pragma: no cover - not a registrable module
                pass

        base = cloudpickle.Pickler
        reduce_code = base.dispatch_table.get(types.CodeType)
        if reduce_code is None:  # pragma: no cover - a cloudpickle that pickles code otherwise
            _cloud_pickler = base
            return base

        def keep_file_name(code: types.CodeType) -> Any:
            rebuild, args = reduce_code(code)
            return rebuild, tuple(
                code.co_filename if type(a) is str and a == _DYNAMIC_FILE else a for a in args
            )

        class _Pickler(base):  # type: ignore[misc, valid-type]
            dispatch_table = ChainMap({types.CodeType: keep_file_name}, base.dispatch_table)

        _cloud_pickler = _Pickler
    return _cloud_pickler


def warm_up() -> None:
    """Import cloudpickle now (a parent does, while its first workers start)."""
    import cloudpickle  # noqa: F401


def failure(exc: BaseException) -> Failure:
    """``(exc, traceback_text)``, dropping the live traceback (it holds frames).

    ``traceback`` is imported on the first failure: a worker starts without
    it (~2 ms of every start, issue 12). A worker with no free descriptor
    (a task leaked them) cannot open the module's file: the failure then
    goes without its traceback rather than the worker dying of it."""
    try:
        import traceback
    except (ImportError, OSError) as why:
        chain: list[str] = []
        seen: set[int] = set()
        link: BaseException | None = exc
        while link is not None and id(link) not in seen:
            seen.add(id(link))
            chain.append(f"{type(link).__name__}: {_text_of(link)}")
            link = link.__cause__ or link.__context__
        exc.__traceback__ = None
        lines = "\n".join(reversed(chain))  # the cause first, as a traceback shows it
        return exc, f"(the worker could not format the traceback: {why!r})\n{lines}\n"
    tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    exc.__traceback__ = None
    return exc, tb


def rebuild(payload: Failure) -> BaseException:
    """The exception of ``payload``, with its remote traceback as ``__cause__``."""
    exc, tb = payload
    if tb and not isinstance(exc.__cause__, RemoteTraceback):
        exc.__cause__ = RemoteTraceback(_with_local_source(tb))
    return exc


_FRAME_LINE = r'^  File "(?P<file>[^"]+)", line (?P<line>\d+), in '


def _with_local_source(tb: str) -> str:
    """The worker's traceback text, with the source line of each frame the
    worker could not show but this process holds in memory: a notebook
    cell's code (its function travels by value) lives only in the kernel's
    ``linecache``, so the worker printed its frames bare. Only frames of
    the traceback proper are looked at (never lines of an exception's
    message), and only in ``linecache``'s memory, never on disk: this runs
    on the hub thread, which must not block on a file a message names."""
    if '", line ' not in tb:
        return tb
    try:
        import linecache
        import re  # here: workers import this module, and never rebuild

        cache = linecache.cache
        lines = tb.splitlines(keepends=True)
        out: list[str] = []
        in_frames = False
        for i, line in enumerate(lines):
            out.append(line)
            if line.startswith("Traceback (most recent call last):"):
                in_frames = True
                continue
            if not line.startswith("  "):
                in_frames = False  # the exception and its message
                continue
            m = re.match(_FRAME_LINE, line) if in_frames else None
            if m is None:
                continue
            following = lines[i + 1] if i + 1 < len(lines) else ""
            if following.startswith("    "):
                continue  # the worker showed it
            entry = cache.get(m["file"])
            number = int(m["line"])
            if entry is None or len(entry) < 3 or not 0 < number <= len(entry[2]):
                continue
            source = str(entry[2][number - 1]).strip()
            if source:
                out.append(f"    {source}\n")
        return "".join(out)
    except Exception:  # never at the cost of the task's own error
        return tb


def type_name(cls: type) -> str:
    module = getattr(cls, "__module__", None)
    name = str(getattr(cls, "__qualname__", None) or getattr(cls, "__name__", "?"))
    return name if module in (None, "builtins") else f"{module}.{name}"


def _text_of(exc: BaseException) -> str:
    try:
        return str(exc)
    except BaseException as cause:
        return f"<str() of the exception raised {type(cause).__name__}>"


class PackedError:
    """A task's exception ready to travel, with a text fallback.

    The exception is pickled on its own, next to its type's name, its message
    and the traceback text; whatever the payload around it, unpickling a
    ``PackedError`` yields ``(exception, traceback_text)`` and never raises.
    """

    __slots__ = ("fields",)

    def __init__(self, exc: BaseException, tb: str) -> None:
        try:
            data: bytes | None = dumps(exc)
            reason = ""
        except (ImportError, OSError) as cause:
            # cloudpickle not imported yet, and no descriptor to import it
            # with (a task leaked them): the C pickler has what it needs.
            try:
                data, reason = pickle.dumps(exc, PROTOCOL), ""
            except BaseException:
                data, reason = None, f"could not be pickled in the worker: {cause!r}"
        except BaseException as cause:
            data = None
            reason = f"could not be pickled in the worker: {cause!r}"
        self.fields = (data, type_name(type(exc)), _text_of(exc), tb, reason)

    def __reduce__(self) -> tuple[Any, ...]:
        return (_unpack_error, self.fields)


def _unpack_error(data: bytes | None, name: str, message: str, tb: str, reason: str) -> Failure:
    if data is not None:
        try:
            exc = pickle.loads(data)
        except BaseException as cause:
            reason = f"could not be unpickled in the parent: {cause!r}"
        else:
            if isinstance(exc, BaseException):
                return exc, tb
            reason = f"was unpickled in the parent as a {type_name(type(exc))}"
    return RemoteError(name, message, reason), tb


def pack_error(payload: Failure) -> PackedError:
    return PackedError(*payload)


class BadArgs:
    """Stands in for an item whose arguments could not be pickled in the parent.

    The worker reports ``error`` for that item without running it, so results
    stay in input order and every item gets exactly one.
    """

    __slots__ = ("error",)

    def __init__(self, error: BaseException) -> None:
        self.error = error

    def __reduce__(self) -> tuple[Any, ...]:
        return (BadArgs, (self.error,))


def culprit_error(args: tuple[Any, ...], cause: BaseException) -> BaseException:
    """The error for an item whose arguments could not be pickled, naming the
    first argument that fails."""
    culprit = "the arguments"
    for i, arg in enumerate(args):
        try:
            dumps(arg)
        except BaseException:
            culprit = f"argument {i} ({type(arg).__qualname__})"
            break
    return argument_not_pickled(culprit, cause)


def pickling_error(fn: Any, cause: BaseException) -> pickle.PicklingError:
    """``prepare``'s error for a function that cannot travel, naming it."""
    name = getattr(fn, "__qualname__", type(fn).__qualname__)
    err = pickle.PicklingError(f"fn ({name}) could not be pickled: {cause!r}")
    err.__cause__ = cause
    return err
