"""Importable helpers for the hardening tests (issue 8): workers import this module."""

from __future__ import annotations

import os
import time
from typing import Any


def identity(x: Any) -> Any:
    return x


def slow_rebuild(seconds: float) -> str:
    time.sleep(seconds)
    return "rebuilt"


class SlowToUnpickle:
    """An argument whose unpickling in the worker blocks for ``seconds``."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def __reduce__(self) -> tuple[Any, ...]:
        return (slow_rebuild, (self.seconds,))


class Holder:
    """An importable class whose instance holds any function (e.g. one from __main__)."""

    def __init__(self, fn: Any, payload: bytes = b"") -> None:
        self.fn = fn
        self.payload = payload

    def apply(self, x: Any) -> Any:
        return self.fn(x)

    def size(self, _: Any = None) -> int:
        return len(self.payload)


def append_index(path: str, crash_at: int, i: int) -> int:
    """Record that item ``i`` ran (one O_APPEND write), then crash at ``crash_at``."""
    if i == crash_at:
        os._exit(3)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, f"{i}\n".encode())
    finally:
        os.close(fd)
    return i


def pid_of(_: Any = None) -> int:
    return os.getpid()


def sleep_then(seconds: float, value: Any) -> Any:
    time.sleep(seconds)
    return value


def append_raise_or_crash(path: str, crash_at: int, i: int) -> int:
    """Like ``append_index``, and every item ending in 7 raises after recording itself."""
    if i == crash_at:
        os._exit(5)
    append_index(path, -1, i)
    if i % 10 == 7:
        raise ValueError(f"item {i} refuses")
    return i


_open_logs: dict[str, int] = {}


def write_index(path: str, crash_at: int, i: int) -> int:
    """One ``os.write`` per item (about a microsecond): the cheapest side effect."""
    if i == crash_at:
        os._exit(6)
    fd = _open_logs.get(path)
    if fd is None:
        fd = _open_logs[path] = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.write(fd, b"%d\n" % i)
    return i


def count_instances(type_name: str) -> int:
    """In a worker: live objects of a class by name (after a collection)."""
    import gc

    gc.collect()
    return sum(1 for o in gc.get_objects() if type(o).__name__ == type_name)


def fail_on_three(holder: Any) -> int:
    if len(holder.payload) == 3:
        raise ValueError("item 3")
    return len(holder.payload)


def append_then_sleep(path: str, item: tuple[int, float]) -> int:
    """Record that item ``i`` ran (one O_APPEND write), then sleep ``seconds``."""
    i, seconds = item
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, f"{i}\n".encode())
    finally:
        os.close(fd)
    time.sleep(seconds)
    return i
