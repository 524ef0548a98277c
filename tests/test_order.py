"""Sample orders are pure functions: permutations, disjoint covering rank shares, reproducible."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dataplane.errors import OptionError
from dataplane.loaders.order import (
    check_bounds,
    epoch_order,
    order_cost,
    partition,
    shuffle,
    uniform_bounds,
)

settings.register_profile("dataplane", deadline=None, max_examples=150)
settings.load_profile("dataplane")


@st.composite
def layouts(draw) -> np.ndarray:
    sizes = draw(st.lists(st.integers(1, 40), min_size=1, max_size=30))
    return np.concatenate(([0], np.cumsum(sizes))).astype(np.int64)


blocks = st.one_of(st.none(), st.integers(1, 8))


@given(layouts(), st.integers(0, 2**32), st.integers(0, 100), blocks)
def test_shuffle_is_a_permutation(bounds, seed, epoch, block) -> None:
    order = shuffle(bounds, seed, epoch, block)
    assert order.dtype == np.int64
    assert np.array_equal(np.sort(order), np.arange(bounds[-1]))


@given(layouts(), st.integers(0, 2**32), st.integers(0, 100), blocks, st.integers(1, 7))
def test_orders_reproduce(bounds, seed, epoch, block, world) -> None:
    kw = dict(seed=seed, epoch=epoch, block=block, world=world)
    for rank in range(world):
        a = epoch_order(bounds, rank=rank, **kw)
        b = epoch_order(bounds.copy(), rank=rank, **kw)
        assert np.array_equal(a, b)


@given(layouts(), st.integers(0, 1000), blocks, st.integers(1, 7), st.booleans(), st.booleans())
def test_ranks_are_disjoint_and_cover_everything(
    bounds, seed, block, world, drop_last, shuffled
) -> None:
    n = int(bounds[-1])
    shares = [
        epoch_order(
            bounds,
            seed=seed,
            epoch=3,
            block=block,
            rank=r,
            world=world,
            drop_last=drop_last,
            shuffled=shuffled,
        )
        for r in range(world)
    ]
    if not shuffled and drop_last:  # each rank reads a contiguous run in storage order
        assert all(np.array_equal(s, np.arange(s[0], s[0] + len(s))) for s in shares if len(s))
    lengths = {len(s) for s in shares}
    assert len(lengths) == 1, "every rank gets the same number of samples"
    every = np.concatenate(shares)
    if drop_last:
        assert len(every) == n // world * world
        assert len(np.unique(every)) == len(every), "no sample twice"
    else:
        assert len(every) == -(-n // world) * world
        assert set(every.tolist()) == set(range(n)), "every sample somewhere"
        # Only the padding repeats, and it repeats each sample at most once.
        _, counts = np.unique(every, return_counts=True)
        assert counts.max() <= (2 if n >= world else -(-world // n) + 1)
        assert int((counts - 1).sum()) == len(every) - n


@given(layouts(), st.integers(0, 1000), st.integers(1, 6), st.integers(1, 4))
def test_block_shuffle_needs_at_most_block_shards_at_a_time(bounds, seed, block, world) -> None:
    for rank in range(world):
        order = epoch_order(bounds, seed=seed, epoch=0, block=block, rank=rank, world=world)
        cost = order_cost(order, bounds)
        # The rank's share starts and ends mid-window; padding may add one more window.
        assert cost["shards_in_flight"] <= 2 * block


def test_block_shuffle_mixes_within_windows_and_reads_large() -> None:
    bounds = uniform_bounds(10_000, 100)
    uniform = order_cost(epoch_order(bounds, seed=0, epoch=0, block=None), bounds)
    blocked = order_cost(epoch_order(bounds, seed=0, epoch=0, block=4), bounds)
    assert blocked["shards_in_flight"] <= 4
    assert uniform["shards_in_flight"] > 90  # almost every shard is live all epoch
    order = epoch_order(bounds, seed=0, epoch=0, block=4)
    # Consecutive samples come from several shards, not in storage order.
    assert len(np.unique(order[:32] // 100)) >= 3
    assert not np.array_equal(order[:100], np.sort(order[:100]))


@given(layouts(), st.integers(0, 1000))
def test_epochs_differ(bounds, seed) -> None:
    if bounds[-1] < 20:
        return
    a = epoch_order(bounds, seed=seed, epoch=0, block=None)
    b = epoch_order(bounds, seed=seed, epoch=1, block=None)
    assert not np.array_equal(a, b)


@given(layouts(), st.integers(0, 1000), blocks)
def test_order_cost_matches_a_direct_count(bounds, seed, block) -> None:
    rng = np.random.default_rng(seed)
    nbytes = rng.integers(1, 1000, len(bounds) - 1)
    order = epoch_order(bounds, seed=seed, epoch=0, block=block)[: rng.integers(0, bounds[-1] + 1)]
    cost = order_cost(order, bounds, nbytes)
    shard = [int(np.searchsorted(bounds, i, side="right") - 1) for i in order]
    assert cost["shards_read"] == len(set(shard))
    assert cost["bytes_read"] == sum(int(nbytes[s]) for s in set(shard))
    live = [
        {s for s in set(shard) if shard.index(s) <= t <= len(shard) - 1 - shard[::-1].index(s)}
        for t in range(len(shard))
    ]
    assert cost["shards_in_flight"] == max((len(x) for x in live), default=0)
    assert cost["bytes_in_flight"] == max((sum(int(nbytes[s]) for s in x) for x in live), default=0)


def test_partition_of_fewer_samples_than_ranks() -> None:
    shares = [partition(np.arange(2), r, 5, drop_last=False) for r in range(5)]
    assert [len(s) for s in shares] == [1] * 5
    assert set(np.concatenate(shares).tolist()) == {0, 1}
    assert all(len(partition(np.arange(2), r, 5, drop_last=True)) == 0 for r in range(5))


@pytest.mark.parametrize("bad", [[1, 2], [0, 3, 3], [[0, 1]], []])
def test_bad_layouts_are_refused(bad) -> None:
    with pytest.raises(OptionError, match="strictly increases"):
        check_bounds(bad)
