"""Reading shards of stored steps, without torch: what the prefetch process imports."""

from __future__ import annotations

import os
import threading
from typing import Any

import numpy as np

from dataplane.cache import NodeCache
from dataplane.cache.peers import Peers
from dataplane.loaders._direct import DirectReads, step_rows
from dataplane.loaders._snapshot import step_runs
from dataplane.loaders._sources import open_steps


def read_shard(
    arc: Any,
    sample: str,
    names: tuple[str, ...],
    rows: dict[str, tuple[np.dtype, tuple[int, ...]]],
    offsets: np.ndarray,
    a: int,
    b: int,
    direct: DirectReads | None = None,
) -> dict[str, np.ndarray]:
    """Samples ``a:b`` from the source: rows (one hyperslab per variable and step they
    span), or whole steps (``"<step>/<name>"``); through ``direct`` where it can."""
    out: dict[str, np.ndarray] = {}
    if sample == "step":
        for i in range(a, b):
            for name, arr in zip(names, step_rows(arc, direct, i, names, rows)):
                out[f"{i}/{name}"] = arr
        return out
    if direct is not None:
        # Each run read into its place in the shard: one copy per byte.
        out = {name: np.empty((b - a, *rows[name][1]), rows[name][0]) for name in names}
        for i, r0, r1 in step_runs(offsets, a, b):
            at = int(offsets[i]) + r0 - a
            dst = [out[name][at : at + r1 - r0] for name in names]
            step_rows(arc, direct, i, names, rows, r0, r1, dst)
        return out
    parts: dict[str, list[np.ndarray]] = {name: [] for name in names}
    for i, r0, r1 in step_runs(offsets, a, b):
        for name, arr in zip(names, step_rows(arc, None, i, names, rows, r0, r1)):
            parts[name].append(arr)
    for name, got in parts.items():
        out[name] = got[0] if len(got) == 1 else np.concatenate(got)
    return out


class ShardSource:
    """A dataset's shards as the prefetcher sees them: how to reopen the source, the snapshot's
    shard table, and the cache to fill. Pickles without handles."""

    def __init__(
        self,
        url: str,
        opts: dict[str, Any],
        sample: str,
        names: tuple[str, ...],
        rows: dict[str, tuple[np.dtype, tuple[int, ...]]],
        offsets: np.ndarray,
        bounds: np.ndarray,
        nbytes: np.ndarray,
        cache: NodeCache,
        files: list[str] | None = None,
        file_counts: list[int] | None = None,
        direct: DirectReads | None = None,
        homes: np.ndarray | None = None,
    ) -> None:
        self.url, self.opts, self.sample, self.names = url, opts, sample, names
        self.homes = homes  # each shard's home node, where caches cooperate
        self.files, self.file_counts = files, list(file_counts or [])
        self.direct = direct
        self.rows, self.offsets, self.bounds, self.nbytes = rows, offsets, bounds, nbytes
        self.cache: NodeCache | None = cache
        self._reset()

    def _reset(self) -> None:
        # One handle and one reader at a time per process. adios2 engines are not thread-safe,
        # and h5py returned wrong rows (caught by the checksums) when two threads read one
        # file through two handles; fetch threads overlap their cache writes instead.
        self._arc: Any = None
        self._pid = -1
        self._lock = threading.Lock()

    def shard_nbytes(self) -> np.ndarray:
        return self.nbytes

    def spec(self) -> dict[str, Any]:
        """How the prefetch process rebuilds this source (JSON, never a pickle)."""
        assert self.cache is not None
        return {
            "factory": "dataplane.loaders._shards:ShardSource.from_spec",
            "args": {
                "url": self.url,
                "opts": self.opts,
                "sample": self.sample,
                "names": list(self.names),
                "rows": {n: [d.str, list(shape)] for n, (d, shape) in self.rows.items()},
                "offsets": self.offsets.tolist(),
                "bounds": self.bounds.tolist(),
                "nbytes": self.nbytes.tolist(),
                "cache": [
                    self.cache.path,
                    self.cache.capacity,
                    None if self.cache.peers is None else self.cache.peers.spec(),
                ],
                "files": self.files,
                "file_counts": self.file_counts,
                "direct": self.direct.spec() if self.direct is not None else None,
                "homes": None if self.homes is None else self.homes.tolist(),
            },
        }

    @classmethod
    def from_spec(
        cls,
        url: str,
        opts: dict[str, Any],
        sample: str,
        names: list[str],
        rows: dict[str, list],
        offsets: list[int],
        bounds: list[int],
        nbytes: list[int],
        cache: list,
        files: list[str] | None = None,
        file_counts: list[int] | None = None,
        direct: dict[str, Any] | None = None,
        homes: list[int] | None = None,
    ) -> ShardSource:
        store = NodeCache(cache[0], capacity=cache[1])
        if len(cache) > 2 and cache[2] is not None:
            store.peers = Peers.from_spec(cache[2])
        return cls(
            url,
            opts,
            sample,
            tuple(names),
            {n: (np.dtype(d), tuple(shape)) for n, (d, shape) in rows.items()},
            np.asarray(offsets, np.int64),
            np.asarray(bounds, np.int64),
            np.asarray(nbytes, np.int64),
            store,
            files,
            file_counts,
            DirectReads.from_spec(direct) if direct is not None else None,
            None if homes is None else np.asarray(homes, np.int64),
        )

    def _archive(self) -> Any:
        """This process's handle (call with the lock held)."""
        if self._arc is None or self._pid != os.getpid():
            self._arc = open_steps(self.url, self.opts, self.files, self.file_counts)
            self._pid = os.getpid()
        return self._arc

    def prepare(self) -> None:
        """Open the source now (the prefetch process does, before it says it is ready)."""
        with self._lock:
            self._archive()

    def prefetch_shard(self, shard: int, key: str) -> None:
        assert self.cache is not None
        a, b = int(self.bounds[shard]), int(self.bounds[shard + 1])

        def produce() -> dict[str, np.ndarray]:
            with self._lock:
                arc = self._archive()
                return read_shard(
                    arc, self.sample, self.names, self.rows, self.offsets, a, b, self.direct
                )

        home = None if self.homes is None else int(self.homes[shard])
        self.cache.fetch_if_free(key, produce, home=home)

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k not in ("_arc", "_pid", "_lock")}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._reset()
