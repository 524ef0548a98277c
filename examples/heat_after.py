"""Use 1, after: the same simulation publishing through dataplane.

The output calls become ``publish(url, comm=comm)`` and ``write``: every rank hands over its
block of the global fields, the channel holds one ``n x n`` array per variable per step, and
the transport is the URL alone (an HDF5 or BP5 file, a Zarr store, or a live ``shm://`` /
``sst://`` stream). ``asynchronous=True`` returns as soon as the step is copied.

    mpiexec -n 2 python examples/heat_after.py --url h5:///tmp/heat.h5
    mpiexec -n 2 python examples/heat_after.py --url bp5:///tmp/heat.bp
    mpiexec -n 2 python examples/heat_after.py --url zarr:///tmp/heat.zarr --asynchronous
"""

from __future__ import annotations

import argparse

from heat import Heat  # examples/ is the script's directory
from mpi4py import MPI

import dataplane as dp


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", required=True, help="where the output goes, e.g. h5:///tmp/heat.h5")
    ap.add_argument("--n", type=int, default=128, help="grid is N x N (default 128)")
    ap.add_argument("--steps", type=int, default=100, help="output steps (default 100)")
    ap.add_argument("--every", type=int, default=10, help="iterations per output step")
    ap.add_argument("--asynchronous", action="store_true", help="write in the background")
    args = ap.parse_args()
    comm = MPI.COMM_WORLD
    sim = Heat(args.n, comm)
    shape = (args.n, args.n)
    # --- the output calls ------------------------------------------------------------------
    with dp.publish(args.url, comm=comm, asynchronous=args.asynchronous) as pub:
        pub.attrs["alpha"] = sim.alpha
        for _ in range(args.steps):
            sim.advance(args.every)
            pub.write(
                {
                    "u": dp.Block(sim.block, start=(sim.row0, 0), shape=shape),
                    "dudt": dp.Block(sim.dudt(), start=(sim.row0, 0), shape=shape),
                },
                attrs={"time": sim.time},
            )
    # ---------------------------------------------------------------------------------------
    if sim.rank == 0:
        print(f"published {args.steps} steps of {args.n}x{args.n} u, dudt to {args.url}")


if __name__ == "__main__":
    main()
