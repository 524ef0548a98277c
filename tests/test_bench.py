"""The benchmark scripts run (tiny sizes) and report every figure; timings are not asserted."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench"


def run_bench(script: str, out: Path, *args: str) -> tuple[str, object]:
    """Run ``bench/SCRIPT ARGS --json OUT``; returns its stdout and the JSON it wrote."""
    result = subprocess.run(
        [sys.executable, str(BENCH / script), *args, "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout, json.loads(out.read_text())


def test_bench_shm_reports_all_methods(tmp_path) -> None:
    stdout, rows = run_bench(
        "bench_shm.py", tmp_path / "rows.json", "--sizes", "4KiB,64KiB", "--seconds", "0.01"
    )
    assert {(r["size"], r["method"]) for r in rows} == {
        (s, m) for s in (4096, 65536) for m in ("raw copy", "shm://", "mp.Queue")
    }
    for r in rows:
        assert r["gbps"] > 0 and 0 < r["median_us"] <= r["p99_us"]
    assert "vs Queue" in stdout


def test_bench_mpi_reports_every_transport_and_rank_count(tmp_path) -> None:
    _, rows = run_bench(
        "bench_mpi.py",
        tmp_path / "rows.json",
        *("--ranks", "1,2", "--schemes", "h5,zarr,shm", "--mib", "1", "--steps", "2"),
        *("--repeat", "1"),
    )
    assert {(r["transport"], r["ranks"]) for r in rows} == {
        (t, n) for t in ("plain-h5", "h5", "zarr", "shm") for n in (1, 2)
    }
    assert all(r["gb_per_s"] > 0 for r in rows)


def test_bench_loaders_compares_with_the_naive_reader(tmp_path) -> None:
    stdout, report = run_bench(
        "bench_loaders.py",
        tmp_path / "report.json",
        *("--samples", "256", "--sample-kib", "4", "--steps", "2", "--repeat", "1"),
    )
    assert report["samples"] == 256 and report["sample_bytes"] == 4096
    assert {(r["file"], r["workers"]) for r in report["results"]} == {
        (f, w) for f in ("dataplane.h5", "plain.h5") for w in (0, 2)
    }
    for r in report["results"]:
        assert r["naive_s"] > 0 and r["dataplane_blockNone_s"] > 0 and r["dataplane_block64_s"] > 0
    assert "x naive" in stdout


def test_bench_cache_reports_limits_readers_and_belady(tmp_path) -> None:
    out = tmp_path / "rows.jsonl"
    result = subprocess.run(
        [sys.executable, str(BENCH / "bench_cache.py"), "--quick", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    what = {r["what"] for r in rows}
    assert {"memcpy", "64KiB sequential read cold", "4KiB sequential read warm"} <= what
    for kib in (64, 4):
        for fmt in ("h5", "bp5", "zarr"):
            for kind in ("cold w=0", "warm w=0", "warm w=2"):
                assert f"{kib}KiB dataplane {fmt} {kind}" in what
        assert f"{kib}KiB naive h5py chunked warm w=2" in what
        assert f"{kib}KiB naive h5py contiguous cold w=0" in what
        assert f"{kib}KiB DataLoader ceiling w=2" in what
    for r in rows:
        assert r.get("gbps", 1) > 0 and r.get("sps", 1) > 0
    half = next(r for r in rows if r["what"] == "half-size cache: shard reads")
    assert half["reads"] >= half["belady_min"] > 0
