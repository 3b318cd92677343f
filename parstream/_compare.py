"""``compare``: will parallel pay for *this* loop? Sequential vs ``parstream.map``, measured.

This module owns the measurement and its presentation, and nothing of the
engine: it runs on the public ``Supervisor`` and ``Stream`` API only.

Data flow::

    iterable --islice(sample)--> items (a list, pulled once)
        |
        +-- fn(items[0]) in this process (untimed: imports, caches; result size)
        +-- parallel warm-up over items (untimed: workers start, chunk size learnt)
        +-- rounds x [sequential: list(map(fn, items)) | parallel: list(sup.stream_map(...))]
        |      order alternates each round, so drift on a shared machine hits both
        v
    medians, min/max --> Comparison (frozen) --> advice, str(), _repr_html_(), plot()

The overhead estimate is ``max(0, parallel_s * workers - sequential_s) / items``
with ``workers`` capped at the item count: the worker-seconds a parallel run
occupies beyond the work itself, per item. It covers pickling, transfer,
dispatch and idle workers at the tail; on a busy machine it also absorbs
time the workers waited for a core.
"""

from __future__ import annotations

import html
import itertools
import os
import pickle
import statistics
import time
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Literal

from parstream._backend import cpu_count
from parstream._interrupts import held
from parstream._progress import Progress
from parstream._supervisor import Supervisor
from parstream._validate import (
    check_callable,
    check_int,
    check_iterable,
    check_progress,
    shown,
)

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable

    from matplotlib.figure import Figure

Verdict = Literal["parallel", "more-concurrency", "batch", "transfer", "sequential"]

ROUNDS = 3  # timed rounds of each; more narrows the spread but multiplies the wait
PAYS = 1.2  # speedup below which parallel is not worth its moving parts
TRANSFER_BYTES = 1_000_000  # pickled result size from which shipping it back is the story
IO_CPU_SHARE = 0.2  # below this CPU share an item mostly waits (a busy machine also lowers it)
RESULT_SAMPLES = 5  # results pickled to estimate the size of one
TINY_ITEM_S = 1e-3  # below this, an overhead larger than the item is the cost of shipping it
EXTRAPOLATE_FACTOR = 4  # advice extrapolates to this many times the workers measured


class _EmptyInput(ValueError):
    """Raised by ``compare`` when there are no items (the CLI reports it in one line)."""


@dataclass(frozen=True)
class Comparison:
    """What ``parstream.compare`` measured, and what it advises.

    Times are medians over the timed rounds; ``*_min_s``/``*_max_s`` give the
    spread. ``cost_per_item_s`` is ``sequential_s / items``;
    ``overhead_per_item_s`` is ``max(0, parallel_s * workers - sequential_s) / items``
    (worker-seconds spent beyond the work, per item: pickling, transfer,
    dispatch, idle workers). ``load_average`` is the machine's one-minute load
    when the measurement began (None where the OS does not say).
    ``total_items`` is the whole input's length when a sample was taken and
    ``len()`` knew it. ``verdict`` is one of
    ``"parallel"``, ``"more-concurrency"`` (items mostly wait: use more
    concurrency than cores), ``"batch"`` (items are too small to ship one by
    one), ``"transfer"`` (results are too big to ship) and ``"sequential"``.
    """

    items: int
    total_items: int | None
    sequential_s: float
    parallel_s: float
    sequential_min_s: float
    sequential_max_s: float
    parallel_min_s: float
    parallel_max_s: float
    speedup: float
    cost_per_item_s: float
    overhead_per_item_s: float
    cpu_share: float
    result_bytes: int
    workers: int
    cores: int
    load_average: float | None
    chunksize: int
    rounds: int
    verdict: Verdict
    advice: str

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready record of every field."""
        return asdict(self)

    def __str__(self) -> str:
        sample = (
            f" (sample of {self.total_items:,})"
            if self.total_items is not None and self.total_items != self.items
            else ""
        )
        rows = [
            f"parstream.compare: {self.items:,} items{sample}, {self.workers} workers "
            f"on {self.cores} cores, {self.rounds} rounds"
            + (f", load {self.load_average:.1f}" if self.load_average is not None else ""),
            f"  {'':<12}{'median':>10}   min - max",
            f"  {'sequential':<12}{_dur(self.sequential_s):>10}   "
            f"{_dur(self.sequential_min_s)} - {_dur(self.sequential_max_s)}",
            f"  {'parallel':<12}{_dur(self.parallel_s):>10}   "
            f"{_dur(self.parallel_min_s)} - {_dur(self.parallel_max_s)}",
            f"  {'speedup':<12}{self.speedup:>9.2f}x",
            f"  per item: {_dur(self.cost_per_item_s)} of work, "
            f"{_dur(self.overhead_per_item_s)} of overhead; "
            f"result {_size(self.result_bytes)}; chunksize {self.chunksize}",
            f"advice: {self.advice}",
        ]
        return "\n".join(rows)

    def _repr_html_(self) -> str:
        slowest = max(self.sequential_max_s, self.parallel_max_s) or 1.0

        def bar(label: str, med: float, lo: float, hi: float, colour: str) -> str:
            pct = 100 * med / slowest
            left, width = 100 * lo / slowest, 100 * (hi - lo) / slowest
            return (
                '<div style="display:flex;align-items:center;margin:2px 0">'
                f'<span style="width:6em;font-size:90%">{label}</span>'
                '<div style="position:relative;flex:1;height:14px;max-width:360px">'
                f'<div style="position:absolute;left:0;top:2px;height:10px;width:{pct:.1f}%;'
                f'background:{colour}"></div>'
                f'<div style="position:absolute;left:{left:.1f}%;top:6px;height:2px;'
                f'width:{max(width, 0.5):.1f}%;background:#333"></div>'
                f'</div><span style="margin-left:6px;font-size:90%">{_dur(med)}</span></div>'
            )

        def row(name: str, med: float, lo: float, hi: float) -> str:
            return (
                f"<tr><th style='text-align:left'>{name}</th><td>{_dur(med)}</td>"
                f"<td>{_dur(lo)} &ndash; {_dur(hi)}</td></tr>"
            )

        sample = (
            f" (sample of {self.total_items:,})"
            if self.total_items is not None and self.total_items != self.items
            else ""
        )
        return (
            '<div class="parstream-compare">'
            f"<p><b>parstream.compare</b>: {self.items:,} items{sample}, "
            f"{self.workers} workers on {self.cores} cores, {self.rounds} rounds"
            + (f", load {self.load_average:.1f}" if self.load_average is not None else "")
            + "</p>"
            '<table class="parstream-compare-table">'
            "<tr><th></th><th>median</th><th>min &ndash; max</th></tr>"
            + row("sequential", self.sequential_s, self.sequential_min_s, self.sequential_max_s)
            + row("parallel", self.parallel_s, self.parallel_min_s, self.parallel_max_s)
            + f"<tr><th style='text-align:left'>speedup</th><td>{self.speedup:.2f}&times;</td>"
            "<td></td></tr>"
            f"<tr><th style='text-align:left'>per item</th><td>{_dur(self.cost_per_item_s)}"
            f"</td><td>+ {_dur(self.overhead_per_item_s)} overhead</td></tr>"
            f"<tr><th style='text-align:left'>result</th><td>{_size(self.result_bytes)}</td>"
            f"<td>chunksize {self.chunksize}</td></tr>"
            "</table>"
            + bar(
                "sequential",
                self.sequential_s,
                self.sequential_min_s,
                self.sequential_max_s,
                "#4c72b0",
            )
            + bar("parallel", self.parallel_s, self.parallel_min_s, self.parallel_max_s, "#c44e52")
            + f"<p><b>advice</b>: {html.escape(self.advice)}</p></div>"
        )

    def plot(self) -> Figure:
        """A matplotlib figure: median time of each, with the min-max spread.

        Raises:
            ImportError: matplotlib is not installed (``pip install matplotlib``,
                or the ``parstream[plot]`` extra).
        """
        try:
            from matplotlib.figure import Figure
        except ImportError as exc:
            raise ImportError(
                "Comparison.plot() needs matplotlib, which is not installed: "
                "pip install matplotlib (or pip install 'parstream[plot]')"
            ) from exc
        fig = Figure(figsize=(6, 2))
        ax = fig.subplots()
        labels = ["sequential", "parallel"]
        med = [self.sequential_s, self.parallel_s]
        lows = [self.sequential_s - self.sequential_min_s, self.parallel_s - self.parallel_min_s]
        highs = [self.sequential_max_s - self.sequential_s, self.parallel_max_s - self.parallel_s]
        ax.barh(labels, med, xerr=[lows, highs], color=["#4c72b0", "#c44e52"])
        ax.invert_yaxis()
        ax.set_xlabel("seconds (median, min-max)")
        ax.set_title(
            f"{self.items:,} items, {self.workers} workers: {self.speedup:.2f}x", fontsize=10
        )
        fig.tight_layout()
        return fig


def compare(
    fn: Callable[[Any], Any],
    iterable: Iterable[Any],
    *,
    sample: int | None = None,
    max_concurrency: int | None = None,
    backend: str | None = None,
    progress: Any = True,
    rounds: int = ROUNDS,
) -> Comparison:
    """Time ``fn`` over (a sample of) ``iterable`` sequentially and with ``parstream.map``.

    The items are pulled once, into a list: all of a finite iterable, or only
    the first ``sample`` items of any iterable (a generator is materialised
    only up to the sample, so an endless one is fine). One parallel run warms
    the workers untimed, then ``rounds`` sequential and parallel runs
    alternate, so drift on a shared machine hits both alike. ``fn`` runs in
    this process for the sequential runs and in workers for the parallel ones,
    ``2 * rounds + 1`` times per item (the first once more): keep side effects
    out of it, or make them harmless to repeat.

    Example::

        c = parstream.compare(simulate, params, sample=64)
        print(c)  # table and advice
        c.speedup, c.advice

    Args:
        fn: the loop body, one item in, one result out.
        iterable: the loop's items.
        sample: judge only the first ``sample`` items (>= 1); the advice then
            extrapolates to the whole input when ``len(iterable)`` is known.
        max_concurrency: workers to compare with (>= 1); default: the default
            supervisor's workers (one per core).
        backend: where the parallel runs go; only ``None``/``"local"`` (worker
            processes on this machine) exist for now.
        progress: a progress bar over the runs: True, False, a dict of tqdm
            options or a tqdm instance.
        rounds: timed rounds of each (>= 1).

    Returns:
        A frozen ``Comparison``: ``print`` it, show it in Jupyter, or read its fields.

    Raises:
        TypeError: ``fn`` is not callable, ``iterable`` not iterable, or an
            option has the wrong type.
        ValueError: an option is out of range, ``backend`` is unknown, or the
            (sampled) input is empty.
    """
    check_callable(fn)
    check_iterable(iterable, "iterable")
    sample = check_int(sample, "sample", 1)
    max_concurrency = check_int(max_concurrency, "max_concurrency", 1)
    rounds = check_int(rounds, "rounds", 1, allow_none=False)
    if backend is not None and not isinstance(backend, str):
        raise TypeError(f"backend must be None or 'local', got {type(backend).__name__}")
    if backend not in (None, "local"):
        raise ValueError(
            f"backend must be None or 'local', got {shown(backend)}: "
            "other backends are not available yet"
        )
    check_progress(progress)

    total = _length(iterable)
    items = list(iterable if sample is None else itertools.islice(iterable, sample))
    if not items:
        raise _EmptyInput("iterable is empty: there is nothing to compare")

    load = _load_average()
    bar: Progress | None = None
    own = max_concurrency is not None
    sup: Supervisor | None = None
    # Everything made inside the try: Ctrl-C while the workers start must
    # still close the bar, or the interrupt's message lands mid-bar and the
    # bar is drawn again at exit.
    try:
        if progress is not False:
            spec: Any = progress
            if progress is True or isinstance(progress, dict):
                spec = {
                    "desc": "compare",
                    "unit": "run",
                    **(progress if progress is not True else {}),
                }
            with held():  # Ctrl-C once it is drawn: the finally below sees it
                bar = Progress(spec, total=1 + 2 * rounds)
        if own:
            sup = Supervisor(max_workers=max_concurrency)
        else:
            from parstream._api import default_supervisor

            sup = default_supervisor()
        workers = sup.max_workers
        first = fn(items[0])  # untimed: the parent's imports and caches
        chunksize = _warm_up(sup, fn, items, workers)
        if bar is not None:
            bar.update(1)
        seq: list[float] = []
        par: list[float] = []
        cpu: list[float] = []
        results: list[Any] = [first]
        for r in range(rounds):
            for kind in ("seq", "par") if r % 2 == 0 else ("par", "seq"):
                if kind == "seq":
                    t0, c0 = time.perf_counter(), _cpu_seconds()
                    out = list(map(fn, items))
                    seq.append(time.perf_counter() - t0)
                    cpu.append(_cpu_seconds() - c0)
                    if r == 0:
                        results = out[:RESULT_SAMPLES]
                    del out
                else:
                    t0 = time.perf_counter()
                    out = list(sup.stream_map(fn, items, max_concurrency=workers))
                    par.append(time.perf_counter() - t0)
                    del out
                if bar is not None:
                    bar.update(1)
    finally:
        if bar is not None:
            bar.close()
        if own and sup is not None:
            sup.close()

    n = len(items)
    seq_s, par_s = statistics.median(seq), statistics.median(par)
    used = min(workers, n)
    cost = seq_s / n
    overhead = max(0.0, par_s * used - seq_s) / n
    shares = [c / s for c, s in zip(cpu, seq, strict=True) if s > 0]
    cpu_share = statistics.median(shares) if shares else 1.0
    speedup = seq_s / par_s if par_s > 0 else float("inf")
    result_bytes = _result_size(results)
    whole = total if sample is not None and total is not None and total > n else None
    cores = cpu_count()
    verdict, advice = _advise(
        busy=used,
        items=n,
        total=whole,
        seq_s=seq_s,
        par_s=par_s,
        speedup=speedup,
        cost=cost,
        overhead=overhead,
        cpu_share=cpu_share,
        result_bytes=result_bytes,
        workers=workers,
        cores=cores,
        load=load,
    )
    return Comparison(
        items=n,
        total_items=whole,
        sequential_s=seq_s,
        parallel_s=par_s,
        sequential_min_s=min(seq),
        sequential_max_s=max(seq),
        parallel_min_s=min(par),
        parallel_max_s=max(par),
        speedup=speedup,
        cost_per_item_s=cost,
        overhead_per_item_s=overhead,
        cpu_share=cpu_share,
        result_bytes=result_bytes,
        workers=workers,
        cores=cores,
        load_average=load,
        chunksize=min(chunksize, n),
        rounds=rounds,
        verdict=verdict,
        advice=advice,
    )


def _warm_up(sup: Supervisor, fn: Callable[[Any], Any], items: list[Any], workers: int) -> int:
    """One untimed parallel run; returns the chunk size the stream settled on."""
    stream = sup.async_stream(fn, items, max_concurrency=workers)
    with stream:
        for _ in stream:  # linked: a failing fn raises here, before anything is timed
            pass
    return stream.chunksize


def _cpu_seconds() -> float:
    """CPU time of this process and of the children it has waited for: an
    fn whose work runs in a subprocess (a compressor, a compiler) keeps a
    core busy without this process's own time showing it."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def _advise(
    *,
    busy: int | None = None,
    items: int,
    total: int | None,
    seq_s: float,
    par_s: float,
    speedup: float,
    cost: float,
    overhead: float,
    cpu_share: float,
    result_bytes: int,
    workers: int,
    cores: int,
    load: float | None = None,
) -> tuple[Verdict, str]:
    """The verdict and one or two sentences with the numbers behind it.

    ``workers`` is the pool's size, ``busy`` how many of them the sample kept
    busy (fewer when it has fewer items): the speedup was measured on
    ``busy``, and the whole input would keep up to ``workers`` busy."""
    busy = workers if busy is None else busy
    whole = ""
    if total is not None:
        # Parallel throughput grows with the workers a larger input keeps busy.
        par_total = par_s / items * total * busy / max(1, min(workers, total))
        whole = (
            f" For all {total:,} items expect about {_dur(cost * total)} sequential "
            f"and {_dur(par_total)} parallel."
        )
    if speedup >= PAYS:
        if cpu_share < IO_CPU_SHARE:
            return "more-concurrency", (
                f"parallel pays: parstream.map is {speedup:.1f}x faster with {busy} workers, "
                f"and each item mostly waits (CPU busy {cpu_share:.0%} of its time): use it with "
                f"max_concurrency above the core count (e.g. {4 * max(workers, cores)})." + whole
            )
        more = EXTRAPOLATE_FACTOR * busy
        if busy > 1:
            # Amdahl: a speedup S on n workers means a parallel share
            # p = (1 - 1/S) / (1 - 1/n); on m workers expect 1 / ((1 - p) + p / m).
            p = min(1.0, max(0.0, (1 - 1 / speedup) / (1 - 1 / busy)))
            expect = 1 / ((1 - p) + p / more)
            scale = f"; expect about {expect:.1f}x on {more} cores"
        else:
            scale = ""
        return "parallel", (
            f"parallel pays: parstream.map is {speedup:.1f}x faster on {busy} "
            f"worker{'s' if busy != 1 else ''}{scale}." + whole
        )
    if result_bytes >= TRANSFER_BYTES and overhead >= cost / 2:
        return "transfer", (
            f"results are {_size(result_bytes)} each: the transfer dominates "
            f"({_dur(overhead)} per item to ship against {_dur(cost)} of work); return less "
            "from fn (a summary, or write the data to a file and return its path)."
        )
    if overhead > cost and cost < TINY_ITEM_S:
        return "batch", (
            f"each item takes {_dur(cost)} but costs {_dur(overhead)} to ship "
            f"(parallel {speedup:.2f}x on {busy} workers): batch the work inside fn "
            "(one call per list of items), or stay sequential." + whole
        )
    if load is not None and load > cores - 1 and cost >= TINY_ITEM_S:
        return "sequential", (
            f"parallel is only {speedup:.2f}x on {busy} workers, but the machine is busy "
            f"(load average {load:.1f} on {cores} cores), so the workers waited for a core: "
            f"with items of {_dur(cost)} parallel should pay; measure again when it is quieter."
            + whole
        )
    return "sequential", (
        f"parallel is only {speedup:.2f}x on {busy} workers with {items:,} items "
        f"of {_dur(cost)} (+ {_dur(overhead)} overhead each): stay sequential, or measure "
        "a larger sample." + whole
    )


def _load_average() -> float | None:
    try:
        return float(os.getloadavg()[0])
    except (AttributeError, OSError):  # Windows has no load average
        return None


def _length(iterable: Iterable[Any]) -> int | None:
    """``len(iterable)`` as a hint (a progress total, the first chunk's size):
    None where it has none, or its ``__len__`` raises or lies out of range;
    a for loop never asks, so neither may a failing one stop the run."""
    try:
        return len(iterable)  # type: ignore[arg-type]
    except Exception:
        return None


def _result_size(results: list[Any]) -> int:
    """Mean pickled size of a few results, as they would travel back."""
    sizes = []
    for r in results[:RESULT_SAMPLES]:
        try:
            sizes.append(len(pickle.dumps(r, protocol=5)))
        except Exception:
            from parstream._backends._codec import dumps

            try:
                sizes.append(len(dumps(r)))
            except Exception:
                continue
    return int(statistics.mean(sizes)) if sizes else 0


def _dur(seconds: float) -> str:
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} h"
    if seconds >= 60:
        return f"{seconds / 60:.1f} min"
    if seconds >= 1:
        return f"{seconds:.2f} s"
    for scale, unit in ((1e3, "ms"), (1e6, "µs")):
        value = seconds * scale
        if value >= 1 or unit == "µs":
            digits = 0 if value >= 100 else 1 if value >= 10 else 2
            return f"{value:.{digits}f} {unit}"
    raise AssertionError("unreachable")


def _size(n: int) -> str:
    if n >= 1_000_000:
        return f"{n / 1e6:.1f} MB"
    if n >= 1_000:
        return f"{n / 1e3:.1f} kB"
    return f"{n} B"


__all__ = ["Comparison", "compare"]
