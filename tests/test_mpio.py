"""Native MPI-IO (``h5://`` through parallel HDF5): run by ``make test-mpio``, in the second
virtualenv whose h5py is built against Debian's MPI-enabled HDF5 (the PyPI wheel is serial).

Each test runs real ranks under that HDF5's own ``mpiexec``."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import h5py
import numpy as np
import pytest

import dataplane as dp

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import mpi_roundtrip as rt  # noqa: E402

MPIEXEC = os.environ.get("DATAPLANE_MPIEXEC") or shutil.which("mpiexec.mpich")
pytestmark = [
    pytest.mark.timeout(300),
    pytest.mark.skipif(
        not h5py.get_config().mpi,
        reason="h5py without MPI: `make test-mpio` builds one and runs these",
    ),
]


def mpiexec(n: int, *args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    assert MPIEXEC, "mpiexec.mpich not found: apt-get install mpich"
    return subprocess.run(
        [MPIEXEC, "-n", str(n), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


def mpirun(n: int, code: str, out: Path) -> dict[int, object]:
    prelude = textwrap.dedent(
        f"""
        import json
        from mpi4py import MPI
        def report(value):
            with open({str(out)!r} + f"/{{MPI.COMM_WORLD.rank}}.json", "w") as f:
                json.dump(value, f)
        """
    )
    result = mpiexec(n, sys.executable, "-c", prelude + textwrap.dedent(code))
    assert result.returncode == 0, result.stderr
    return {r: json.loads((out / f"{r}.json").read_text()) for r in range(n)}


@pytest.mark.parametrize("m,n", [(2, 2), (4, 1), (3, 2)])
def test_ranks_write_their_blocks_through_mpio_and_readers_get_every_step(tmp_path, m, n):
    """M ranks write their own blocks (2-D rows and 3-D grids, uneven, empty and
    Fortran-ordered blocks); N live reader ranks wait while the file is being written and
    then take every step, their parts exact; dataplane and plain h5py read it whole."""
    url = f"h5://{tmp_path}/run.h5"
    result = mpiexec(
        m + n, sys.executable, str(HERE / "mpi_roundtrip.py"), url, str(m), str(tmp_path)
    )
    assert result.returncode == 0, result.stderr
    reports = {r: json.loads((tmp_path / f"{r}.json").read_text()) for r in range(m + n)}
    for r, rep in reports.items():
        assert "error" not in rep, f"rank {r}:\n{rep['error']}"
    for r in range(m, m + n):
        assert reports[r]["steps"] == [0, 1, 2] and reports[r]["bad"] == [], reports[r]
        assert reports[r]["attrs"] == {"units": "K"}
    with dp.open(url) as a:
        assert len(a) == 3
        assert a.written_by == {"ranks": m, "method": "mpio", "aggregators": m, "files": ["run.h5"]}
        for t in range(3):
            np.testing.assert_array_equal(a[t]["field2d"], rt.global2d(t))
            np.testing.assert_array_equal(a[t]["field3d"], rt.global3d(t))
            np.testing.assert_array_equal(a[t]["slabs3d"], rt.slabs3d(t))
            assert float(a[t]["t"]) == t * 0.5 and a[t].attrs == {"t": t}
    with h5py.File(tmp_path / "run.h5", "r") as f:
        np.testing.assert_array_equal(f["tiles2d"][2], rt.global2d(2))
        assert f["field3d"].shape == (3, *rt.SHAPE3)


def test_a_bad_block_raises_on_every_rank_then_steps_go_on_and_append(tmp_path):
    url = f"h5://{tmp_path}/run.h5"
    got = mpirun(
        3,
        f"""
        import numpy as np, dataplane as dp
        comm = MPI.COMM_WORLD
        r = comm.rank
        out = []
        def rows(t):
            return dp.Block(np.full((2, 4), 10 * t + r), (2 * r, 0), (6, 4))
        with dp.publish({url!r}, comm=comm) as pub:
            out.append(type(pub).__name__)
            out.append(pub.write({{"x": rows(0)}}))
            try:  # rank 1's block overlaps rank 2's
                bad = dp.Block(np.zeros((2, 4)), (3 if r == 1 else 2 * r, 0), (6, 4))
                pub.write({{"x": bad}})
            except dp.SchemaError as exc:
                out.append("overlap" if "overlap" in str(exc) else str(exc))
            out.append(pub.write({{"x": rows(1)}}))
        with dp.publish({url!r}, comm=comm, mode="a") as pub:
            out.append(pub.write({{"x": rows(2)}}))
        report(out)
        """,
        tmp_path,
    )
    assert got == {r: ["MPIIOPublisher", 0, "overlap", 1, 2] for r in range(3)}
    with dp.open(url) as a:
        assert len(a) == 3
        for t in range(3):
            np.testing.assert_array_equal(a[t]["x"][:, 0], np.repeat(10 * t + np.arange(3), 2))


def test_aggregators_still_choose_subfiles_over_mpio(tmp_path):
    """Asked for aggregators, ranks write subfiles even where MPI-IO is there."""
    url = f"h5://{tmp_path}/run.h5"
    got = mpirun(
        2,
        f"""
        import numpy as np, dataplane as dp
        comm = MPI.COMM_WORLD
        with dp.publish({url!r}, comm=comm, aggregators=2) as pub:
            pub.write({{"x": np.full((2, 3), comm.rank)}})
            report(type(pub).__name__)
        """,
        tmp_path,
    )
    assert set(got.values()) == {"ParallelPublisher"}
    with dp.open(url) as a:
        assert a.written_by["method"] == "aggregators" and a.written_by["aggregators"] == 2
        np.testing.assert_array_equal(a[0]["x"][:, 0], [0, 0, 1, 1])


def test_a_rank_killed_inside_a_step_leaves_the_committed_steps_and_an_append_goes_on(tmp_path):
    """A rank killed inside step 2: readers get the two committed steps, exact, and the end
    of a channel whose writer died; an append from the same ranks drops the half step and
    goes on."""
    url = f"h5://{tmp_path}/run.h5"
    code = f"""
        import os, signal, numpy as np, dataplane as dp
        from mpi4py import MPI
        comm = MPI.COMM_WORLD
        with dp.publish({url!r}, comm=comm) as pub:
            for t in range(4):
                if t == 2 and comm.rank == 1:
                    pub._w.put = lambda *a: os.kill(os.getpid(), signal.SIGKILL)
                pub.write({{"x": np.full((100, 10), t + comm.rank, dtype=np.float64)}})
        """
    result = mpiexec(2, sys.executable, "-c", textwrap.dedent(code), timeout=120)
    assert result.returncode != 0  # the job died with its rank
    with dp.open(url) as a:
        assert len(a) == 2
        for t in range(2):
            np.testing.assert_array_equal(a[t]["x"][99:101, 0], [t, t + 1])
    with dp.subscribe(url, timeout=20) as sub:
        with pytest.raises(dp.ChannelBroken):
            for _ in sub:
                pass
    again = f"""
        import numpy as np, dataplane as dp
        r = MPI.COMM_WORLD.rank
        with dp.publish({url!r}, comm=MPI.COMM_WORLD, mode="a") as pub:
            report(pub.write({{"x": np.full((100, 10), 7 + r, dtype=np.float64)}}))
        """
    assert mpirun(2, again, tmp_path) == {0: 2, 1: 2}
    with dp.open(url) as a:
        assert len(a) == 3
        for t, base in ((0, 0), (1, 1), (2, 7)):
            np.testing.assert_array_equal(a[t]["x"][99:101, 0], [base, base + 1])


def test_a_live_reader_waits_for_the_close_then_takes_every_step(tmp_path):
    """No SWMR with MPI-IO: while the ranks write, a subscriber gets no step (the file's
    metadata is in flux), then every step once they closed it."""
    url = f"h5://{tmp_path}/run.h5"
    got = mpirun(
        3,
        f"""
        import numpy as np, dataplane as dp
        world = MPI.COMM_WORLD
        writer = world.rank < 2
        comm = world.Split(0 if writer else 1, world.rank)
        out = []
        if writer:
            pub = dp.publish({url!r}, comm=comm)
            for t in range(2):
                pub.write({{"x": np.full((3, 2), 10 * t + comm.rank)}})
        else:
            sub = dp.subscribe({url!r}, timeout=60)
        world.Barrier()  # two steps committed
        if not writer:
            try:
                sub.next(timeout=1.0)
                out.append("a step while the file was being written")
            except dp.StepTimeoutError:
                out.append("waited")
        world.Barrier()
        if writer:
            pub.close()
        world.Barrier()
        if not writer:
            out += [step["x"][:, 0].tolist() for step in sub]
            sub.close()
        report(out)
        """,
        tmp_path,
    )
    assert got[2] == ["waited", [0, 0, 0, 1, 1, 1], [10, 10, 10, 11, 11, 11]]


def test_bench_write_under_mpiexec_reports_mpio_beside_plain_mpio(tmp_path):
    """`dataplane bench write` under mpiexec: h5:// written natively (`ranks write: mpio`)
    and with aggregators, next to plain h5py through MPI-IO and a file per rank."""
    out = tmp_path / "out"
    args = ["bench", "write", "--quick", "--transports", "h5", "--dir", str(tmp_path / "d")]
    result = mpiexec(2, sys.executable, "-m", "dataplane.cli", *args, "--out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "bench.jsonl").read_text().splitlines()]
    writes = [r for r in rows if r["phase"] == "write" and r["rank"] is None]
    assert sorted((r["transport"], r["mode"], r["written"]) for r in writes) == [
        ("h5", "async", "aggregators=1"),  # asynchronous publishing goes through rank 0
        ("h5", "sync", "aggregators=1"),
        ("h5", "sync", "aggregators=2"),
        ("h5", "sync", "mpio"),
        ("plain h5py", "sync", "a file per rank"),
        ("plain h5py", "sync", "mpio"),
    ]
    assert all(r["gbps"] > 0 for r in writes if r["mode"] == "sync")
    assert "| mpio |" in (out / "bench.md").read_text()
