"""What verifying every read costs: reads with checksums (the default) against ``verify=False``.

Every read of stored data is widened to the checksum blocks it touches and each block is
hashed (``dataplane/transports/_checksums.py``). For each file transport this writes the same
steps (default 8 steps of 16 MiB, rows of 4 KiB) and times, with and without verification, in
one run with the two interleaved:

- ``whole``: every step read whole;
- ``rows``: single rows at random places (one read each: the worst case, a block read per row);
- ``runs``: runs of 32 consecutive rows at random places (what ``SampleDataset`` batches do);

and, beside them, plain h5py reading the same rows of the same file (no checksums), so the
figures can be read against the library users would otherwise call.

    python bench/bench_verify.py [--steps 8] [--mib 16] [--row-kib 4] [--reads 2000]
                                 [--repeat 3] [--dir PATH] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections.abc import Callable

import numpy as np

import dataplane as dp


def _write(url: str, steps: int, rows: int, width: int) -> None:
    base = np.random.default_rng(0).standard_normal((rows, width)).astype(np.float32)
    with dp.publish(url) as pub:
        for i in range(steps):
            pub.write({"u": base + i})


def _timed(fn: Callable[[], int]) -> tuple[float, int]:
    t0 = time.perf_counter()
    nbytes = fn()
    return time.perf_counter() - t0, nbytes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--mib", type=int, default=16)
    ap.add_argument("--row-kib", type=int, default=4)
    ap.add_argument("--reads", type=int, default=2000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--dir", default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    width = args.row_kib * 1024 // 4
    rows = args.mib * 1024 // args.row_kib
    rng = np.random.default_rng(1)
    singles = [
        (int(s), int(r))
        for s, r in zip(
            rng.integers(args.steps, size=args.reads), rng.integers(rows, size=args.reads)
        )
    ]
    runs = [(s, min(r, rows - 32)) for s, r in singles[: args.reads // 4]]
    results = []
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        for scheme in ("h5", "bp5", "zarr"):
            url = f"{scheme}://{tmp}/run.{scheme}"
            _write(url, args.steps, rows, width)
            cases: dict[str, Callable[[], int]] = {}
            for verify in (True, False):
                arc = dp.open(url, verify=verify)
                tag = "verified" if verify else "unverified"

                def whole(arc=arc) -> int:
                    return sum(arc.read("u", s).nbytes for s in range(args.steps))

                def rows_(arc=arc) -> int:
                    return sum(
                        arc.read("u", s, start=(r, 0), count=(1, width)).nbytes for s, r in singles
                    )

                def runs_(arc=arc) -> int:
                    return sum(
                        arc.read("u", s, start=(r, 0), count=(32, width)).nbytes for s, r in runs
                    )

                cases[f"whole {tag}"] = whole
                cases[f"rows {tag}"] = rows_
                cases[f"runs {tag}"] = runs_
            if scheme == "h5":
                import h5py

                f = h5py.File(f"{tmp}/run.h5", "r")
                d = f["u"]
                cases["rows plain h5py"] = lambda d=d: sum(
                    d[s, r : r + 1].nbytes for s, r in singles
                )
                cases["runs plain h5py"] = lambda d=d: sum(d[s, r : r + 32].nbytes for s, r in runs)
            times: dict[str, list[float]] = {k: [] for k in cases}
            sizes: dict[str, int] = {}
            for fn in cases.values():  # warm-up: the page cache and the handles
                fn()
            for _ in range(args.repeat):
                for k, fn in cases.items():
                    dt, nbytes = _timed(fn)
                    times[k].append(dt)
                    sizes[k] = nbytes
            per = {"whole": args.steps, "rows": len(singles), "runs": len(runs)}
            for k in cases:
                med = statistics.median(times[k])
                results.append(
                    {
                        "transport": scheme,
                        "case": k,
                        "median_s": med,
                        "us_per_read": 1e6 * med / per[k.split()[0]],
                        "GB/s": sizes[k] / med / 1e9,
                    }
                )
            for kind, count in per.items():
                v = statistics.median(times[f"{kind} verified"]) / count
                u = statistics.median(times[f"{kind} unverified"]) / count
                print(
                    f"{scheme:5s} {kind:6s} verified {1e6 * v:9.1f} us/read  "
                    f"unverified {1e6 * u:9.1f} us/read  cost {v / u:5.2f}x"
                )
    for r in results:
        if "plain" in r["case"]:
            print(f"{r['transport']:5s} {r['case']:16s} {r['us_per_read']:9.1f} us/read")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
