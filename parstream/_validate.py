"""Argument checks shared by every public entry point: one place, one wording.

Each check raises ``TypeError`` for a wrong type and ``ValueError`` for a
wrong value, naming the parameter, at call time.
"""

from __future__ import annotations

import math
from typing import Any


def check_callable(fn: Any, name: str = "fn") -> None:
    if not callable(fn):
        raise TypeError(f"{name} must be callable, got {type(fn).__name__}: {fn!r}")


def check_int(value: Any, name: str, minimum: int, *, allow_none: bool = True) -> int | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int{' or None' if allow_none else ''}, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def check_timeout(value: Any, name: str, *, allow_none: bool = True) -> Any:
    """A number of seconds >= 0, as a float (or ``None``). ``inf`` means no
    limit: it becomes ``None`` where ``None`` is allowed, and stays ``inf``
    elsewhere (see ``wait_seconds``). NaN is refused."""
    if value is None:
        if allow_none:
            return None
        raise TypeError(f"{name} must be a number of seconds, got None")
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{name} must be a number of seconds or None, got {value!r}")
    if isinstance(value, float) and math.isnan(value):
        raise ValueError(f"{name} must be a number of seconds, got NaN")
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value!r}")
    if math.isinf(value) and allow_none:
        return None
    return float(value)


def wait_seconds(timeout: float | None) -> float | None:
    """A checked timeout as ``threading`` waits take it (no limit is ``None``)."""
    if timeout is None or math.isinf(timeout):
        return None
    return timeout
