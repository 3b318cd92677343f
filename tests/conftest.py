"""Shared fixtures: every test must leave no worker process behind.

The check runs after each test: the default supervisor is closed, then every
process this test run started during the test (other than loky's resource
tracker, which lives as long as pytest) must be gone within a few seconds.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import psutil
import pytest

import parstream


def _descendants() -> dict[int, psutil.Process]:
    out = {}
    for p in psutil.Process().children(recursive=True):
        try:
            if "resource_tracker" in " ".join(p.cmdline()):
                continue
        except psutil.Error:
            continue
        out[p.pid] = p
    return out


@pytest.fixture(autouse=True)
def no_leftover_processes() -> Iterator[None]:
    """Fail a test that leaves any process it started still running."""
    before = set(_descendants())
    yield
    for backend in ("local", "inline"):
        default = parstream.default_supervisor(backend, start=False)
        if default is not None:
            default.close()
    deadline = time.monotonic() + 5.0
    while True:
        left = {pid: p for pid, p in _descendants().items() if pid not in before}
        alive = []
        for p in left.values():
            try:
                if p.status() != psutil.STATUS_ZOMBIE:
                    alive.append(p)
            except psutil.Error:
                pass
        if not alive:
            return
        if time.monotonic() > deadline:
            for p in alive:
                try:
                    p.kill()
                except psutil.Error:
                    pass
            names = []
            for p in alive:
                try:
                    names.append((p.pid, " ".join(p.cmdline())[:80]))
                except psutil.Error:
                    names.append((p.pid, "?"))
            pytest.fail(f"processes outlived the test: {names}", pytrace=False)
        time.sleep(0.05)


@pytest.fixture
def sup() -> Iterator[parstream.Supervisor]:
    """A two-worker supervisor, closed after the test."""
    with parstream.Supervisor(max_workers=2) as s:
        yield s
