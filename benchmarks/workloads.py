"""The functions the benchmarks run: importable, so every pool pickles them the same way.

Each is something a user would recognise, not a sleep pretending to be CPU work.
"""

from __future__ import annotations

import math
import os
import random
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


def fine(k: int) -> int:
    """A fine-grained pure-Python item: a few microseconds of arithmetic."""
    acc = 0
    for i in range(k):
        acc += (i * i) % 7
    return acc


def busy(iterations: int) -> int:
    """A busy item of a given size: pure-Python arithmetic, ``iterations`` steps.

    Sized in work, not in time: an item that is descheduled takes longer, as
    real work would, so a pool that oversubscribes the cores pays for it.
    """
    acc = 0
    for i in range(iterations):
        acc += i & 7
    return acc


def busy_rate() -> float:
    """``busy`` iterations per second here (best of a few ~20 ms runs)."""
    n = 200_000
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        busy(n)
        best = min(best, time.perf_counter() - t0)
    return n / best


def skewed_durations(n: int, total: float, sigma: float = 1.0, seed: int = 0) -> list[float]:
    """``n`` lognormal durations summing to ``total`` seconds, sorted: slow ones last."""
    rng = random.Random(seed)
    raw = sorted(rng.lognormvariate(0.0, sigma) for _ in range(n))
    scale = total / math.fsum(raw)
    return [x * scale for x in raw]


def synth(seed: int) -> Any:
    """A numpy item the other way round: a small seed in, a 1 MiB float64 array out."""
    import numpy as np

    x = np.random.default_rng(seed).standard_normal(131_072)
    return np.fft.irfft(np.fft.rfft(x), n=131_072)


def mark_and_sleep(directory: str, seconds: float) -> int:
    """Leaves a file named after this worker's pid in ``directory``, then waits.

    Lets a benchmark see which workers are busy through any pool's public API.
    """
    with open(os.path.join(directory, str(os.getpid())), "w"):
        pass
    time.sleep(seconds)
    return os.getpid()


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


def calibrate_fine(target_s: float) -> int:
    """The ``fine`` loop count that takes about ``target_s`` (seconds) here.

    The best of three ~20 ms timings, so a busy moment on a shared machine
    does not shrink the items.
    """
    k = 64
    reps = 2000
    while True:
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            for _ in range(reps):
                fine(k)
            times.append(time.perf_counter() - t0)
        per_item = min(times) / reps
        if per_item * reps >= 0.02:
            return max(1, round(k * target_s / per_item))
        reps *= 2


def hang_marked(directory: str, x: int) -> int:
    """``hang_or_square``, but the hanging item first notes when it started.

    It writes ``time.time()`` to ``<directory>/hang-start`` (atomically), so a
    benchmark on the same machine knows the hung item's timeout deadline.
    """
    if x == 0:
        tmp = os.path.join(directory, f"hang-start.{os.getpid()}")
        with open(tmp, "w") as f:
            f.write(repr(time.time()))
        os.replace(tmp, os.path.join(directory, "hang-start"))
        time.sleep(3600)
    time.sleep(0.005)
    return x * x


def timed_primes(limit: int) -> tuple[float, float, int]:
    """``count_primes`` that says when it ran (``time.time()``) and in which process."""
    t0 = time.time()
    count_primes(limit)
    return t0, time.time(), os.getpid()
