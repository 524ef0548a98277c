"""Every example runs (small sizes), under mpiexec where it is an MPI program, and does what
its docs say."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

import dataplane as dp

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
MPIEXEC = shutil.which("mpiexec", path=os.path.dirname(sys.executable)) or shutil.which("mpiexec")
SMALL = ("--n", "32", "--steps", "6", "--every", "3")

pytestmark = pytest.mark.timeout(300)


def command(script: str, *args: str, ranks: int = 0) -> list[str]:
    cmd = [sys.executable, str(EXAMPLES / script), *args]
    if ranks:
        assert MPIEXEC, "mpiexec not found: `pip install mpich` (the dev extra) provides one"
        cmd = [MPIEXEC, "-n", str(ranks), *cmd]
    return cmd


def run(script: str, *args: str, ranks: int = 0, timeout: float = 240) -> str:
    done = subprocess.run(
        command(script, *args, ranks=ranks),
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return done.stdout


def test_replace_output_calls_before_and_after_agree(tmp_path) -> None:
    run("heat_before.py", "--out", str(tmp_path / "plain"), *SMALL, ranks=2)
    urls = [f"h5://{tmp_path}/heat.h5", f"zarr://{tmp_path}/heat.zarr"]
    for url in urls:
        assert "published 6 steps" in run("heat_after.py", "--url", url, *SMALL, ranks=2)
    one_rank = f"bp5://{tmp_path}/heat.bp"
    run("heat_after.py", "--url", one_rank, *SMALL, ranks=1)
    # The h5py files hold each rank's rows; the channels hold the global fields, the same
    # whatever the transport and however many ranks wrote them.
    parts = []
    for r in (0, 1):
        with h5py.File(tmp_path / "plain" / f"heat-rank{r}.h5") as f:
            parts.append([(f[f"step{k}/u"][()], f[f"step{k}/dudt"][()]) for k in range(6)])
    for url in [*urls, one_rank]:
        with dp.open(url) as arc:
            assert len(arc) == 6 and arc.attrs["alpha"] == pytest.approx(0.2)
            for k in range(6):
                u = np.concatenate([parts[0][k][0], parts[1][k][0]])
                dudt = np.concatenate([parts[0][k][1], parts[1][k][1]])
                np.testing.assert_array_equal(arc.read("u", step=k), u)
                np.testing.assert_array_equal(arc.read("dudt", step=k), dudt)
                assert arc[k].attrs["time"] == 3.0 * (k + 1)
    assert np.abs(u).max() > 0, "the simulation heats up"


def test_train_surrogate_reads_the_file_once_then_from_the_cache(tmp_path) -> None:
    url = f"h5://{tmp_path}/heat.h5"
    run("heat_after.py", "--url", url, "--n", "32", "--steps", "24", "--every", "5", ranks=2)
    cache = tmp_path / "cache"
    out = run("train_surrogate.py", "--url", url, "--cache", str(cache), "--epochs", "3")
    rows = [line.split() for line in out.splitlines() if re.match(r"\s+\d+\s", line)]
    assert [int(r[0]) for r in rows] == [0, 1, 2]
    errors = [float(r[2]) for r in rows]
    fetched = [float(r[4].removesuffix("MB")) for r in rows]
    assert fetched[0] > 0 and fetched[1:] == [0.0, 0.0], "later epochs read only the cache"
    assert [r[3] for r in rows[1:]] == ["100%", "100%"]
    assert errors[-1] < errors[0] / 10, "the surrogate learns the operator"


@pytest.mark.parametrize("scheme", ["shm", "sst"])
def test_coupled_jobs_stream_and_steer_both_ways(tmp_path, scheme) -> None:
    base = f"shm://ex-{os.getpid()}" if scheme == "shm" else f"sst://{tmp_path}/heat"
    data, control = base, base + "-ctl"
    # Two separately launched jobs, as on a cluster: nothing starts one from the other.
    sim = subprocess.Popen(
        command("coupled_sim.py", "--data", data, "--control", control, ranks=2),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
    )
    try:
        trainer = run(
            "coupled_trainer.py",
            "--data",
            data,
            "--control",
            control,
            "--steer-at",
            "10",
            ranks=1,
            timeout=200,
        )
        sim_out, sim_err = sim.communicate(timeout=60)
    finally:
        if sim.poll() is None:
            sim.kill()
    assert sim.returncode == 0, sim_err[-3000:]
    assert "set alpha = 0.1" in trainer and "; stop" in trainer
    assert "trainer set alpha = 0.1" in sim_out
    stop = re.search(r"simulation published (\d+) steps; stopped by the trainer", sim_out)
    assert stop, sim_out
    got = re.search(r"trainer received (\d+) steps .*, 0 dropped", trainer)
    assert got and got.group(1) == stop.group(1), "every step, none lost"


def test_bench_filesystem_renders_the_report(tmp_path) -> None:
    out = tmp_path / "report"
    stdout = run(
        "bench_filesystem.py",
        *("--dir", str(tmp_path / "fs"), "--ranks", "2", "--quick", "--out", str(out)),
        *("--", "--transports", "h5,shm", "--cache-dir", str(tmp_path)),
    )
    assert "## Read (training side)" in stdout and "per rank" in stdout
    page = (out / "report.html").read_text()
    # limits, write, read, stream, and the spread across the two ranks
    assert page.count("<table>") == 5 and page.count("<img") == 3
    assert "Across ranks" in page
