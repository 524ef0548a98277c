"""M writer ranks publish blocks of global arrays; N reader ranks read their parts (M x N).

Run as ``mpiexec -n M+N python tests/mpi_roundtrip.py URL M OUT [--steps S] [--aggregators K]``:
world ranks
below M write, the others read (for mem://, which lives in one process, a subscriber in world
rank 0 reads and checks the parts of N virtual readers). Each rank writes ``OUT/<rank>.json``.

Global arrays of step t, each 2-D and 3-D shape decomposed both ways: ``field2d`` (13, 7)
float64 and ``slabs3d`` (9, 3, 2) uint8 joined from plain row blocks of uneven size (a rank
empty with 2 and 4 writers); ``field3d`` (5, 6, 4) int32 and ``tiles2d`` (the field2d values)
from ``Block``s on a 2-D grid of ranks, uneven, empty blocks for 4 writers, rank 0's 3-D block
in Fortran order; ``t``, a single value.
"""

from __future__ import annotations

import argparse
import json
import sys
import traceback

import numpy as np
from mpi4py import MPI

import dataplane as dp

SHAPE2, SHAPE3, SLABS = (13, 7), (5, 6, 4), (9, 3, 2)
ROWS = {1: [13], 2: [13, 0], 3: [6, 0, 7], 4: [5, 0, 6, 2]}
GRID = {  # cuts of axis 0 and axis 1 of field3d, for M writers on a grid
    1: ([5], [6]),
    2: ([4, 1], [6]),
    3: ([2, 2, 1], [6]),
    4: ([3, 2], [6, 0]),
}


def global2d(t: int) -> np.ndarray:
    return np.arange(np.prod(SHAPE2), dtype=np.float64).reshape(SHAPE2) + 1000.0 * t


def global3d(t: int) -> np.ndarray:
    return np.arange(np.prod(SHAPE3), dtype=np.int32).reshape(SHAPE3) * (t + 1)


def slabs3d(t: int) -> np.ndarray:
    return (np.arange(np.prod(SLABS)).reshape(SLABS) % 251 + t).astype(np.uint8)


GRID2 = {1: ([13], [7]), 2: ([9, 4], [7]), 3: ([5, 5, 3], [7]), 4: ([6, 7], [3, 4])}


def grid_block(a: np.ndarray, rank: int, size: int) -> dp.Block:
    """The tile of field2d's values on a 2-D grid of ranks (cuts of GRID2, uneven)."""
    cut0, cut1 = GRID2[size]
    i, j = divmod(rank, len(cut1))
    s0, s1 = sum(cut0[:i]), sum(cut1[:j])
    return dp.Block(
        a[s0 : s0 + cut0[i], s1 : s1 + cut1[j]], start=(s0, s1, 0)[: a.ndim], shape=a.shape
    )


def my_step(t: int, rank: int, size: int) -> dict:
    rows = ROWS[size]
    r0 = sum(rows[:rank])
    cut0, cut1 = GRID[size]
    i, j = divmod(rank, len(cut1))
    s0, s1 = sum(cut0[:i]), sum(cut1[:j])
    block = global3d(t)[s0 : s0 + cut0[i], s1 : s1 + cut1[j]]
    if rank == 0:
        block = np.asfortranarray(block)
    slab_rows = {1: [9], 2: [0, 9], 3: [4, 4, 1], 4: [3, 3, 0, 3]}[size]
    q0 = sum(slab_rows[:rank])
    return {
        "field2d": global2d(t)[r0 : r0 + rows[rank]],  # 2-D, 1-D decomposition (rows)
        "field3d": dp.Block(block, start=(s0, s1, 0), shape=SHAPE3),  # 3-D, 2-D grid
        "tiles2d": grid_block(global2d(t), rank, size),  # 2-D, 2-D grid
        "slabs3d": slabs3d(t)[q0 : q0 + slab_rows[rank]],  # 3-D, 1-D decomposition (rows)
        "t": t * 0.5,
    }


def check_step(step, part, n_readers: int, rank: int) -> list[str]:
    """Compare this reader's parts (and a fixed hyperslab) with the true global arrays."""
    bad = []
    t = step.index
    g2, g3 = global2d(t), global3d(t)
    start, count = dp.split(SHAPE2, n_readers, rank)
    got = part(step, "field2d", 0)
    want = g2[start[0] : start[0] + count[0]]
    if got.shape != want.shape or not np.array_equal(got, want):
        bad.append(f"step {t} field2d part {start}+{count}")
    start, count = dp.split(SHAPE3, n_readers, rank, axes=(0, 1))
    got = part(step, "field3d", (0, 1))
    want = g3[tuple(slice(s, s + c) for s, c in zip(start, count))]
    if got.shape != want.shape or got.dtype != np.int32 or not np.array_equal(got, want):
        bad.append(f"step {t} field3d part {start}+{count}")
    for name, g, axes in (("tiles2d", g2, (0, 1)), ("slabs3d", slabs3d(t), 0)):
        start, count = dp.split(g.shape, n_readers, rank, axes=axes)
        got = part(step, name, axes)
        want = g[tuple(slice(s, s + c) for s, c in zip(start, count))]
        if got.shape != want.shape or got.dtype != g.dtype or not np.array_equal(got, want):
            bad.append(f"step {t} {name} part {start}+{count}")
    if not np.array_equal(step.read("field3d", (1, 2, 1), (3, 3, 2)), g3[1:4, 2:5, 1:3]):
        bad.append(f"step {t} field3d hyperslab")
    if float(step["t"]) != t * 0.5:
        bad.append(f"step {t} t={step['t']}")
    return bad


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("url")
    ap.add_argument("writers", type=int)
    ap.add_argument("out")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--aggregators", type=int, default=None)
    args = ap.parse_args()
    world = MPI.COMM_WORLD
    rank = world.Get_rank()
    m = args.writers
    n = world.Get_size() - m
    is_writer = rank < m
    comm = world.Split(0 if is_writer else 1, rank)
    report: dict = {"role": "writer" if is_writer else "reader"}
    scheme = args.url.split("://", 1)[0]
    opts: dict = {"rendezvous": n} if scheme in ("shm", "sst") else {}
    if args.aggregators is not None:
        opts["aggregators"] = args.aggregators
    sub = None
    try:
        if scheme == "mem":
            n = 3  # virtual readers in rank 0's process
            sub = dp.subscribe(args.url, timeout=60) if rank == 0 else None
        elif not is_writer:
            sub = dp.subscribe(args.url, comm=comm, timeout=120)
        if is_writer:
            with dp.publish(args.url, comm=comm, queue_limit=8, **opts) as pub:
                pub.attrs["units"] = "K"
                report["wrote"] = [
                    pub.write(my_step(t, comm.Get_rank(), m), attrs={"t": t})
                    for t in range(args.steps)
                ]
        if sub is not None:
            bad: list[str] = []
            steps = []
            for step in sub:
                steps.append(step.index)
                readers = range(n) if scheme == "mem" else [comm.Get_rank()]
                for r in readers:

                    def part(step, name, axes, r=r):
                        return step.read(name, *dp.split(step.vars[name].shape, n, r, axes))

                    bad += check_step(step, part if scheme == "mem" else sub.part, n, r)
            report.update(steps=steps, bad=bad, attrs=sub.attrs)
            sub.close()
    except Exception:
        report["error"] = traceback.format_exc()
    with open(f"{args.out}/{rank}.json", "w") as f:
        json.dump(report, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
