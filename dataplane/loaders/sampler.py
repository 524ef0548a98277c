"""``ShuffleSampler``: seeded, epoch-aware, distributed, resumable sample orders."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch

from dataplane.errors import OptionError
from dataplane.loaders._common import check_seed, world_defaults
from dataplane.loaders.order import (
    check_bounds,
    epoch_order,
    every_rank,
    order_cost,
    uniform_bounds,
)

__all__ = ["ShuffleSampler"]

#: Samples between two reports of the position to a dataset's cache.
ADVANCE_EVERY = 16


class ShuffleSampler(torch.utils.data.Sampler[int]):
    """The order in which one rank reads a dataset's samples, epoch by epoch.

    ``block=None`` shuffles uniformly. ``block=k`` shuffles the dataset's shards (contiguous
    runs of samples, see :meth:`SampleDataset.shard_bounds`) and then the samples within each
    window of ``k`` shards: the order stays well mixed while a reader needs only ``k`` shards at
    a time. The order is a pure function of (shard layout, seed, epoch, rank, world); see
    :mod:`dataplane.loaders.order`.

    Parameters
    ----------
    data
        A dataset with ``shard_bounds()`` (and ``refresh()`` for growing data: called at the
        start of each epoch), or a number of samples (one shard per sample).
    seed, block
        The shuffle. ``block`` is in shards.
    rank, world
        This rank and the number of ranks; default from torch.distributed or mpi4py when
        initialised, else 0 and 1. Ranks get disjoint, equally long shares.
    drop_last
        Drop the tail that does not divide evenly among ranks instead of padding it.
    shuffle
        ``False`` reads each rank's contiguous share in storage order (evaluation, or a
        sequential baseline), still with prefetch and partitioning.
    """

    def __init__(
        self,
        data: Any,
        *,
        seed: int = 0,
        block: int | None = 64,
        rank: int | None = None,
        world: int | None = None,
        drop_last: bool = False,
        shuffle: bool = True,
    ) -> None:
        if block is not None and (
            isinstance(block, bool) or not isinstance(block, (int, np.integer)) or block < 1
        ):
            raise OptionError(
                f"block must be None (uniform) or a number of shards >= 1, got {block!r}"
            )
        if isinstance(data, (int, np.integer)) and not isinstance(data, bool):
            if data < 0:
                raise OptionError(f"a sampler over {data} samples? need n >= 0")
        elif not hasattr(data, "shard_bounds"):
            raise OptionError(
                f"ShuffleSampler needs a number of samples or a dataset with shard_bounds() "
                f"(such as dataplane.loaders.SampleDataset), got {type(data).__name__}"
            )
        self.data = data
        self.seed = check_seed(seed)
        self.block = None if block is None else int(block)
        self.rank, self.world = world_defaults(rank, world)
        self.drop_last = bool(drop_last)
        self.shuffle = bool(shuffle)
        self.epoch = 0
        self._bounds: np.ndarray | None = None  # this epoch's snapshot of the shard layout
        self._resume = 0  # position the next __iter__ starts from
        self._yielded = 0  # samples handed out in the current epoch (from its start)
        self._order: np.ndarray | None = None  # the order of the pass in progress
        share = getattr(data, "share_order", None)
        if share is not None:  # cooperating caches choose homes from every rank's order
            share(
                functools.partial(
                    every_rank,
                    seed=self.seed,
                    epoch=0,
                    block=self.block,
                    world=self.world,
                    drop_last=self.drop_last,
                    shuffled=self.shuffle,
                )
            )

    # -- the layout --------------------------------------------------------------------------
    def _layout(self, refresh: bool) -> np.ndarray:
        if isinstance(self.data, (int, np.integer)):
            return uniform_bounds(int(self.data))
        if refresh and hasattr(self.data, "refresh"):
            self.data.refresh()
        return check_bounds(self.data.shard_bounds())

    def _snapshot(self) -> np.ndarray:
        if self._bounds is None:
            self._bounds = self._layout(refresh=True)
        return self._bounds

    def set_epoch(self, epoch: int) -> None:
        """Start ``epoch`` (takes in data that grew since the last one). Setting the epoch a
        restored state is in keeps its position."""
        if isinstance(epoch, bool) or not isinstance(epoch, (int, np.integer)) or epoch < 0:
            raise OptionError(f"epoch must be a non-negative integer, got {epoch!r}")
        if int(epoch) != self.epoch or self._resume == 0:
            self._resume = 0
            self._bounds = None
        self.epoch = int(epoch)
        self._snapshot()

    # -- the order ---------------------------------------------------------------------------
    def order(self, epoch: int | None = None) -> np.ndarray:
        """This rank's whole order for ``epoch`` (default: the current one)."""
        return epoch_order(
            self._snapshot(),
            seed=self.seed,
            epoch=self.epoch if epoch is None else int(epoch),
            block=self.block,
            rank=self.rank,
            world=self.world,
            drop_last=self.drop_last,
            shuffled=self.shuffle,
        )

    def __iter__(self) -> Iterator[int]:
        order, start, advance = self._begin()
        for i in order[start:].tolist():
            if advance is not None and self._yielded % ADVANCE_EVERY == 0:
                advance(self._yielded)
            self._yielded += 1
            yield i
        self._end(order, advance)

    def _begin(self) -> tuple[np.ndarray, int, Callable[[int], None] | None]:
        order = self._order = self.order()
        start, self._resume = self._resume, 0
        self._yielded = start
        # A dataset with a cache learns the future: eviction by next use, prefetching.
        plan = getattr(self.data, "plan_epoch", None)
        advance = plan(order, f"r{self.rank}-e{self.epoch}") if plan is not None else None
        return order, start, advance

    def _end(self, order: np.ndarray, advance: Callable[[int], None] | None) -> None:
        if advance is not None:
            advance(len(order))
        self._bounds = None  # the next epoch (or pass) looks for new data again
        if self._order is order:
            self._order = None

    def upcoming(self, n: int) -> np.ndarray:
        """The next ``n`` indices of the pass in progress (fewer near its end; none outside a
        pass), not taken: a reader can gather them ahead, and :meth:`state_dict` still counts
        only what was handed out."""
        order = self._order
        if order is None:
            return np.empty(0, np.int64)
        return order[self._yielded : self._yielded + max(int(n), 0)]

    def batches(self, size: int, drop_last: bool = False) -> Iterator[list[int]]:
        """The order in lists of ``size`` indices: what ``BatchSampler(self, size, drop_last)``
        yields, without a Python step per index (resume and plans work the same)."""
        order, start, advance = self._begin()
        left = order[start:].tolist()
        for a in range(0, len(left), size):
            batch = left[a : a + size]
            if drop_last and len(batch) < size:
                self._yielded += len(batch)  # taken and dropped, as by BatchSampler
                break
            if advance is not None:
                # The last ADVANCE_EVERY mark this batch starts at or passes.
                mark = (self._yielded + len(batch) - 1) // ADVANCE_EVERY * ADVANCE_EVERY
                if mark >= self._yielded:
                    advance(mark)
            self._yielded += len(batch)
            yield batch
        self._end(order, advance)

    def __len__(self) -> int:
        n = int(self._snapshot()[-1])
        return n // self.world if self.drop_last else -(-n // self.world)

    def cost(self, epoch: int | None = None) -> dict[str, Any]:
        """What this rank's order costs: shards and bytes read per epoch when each shard is
        read once, and the most shards (and bytes) needed at one time to read each only once."""
        bounds = self._snapshot()
        nbytes = self.data.shard_nbytes() if hasattr(self.data, "shard_nbytes") else None
        out: dict[str, Any] = order_cost(self.order(epoch), bounds, nbytes)
        out["shards"] = len(bounds) - 1
        return out

    # -- resume ------------------------------------------------------------------------------
    def state_dict(self, samples_seen: int | None = None) -> dict[str, Any]:
        """Where this rank is: epoch, position and what the order depends on.

        ``samples_seen`` is how many samples of this epoch the training loop consumed (batches
        times batch size). Give it when DataLoader workers prefetch: the sampler itself only
        knows how many indices it handed out, which runs ahead of training by the prefetch.
        """
        position = self._yielded if samples_seen is None else int(samples_seen)
        if not 0 <= position <= len(self):
            raise OptionError(f"samples_seen must be between 0 and {len(self)}, got {position}")
        return {
            "epoch": self.epoch,
            "position": position,
            "samples": int(self._snapshot()[-1]),
            "seed": self.seed,
            "block": self.block,
            "rank": self.rank,
            "world": self.world,
            "drop_last": self.drop_last,
            "shuffle": self.shuffle,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue where ``state`` was taken: the next iteration starts at its position, in
        the same order (also when the data has grown since)."""
        defaults = {"shuffle": True}  # states saved before the option existed
        for key in ("seed", "block", "rank", "world", "drop_last", "shuffle"):
            if state.get(key, defaults.get(key)) != getattr(self, key):
                raise OptionError(
                    f"cannot resume: the state has {key}={state.get(key)!r} but this sampler "
                    f"{key}={getattr(self, key)!r}; a resumed order needs the same {key}"
                )
        n = int(state["samples"])
        if isinstance(self.data, (int, np.integer)):
            if n != int(self.data):
                raise OptionError(f"cannot resume: the state is over {n} samples, not {self.data}")
            bounds = uniform_bounds(n)
        else:
            if hasattr(self.data, "refresh"):
                self.data.refresh()
            # The layout of the snapshot the order was taken over, however the data grew since.
            bounds = check_bounds(self.data.shard_bounds(samples=n))
        self.epoch = int(state["epoch"])
        self._bounds = bounds
        self._resume = self._yielded = int(state["position"])

    def get_config(self) -> dict[str, Any]:
        return {
            "class": type(self).__name__,
            "seed": self.seed,
            "block": self.block,
            "rank": self.rank,
            "world": self.world,
            "drop_last": self.drop_last,
            "shuffle": self.shuffle,
        }

    def __repr__(self) -> str:
        return (
            f"ShuffleSampler(seed={self.seed}, block={self.block}, rank={self.rank}/"
            f"{self.world}, epoch={self.epoch})"
        )
