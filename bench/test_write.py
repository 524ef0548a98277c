"""Writing steps: ``publish(url).write`` (checksums on, as users get it) against the fastest plain
write of the same data we know in each library, and against itself while a live subscriber in
another process reads every step. One group per format; each round writes a fresh file (the
warm-up round fills the page cache), and the written values are read back and compared.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable

import numpy as np
import pytest

import dataplane as dp

SUFFIX = {"h5": ".h5", "bp5": ".bp", "zarr": ".zarr"}


def make_data(steps: int, mib: int) -> list[np.ndarray]:
    n = mib * 2**20 // 8
    base = np.random.default_rng(0).standard_normal(n)
    return [base + i for i in range(steps)]


# -- plain writes and their readers ------------------------------------------------------------
def h5_datasets(path: str, data: list[np.ndarray]) -> None:
    import h5py

    with h5py.File(path, "w") as f:
        for i, a in enumerate(data):
            f.create_dataset(f"u{i}", data=a)


def read_h5_datasets(path: str, steps: int) -> list[np.ndarray]:
    import h5py

    with h5py.File(path, "r") as f:
        return [f[f"u{i}"][()] for i in range(steps)]


def h5_step_axis(path: str, data: list[np.ndarray]) -> None:
    import h5py

    with h5py.File(path, "w", libver="latest") as f:
        d = f.create_dataset("u", (len(data), data[0].size), chunks=(1, data[0].size), dtype="f8")
        for i, a in enumerate(data):
            d.id.write_direct_chunk((i, 0), a)


def read_h5_step_axis(path: str, steps: int) -> list[np.ndarray]:
    import h5py

    with h5py.File(path, "r") as f:
        return list(f["u"][()])


def bp5_deferred(path: str, data: list[np.ndarray]) -> None:
    from adios2 import bindings as ab

    adios = ab.ADIOS()  # must outlive the IO and the engine
    io = adios.DeclareIO("plain")
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


def read_bp5(path: str, steps: int) -> list[np.ndarray]:
    import adios2

    with adios2.FileReader(path) as f:
        return list(f.read("u", step_selection=[0, steps]).reshape(steps, -1))


def zarr_chunk_per_step(path: str, data: list[np.ndarray]) -> None:
    import zarr

    g = zarr.open_group(path, mode="w")
    n = data[0].size
    a = g.create_array("u", shape=(len(data), n), chunks=(1, n), dtype="f8", compressors=None)
    for i, x in enumerate(data):
        a[i] = x


def read_zarr(path: str, steps: int) -> list[np.ndarray]:
    import zarr

    return list(zarr.open_group(path, mode="r")["u"][:])


Writer = Callable[[str, list[np.ndarray]], None]
Reader = Callable[[str, int], list[np.ndarray]]
PLAIN: dict[str, dict[str, tuple[Writer, Reader]]] = {
    "h5": {
        "h5py dataset per step": (h5_datasets, read_h5_datasets),
        "h5py step axis, direct chunks": (h5_step_axis, read_h5_step_axis),
    },
    "bp5": {"adios2 BP5 deferred, no stats": (bp5_deferred, read_bp5)},
    "zarr": {"zarr chunk per step": (zarr_chunk_per_step, read_zarr)},
}


# -- dataplane -----------------------------------------------------------------------------
def dataplane_write(url: str, data: list[np.ndarray]) -> None:
    with dp.publish(url) as pub:
        for a in data:
            pub.write({"u": a})


def read_dataplane(url: str, steps: int) -> list[np.ndarray]:
    with dp.open(url) as arc:
        return [arc.read("u", i) for i in range(steps)]


# The follower checks every step against what the writer wrote (the same seed) and prints how
# many it read and how many were right.
_FOLLOWER = """
import sys, numpy as np, dataplane as dp
n = int(sys.argv[2])
base = np.random.default_rng(0).standard_normal(n)
read = right = 0
with dp.subscribe(sys.argv[1], timeout=120) as sub:
    print("ready", flush=True)
    for step in sub:
        right += bool(np.array_equal(step["u"], base + read))
        read += 1
print(read, right, flush=True)
"""


class Follower:
    """A subscriber process that reads every step the benchmark writes, started (and
    subscribed) before the writes are timed; its catching up afterwards is not timed."""

    def __init__(self, url: str, n: int) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _FOLLOWER, url, str(n)],
            stdout=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            text=True,
        )
        assert self.proc.stdout is not None
        if self.proc.stdout.readline().strip() != "ready":
            self.proc.kill()
            raise RuntimeError("the follower did not start")

    def result(self) -> tuple[int, int]:
        out, _ = self.proc.communicate(timeout=300)
        read, right = out.split()
        return int(read), int(right)


def _remove(path: str) -> None:
    for p in (path, path + ".lease"):
        if os.path.isdir(p):
            shutil.rmtree(p)
        elif os.path.exists(p):
            os.remove(p)


OURS = ["dataplane", "dataplane + follower"]
METHODS = [(fmt, name) for fmt, plain in PLAIN.items() for name in [*plain, *OURS]]


@pytest.mark.parametrize(("fmt", "method"), METHODS, ids=[f"{f}-{m}" for f, m in METHODS])
def test_write(measure, sizes, bench_dir, fmt: str, method: str) -> None:
    data = make_data(sizes.write_steps, sizes.write_mib)
    path = os.path.join(bench_dir, f"write{SUFFIX[fmt]}")
    url = f"{fmt}://{path}"
    followers: list[Follower] = []
    results: list[tuple[int, int]] = []

    def setup() -> None:
        _remove(path)
        if method == "dataplane + follower":
            followers.append(Follower(url, data[0].size))

    def done(*_: object) -> None:
        while followers:
            results.append(followers.pop().result())

    if method in PLAIN[fmt]:
        write, read = PLAIN[fmt][method]
        target: Callable[[], None] = lambda: write(path, data)  # noqa: E731
    else:
        target, read = (lambda: dataplane_write(url, data)), None
    try:
        measure(
            target,
            group=f"write {fmt}: {len(data)} steps of {sizes.write_mib} MiB",
            ours=method in OURS,
            nbytes=sum(a.nbytes for a in data),
            setup=setup,
            teardown=done,
        )
        done()
        got = read(path, len(data)) if read else read_dataplane(url, len(data))
        assert len(got) == len(data)
        for a, b in zip(got, data):
            np.testing.assert_array_equal(a, b)
        assert all(r == (len(data), len(data)) for r in results), results
    finally:
        for f in followers:
            f.proc.kill()
        _remove(path)
