"""Sample orders: pure functions of (shard layout, seed, epoch, block, rank, world).

No I/O and no state, so an order can be recomputed anywhere (a resumed run, a prefetcher that
wants to know the future, a test) and always comes out the same. A *shard layout* is an int64
array of boundaries ``bounds``: shard ``s`` holds samples ``bounds[s]:bounds[s + 1]``, the first
boundary is 0 and the last is the number of samples.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.random  # numpy 2 imports it on first use: 10 ms of a new job's first epoch

from dataplane.errors import OptionError

__all__ = ["check_bounds", "epoch_order", "order_cost", "partition", "shuffle", "uniform_bounds"]


def uniform_bounds(n: int, shard: int = 1) -> np.ndarray:
    """Boundaries of ``n`` samples cut into shards of ``shard`` samples (the last may be short)."""
    if n < 0 or shard < 1:
        raise OptionError(f"need n >= 0 samples and shards of >= 1 sample, got {n}, {shard}")
    return np.append(np.arange(0, n, shard, dtype=np.int64), np.int64(n))


def check_bounds(bounds: Any) -> np.ndarray:
    """``bounds`` as a validated int64 array (starts at 0, strictly increasing)."""
    b = np.asarray(bounds, dtype=np.int64)
    if b.ndim != 1 or len(b) < 1 or b[0] != 0 or (len(b) > 1 and np.any(np.diff(b) <= 0)):
        raise OptionError(
            "a shard layout is a 1-d array of boundaries that starts at 0 and strictly increases "
            f"(shard s holds samples bounds[s]:bounds[s+1]); got {b[:8]!r}..."
        )
    return b


def _rng(seed: int, epoch: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(seed), int(epoch)]))


def shuffle(bounds: np.ndarray, seed: int, epoch: int, block: int | None) -> np.ndarray:
    """A permutation of all samples for one epoch.

    ``block=None``: uniform over all samples. ``block=k``: the shards are permuted, cut into
    windows of ``k`` shards, and the samples of each window are permuted among themselves, so a
    reader needs at most ``k`` shards at a time while consecutive samples still come from
    ``k`` different places.
    """
    rng = _rng(seed, epoch)
    n = int(bounds[-1])
    if block is None:
        return rng.permutation(n).astype(np.int64)
    nshards = len(bounds) - 1
    sizes = np.diff(bounds)
    shards = rng.permutation(nshards)
    out = np.empty(n, dtype=np.int64)
    pos = 0
    for w in range(0, nshards, block):
        window = shards[w : w + block]
        # Samples of these shards, concatenated: a start per shard repeated over its samples.
        counts = sizes[window]
        total = int(counts.sum())
        firsts = np.repeat(bounds[window] - np.concatenate(([0], np.cumsum(counts)[:-1])), counts)
        idx = firsts + np.arange(total, dtype=np.int64)
        rng.shuffle(idx)
        out[pos : pos + total] = idx
        pos += total
    return out


def partition(order: np.ndarray, rank: int, world: int, drop_last: bool) -> np.ndarray:
    """Rank ``rank``'s contiguous share of ``order``; every rank gets the same count.

    ``drop_last`` drops the tail that does not divide evenly; otherwise the order is padded by
    repeating it from its start (as ``torch.utils.data.DistributedSampler`` does). Contiguous
    shares (rather than every ``world``-th sample) keep each rank on its own windows of shards.
    """
    n = len(order)
    if drop_last:
        per = n // world
        order = order[: per * world]
    else:
        per = -(-n // world)
        if per * world > n:
            order = np.concatenate([order, np.resize(order, per * world - n)])
    return order[rank * per : (rank + 1) * per]


def epoch_order(
    bounds: np.ndarray,
    *,
    seed: int,
    epoch: int,
    block: int | None,
    rank: int = 0,
    world: int = 1,
    drop_last: bool = False,
    shuffled: bool = True,
) -> np.ndarray:
    """The sample indices rank ``rank`` reads in ``epoch``, in order (``shuffled=False``: the
    rank's contiguous share in storage order)."""
    order = shuffle(bounds, seed, epoch, block) if shuffled else np.arange(int(bounds[-1]))
    return partition(order, rank, world, drop_last)


def every_rank(
    bounds: np.ndarray,
    *,
    seed: int,
    epoch: int,
    block: int | None,
    world: int,
    drop_last: bool = False,
    shuffled: bool = True,
) -> list[np.ndarray]:
    """:func:`epoch_order` of each rank of ``world`` (one shuffle for all of them)."""
    order = shuffle(bounds, seed, epoch, block) if shuffled else np.arange(int(bounds[-1]))
    return [partition(order, r, world, drop_last) for r in range(world)]


def order_cost(order: np.ndarray, bounds: np.ndarray, shard_nbytes: Any = None) -> dict[str, int]:
    """What reading ``order`` costs when each shard is read whole, once, and kept until its
    last use: shards and bytes read, and the most shards (and bytes) held at one time, which
    is the cache a reader needs to read each shard only once."""
    nshards = len(bounds) - 1
    nbytes = np.ones(nshards, np.int64) if shard_nbytes is None else np.asarray(shard_nbytes)
    if len(order) == 0:
        return {
            "samples": 0,
            "shards_read": 0,
            "bytes_read": 0,
            "shards_in_flight": 0,
            "bytes_in_flight": 0,
        }
    shard = np.searchsorted(bounds, order, side="right") - 1
    used, first = np.unique(shard, return_index=True)
    _, last_rev = np.unique(shard[::-1], return_index=True)
    last = len(shard) - 1 - last_rev
    # +1 at a shard's first use, -1 just after its last; the running sum is what is held.
    events = np.zeros(len(shard) + 1, np.int64)
    weights = np.zeros(len(shard) + 1, np.int64)
    np.add.at(events, first, 1)
    np.add.at(events, last + 1, -1)
    np.add.at(weights, first, nbytes[used])
    np.add.at(weights, last + 1, -nbytes[used])
    return {
        "samples": len(order),
        "shards_read": len(used),
        "bytes_read": int(nbytes[used].sum()),
        "shards_in_flight": int(np.cumsum(events).max()),
        "bytes_in_flight": int(np.cumsum(weights).max()),
    }
