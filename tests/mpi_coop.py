"""Shuffled epochs over cooperating node caches, every sample checked against what was written.

Run as ``mpiexec -n R python tests/mpi_coop.py ROOT OUT [--solo] [--workers W] [--prefetch]
[--nodes N] [--interfaces A,B] [--cut-after E]``: the ranks are split into N "nodes" in order
(each its own cache directory ``ROOT/cache-<node>``), the dataset ``ROOT/run.h5`` is written
by rank 0 if missing, and each node's cache holds 3/4 of it. Rank 0 writes ``OUT/result.json``:
bytes read from the source over all nodes, against the dataset's size, and wrong batches.
``--interfaces`` names the address each node's server listens on (network namespaces);
``--cut-in E``: halfway through epoch E, rank 0 writes ``OUT/cut`` and waits for
``OUT/cut-done`` while the other ranks read on (the test cuts the link between the nodes).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings

import numpy as np
from mpi4py import MPI

import dataplane as dp
from dataplane.cache import CacheWarning, NodeCache, cache_stats
from dataplane.loaders import SampleDataset, ShuffleSampler

ROWS, COLS, STEPS = 500, 256, 8
NBYTES = ROWS * STEPS * COLS * 4


def value(i: int) -> np.ndarray:
    """Sample ``i`` as written: its step and row are in its values."""
    step, row = divmod(i, ROWS)
    return np.arange(COLS, dtype=np.float32) + step * 1000 + row * 0.5


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("root")
    ap.add_argument("out")
    ap.add_argument("--solo", action="store_true")
    ap.add_argument("--workers", type=int, default=0)
    ap.add_argument("--prefetch", action="store_true")
    ap.add_argument("--nodes", type=int, default=2)
    ap.add_argument("--interfaces", default="")
    ap.add_argument("--cut-in", type=int, default=-1)
    ap.add_argument("--epochs", type=int, default=3)
    args = ap.parse_args()
    comm = MPI.COMM_WORLD
    rank, world = comm.rank, comm.size
    url = f"h5://{args.root}/run.h5"
    if rank == 0 and not os.path.exists(f"{args.root}/run.h5"):
        with dp.publish(url) as pub:
            for s in range(STEPS):
                pub.write({"x": np.stack([value(s * ROWS + r) for r in range(ROWS)])})
    comm.Barrier()
    node = rank * args.nodes // world
    names = [f"n{k}" for k in range(args.nodes)]
    paths = [f"{args.root}/cache-{n}{'-solo' if args.solo else ''}" for n in names]
    kw = {}
    if not args.solo:
        kw = {"comm": comm, "node": names[node], "peer_timeout": 3.0, "peer_wait": 10.0}
        if args.interfaces:
            kw["interface"] = args.interfaces.split(",")[node]
    cache = NodeCache(paths[node], capacity=NBYTES * 3 // 4 + (1 << 18), **kw)
    ds = SampleDataset(url, vars="x", cache=cache, shard_bytes=64 << 10, prefetch=args.prefetch)
    sampler = ShuffleSampler(ds, seed=1, block=4, rank=rank, world=world)
    bad = 0
    warnings.simplefilter("ignore", CacheWarning)  # a cut link warns; the counts tell
    for epoch in range(args.epochs):
        sampler.set_epoch(epoch)
        order = sampler.order()
        if args.workers:
            import torch

            batches = iter(
                torch.utils.data.DataLoader(
                    ds, batch_size=32, sampler=sampler, num_workers=args.workers
                )
            )
        else:
            batches = (ds.batch(b) for b in sampler.batches(32))
        for a, got in zip(range(0, len(order), 32), batches):
            want = np.stack([value(i) for i in order[a : a + 32].tolist()])
            bad += int(not np.array_equal(got.numpy(), want))
            if epoch == args.cut_in and rank == 0 and a == len(order) // 64 * 32:
                open(f"{args.out}/cut", "w").close()
                while not os.path.exists(f"{args.out}/cut-done"):
                    time.sleep(0.05)
        comm.Barrier()
    cache.flush_stats()
    bad = comm.allreduce(bad)
    comm.Barrier()
    if rank == 0:
        stats = [cache_stats(p) for p in paths]
        result = {
            "bad": bad,
            "source_over_dataset": sum(s["source_bytes"] for s in stats) / NBYTES,
            "peer_bytes": sum(s["peer_bytes"] for s in stats),
            "peer_failures": sum(s["peer_failures"] for s in stats),
            "peer_absent": sum(s["peer_absent"] for s in stats),
        }
        with open(f"{args.out}/result.json", "w") as f:
            json.dump(result, f)
    if cache.peers is not None:
        comm.Barrier()  # no server stops while another node may still ask it
        cache.peers.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
