"""Cooperating node caches against caches alone, over a slow source, as a training job sees it.

Run under MPI (``mpiexec -n 4 python bench/bench_coop.py``): the ranks are split into
``--nodes`` "nodes" in order, each with its own cache directory holding ``--fit`` of the
dataset (together they hold it, alone none does). The dataset is a ``zarr+throttled://``
channel: a local Zarr store read through an fsspec filesystem that serves each read after
``--latency-ms`` and at ``--source-mbs`` MB/s (a parallel filesystem under load, slower than
the node-local disk). For each mode (``alone``: ``NodeCache(path)``; ``cooperating``:
``NodeCache(path, comm=comm)``) a fresh set of caches reads ``--epochs`` shuffled epochs of
batch 32 (``ShuffleSampler``, distributed), every batch checked against what was written.

Reported per mode and epoch: the epoch's time (slowest rank, barrier to barrier), and in all:
bytes read from the source over all nodes against the dataset's size, bytes moved between
nodes. Prefetch is off: the throttled filesystem exists only in this script's processes.

    mpiexec -n 4 python bench/bench_coop.py [--nodes 2] [--mib 64] [--epochs 3]
        [--source-mbs 200] [--latency-ms 5] [--fit 0.75] [--dir PATH] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

import fsspec
import numpy as np
from fsspec.implementations.local import LocalFileSystem
from mpi4py import MPI

import dataplane as dp
from dataplane.cache import NodeCache, cache_stats
from dataplane.loaders import SampleDataset, ShuffleSampler

COLS = 1024  # float32: 4 KiB samples
ROWS = 2048  # per step


class Throttled(LocalFileSystem):
    """The local filesystem, each read served after a latency and at a bandwidth."""

    protocol = "throttled"
    latency = 0.005
    bandwidth = 200e6

    def cat_file(self, path, start=None, end=None, **kwargs):  # type: ignore[no-untyped-def]
        data = super().cat_file(path, start=start, end=end, **kwargs)
        time.sleep(self.latency + len(data) / self.bandwidth)
        return data


fsspec.register_implementation("throttled", Throttled, clobber=True)


def value(i: int) -> np.ndarray:
    step, row = divmod(i, ROWS)
    return np.arange(COLS, dtype=np.float32) + step * 10000 + row


def run_mode(args, comm, url: str, root: str, coop: bool, nbytes: int) -> dict:
    rank, world = comm.rank, comm.size
    node = rank * args.nodes // world
    paths = [
        os.path.join(root, f"cache-{'coop' if coop else 'alone'}-{n}") for n in range(args.nodes)
    ]
    capacity = int(nbytes * args.fit) + (1 << 20)
    kw = {"comm": comm, "node": f"n{node}"} if coop else {}
    cache = NodeCache(paths[node], capacity=capacity, **kw)
    ds = SampleDataset(url, vars="x", cache=cache, shard_bytes=256 << 10, prefetch=False)
    sampler = ShuffleSampler(ds, seed=0, block=16, rank=rank, world=world)
    times, bad = [], 0
    for epoch in range(args.epochs):
        sampler.set_epoch(epoch)
        order = sampler.order()
        comm.Barrier()
        t0 = time.perf_counter()
        for a, batch in zip(range(0, len(order), 32), (ds.batch(b) for b in sampler.batches(32))):
            idx = order[a : a + 32]
            # Spot-check rows (the whole check would cost more than the reads it measures).
            for k in (0, len(idx) - 1):
                bad += int(not np.array_equal(batch[k].numpy(), value(int(idx[k]))))
        comm.Barrier()
        times.append(time.perf_counter() - t0)
    cache.flush_stats()
    bad = comm.allreduce(bad)
    comm.Barrier()
    out = {"epoch_s": times, "bad": bad}
    if rank == 0:
        stats = [cache_stats(p) for p in paths]
        out["source_over_dataset"] = sum(s["source_bytes"] for s in stats) / nbytes
        out["peer_mb"] = sum(s["peer_bytes"] for s in stats) / 1e6
        out["peer_failures"] = sum(s["peer_failures"] for s in stats)
    if cache.peers is not None:
        comm.Barrier()
        cache.peers.close()
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--nodes", type=int, default=2)
    ap.add_argument("--mib", type=int, default=64, help="dataset size")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--source-mbs", type=float, default=200.0)
    ap.add_argument("--latency-ms", type=float, default=5.0)
    ap.add_argument("--fit", type=float, default=0.75, help="share of the dataset a node holds")
    ap.add_argument("--dir", help="where the dataset and caches go (default: a temporary dir)")
    ap.add_argument("--json", help="also write the results here (rank 0)")
    args = ap.parse_args(argv)
    Throttled.latency, Throttled.bandwidth = args.latency_ms / 1e3, args.source_mbs * 1e6
    comm = MPI.COMM_WORLD
    if comm.size < args.nodes:
        raise SystemExit(f"--nodes {args.nodes} needs at least as many ranks (mpiexec -n)")
    root = comm.bcast(
        tempfile.mkdtemp(prefix="dp-bench-coop-", dir=args.dir) if comm.rank == 0 else None
    )
    steps = max(1, (args.mib << 20) // (ROWS * COLS * 4))
    nbytes = steps * ROWS * COLS * 4
    try:
        if comm.rank == 0:
            with dp.publish(f"zarr://{root}/run.zarr") as pub:
                for s in range(steps):
                    pub.write({"x": np.stack([value(s * ROWS + r) for r in range(ROWS)])})
        comm.Barrier()
        url = f"zarr+throttled://{root}/run.zarr"
        results = {}
        for coop in (False, True):
            results["cooperating" if coop else "alone"] = run_mode(
                args, comm, url, root, coop, nbytes
            )
        if comm.rank == 0:
            print(
                f"{comm.size} ranks on {args.nodes} nodes; {nbytes / 1e6:.0f} MB, each node's "
                f"cache {args.fit:.0%} of it; source {args.source_mbs:.0f} MB/s + "
                f"{args.latency_ms:.0f} ms per read"
            )
            for mode, r in results.items():
                epochs = "  ".join(f"{t:6.2f}" for t in r["epoch_s"])
                print(
                    f"{mode:<12} epochs (s) {epochs} | source {r['source_over_dataset']:.2f}x "
                    f"the dataset, {r['peer_mb']:.0f} MB between nodes, wrong rows {r['bad']}"
                )
            a, c = results["alone"]["epoch_s"], results["cooperating"]["epoch_s"]
            print(f"later epochs: cooperating {sum(a[1:]) / max(sum(c[1:]), 1e-9):.2f}x as fast")
            if args.json:
                with open(args.json, "w") as f:
                    json.dump({"config": vars(args), "ranks": comm.size, **results}, f)
    finally:
        comm.Barrier()
        if comm.rank == 0:
            shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
