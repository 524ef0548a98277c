"""Write throughput of the file transports against the fastest plain library writes, in one run.

For each format it writes the same steps (default: 8 steps of 64 MiB float64) and reports:

- ``plain``: the fastest plain-library write of that data we know (several are tried and the
  best is kept: h5py one dataset per step, or one step-axis dataset; adios2 BP5 with deferred
  puts and statistics off; zarr one chunk per step, uncompressed);
- ``dataplane``: ``publish(...).write(...)`` with checksums on (what users get by default);
- ``dataplane + follower``: the same while a live subscriber in another process reads every
  step in full as it is committed (the cost of following a run).

Every figure is the median over ``--repeat`` runs, after one untimed warm-up run of each method
and with the methods interleaved (the first writes into a cold page cache are several times
slower). Files go to ``--dir`` (default a temporary directory, i.e. the page cache, as the
targets in the issue were measured).

    python bench/bench_files.py [--steps 8] [--mib 64] [--repeat 3] [--dir PATH] [--json out.json]
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
from collections.abc import Callable

import numpy as np

import dataplane as dp


def _data(steps: int, mib: int) -> list[np.ndarray]:
    n = mib * 2**20 // 8
    base = np.random.default_rng(0).standard_normal(n)
    return [base + i for i in range(steps)]


# -- plain baselines ---------------------------------------------------------------------------
def plain_h5_datasets(path: str, data: list[np.ndarray]) -> None:
    import h5py

    with h5py.File(path, "w") as f:
        for i, a in enumerate(data):
            f.create_dataset(f"u{i}", data=a)


def plain_h5_step_axis(path: str, data: list[np.ndarray]) -> None:
    import h5py

    with h5py.File(path, "w", libver="latest") as f:
        d = f.create_dataset("u", (len(data), data[0].size), chunks=(1, data[0].size), dtype="f8")
        for i, a in enumerate(data):
            d.id.write_direct_chunk((i, 0), a)


def plain_bp5(path: str, data: list[np.ndarray]) -> None:
    from adios2 import bindings as ab

    ad = ab.ADIOS()
    io = ad.DeclareIO("plain")
    io.SetEngine("BP5")
    io.SetParameters({"StatsLevel": "0"})
    eng = io.Open(path, ab.Mode.Write)
    n = data[0].size
    var = io.DefineVariable("u", data[0], [n], [0], [n], True)
    for a in data:
        eng.BeginStep()
        eng.Put(var, a, ab.Mode.Deferred)
        eng.EndStep()
    eng.Close()


def plain_zarr(path: str, data: list[np.ndarray]) -> None:
    import zarr

    g = zarr.open_group(path, mode="w")
    n = data[0].size
    a = g.create_array("u", shape=(len(data), n), chunks=(1, n), dtype="f8", compressors=None)
    for i, x in enumerate(data):
        a[i] = x


PLAIN: dict[str, list[tuple[str, Callable[[str, list[np.ndarray]], None], str]]] = {
    "h5": [
        ("h5py dataset per step", plain_h5_datasets, ".h5"),
        ("h5py step axis, direct chunks", plain_h5_step_axis, ".h5"),
    ],
    "bp5": [("adios2 BP5 deferred, no stats", plain_bp5, ".bp")],
    "zarr": [("zarr chunk per step", plain_zarr, ".zarr")],
}
SUFFIX = {"h5": ".h5", "bp5": ".bp", "zarr": ".zarr"}


def dataplane_write(url: str, data: list[np.ndarray]) -> None:
    with dp.publish(url) as pub:
        for a in data:
            pub.write({"u": a})


def _timed(fn: Callable[[], None], nbytes: int, cleanup: Callable[[], None]) -> float:
    cleanup()
    t0 = time.perf_counter()
    fn()
    gbps = nbytes / (time.perf_counter() - t0) / 1e9
    cleanup()
    return gbps


def _remove(path: str) -> Callable[[], None]:
    def go() -> None:
        for p in (path, path + ".lease"):
            if os.path.isdir(p):
                shutil.rmtree(p)
            elif os.path.exists(p):
                os.remove(p)

    return go


_FOLLOWER = """
import sys, dataplane as dp
n = 0
with dp.subscribe(sys.argv[1], timeout=120) as sub:
    print("ready", flush=True)
    for step in sub:
        step["u"].sum()
        n += 1
print(n, flush=True)
"""


def with_follower(url: str, data: list[np.ndarray], nbytes: int) -> float:
    """Write throughput while another process follows and reads every step in full.

    Only the writes are timed: the follower is started and subscribed first, and its catching
    up after the writer closed is not counted (it is checked: it must read every step).
    """
    proc = subprocess.Popen(
        [sys.executable, "-c", _FOLLOWER, url], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None
    if proc.stdout.readline().strip() != "ready":
        raise RuntimeError("the follower did not start")
    t0 = time.perf_counter()
    dataplane_write(url, data)
    gbps = nbytes / (time.perf_counter() - t0) / 1e9
    out, _ = proc.communicate(timeout=300)
    if int(out) != len(data):
        raise RuntimeError(f"the follower read {out!r} steps, not {len(data)}")
    return gbps


def run(steps: int, mib: int, repeat: int, directory: str, schemes: list[str]) -> list[dict]:
    data = _data(steps, mib)
    nbytes = sum(a.nbytes for a in data)
    rows = []
    for scheme in schemes:
        path = os.path.join(directory, f"bench{SUFFIX[scheme]}")
        url = f"{scheme}://{path}"
        clean = _remove(path)
        methods: dict[str, Callable[[], None]] = {
            name: (lambda fn=fn, path=path: fn(path, data)) for name, fn, _ in PLAIN[scheme]
        }
        methods["dataplane"] = lambda url=url: dataplane_write(url, data)
        # The first writes of a run fill the page cache and are several times slower than
        # the rest: warm up once, then interleave the methods so that none gets the slow turn.
        for fn in methods.values():
            _timed(fn, nbytes, clean)
        times: dict[str, list[float]] = {name: [] for name in methods}
        times["dataplane + follower"] = []
        for round_ in range(repeat):
            # Reversed every other round, so that no method always runs first after a clean.
            order = list(methods.items())
            for name, fn in order if round_ % 2 == 0 else order[::-1]:
                times[name].append(_timed(fn, nbytes, clean))
            clean()
            times["dataplane + follower"].append(with_follower(url, data, nbytes))
            clean()
        med = {name: statistics.median(v) for name, v in times.items()}
        best_name = max(PLAIN[scheme], key=lambda m: med[m[0]])[0]
        best = med[best_name]
        # Ratios are taken within each round, then their median: a machine that slows down
        # for a while slows both sides of a round, so the ratio keeps its meaning.
        plain_runs = times[best_name]
        rows.append(
            {
                "scheme": scheme,
                "plain": best_name,
                "plain_gbps": best,
                "dataplane_gbps": med["dataplane"],
                "follower_gbps": med["dataplane + follower"],
                "ratio": statistics.median(d / p for d, p in zip(times["dataplane"], plain_runs)),
                "ratio_following": statistics.median(
                    f / p for f, p in zip(times["dataplane + follower"], plain_runs)
                ),
            }
        )
    return rows


def report(rows: list[dict], steps: int, mib: int) -> str:
    lines = [
        f"{steps} steps of {mib} MiB float64, checksums on; GB/s and ratios (within each "
        f"round), median of the repeats",
        f"{'scheme':>6} {'fastest plain write':>30} {'plain':>7} {'dataplane':>10} "
        f"{'ratio':>6} {'+follower':>10} {'ratio':>6}",
    ]
    for r in rows:
        lines.append(
            f"{r['scheme']:>6} {r['plain']:>30} {r['plain_gbps']:>7.2f} "
            f"{r['dataplane_gbps']:>10.2f} {r['ratio']:>6.2f} {r['follower_gbps']:>10.2f} "
            f"{r['ratio_following']:>6.2f}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--mib", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--dir", help="where to write (default: a temporary directory)")
    ap.add_argument("--schemes", default="h5,bp5,zarr")
    ap.add_argument("--json", help="also write the rows as JSON here")
    args = ap.parse_args(argv)
    directory = args.dir or tempfile.mkdtemp(prefix="dataplane-bench-")
    try:
        rows = run(args.steps, args.mib, args.repeat, directory, args.schemes.split(","))
    finally:
        if not args.dir:
            shutil.rmtree(directory, ignore_errors=True)
    print(report(rows, args.steps, args.mib))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
