"""The benchmark scripts run (tiny sizes) and report every figure; timings are not asserted."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench"


def test_bench_shm_reports_all_methods(tmp_path) -> None:
    out = tmp_path / "rows.json"
    result = subprocess.run(
        [
            sys.executable,
            str(BENCH / "bench_shm.py"),
            "--sizes",
            "4KiB,64KiB",
            "--seconds",
            "0.01",
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    rows = json.loads(out.read_text())
    assert {(r["size"], r["method"]) for r in rows} == {
        (s, m) for s in (4096, 65536) for m in ("raw copy", "shm://", "mp.Queue")
    }
    for r in rows:
        assert r["gbps"] > 0 and 0 < r["median_us"] <= r["p99_us"]
    assert "vs Queue" in result.stdout


def test_bench_mpi_reports_every_transport_and_rank_count(tmp_path) -> None:
    out = tmp_path / "rows.json"
    result = subprocess.run(
        [
            sys.executable,
            str(BENCH / "bench_mpi.py"),
            "--ranks",
            "1,2",
            "--schemes",
            "h5,zarr,shm",
            "--mib",
            "1",
            "--steps",
            "2",
            "--repeat",
            "1",
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    rows = json.loads(out.read_text())
    assert {(r["transport"], r["ranks"]) for r in rows} == {
        (t, n) for t in ("plain-h5", "h5", "zarr", "shm") for n in (1, 2)
    }
    assert all(r["gb_per_s"] > 0 for r in rows)
