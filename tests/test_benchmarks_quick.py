"""The benchmark suite's quick mode runs and writes a well-formed JSON and PNG."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_quick_benchmark_writes_json_and_png(tmp_path: Path) -> None:
    """`python -m benchmarks --quick` exits 0 and leaves one JSON and one PNG."""
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--quick", "--out", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=170,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    jsons = list(tmp_path.glob("*.json"))
    pngs = list(tmp_path.glob("*.png"))
    assert len(jsons) == 1, jsons
    assert len(pngs) == 1, pngs
    report = json.loads(jsons[0].read_text())
    assert report["machine"]["cores"] >= 1
    assert report["machine"]["python"]
    assert set(report["results"]) == {
        "cpu",
        "tiny",
        "roundtrip",
        "cold",
        "io",
        "faults",
        "infinite",
        "numpy",
    }
    for name in ("cpu", "tiny", "io", "numpy"):
        rows = report["results"][name]["rows"]
        assert rows["sequential"]["median"] > 0, name
        assert rows["parstream"]["median"] > 0, name
    assert "parstream" in report["results"]["roundtrip"]["rows"]
    png = pngs[0].read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    image = plt.imread(pngs[0])
    assert image.shape[0] > 100
    assert image.shape[1] > 100
    assert str(tmp_path) in proc.stdout


def test_unknown_workload_is_a_usage_error() -> None:
    """A misspelt --only name fails fast with a usage error naming the choices."""
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--only", "nope"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 2
    assert "unknown workload" in proc.stderr
