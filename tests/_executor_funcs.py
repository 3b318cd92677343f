"""Functions for tests/test_executor.py, importable so ProcessPoolExecutor can pickle them."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

_STATE: Any = None


def square(x: int) -> int:
    return x * x


def add(a: int, b: int) -> int:
    return a + b


def with_kwargs(a: int, *, b: int = 0, c: int = 0) -> tuple[int, int, int]:
    return (a, b, c)


def fail_at(x: int, bad: int) -> int:
    if x == bad:
        raise ValueError(f"bad item {x}")
    return x


def raise_value_error(message: str) -> None:
    raise ValueError(message)


def sleep_return(seconds: float, value: Any) -> Any:
    time.sleep(seconds)
    return value


def touch(path: str) -> None:
    Path(path).touch()


def mark_then_wait(mark: str, release: str, limit: float = 30.0) -> str:
    """Leave ``mark`` (this call started), then wait for ``release`` to exist."""
    Path(mark).touch()
    deadline = time.monotonic() + limit
    while not os.path.exists(release) and time.monotonic() < deadline:
        time.sleep(0.01)
    return mark


def mark_sleep(folder: str, i: int, seconds: float) -> int:
    """Leave ``started-i``, sleep, then leave ``done-i``."""
    Path(folder, f"started-{i}").touch()
    time.sleep(seconds)
    Path(folder, f"done-{i}").touch()
    return i


def getpid(_: Any = None) -> int:
    return os.getpid()


def exit_hard(code: int) -> None:
    os._exit(code)


# -- initializers ------------------------------------------------------------------


def set_state(value: Any, folder: str | None = None) -> None:
    """Initializer: remember ``value``; with ``folder``, leave a file named by pid."""
    global _STATE
    _STATE = value
    if folder is not None:
        Path(folder, str(os.getpid())).touch()


def get_state(_: Any = None) -> Any:
    return _STATE


def fail_while_exists(marker: str) -> None:
    """Initializer that raises while ``marker`` exists."""
    global _STATE
    if os.path.exists(marker):
        raise RuntimeError(f"initializer refused: {marker} exists")
    _STATE = "initialized"


class Blob:
    """An argument a test can watch for through a weakref."""

    def __init__(self, size: int) -> None:
        self.data = b"x" * size


def blob_size(blob: Blob) -> int:
    return len(blob.data)


def make_blob(size: int) -> Blob:
    return Blob(size)


def at_once(folder: str, seconds: float = 0.2) -> int:
    """How many calls of this were running at once, seen from inside one."""
    me = Path(folder) / f"{os.getpid()}-{time.monotonic_ns()}"
    me.touch()
    time.sleep(seconds)
    seen = len(os.listdir(folder))
    me.unlink()
    return seen


def append_line(path: str, text: str) -> None:
    """Append ``text`` as a line to ``path`` (the order calls ran in)."""
    with open(path, "a") as out:
        out.write(text + "\n")
