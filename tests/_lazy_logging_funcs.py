"""Task functions in a module that does not import ``logging`` at its top.

A worker starts without logging and forwards records once anything imports
it; these functions import it only while they run (tests/test_lifecycle.py).
"""

from __future__ import annotations

import sys


def log_after_importing(message: str) -> bool:
    """Import logging now, log at once; whether logging was imported before."""
    had = "logging" in sys.modules
    import logging

    logging.getLogger("user.lazy").warning("lazy %s", message)
    return had


def logging_imported() -> bool:
    return "logging" in sys.modules


def find_then_log(message: str) -> bool:
    """Look logging up without importing it, then import it and log."""
    import importlib.util

    had = "logging" in sys.modules
    assert importlib.util.find_spec("logging") is not None
    import logging

    logging.getLogger("user.lazy").warning("found %s", message)
    return had


LEFT_OUT_AT_START = (
    "typing",
    "cloudpickle",
    "logging",
    "traceback",
    "multiprocessing",
    "enum",  # through signal (the worker uses _signal)
    "signal",
    "importlib",  # through parstream/__init__.py's lazy attributes
)


def start_imports_left_out() -> list[str]:
    """Modules a worker's start leaves out (issue 12) that are loaded anyway."""
    return [name for name in LEFT_OUT_AT_START if name in sys.modules]
