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

With an MPI-enabled h5py (``make test-mpio`` builds one in ``.venv-mpio``), ``h5`` writes
through native MPI-IO, and ``plain-mpio`` (plain h5py, ``driver="mpio"``, every rank its
hyperslab of one dataset per step) is measured beside it.

``h5@K`` and ``bp5@K`` are ``h5://`` and ``bp5://`` with ``aggregators=K`` (``@ranks``: every
rank writes a subfile of its own, joined by the channel's file; plain ``h5`` and ``bp5`` are
the default, one aggregator per node).

Files go to ``--dir``; the default is ``/dev/shm`` (memory) where it exists, because on a
disk the kernel's write-back throttling dominates and varies tenfold between runs. Point it
at your parallel filesystem to measure that.

    python bench/bench_mpi.py [--ranks 1,2,4] [--mib 64]
                              [--schemes h5,h5@ranks,bp5,bp5@ranks,zarr,shm,sst]
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


def polite_barrier(comm) -> None:
    """A barrier that sleeps while it waits: MPI spins, and with more ranks than cores the
    spinning ranks would take the cores from the ones still working (the reader, rank 0)."""
    req = comm.Ibarrier()
    while not req.Test():
        time.sleep(1e-4)


def worker(args: argparse.Namespace) -> int:
    from mpi4py import MPI

    import dataplane as dp

    world = MPI.COMM_WORLD
    scheme, _, aggregators = args.scheme.partition("@")
    streams = scheme in ("shm", "sst")
    writers = world.Get_size() - (1 if streams else 0)
    is_writer = world.Get_rank() < writers
    comm = world.Split(0 if is_writer else 1, world.Get_rank())
    rows = args.mib * 2**20 // 8 // 1024
    mine = rows // writers + (1 if comm.Get_rank() < rows % writers else 0)
    block = np.random.default_rng(comm.Get_rank()).standard_normal((mine, 1024))
    steps = [block + i for i in range(args.steps)] if is_writer else []
    url = {
        "h5": f"h5://{args.dir}/run.h5",
        "bp5": f"bp5://{args.dir}/run.bp",
        "zarr": f"zarr://{args.dir}/run.zarr",
        "shm": f"shm://bench-mpi-{os.getpid() if world.Get_rank() == 0 else 0}",
        "sst": f"sst://{args.dir}/stream",
    }.get(scheme)
    if url is not None:
        url = world.bcast(url, root=0)
        dp.registry.resolve(url)  # imports the transport (adios2, h5py, ...) before the clock
    import h5py  # noqa: F401  (the baseline's, also before the clock)

    polite_barrier(world)
    t0 = time.perf_counter()
    if not is_writer:
        with dp.subscribe(url, timeout=120) as sub:
            for step in sub:
                np.asarray(step["u"]).sum()
    elif args.scheme == "plain-h5":
        with h5py.File(f"{args.dir}/rank{comm.Get_rank()}.h5", "w") as f:
            for i, data in enumerate(steps):
                f.create_dataset(f"u{i}", data=data)
    elif args.scheme == "plain-mpio":
        r = comm.Get_rank()
        first = r * (rows // writers) + min(r, rows % writers)
        with h5py.File(f"{args.dir}/mpio.h5", "w", driver="mpio", comm=comm) as f:
            for i, data in enumerate(steps):
                d = f.create_dataset(f"u{i}", (rows, 1024), dtype=data.dtype)
                d[first : first + mine] = data
    else:
        opts: dict = {"rendezvous": 1} if streams else {}
        if aggregators:
            opts["aggregators"] = comm.Get_size() if aggregators == "ranks" else int(aggregators)
        with dp.publish(url, comm=comm, **opts) as pub:
            for data in steps:
                pub.write({"u": data})
    polite_barrier(world)
    seconds = time.perf_counter() - t0
    if world.Get_rank() == 0:
        print(json.dumps({"seconds": seconds, "bytes": rows * 1024 * 8 * args.steps}))
    return 0


def run_one(mpiexec: str, scheme: str, ranks: int, args: argparse.Namespace) -> float:
    directory = tempfile.mkdtemp(prefix="dataplane-bench-mpi-", dir=args.dir)
    try:
        n = ranks + (1 if scheme.partition("@")[0] in ("shm", "sst") else 0)
        cmd = [mpiexec, "-n", str(n), sys.executable, HERE, "--worker", scheme, "--dir", directory]
        cmd += ["--steps", str(args.steps), "--mib", str(args.mib)]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
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
    ap.add_argument("--schemes", default="h5,h5@ranks,bp5,bp5@ranks,zarr,shm,sst")
    ap.add_argument("--mib", type=int, default=64, help="global MiB per step")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--dir", help="where files go (default: /dev/shm, else a temporary dir)")
    ap.add_argument("--json", help="also write the rows as JSON here")
    ap.add_argument("--timeout", type=float, default=300, help="seconds per mpiexec run")
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
    import h5py

    plain = ["plain-h5", "plain-mpio"] if h5py.get_config().mpi else ["plain-h5"]
    schemes = [*plain, *args.schemes.split(",")]
    if args.dir is None and os.access("/dev/shm", os.W_OK):
        # Memory-backed: the page cache of a disk throttles writers whenever the kernel
        # flushes dirty pages, which made repeated runs here differ tenfold.
        args.dir = "/dev/shm"
    where = args.dir or tempfile.gettempdir()
    print(
        f"{args.steps} steps of {args.mib} MiB (global) into {where}, {os.cpu_count()} cores; "
        f"GB/s, median of {args.repeat}",
        flush=True,
    )
    # Interleaved, so that a slow spell of the machine spreads over every cell.
    samples: dict[tuple[str, int], list[float]] = {(s, r): [] for s in schemes for r in ranks}
    for _ in range(args.repeat):
        for scheme in schemes:
            for r in ranks:
                samples[scheme, r].append(run_one(mpiexec, scheme, r, args))
    rows = []
    header = "".join(f"{f'{r} rank' + ('s' if r > 1 else ''):>12}" for r in ranks)
    print(f"{'transport':<10}{header}")
    for scheme in schemes:
        cells = []
        for r in ranks:
            gbps = statistics.median(samples[scheme, r])
            cells.append(gbps)
            rows.append(
                {"transport": scheme, "ranks": r, "gb_per_s": gbps, "samples": samples[scheme, r]}
            )
        print(f"{scheme:<10}" + "".join(f"{c:>12.2f}" for c in cells), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
