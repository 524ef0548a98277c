"""The benchmark scripts run (tiny sizes) and report every figure; timings are not asserted."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from dataplane.bench.report import plot_data

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


def test_bench_mpi_reports_every_transport_and_rank_count(tmp_path) -> None:
    _, rows = run_bench(
        "bench_mpi.py",
        tmp_path / "rows.json",
        *("--ranks", "1,2", "--schemes", "h5,h5@ranks,zarr,shm", "--mib", "1", "--steps", "2"),
        *("--repeat", "1"),
    )
    assert {(r["transport"], r["ranks"]) for r in rows} == {
        (t, n) for t in ("plain-h5", "h5", "h5@ranks", "zarr", "shm") for n in (1, 2)
    }
    assert all(r["gb_per_s"] > 0 for r in rows)


# -- the pytest-benchmark suite (bench/test_*.py) -----------------------------------------------
def run_suite(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pytest", str(BENCH), "--benchmark-only", "--quick", "-q"]
        + ["-p", "no:cacheprovider", "--benchmark-storage", f"file://{tmp_path / 'saved'}"]
        + ["--bench-dir", str(tmp_path), *args],
        capture_output=True,
        text=True,
        timeout=280,
        stdin=subprocess.DEVNULL,
        cwd=BENCH.parent,
    )


@pytest.mark.timeout(300)
def test_benchmark_suite_runs_quick_with_dataplane_beside_its_baseline(tmp_path) -> None:
    """Every group holds dataplane and a plain-library baseline; every benchmark checked the
    values it moved (a wrong value fails the run); the JSON carries GB/s; a later run is
    compared with a saved one."""
    done = run_suite(tmp_path, "--benchmark-json", str(tmp_path / "run.json"), "--benchmark-save=a")
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    report = json.loads((tmp_path / "run.json").read_text())
    groups: dict[str, set[str]] = {}
    for b in report["benchmarks"]:
        groups.setdefault(b["group"], set()).add(b["extra_info"]["side"])
        assert b["stats"]["rounds"] == 1 and positive(b["stats"]["median"], b["extra_info"]["GB/s"])
    assert all(sides == {"dataplane", "baseline"} for sides in groups.values()), groups
    kinds = {g.split()[0] for g in groups}
    assert kinds == {"write", "read", "stream", "epoch"}
    assert {"write h5: 2 steps of 1 MiB", "read zarr rows", "stream 64 KiB steps"} <= set(groups)
    assert {"epoch 4KiB workers=0", "epoch 4KiB workers=2"} <= set(groups)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("dp-bench-")] == []
    # --benchmark-compare against the saved run: a regression beyond the threshold fails.
    (saved,) = (tmp_path / "saved").rglob("0001_a.json")
    again = run_suite(tmp_path, "-k", "test_read and h5", "--benchmark-compare=0001")
    assert again.returncode == 0, again.stdout[-4000:]
    assert "0001_a" in again.stdout and saved.exists()


def test_bench_many_files_reports_cold_and_warm(tmp_path) -> None:
    stdout, report = run_bench(
        "bench_many_files.py",
        tmp_path / "report.json",
        *("--files", "6", "--rows", "10", "--sample-kib", "4", "--repeat", "1"),
        *("--helpers", "1"),
    )
    assert report["samples"] == 6 * 2 * 10
    assert [r["workers"] for r in report["results"]] == [0, 2]
    for r in report["results"]:
        assert min(r[k] for k in r if k != "workers") > 0
    assert set(report["look_s"]) == {"0", "1"} and min(report["look_s"].values()) > 0
    assert "cold" in stdout and "warm" in stdout and "new job" in stdout


@pytest.mark.timeout(300)
def test_bench_coop_compares_cooperating_node_caches_with_caches_alone(tmp_path) -> None:
    out = tmp_path / "coop.json"
    done = subprocess.run(
        [MPIEXEC, "-n", "2", sys.executable, str(BENCH / "bench_coop.py"), "--mib", "8"]
        + ["--epochs", "2", "--source-mbs", "1000", "--latency-ms", "1", "--dir", str(tmp_path)]
        + ["--json", str(out)],
        capture_output=True,
        text=True,
        timeout=280,
        stdin=subprocess.DEVNULL,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(out.read_text())
    alone, coop = report["alone"], report["cooperating"]
    assert alone["bad"] == 0 and coop["bad"] == 0
    assert len(alone["epoch_s"]) == len(coop["epoch_s"]) == 2
    assert coop["source_over_dataset"] <= 1.1 and coop["peer_mb"] > 0
    assert alone["source_over_dataset"] > coop["source_over_dataset"]
    assert "later epochs: cooperating" in done.stdout
    assert [p.name for p in tmp_path.iterdir()] == ["coop.json"], "nothing left behind"


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


# -- dataplane bench ---------------------------------------------------------------------------
FILES = ("bp5", "h5", "zarr")
PATTERNS = ("sequential", "shuffled", "block")
MPIEXEC = shutil.which("mpiexec", path=os.path.dirname(sys.executable)) or shutil.which("mpiexec")


def strict_json(line: str) -> dict:
    """A JSON line without NaN or Infinity (a figure that is not a number is a bug)."""

    def refuse(name: str) -> None:
        raise AssertionError(f"{name} in {line[:200]}")

    return json.loads(line, parse_constant=refuse)


def run_dataplane_bench(tmp_path: Path, *args: str, ranks: int = 1) -> list[dict]:
    out = tmp_path / "results"
    cmd = [sys.executable, "-m", "dataplane.cli", "bench", *args]
    cmd += ["--dir", str(tmp_path / "data"), "--out", str(out), "--cache-dir", str(tmp_path)]
    if ranks > 1:
        assert MPIEXEC, "mpiexec not found: `pip install mpich` (the dev extra) provides one"
        cmd = [MPIEXEC, "-n", str(ranks), *cmd]
    result = subprocess.run(
        cmd, capture_output=True, text=True, timeout=280, stdin=subprocess.DEVNULL
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "\r" not in result.stderr  # no progress bar: stderr is not a terminal
    assert "## Limits of this machine" in result.stdout
    rows = [strict_json(line) for line in (out / "bench.jsonl").read_text().splitlines()]
    assert rows and (out / "bench.md").read_text().startswith("# dataplane bench")
    # Nothing of the run is left behind: data directory and node-local cache.
    assert list((tmp_path / "data").iterdir()) == []
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("dp-bench-")]
    return rows


def figures(rows: list[dict], phase: str) -> list[dict]:
    return [r for r in rows if r["phase"] == phase and r["rank"] is None]


def positive(*values: float) -> bool:
    return all(isinstance(v, (int, float)) and 0 < v < float("inf") for v in values)


@pytest.mark.timeout(300)
def test_dataplane_bench_all_quick_reports_every_figure(tmp_path) -> None:
    rows = run_dataplane_bench(tmp_path, "all", "--quick")
    sample = 16 << 10
    for r in rows:
        assert r["ranks"] == 1 and r["config"]["quick"] and r["config"]["sample_size"] == sample
    limits = {r["what"]: r for r in figures(rows, "limit")}
    assert set(limits) == {
        "memcpy",
        "sequential write",
        "sequential read cold",
        "sequential read warm",
        "DataLoader ceiling",
    }
    assert limits["sequential read cold"]["evicted"] in ("drop_caches", "fadvise")
    assert positive(*(r.get("gbps", r.get("samples_per_s")) for r in limits.values()))

    writes = figures(rows, "write")
    assert {(r["transport"], r["mode"]) for r in writes} == {("plain h5py", "sync")} | {
        (t, m) for t in FILES for m in ("sync", "async")
    }
    for r in writes:
        assert r["bytes"] == 1024 * sample
        assert positive(r["blocked_ms_per_step"], r["vs_baseline_blocked"])
        assert 0 < r["blocked_fraction"] <= 1
        if r["mode"] == "sync":
            assert positive(r["gbps"], r["vs_baseline_gbps"], r["of_limit"])
        else:  # computing between steps twice as long as a synchronous write of a step
            sync = next(
                w for w in writes if w["transport"] == r["transport"] and w["mode"] == "sync"
            )
            assert r["compute_ms_per_step"] == pytest.approx(2 * sync["blocked_ms_per_step"])
            assert positive(r["vs_sync_blocked"]) and r["overhead_fraction"] >= 0

    reads = figures(rows, "read")
    assert {(r["transport"], r["pattern"], r["reader"], r["cache"]) for r in reads} == {
        (t, p, rd, c)
        for t in FILES
        for p in PATTERNS
        for rd in ("naive", "dataplane")
        for c in ("cold", "warm")
    }
    for r in reads:
        assert 0 < r["samples"] <= 1024 and positive(r["samples_per_s"], r["of_limit"])
        assert r["mb_per_s"] == pytest.approx(r["samples_per_s"] * sample / 1e6)
        if r["cache"] == "cold":
            assert r["evicted"] in ("drop_caches", "fadvise")
        if r["reader"] == "dataplane":
            assert positive(r["vs_naive"])
            if r["cache"] == "warm":
                # Two epochs: the cold one read every shard from the file exactly once (the
                # cache holds the data), the warm one only hit.
                stats = r["cache_stats"]
                assert stats["bytes_from_source"] == 1024 * sample, stats
                assert stats["hits"] > 0
        assert r["au"] is None  # no --compute-ms

    streams = figures(rows, "stream")
    assert {(r["method"], r["step_bytes"]) for r in streams} == {
        (m, 64 << 10) for m in ("raw copy", "shm://", "sst://", "mp.Queue")
    }
    for r in streams:
        assert positive(r["gbps"], r["median_us"], r["of_limit"])
        assert r["median_us"] <= r["p99_us"] and r["steps"] > 8
    for name in ("read", "write", "stream"):
        png = tmp_path / "results" / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # The plots draw the limits that bound them, in the units of the plot.
    data = plot_data(rows)
    per_sample = 1e9 / sample
    read = {x["label"]: x["value"] for x in data["read"]["limits"]}
    assert read == {
        "DataLoader ceiling": limits["DataLoader ceiling"]["samples_per_s"],
        "sequential read, cold": pytest.approx(limits["sequential read cold"]["gbps"] * per_sample),
        "memcpy": pytest.approx(limits["memcpy"]["gbps"] * per_sample),
    }
    assert {x["label"]: x["value"] for x in data["write"]["limits"]} == {
        "sequential write": limits["sequential write"]["gbps"],
        "memcpy": limits["memcpy"]["gbps"],
    }
    assert [x["label"] for x in data["stream"]["limits"]] == ["memcpy"]
    # Bars carry the spread of the repeats: one run here, so min = median = max.
    series = data["read"]["series"]
    assert [s["label"] for s in series] == [
        "naive cold",
        "naive warm",
        "dataplane cold",
        "dataplane warm",
    ]
    assert all(s["min"] == s["values"] == s["max"] and len(s["values"]) == 9 for s in series)
    assert data["title_suffix"] == " (smoke test: --quick)"
    assert all(r["smoke_test"] and r["config"]["repeats"] == 1 for r in rows)


@pytest.mark.timeout(300)
def test_dataplane_bench_under_mpi_reports_aggregate_and_per_rank(tmp_path) -> None:
    rows = run_dataplane_bench(
        tmp_path,
        *("all", "--quick", "--transports", "h5,shm", "--workers", "1", "--compute-ms", "2"),
        *("--nodes", "2"),
        ranks=2,
    )
    assert {r["ranks"] for r in rows} == {2}
    for phase in ("write", "read", "stream"):
        mine = [r for r in rows if r["phase"] == phase]
        assert {r["rank"] for r in mine} == {None, 0, 1}, phase
    # Each rank read its own half of every epoch: the aggregate counts both.
    for r in figures(rows, "read"):
        per_rank = [
            x
            for x in rows
            if x["phase"] == "read"
            and x["rank"] is not None
            and (x["transport"], x["pattern"], x["reader"], x["cache"])
            == (r["transport"], r["pattern"], r["reader"], r["cache"])
        ]
        assert len(per_rank) == 2 and 0 < r["samples"] <= 1024
        assert r["samples"] == sum(x["samples"] for x in per_rank)
        assert all(x["samples"] <= 512 for x in per_rank)  # each rank reads its half
        assert r["seconds"] == max(x["seconds"] for x in per_rank)
        assert 0 < r["au"] <= 1  # with --compute-ms
    writes = figures(rows, "write")
    # h5:// under MPI also with aggregators=1 and =ranks; the default (one aggregator per
    # node: here 1) is not measured twice. Each row says how the ranks wrote, as inspect does.
    assert sorted((r["transport"], r["mode"], r["written"]) for r in writes) == [
        ("h5", "async", "aggregators=1"),
        ("h5", "sync", "aggregators=1"),
        ("h5", "sync", "aggregators=2"),
        ("plain h5py", "sync", "a file per rank"),
    ]
    per_rank = [r for r in rows if r["phase"] == "write" and r["rank"] is not None]
    assert sorted((r["written"], r["rank"]) for r in per_rank if r["mode"] == "sync") == [
        (w, rank) for w in ("a file per rank", "aggregators=1", "aggregators=2") for rank in (0, 1)
    ]
    report = (tmp_path / "results" / "bench.md").read_text()
    assert "| ranks write |" in report and "| aggregators=2 |" in report
    # --nodes 2: a "node" of one rank each, caches alone and cooperating, fresh each time.
    nodes = {r["mode"]: r for r in figures(rows, "nodes")}
    assert set(nodes) == {"alone", "cooperating"}
    for r in nodes.values():
        assert r["cache_nodes"] == 2 and len(r["epochs_samples_per_s"]) == 3
        assert positive(*r["epochs_samples_per_s"])
    coop, alone = nodes["cooperating"], nodes["alone"]
    assert coop["source_over_dataset"] <= 1.1 and coop["peer_bytes"] > 0, coop
    assert coop["peer_failures"] == 0 and alone["peer_bytes"] == 0
    assert alone["source_over_dataset"] >= coop["source_over_dataset"]
    assert positive(coop["vs_alone"])
    assert "## Cooperating node caches" in report
    # The spread across ranks: the slowest bounds a synchronous training step.
    for r in figures(rows, "read") + figures(rows, "write") + figures(rows, "stream"):
        sp = r["rank_spread"]
        assert sp is not None and 0 <= sp["min"] <= sp["median"] <= sp["max"], r
    for r in figures(rows, "read"):
        per_rank = sorted(
            x["samples_per_s"]
            for x in rows
            if x["phase"] == "read"
            and x["rank"] is not None
            and (x["transport"], x["pattern"], x["reader"], x["cache"])
            == (r["transport"], r["pattern"], r["reader"], r["cache"])
        )
        assert [r["rank_spread"]["min"], r["rank_spread"]["max"]] == pytest.approx(
            [per_rank[0], per_rank[-1]]
        )
    assert "## Across ranks" in report and "| slowest rank |" in report


def test_dataplane_bench_rejects_bad_options(tmp_path, capsys) -> None:
    from dataplane.cli import main

    for args, message in (
        (["--transports", "h5,nfs"], "unknown transport(s) nfs; choose from bp5, h5, zarr"),
        (["--sample-size", "10"], "multiple of 4 bytes"),
        (["--sample-size", "lots"], "not a size: 'lots'"),
        (["--samples", "4", "--steps", "8"], "every step holds at least one sample"),
        (["--nodes", "0"], "--nodes must be at least 1"),
        (["--nodes", "3", "--quick"], "--nodes 3 needs at least as many ranks"),
        (["--repeats", "0"], "--repeats must be at least 1"),
    ):
        assert main(["bench", "all", "--dir", str(tmp_path), *args]) == 1
        assert message in capsys.readouterr().err
    assert main(["bench", "read"]) == 1
    assert "--dir is required" in capsys.readouterr().err
    assert main(["bench", "read", "old-results", "--dir", str(tmp_path)]) == 1
    assert "only `dataplane bench compare A B` takes folders" in capsys.readouterr().err


@pytest.mark.timeout(300)
def test_soak_runs_briefly_and_reports_growth(tmp_path) -> None:
    """``make soak`` runs this for 10 minutes per transport; here a few seconds each."""
    out = tmp_path / "soak.json"
    done = subprocess.run(
        [sys.executable, str(BENCH / "soak.py"), "--seconds", "3", "--epochs", "3"]
        + ["--json", str(out)],
        capture_output=True,
        text=True,
        timeout=280,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    results = json.loads(out.read_text())
    streams = {r["transport"]: r for r in results if "transport" in r}
    assert set(streams) == {"mem", "shm", "sst"}
    for r in streams.values():
        assert r["steps"] > 10 and r["dropped"] == 0 and r["lost_or_reordered"] == 0
        assert r["bytes"] == r["steps"] * (1 << 20)
        assert "reader_rss_growth" in r and "temp_files_growth" in r
    epochs = next(r for r in results if "epochs" in r)
    assert epochs["samples"] == 3 * 16 * 256 and epochs["evictions"] > 0
    assert epochs["cache_bytes"] <= epochs["capacity"]
