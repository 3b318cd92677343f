"""Helpers shared by the tests."""

from __future__ import annotations

import time
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
