"""Shuffled training epochs: SampleDataset + ShuffleSampler against the naive h5py Dataset.

The naive Dataset is what most users write: open the file lazily in each worker, and let
``__getitem__`` read one row with h5py. Both read the same files in the same run, through a
``DataLoader`` with ``batch_size=32`` and ``num_workers`` 0 and 2:

- ``dataplane.h5``: the file ``publish("h5://...")`` writes (one dataset per variable with a
  leading step axis, a chunk per step), the way a simulation stores its output;
- ``plain.h5``: one contiguous ``(samples, ...)`` dataset written with plain h5py.

Reported: samples/s and GB/s of one shuffled epoch (median of ``--repeat`` epochs after one
warm-up epoch, so the page cache is warm: the data is smaller than memory), and the ratio of
each dataplane figure to the naive reader's with the same file and workers. ``block`` is the
ShuffleSampler's window in shards (``None``: a uniform shuffle, like the naive reader's).

    python bench/bench_loaders.py [--samples 8192] [--sample-kib 64] [--steps 8] [--repeat 3]
                                  [--dir PATH] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile

import h5py
import numpy as np
import torch
from torch.utils.data import DataLoader, RandomSampler

import dataplane as dp
from dataplane.bench.read import NaiveH5Dataset, run_epoch
from dataplane.loaders import SampleDataset, ShuffleSampler

BATCH = 32


def write_files(root: str, samples: int, sample_kib: int, steps: int) -> tuple[str, str, int]:
    per_step = samples // steps
    width = sample_kib * 1024 // 4
    rng = np.random.default_rng(0)
    block = rng.standard_normal((per_step, width), dtype=np.float32)
    dp_path = os.path.join(root, "dataplane.h5")
    with dp.publish(f"h5://{dp_path}") as pub:
        for s in range(steps):
            pub.write({"x": block + s})
    plain = os.path.join(root, "plain.h5")
    with h5py.File(plain, "w") as f:
        d = f.create_dataset("x", (per_step * steps, width), dtype=np.float32)
        for s in range(steps):
            d[s * per_step : (s + 1) * per_step] = block + s
    return dp_path, plain, per_step


def epoch(loader: DataLoader) -> tuple[float, int]:
    res = run_epoch(loader, float("inf"))
    return res["seconds"], res["samples"]


def measure(make, workers: int, repeat: int) -> float:
    """Median seconds of an epoch; the loader (and its workers) is made once, warmed once."""
    loader = make(workers)
    epoch(loader)
    times = []
    for e in range(repeat):
        sampler = loader.sampler
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(e + 1)
        times.append(epoch(loader)[0])
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--samples", type=int, default=8192)
    ap.add_argument("--sample-kib", type=int, default=64)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    ap.add_argument("--dir", help="where the files go (default: a temporary directory)")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args(argv)
    root = tempfile.mkdtemp(prefix="dp-bench-loaders-", dir=args.dir)
    try:
        dp_path, plain, per_step = write_files(root, args.samples, args.sample_kib, args.steps)
        n = per_step * args.steps
        nbytes = args.sample_kib * 1024
        print(
            f"{n} samples of {args.sample_kib} KiB ({n * nbytes / 1e9:.2f} GB) in {args.steps} "
            f"steps; batch {BATCH}; warm page cache; median of {args.repeat} epochs"
        )
        files = {"dataplane.h5": (dp_path, per_step), "plain.h5": (plain, None)}
        results = []
        for label, (path, rows) in files.items():
            url = f"h5://{path}"

            def naive(workers: int, path=path, rows=rows) -> DataLoader:
                ds = NaiveH5Dataset(path, "x", step_axis=rows is not None)
                sampler = RandomSampler(ds, generator=torch.Generator().manual_seed(0))
                return DataLoader(ds, batch_size=BATCH, sampler=sampler, num_workers=workers)

            def ours(workers: int, block: int | None, url=url) -> DataLoader:
                ds = SampleDataset(url, vars="x")
                sampler = ShuffleSampler(ds, seed=0, block=block)
                return DataLoader(ds, batch_size=BATCH, sampler=sampler, num_workers=workers)

            for workers in args.workers:
                base = measure(naive, workers, args.repeat)
                row = {"file": label, "workers": workers, "naive_s": base}
                results.append(row)
                print(
                    f"{label:13s} workers={workers}  naive h5py Dataset   "
                    f"{n / base:9.0f} samples/s  {n * nbytes / base / 1e9:5.2f} GB/s"
                )
                for block in (None, 64):
                    t = measure(lambda w, b=block: ours(w, b), workers, args.repeat)
                    row[f"dataplane_block{block}_s"] = t
                    print(
                        f"{label:13s} workers={workers}  SampleDataset block={str(block):4s} "
                        f"{n / t:9.0f} samples/s  {n * nbytes / t / 1e9:5.2f} GB/s  "
                        f"{base / t:5.1f}x naive"
                    )
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"samples": n, "sample_bytes": nbytes, "results": results}, f, indent=1)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
