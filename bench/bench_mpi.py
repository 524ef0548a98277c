"""Write throughput of ``publish(url, comm=comm)`` with 1, 2 and 4 MPI ranks, per transport,
next to every rank writing its own file with plain h5py, measured in one run.

Every rank holds an equal block of rows of a global float64 array (``--mib`` per step in all)
and writes ``--steps`` steps; the time runs from a barrier before the publisher opens to a
barrier after it closed, so it includes opening, every collective step and the final flush.
For ``shm://`` and ``sst://`` one more rank subscribes and reads every step in full (a stream
without a reader measures nothing). Figures are medians over ``--repeat`` runs.

The plain baseline is the fastest thing MPI codes do without coordination: each rank writes
``rank<r>.h5`` with one dataset per step. It is an upper bound, not a like-for-like channel:
there is no global array, no checksums, and nobody can follow it live.

    python bench/bench_mpi.py [--ranks 1,2,4] [--schemes h5,bp5,zarr,shm,sst] [--mib 64]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = os.path.abspath(__file__)


def worker(args: argparse.Namespace) -> int:
    from mpi4py import MPI

    import dataplane as dp

    world = MPI.COMM_WORLD
    streams = args.scheme in ("shm", "sst")
    writers = world.Get_size() - (1 if streams else 0)
    is_writer = world.Get_rank() < writers
    comm = world.Split(0 if is_writer else 1, world.Get_rank())
    rows = args.mib * 2**20 // 8 // 1024
    mine = rows // writers + (1 if comm.Get_rank() < rows % writers else 0)
    block = np.random.default_rng(comm.Get_rank()).standard_normal((mine, 1024))
    url = {
        "h5": f"h5://{args.dir}/run.h5",
        "bp5": f"bp5://{args.dir}/run.bp",
        "zarr": f"zarr://{args.dir}/run.zarr",
        "shm": f"shm://bench-mpi-{os.getpid() if world.Get_rank() == 0 else 0}",
        "sst": f"sst://{args.dir}/stream",
    }.get(args.scheme)
    if url is not None:
        url = world.bcast(url, root=0)
    world.Barrier()
    t0 = time.perf_counter()
    if not is_writer:
        with dp.subscribe(url, timeout=120) as sub:
            for step in sub:
                np.asarray(step["u"]).sum()
    elif args.scheme == "plain-h5":
        import h5py

        with h5py.File(f"{args.dir}/rank{comm.Get_rank()}.h5", "w") as f:
            for i in range(args.steps):
                f.create_dataset(f"u{i}", data=block + i)
    else:
        opts = {"rendezvous": 1} if streams else {}
        with dp.publish(url, comm=comm, **opts) as pub:
            for i in range(args.steps):
                pub.write({"u": block + i if i else block})
    world.Barrier()
    seconds = time.perf_counter() - t0
    if world.Get_rank() == 0:
        print(json.dumps({"seconds": seconds, "bytes": rows * 1024 * 8 * args.steps}))
    return 0


def run_one(mpiexec: str, scheme: str, ranks: int, args: argparse.Namespace) -> float:
    directory = tempfile.mkdtemp(prefix="dataplane-bench-mpi-", dir=args.dir)
    try:
        n = ranks + (1 if scheme in ("shm", "sst") else 0)
        cmd = [mpiexec, "-n", str(n), sys.executable, HERE, "--worker", scheme, "--dir", directory]
        cmd += ["--steps", str(args.steps), "--mib", str(args.mib)]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        if out.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{out.stderr[-2000:]}")
        line = [x for x in out.stdout.splitlines() if x.startswith("{")][-1]
        result = json.loads(line)
        return result["bytes"] / result["seconds"] / 1e9
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ranks", default="1,2,4")
    ap.add_argument("--schemes", default="h5,bp5,zarr,shm,sst")
    ap.add_argument("--mib", type=int, default=64, help="global MiB per step")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--dir", help="where files go (default: a temporary directory)")
    ap.add_argument("--json", help="also write the rows as JSON here")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        args.scheme = args.worker
        return worker(args)
    mpiexec = shutil.which("mpiexec", path=os.path.dirname(sys.executable)) or shutil.which(
        "mpiexec"
    )
    if not mpiexec:
        print("mpiexec not found: pip install mpich", file=sys.stderr)
        return 1
    ranks = [int(r) for r in args.ranks.split(",")]
    schemes = ["plain-h5", *args.schemes.split(",")]
    rows = []
    print(f"{args.steps} steps of {args.mib} MiB (global), {os.cpu_count()} cores; GB/s, median")
    print(
        f"{'transport':<10}" + "".join(f"{f'{r} rank' + ('s' if r > 1 else ''):>12}" for r in ranks)
    )
    for scheme in schemes:
        cells = []
        for r in ranks:
            samples = [run_one(mpiexec, scheme, r, args) for _ in range(args.repeat)]
            gbps = statistics.median(samples)
            cells.append(gbps)
            rows.append({"transport": scheme, "ranks": r, "gb_per_s": gbps, "samples": samples})
        print(f"{scheme:<10}" + "".join(f"{c:>12.2f}" for c in cells), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
