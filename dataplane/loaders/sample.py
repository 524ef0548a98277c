"""``SampleDataset``: stored steps as a map-style torch ``Dataset``."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from dataplane.cache import NodeCache
from dataplane.cache.peers import first_uses, homes
from dataplane.errors import OptionError
from dataplane.loaders._batch import collate as _collate
from dataplane.loaders._batch import stack as _stack
from dataplane.loaders._common import (
    check_sample,
    check_transform,
    parse_dtypes,
    parse_vars,
    shape_sample,
    vars_config,
)
from dataplane.loaders._epochs import Epochs, prefetch_processes
from dataplane.loaders._looks import SHARE as LOOKS_SHARE
from dataplane.loaders._looks import Looks
from dataplane.loaders._reads import Reads
from dataplane.loaders._shards import ShardSource
from dataplane.loaders._snapshot import Snapshot
from dataplane.loaders._sources import expand, grow, is_many, open_steps, settled

__all__ = ["SampleDataset"]


class SampleDataset(torch.utils.data.Dataset[Any]):
    """Samples of the stored steps at ``url``, in a fixed order, for ``DataLoader``.

    ``sample="row"``: the samples are the axis-0 rows of each step's arrays, over all steps
    (every variable has the same number of rows in a step, and one row shape and dtype for
    the life of the channel). ``sample="step"``: each step is one sample.

    Batches (``__getitems__``) are read with as few calls as possible: the wanted rows of a
    step are grouped into runs and each run is one hyperslab read per variable. The dataset
    pickles as "how to reopen" (URL, options, its snapshot of the step sizes); each process
    (each DataLoader worker) opens its own handle on first use.

    Over a channel a writer is still appending to, the dataset is a snapshot: ``len()`` stays
    fixed until :meth:`refresh` (``ShuffleSampler`` calls it at each new epoch), and only
    committed steps are ever read.

    Parameters
    ----------
    url
        Stored data: ``h5://``, ``bp5://``, ``zarr://`` (files dataplane or plain libraries wrote).
    vars
        A name (samples are tensors), a tuple of names (tuples) or ``{key: name}`` (dicts).
    sample
        ``"row"`` or ``"step"``.
    dtype
        Cast samples to this dtype (numpy or torch; one, or ``{name: dtype}``); None keeps it.
    transform
        Called on each sample (after conversion to tensors).
    shard_bytes
        Target size of a shard, the contiguous run of samples a sampler and a cache treat as
        one unit: a run of one step's rows, several small steps whole, or several steps for
        ``sample="step"``.
    cache
        A :class:`~dataplane.cache.NodeCache`: samples are read from shards cached on the node
        (each fetched once per node, by whichever process needs it first).
    prefetch
        With a cache and ``ShuffleSampler``: background processes fetch the shards of each
        epoch in order of first use, ahead of the readers (``True``: one; a number: that
        many; ``False``: none). ``prefetch_window`` is their initial window in bytes (it
        grows while readers catch up with it, up to half the cache).
    **opts
        Transport options, as for :func:`dataplane.open`.
    """

    def __init__(
        self,
        url: str,
        vars: Any,
        sample: str = "row",
        dtype: Any = None,
        transform: Callable[[Any], Any] | None = None,
        *,
        shard_bytes: int = 4 << 20,
        cache: NodeCache | None = None,
        prefetch: bool | int = True,
        prefetch_window: int = 64 << 20,
        **opts: Any,
    ) -> None:
        self.url = url
        self._files = expand(url) if is_many(url) else None
        self.opts = dict(opts)
        self.names, self._keys, self._single = parse_vars(vars)
        self.sample = check_sample(sample)
        self._dtypes = parse_dtypes(dtype, self.names)
        self.transform = check_transform(transform)
        if isinstance(shard_bytes, bool) or not isinstance(shard_bytes, (int, np.integer)):
            raise OptionError(f"shard_bytes must be an integer, got {shard_bytes!r}")
        if shard_bytes < 1:
            raise OptionError(f"shard_bytes must be at least 1, got {shard_bytes}")
        self.shard_bytes = int(shard_bytes)
        if cache is not None and not isinstance(cache, NodeCache):
            raise OptionError(f"cache must be a dataplane.cache.NodeCache, got {cache!r}")
        self.cache = cache
        self.prefetch_window = int(prefetch_window)
        self._epochs = Epochs(cache, prefetch_processes(prefetch), self.prefetch_window)
        self._table: tuple[np.ndarray, np.ndarray, list[str]] | None = None
        self._snap = Snapshot(url, self.names, self.sample, self._files)
        self._io = Reads(url, self.opts, self._snap, self._dtypes, cache)
        self._present: set[str] = set()  # shards seen in the cache at generation _present_at
        self._present_at = -1
        self._settled: str | None = None  # the file as the last look found it, if settled
        # Every rank's first order over a layout (a sampler's), for cooperating caches.
        self._orders: Callable[[np.ndarray], list[np.ndarray]] | None = None
        self.refresh()

    # -- the snapshot ------------------------------------------------------------------------
    def refresh(self) -> int:
        """Take in steps committed since the last look; returns the new ``len()``."""
        now = settled(self.url) if self._files is None else None
        if now is not None and now == self._settled:
            return len(self)  # one file, unchanged since a look when it was already settled
        # Our own read handle may show the file as it was when opened (HDF5 shares one view
        # of a file per process): close it so that the look below is a fresh one.
        self._io.close()
        if self._files is not None:
            grow(self.url, self._files)
        snap = self._snap
        counts, sigs = snap.file_counts, snap.file_sigs
        versions = self.cache is not None
        looks = None
        if self.cache is not None:
            looks = Looks(self.cache.looks_path, self.opts, self.cache.capacity // LOOKS_SHARE)
        with open_steps(
            self.url, self.opts, self._files, counts, True, sigs, versions, looks
        ) as arc:
            snap.take_in(arc, versions)
        self._settled = now  # as it was before this look: a commit since makes it differ
        self._table = None
        if self.cache is not None and self._snap.counts:
            # An entry is a shard plus a header (a page at most) and per-array alignment.
            self.cache.require(int(self.shard_nbytes().max()) + 4096 * (1 + len(self.names)))
        return len(self)

    def __len__(self) -> int:
        return len(self._snap)

    @property
    def steps(self) -> int:
        """Steps in the snapshot."""
        return self._snap.steps

    def shard_bounds(self, samples: int | None = None) -> np.ndarray:
        """Boundaries of the shards (see :mod:`dataplane.loaders.order`); with ``samples``, of
        the snapshot that had that many samples (to resume an order taken before growth)."""
        if samples is None or samples == len(self):
            return self._shard_table()[0]
        return self._snap.layout(self.shard_bytes, self._snap.steps_with(samples))[0]

    def shard_nbytes(self) -> np.ndarray:
        """Bytes of each shard."""
        return self._shard_table()[1]

    def _shard_table(self) -> tuple[np.ndarray, np.ndarray, list[str]]:
        if self._table is None:
            bounds, nbytes = self._snap.layout(self.shard_bytes)
            keys = (
                [self._snap.key(bounds, s) for s in range(len(bounds) - 1)]
                if self.cache is not None
                else []
            )
            self._table = bounds, nbytes, keys
            self._io.homes = self._homes(bounds, nbytes)
        return self._table

    def share_order(self, orders: Callable[[np.ndarray], list[np.ndarray]]) -> None:
        """A sampler tells the dataset every rank's order of its first epoch over a shard
        layout (``orders(bounds)``, a pure function: every process computes the same), from
        which cooperating caches choose each shard's home node. Without it, each rank's
        contiguous share in storage order counts as its first order."""
        self._orders = orders
        self._table = None

    def _homes(self, bounds: np.ndarray, nbytes: np.ndarray) -> np.ndarray | None:
        peers = None if self.cache is None else self.cache.peers
        if peers is None or peers.nodes < 2:
            return None
        world = len(peers.rank_nodes)
        n = int(bounds[-1])
        if self._orders is not None:
            orders = self._orders(bounds)
        else:
            orders = [np.arange(n)[r * n // world : (r + 1) * n // world] for r in range(world)]
        if len(orders) != world:
            raise OptionError(
                f"the sampler orders samples for {len(orders)} ranks, but the cache cooperates "
                f"across {world}: give the sampler rank= and world= of the cache's communicator"
            )
        return homes(first_uses(orders, peers.rank_nodes, bounds, peers.nodes), nbytes)

    # -- reading -----------------------------------------------------------------------------
    def _indices(self, indices: Sequence[int] | np.ndarray) -> np.ndarray:
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        n = len(self)
        if idx.size == 1 and 0 <= idx[0] < n:  # one sample in range: nothing to check
            return idx
        if idx.size and (idx.max() >= n or idx.min() < -n):
            # A worker's snapshot can be older than the sampler's (persistent workers): steps
            # only ever get appended, so catching up is safe.
            n = self.refresh()
            if idx.max() >= n or idx.min() < -n:
                bad = int(idx[(idx >= n) | (idx < -n)][0])
                raise IndexError(f"sample {bad} is out of range: {self.url} has {n} samples")
        return np.where(idx < 0, idx + n, idx)

    def __getitem__(self, index: int) -> Any:
        return self.__getitems__([index])[0]

    def __getitems__(self, indices: Sequence[int] | np.ndarray) -> list[Any]:
        """The samples at ``indices``, read with as few calls as the layout allows."""
        tensors = self._columns(self._indices(indices), "private")
        # Views of each column, one per sample (unbind: one call, not one index per sample).
        columns = [t.unbind(0) if isinstance(t, torch.Tensor) else t for t in tensors]
        out = []
        for parts in zip(*columns):
            s = shape_sample(list(parts), self._keys, self._single)
            out.append(self.transform(s) if self.transform is not None else s)
        return out

    def batch(self, indices: Sequence[int] | np.ndarray, *, memory: str = "private") -> Any:
        """The samples at ``indices`` as one batch, shaped as ``DataLoader``'s default collate
        would give it (a tensor per variable, samples along axis 0), but gathered with one
        copy instead of one per sample plus the collate's.

        ``memory``: ``"private"``, ``"shared"`` (shared memory: a DataLoader worker hands it
        to the main process without a copy) or ``"pinned"`` (page-locked, for
        ``non_blocking`` copies to a GPU). With a ``transform``, samples are transformed one
        by one and then collated.
        """
        idx = self._indices(indices)
        if self.transform is not None:
            samples = self.__getitems__(idx)
            return _collate(samples, memory)
        tensors = self._columns(idx, memory)
        if self.sample == "step":
            tensors = [_stack(list(col), name, memory) for col, name in zip(tensors, self.names)]
        return shape_sample(list(tensors), self._keys, self._single)

    def batches(
        self, indices: Sequence[int] | np.ndarray, size: int, *, memory: str = "private"
    ) -> list[Any]:
        """The samples at ``indices`` as consecutive batches of ``size`` (the last one may be
        smaller), as :meth:`batch` makes each, but gathered at once into one buffer per
        variable, of which each batch is a view: the gather's cost per call (the cache's look,
        the buffer, the checks) is paid once for all of them, which is most of a batch of
        small samples."""
        if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 1:
            raise OptionError(f"size must be a positive integer, got {size!r}")
        idx = self._indices(indices)
        cuts = range(0, len(idx), int(size))
        if self.transform is not None or self.sample == "step" or not len(idx):
            return [self.batch(idx[a : a + size], memory=memory) for a in cuts]
        parts = [t.split(int(size)) for t in self._columns(idx, memory)]
        return [shape_sample(list(ts), self._keys, self._single) for ts in zip(*parts)]

    def ensure_cached(self, indices: Sequence[int] | np.ndarray) -> None:
        """Have the shards holding ``indices`` in the cache (fetching those that are not),
        without reading them: the work a DataLoader worker does for :func:`loader` when the
        main process gathers batches from the cache itself."""
        if self.cache is None:
            return
        idx = self._indices(indices)
        bounds, _, keys = self._shard_table()
        wanted = np.unique(np.searchsorted(bounds, idx, side="right") - 1).tolist()
        generation = self.cache.generation()
        if generation != self._present_at:  # something was removed since: look again
            self._present, self._present_at = set(), generation
        batch = {keys[s] for s in wanted}
        homes_ = self._io.homes
        for s in wanted:
            key = keys[s]
            if key in self._present:
                continue
            if key not in self.cache:
                home = None if homes_ is None else int(homes_[s])
                produce = functools.partial(self._io.shard, s, bounds)
                self.cache.fetch(key, produce, keep=batch, home=home)
            self._present.add(key)

    def all_cached(self) -> bool:
        """Whether every shard of the current snapshot is in the cache now (False without
        one): an epoch would read nothing from the source."""
        if self.cache is None:
            return False
        cache = self.cache
        return all(key in cache for key in self._shard_table()[2])

    def start_prefetch(self, wait: float | None = None) -> bool:
        """Start the prefetch process now rather than at the first epoch, so that its start
        (importing the source's library, opening the source) overlaps the job's own set-up.
        ``wait``: seconds to wait until it has opened the source. Returns whether it runs
        (and is ready, with ``wait``); without a cache or with ``prefetch=False`` nothing runs.
        """
        prefetcher = self._epochs.start(self._source, update=False)
        if prefetcher is None:
            return False
        return prefetcher.wait_ready(wait) if wait is not None else prefetcher.alive

    def _source(self) -> ShardSource:
        return self._io.source(self._shard_table())

    def _columns(self, idx: np.ndarray, memory: str) -> list[Any]:
        columns = self._io.columns(idx, memory, self._shard_table())
        # After the read: a first batch maps its own shards faster without a thread starting
        # beside it and competing for the GIL (a new job's first batch took twice as long).
        self._epochs.reading()
        return columns

    @property
    def reads(self) -> int:
        """I/O calls this process made to the source (for benchmarks and tests)."""
        return self._io.reads

    @property
    def bytes_read(self) -> int:
        return self._io.bytes_read

    @property
    def prefetch(self) -> bool:
        """Whether a prefetch process follows the epochs (off where options cannot reach it)."""
        return self._epochs.enabled

    def plan_epoch(self, order: np.ndarray, tag: str) -> Callable[[int], None] | None:
        """Publish the epoch's ``order`` to the cache (for eviction by future use) and have
        the prefetcher follow it. Returns the function that reports the reader's position."""
        if self.cache is None:
            return None
        bounds, _, keys = self._shard_table()
        uses = np.searchsorted(bounds, order, side="right") - 1
        return self._epochs.plan(f"{id(self):x}-{tag}", keys, uses, self._source)

    def close(self) -> None:
        """Close this process's handle and stop its prefetcher (both start again when used)."""
        self._io.close()
        self._epochs.close()

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_present"], state["_present_at"] = set(), -1
        return state

    def get_config(self) -> dict[str, Any]:
        """JSON-safe description, for logs and benchmarks."""
        return {
            "class": type(self).__name__,
            "url": self.url,
            "vars": vars_config(self.names, self._keys),
            "sample": self.sample,
            "dtype": {n: None if d is None else d.name for n, d in self._dtypes.items()},
            "shard_bytes": self.shard_bytes,
            "cache": None if self.cache is None else self.cache.get_config(),
            "prefetch": self.prefetch,
            "options": {k: v for k, v in self.opts.items() if isinstance(v, (str, int, float))},
            "samples": len(self),
            "steps": self.steps,
        }

    def __repr__(self) -> str:
        return (
            f"SampleDataset({self.url!r}, vars={self.names}, sample={self.sample!r}, n={len(self)})"
        )
