"""shm:// (and sst://) against multiprocessing.Queue, a semaphore ring and a raw copy.

The measurements are ``dataplane bench stream``'s (:mod:`dataplane.bench.stream`): for each
step size, throughput with ``queue_limit=4`` (Queue ``maxsize=4``) and median / p99 latency
from write to delivery with ``queue_limit=1``, in steady state (the first steps left out);
``raw copy`` is ``numpy.copyto`` into shared memory in one process, the limit of moving the
bytes once; ``ring`` is two processes passing steps through a ring of shared-memory slots
with two semaphores, the floor of any shared-memory stream. This script adds the ratios the
shm:// targets are stated in.

    python bench/bench_shm.py [--sizes 4KiB,1MiB,64MiB] [--methods raw,shm,queue]
                              [--seconds 2] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import shutil
import sys
import tempfile

from dataplane.bench import parse_size
from dataplane.bench._common import fmt_size
from dataplane.bench.stream import measure

METHODS = {
    "raw": "raw copy",
    "shm": "shm://",
    "sst": "sst://",
    "queue": "mp.Queue",
    "ring": "ring",
}


def run(sizes: list[int], methods: list[str], seconds: float) -> list[dict]:
    ctx = mp.get_context("spawn")
    workdir = tempfile.mkdtemp(prefix="dp-bench-shm-")
    rows = []
    try:
        for size in sizes:
            for method in methods:
                fig = measure(METHODS[method], size, seconds, workdir, ctx)
                rows.append({"method": METHODS[method], **fig})
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return rows


def report(rows: list[dict]) -> str:
    lines = [
        f"{'step size':>10} {'method':>9} {'steps':>6} {'GB/s':>8} {'median us':>10} "
        f"{'p99 us':>9} {'vs raw':>7} {'vs Queue':>9} {'vs ring':>8}"
    ]
    by = {(r["size"], r["method"]): r for r in rows}
    for r in rows:
        raw = by.get((r["size"], "raw copy"), {}).get("gbps")
        queue = by.get((r["size"], "mp.Queue"), {}).get("gbps")
        ring = by.get((r["size"], "ring"), {}).get("gbps")
        vs_raw = f"{r['gbps'] / raw:>7.2f}" if raw else f"{'-':>7}"
        vs_queue = f"{r['gbps'] / queue:>9.1f}" if queue else f"{'-':>9}"
        vs_ring = f"{r['gbps'] / ring:>8.2f}" if ring else f"{'-':>8}"
        lines.append(
            f"{fmt_size(r['size']):>10} {r['method']:>9} {r['steps']:>6} {r['gbps']:>8.2f} "
            f"{r['median_us']:>10.1f} {r['p99_us']:>9.1f} {vs_raw} {vs_queue} {vs_ring}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="4KiB,1MiB,64MiB")
    ap.add_argument("--methods", default="raw,shm,queue,ring", help="of raw,shm,sst,queue,ring")
    ap.add_argument("--seconds", type=float, default=2.0, help="rough length of each run")
    ap.add_argument("--json", help="also write the rows as JSON here")
    args = ap.parse_args(argv)
    methods = args.methods.split(",")
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        ap.error(f"unknown method(s) {unknown}; choose from {', '.join(METHODS)}")
    rows = run([parse_size(s) for s in args.sizes.split(",")], methods, args.seconds)
    print(report(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
