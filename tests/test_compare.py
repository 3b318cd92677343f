"""``parstream.compare`` and ``python -m parstream compare`` (issue 13), on real processes."""

from __future__ import annotations

import io
import itertools
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

import parstream
from parstream._compare import _advise

if TYPE_CHECKING:
    from collections.abc import Iterator

ROOT = Path(__file__).resolve().parents[1]


def coarse(n: int) -> int:
    """A 50 ms item, far above any per-item overhead.

    It blocks rather than computes: on the shared 2-core test machine other
    processes often hold a core, and then CPU-bound work cannot show a speedup
    however well it is dispatched; a blocking item shows one on any machine.
    """
    time.sleep(0.05)
    return n


def square(x: int) -> int:
    return x * x


def spin_in_a_subprocess(_: int) -> int:
    """~0.1 s of CPU, all of it in a child process this one waits for."""
    code = "sum(i * i for i in range(1_000_000))"
    subprocess.run([sys.executable, "-S", "-c", code], check=True)
    return 0


def made_up(**changes: Any) -> parstream.Comparison:
    """A Comparison with plausible numbers, for the renderers (no processes)."""
    fields: dict[str, Any] = {
        "items": 8,
        "total_items": 800,
        "sequential_s": 0.4,
        "parallel_s": 0.21,
        "sequential_min_s": 0.39,
        "sequential_max_s": 0.45,
        "parallel_min_s": 0.2,
        "parallel_max_s": 0.25,
        "speedup": 0.4 / 0.21,
        "cost_per_item_s": 0.05,
        "overhead_per_item_s": 0.0025,
        "cpu_share": 1.0,
        "result_bytes": 28,
        "workers": 2,
        "cores": 2,
        "load_average": 0.5,
        "chunksize": 1,
        "rounds": 3,
        "verdict": "parallel",
        "advice": "parallel pays: parstream.map is 1.9x faster on 2 workers.",
    }
    fields.update(changes)
    return parstream.Comparison(**fields)


@pytest.mark.slow
def test_coarse_function_pays() -> None:
    """Coarse items: speedup above 1 and advice that recommends parstream.map."""
    c = parstream.compare(coarse, range(8), max_concurrency=2, progress=False)
    assert c.items == 8
    assert c.workers == 2
    assert c.rounds == 3
    assert c.speedup > 1
    assert c.verdict == "more-concurrency"  # it waits: more workers than cores pay
    assert c.cpu_share < 0.2
    assert "parallel pays" in c.advice
    assert "parstream.map" in c.advice
    assert c.chunksize == 1  # slow items travel one by one
    assert c.sequential_min_s <= c.sequential_s <= c.sequential_max_s
    assert c.parallel_min_s <= c.parallel_s <= c.parallel_max_s
    assert c.cost_per_item_s == pytest.approx(c.sequential_s / 8)


@pytest.mark.slow
def test_tiny_items_report_overhead_and_do_not_recommend_per_item_parallel() -> None:
    """x*x over 100,000 items: the overhead shows and the advice says batch or stay."""
    c = parstream.compare(square, range(100_000), max_concurrency=2, progress=False)
    assert c.items == 100_000
    assert c.overhead_per_item_s > 0
    # What the batching chose (it reacts to measured item times, which a
    # descheduled worker inflates, so its value is not asserted).
    assert c.chunksize >= 1
    assert c.verdict in ("batch", "sequential")
    assert "parallel pays" not in c.advice
    assert "stay sequential" in c.advice
    assert c.overhead_per_item_s == pytest.approx(
        max(0.0, c.parallel_s * 2 - c.sequential_s) / c.items
    )


@pytest.mark.slow
def test_sample_bounds_the_items_pulled() -> None:
    """sample=N pulls exactly N items from an endless generator."""
    pulled = 0

    def endless() -> Iterator[int]:
        nonlocal pulled
        for i in itertools.count():
            pulled += 1
            yield i

    c = parstream.compare(square, endless(), sample=5, max_concurrency=2, progress=False)
    assert pulled == 5
    assert c.items == 5
    assert c.total_items is None


@pytest.mark.slow
def test_sample_of_a_sized_input_extrapolates_to_all_of_it() -> None:
    """With a known length, the advice speaks about the whole input."""
    c = parstream.compare(coarse, list(range(400)), sample=4, max_concurrency=2, progress=False)
    assert c.items == 4
    assert c.total_items == 400
    assert "For all 400 items" in c.advice
    assert "sample of 400" in str(c)


@pytest.mark.slow
def test_progress_bar_counts_the_runs() -> None:
    """progress= takes a tqdm instance and advances it once per run."""
    from tqdm.std import tqdm

    with tqdm(file=io.StringIO()) as bar:
        parstream.compare(square, range(10), max_concurrency=2, progress=bar, rounds=2)
        assert bar.n == 1 + 2 * 2
        assert bar.total == 1 + 2 * 2


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"fn": 3}, TypeError, "fn must be callable"),
        ({"iterable": 5}, TypeError, "iterable must be iterable"),
        ({"sample": 0}, ValueError, "sample"),
        ({"sample": "3"}, TypeError, "sample"),
        ({"sample": True}, TypeError, "sample"),
        ({"max_concurrency": 0}, ValueError, "max_concurrency"),
        ({"max_concurrency": 1.5}, TypeError, "max_concurrency"),
        ({"rounds": 0}, ValueError, "rounds"),
        ({"backend": "ray"}, ValueError, "not available yet"),
        ({"progress": "yes"}, TypeError, "progress"),
        ({"iterable": []}, ValueError, "empty"),
        ({"iterable": iter(())}, ValueError, "empty"),
    ],
)
def test_bad_input_fails_at_call_time(kwargs: dict[str, Any], error: type, match: str) -> None:
    """Each bad argument is a TypeError/ValueError naming it, before any worker starts."""
    call: dict[str, Any] = {"fn": square, "iterable": range(3), **kwargs}
    fn, iterable = call.pop("fn"), call.pop("iterable")
    with pytest.raises(error, match=match):
        parstream.compare(fn, iterable, **call)
    assert parstream.default_supervisor(start=False) is None  # nothing was started


class OldSequence:
    """Items by index up to IndexError: the protocol a for loop and map() take."""

    def __getitem__(self, i: int) -> int:
        if i >= 3:
            raise IndexError(i)
        return i


def test_an_old_style_sequence_is_taken_as_map_takes_it() -> None:
    assert list(parstream.map(square, OldSequence())) == [0, 1, 4]  # type: ignore[arg-type]
    comparison = parstream.compare(square, OldSequence(), rounds=1, progress=False)  # type: ignore[arg-type]
    assert comparison.items == 3


def test_default_supervisor_is_used_and_left_open() -> None:
    """Without max_concurrency the default supervisor's warm workers are used, not closed."""
    c = parstream.compare(square, range(4), rounds=1, progress=False)
    sup = parstream.default_supervisor()
    assert c.workers == sup.max_workers
    assert not sup.closed
    assert c.rounds == 1


def test_local_backend_is_accepted() -> None:
    """backend='local' is today's only backend, and it works."""
    c = parstream.compare(square, range(4), max_concurrency=1, backend="local", progress=False)
    assert c.workers == 1
    assert c.items == 4


def test_str_is_a_short_table_with_the_advice() -> None:
    """str() gives the medians, spreads, speedup and advice in a few lines."""
    text = str(made_up())
    lines = text.splitlines()
    assert len(lines) <= 8
    assert "8 items (sample of 800)" in lines[0]
    assert lines[0].endswith(", load 0.5")
    assert any(line.split()[:2] == ["sequential", "400"] for line in lines)
    assert "390 ms - 450 ms" in text
    assert "1.90x" in text
    assert lines[-1].startswith("advice: parallel pays")


def test_html_repr_has_a_table_and_bars() -> None:
    """_repr_html_ holds the table, one bar per mode and the (escaped) advice."""
    page = made_up(advice="use <b>this</b>")._repr_html_()
    assert '<table class="parstream-compare-table">' in page
    assert page.count("background:#4c72b0") == 1
    assert page.count("background:#c44e52") == 1
    assert "use &lt;b&gt;this&lt;/b&gt;" in page
    assert "1.90&times;" in page


def test_to_dict_is_json_ready() -> None:
    """to_dict() round-trips through JSON with every field."""
    c = made_up()
    record = json.loads(json.dumps(c.to_dict()))
    assert parstream.Comparison(**record) == c


def test_plot_returns_a_figure() -> None:
    """plot() draws both bars with their spread on a matplotlib Figure."""
    pytest.importorskip("matplotlib")
    from matplotlib.figure import Figure

    fig = made_up().plot()
    assert isinstance(fig, Figure)
    (ax,) = fig.axes
    assert [t.get_text() for t in ax.get_yticklabels()] == ["sequential", "parallel"]


def test_plot_without_matplotlib_says_how_to_get_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """With matplotlib missing, plot() raises ImportError naming the install command."""
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(ImportError, match=r"pip install matplotlib.*parstream\[plot\]"):
        made_up().plot()


def test_advice_for_cpu_work_extrapolates_with_amdahl() -> None:
    """A CPU-bound speedup of 1.9 on 2 workers: parallel, and about 5.8x on 8 cores."""
    verdict, advice = _advise(
        items=8,
        total=8000,
        seq_s=0.4,
        par_s=0.4 / 1.9,
        speedup=1.9,
        cost=0.05,
        overhead=0.003,
        cpu_share=0.98,
        result_bytes=28,
        workers=2,
        cores=2,
    )
    assert verdict == "parallel"
    # p = (1 - 1/1.9) / (1 - 1/2) = 0.947; 1 / (0.053 + 0.947 / 8) = 5.8
    assert advice.startswith("parallel pays: parstream.map is 1.9x faster on 2 workers; ")
    assert "expect about 5.8x on 8 cores" in advice
    assert "For all 8,000 items expect about 6.7 min sequential and 3.5 min parallel" in advice


def test_advice_on_a_busy_machine_says_so() -> None:
    """Coarse items without a speedup under a high load: the load is named, not the items."""
    verdict, advice = _advise(
        items=8,
        total=None,
        seq_s=0.4,
        par_s=0.41,
        speedup=0.4 / 0.41,
        cost=0.05,
        overhead=0.05,
        cpu_share=0.9,
        result_bytes=4,
        workers=2,
        cores=2,
        load=6.5,
    )
    assert verdict == "sequential"
    assert "the machine is busy (load average 6.5 on 2 cores)" in advice
    assert "measure again when it is quieter" in advice


def test_advice_when_results_are_big() -> None:
    """Big results that cost more to ship than to make: the transfer is named."""
    verdict, advice = _advise(
        items=10,
        total=None,
        seq_s=0.01,
        par_s=0.2,
        speedup=0.05,
        cost=0.001,
        overhead=0.04,
        cpu_share=1.0,
        result_bytes=8_000_000,
        workers=2,
        cores=2,
    )
    assert verdict == "transfer"
    assert advice.startswith("results are 8.0 MB each: the transfer dominates")


def test_advice_for_waiting_items() -> None:
    """Items that mostly wait: more concurrency than cores is suggested."""
    verdict, advice = _advise(
        items=8,
        total=None,
        seq_s=0.4,
        par_s=0.2,
        speedup=2.0,
        cost=0.05,
        overhead=0.001,
        cpu_share=0.01,
        result_bytes=4,
        workers=2,
        cores=2,
    )
    assert verdict == "more-concurrency"
    assert "max_concurrency above the core count" in advice


# -- the command line ------------------------------------------------------------

USER_MODULE = """
def coarse(n):
    total = 0
    for i in range(50_000):
        total += i * i
    return n + total % 2

def make_items():
    return range(4)

def make_empty():
    return []

def make_int():
    return 5

def make_boom():
    raise RuntimeError("no data today")

def make_failing_generator():
    yield 1
    raise OSError("data file vanished")

class OldSeq:
    def __getitem__(self, i):
        if i >= 3:
            raise IndexError(i)
        return i

def make_old_sequence():
    return OldSeq()

def slow(n):
    import time
    time.sleep(0.2)
    return n

def make_many():
    return range(1000)

NOT_CALLABLE = 3
"""

SCRIPT_MODULE = """
import sys
sys.exit(0)
"""


def cli(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    (tmp_path / "userjob.py").write_text(textwrap.dedent(USER_MODULE))
    (tmp_path / "scriptlike.py").write_text(textwrap.dedent(SCRIPT_MODULE))
    return subprocess.run(
        [sys.executable, "-m", "parstream", "compare", *args],
        cwd=tmp_path,
        env={**_env(), "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def _env() -> dict[str, str]:
    import os

    return {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}


@pytest.mark.slow
def test_cli_prints_the_table_and_writes_json(tmp_path: Path) -> None:
    """The CLI prints the table and advice, and --json writes the record."""
    out = tmp_path / "record.json"
    proc = cli(
        tmp_path,
        "userjob:coarse",
        "userjob:make_items",
        "--max-concurrency",
        "2",
        "--sample",
        "3",
        "--json",
        str(out),
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("parstream.compare: 3 items (sample of 4), 2 workers")
    assert "\nadvice: " in proc.stdout
    assert "compare:" in proc.stderr  # the progress bar
    record = json.loads(out.read_text())
    assert record["items"] == 3
    assert record["total_items"] == 4
    assert record["workers"] == 2
    assert record["advice"] in proc.stdout


BAD_TARGETS = {
    "no module": (["nosuchmodule:fn", "userjob:make_items"], "cannot import module"),
    "no attribute": (["userjob:nope", "userjob:make_items"], "has no attribute 'nope'"),
    "no colon": (["userjob", "userjob:make_items"], "must look like package.module:name"),
    "fn not callable": (["userjob:NOT_CALLABLE", "userjob:make_items"], "is not callable"),
    "make_items not callable": (["userjob:coarse", "userjob:NOT_CALLABLE"], "is not callable"),
    "not an iterable": (["userjob:coarse", "userjob:make_int"], "returned int, not an iterable"),
    "make_items raises": (["userjob:coarse", "userjob:make_boom"], "raised RuntimeError"),
    "empty": (["userjob:coarse", "userjob:make_empty"], "iterable is empty"),
    # Before the comparison runs, not after it (a raw FileNotFoundError).
    "json dir missing": (
        ["userjob:coarse", "userjob:make_items", "--json", "/nonexistent/dir/x.json"],
        "--json: /nonexistent/dir is not a directory",
    ),
    # Found by the compare hunt: each of these ran the whole comparison,
    # then ended in a traceback (or exited silently).
    "json is a directory": (
        ["userjob:coarse", "userjob:make_items", "--json", "/tmp"],
        "--json: /tmp is a directory",
    ),
    "json not writable": (
        ["userjob:coarse", "userjob:make_items", "--json", "/proc/record.json"],
        "--json: /proc/record.json cannot be written",
    ),
    "items fail as read": (
        ["userjob:coarse", "userjob:make_failing_generator"],
        "reading the items of userjob:make_failing_generator() raised OSError",
    ),
    "module exits at import": (
        ["scriptlike:fn", "userjob:make_items"],
        "importing 'scriptlike' called sys.exit(0)",
    ),
}


@pytest.mark.parametrize("case", list(BAD_TARGETS))
def test_cli_bad_target_is_one_line_and_status_2(tmp_path: Path, case: str) -> None:
    """Each bad target: one line on stderr naming the problem, exit status 2."""
    args, message = BAD_TARGETS[case]
    proc = cli(tmp_path, *args, "--no-progress")
    assert proc.returncode == 2
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert message in lines[0]
    assert "Traceback" not in proc.stderr


def test_cli_bad_option_is_a_usage_error(tmp_path: Path) -> None:
    """--sample 0 is refused by argparse with status 2; so is a number past
    sys.maxsize (it ended in compare's ValueError, a traceback)."""
    proc = cli(tmp_path, "userjob:coarse", "userjob:make_items", "--sample", "0")
    assert proc.returncode == 2
    assert "--sample: must be >= 1" in proc.stderr
    huge = str(sys.maxsize + 1)
    proc = cli(tmp_path, "userjob:coarse", "userjob:make_items", "--max-concurrency", huge)
    assert proc.returncode == 2
    assert "--max-concurrency: must be <=" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_cli_takes_an_old_style_sequence_as_compare_does(tmp_path: Path) -> None:
    proc = cli(tmp_path, "userjob:coarse", "userjob:make_old_sequence", "--no-progress")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("parstream.compare: 3 items")


def test_cli_ctrl_c_is_one_line_and_status_130(tmp_path: Path) -> None:
    (tmp_path / "userjob.py").write_text(textwrap.dedent(USER_MODULE))
    proc = subprocess.Popen(
        [sys.executable, "-m", "parstream", "compare", "userjob:slow", "userjob:make_many"],
        cwd=tmp_path,
        env={**_env(), "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        assert proc.stderr is not None
        os.read(proc.stderr.fileno(), 1)  # the progress bar: it has begun
        os.killpg(proc.pid, signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    assert "python -m parstream compare: interrupted" in err.splitlines()


def test_cpu_share_counts_the_subprocesses_fn_waits_for() -> None:
    """An fn whose work runs in a child process was judged to mostly wait
    (CPU busy ~0%), and the advice was to oversubscribe the cores."""
    result = parstream.compare(spin_in_a_subprocess, range(2), rounds=1, progress=False)
    assert result.cpu_share > 0.3


def test_advice_speaks_of_the_workers_the_sample_kept_busy() -> None:
    """A sample of 8 items on 16 workers: the advice said 8 workers under a
    header of 16, and extrapolated the whole input's time on 8."""
    verdict, advice = _advise(
        busy=8,
        items=8,
        total=100,
        seq_s=0.4,
        par_s=0.05,
        speedup=8.0,
        cost=0.05,
        overhead=0.001,
        cpu_share=0.01,
        result_bytes=4,
        workers=16,
        cores=2,
    )
    assert verdict == "more-concurrency"
    assert "with 8 workers" in advice
    assert "e.g. 64" in advice  # above the 16 already asked for
    assert "and 312 ms parallel" in advice  # 100 items on 16 workers, not on 8
