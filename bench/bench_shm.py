"""shm:// against multiprocessing.Queue and a raw copy into shared memory, in one run.

For each step size it reports throughput and median / p99 latency of:

- ``raw``: ``numpy.copyto`` of the step into a shared-memory buffer in one process, the
  physical limit of moving the bytes once (no second process, no synchronisation);
- ``shm://``: a writer process publishes, this process subscribes and receives each step as a
  numpy array (a read-only view: zero copies out);
- ``mp.Queue``: a writer process puts numpy arrays on a ``multiprocessing.Queue`` (pickled),
  this process gets them.

Throughput runs use ``queue_limit=4`` (Queue ``maxsize=4``); latency runs use 1, so a step is
never queued behind another and the figure is the time from ``write``/``put`` to delivery.
Both are steady state: the clock starts at the write of step ``WARMUP`` and latencies of the
first ``WARMUP`` steps are left out (by then shm:// has allocated its ring; every method is
measured the same way).

    python bench/bench_shm.py [--sizes 4KiB,1MiB,64MiB] [--seconds 2] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import time
import uuid

import numpy as np

import dataplane as dp
from dataplane.transports import _posix

WARMUP = 8
_UNITS = {"KiB": 2**10, "MiB": 2**20, "GiB": 2**30}


def parse_size(text: str) -> int:
    for unit, factor in _UNITS.items():
        if text.endswith(unit):
            return int(float(text[: -len(unit)]) * factor)
    return int(text)


def fmt_size(n: int) -> str:
    for unit in ("GiB", "MiB", "KiB"):
        if n >= _UNITS[unit]:
            return f"{n / _UNITS[unit]:g} {unit}"
    return f"{n} B"


def _steps_for(size: int, seconds: float) -> int:
    # Enough steps to last about `seconds` at ~4 GB/s, within sane bounds.
    return int(min(20000, max(5 * WARMUP, seconds * 4e9 / max(size, 1))))


# -- writers (run in a child process) ---------------------------------------------------------
def _shm_writer(url: str, size: int, steps: int, queue_limit: int, directory: str) -> None:
    data = np.random.default_rng(0).integers(0, 255, size, dtype=np.uint8)
    with dp.publish(url, queue_limit=queue_limit, rendezvous=1, dir=directory) as pub:
        for _ in range(steps):
            pub.write({"x": data, "t": np.float64(time.perf_counter())})


def _queue_writer(q: mp.Queue, size: int, steps: int) -> None:
    data = np.random.default_rng(0).integers(0, 255, size, dtype=np.uint8)
    for _ in range(steps):
        q.put((time.perf_counter(), data))
    q.put(None)


# -- measurements ------------------------------------------------------------------------------
def _summary(size: int, steps: int, elapsed: float, lat: list[float]) -> dict:
    lat_us = np.array(lat[WARMUP:]) * 1e6
    return {
        "size": size,
        "steps": steps,
        "gbps": size * (steps - WARMUP) / elapsed / 1e9,
        "median_us": float(np.median(lat_us)),
        "p99_us": float(np.percentile(lat_us, 99)),
    }


def bench_raw(size: int, steps: int) -> dict:
    name = f"dp-bench-{uuid.uuid4().hex[:12]}"
    fd, mm = _posix.create_segment(name, max(size, 1))
    try:
        dst = np.ndarray(size, np.uint8, buffer=mm)
        src = np.random.default_rng(0).integers(0, 255, size, dtype=np.uint8)
        np.copyto(dst, src)  # fault the pages in once, as a running channel has
        lat = []
        for i in range(steps):
            t = time.perf_counter()
            if i == WARMUP:
                t0 = t
            np.copyto(dst, src)
            lat.append(time.perf_counter() - t)
        elapsed = time.perf_counter() - t0
        del dst
    finally:
        os.close(fd)
        _posix.unlink_segment(name)
    return _summary(size, steps, elapsed, lat)


def bench_shm(size: int, steps: int, queue_limit: int, ctx) -> dict:
    directory = os.path.join("/tmp", f"dataplane-bench-{os.getpid()}")
    url = f"shm://bench-{uuid.uuid4().hex[:8]}"
    sub = dp.subscribe(url, timeout=60, dir=directory)
    proc = ctx.Process(target=_shm_writer, args=(url, size, steps, queue_limit, directory))
    proc.start()
    lat, n, t0 = [], 0, None
    try:
        for step in sub:
            now = time.perf_counter()
            x = step["x"]
            t = float(step["t"])
            if n == WARMUP:
                t0 = t
            lat.append(now - t)
            n += 1
            assert x.nbytes == size
        elapsed = time.perf_counter() - t0
    finally:
        sub.close()
        proc.join(60)
    if n != steps:
        raise RuntimeError(f"shm:// delivered {n} of {steps} steps")
    return _summary(size, steps, elapsed, lat)


def bench_queue(size: int, steps: int, maxsize: int, ctx) -> dict:
    q = ctx.Queue(maxsize=maxsize)
    proc = ctx.Process(target=_queue_writer, args=(q, size, steps))
    proc.start()
    lat, n, t0 = [], 0, None
    while True:
        item = q.get(timeout=120)
        now = time.perf_counter()
        if item is None:
            break
        t, x = item
        if n == WARMUP:
            t0 = t
        lat.append(now - t)
        n += 1
    elapsed = time.perf_counter() - t0
    proc.join(60)
    if n != steps:
        raise RuntimeError(f"Queue delivered {n} of {steps} steps")
    return _summary(size, steps, elapsed, lat)


def run(sizes: list[int], seconds: float) -> list[dict]:
    ctx = mp.get_context("spawn")
    rows = []
    for size in sizes:
        steps = _steps_for(size, seconds)
        qsteps = max(3 * WARMUP, steps // 10) if size >= 2**20 else steps
        raw = bench_raw(size, steps)
        thr = bench_shm(size, steps, 4, ctx)
        lat = bench_shm(size, min(steps, 2000), 1, ctx)
        qthr = bench_queue(size, qsteps, 4, ctx)
        qlat = bench_queue(size, min(qsteps, 2000), 1, ctx)
        for method, t, la in (
            ("raw copy", raw, raw),
            ("shm://", thr, lat),
            ("mp.Queue", qthr, qlat),
        ):
            rows.append(
                {
                    "size": size,
                    "method": method,
                    "steps": t["steps"],
                    "gbps": t["gbps"],
                    "median_us": la["median_us"],
                    "p99_us": la["p99_us"],
                }
            )
    return rows


def report(rows: list[dict]) -> str:
    lines = [
        f"{'step size':>10} {'method':>9} {'steps':>6} {'GB/s':>8} {'median us':>10} "
        f"{'p99 us':>9} {'vs raw':>7} {'vs Queue':>9}"
    ]
    by = {(r["size"], r["method"]): r for r in rows}
    for r in rows:
        raw = by[(r["size"], "raw copy")]["gbps"]
        queue = by[(r["size"], "mp.Queue")]["gbps"]
        lines.append(
            f"{fmt_size(r['size']):>10} {r['method']:>9} {r['steps']:>6} {r['gbps']:>8.2f} "
            f"{r['median_us']:>10.1f} {r['p99_us']:>9.1f} {r['gbps'] / raw:>7.2f} "
            f"{r['gbps'] / queue:>9.1f}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="4KiB,1MiB,64MiB")
    ap.add_argument("--seconds", type=float, default=2.0, help="rough length of each run")
    ap.add_argument("--json", help="also write the rows as JSON here")
    args = ap.parse_args(argv)
    rows = run([parse_size(s) for s in args.sizes.split(",")], args.seconds)
    print(report(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
