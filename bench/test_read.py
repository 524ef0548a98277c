"""Reading stored steps: with checksums (the default), with ``verify=False``, and with the
format's own library (h5py, adios2's ``FileReader``, zarr-python) reading the same places of
the same file. One group per format and pattern:

- ``whole``: every step read whole;
- ``rows``: single 4 KiB rows at random places (one read each, the worst case: a checksum
  block hashed per row);
- ``runs``: runs of 32 consecutive rows at random places (what ``SampleDataset`` batches read).

Every round returns what it read, and the last round's values are compared with those written.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator

import numpy as np
import pytest

import dataplane as dp

ROW_KIB = 4
RUN = 32


class Stored:
    """One file per format, written once per session: ``steps`` steps of ``rows`` rows."""

    def __init__(self, url: str, path: str, steps: int, rows: int) -> None:
        self.url, self.path, self.steps, self.rows = url, path, steps, rows
        self.width = ROW_KIB * 1024 // 4
        self.base = np.random.default_rng(0).standard_normal((rows, self.width)).astype("f4")
        with dp.publish(url) as pub:
            for i in range(steps):
                pub.write({"u": self.base + i})

    def expected(self, step: int, row: int, count: int) -> np.ndarray:
        return self.base[row : row + count] + step


@pytest.fixture(scope="module")
def stores(sizes, bench_dir) -> Iterator[Callable[[str], Stored]]:
    made: dict[str, Stored] = {}

    def get(fmt: str) -> Stored:
        if fmt not in made:
            path = os.path.join(bench_dir, f"read.{fmt}")
            rows = sizes.read_mib * 1024 // ROW_KIB
            made[fmt] = Stored(f"{fmt}://{path}", path, sizes.read_steps, rows)
        return made[fmt]

    yield get


def _places(stored: Stored, reads: int, count: int) -> list[tuple[int, int]]:
    rng = np.random.default_rng(1)
    steps = rng.integers(stored.steps, size=reads)
    rows = rng.integers(stored.rows - count + 1, size=reads)
    return [(int(s), int(r)) for s, r in zip(steps, rows)]


Read = Callable[[list[tuple[int, int]], int], list]


def _dataplane(stack: contextlib.ExitStack, stored: Stored, verify: bool) -> Read:
    arc = stack.enter_context(dp.open(stored.url, verify=verify))

    def read(places: list[tuple[int, int]], count: int) -> list[np.ndarray]:
        return [arc.read("u", s, start=(r, 0), count=(count, stored.width)) for s, r in places]

    return read


def _h5py(stack: contextlib.ExitStack, stored: Stored) -> Read:
    import h5py

    # dataplane's h5:// layout: one dataset (steps, rows, width)
    d = stack.enter_context(h5py.File(stored.path, "r"))["u"]
    return lambda places, count: [d[s, r : r + count] for s, r in places]


def _adios2(stack: contextlib.ExitStack, stored: Stored) -> Read:
    import adios2

    # bp5://: a (rows, width) variable per step
    f = stack.enter_context(adios2.FileReader(stored.path))
    w = stored.width
    return lambda places, count: [
        f.read("u", start=[r, 0], count=[count, w], step_selection=[s, 1]) for s, r in places
    ]


def _zarr(stack: contextlib.ExitStack, stored: Stored) -> Read:
    import zarr

    # zarr://: one array (steps, rows, width)
    a = zarr.open_group(stored.path, mode="r")["u"]
    return lambda places, count: [a[s, r : r + count] for s, r in places]


PLAIN = {"h5": ("h5py", _h5py), "bp5": ("adios2", _adios2), "zarr": ("zarr-python", _zarr)}
CASES = [
    (fmt, method)
    for fmt in ("h5", "bp5", "zarr")
    for method in ("dataplane", "dataplane verify=False", PLAIN[fmt][0])
]


@pytest.mark.parametrize("pattern", ["whole", "rows", "runs"])
@pytest.mark.parametrize(("fmt", "method"), CASES, ids=[f"{f}-{m}" for f, m in CASES])
def test_read(measure, sizes, stores, fmt: str, method: str, pattern: str) -> None:
    stored = stores(fmt)
    if pattern == "whole":
        places, count = [(s, 0) for s in range(stored.steps)], stored.rows
    else:
        count = 1 if pattern == "rows" else RUN
        reads = sizes.read_reads if pattern == "rows" else sizes.read_reads // 4
        places = _places(stored, reads, count)
    with contextlib.ExitStack() as stack:
        if method == PLAIN[fmt][0]:
            read = PLAIN[fmt][1](stack, stored)
        else:
            read = _dataplane(stack, stored, verify=method == "dataplane")
        got = measure(
            lambda: read(places, count),
            group=f"read {fmt} {pattern}",
            ours=method.startswith("dataplane"),
            nbytes=len(places) * count * stored.width * 4,
        )
    assert len(got) == len(places)
    for (s, r), a in zip(places, got):
        np.testing.assert_array_equal(a, stored.expected(s, r, count))
