"""Many files as one training set: ``SampleDataset("h5://.../*.h5")`` against a per-sample
h5py Dataset that keeps every file open.

``--files`` jobs each wrote ``--steps`` steps of ``--rows`` samples of ``--sample-kib`` KiB:
through ``dp.publish`` for dataplane, as one contiguous dataset per file with plain h5py for
the naive reader (what such a user writes). Shuffled epochs, batch 32, samples/s:

- ``cold``: the files' pages dropped from the page cache (``posix_fadvise(DONTNEED)``) and
  an empty ``NodeCache``: the first epoch of a job;
- ``warm``: the next epoch (median of ``--repeat``), page cache and node cache full;
- ``dataset made in``: ``SampleDataset``'s construction over cold files (it looks at every
  file), and the cold epoch counted from the start of the construction;
- ``new job``: a new process over the full node cache (a restart, the next run of a sweep):
  its construction (it takes what the first job's look found, see ``loaders/_looks``) and
  its first epoch counted from it, against the first job's warm epochs;
- ``look``: the look alone over cold files (``dataplane._look.look_all``), in this process
  and with 1 .. ``--helpers`` helper processes (median of ``--repeat``).

Dataplane reads through ``ShuffleSampler(block=16)`` and ``loader()``; the naive reader through
a uniform ``RandomSampler``. ``num_workers`` 0 and 2.

    python bench/bench_many_files.py [--files 400] [--steps 2] [--rows 25] [--sample-kib 16]
                                     [--repeat 3] [--prefetch 1] [--helpers N] [--dir PATH]
                                     [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import statistics
import tempfile
import time
from typing import Any

import h5py
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, RandomSampler

import dataplane as dp
from dataplane import _look
from dataplane.bench._common import evict
from dataplane.cache import NodeCache
from dataplane.loaders import SampleDataset, ShuffleSampler, _looks, loader
from dataplane.loaders._sources import expand

BATCH = 32


class OpenFiles(Dataset):
    """The naive reader: every file open (lazily, per process), one row per ``__getitem__``."""

    def __init__(self, paths: list[str], rows: int) -> None:
        self.paths, self.rows = paths, rows
        self._files: dict[int, Any] = {}

    def __len__(self) -> int:
        return len(self.paths) * self.rows

    def __getitem__(self, i: int) -> np.ndarray:
        k, r = divmod(i, self.rows)
        d = self._files.get(k)
        if d is None:  # the file and its dataset kept open
            d = self._files[k] = h5py.File(self.paths[k], "r")["x"]
        return d[r]

    def close(self) -> None:
        for d in self._files.values():
            d.file.close()
        self._files.clear()

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_files": {}}


def write(root: str, files: int, steps: int, rows: int, kib: int) -> tuple[str, list[str]]:
    width = kib * 1024 // 4
    rng = np.random.default_rng(0)
    block = rng.standard_normal((rows, width), dtype=np.float32)
    os.makedirs(f"{root}/dp")
    os.makedirs(f"{root}/plain")
    plain = []
    for j in range(files):
        with dp.publish(f"h5://{root}/dp/job-{j:05d}.h5") as pub:
            for s in range(steps):
                pub.write({"x": block + j + s / 100})
        path = f"{root}/plain/job-{j:05d}.h5"
        with h5py.File(path, "w") as f:
            f["x"] = np.concatenate([block + j + s / 100 for s in range(steps)])
        plain.append(path)
    return f"h5://{root}/dp/job-*.h5", plain


def epoch(ld: Any) -> float:
    n = 0
    t0 = time.perf_counter()
    for batch in ld:
        n += len(batch)
    return n / (time.perf_counter() - t0)


def run(make, order, cold: list[str], repeat: int) -> tuple[float, float]:
    """(cold samples/s, warm samples/s) of one loader: a first epoch after ``cold`` is
    dropped from the page cache, then the median of ``repeat`` epochs."""
    evict(cold, "fadvise")
    ld = make()
    first = epoch(ld)
    rates = []
    for e in range(repeat):
        if hasattr(order, "set_epoch"):
            order.set_epoch(e + 1)
        rates.append(epoch(ld))
    return first, statistics.median(rates)


def new_job(pattern: str, cache_dir: str, workers: int, prefetch: int, out: Any) -> None:
    """Send (construction s, first epoch samples/s) of this new process over the full cache
    to ``out``."""
    # A new job is a new program: its DataLoader workers start as a program's do (fork on
    # Linux), not as this spawned process's would (spawn: 3 s for two workers to import torch).
    multiprocessing.set_start_method("fork", force=True)
    t0 = time.perf_counter()
    ds = SampleDataset(
        pattern, vars="x", cache=NodeCache(cache_dir, capacity="64GB"), prefetch=prefetch
    )
    construct = time.perf_counter() - t0
    order = ShuffleSampler(ds, seed=7, block=16)
    rate = epoch(loader(ds, BATCH, sampler=order, num_workers=workers))
    ds.close()
    out.send((construct, rate))


def look_times(pattern: str, root: str, helpers: int, repeat: int) -> dict[int, float]:
    """Seconds of a look at every file, cold, by number of helper processes."""
    jobs = [(k, url, 0) for k, url in enumerate(expand(pattern))]
    out = {}
    for h in range(helpers + 1):
        times = []
        for _ in range(repeat):
            evict([root], "fadvise")
            t0 = time.perf_counter()
            _look.look_all(jobs, {}, True, True, helpers=h)
            times.append(time.perf_counter() - t0)
        out[h] = statistics.median(times)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--files", type=int, default=400)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--rows", type=int, default=25)
    ap.add_argument("--sample-kib", type=int, default=16)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    ap.add_argument("--prefetch", type=int, default=1, help="dataplane's prefetch processes")
    ap.add_argument(
        "--helpers",
        type=int,
        default=max(1, _look.default_helpers(_look.HELP_FROM * _look.MAX_HELPERS, {})),
        help="the look alone with up to this many helper processes (default: as many as a "
        "dataset of many files would start here)",
    )
    ap.add_argument("--dir", help="where the files and the cache go (default: a temporary dir)")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args(argv)
    root = tempfile.mkdtemp(prefix="dp-bench-many-", dir=args.dir)
    # What a look finds of a file is kept for later jobs once the file has been unchanged for
    # a while; these files were written just now.
    _looks.SETTLED_S = 0.0
    try:
        pattern, plain = write(root, args.files, args.steps, args.rows, args.sample_kib)
        n = args.files * args.steps * args.rows
        print(
            f"{args.files} files x {args.steps} steps x {args.rows} samples of "
            f"{args.sample_kib} KiB = {n} samples ({n * args.sample_kib / 2**20:.2f} GiB); "
            f"batch {BATCH}; samples/s"
        )
        results = []
        for w in args.workers:
            g = torch.Generator().manual_seed(0)
            naive_ds = OpenFiles(plain, args.steps * args.rows)
            sampler = RandomSampler(naive_ds, generator=g)
            naive = run(
                lambda d=naive_ds, s=sampler, w=w: DataLoader(d, BATCH, sampler=s, num_workers=w),
                sampler,
                plain,
                args.repeat,
            )
            # Its files closed: HDF5 opens and closes cost more beside files held open.
            naive_ds.close()
            cache_dir = os.path.join(root, f"cache-{w}")
            evict([os.path.join(root, "dp")], "fadvise")
            t0 = time.perf_counter()
            ds = SampleDataset(
                pattern,
                vars="x",
                cache=NodeCache(cache_dir, capacity="64GB"),
                prefetch=args.prefetch,
            )
            construct = time.perf_counter() - t0
            order = ShuffleSampler(ds, seed=0, block=16)
            ours = run(
                lambda d=ds, s=order, w=w: loader(d, BATCH, sampler=s, num_workers=w),
                order,
                [os.path.join(root, "dp")],
                args.repeat,
            )
            ds.close()
            ctx = multiprocessing.get_context("spawn")
            got, out = ctx.Pipe(duplex=False)
            job = ctx.Process(target=new_job, args=(pattern, cache_dir, w, args.prefetch, out))
            job.start()
            again = got.recv()
            job.join()
            shutil.rmtree(cache_dir, ignore_errors=True)
            row = {
                "workers": w,
                "naive_cold": naive[0],
                "naive_warm": naive[1],
                "dataplane_cold": ours[0],
                "dataplane_warm": ours[1],
                "dataplane_construct_s": construct,
                # The job's first epoch counted from the dataset's construction (cold too).
                "dataplane_cold_from_start": n / (n / ours[0] + construct),
                "new_job_construct_s": again[0],
                "new_job_first_epoch": again[1],
                "new_job_from_start": n / (n / again[1] + again[0]),
            }
            results.append(row)
            print(
                f"workers={w}: cold  naive {naive[0]:8.0f}  dataplane {ours[0]:8.0f} "
                f"({ours[0] / naive[0]:.1f}x) | warm  naive {naive[1]:8.0f}  dataplane "
                f"{ours[1]:8.0f} ({ours[1] / naive[1]:.1f}x) | dataset made in {construct:.2f} s "
                f"(cold); cold from then on {row['dataplane_cold_from_start']:.0f} "
                f"({row['dataplane_cold_from_start'] / naive[0]:.1f}x)\n"
                f"           new job over the full cache: dataset made in {again[0]:.3f} s; "
                f"first epoch {again[1]:.0f}, from the start {row['new_job_from_start']:.0f} "
                f"({row['new_job_from_start'] / ours[1]:.2f} of the first job's warm epochs)"
            )
        looks = look_times(pattern, os.path.join(root, "dp"), args.helpers, args.repeat)
        print(
            f"look at {args.files} files (cold): "
            + "; ".join(
                f"{h} helper{'s' if h != 1 else ''} {t:.2f} s ({looks[0] / t:.2f}x)"
                for h, t in looks.items()
            )
        )
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"samples": n, "results": results, "look_s": looks}, f, indent=1)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
