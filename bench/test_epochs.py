"""Shuffled training epochs as a training loop sees them: batch 32, a warm page cache, with and
without DataLoader workers. One group per sample size and worker count:

- ``memory``: a DataLoader over samples already in memory: the ceiling of the per-sample path;
- ``naive h5py``: the per-sample h5py Dataset most users write (lazy open, one row per
  ``__getitem__``) over one contiguous dataset, uniform ``RandomSampler``;
- ``dataplane``: ``DataLoader(SampleDataset(url, cache=NodeCache), sampler=ShuffleSampler(
  block=16))`` over the file ``publish("h5://...")`` wrote, the documented per-sample form;
- ``dataplane, no cache``: the same without a ``NodeCache`` and with a uniform shuffle
  (``block=None``), what a user gets before reading the cache page;
- ``dataplane loader()``: ``dataplane.loaders.loader``, the same order made in whole batches.

A round is one epoch of a loader made once (its workers start anew each epoch, as by default);
the warm-up round fills the caches. Each epoch must deliver every sample exactly once: the
first value of every sample is collected and compared with the file's.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from typing import Any

import h5py
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset, RandomSampler

import dataplane as dp
from dataplane.bench.read import NaiveH5Dataset
from dataplane.cache import NodeCache
from dataplane.loaders import SampleDataset, ShuffleSampler, loader

BATCH = 32
STEPS = 8


class InMemory(Dataset):
    def __init__(self, data: torch.Tensor) -> None:
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.data[i]


class Files:
    """The same samples twice: as ``publish`` writes them (a step axis, a chunk per step) and
    as one contiguous dataset written with plain h5py."""

    def __init__(self, root: str, samples: int, kib: int) -> None:
        per_step = samples // STEPS
        width = kib * 1024 // 4
        block = np.random.default_rng(0).standard_normal((per_step, width), dtype=np.float32)
        self.url = f"h5://{os.path.join(root, 'dataplane.h5')}"
        with dp.publish(self.url) as pub:
            for s in range(STEPS):
                pub.write({"x": block + s})
        self.plain = os.path.join(root, "plain.h5")
        with h5py.File(self.plain, "w") as f:
            d = f.create_dataset("x", (per_step * STEPS, width), dtype=np.float32)
            for s in range(STEPS):
                d[s * per_step : (s + 1) * per_step] = block + s
        self.memory = torch.from_numpy(np.concatenate([block + s for s in range(STEPS)]))
        self.firsts = np.sort(self.memory[:, 0].numpy())
        self.samples = len(self.memory)
        self.sample_bytes = width * 4


@pytest.fixture(scope="module")
def files(bench_dir: str, sizes: Any, epoch_kib: int) -> Iterator[Files]:
    root = os.path.join(bench_dir, f"epochs-{epoch_kib}")
    os.makedirs(root)
    yield Files(root, sizes.epoch_samples, epoch_kib)
    shutil.rmtree(root, ignore_errors=True)


def make_loader(method: str, files: Files, workers: int, cache_dir: str) -> tuple[Any, Any]:
    """The loader, and the sampler whose epoch is set before each round (or None)."""
    if method == "memory":
        g = torch.Generator().manual_seed(0)
        data = InMemory(files.memory)
        return DataLoader(
            data, BATCH, sampler=RandomSampler(data, generator=g), num_workers=workers
        ), None
    if method == "naive h5py":
        ds = NaiveH5Dataset(files.plain, "x", step_axis=False)
        g = torch.Generator().manual_seed(0)
        sampler = RandomSampler(ds, generator=g)
        return DataLoader(ds, BATCH, sampler=sampler, num_workers=workers), None
    if method == "dataplane, no cache":
        ds = SampleDataset(files.url, vars="x")
        sampler = ShuffleSampler(ds, seed=0, block=None)
        return DataLoader(ds, batch_size=BATCH, sampler=sampler, num_workers=workers), sampler
    ds = SampleDataset(files.url, vars="x", cache=NodeCache(cache_dir, capacity="64GB"))
    sampler = ShuffleSampler(ds, seed=0, block=16)
    if method == "dataplane loader()":
        return loader(ds, BATCH, sampler=sampler, num_workers=workers), sampler
    return DataLoader(ds, batch_size=BATCH, sampler=sampler, num_workers=workers), sampler


def epoch(ld: Any) -> np.ndarray:
    """One epoch; the first value of every sample, in the order delivered."""
    firsts = [batch[:, 0].numpy().copy() for batch in ld]
    return np.concatenate(firsts) if firsts else np.empty(0, np.float32)


METHODS = ["memory", "naive h5py", "dataplane", "dataplane, no cache", "dataplane loader()"]


@pytest.mark.parametrize("method", METHODS)
def test_epoch(measure, files: Files, bench_dir: str, method: str, workers: int) -> None:
    cache_dir = os.path.join(bench_dir, f"cache-{uuid.uuid4().hex[:8]}")
    ld, sampler = make_loader(method, files, workers, cache_dir)
    rounds = iter(range(1, 1 << 30))

    def setup() -> None:
        if sampler is not None:
            sampler.set_epoch(next(rounds))

    try:
        got = measure(
            lambda: epoch(ld),
            group=f"epoch {files.sample_bytes // 1024}KiB workers={workers}",
            ours=method.startswith("dataplane"),
            nbytes=files.samples * files.sample_bytes,
            samples=files.samples,
            setup=setup,
        )
        assert len(got) == files.samples
        np.testing.assert_array_equal(np.sort(got), files.firsts)
        if sampler is not None:
            assert not np.array_equal(got, files.memory[:, 0].numpy()), "not shuffled"
    finally:
        shutil.rmtree(cache_dir, ignore_errors=True)
