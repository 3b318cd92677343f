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
    from typing import IO

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


def read_line(stream: IO[str] | None) -> str:
    """One line of a child's output pipe, read from its descriptor a byte at
    a time. ``readline()`` on the text stream reads ahead, and a later
    ``Popen.communicate()`` reads the descriptor itself: what was read ahead
    is lost (a test then saw none of what the child printed right after
    the line, when a loaded machine let both lines reach the pipe first)."""
    assert stream is not None
    line = bytearray()
    while not line.endswith(b"\n"):
        byte = os.read(stream.fileno(), 1)
        if not byte:
            break
        line += byte
    return line.decode()


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
