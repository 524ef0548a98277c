"""``loader()``: a DataLoader that moves whole batches, not samples.

``DataLoader(ds, batch_size=32, num_workers=2)`` works on any dataset, at a price paid per
sample: a tensor per sample, a collate that copies each into the batch, and (with workers)
the batch sent through a worker's queue. :class:`BatchLoader` hands the DataLoader whole
batches of indices instead:

- over a :class:`~dataplane.cache.NodeCache`, without transforms, its workers only make sure the
  batch's shards are in the cache (the I/O of cold shards, in parallel) and send the indices
  back; the main process gathers the batch straight from the cache's mappings into one buffer
  per variable (pinned, with ``pin_memory``): one copy per byte, nothing through the queue;
- otherwise each worker gathers (and transforms) its batch into shared memory, once.
"""

from __future__ import annotations

import warnings
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import BatchSampler, DataLoader, get_worker_info

from dataplane.errors import OptionError
from dataplane.loaders._batch import pinnable, to_device
from dataplane.loaders.sample import SampleDataset
from dataplane.loaders.sampler import ShuffleSampler

__all__ = ["BatchLoader", "loader"]

GATHER = ("auto", "main", "workers")
#: Batches per work item when the main process gathers: a worker's answer costs the main
#: process about as much as gathering a 64 KiB-sample batch, so it answers for several at
#: once: at least GROUP, and about GROUP_BYTES of samples (small samples, more batches).
GROUP = 8
GROUP_BYTES = 16 << 20
MAX_GROUP = 64
#: The main process gathers batches of small samples several at once, about AHEAD_BYTES of
#: samples (up to MAX_AHEAD batches), each batch a view of that buffer: a gather's fixed cost
#: (the cache's look, the buffer, the checks) is most of a batch of 4 KiB samples.
AHEAD_BYTES = 1 << 20
MAX_AHEAD = 16


class _Ticket:
    """A batch a worker made ready in the cache: the main process gathers it."""

    __slots__ = ("indices",)

    def __init__(self, indices: np.ndarray) -> None:
        self.indices = indices

    def __reduce__(self) -> tuple[Any, ...]:
        return (_Ticket, (self.indices,))


def _as_is(batch: Any) -> Any:
    return batch


class _Batches(torch.utils.data.Sampler[list[int]]):
    """``BatchSampler(sampler, ...)``; a :class:`ShuffleSampler` cuts its batches itself
    (no Python step per index)."""

    def __init__(self, sampler: Any, batch_size: int, drop_last: bool) -> None:
        self.sampler = sampler
        self.plain = BatchSampler(sampler, batch_size, drop_last)

    def __iter__(self) -> Iterator[list[int]]:
        if isinstance(self.sampler, ShuffleSampler):
            return self.sampler.batches(self.plain.batch_size, self.plain.drop_last)
        return iter(self.plain)

    def __len__(self) -> int:
        return len(self.plain)


class _Groups(torch.utils.data.Sampler[list[int]]):
    """The sampler's order in work items of up to ``per`` whole batches."""

    def __init__(self, sampler: Any, batch_size: int, drop_last: bool, per: int) -> None:
        self.batches = _Batches(sampler, batch_size, drop_last)
        self.per = per

    def __iter__(self) -> Iterator[list[int]]:
        group: list[int] = []
        n = 0
        for batch in self.batches:
            group.extend(batch)
            n += 1
            if n == self.per:
                yield group
                group, n = [], 0
        if group:
            yield group

    def __len__(self) -> int:
        return -(-len(self.batches) // self.per)


class _Work(torch.utils.data.Dataset[Any]):
    """What the DataLoader (its workers, or the main process) does with a batch of indices."""

    def __init__(
        self,
        ds: SampleDataset,
        in_main: bool,
        memory: str,
        batch_transform: Callable[[Any], Any] | None,
    ) -> None:
        self.ds = ds
        self.in_main = in_main
        self.memory = memory  # of batches made in the main process
        self.batch_transform = batch_transform

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, index: int) -> Any:
        return self.__getitems__([index])

    def __getitems__(self, indices: list[int]) -> Any:
        worker = get_worker_info() is not None
        if self.in_main and worker:
            self.ds.ensure_cached(indices)
            return _Ticket(np.asarray(indices, dtype=np.int64))
        return self.finish(self.ds.batch(indices, memory="shared" if worker else self.memory))

    def finish(self, batch: Any) -> Any:
        return self.batch_transform(batch) if self.batch_transform is not None else batch


class BatchLoader(DataLoader[Any]):
    """A ``DataLoader`` over a :class:`SampleDataset` that yields the batches
    ``DataLoader(ds, batch_size=...)`` would (same order, same structure), made whole.

    Parameters
    ----------
    dataset
        The samples.
    batch_size, drop_last
        As for ``DataLoader``.
    sampler
        The order of samples (default ``ShuffleSampler(dataset)``); resume and epochs go
        through it as usual (``sampler.set_epoch``, ``state_dict``).
    num_workers
        As for ``DataLoader``.
    pin_memory
        Batches in page-locked memory (ignored, with a warning, without an accelerator).
    device
        Move each batch there (``non_blocking`` copies: overlapped with compute when pinned).
    batch_transform
        Called in the workers on each whole batch (the dataset's own ``transform`` is called
        per sample, also in the workers).
    gather
        ``"main"``: workers fetch shards into the cache, the main process gathers batches from
        it (needs a cache and no transform); ``"workers"``: workers gather and send batches;
        ``"auto"``: ``"main"`` where it can be used.
    **kwargs
        Passed to ``DataLoader`` (``multiprocessing_context``, ``prefetch_factor``,
        ``timeout``, ``worker_init_fn``, ...), except that workers persist by default
        (``persistent_workers=True``: starting them anew each epoch costs more than a warm
        epoch of small samples).
    """

    def __init__(
        self,
        dataset: SampleDataset,
        batch_size: int,
        *,
        sampler: Any = None,
        drop_last: bool = False,
        num_workers: int = 0,
        pin_memory: bool = False,
        device: Any = None,
        batch_transform: Callable[[Any], Any] | None = None,
        gather: str = "auto",
        **kwargs: Any,
    ) -> None:
        if not isinstance(dataset, SampleDataset):
            raise OptionError(
                f"BatchLoader reads a dataplane.loaders.SampleDataset, got "
                f"{type(dataset).__name__}; use torch's DataLoader for other datasets"
            )
        if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)):
            raise OptionError(f"batch_size must be an integer, got {batch_size!r}")
        if batch_size < 1:
            raise OptionError(f"batch_size must be at least 1, got {batch_size}")
        if batch_transform is not None and not callable(batch_transform):
            raise OptionError(f"batch_transform must be callable, got {batch_transform!r}")
        if gather not in GATHER:
            raise OptionError(f"gather must be one of {', '.join(GATHER)}, got {gather!r}")
        can_main = (
            dataset.cache is not None and dataset.transform is None and batch_transform is None
        )
        if gather == "main" and not can_main:
            raise OptionError(
                "gather='main' needs a dataset with a cache and no transform (the main process "
                "gathers batches from the cache; transforms run in the workers); use "
                "gather='workers'"
            )
        in_main = can_main and gather != "workers" and num_workers > 0
        self.device = None if device is None else torch.device(device)
        if self.device is not None and self.device.type == "cuda" and not torch.cuda.is_available():
            raise OptionError(f"device={device!r} but torch sees no CUDA device here")
        if pin_memory and not pinnable():
            warnings.warn(
                "pin_memory=True but torch sees no accelerator: batches stay in ordinary memory",
                RuntimeWarning,
                stacklevel=2,
            )
            pin_memory = False
        self.samples = dataset
        self.order = sampler if sampler is not None else ShuffleSampler(dataset)
        self.in_main = in_main
        self._memory = "pinned" if pin_memory else "private"
        work = self._work = _Work(dataset, in_main, self._memory, batch_transform)
        if num_workers > 0:
            kwargs.setdefault("persistent_workers", True)
        self._batches = _Batches(self.order, int(batch_size), bool(drop_last))
        self._batch_size = int(batch_size)
        self._ahead = self._gather_ahead(dataset)
        super().__init__(
            work,
            batch_sampler=(
                _Groups(self.order, int(batch_size), bool(drop_last), self._group(dataset))
                if in_main
                else self._batches
            ),
            num_workers=num_workers,
            collate_fn=_as_is,
            # Tickets have nothing to pin; gathered batches are made pinned in place.
            pin_memory=pin_memory and not in_main and num_workers > 0,
            **kwargs,
        )

    def __len__(self) -> int:
        return len(self._batches)

    def _batch_bytes(self, dataset: SampleDataset) -> int:
        nbytes = dataset.shard_nbytes()
        per_sample = int(nbytes.sum()) // max(len(dataset), 1) if len(nbytes) else 0
        return max(per_sample * self._batch_size, 1)

    def _gather_ahead(self, dataset: SampleDataset) -> int:
        if dataset.transform is not None or dataset.sample != "row":
            return 1
        return max(1, min(MAX_AHEAD, AHEAD_BYTES // self._batch_bytes(dataset)))

    def _group(self, dataset: SampleDataset) -> int:
        return max(GROUP, min(MAX_GROUP, GROUP_BYTES // self._batch_bytes(dataset)))

    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        if self.num_workers == 0 or (self.in_main and self.samples.all_cached()):
            # What DataLoader's single-process iterator does, without its per-batch profiler
            # record and fetcher: 0.1 ms of a 0.6 ms warm batch of 64 KiB samples. Also with
            # workers when the main process gathers and every shard is in the cache: the
            # workers would have no I/O to do, only each batch's indices to hand back through
            # their queues (warm w2 ran at 0.67-0.70 of w0 on two cores, the workers taking
            # CPU from the gather). A shard evicted meanwhile is fetched here, as without
            # workers.
            yield from self._here()
            return
        step = self._batch_size
        for item in super().__iter__():
            if isinstance(item, _Ticket):
                span = step * self._ahead
                for a in range(0, len(item.indices), span):
                    for batch in self.samples.batches(
                        item.indices[a : a + span], step, memory=self._memory
                    ):
                        yield self._deliver(batch)
            else:
                yield self._deliver(item)

    def _here(self) -> Iterator[Any]:
        """Batches made in this process. With a :class:`ShuffleSampler` and small samples,
        each gather takes the batch and the next ones of the order (``upcoming``) at once;
        a batch the sampler then hands out is delivered from there only if its indices are
        the ones gathered (anything else is gathered anew), and the sampler counts only the
        batches handed out."""
        order, size, work = self.order, self._batch_size, self._work
        ahead = self._ahead if isinstance(order, ShuffleSampler) else 1
        made: deque[tuple[list[int], Any]] = deque()
        for indices in self._batches:
            if made:
                want, batch = made.popleft()
                if want == indices:
                    yield self._deliver(work.finish(batch))
                    continue
                made.clear()
            if ahead == 1:
                yield self._deliver(work.__getitems__(indices))
                continue
            ids = np.concatenate(
                (np.asarray(indices, dtype=np.int64), order.upcoming((ahead - 1) * size))
            )
            got = self.samples.batches(ids, size, memory=self._memory)
            listed = ids.tolist()  # compared with the sampler's lists as they come
            for k in range(1, len(got)):
                made.append((listed[k * size : (k + 1) * size], got[k]))
            yield self._deliver(work.finish(got[0]))

    def _deliver(self, batch: Any) -> Any:
        return batch if self.device is None else to_device(batch, self.device)


def loader(dataset: SampleDataset, batch_size: int, **kwargs: Any) -> BatchLoader:
    """A :class:`BatchLoader`: ``DataLoader``'s batches, made whole (see the module)."""
    return BatchLoader(dataset, batch_size, **kwargs)
