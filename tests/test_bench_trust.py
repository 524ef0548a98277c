"""`dataplane bench` figures a user can trust and compare: repeats and their spread, the load
of the machine during each cell, cut epochs marked, smoke tests labelled, and `dataplane bench
compare` over two real runs. (Limit lines and the spread across MPI ranks: test_bench.py.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dataplane.bench import load
from dataplane.bench.report import SMOKE, markdown, plot_data

pytestmark = pytest.mark.timeout(300)


def bench(tmp_path: Path, out: str, *args: str) -> tuple[list[dict], str]:
    """Run ``dataplane bench ARGS`` into ``tmp_path/out``; its JSON lines and Markdown."""
    folder = tmp_path / out
    done = subprocess.run(
        [sys.executable, "-m", "dataplane.cli", "bench", *args]
        + ["--dir", str(tmp_path / "data"), "--out", str(folder), "--cache-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=280,
        stdin=subprocess.DEVNULL,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [json.loads(line) for line in (folder / "bench.jsonl").read_text().splitlines()]
    return rows, (folder / "bench.md").read_text()


def test_repeats_give_median_and_spread_cut_epochs_are_marked(tmp_path) -> None:
    rows, report = bench(
        tmp_path,
        "out",
        *("read", "--quick", "--repeats", "2", "--transports", "h5", "--workers", "0"),
        *("--max-seconds", "0.005"),
    )
    reads = [r for r in rows if r["phase"] == "read" and r["rank"] is None]
    assert len(reads) == 3 * 2 * 2  # patterns x readers x cold/warm
    for r in reads:
        assert r["repeats"] == 2 and r["config"]["repeats"] == 2
        low, high = r["spread"]["samples_per_s"]
        assert 0 < low <= r["samples_per_s"] <= high
        # The load of the machine during the cell, over both repeats.
        assert r["load"]["samples"] == 2 and isinstance(r["load"]["busy"], bool)
        assert r["load"]["other_cores"] >= 0 and r["load"]["cpus"] >= 1
    assert "Each figure is the median of 2 runs" in report
    row = reads[0]
    assert f"({row['spread']['samples_per_s'][0]:,.0f}–" in report
    # A 5 ms epoch is cut: marked in the table, with the samples it was measured over.
    cut = [r for r in reads if not r["complete"]]
    assert cut and all(0 < r["samples"] < r["of_samples"] == 1024 for r in cut)
    assert "* epoch cut at `--max-seconds`" in report
    first = cut[0]
    assert f"{first['samples']:,} of 1,024 samples" in report
    assert f"{first['samples_per_s']:,.0f} (" in report  # the cell itself, starred
    # A figure measured on a busy machine is marked, and the footnote says how busy.
    busy = dict(first, load={**first["load"], "busy": True, "other_cores": 1.5})
    text = markdown([busy if r is first else r for r in rows])
    assert "*†" not in text and "†*" in text  # the cut cell: busy, then cut
    # (the worst busy cell: this one, or one the machine really was busy in)
    worst = max([1.5] + [r["load"]["other_cores"] for r in reads if r["load"]["busy"]])
    assert f"† measured on a busy machine (other processes up to {worst:.2f} of" in text
    assert "* epoch cut at `--max-seconds`" in text
    # A smoke test says so: every JSON line, every table, every plot title.
    assert all(r.get("smoke_test") is True for r in rows)
    tables = sum(line.startswith("|---") for line in report.splitlines())
    assert report.count(SMOKE) == tables + 1  # each table and the heading
    assert plot_data(rows)["title_suffix"] == " (smoke test: --quick)"


def test_compare_puts_two_runs_side_by_side(tmp_path) -> None:
    args = ("stream", "--quick", "--repeats", "2", "--transports", "shm")
    a_rows, _ = bench(tmp_path, "a", *args)
    bench(tmp_path, "b", *args, "--stream-seconds", "0.1")
    cli = [sys.executable, "-m", "dataplane.cli", "bench", "compare"]
    done = subprocess.run(
        [*cli, str(tmp_path / "a"), str(tmp_path / "b"), "--json"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    cells = {c["cell"]: c for c in result["cells"]}
    assert {"stream raw copy 64 KiB", "stream shm:// 64 KiB", "stream mp.Queue 64 KiB"} <= set(
        cells
    )
    assert "limit memcpy" in cells
    a = {r["method"]: r for r in a_rows if r["phase"] == "stream" and r["rank"] is None}
    for method in ("raw copy", "shm://", "mp.Queue"):
        c = cells[f"stream {method} 64 KiB"]
        assert c["a"] == a[method]["gbps"] and c["ratio"] == pytest.approx(c["b"] / c["a"])
        assert c["a_range"] == a[method]["spread"]["gbps"]
        lo_a, hi_a = c["a_range"]
        lo_b, hi_b = c["b_range"]
        assert c["beyond_spread"] == (hi_a < lo_b or hi_b < lo_a)
    # The setting that differs is named; both runs are smoke tests.
    assert result["settings"] == {"stream_seconds": [0.2, 0.1]}
    assert result["smoke_test"] == [True, True]
    text = subprocess.run(
        [*cli, str(tmp_path / "a"), str(tmp_path / "b")], capture_output=True, text=True
    ).stdout
    assert "| stream shm:// 64 KiB | GB/s |" in text and "`stream_seconds`" in text
    assert "A is a smoke test" in text
    # Not two output folders: a clear error.
    bad = subprocess.run([*cli, str(tmp_path / "a")], capture_output=True, text=True)
    assert bad.returncode == 1 and "takes two --out folders" in bad.stderr
    bad = subprocess.run(
        [*cli, str(tmp_path / "a"), str(tmp_path / "data")], capture_output=True, text=True
    )
    assert bad.returncode == 1 and "holds no bench.jsonl" in bad.stderr


def _spin(seconds: float, clock: str) -> list[str]:
    """A process that spins until ``clock`` (time.time or time.process_time) passes
    ``seconds``."""
    code = f"import time\nt = {clock}() + {seconds}\nwhile {clock}() < t: pass"
    return [sys.executable, "-c", code]


def test_the_meter_tells_other_processes_from_the_jobs_own() -> None:
    """The job's own children count as the job; a process outside the job is load."""
    me = os.getpid()
    before = load._processes()
    child = subprocess.Popen(_spin(1.0, "time.process_time"))  # 1 s of CPU
    try:
        child.wait(timeout=30)  # reaped: its time moves into ours
    finally:
        child.kill()
    job, _ = load.split_ticks(before, load._processes(), {me})
    assert job >= 0.9 * load._TICK
    # A spinner whose parent exits at once belongs to init: not the job's.
    outsider = subprocess.run(
        [
            "sh",
            "-c",
            " ".join(f"'{a}'" for a in _spin(3.0, "time.time")) + " >/dev/null 2>&1 & echo $!",
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    pid = int(outsider.stdout.strip())
    meter = load.Meter([me])
    mark = meter.start()
    deadline = time.monotonic() + 1.0
    while time.monotonic() < deadline:  # this process sleeps: only the outsider works
        time.sleep(0.05)
    seen = meter.stop(mark)
    assert seen["other_cores"] > 0.5 and seen["busy"], seen
    try:
        os.kill(pid, 9)
    except ProcessLookupError:
        pass
    assert load.merge([seen, {**seen, "busy": False, "other_cores": 0.0}])["busy"] is True
