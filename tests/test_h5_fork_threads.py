"""h5:// read by forked DataLoader workers and by threads: every value read is the one written.

HDF5 shares one open file per process among all handles, and a forked child inherits that state:
a child that opens a file its parent had open, and refreshes it, reads the first chunk's rows for
every index. These tests read every sample and compare it with what was written.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

import dataplane as dp
from dataplane.cache import NodeCache
from dataplane.loaders import SampleDataset, ShuffleSampler

pytestmark = pytest.mark.timeout(300)

ROWS, COLS, STEPS = 1024, 256, 4  # 1 MiB steps: one chunk per step


def value(step: int, row: int) -> float:
    return step * 10_000 + row


def write(url: str, **opts) -> None:
    with dp.publish(url, **opts) as pub:
        for s in range(STEPS):
            x = np.repeat(value(s, np.arange(ROWS, dtype=np.float32))[:, None], COLS, axis=1)
            pub.write({"x": x})


class Indexed(torch.utils.data.Dataset):
    """Each sample with its index, so that every value can be checked against it."""

    def __init__(self, ds) -> None:
        self.ds = ds

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int):
        return i, self.ds[i]


def wrong_samples(loader) -> int:
    wrong = seen = 0
    for idx, x in loader:
        for i, row in zip(idx.tolist(), x):
            step, r = divmod(i, ROWS)
            seen += 1
            wrong += not bool((row == value(step, r)).all())
    assert seen == STEPS * ROWS
    return wrong


@pytest.mark.parametrize("opts", [{}, {"compression": "gzip"}], ids=["raw", "gzip"])
@pytest.mark.parametrize("touch", ["getitem", "dropped"])
def test_forked_workers_read_the_right_rows_after_the_parent_touched_the_file(
    tmp_path, opts, touch
) -> None:
    url = f"h5://{tmp_path}/run.h5"
    write(url, **opts)
    ds = SampleDataset(url, vars="x")
    if touch == "getitem":
        assert float(ds[ROWS + 5][0]) == value(1, 5)  # the parent's sanity check
    else:
        old = SampleDataset(url, vars="x")
        assert float(old[2 * ROWS][0]) == value(2, 0)
        del old  # dropped without close()
    loader = DataLoader(Indexed(ds), batch_size=32, shuffle=True, num_workers=2)
    assert wrong_samples(loader) == 0
    assert float(ds[3 * ROWS + 7][0]) == value(3, 7)  # the parent's handle still works


def test_forked_workers_fill_a_node_cache_with_the_right_rows(tmp_path) -> None:
    url = f"h5://{tmp_path}/run.h5"
    write(url)
    cache = NodeCache(tmp_path / "cache", capacity="64MiB")
    ds = SampleDataset(url, vars="x", cache=cache, prefetch=False, shard_bytes=256 << 10)
    sampler = ShuffleSampler(ds, seed=0, block=4)
    for epoch in range(2):  # the second epoch is served from the cache the first one filled
        sampler.set_epoch(epoch)
        order = list(iter(sampler))
        assert float(ds[ROWS + 5][0]) == value(1, 5)  # the parent reads before forking
        loader = DataLoader(ds, batch_size=64, sampler=order, num_workers=2)
        got = torch.cat([b for b in loader])
        want = torch.tensor([value(*divmod(i, ROWS)) for i in order])
        assert bool((got == want[:, None]).all()), f"epoch {epoch}: wrong rows"


def test_a_plain_handle_used_in_forked_workers_reads_the_right_rows(tmp_path) -> None:
    """A torch Dataset that wraps a dp.open() handle made in the parent."""
    url = f"h5://{tmp_path}/run.h5"
    write(url)
    arc = dp.open(url)
    assert float(arc.read("x", 1, start=(3, 0), count=(1, 1))[0, 0]) == value(1, 3)

    class Rows(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return STEPS * ROWS

        def __getitem__(self, i: int):
            s, r = divmod(i, ROWS)
            return i, torch.from_numpy(arc.read("x", s, start=(r, 0), count=(1, COLS))[0])

    assert wrong_samples(DataLoader(Rows(), batch_size=32, shuffle=True, num_workers=2)) == 0
    arc.close()


def test_a_plain_h5py_handle_beside_dataplane_in_one_process(tmp_path) -> None:
    """A user's own h5py handle holding the dataset open while dataplane reads the same file
    (a baseline measured beside it, say): HDF5 shares one view of the file per process, and a
    SWMR refresh through one handle breaks the other's chunk index. A file whose steps are all
    known needs no refresh, so every value comes back right."""
    import h5py

    url = f"h5://{tmp_path}/run.h5"
    write(url)
    arc = dp.open(url)
    with h5py.File(tmp_path / "run.h5", "r") as f:
        plain = f["x"]
        for s in range(STEPS):
            assert bool((arc.read("x", s) == value(s, np.arange(ROWS))[:, None]).all())
            assert float(plain[s, 9, 0]) == value(s, 9)
    arc.close()
