"""Helpers shared by the tests."""

from __future__ import annotations

import os
import time
import warnings
from typing import TYPE_CHECKING, TypeVar

import psutil

import parstream

if TYPE_CHECKING:
    from collections.abc import Callable

T = TypeVar("T")


def gone(pid: int, within: float = 5.0) -> bool:
    """True once ``pid`` is dead (or a zombie) within ``within`` seconds."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.02)
    return False


def wait_until(predicate: Callable[[], object], within: float = 10.0, what: str = "") -> None:
    """Poll ``predicate`` (for states no event announces) until true, else fail."""
    deadline = time.monotonic() + within
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what or predicate}"
        time.sleep(0.01)


def value(result: parstream.Ok[T] | parstream.Exit) -> T:
    """The value of an ``Ok``; fails the test (showing it) for an ``Exit``."""
    assert isinstance(result, parstream.Ok), result
    return result.value


def reason(result: parstream.Ok[object] | parstream.Exit) -> BaseException:
    """The reason of an ``Exit``; fails the test (showing it) for an ``Ok``."""
    assert isinstance(result, parstream.Exit), result
    return result.reason


def fork_and_wait(child: Callable[[], int]) -> int:
    """Run ``child()`` in a forked child; its return value is the exit code."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # fork with threads, 3.12+
        pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        code = 1
        try:
            code = child()
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)
