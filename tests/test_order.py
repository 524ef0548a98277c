"""Sample orders are pure functions: permutations, disjoint covering rank shares, reproducible."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dataplane.cache.policy import NEVER, choose_victims
from dataplane.errors import OptionError
from dataplane.loaders._snapshot import shard_layout
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


# -- shard layouts (dataplane.loaders._snapshot.shard_layout) ----------------------------------


@st.composite
def steps(draw) -> tuple[list[int], list[int]]:
    """Per step: rows (0 allowed) and bytes (rows times a row size fixed for the dataset)."""
    row = draw(st.integers(1, 64))
    counts = draw(st.lists(st.integers(0, 50), min_size=0, max_size=25))
    return counts, [c * row for c in counts]


@given(steps(), st.integers(1, 2000), st.sampled_from(["row", "step"]))
def test_shard_layout_covers_every_sample_once_within_its_budget(data, budget, sample) -> None:
    counts, nbytes = data
    if sample == "step":
        counts = [1] * len(counts)
    bounds, sizes = shard_layout(counts, nbytes, budget, sample)
    offsets = np.concatenate(([0], np.cumsum(counts))).astype(np.int64)
    assert bounds[0] == 0 and bounds[-1] == offsets[-1]
    assert np.all(np.diff(bounds) > 0) or offsets[-1] == 0
    assert len(sizes) == len(bounds) - 1 and int(sizes.sum()) == sum(nbytes)
    for a, b, size in zip(bounds[:-1], bounds[1:], sizes):
        first = int(np.searchsorted(offsets, a, side="right") - 1)
        last = int(np.searchsorted(offsets, b - 1, side="right") - 1)
        if first != last:
            # Several steps share a shard only whole, and only up to the budget.
            assert offsets[first] == a and offsets[last + 1] == b
            assert size <= budget or sample == "step" and b - a == 1
        elif sample == "row" and nbytes[first] >= budget:
            # A big step is cut into runs of at most the budget (one row if a row is bigger).
            assert size <= max(budget, nbytes[first] // counts[first])


@given(steps(), st.integers(1, 2000), st.sampled_from(["row", "step"]), st.integers(0, 25))
def test_appending_steps_changes_at_most_the_last_shard(data, budget, sample, cut) -> None:
    """What resume relies on: the shards of a prefix of the steps stay shards of the whole,
    except the prefix's last one (a pack of small steps can grow)."""
    counts, nbytes = data
    if sample == "step":
        counts = [1] * len(counts)
    cut = min(cut, len(counts))
    whole, _ = shard_layout(counts, nbytes, budget, sample)
    prefix, _ = shard_layout(counts[:cut], nbytes[:cut], budget, sample)
    assert set(prefix[:-1].tolist()) <= set(whole.tolist())


# -- eviction (dataplane.cache.policy.choose_victims) ------------------------------------------
@st.composite
def cached(draw) -> tuple[list[tuple[str, int, int]], dict[str, int]]:
    """Entries (name, bytes, last use) and, per entry, its next use in a plan (or NEVER)."""
    n = draw(st.integers(0, 20))
    entries = [(f"k{i}", draw(st.integers(1, 100)), draw(st.integers(0, 1000))) for i in range(n)]
    uses = {name: draw(st.one_of(st.just(NEVER), st.integers(0, 50))) for name, _, _ in entries}
    return entries, uses


@given(cached(), st.integers(-10, 800), st.booleans(), st.integers(0, 60), st.data())
def test_victims_free_enough_and_spare_what_is_needed_sooner(
    data, need, planned, mine, draw
) -> None:
    entries, uses = data
    names_ = [e[0] for e in entries] or ["-"]
    keep = set(draw.draw(st.lists(st.sampled_from(names_))))
    homed = set(draw.draw(st.lists(st.sampled_from(names_))))
    next_use = uses.__getitem__ if planned else None
    victims = choose_victims(entries, need, keep, next_use, mine if planned else NEVER, homed)
    names = [v for v, _ in victims]
    freed = sum(b for _, b in victims)
    assert len(set(names)) == len(names) and not set(names) & keep
    if need <= 0:
        assert victims == []
        return
    # No more than needed: without the last victim, it would not have been enough.
    assert not victims or freed - victims[-1][1] < need
    candidates = [e for e in entries if e[0] not in keep]
    if not planned:
        # Entries other nodes get from here go last: one is chosen only once no other is left.
        chosen_homed = [n for n in names if n in homed]
        if chosen_homed:
            assert names[-len(chosen_homed) :] == chosen_homed
            assert {e[0] for e in candidates if e[0] not in homed} <= set(names)
    else:
        # Tiers: what no plan needs and no node gets from here; then what no plan needs but
        # other nodes get from here; then what a plan needs (Belady's order), homed or not.
        def tier(name: str) -> int:
            return 2 if uses[name] != NEVER else int(name in homed)

        tiers = [tier(n) for n in names]
        assert tiers == sorted(tiers)
        for n in names:
            assert {e[0] for e in candidates if tier(e[0]) < tier(n)} <= set(names)
    if not planned:
        # Least recently used first, and enough whenever the others hold enough.
        order = sorted(candidates, key=lambda e: (e[0] in homed, e[2]))
        assert names == [e[0] for e in order[: len(names)]]
        assert freed >= need or freed == sum(e[1] for e in candidates)
        return
    for name in names:
        assert uses[name] == NEVER or uses[name] >= mine
    if freed < need:
        # Stopped short only because what is left is needed sooner than the newcomer (or by
        # other nodes, behind one that is), or nothing is left.
        left = [e for e in candidates if e[0] not in names]
        sooner = [e for e in left if uses[e[0]] != NEVER and uses[e[0]] < mine]
        assert all(e in sooner or e[0] in homed for e in left)
        assert sooner or not left


class _Layout:
    """A dataset as a sampler sees it: a shard layout, and a plan that records advances."""

    def __init__(self, bounds: np.ndarray) -> None:
        self.bounds = bounds
        self.advances: list[int] = []

    def shard_bounds(self, samples: int | None = None) -> np.ndarray:
        assert samples in (None, int(self.bounds[-1]))
        return self.bounds

    def plan_epoch(self, order: np.ndarray, plan_id: str):
        return self.advances.append


@given(
    layouts(),
    st.integers(0, 2**32),
    blocks,
    st.integers(1, 40),
    st.booleans(),
    st.integers(1, 3),
    st.floats(0, 1),
)
def test_sampler_batches_are_what_batchsampler_makes_of_it(
    bounds, seed, block, size, drop_last, world, resume_at
) -> None:
    """``ShuffleSampler.batches`` (the batch path's order) yields BatchSampler's batches, with
    the same positions for resume, from the start or a restored state, and tells the plan
    only positions the per-index order also tells it."""
    from torch.utils.data import BatchSampler

    from dataplane.loaders import ShuffleSampler

    def make():
        data = _Layout(bounds)
        return data, ShuffleSampler(data, seed=seed, block=block, rank=world - 1, world=world)

    d1, by_index = make()
    d2, by_batch = make()
    by_index.set_epoch(3)
    by_batch.set_epoch(3)
    batches, ahead = [], []
    for b in by_batch.batches(size, drop_last):
        batches.append(b)
        ahead.append(by_batch.upcoming(2 * size + 1).tolist())
    assert batches == list(BatchSampler(by_index, size, drop_last))
    assert by_batch.state_dict()["position"] == by_index.state_dict()["position"]
    _check_upcoming(batches, ahead, 2 * size + 1, by_batch)
    assert set(d2.advances) <= set(d1.advances) and d2.advances == sorted(d2.advances)
    assert d2.advances[-1] == d1.advances[-1] == len(by_index)
    # Resume mid-epoch from a state either one saved.
    position = int(resume_at * len(by_index))
    state = by_index.state_dict(samples_seen=position)
    _, again_index = make()
    _, again_batch = make()
    again_index.load_state_dict(state)
    again_batch.load_state_dict(state)
    batches, ahead = [], []
    for b in again_batch.batches(size, drop_last):
        batches.append(b)
        ahead.append(again_batch.upcoming(size).tolist())
    assert batches == list(BatchSampler(again_index, size, drop_last))
    _check_upcoming(batches, ahead, size, again_batch)


def _check_upcoming(batches, ahead, n, sampler) -> None:
    """After each batch, ``upcoming(n)`` named the indices of the batches that followed, n
    of them where there were (past the last, only the dropped tail); outside a pass none."""
    for i, nxt in enumerate(ahead):
        rest = [j for b in batches[i + 1 :] for j in b]
        assert nxt[: len(rest)] == rest[: len(nxt)]
        if len(rest) >= n:
            assert len(nxt) == n
    assert not len(sampler.upcoming(n))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 11), max_size=200), st.integers(12, 14))
def test_first_uses_are_the_shards_in_order_of_first_read(uses, nkeys) -> None:
    """What the map-ahead thread maps, in which order: each shard read once, at the position
    of its first read, earliest first (a plain scan says so)."""
    from dataplane.loaders._ahead import first_uses

    keys = [f"k{i}" for i in range(nkeys)]
    got_keys, got_first = first_uses(keys, np.asarray(uses, dtype=np.int64))
    seen: dict[int, int] = {}
    for p, s in enumerate(uses):
        seen.setdefault(s, p)
    assert got_keys == [keys[s] for s in seen]
    assert got_first.tolist() == list(seen.values())
