"""Use 1, before: an MPI simulation writing its output with plain h5py.

What MPI codes do with the serial h5py from PyPI: every rank writes its own file, one group
per output step. Readers must know the decomposition to put a field back together, nobody can
follow the run while it writes, and a training job later reads these files sample by sample.

    mpiexec -n 2 python examples/heat_before.py --out /tmp/heat-h5py
"""

from __future__ import annotations

import argparse
import os

import h5py
from heat import Heat  # examples/ is the script's directory
from mpi4py import MPI


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="directory for heat-rank<r>.h5")
    ap.add_argument("--n", type=int, default=128, help="grid is N x N (default 128)")
    ap.add_argument("--steps", type=int, default=100, help="output steps (default 100)")
    ap.add_argument("--every", type=int, default=10, help="iterations per output step")
    args = ap.parse_args()
    comm = MPI.COMM_WORLD
    sim = Heat(args.n, comm)
    os.makedirs(args.out, exist_ok=True)
    # --- the output calls dataplane replaces ---------------------------------------------
    with h5py.File(os.path.join(args.out, f"heat-rank{sim.rank}.h5"), "w") as f:
        f.attrs["alpha"] = sim.alpha
        f.attrs["row0"] = sim.row0
        for k in range(args.steps):
            sim.advance(args.every)
            g = f.create_group(f"step{k}")
            g.create_dataset("u", data=sim.block)
            g.create_dataset("dudt", data=sim.dudt())
            g.attrs["time"] = sim.time
    # ---------------------------------------------------------------------------------------
    if sim.rank == 0:
        print(f"wrote {args.steps} steps from {sim.size} ranks into {args.out}/heat-rank*.h5")


if __name__ == "__main__":
    main()
