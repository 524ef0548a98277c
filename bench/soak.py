"""Load: stream at full rate for a long time per streaming transport, then many cached epochs,
and watch for leaks (not in CI: ``make soak``).

For each of ``mem://`` (a writer thread), ``shm://`` and ``sst://`` (a writer process): the
writer publishes 1 MiB steps as fast as the subscriber takes them (``policy="block"``,
``queue_limit=4``) for ``--seconds``; the subscriber checks that every step arrives, in
order, exactly once. Then ``--epochs`` shuffled epochs through ``SampleDataset`` +
``NodeCache`` + prefetcher + ``ShuffleSampler`` with 2 DataLoader workers. Reported: steps,
bytes, drops, and the growth of resident memory, open file descriptors and temporary files
(shared-memory segments, channel files) from the end of the warm-up (the first tenth) to the
end, for this process and the writer. Targets: no loss under ``block``, growth under 5%.

    python bench/soak.py [--seconds 600] [--epochs 20] [--transports mem,shm,sst] [--json out]
"""

from __future__ import annotations

import argparse
import glob
import json
import multiprocessing as mp
import os
import shutil
import sys
import tempfile
import threading
import time
import uuid
from typing import Any

import numpy as np

import dataplane as dp

STEP = 1 << 20


def rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def temp_files(shm_dir: str) -> int:
    """Shared-memory segments, channel files and relay leftovers that dataplane may create."""
    return len(glob.glob("/dev/shm/dp-*")) + len(glob.glob(os.path.join(shm_dir, "*")))


def _writer(url: str, seconds: float, shm_dir: str) -> None:
    os.environ["DATAPLANE_SHM_DIR"] = shm_dir
    data = np.random.default_rng(0).integers(0, 255, STEP, dtype=np.uint8)
    with dp.publish(url, queue_limit=4, rendezvous=1) as pub:
        t_end = time.monotonic() + seconds  # from when the subscriber is there
        while time.monotonic() < t_end:
            pub.write({"x": data})


def soak_stream(scheme: str, seconds: float, workdir: str) -> dict[str, Any]:
    shm_dir = os.path.join(workdir, "shm")
    os.makedirs(shm_dir, exist_ok=True)
    os.environ["DATAPLANE_SHM_DIR"] = shm_dir
    name = f"soak-{uuid.uuid4().hex[:8]}"
    url = {"mem": f"mem://{name}", "shm": f"shm://{name}", "sst": f"sst://{workdir}/{name}"}[scheme]
    if scheme == "mem":
        sub = dp.subscribe(url, timeout=60)
        writer: Any = threading.Thread(target=_writer, args=(url, seconds, shm_dir))
        writer.start()
        wpid = os.getpid()
    else:
        writer = mp.get_context("spawn").Process(target=_writer, args=(url, seconds, shm_dir))
        writer.start()
        wpid = writer.pid
        sub = dp.subscribe(url, timeout=60)
    steps = nbytes = 0
    expected = 0
    out_of_order = 0
    samples: list[tuple[float, int, int, int, int, int]] = []
    t0 = time.monotonic()
    next_sample = t0
    with sub:
        for step in sub:
            x = step["x"]
            if step.index != expected:
                out_of_order += 1
            expected = step.index + 1
            steps += 1
            nbytes += x.nbytes
            now = time.monotonic()
            if now >= next_sample:
                alive = scheme == "mem" or writer.is_alive()
                samples.append(
                    (
                        now - t0,
                        rss(os.getpid()),
                        fds(os.getpid()),
                        rss(wpid) if alive else 0,
                        fds(wpid) if alive else 0,
                        temp_files(shm_dir),
                    )
                )
                next_sample = now + max(seconds / 50, 0.5)
        dropped = sub.stats.dropped
    writer.join(60)
    return {
        "transport": scheme,
        "seconds": time.monotonic() - t0,
        "steps": steps,
        "bytes": nbytes,
        "dropped": dropped,
        "lost_or_reordered": out_of_order,
        **growth(samples, ("reader_rss", "reader_fds", "writer_rss", "writer_fds", "temp_files")),
    }


def growth(samples: list[tuple], names: tuple[str, ...]) -> dict[str, Any]:
    """Each figure at the end of the warm-up (a tenth of the run) and at the end, and the
    growth between them."""
    if len(samples) < 3:
        return {}
    t_end = samples[-1][0]
    warm = next(s for s in samples if s[0] >= t_end / 10)
    last = samples[-2] if samples[-1][3] == 0 else samples[-1]  # the writer may be closing
    out: dict[str, Any] = {}
    for i, name in enumerate(names, start=1):
        a, b = warm[i], last[i]
        out[name] = [a, b]
        out[f"{name}_growth"] = (b - a) / a if a else (0.0 if b == 0 else float("inf"))
    return out


def soak_epochs(epochs: int, workdir: str) -> dict[str, Any]:
    import torch  # noqa: F401  (before the clock)
    from torch.utils.data import DataLoader

    from dataplane.cache import NodeCache, cache_stats
    from dataplane.loaders import SampleDataset, ShuffleSampler

    url = f"h5://{workdir}/epochs.h5"
    block = np.random.default_rng(0).standard_normal((256, 16384), dtype=np.float32)
    with dp.publish(url) as pub:
        for s in range(16):  # 256 MiB
            pub.write({"x": block + s})
    cdir = os.path.join(workdir, "cache")
    cache = NodeCache(cdir, capacity="128MiB")  # half the data: eviction all the time
    ds = SampleDataset(url, vars="x", cache=cache)
    sampler = ShuffleSampler(ds, seed=0, block=8)
    loader = DataLoader(ds, batch_size=32, sampler=sampler, num_workers=2, persistent_workers=True)
    samples = []
    n = 0
    t0 = time.monotonic()
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        for batch in loader:
            n += len(batch)
        pids = [os.getpid()]
        if ds._epochs.prefetcher is not None:
            pids.append(ds._epochs.prefetcher.pid)
        samples.append(
            (
                time.monotonic() - t0,
                sum(rss(p) for p in pids),
                sum(fds(p) for p in pids),
                len(os.listdir(os.path.join(cdir, "tmp"))) + len(os.listdir(cdir + "/plans")),
            )
        )
    del loader
    ds.close()
    cache.flush_stats()
    stats = cache_stats(cdir)
    return {
        "epochs": epochs,
        "samples": n,
        "seconds": time.monotonic() - t0,
        "bytes_from_source": stats["bytes_from_source"],
        "evictions": stats["evictions"],
        "cache_bytes": stats["bytes"],
        "capacity": cache.capacity,
        **growth(samples, ("rss", "fds", "cache_tmp_and_plans")),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=600.0, help="per streaming transport")
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--transports", default="mem,shm,sst")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args(argv)
    workdir = tempfile.mkdtemp(prefix="dp-soak-")
    results = []
    try:
        for scheme in args.transports.split(","):
            r = soak_stream(scheme, args.seconds, workdir)
            results.append(r)
            print(json.dumps(r), flush=True)
        if args.epochs:
            r = soak_epochs(args.epochs, workdir)
            results.append(r)
            print(json.dumps(r), flush=True)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    ok = all(r.get("lost_or_reordered", 0) == 0 and r.get("dropped", 0) == 0 for r in results)
    worst = max((v for r in results for k, v in r.items() if k.endswith("_growth")), default=0.0)
    print(f"no loss under block: {ok}; largest growth after warm-up: {worst:.1%}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
