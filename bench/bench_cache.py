"""Shuffled epochs through the node-local cache and prefetcher, against the naive h5py Dataset.

Data (defaults: 20,000 samples of 64 KiB, 1.3 GB, and 20,000 of 4 KiB) published through
dataplane the way a simulation writes it, 64 samples per step, so HDF5 stores 64 samples per
chunk; the same samples in one contiguous dataset written with plain h5py; and through BP5 and
Zarr. In the same run it measures the machine's limits (numpy memcpy; sequential read of the
file, cold and warm) and then shuffled epochs, batch 32:

- ``naive``: the per-sample h5py Dataset (lazy open, one row per ``__getitem__``), cold (the
  file's pages evicted) and warm;
- ``dataplane cold``: ``SampleDataset`` + ``NodeCache`` (fresh) + prefetcher + ``ShuffleSampler``,
  with the source file's pages evicted (``posix_fadvise(DONTNEED)``; the cache is empty);
- ``dataplane warm``: the next epoch, everything cached;
- ``DataLoader ceiling``: samples already in memory, as views: what the DataLoader itself
  allows with that many workers.

Slow readers are timed over a bounded part of the epoch (``--max-seconds``); figures are
samples/s and GB/s of sample bytes. Finally a dataset twice the cache's capacity: shard reads
from the source in one epoch against the minimum Belady's eviction allows for that order.

    python bench/bench_cache.py [--samples 20000] [--sample-kib 64] [--small-kib 4]
                                [--formats h5,bp5,zarr] [--dir PATH] [--json out.json] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
from typing import Any

import h5py
import numpy as np
from torch.utils.data import DataLoader, RandomSampler

import dataplane as dp
from dataplane.bench import evict as _evict
from dataplane.bench import memcpy_gbps, seq_read
from dataplane.bench.read import CeilingDataset, NaiveH5Dataset, loader_for, run_epoch
from dataplane.cache import NodeCache, batched, belady_reads
from dataplane.loaders import SampleDataset, ShuffleSampler

BATCH = 32
PER_STEP = 64


def evict(path: str) -> None:
    """Drop a file's (or a directory tree's) pages from the page cache."""
    _evict([path], "fadvise")


def write_data(root: str, samples: int, kib: int, formats: list[str]) -> dict[str, str]:
    width = kib * 1024 // 4
    steps = samples // PER_STEP
    rng = np.random.default_rng(0)
    block = rng.standard_normal((PER_STEP, width), dtype=np.float32)
    paths = {}
    for fmt in formats:
        ext = {"h5": "h5", "bp5": "bp", "zarr": "zarr"}[fmt]
        paths[fmt] = os.path.join(root, f"chunked-{kib}k.{ext}")
        with dp.publish(f"{fmt}://{paths[fmt]}") as pub:
            for s in range(steps):
                pub.write({"x": block + s})
    paths["contiguous"] = os.path.join(root, f"contiguous-{kib}k.h5")
    with h5py.File(paths["contiguous"], "w") as f:
        d = f.create_dataset("x", (steps * PER_STEP, width), dtype=np.float32)
        for s in range(steps):
            d[s * PER_STEP : (s + 1) * PER_STEP] = block + s
    return paths


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--samples", type=int, default=20_000)
    ap.add_argument("--sample-kib", type=int, default=64)
    ap.add_argument("--small-kib", type=int, default=4)
    ap.add_argument("--formats", default="h5,bp5,zarr")
    ap.add_argument("--max-seconds", type=float, default=15.0)
    ap.add_argument("--dir", help="where data and cache go (default: a temporary directory)")
    ap.add_argument("--json", help="also write every figure here (JSON lines)")
    ap.add_argument("--quick", action="store_true", help="tiny sizes (what the tests run)")
    args = ap.parse_args(argv)
    if args.quick:
        args.samples, args.max_seconds = 1024, 2.0
    formats = args.formats.split(",")
    root = tempfile.mkdtemp(prefix="dp-bench-cache-", dir=args.dir)
    rows: list[dict[str, Any]] = []

    def report(**row: Any) -> None:
        rows.append(row)
        extra = "  ".join(f"{k}={v}" for k, v in row.items() if k not in ("what", "gbps", "sps"))
        fig = f"{row['sps']:9.0f} samples/s" if "sps" in row else " " * 19
        fig += f" {row['gbps']:6.2f} GB/s" if "gbps" in row else " " * 12
        print(f"{row['what']:40s} {fig}  {extra}", flush=True)

    try:
        mc = memcpy_gbps()
        report(what="memcpy", gbps=mc)
        first: dict[str, str] = {}
        for kib in (args.sample_kib, args.small_kib):
            paths = write_data(root, args.samples, kib, formats)
            first = first or paths
            n_bytes = kib * 1024
            src = paths[formats[0]]
            evict(src)
            cold = os.path.getsize(src) / seq_read(src) / 1e9 if os.path.isfile(src) else None
            warm = os.path.getsize(src) / seq_read(src) / 1e9 if os.path.isfile(src) else None
            if cold is not None:
                report(what=f"{kib}KiB sequential read cold", gbps=cold, evicted="fadvise")
                report(what=f"{kib}KiB sequential read warm", gbps=warm)

            def figure(what: str, loader: DataLoader, n_bytes: int = n_bytes, **kw: Any) -> float:
                res = run_epoch(loader, args.max_seconds)
                secs, n = res["seconds"], res["samples"]
                report(what=what, sps=n / secs, gbps=n * n_bytes / secs / 1e9, samples=n, **kw)
                return n / secs

            for workers in (0, 2):
                ceiling = CeilingDataset(args.samples, n_bytes)
                loader = loader_for(ceiling, workers, BATCH, shuffle=True)
                run_epoch(loader, args.max_seconds / 3)
                figure(f"{kib}KiB DataLoader ceiling w={workers}", loader)
                for layout, path, step_axis in (
                    ("chunked", paths.get("h5"), True),
                    ("contiguous", paths["contiguous"], False),
                ):
                    if path is None:
                        continue
                    ds = NaiveH5Dataset(path, "x", step_axis)
                    sampler = RandomSampler(ds)
                    if workers == 0:
                        evict(path)
                        loader = DataLoader(ds, batch_size=BATCH, sampler=sampler)
                        figure(f"{kib}KiB naive h5py {layout} cold w=0", loader, evicted="fadvise")
                    loader = loader_for(ds, workers, BATCH, sampler=sampler)
                    run_epoch(loader, args.max_seconds / 3)  # warm the page cache and workers
                    figure(f"{kib}KiB naive h5py {layout} warm w={workers}", loader)
            for fmt in formats:
                url = f"{fmt}://{paths[fmt]}"
                cdir = os.path.join(root, f"cache-{fmt}-{kib}")
                cache = NodeCache(cdir, capacity="40GB")
                ds = SampleDataset(url, vars="x", cache=cache)
                sampler = ShuffleSampler(ds, seed=0, block=16)
                evict(paths[fmt])
                if os.path.isfile(paths[fmt]):  # the disk's speed drifts: measure it right here
                    seq = os.path.getsize(paths[fmt]) / seq_read(paths[fmt]) / 1e9
                    report(what=f"{kib}KiB {fmt} sequential read cold", gbps=seq)
                    evict(paths[fmt])
                loader = DataLoader(ds, batch_size=BATCH, sampler=sampler, num_workers=0)
                figure(f"{kib}KiB dataplane {fmt} cold w=0", loader, evicted="fadvise+empty cache")
                for workers in (0, 2):
                    sampler.set_epoch(1 + workers)
                    loader = loader_for(ds, workers, BATCH, sampler=sampler)
                    if workers:
                        run_epoch(loader, args.max_seconds / 3)  # start the workers
                    figure(f"{kib}KiB dataplane {fmt} warm w={workers}", loader, workers=workers)
                if ds._epochs.prefetcher is not None:
                    ds._epochs.prefetcher.close()
                cache.close()
                shutil.rmtree(cdir, ignore_errors=True)
        # A dataset twice the cache (the big samples): shard reads from the source in one
        # uniformly shuffled epoch against the minimum Belady's eviction allows.
        url = f"{formats[0]}://{first[formats[0]]}"
        probe = SampleDataset(url, vars="x")
        total = int(probe.shard_nbytes().sum())
        shard = min(4 << 20, total // 64)  # 4 MiB shards, and enough of them when --quick
        cdir = os.path.join(root, "cache-half")
        cache = NodeCache(cdir, capacity=total // 2)
        ds = SampleDataset(url, vars="x", cache=cache, prefetch=False, shard_bytes=shard)
        sampler = ShuffleSampler(ds, seed=0, block=None)
        run_epoch(DataLoader(ds, batch_size=BATCH, sampler=sampler), float("inf"))
        sizes = ds.shard_nbytes()
        uses = np.searchsorted(ds.shard_bounds(), sampler.order(), side="right") - 1
        room = cache.capacity // (int(sizes.max()) + 4096) * int(sizes.max())
        minimum, _ = belady_reads(batched(uses, BATCH), sizes, room)
        got = cache.stats["misses"]
        report(
            what="half-size cache: shard reads",
            reads=int(got),
            belady_min=minimum,
            ratio=round(got / max(minimum, 1), 3),
            shards=len(sizes),
        )
    finally:
        shutil.rmtree(root, ignore_errors=True)
    if args.json:
        with open(args.json, "w") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
