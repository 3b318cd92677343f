"""What runs on a Ray worker: one slice of a job, as a streaming generator.

``run_slice`` is the one remote function of the Ray backend (its wrapper is
made once per process, not per user function); the user's function travels
as a reference to its cloudpickled bytes and is unpickled once per worker
process (``_functions``). It yields, in order::

    ("start", pid, node_id)           first, before anything else
    ("loaded",)                       the function and the items were loaded (a
                                      slice of several items, or a timed one whose
                                      function was not cached): a death before it
                                      is no item's, and the items are run one at a
                                      time to find the one whose loading kills
    ("results", frame, window, secs)  the next items' outcomes (``_frames``) and
                                      how long they ran
    ("init_failed", packed_error)     the Supervisor's initializer raised here
    ("fn_failed", packed_error)       the function cannot be loaded here
    ("bad", packed_error)             the items could not be unpickled here
    ("returned",)                     it stopped at its time budget; the rest is unrun
                                      (never for a ``whole`` slice: a job that is
                                      not returnable)

Items run in order, each exception failing its item alone. A slice with a
per-item timeout (``each``), and items that take ``EACH_MIN_S`` or more, send
one result per item, so the driver always knows which item was running when
the worker died. Tinier items are sent in flushes of at most ``window``
items (about ``FLUSH_INTERVAL_S`` of work), the window announced in the
frame before: a death is then placed within one window (``_dispatch.Death``).

This module is imported on the workers: it needs only ``ray``, ``_codec`` and
``_frames``.
"""

from __future__ import annotations

import collections
import os
import pickle
import time
from typing import TYPE_CHECKING, Any

from parstream._backends import _codec, _frames

if TYPE_CHECKING:
    from collections.abc import Iterator

FLUSH_INTERVAL_S = 0.02  # a flush per item costs a yield (~140 us); longer delays results
# Items this slow are sent one by one, each send waiting for the driver to
# take it (about 0.3 ms), so a death is placed exactly and nothing runs twice;
# faster ones go in windows of about FLUSH_INTERVAL_S, and those of a window
# that finished before a death run again (at most one window).
EACH_MIN_S = 0.005
BATCH_BUDGET_S = 0.06  # past this, a slice stops and gives back its unrun rest
FN_CACHE_SIZE = 32
MAX_WINDOW = 4096  # items per flush at most: bounds what a crash makes run again

_functions: collections.OrderedDict[bytes, Any] = collections.OrderedDict()
_initialized: set[bytes] = set()
_FORKED = [False]  # this process was forked by a task (set in the child at the fork)


def _forked_by_a_task() -> None:
    _FORKED[0] = True


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forked_by_a_task)

MODULE_HINT = (
    "; the code this task needs is not importable on the Ray worker: ship it with "
    "parstream.RayBackend(runtime_env={'working_dir': '.'}) or "
    "runtime_env={'py_modules': [your_module]}, or install it on every node"
)


def _load(key: bytes, box: list[Any]) -> Any:
    fn = _functions.get(key)
    if fn is not None:
        _functions.move_to_end(key)
        return fn
    import ray

    data = box[0]
    if not isinstance(data, bytes):
        data = ray.get(data)
    fn = pickle.loads(data)
    _functions[key] = fn
    while len(_functions) > FN_CACHE_SIZE:
        _functions.popitem(last=False)
    return fn


def _with_hint(exc: BaseException) -> BaseException:
    if isinstance(exc, ModuleNotFoundError):
        exc.add_note(MODULE_HINT[2:])
        exc.msg = f"{exc.msg}{MODULE_HINT}"
    return exc


def run_slice(
    key: bytes,
    box: list[Any],
    items_bytes: bytes,
    star: bool,
    each: bool,
    has_bad: bool,
    init: tuple[bytes, list[Any]] | None,
    whole: bool = False,
) -> Iterator[tuple[Any, ...]]:
    import ray

    yield ("start", os.getpid(), ray.get_runtime_context().get_node_id())
    if init is not None and init[0] not in _initialized:
        try:
            init_fn, init_args = _load(init[0], init[1])
            init_fn(*init_args)
        except BaseException as exc:
            yield ("init_failed", _codec.pack_error(_codec.failure(_with_hint(exc))))
            return
        _initialized.add(init[0])
    try:
        cached = key in _functions
        fn = _load(key, box)
    except BaseException as exc:
        # Neither the function nor its initializer can run here: every item
        # fails with that cause, and the worker stays healthy.
        yield ("fn_failed", _codec.pack_error(_codec.failure(_with_hint(exc))))
        return
    try:
        items = pickle.loads(items_bytes)
    except BaseException as exc:
        yield ("bad", _codec.pack_error(_codec.failure(_with_hint(exc))))
        return
    if (each and not cached) or len(items) > 1:
        yield ("loaded",)
    bad = _codec.BadArgs if has_bad else None

    def call(args: Any) -> Any:
        if bad is not None and type(args) is bad:
            raise args.error
        return fn(*args) if star else fn(args)

    yield from _run(call, items, each, float("inf") if whole else BATCH_BUDGET_S)


def _run(call: Any, items: list[Any], each: bool, budget: float) -> Iterator[tuple[Any, ...]]:
    monotonic = time.monotonic
    started = last = now = monotonic()
    values: list[Any] = []
    errors: dict[int, Any] = {}
    window = 0  # announced in the last frame: 0, one result per item; else at most this many
    total = len(items)
    forked = _FORKED
    for position, args in enumerate(items):
        begun = now
        try:
            values.append(call(args))
        except BaseException as exc:
            errors[len(values)] = _codec.failure(_with_hint(exc))
            values.append(None)
        if forked[0]:
            # A process the task forked returned from it: it ends here, as on
            # the local backend, rather than carry on as a second copy of the
            # slice that Ray knows nothing of (it outlived the Supervisor).
            os._exit(0)
        finished = position + 1 == total
        now = monotonic()
        if (
            window
            and not finished
            and len(values) < window
            and now - last < FLUSH_INTERVAL_S
            and now - begun < EACH_MIN_S
        ):
            # An item of EACH_MIN_S or more is flushed at once, even in a
            # window set by faster items before it: a crash then runs again
            # only items faster than that (the README's exactly-once bound).
            continue
        per_item = (now - last) / len(values)
        if each or finished or per_item >= EACH_MIN_S:
            window = 0
        else:
            window = max(1, min(MAX_WINDOW, int(FLUSH_INTERVAL_S / max(per_item, 1e-7))))
        frame = _frames.dumps_results(finished, now, values, errors)
        yield ("results", frame, window, now - last)
        values, errors = [], {}
        last = now
        if not finished and now - started >= budget:
            yield ("returned",)
            return
