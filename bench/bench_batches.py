"""Warm shuffled epochs as a training loop sees them, with and without DataLoader workers.

In one run, over the same samples (``--samples`` rows of ``--sample-kib`` KiB, published
through dataplane into ``h5://``), batch 32, shuffled, a warm page cache and a warm
``NodeCache``:

- ``memory``: a DataLoader over samples already in memory (default collate): the ceiling of
  the per-sample DataLoader path;
- ``naive``: the per-sample h5py Dataset most users write, over a contiguous dataset;
- ``dataplane``: ``DataLoader(SampleDataset(..., cache=NodeCache), sampler=ShuffleSampler(
  block=16))``, the documented per-sample form;
- ``batches``: ``dataplane.loaders.loader(...)``, the same order made in whole batches.

Each figure is samples/s, the median of ``--repeat`` epochs after a warm-up epoch, with
``num_workers`` 0 and 2 (workers are forked anew each epoch, as by default). ``memcpy`` is
one-thread copy bandwidth in the same run. ``new process``: one epoch of a new process over
the full cache (median of ``--repeat`` processes), against later epochs in one loader (median
of ``--repeat``).

    python bench/bench_batches.py [--samples 20000] [--sample-kib 64 4] [--repeat 3]
                                  [--workers 0 2] [--dir PATH] [--json out.json]
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
import torch
from torch.utils.data import DataLoader, Dataset, RandomSampler

from dataplane.bench.read import NaiveH5Dataset
from dataplane.cache import NodeCache
from dataplane.loaders import SampleDataset, ShuffleSampler, loader

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_loaders import epoch, write_files  # noqa: E402  (bench/ is not a package)

BATCH = 32
BLOCK = 16


class InMemory(Dataset):
    def __init__(self, data: torch.Tensor) -> None:
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.data[i]


def write(root: str, samples: int, kib: int, steps: int = 8) -> tuple[str, str]:
    dp_path, plain, _ = write_files(root, samples, kib, steps)
    return f"h5://{dp_path}", plain


def measure(make, repeat: int) -> float:
    """Median samples/s over ``repeat`` epochs after one warm-up epoch of the same loader."""
    ld = make()
    order = getattr(ld, "order", ld.sampler)
    epoch(ld)
    rates = []
    for e in range(repeat):
        if hasattr(order, "set_epoch"):
            order.set_epoch(e + 1)
        t, n = epoch(ld)
        rates.append(n / t)
    return statistics.median(rates)


def memcpy_gbs() -> float:
    a = np.ones(64 << 18, np.float32)  # 64 MiB
    b = np.empty_like(a)
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        np.copyto(b, a)
        times.append(time.perf_counter() - t0)
    return a.nbytes / min(times) / 1e9


def child(url: str, cache: str, batches: bool) -> None:
    """One epoch of a new process over a full cache (what a later job on the node sees)."""
    ds = SampleDataset(url, vars="x", cache=NodeCache(cache, capacity="64GB"), prefetch=False)
    sampler = ShuffleSampler(ds, seed=0, block=BLOCK)
    sampler.set_epoch(7)
    if batches:
        ld: DataLoader = loader(ds, BATCH, sampler=sampler)
    else:
        ld = DataLoader(ds, batch_size=BATCH, sampler=sampler)
    t, n = epoch(ld)
    print(json.dumps({"rate": n / t}))


def new_process(url: str, cache: str, batches: bool) -> float:
    out = subprocess.run(
        [sys.executable, __file__, "--child", url, cache, str(int(batches))],
        check=True,
        capture_output=True,
        text=True,
        timeout=600,
    ).stdout
    return float(json.loads(out.strip().splitlines()[-1])["rate"])


def run_size(root: str, samples: int, kib: int, workers: list[int], repeat: int) -> dict:
    url, plain = write(root, samples, kib)
    cache_dir = os.path.join(root, "cache")
    data = torch.from_numpy(np.ones((samples // 8 * 8, kib * 256), np.float32))
    res: dict = {"sample_kib": kib, "samples": len(data)}

    def ours(w: int, whole: bool):
        ds = SampleDataset(url, vars="x", cache=NodeCache(cache_dir, capacity="64GB"))
        sampler = ShuffleSampler(ds, seed=0, block=BLOCK)
        if whole:
            return loader(ds, BATCH, sampler=sampler, num_workers=w)
        return DataLoader(ds, batch_size=BATCH, sampler=sampler, num_workers=w)

    for w in workers:
        g = torch.Generator().manual_seed(0)
        row = {
            "memory": measure(
                lambda g=g, w=w: DataLoader(
                    InMemory(data), BATCH, sampler=RandomSampler(data, generator=g), num_workers=w
                ),
                repeat,
            ),
            "naive": measure(
                lambda g=g, w=w: DataLoader(
                    NaiveH5Dataset(plain, "x", step_axis=False),
                    BATCH,
                    sampler=RandomSampler(data, generator=g),
                    num_workers=w,
                ),
                repeat,
            ),
            "dataplane": measure(lambda w=w: ours(w, False), repeat),
            "batches": measure(lambda w=w: ours(w, True), repeat),
        }
        res[f"workers={w}"] = row
    # A second epoch in the same loader, against a new process over the same full cache.
    for whole in (False, True):
        same = measure(lambda whole=whole: ours(0, whole), repeat)
        fresh = statistics.median(new_process(url, cache_dir, whole) for _ in range(repeat))
        res[f"new_process_{'batches' if whole else 'dataplane'}"] = {"same": same, "new": fresh}
    shutil.rmtree(cache_dir, ignore_errors=True)
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--samples", type=int, default=20000)
    ap.add_argument("--sample-kib", type=int, nargs="+", default=[64, 4])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    ap.add_argument("--dir", help="where the files and the cache go (default: a temporary dir)")
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        child(args.child[0], args.child[1], args.child[2] == "1")
        return 0
    copy = memcpy_gbs()
    print(f"memcpy {copy:.1f} GB/s; batch {BATCH}; ShuffleSampler(block={BLOCK}); warm caches")
    results = {"memcpy_gbs": copy, "sizes": []}
    for kib in args.sample_kib:
        root = tempfile.mkdtemp(prefix="dp-bench-batches-", dir=args.dir)
        try:
            r = run_size(root, args.samples, kib, args.workers, args.repeat)
        finally:
            shutil.rmtree(root, ignore_errors=True)
        results["sizes"].append(r)
        nbytes = kib * 1024
        for w in args.workers:
            row = r[f"workers={w}"]
            print(
                f"{kib:3d} KiB workers={w}: "
                + "  ".join(f"{k} {v:8.0f}/s" for k, v in row.items())
                + f"  | batches {row['batches'] * nbytes / 1e9:.2f} GB/s = "
                f"{row['batches'] * nbytes / 1e9 / copy:.0%} of memcpy, "
                f"{row['batches'] / row['naive']:.1f}x naive, "
                f"{row['batches'] / row['memory']:.2f}x the in-memory DataLoader"
            )
        for kind in ("dataplane", "batches"):
            np_ = r[f"new_process_{kind}"]
            print(
                f"{kib:3d} KiB new process over the full cache ({kind}): {np_['new']:.0f}/s, "
                f"{np_['new'] / np_['same']:.0%} of a later epoch in one loader "
                f"({np_['same']:.0f}/s)"
            )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
