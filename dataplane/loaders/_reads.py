"""One process's reads of a ``SampleDataset``'s snapshot, from the source or the cache."""

from __future__ import annotations

import functools
import os
from typing import Any

import numpy as np
import torch

from dataplane.cache import NodeCache
from dataplane.loaders._batch import empty
from dataplane.loaders._common import as_tensor
from dataplane.loaders._direct import DirectReads
from dataplane.loaders._gather import Dtypes, from_cache, rows_from_source, steps_from_source
from dataplane.loaders._shards import ShardSource, read_shard
from dataplane.loaders._snapshot import Snapshot
from dataplane.loaders._sources import open_steps

Table = tuple[np.ndarray, np.ndarray, list[str]]


class Reads:
    """This process's handle on the source (a handle inherited through fork belongs to the
    parent: each process opens its own), the gathers of rows or steps into batch buffers, and
    the I/O calls and bytes it read (for benchmarks and tests)."""

    def __init__(
        self,
        url: str,
        opts: dict[str, Any],
        snap: Snapshot,
        dtypes: Dtypes,
        cache: NodeCache | None,
    ) -> None:
        self.url, self.opts, self.snap, self.dtypes, self.cache = url, opts, snap, dtypes, cache
        self._arc: Any = None  # an api.Archive, or _sources.Sources
        self._pid = -1
        self.direct = (
            DirectReads(snap.files, snap.file_sigs, snap.where, snap.located)
            if snap.files is not None
            else None
        )
        self.reads = 0
        self.bytes_read = 0
        self.homes: np.ndarray | None = None  # each shard's home node, where caches cooperate

    def archive(self) -> Any:
        if self._arc is None or self._pid != os.getpid():
            self._arc = open_steps(self.url, self.opts, self.snap.files, self.snap.file_counts)
            self._pid = os.getpid()
        return self._arc

    def close(self) -> None:
        if self._arc is not None and self._pid == os.getpid():
            self._arc.close()
        self._arc = None
        if self.direct is not None:
            self.direct.close()

    def columns(self, idx: np.ndarray, memory: str, table: Table) -> list[Any]:
        """One column per variable: a tensor of the rows (``sample="row"``), or a list of
        one tensor per step (``sample="step"``)."""
        snap = self.snap
        tensors = None if snap.sample == "step" else self._outputs(len(idx), memory)
        outs = None if tensors is None else [t.numpy() for t in tensors]
        if self.cache is not None:
            produce = lambda s: functools.partial(self.shard, s, table[0])  # noqa: E731
            columns = from_cache(
                self.cache, snap, self.dtypes, table, idx, outs, produce, self.homes
            )
        elif outs is None:
            columns, nbytes = steps_from_source(
                self.archive(), snap.names, self.dtypes, idx, self.direct
            )
            self._count(len(idx) * len(snap.names), nbytes)
        else:
            self._count(*rows_from_source(self.archive(), snap, idx, outs, self.direct))
            columns = None
        if columns is not None:
            return [[as_tensor(a) for a in col] for col in columns]
        assert tensors is not None
        return list(tensors)

    def _outputs(self, n: int, memory: str) -> list[torch.Tensor]:
        rows = self.snap.rows
        return [
            empty((n, *rows[name][1]), self.dtypes[name] or rows[name][0], memory)
            for name in self.snap.names
        ]

    def shard(self, s: int, bounds: np.ndarray) -> dict[str, np.ndarray]:
        """Shard ``s`` from the source: rows ``a:b`` of one step, or whole steps."""
        snap = self.snap
        a, b = int(bounds[s]), int(bounds[s + 1])
        out = read_shard(
            self.archive(), snap.sample, snap.names, snap.rows, snap.offsets, a, b, self.direct
        )
        self._count(len(out), sum(x.nbytes for x in out.values()))
        return out

    def source(self, table: Table) -> ShardSource:
        """What the prefetch process needs to read this snapshot's shards (no torch)."""
        assert self.cache is not None
        snap = self.snap
        bounds, nbytes, _ = table
        return ShardSource(
            self.url,
            self.opts,
            snap.sample,
            snap.names,
            snap.rows,
            snap.offsets,
            bounds,
            nbytes,
            self.cache,
            snap.files,
            snap.file_counts,
            self.direct,
            self.homes,
        )

    def _count(self, reads: int, nbytes: int) -> None:
        self.reads += reads
        self.bytes_read += nbytes

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_arc"], state["_pid"] = None, -1
        state["reads"] = state["bytes_read"] = 0
        return state
