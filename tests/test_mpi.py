"""Real MPI processes (the mpich wheel's mpiexec in the virtualenv): M writer ranks, N readers.

Each rank reports through its own file: mpiexec may interleave the ranks' stdout mid-line.
"""

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
import zarr
from hypothesis import given, settings
from hypothesis import strategies as st

import dataplane as dp
from dataplane.parallel import grid_dims, plan_step, split
from dataplane.parallel.plan import chunk_transfers

MPIEXEC = shutil.which("mpiexec", path=os.path.dirname(sys.executable)) or shutil.which("mpiexec")
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import mpi_roundtrip as rt  # noqa: E402
from faults import mpich_segments_removed  # noqa: E402

pytestmark = pytest.mark.timeout(300)


def mpiexec(n: int, *args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    assert MPIEXEC, "mpiexec not found: `pip install mpich` (the dev extra) provides one"
    return subprocess.run(
        [MPIEXEC, "-n", str(n), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


def mpirun(n: int, code: str, out: Path, timeout: float = 120) -> dict[int, object]:
    """Run ``code`` on ``n`` ranks; each rank calls ``report(value)``. Returns rank -> value."""
    prelude = textwrap.dedent(
        f"""
        import json
        from mpi4py import MPI
        def report(value):
            with open({str(out)!r} + f"/{{MPI.COMM_WORLD.rank}}.json", "w") as f:
                json.dump(value, f)
        """
    )
    result = mpiexec(n, sys.executable, "-c", prelude + textwrap.dedent(code), timeout=timeout)
    assert result.returncode == 0, result.stderr
    return {r: json.loads((out / f"{r}.json").read_text()) for r in range(n)}


def url_for(scheme: str, tmp_path: Path) -> str:
    return {
        "mem": "mem://mpi",
        "shm": f"shm://mpi-{os.getpid()}-{tmp_path.name}",
        "sst": f"sst://{tmp_path}/stream",
        "h5": f"h5://{tmp_path}/run.h5",
        "zarr": f"zarr://{tmp_path}/run.zarr",
        "bp5": f"bp5://{tmp_path}/run.bp",
    }[scheme]


SCHEMES = ["mem", "shm", "sst", "h5", "zarr", "bp5"]
LAYOUTS = [(1, 2), (2, 3), (4, 2)]  # (writer ranks M, reader ranks N), M != N


@pytest.mark.parametrize("m,n", LAYOUTS, ids=[f"{m}x{n}" for m, n in LAYOUTS])
@pytest.mark.parametrize("scheme", SCHEMES)
def test_global_arrays_round_trip_m_by_n(tmp_path, scheme, m, n):
    """Every transport: 2-D rows and a 3-D grid, uneven and empty blocks, M writers to N
    readers, every reader part and a hyperslab exact."""
    url = url_for(scheme, tmp_path)
    ranks = m if scheme == "mem" else m + n
    result = mpiexec(
        ranks, sys.executable, str(HERE / "mpi_roundtrip.py"), url, str(m), str(tmp_path)
    )
    assert result.returncode == 0, result.stderr
    reports = {r: json.loads((tmp_path / f"{r}.json").read_text()) for r in range(ranks)}
    for r, rep in reports.items():
        assert "error" not in rep, f"rank {r}:\n{rep['error']}"
    for r in range(m):
        assert reports[r]["wrote"] == [0, 1, 2]
    readers = [0] if scheme == "mem" else range(m, m + n)
    for r in readers:
        assert reports[r]["steps"] == [0, 1, 2], (r, reports[r])
        assert reports[r]["bad"] == [], reports[r]["bad"]
        assert reports[r]["attrs"] == {"units": "K"}
    if scheme in ("h5", "zarr", "bp5"):
        with dp.open(url) as a:
            assert len(a) == 3
            for t in range(3):
                np.testing.assert_array_equal(a[t]["field2d"], rt.global2d(t))
                np.testing.assert_array_equal(a[t]["field3d"], rt.global3d(t))
                assert a[t].attrs == {"t": t}
            if scheme != "bp5" and m > 1:  # one node: one aggregator, rank 0, one file
                name = url.rsplit("/", 1)[1]
                # zarr: rows not aligned with chunks (4 writers) go to rank 0 in pieces.
                own = scheme == "zarr" and m == 2
                assert a.written_by == {
                    "ranks": m,
                    "method": "own-chunks" if own else "aggregators",
                    "aggregators": 1,
                    "files": [name],
                }
    if scheme == "zarr" and m > 1:
        # Blocks aligned with chunks were written by their own ranks, with a checksum each;
        # the unaligned rows of 4 writers (5, 0, 6, 2) went to the owner of their one chunk
        # (rank 0, the one aggregator here), a checksum for it (2 writers: rank 0 holds all
        # 13 rows, its own chunk).
        steps = zarr.open_array(str(tmp_path / "run.zarr" / "__dataplane" / "steps"), mode="r")
        sums = json.loads(steps[:][0])["c"]
        assert isinstance(sums["field3d"], list) and len(sums["field3d"]) == 2
        assert isinstance(sums["field2d"], list) and len(sums["field2d"]) == 1
        chunk = json.loads((tmp_path / "run.zarr" / "field3d" / "zarr.json").read_text())
        assert chunk["chunk_grid"]["configuration"]["chunk_shape"] == [1, 4 if m == 2 else 3, 6, 4]
    if scheme == "h5":  # one global dataset, as plain h5py sees it
        with h5py.File(tmp_path / "run.h5", "r") as f:
            np.testing.assert_array_equal(f["field3d"][2], rt.global3d(2))
            assert f["field2d"].shape == (3, *rt.SHAPE2)


@pytest.mark.parametrize("scheme", ["h5", "bp5", "shm"])
def test_a_bad_block_on_one_rank_raises_on_every_rank_and_writes_nothing(tmp_path, scheme):
    url = url_for(scheme, tmp_path)
    got = mpirun(
        2,
        f"""
        import numpy as np, dataplane as dp
        comm = MPI.COMM_WORLD
        r = comm.rank
        out = []
        with dp.publish({url!r}, comm=comm) as pub:
            pub.write({{"x": dp.Block(np.full((2, 3), r), (2 * r, 0), (4, 3))}})
            bad = [
                {{"x": dp.Block(np.full((2, 3), r), (r, 0), (4, 3))}},   # overlap, and a hole
                {{"x": dp.Block(np.full((2, 3), r, dtype=np.int32 if r else np.int64),
                                (2 * r, 0), (4, 3))}},                   # dtypes disagree
                {{"x": dp.Block(np.full((2, 3), r), (2 * r, 0), (4, 3 + r))}},  # shapes disagree
                {{"x": np.zeros((2, 3))}} if r == 0 else {{"y": np.zeros((2, 3))}},  # names
                {{"x": dp.Block(np.full((2, 3), r), (2 * r, 0), (4, 3))}} if r == 0
                else {{"x": "not numbers"}},                             # one rank's bad data
            ]
            for data in bad:
                try:
                    pub.write(data)
                    out.append("accepted")
                except dp.SchemaError as exc:
                    out.append(str(exc))
            pub.write({{"x": dp.Block(np.full((2, 3), 10 + r), (2 * r, 0), (4, 3))}})
            out.append(pub.next_index)
        report(out)
        """,
        tmp_path,
    )
    for r, out in got.items():
        *messages, next_index = out
        assert next_index == 2, out
        assert len(messages) == 5 and "accepted" not in messages, (r, messages)
        assert "overlap" in messages[0]
        assert "dtype" in messages[1] and "shape" in messages[2] and "rank 1" in messages[3]
        assert messages[4].startswith("rank 1:") or r == 1
    if scheme != "shm":
        with dp.open(url) as a:
            assert len(a) == 2  # the refused steps left nothing
            np.testing.assert_array_equal(a[1]["x"], np.repeat([10, 11], 6).reshape(4, 3))


KILLS = {
    "h5": "rank 1 before its block left",
    "bp5": "rank 0 while writing",
    "zarr": "rank 1 while writing its own chunk",
    "h5-subfiles": "the aggregator of the second group (rank 1) while writing its subfile",
    "bp5-subfiles": "the aggregator of the second group (rank 1) while writing its subfile",
    "bp5-subfiles-commit": "rank 0 inside the channel's commit, every subfile holding the step",
    "zarr-owners": "the owner of the second group's chunks (rank 1) while writing one",
}


@pytest.mark.parametrize("scheme", sorted(KILLS))
def test_a_rank_killed_inside_a_step_leaves_only_complete_steps(tmp_path, scheme):
    url = url_for(scheme.split("-")[0], tmp_path)
    subfiled = "-subfiles" in scheme
    opts = ", aggregators=2" if subfiled or scheme == "zarr-owners" else ""
    # zarr-owners: rows 1000 and 1007 in chunks of 300 rows, so rank 1 owns chunks of its
    # own and sends rank 0 its part of the chunk they share.
    rows = [1000, 1007] if scheme == "zarr-owners" else [1000, 1000]
    code = textwrap.dedent(
        f"""
        import os, signal, numpy as np, dataplane as dp
        from mpi4py import MPI
        comm = MPI.COMM_WORLD
        def die(*args, **kwargs):
            os.kill(os.getpid(), signal.SIGKILL)
        import dataplane.parallel.publisher as pp
        pp.OWNER_CHUNK_BYTES = 300 * 10 * 8
        with dp.publish({url!r}, comm=comm{opts}) as pub:
            for t in range(5):
                if t == 2:
                    if {scheme!r} == "h5" and comm.rank == 1:
                        die()
                    if {scheme!r} == "bp5" and comm.rank == 0:
                        pub._inner._writer._fw.commit = die  # inside the step, data written
                    if {scheme!r} == "zarr" and comm.rank == 1:
                        pub._transport.put_block = die  # after rank 0 began the step
                    if {scheme!r} == "bp5-subfiles-commit" and comm.rank == 0:
                        pub._inner._writer._fw.commit = die
                    elif {subfiled} and comm.rank == 1:
                        pub._transport.put_subfile_region = die  # its subfile has the room
                    if {scheme!r} == "zarr-owners" and comm.rank == 1:
                        pub._transport.put_block = die  # after its part went to rank 0
                x = np.full(({rows}[comm.rank], 10), t + comm.rank, dtype=np.float64)
                pub.write({{"x": dp.Block(x, ({rows}[0] * comm.rank, 0), ({sum(rows)}, 10))}})
        """
    )
    with mpich_segments_removed():
        result = mpiexec(2, sys.executable, "-c", code, timeout=120)
    assert result.returncode != 0  # the job died with its rank
    with dp.open(url) as a:
        assert len(a) == 2
        for t in range(2):
            want = np.concatenate([np.full((rows[0], 10), t), np.full((rows[1], 10), t + 1)])
            np.testing.assert_array_equal(a[t]["x"], want)
    if scheme == "zarr-owners":  # the chunks had owners
        assert zarr.open_array(str(tmp_path / "run.zarr" / "x"), mode="r").chunks == (1, 300, 10)
    with dp.subscribe(url, timeout=20) as sub:
        with pytest.raises(dp.ChannelBroken):
            for _ in sub:
                pass
    if subfiled:  # the step half written into the subfiles is written over
        again = f"""
            import numpy as np, dataplane as dp
            comm = MPI.COMM_WORLD
            with dp.publish({url!r}, comm=comm, aggregators=2, mode="a") as pub:
                report(pub.write({{"x": np.full((1000, 10), 7 + comm.rank, dtype=np.float64)}}))
            """
        assert mpirun(2, again, tmp_path) == {0: 2, 1: 2}
        with dp.open(url) as a:
            assert len(a) == 3
            np.testing.assert_array_equal(a[1]["x"][999:1001, 0], [1, 2])
            np.testing.assert_array_equal(a[2]["x"][999:1001, 0], [7, 8])


def test_corrupt_rank_written_chunk_is_caught(tmp_path):
    url = url_for("zarr", tmp_path)
    result = mpiexec(
        3, sys.executable, str(HERE / "mpi_roundtrip.py"), url, "2", str(tmp_path), timeout=180
    )
    assert result.returncode == 0, result.stderr
    # Step 2, the block of rank 1 (rows 4..5 of field3d): its own chunk, uncompressed.
    chunk = tmp_path / "run.zarr" / "field3d" / "c" / "2" / "1" / "0" / "0"
    data = bytearray(chunk.read_bytes())
    data[5] ^= 0xFF
    chunk.write_bytes(bytes(data))
    with dp.open(url) as a:
        np.testing.assert_array_equal(a[1]["field3d"], rt.global3d(1))
        with pytest.raises(dp.IntegrityError, match=r"'field3d' of step 2.*region at \[4, 0, 0\]"):
            a[2]["field3d"]
        with pytest.raises(dp.IntegrityError, match=r"region at \[4, 0, 0\]"):
            a[2].read("field3d", (4, 1, 1), (1, 1, 1))  # a partial read of the damaged block
        np.testing.assert_array_equal(
            a[2].read("field3d", (0, 0, 0), (4, 6, 4)), rt.global3d(2)[:4]
        )


@pytest.mark.parametrize("aggregators", [1, 2, 4])
def test_h5_ranks_send_their_blocks_in_pieces_and_no_rank_holds_the_global_step(
    tmp_path, aggregators
) -> None:
    """h5:// under 4 ranks: each aggregator (rank 0 alone, or 2 groups of 2, or every rank)
    writes its group's blocks piece by piece as they arrive (a checksum per piece), so no
    rank's peak memory grows by more than a piece and the library's own, not by the 65 MiB
    global step; the global array is exact through dataplane and through plain h5py (with
    subfiles: the main file's virtual datasets). The blocks' rows (one empty) cut HDF5's
    chunks anywhere: chunks a piece covers are written raw, its edges through HDF5."""
    path = tmp_path / "run.h5"
    rows, cols = [3001, 0, 3122, 2165], 2048  # up to 24 MiB of int32 per rank
    got = mpirun(
        4,
        f"""
        import resource
        import numpy as np, dataplane as dp
        import dataplane.parallel.publisher as pp
        pp.PIECE_BYTES = 8 << 20  # 1024 rows: a chunk's worth, rank 0's fall on chunks
        comm = MPI.COMM_WORLD
        rank = comm.rank
        rows = {rows}
        block = np.arange(rows[rank] * {cols}, dtype=np.int32).reshape(rows[rank], {cols})
        block += rank * 10_000_000
        kib = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        warm = "h5://{tmp_path}/warm.h5?aggregators={aggregators}"
        with dp.publish(warm, comm=comm) as pub:  # imports, MPI set-up
            pub.write({{"x": dp.Block(np.zeros((1, 4)), start=(rank, 0), shape=(4, 4))}})
        before = kib()
        with dp.publish("h5://{path}", comm=comm, aggregators={aggregators}) as pub:
            for t in range(3):
                where = (sum(rows[:rank]), 0)
                pub.write({{"x": dp.Block(block, start=where, shape=(sum(rows), {cols})), "t": t}})
                block += 1  # in place: the test's own memory stays the same
        report({{"grew_kib": kib() - before}})
        """,
        tmp_path,
    )
    expect = np.concatenate(
        [
            np.arange(n * cols, dtype=np.int32).reshape(n, cols) + r * 10_000_000
            for r, n in enumerate(rows)
        ]
    )
    with dp.open(f"h5://{path}") as a:
        assert len(a) == 3
        for t in range(3):
            np.testing.assert_array_equal(a[t]["x"], expect + t)
            part = a[t].read("x", (2900, 5), (3400, 4))  # across three ranks' blocks
            np.testing.assert_array_equal(part, (expect + t)[2900:6300, 5:9])
    with h5py.File(path, "r") as f:
        np.testing.assert_array_equal(f["x"][1], expect + 1)
        assert f["x"].is_virtual == (aggregators > 1)
        end = int(f["__dataplane/meta_offsets"][1])
        info = json.loads(f["__dataplane/meta"][:end].tobytes())
        written_by = json.loads(f["__dataplane"].attrs["written_by"])
    pieces = sum(-(-n // 1024) for n in rows)
    assert isinstance(info["c"]["x"], list) and len(info["c"]["x"]) == pieces
    assert (written_by["ranks"], written_by["aggregators"]) == (4, aggregators)
    subfiles = sorted(p.name for p in (tmp_path / "run.h5.agg").glob("*.h5"))
    assert len(subfiles) == (aggregators if aggregators > 1 else 0)
    assert written_by["files"] == ["run.h5"] + [f"run.h5.agg/{s}" for s in subfiles]
    # Gathering the 65 MiB step on rank 0 grew it by more than that.
    assert all(g["grew_kib"] < 32 * 1024 for g in got.values()), got


def test_single_rank_comm_works(tmp_path) -> None:
    got = mpirun(
        2,
        """
        import numpy as np, dataplane as dp
        rank = MPI.COMM_WORLD.rank
        url = f"mem://r{rank}"
        sub = dp.subscribe(url, timeout=10)
        with dp.publish(url, comm=MPI.COMM_SELF) as pub:
            pub.write({"x": np.full(3, rank)})
        report([s["x"].tolist() for s in sub])
        """,
        tmp_path,
    )
    assert got == {0: [[0, 0, 0]], 1: [[1, 1, 1]]}


def test_mem_subscribers_cannot_span_processes(tmp_path) -> None:
    got = mpirun(
        2,
        """
        import dataplane as dp
        try:
            dp.subscribe("mem://x", comm=MPI.COMM_WORLD)
            report("accepted")
        except dp.OptionError as exc:
            report(str(exc))
        """,
        tmp_path,
    )
    assert all("one process" in m for m in got.values()), got


# -- the decomposition helpers (no MPI needed) ------------------------------------------------


def test_split_covers_every_element_once():
    for shape, axes in [((13, 7), 0), ((5, 6, 4), (0, 1)), ((3,), 0), ((2, 9), (1, 0))]:
        for parts in (1, 2, 3, 4, 5, 7):
            seen = np.zeros(shape, int)
            for i in range(parts):
                start, count = split(shape, parts, i, axes)
                seen[tuple(slice(s, s + c) for s, c in zip(start, count))] += 1
            assert (seen == 1).all(), (shape, parts, axes)


@given(
    shape=st.lists(st.integers(1, 9), min_size=1, max_size=3),
    data=st.data(),
)
@settings(max_examples=150, deadline=None)
def test_chunk_owners_write_every_chunk_once_from_every_part(shape, data):
    """chunk_transfers, for any tiling, chunk shape and grouping: every chunk has one owner,
    which gets every block's part of it (each element exactly once); a contributor lists a
    chunk exactly as its owner does; every rank walks the chunks in one shared order."""
    ranks = data.draw(st.integers(1, 6))
    axes = tuple(range(data.draw(st.integers(1, len(shape)))))
    parts = [split(shape, ranks, r, axes) for r in range(ranks)]
    chunk = tuple(data.draw(st.integers(1, n + 2)) for n in shape)
    k = data.draw(st.integers(1, ranks))
    group = [r * k // ranks for r in range(ranks)]
    owner_of = [group.index(g) for g in group]
    plans = {me: chunk_transfers(list(shape), parts, chunk, owner_of, me) for me in range(ranks)}
    seen = np.zeros(shape, int)
    by_chunk: dict = {}
    for me, plan in plans.items():
        assert [t[0] for t in plan] == sorted(t[0] for t in plan)  # the shared order
        for start, count, owner, pieces in plan:
            by_chunk.setdefault(start, set()).add(json.dumps([count, owner, pieces]))
            assert me == owner or me in [r for r, _, _ in pieces]
            assert owner == owner_of[min(r for r, _, _ in pieces)]
            if me == owner:
                for r, at, size in pieces:
                    blk_start, blk_count = parts[r]
                    assert all(
                        a >= b and a + n <= b + c
                        for a, n, b, c in zip(at, size, blk_start, blk_count)
                    )
                    assert all(
                        a >= s and a + n <= s + c for a, n, s, c in zip(at, size, start, count)
                    )
                    seen[tuple(slice(a, a + n) for a, n in zip(at, size))] += 1
    assert (seen == 1).all()
    assert all(len(v) == 1 for v in by_chunk.values())  # owner and contributors agree


def test_split_is_even_and_grids_are_balanced():
    assert [split((10,), 3, i)[1][0] for i in range(3)] == [4, 3, 3]
    assert [split((2,), 4, i)[1][0] for i in range(4)] == [1, 1, 0, 0]  # empty parts
    assert grid_dims(4, 2) == (2, 2) and grid_dims(6, 2) == (3, 2) and grid_dims(7, 2) == (7, 1)
    assert grid_dims(12, 3) == (3, 2, 2)
    assert split((8, 8), 4, 3, (0, 1)) == ((4, 4), (4, 4))


@pytest.mark.parametrize(
    "args,match",
    [
        (((), 2, 0), "0-d"),
        (((4,), 2, 2), "part index"),
        (((4, 4), 2, 0, (0, 0)), "distinct"),
        (((4, 4), 2, 0, 2), "distinct"),
    ],
)
def test_split_refuses_bad_requests(args, match):
    with pytest.raises(dp.SchemaError, match=match):
        split(*args)


def _desc(kind, local, start=None, shape=None, dtype="<f8"):
    d = {"kind": kind, "dtype": dtype, "local": list(local)}
    if kind == "block":
        d.update(start=list(start), shape=list(shape))
    return d


def test_plan_joins_rows_in_rank_order_with_empty_ranks():
    plan = plan_step(
        [{"u": _desc("join", (3, 2))}, {"u": _desc("join", (0, 2))}, {"u": _desc("join", (4, 2))}]
    )
    assert plan["u"]["shape"] == [7, 2]
    assert plan["u"]["parts"] == [([0, 0], [3, 2]), ([3, 0], [0, 2]), ([3, 0], [4, 2])]


@pytest.mark.parametrize(
    "descs,match",
    [
        (
            [
                {"u": _desc("block", (2, 2), (0, 0), (4, 2))},
                {"u": _desc("block", (1, 2), (2, 0), (4, 2))},
            ],
            "cover 6 of the 8",
        ),
        (
            [
                {"u": _desc("block", (2, 2), (0, 0), (3, 2))},
                {"u": _desc("block", (2, 2), (1, 0), (3, 2))},
            ],
            "overlap",
        ),
        ([{"u": _desc("join", (2, 2))}, {"u": _desc("join", (2, 3))}], "other dimensions"),
        ([{"u": _desc("join", (2,))}, {"u": _desc("block", (2,), (2,), (4,))}], "kind"),
        ([{"u": _desc("join", (2,))}, {"v": _desc("join", (2,))}], "rank 1 wrote"),
    ],
)
def test_plan_refuses_holes_overlaps_and_disagreement(descs, match):
    with pytest.raises(dp.SchemaError, match=match):
        plan_step(descs)


def test_shuffle_sampler_takes_rank_and_world_from_mpi(tmp_path) -> None:
    got = mpirun(
        2,
        """
        from dataplane.loaders import ShuffleSampler
        s = ShuffleSampler(101, seed=7, block=None)
        report({"rank": s.rank, "world": s.world, "order": list(s)})
        """,
        tmp_path,
    )
    assert [(got[r]["rank"], got[r]["world"]) for r in (0, 1)] == [(0, 2), (1, 2)]
    a, b = got[0]["order"], got[1]["order"]
    assert len(a) == len(b) == 51
    assert set(a) | set(b) == set(range(101)) and len(set(a) & set(b)) == 1  # one padded


SUBFILED = [(2, 3, 2), (4, 2, 2), (4, 2, 4)]  # writers, live readers, aggregators


@pytest.mark.parametrize("m,n,k", SUBFILED, ids=[f"{m}x{n}-agg{k}" for m, n, k in SUBFILED])
@pytest.mark.parametrize("scheme", ["h5", "bp5"])
def test_aggregators_write_subfiles_that_read_as_one_global_array(
    tmp_path, capsys, scheme, m, n, k
):
    """h5:// and bp5:// with aggregators=K: each group's aggregator writes a subfile, the
    channel's file joins them; live reader ranks follow every step as it commits and read their
    parts exact (2-D rows and 3-D grids, uneven and empty blocks), as do dataplane and the
    plain library afterwards; ``inspect --json`` says how it was written."""
    url = url_for(scheme, tmp_path)
    main_file = f"run.{'h5' if scheme == 'h5' else 'bp'}"
    result = mpiexec(
        m + n,
        sys.executable,
        str(HERE / "mpi_roundtrip.py"),
        url,
        str(m),
        str(tmp_path),
        "--aggregators",
        str(k),
    )
    assert result.returncode == 0, result.stderr
    reports = {r: json.loads((tmp_path / f"{r}.json").read_text()) for r in range(m + n)}
    for r, rep in reports.items():
        assert "error" not in rep, f"rank {r}:\n{rep['error']}"
    for r in range(m, m + n):
        assert reports[r]["steps"] == [0, 1, 2] and reports[r]["bad"] == [], reports[r]
    agg = tmp_path / f"{main_file}.agg"
    subfiles = sorted(f"{main_file}.agg/{p.name}" for p in agg.glob(f"*.{main_file[4:]}"))
    assert len(subfiles) == k
    from dataplane.cli import main

    assert main(["inspect", url, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["written_by"] == {
        "ranks": m,
        "method": "aggregators",
        "aggregators": k,
        "files": [main_file, *subfiles],
    }
    with dp.open(url) as a:
        assert len(a) == 3
        for t in range(3):
            np.testing.assert_array_equal(a[t]["field2d"], rt.global2d(t))
            np.testing.assert_array_equal(a[t]["field3d"], rt.global3d(t))
            np.testing.assert_array_equal(a[t]["slabs3d"], rt.slabs3d(t))
            assert float(a[t]["t"]) == t * 0.5
    moved = tmp_path / "moved"  # the main file finds its subfiles relative to itself
    moved.mkdir()
    for p in [main_file, f"{main_file}.agg"]:
        os.rename(tmp_path / p, moved / p)
    if scheme == "bp5":
        with dp.open(f"bp5://{moved / main_file}") as a:
            np.testing.assert_array_equal(a[2]["tiles2d"], rt.global2d(2))
        from adios2 import FileReader

        # Plain adios2 over one subfile: the global shape, its group's blocks where they sit.
        first_group = [r for r in range(m) if r * k // m == 0]
        rows = rt.ROWS[m]
        mine = sum(rows[r] for r in first_group)
        with FileReader(str(moved / subfiles[0])) as f:
            x = f.read("field2d", start=[0, 0], count=[mine, rt.SHAPE2[1]], step_selection=[1, 1])
        np.testing.assert_array_equal(x.reshape(mine, -1), rt.global2d(1)[:mine])
        shutil.rmtree(moved / subfiles[-1])  # moved without all of its .agg folder
        with dp.open(f"bp5://{moved / main_file}") as a:
            with pytest.raises(dp.IntegrityError, match=f"subfile {subfiles[-1]} is missing"):
                a[0]["tiles2d"]  # (every rank has a tile of it)
        return
    with h5py.File(moved / "run.h5", "r") as f:
        assert f["field3d"].is_virtual and f["field3d"].shape == (3, *rt.SHAPE3)
        np.testing.assert_array_equal(f["field2d"][1], rt.global2d(1))
        np.testing.assert_array_equal(f["tiles2d"][2], rt.global2d(2))
        np.testing.assert_array_equal(
            f["field3d"][:, 1:4, 2:5], [rt.global3d(t)[1:4, 2:5] for t in range(3)]
        )


@pytest.mark.parametrize("scheme", ["h5", "bp5"])
def test_aggregators_keep_the_blocks_of_the_first_step_and_append_alike(tmp_path, scheme):
    """Subfiles are joined by fixed regions: a step whose blocks moved raises SchemaError on
    every rank and writes nothing; an append continues the subfiles (same aggregators), and
    another number of aggregators is refused."""
    url = url_for(scheme, tmp_path)
    agg, ext = ("run.h5.agg", "*.h5") if scheme == "h5" else ("run.bp.agg", "*.bp")
    got = mpirun(
        4,
        f"""
        import numpy as np, dataplane as dp
        comm = MPI.COMM_WORLD
        r = comm.rank
        out = []
        def rows(t, n=2):
            return np.full((n, 3), 10 * t + r, dtype=np.int64)
        with dp.publish({url!r}, comm=comm, aggregators=2) as pub:
            pub.write({{"x": rows(0)}})
            try:
                pub.write({{"x": rows(1, n=1 + (r == 0))}})  # rank 1's block moved
            except dp.SchemaError as exc:
                out.append("moved" if "blocks of the first" in str(exc) else str(exc))
            pub.write({{"x": rows(1)}})
        with dp.publish({url!r}, comm=comm, aggregators=2, mode="a") as pub:
            out.append(pub.write({{"x": rows(2)}}))
        try:
            dp.publish({url!r}, comm=comm, aggregators=4, mode="a")
        except dp.OptionError as exc:
            out.append("refused" if "aggregators=2" in str(exc) else str(exc))
        report(out)
        """,
        tmp_path,
    )
    assert got == {r: ["moved", 2, "refused"] for r in range(4)}
    with dp.open(url) as a:
        assert len(a) == 3
        for t in range(3):
            want = np.repeat(10 * t + np.arange(4), 2)[:, None] * np.ones(3, np.int64)
            np.testing.assert_array_equal(a[t]["x"], want)
    before = sorted((tmp_path / agg).glob(ext))
    assert len(before) == 2
    # A new channel in its place: the old subfiles go with the old main file.
    again = f"""
        import numpy as np, dataplane as dp
        with dp.publish({url!r}, comm=MPI.COMM_WORLD, aggregators=2) as pub:
            report(pub.write({{"x": np.full((1, 3), MPI.COMM_WORLD.rank)}}))
        """
    assert mpirun(4, again, tmp_path) == {r: 0 for r in range(4)}
    after = sorted((tmp_path / agg).glob(ext))
    assert len(after) == 2 and not set(after) & set(before)
    with dp.open(url) as a:
        assert len(a) == 1
        np.testing.assert_array_equal(a[0]["x"][:, 0], np.arange(4))


@pytest.mark.parametrize("aggregators", [None, 4, 16])
@pytest.mark.parametrize("scheme", ["h5", "bp5", "zarr"])
def test_16_ranks_oversubscribed_write_one_global_array(tmp_path, scheme, aggregators):
    """16 ranks on however many cores, uneven blocks of rows: the default (one aggregator per
    node: one file here), 4 groups and one per rank all give the same global array (zarr:
    the chunks go to their owners, not to rank 0)."""
    url = url_for(scheme, tmp_path)
    rows = [1 + r % 3 for r in range(16)]
    got = mpirun(
        16,
        f"""
        import numpy as np, dataplane as dp
        comm = MPI.COMM_WORLD
        r = comm.rank
        rows = {rows}
        with dp.publish({url!r}, comm=comm, aggregators={aggregators}) as pub:
            for t in range(2):
                block = np.full((rows[r], 5), 100 * t + r)
                pub.write({{"x": dp.Block(block, (sum(rows[:r]), 0), (sum(rows), 5))}})
        report(r)
        """,
        tmp_path,
        timeout=240,
    )
    assert sorted(got.values()) == list(range(16))
    with dp.open(url) as a:
        for t in range(2):
            np.testing.assert_array_equal(
                a[t]["x"], np.repeat(100 * t + np.arange(16), rows)[:, None] * np.ones(5)
            )
        assert a.written_by["aggregators"] == (aggregators or 1)
    subfiles = {"h5": "run.h5.agg/*.h5", "bp5": "run.bp.agg/*.bp", "zarr": "*.agg"}[scheme]
    assert len(list(tmp_path.glob(subfiles))) == (aggregators or 0 if scheme != "zarr" else 0)


def test_zarr_chunk_owners_m_by_n_live(tmp_path):
    """4 zarr writers with aggregators=2 (rows and grids not aligned with chunks, empty
    blocks), 2 live reader ranks: every step and every part exact, as plain zarr reads it."""
    url = url_for("zarr", tmp_path)
    result = mpiexec(
        6, sys.executable, str(HERE / "mpi_roundtrip.py"), url, "4", str(tmp_path),
        "--aggregators", "2",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    reports = {r: json.loads((tmp_path / f"{r}.json").read_text()) for r in range(6)}
    for r in (4, 5):
        assert reports[r]["steps"] == [0, 1, 2] and reports[r]["bad"] == [], reports[r]
    with dp.open(url) as a:
        assert a.written_by["aggregators"] == 2
        for t in range(3):
            np.testing.assert_array_equal(a[t]["field2d"], rt.global2d(t))
            np.testing.assert_array_equal(a[t]["tiles2d"], rt.global2d(t))
            np.testing.assert_array_equal(a[t]["slabs3d"], rt.slabs3d(t))
    plain = zarr.open_group(str(tmp_path / "run.zarr"), mode="r")
    np.testing.assert_array_equal(plain["field3d"][2], rt.global3d(2))


@pytest.mark.parametrize("k", [1, 2, 4])
def test_zarr_unaligned_blocks_go_to_chunk_owners_not_rank_0(tmp_path, k):
    """zarr:// with aggregators=K and blocks not aligned with chunks: each chunk is written
    whole by one owner (its group's aggregator), from every block's part of it; every value
    exact through dataplane and plain zarr, a checksum per chunk, and rank 0 writes only
    the chunks its group starts (K=1: all of them, a chunk at a time)."""
    url = url_for("zarr", tmp_path)
    rows = [5, 0, 6, 2]
    got = mpirun(
        4,
        f"""
        import numpy as np, dataplane as dp
        import dataplane.parallel.publisher as pp
        pp.OWNER_CHUNK_BYTES = 4 * 7 * 8  # chunks of 4 rows of x
        comm = MPI.COMM_WORLD
        r = comm.rank
        rows = {rows}
        g = np.arange(13 * 7, dtype=np.int64).reshape(13, 7)
        where = []
        with dp.publish({url!r}, comm=comm, aggregators={k}) as pub:
            real = pub._transport.put_block
            def put_block(row, name, start, block):
                where.append([name, list(start), list(block.shape)])
                return real(row, name, start, block)
            pub._transport.put_block = put_block
            for t in range(3):
                a = sum(rows[:r])
                pub.write({{"x": dp.Block(g[a : a + rows[r]] + 100 * t, (a, 0), (13, 7)),
                            "y": dp.Block(np.full((rows[r], 2), r + t), (a, 0), (13, 2))}})
        report(where)
        """,
        tmp_path,
    )
    with dp.open(url) as a:
        assert len(a) == 3
        assert a.written_by == {
            "ranks": 4,
            "method": "aggregators",
            "aggregators": k,
            "files": ["run.zarr"],
        }
        g = np.arange(13 * 7).reshape(13, 7)
        y = np.repeat(np.arange(4), rows)[:, None] * np.ones(2, np.int64)
        for t in range(3):
            np.testing.assert_array_equal(a[t]["x"], g + 100 * t)
            np.testing.assert_array_equal(a[t]["y"], y + t)
            np.testing.assert_array_equal(a[t].read("x", (4, 2), (3, 4)), g[4:7, 2:6] + 100 * t)
    plain = zarr.open_group(str(tmp_path / "run.zarr"), mode="r")
    np.testing.assert_array_equal(plain["x"][1], g + 100)
    chunks = plain["x"].chunks[1:]
    assert chunks == (4, 7)
    n_chunks = -(-13 // chunks[0]) * -(-7 // chunks[1])
    steps = zarr.open_array(str(tmp_path / "run.zarr" / "__dataplane" / "steps"), mode="r")
    sums = json.loads(steps[:][2])["c"]
    assert len(sums["x"]) == n_chunks  # a checksum per chunk, each chunk written once
    writes = [tuple(w[1]) for r in range(4) for w in got[r] if w[0] == "x"]
    assert len(writes) == 3 * n_chunks and len(set(writes)) == n_chunks
    group = [r * k // 4 for r in range(4)]
    owner_of = [group.index(g) for g in group]  # a group's lowest rank (k=1: rank 0)
    for r, ws in got.items():
        for name, start, _ in ws:
            if name == "x":
                lowest = next(
                    q
                    for q in range(4)
                    if rows[q]
                    and sum(rows[:q]) < start[0] + chunks[0]
                    and start[0] < sum(rows[: q + 1])
                )
                assert owner_of[lowest] == r
    if k == 1:
        assert got[1] == got[2] == got[3] == []  # rank 0 wrote everything, chunk by chunk


def test_bad_aggregators_raise_on_every_rank(tmp_path) -> None:
    got = mpirun(
        2,
        f"""
        import re
        import dataplane as dp
        comm = MPI.COMM_WORLD
        out = []
        for url, k in [
            ("h5://{tmp_path}/a.h5", 0),
            ("h5://{tmp_path}/b.h5", 3),
            ("h5://{tmp_path}/c.h5", "two"),
            ("zarr://{tmp_path}/d.zarr", 2),  # chunk owners: opens
            ("shm://dp-agg-{os.getpid()}", 2),
        ]:
            try:
                dp.publish(url, comm=comm, aggregators=k).close()
                out.append("opened")
            except dp.OptionError as exc:  # (another rank's error says whose it is)
                out.append(re.sub(r"^rank \\d+: ", "", str(exc)).split(":")[0][:40])
        report(out)
        """,
        tmp_path,
    )
    assert got[0] == got[1]
    assert got[0][:2] == ["aggregators must be between 1 and the 2 "] * 2
    assert got[0][2].startswith("aggregators must be a whole")
    assert got[0][3:] == ["opened", "shm"]
    with pytest.raises(dp.OptionError, match="comm"):
        dp.publish(f"h5://{tmp_path}/e.h5", aggregators=2)


@pytest.mark.parametrize("aggregators", [1, 2, 4])
def test_bp5_ranks_send_their_blocks_in_pieces_and_no_rank_holds_the_global_step(
    tmp_path, aggregators
):
    """bp5:// under 4 ranks: each aggregator (rank 0 alone, 2 groups of 2, every rank) writes
    its group's blocks piece by piece into its open ADIOS2 step and has each written out at
    once, so no rank's peak memory grows by more than about a piece, not by the 65 MiB global
    step (gathering grew it by more than the step); the global array is exact through
    dataplane (a checksum per piece) and through plain adios2 (the channel's file, or each
    subfile's part)."""
    from adios2 import FileReader

    path = tmp_path / "run.bp"
    rows, cols = [3001, 0, 3122, 2165], 2048
    got = mpirun(
        4,
        f"""
        import resource
        import numpy as np, dataplane as dp
        import dataplane.parallel.publisher as pp
        pp.PIECE_BYTES = 8 << 20
        comm = MPI.COMM_WORLD
        rank = comm.rank
        rows = {rows}
        block = np.arange(rows[rank] * {cols}, dtype=np.int32).reshape(rows[rank], {cols})
        block += rank * 10_000_000
        kib = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        warm = "bp5://{tmp_path}/warm.bp?aggregators={aggregators}"
        with dp.publish(warm, comm=comm) as pub:  # imports, set-up
            pub.write({{"x": dp.Block(np.zeros((1, 4)), start=(rank, 0), shape=(4, 4))}})
        before = kib()
        with dp.publish("bp5://{path}", comm=comm, aggregators={aggregators}) as pub:
            for t in range(3):
                where = (sum(rows[:rank]), 0)
                pub.write({{"x": dp.Block(block, start=where, shape=(sum(rows), {cols})), "t": t}})
                block += 1
        report({{"grew_kib": kib() - before}})
        """,
        tmp_path,
    )
    expect = np.concatenate(
        [
            np.arange(n * cols, dtype=np.int32).reshape(n, cols) + r * 10_000_000
            for r, n in enumerate(rows)
        ]
    )
    with dp.open(f"bp5://{path}") as a:
        assert len(a) == 3
        for t in range(3):
            np.testing.assert_array_equal(a[t]["x"], expect + t)
            part = a[t].read("x", (2900, 5), (3400, 4))  # across three ranks' blocks
            np.testing.assert_array_equal(part, (expect + t)[2900:6300, 5:9])
            assert float(a[t]["t"]) == t
    with dp.open(f"bp5://{path}") as a:
        assert a.written_by["aggregators"] == aggregators
        subfiles = a.written_by["files"][1:]
    assert len(subfiles) == (aggregators if aggregators > 1 else 0)
    if aggregators == 1:
        with FileReader(str(path)) as f:  # plain adios2: one global array per step
            x = f.read("x", step_selection=[1, 1])
            np.testing.assert_array_equal(x.reshape(expect.shape), expect + 1)
    for g, sub in enumerate(subfiles):  # plain adios2: a subfile's part, where it sits
        first = sum(rows[: g * 4 // aggregators])
        n = sum(rows[g * 4 // aggregators : (g + 1) * 4 // aggregators])
        if n:
            with FileReader(str(tmp_path / sub)) as f:
                x = f.read("x", start=[first, 0], count=[n, cols], step_selection=[1, 1])
            np.testing.assert_array_equal(x.reshape(n, cols), (expect + 1)[first : first + n])
    assert all(g["grew_kib"] < 32 * 1024 for g in got.values()), got


def test_bp5_a_piece_that_fails_drops_its_step_and_the_next_steps_follow(tmp_path):
    """A piece rank 0 cannot write (an I/O error inside the open ADIOS2 step): every rank
    raises, the step is cut from the file, and the steps after it are written and read
    exact, numbered on from the last one committed."""
    url = url_for("bp5", tmp_path)
    got = mpirun(
        2,
        f"""
        import errno
        import numpy as np, dataplane as dp
        comm = MPI.COMM_WORLD
        out = []
        with dp.publish({url!r}, comm=comm) as pub:
            if comm.rank == 0:
                fw = pub._inner._writer._fw
                real = fw.put_region
                calls = []
                def flaky(name, start, block):
                    calls.append(start)
                    if len(calls) == 4:  # rank 1's piece of the second step
                        raise OSError(errno.EIO, "injected")
                    return real(name, start, block)
                fw.put_region = flaky
            for t in range(3):
                try:
                    out.append(pub.write({{"x": np.full((4, 3), 10 * t + comm.rank)}}))
                except (OSError, dp.DataplaneError) as exc:  # rank 0's own, the others' report
                    out.append("failed" if "injected" in str(exc) else str(exc))
        report(out)
        """,
        tmp_path,
    )
    assert got == {0: [0, "failed", 1], 1: [0, "failed", 1]}
    with dp.open(url) as a:
        assert len(a) == 2
        np.testing.assert_array_equal(a[0]["x"][:, 0], [0] * 4 + [1] * 4)
        np.testing.assert_array_equal(a[1]["x"][:, 0], [20] * 4 + [21] * 4)
