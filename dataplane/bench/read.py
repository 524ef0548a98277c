"""The training side: shuffled epochs through a DataLoader, naive reader against dataplane.

For each file transport and access pattern (``sequential``, ``shuffled``: uniform,
``block``: shards shuffled then samples within windows of ``block`` shards), each cold (the
file's pages evicted, the cache empty) and warm (the file in the page cache; dataplane's cache
full), with ``workers`` DataLoader workers and batches of ``batch_size``:

- ``naive``: the per-sample Dataset users write with the plain library (h5py, zarr, adios2):
  open lazily in each worker, read one sample per ``__getitem__``;
- ``dataplane``: ``SampleDataset`` + ``NodeCache`` (node-local) + prefetcher +
  ``ShuffleSampler``.

Both read the same samples in the same order. With ``compute_ms`` every batch is followed by
that much sleep (the model's step, like DLIO's computation time; the accelerator works while
the host waits), and the accelerator-utilisation figure is the fraction of the time the model
would not wait for data. Slow epochs are timed over their first ``max_seconds``.
"""

from __future__ import annotations

import os
import shutil
import time
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from dataplane.cache import NodeCache, cache_stats
from dataplane.loaders import SampleDataset, ShuffleSampler

from ._common import Recorder, World, evict, seq_read
from .load import median_run, rank_spread, spread

__all__ = [
    "NAIVE",
    "PATTERNS",
    "CeilingDataset",
    "NaiveBP5Dataset",
    "NaiveH5Dataset",
    "NaiveZarrDataset",
    "loader_for",
    "run",
    "run_epoch",
]

PATTERNS = ("sequential", "shuffled", "block")


class NaiveH5Dataset(Dataset):
    """The per-sample h5py Dataset most users write: lazy open, one row per ``__getitem__``.

    ``step_axis``: the dataset is ``(steps, rows, ...)`` and samples are the rows of all steps
    (what dataplane's h5:// writes); otherwise ``(samples, ...)``.
    """

    def __init__(self, path: str, name: str = "x", step_axis: bool = True) -> None:
        import h5py

        self.path, self.name, self.step_axis = path, name, step_axis
        with h5py.File(path, "r") as f:
            shape = f[name].shape
        self.rows = shape[1] if step_axis else 1
        self.n = shape[0] * shape[1] if step_axis else shape[0]
        self._f: Any = None
        self._d: Any = None

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> np.ndarray:
        if self._f is None:
            import h5py

            self._f = h5py.File(self.path, "r")
            # Kept, as a careful user does: looking it up per sample is 4x slower.
            self._d = self._f[self.name]
        d = self._d
        return d[i // self.rows, i % self.rows] if self.step_axis else d[i]

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_f": None, "_d": None}


class NaiveZarrDataset(Dataset):
    """The same with zarr: ``array[step, row]`` per sample."""

    def __init__(self, path: str, name: str = "x") -> None:
        import zarr

        self.path, self.name = path, name
        shape = zarr.open_array(os.path.join(path, name), mode="r").shape
        self.rows, self.n = shape[1], shape[0] * shape[1]
        self._a: Any = None

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> np.ndarray:
        if self._a is None:
            import zarr

            self._a = zarr.open_array(os.path.join(self.path, self.name), mode="r")
        return self._a[i // self.rows, i % self.rows]

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_a": None}


class NaiveBP5Dataset(Dataset):
    """The same with adios2: ``FileReader.read`` of one row of one step per sample."""

    def __init__(self, path: str, name: str = "x") -> None:
        import adios2

        self.path, self.name = path, name
        with adios2.FileReader(path) as f:
            info = f.available_variables()[name]
        self.steps = int(info["AvailableStepsCount"])
        self.shape = [int(s) for s in info["Shape"].split(",")]
        self.rows, self.n = self.shape[0], self.steps * self.shape[0]
        self._f: Any = None

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> np.ndarray:
        if self._f is None:
            import adios2

            self._f = adios2.FileReader(self.path)
        s, r = divmod(i, self.rows)
        count = [1, *self.shape[1:]]
        start = [r] + [0] * (len(self.shape) - 1)
        return self._f.read(self.name, start=start, count=count, step_selection=[s, 1])[0]

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_f": None}


NAIVE: dict[str, Any] = {"h5": NaiveH5Dataset, "zarr": NaiveZarrDataset, "bp5": NaiveBP5Dataset}


class CeilingDataset(Dataset):
    """Samples already in memory, handed out as views: the most any dataset gets through a
    DataLoader with this batch size and these workers (with workers on few cores, moving
    batches to the main process is the limit)."""

    def __init__(self, n: int, nbytes: int) -> None:
        self.n = n
        self.data = torch.ones(256, nbytes // 4)

    def __len__(self) -> int:
        return self.n

    def __getitems__(self, idx: list[int]) -> list[torch.Tensor]:
        return [self.data[i % 256] for i in idx]


def loader_for(ds: Dataset, workers: int, batch_size: int, **kw: Any) -> DataLoader:
    """Workers persist across epochs (each epoch would start them again)."""
    return DataLoader(
        ds, batch_size=batch_size, num_workers=workers, persistent_workers=workers > 0, **kw
    )


def run_epoch(
    loader: DataLoader, max_seconds: float, compute_ms: float = 0.0, finish: bool = False
) -> dict[str, Any]:
    """Time an epoch (or its first ``max_seconds``), sleeping ``compute_ms`` after each batch.

    ``finish`` reads the rest of a cut epoch untimed (to fill a cache for the next one).
    """
    compute = compute_ms / 1e3
    n = batches = 0
    t0 = time.perf_counter()
    it = iter(loader)
    cut = False
    for batch in it:
        n += len(batch)
        batches += 1
        if compute:
            time.sleep(compute)
        if time.perf_counter() - t0 > max_seconds:
            cut = True
            break
    seconds = time.perf_counter() - t0
    if cut and finish:
        for _ in it:
            pass
    del it
    return {
        "seconds": seconds,
        "samples": n,
        "batches": batches,
        "complete": not cut,
        "au": batches * compute / seconds if compute else None,
    }


def aggregate(per_rank: list[dict[str, Any]], sample_bytes: int) -> dict[str, Any]:
    samples = sum(p["samples"] for p in per_rank)
    seconds = max(p["seconds"] for p in per_rank)
    aus = [p["au"] for p in per_rank if p["au"] is not None]
    return {
        "samples": samples,
        "seconds": seconds,
        "samples_per_s": samples / seconds,
        "mb_per_s": samples * sample_bytes / seconds / 1e6,
        "au": min(aus) if aus else None,
        "complete": all(p["complete"] for p in per_rank),
    }


def _sampler_kw(pattern: str, block: int) -> dict[str, Any]:
    kw: dict[str, dict[str, Any]] = {
        "sequential": {"shuffle": False, "block": None},
        "shuffled": {"block": None},
        "block": {"block": block},
    }
    return kw[pattern]


def ceiling(rec: Recorder, world: World) -> float:
    """Samples/s (aggregate) of the DataLoader itself with the run's batch size and workers."""
    cfg = rec.config
    with rec.task(f"limit: DataLoader ceiling, {cfg.workers} workers"):
        loader = loader_for(
            CeilingDataset(cfg.samples // world.size, cfg.sample_size),
            cfg.workers,
            cfg.batch_size,
            shuffle=True,
        )
        run_epoch(loader, cfg.max_seconds / 4)  # start the workers
        best = 0.0
        for _ in range(2):  # the best of two: a limit, not a typical figure
            world.barrier()
            res = run_epoch(loader, cfg.max_seconds / 4)
            best = max(best, float(aggregate(world.gather(res), cfg.sample_size)["samples_per_s"]))
        del loader
    return best


def run(
    rec: Recorder,
    world: World,
    paths: dict[str, str],
    limits: dict[str, float],
    cache_root: str,
) -> None:
    cfg = rec.config
    ceiling_sps = ceiling(rec, world)
    limits["loader_ceiling_sps"] = ceiling_sps
    rec.add(
        phase="limit",
        what="DataLoader ceiling",
        workers=cfg.workers,
        samples_per_s=ceiling_sps,
        mb_per_s=ceiling_sps * cfg.sample_size / 1e6,
        limit="memcpy",
        of_limit=ceiling_sps * cfg.sample_size / 1e9 / limits["memcpy_gbps"],
        cell=f"limit: DataLoader ceiling, {cfg.workers} workers",
    )
    # A cold epoch can go no faster than the file reads sequentially, nor than the DataLoader
    # passes samples; a warm one only the latter.
    seq_cold = limits["seq_read_cold_gbps"] * 1e9 / cfg.sample_size
    cold_bound = ("seq_read_cold", seq_cold) if seq_cold < ceiling_sps else None
    bounds = {
        "cold": cold_bound or ("loader_ceiling", ceiling_sps),
        "warm": ("loader_ceiling", ceiling_sps),
    }

    def epoch_pair(
        loader: DataLoader, path: str, finish_cold: bool, after_cold: Any
    ) -> dict[str, Any]:
        """A cold epoch, ``after_cold()``, a warm epoch; the loader is released after."""
        how = evict([path], cfg.evict, world)
        out: dict[str, Any] = {
            "cold": run_epoch(loader, cfg.max_seconds, cfg.compute_ms, finish=finish_cold)
        }
        after_cold()
        world.barrier()
        out["warm"] = run_epoch(loader, cfg.max_seconds, cfg.compute_ms)
        out["evicted"] = how
        return out

    # cell (transport, pattern, reader) -> per repeat: {state: (aggregate, per-rank results)}
    runs: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    labels: dict[tuple[str, str, str], str] = {}
    orders: dict[tuple[str, str], list[int]] = {}
    for transport, path in paths.items():
        probe = SampleDataset(f"{transport}://{path}", vars="x")
        for pattern in PATTERNS:
            kw = _sampler_kw(pattern, cfg.block)
            orders[transport, pattern] = (
                ShuffleSampler(probe, seed=0, rank=world.rank, world=world.size, **kw)
                .order()
                .tolist()
            )
        probe.close()

    def keep(cell: tuple[str, str, str], label: str, res: dict[str, Any]) -> None:
        for state in ("cold", "warm"):
            per_rank = world.gather(res[state])
            res[state] = (aggregate(per_rank, cfg.sample_size), per_rank)
        runs.setdefault(cell, []).append(res)
        labels[cell] = label

    # Every repeat measures every cell once, so that drift over the run hits all alike.
    for _ in range(cfg.repeats):
        for transport, path in paths.items():
            url = f"{transport}://{path}"
            for pattern in PATTERNS:
                kw = _sampler_kw(pattern, cfg.block)
                naive_cls = NAIVE.get(transport)
                if naive_cls is not None:
                    label = f"read {transport} {pattern} naive"
                    with rec.task(label):

                        def warm_file(path: str = path) -> None:
                            if world.node_leader:
                                seq_read(path)

                        loader = loader_for(
                            naive_cls(path),
                            cfg.workers,
                            cfg.batch_size,
                            sampler=orders[transport, pattern],
                        )
                        res = epoch_pair(loader, path, False, warm_file)
                        del loader  # its workers exit
                    keep((transport, pattern, "naive"), label, res)
                label = f"read {transport} {pattern} dataplane"
                with rec.task(label):
                    cdir = os.path.join(cache_root, f"{transport}-{pattern}")
                    cache = NodeCache(cdir, capacity=int(cfg.data_bytes * 1.5) + (64 << 20))
                    ds = SampleDataset(url, vars="x", cache=cache)
                    sampler = ShuffleSampler(ds, seed=0, rank=world.rank, world=world.size, **kw)
                    # Software loaded, data cold: the prefetch process has imported its
                    # library before the caches are dropped, as the naive reader's workers
                    # (forked from this process) have.
                    ds.start_prefetch(wait=60)
                    try:
                        loader = loader_for(ds, cfg.workers, cfg.batch_size, sampler=sampler)
                        res = epoch_pair(
                            loader, path, True, lambda sampler=sampler: sampler.set_epoch(1)
                        )
                        del loader  # its workers exit and write their cache counters
                        ds.close()  # so does the prefetch process
                        cache.flush_stats()
                        res["stats"] = cache_stats(cdir)  # every process's
                    finally:
                        ds.close()
                        cache.close()
                        world.barrier()
                        if world.node_leader:
                            shutil.rmtree(cdir, ignore_errors=True)
                keep((transport, pattern, "dataplane"), label, res)

    medians: dict[tuple[str, str, str, str], float] = {}
    for (transport, pattern, reader), reps in runs.items():
        for state in ("cold", "warm"):
            rates = [r[state][0]["samples_per_s"] for r in reps]
            pick = median_run(rates)
            agg, per_rank = reps[pick][state]
            medians[transport, pattern, reader, state] = agg["samples_per_s"]
            limit, bound = bounds[state]
            s = spread(rates)
            row = rec.add(
                phase="read",
                transport=transport,
                reader=reader,
                pattern=pattern,
                cache=state,
                **agg,
                workers=cfg.workers,
                compute_ms=cfg.compute_ms,
                evicted=reps[pick]["evicted"] if state == "cold" else None,
                limit=limit,
                of_limit=agg["samples_per_s"] / bound,
                repeats=len(reps),
                spread={"samples_per_s": [s["min"], s["max"]]},
                # a cut epoch's rate is over its first samples: of how many
                of_samples=cfg.rows_per_step * cfg.steps,
                rank_spread=rank_spread([p["samples"] / p["seconds"] for p in per_rank]),
                cell=labels[transport, pattern, reader],
            )
            if reader == "dataplane" and (transport, pattern, "naive", state) in medians:
                row["vs_naive"] = agg["samples_per_s"] / medians[transport, pattern, "naive", state]
            if reader == "dataplane" and state == "warm":
                # Both epochs: the cold one fetches each shard once, the warm one hits.
                stats = reps[pick]["stats"]
                row["cache_stats"] = {k: stats[k] for k in ("hits", "misses", "bytes_from_source")}
            rec.add_ranks(
                [
                    {
                        "samples": p["samples"],
                        "seconds": p["seconds"],
                        "samples_per_s": p["samples"] / p["seconds"],
                    }
                    for p in per_rank
                ],
                phase="read",
                transport=transport,
                reader=reader,
                pattern=pattern,
                cache=state,
            )
