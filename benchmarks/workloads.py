"""The functions the benchmarks run: importable, so every pool pickles them the same way.

Each is something a user would recognise, not a sleep pretending to be CPU work.
"""

from __future__ import annotations

import time
from typing import Any


def count_primes(limit: int) -> int:
    """Pure-Python trial division: a CPU-bound kernel of tunable size."""
    count = 0
    for n in range(2, limit):
        is_prime = True
        d = 2
        while d * d <= n:
            if n % d == 0:
                is_prime = False
                break
            d += 1
        if is_prime:
            count += 1
    return count


def square(x: int) -> int:
    """A tiny item: the per-item overhead decides everything."""
    return x * x


def noop() -> None:
    """One no-op task, for round-trip latency."""


def io_wait(seconds: float) -> float:
    """An I/O-bound item: waits without using a core (a network call, say)."""
    time.sleep(seconds)
    return seconds


def spectrum(arr: Any) -> Any:
    """A numpy item: ~1 MB in, ~1 MB out, so serialisation cost shows."""
    import numpy as np

    return np.abs(np.fft.rfft(arr)).astype(np.float64)


def hang_or_square(x: int) -> int:
    """Hangs on one item (for the timeout-recovery benchmark)."""
    if x == 0:
        time.sleep(3600)
    time.sleep(0.005)
    return x * x


def calibrate_primes(target_s: float) -> int:
    """The ``count_primes`` limit that takes about ``target_s`` here."""
    limit = 2000
    while True:
        t0 = time.perf_counter()
        count_primes(limit)
        elapsed = time.perf_counter() - t0
        if elapsed >= target_s / 4:
            return max(2000, int(limit * (target_s / elapsed) ** (1 / 1.5)))
        limit *= 2
