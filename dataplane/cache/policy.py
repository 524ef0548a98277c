"""Eviction by future use: pure functions over a plan (the order in which shards will be used).

A *plan* is ``uses``: the shard (an index into the plan's keys) each future read position needs.
``next_use`` answers "when is this shard needed next after position p"; :func:`belady_reads` is
the minimum number of shard reads any cache of a given capacity needs for a sequence, which is
what the cache's own figure is compared with.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Collection

import numpy as np

__all__ = ["NEVER", "Plan", "batched", "belady_reads", "choose_victims"]

NEVER = np.iinfo(np.int64).max


class Plan:
    """The positions at which each shard of a plan is used, for fast next-use queries."""

    def __init__(self, keys: list[str], uses: np.ndarray) -> None:
        self.keys = keys
        self.uses = np.asarray(uses, dtype=np.int64)
        order = np.argsort(self.uses, kind="stable")
        self._positions = order  # positions sorted by shard, then by position
        counts = np.bincount(self.uses, minlength=len(keys))
        self._starts = np.concatenate(([0], np.cumsum(counts)))
        self.index = {k: i for i, k in enumerate(keys)}

    def __len__(self) -> int:
        return len(self.uses)

    def next_use(self, key: str, position: int) -> int:
        """The first position >= ``position`` that needs ``key``, or NEVER."""
        s = self.index.get(key)
        if s is None:
            return NEVER
        pos = self._positions[self._starts[s] : self._starts[s + 1]]
        i = int(np.searchsorted(pos, position))
        return int(pos[i]) if i < len(pos) else NEVER

    def upcoming(self, position: int, horizon: int) -> list[int]:
        """Shards needed in positions ``position .. position + horizon``, in order of next use."""
        window = self.uses[position : position + horizon]
        shards, first = np.unique(window, return_index=True)
        out: list[int] = shards[np.argsort(first)].tolist()
        return out


def choose_victims(
    entries: list[tuple[str, int, int]],
    need: int,
    keep: Collection[str] = (),
    next_use: Callable[[str], int] | None = None,
    mine: int = NEVER,
    homed: Collection[str] = (),
) -> list[tuple[str, int]]:
    """Which ``(name, bytes)`` of ``entries`` (name, bytes, last use) to evict, in order, to
    free ``need`` bytes for a newcomer.

    Without plans (``next_use`` None) the least recently used go first. With plans, entries no
    plan needs go first (least recently used first), then the one needed furthest ahead; an
    entry needed sooner than the newcomer (``mine``) stops the choice: then less than ``need``
    is freed and the newcomer is the one not to keep. Entries in ``keep`` are never chosen.
    Entries in ``homed`` (other nodes get them from here; elsewhere they cost a read of the
    source) go after the others that no plan needs (without plans: after all others); an
    entry a plan needs goes after both, whether homed or not, so that the node's own working
    set is kept as Belady's rule keeps it.
    """
    if need <= 0:
        return []
    uses = {e[0]: NEVER if next_use is None else next_use(e[0]) for e in entries}
    if next_use is None:
        ranked = sorted(entries, key=lambda e: (e[0] in homed, e[2]))
    else:

        def rank(e: tuple[str, int, int]) -> tuple[int, int, int]:
            tier = 2 if uses[e[0]] != NEVER else int(e[0] in homed)
            return tier, -uses[e[0]], e[2]

        ranked = sorted(entries, key=rank)
    out: list[tuple[str, int]] = []
    freed = 0
    for name, nbytes, _ in ranked:
        if freed >= need:
            break
        if name in keep:
            continue
        if uses[name] != NEVER and uses[name] < mine:
            break
        out.append((name, nbytes))
        freed += nbytes
    return out


def belady_reads(uses: np.ndarray, sizes: np.ndarray, capacity: int) -> tuple[int, int]:
    """(reads, bytes) that reading the shards ``uses`` needs with a cache of ``capacity`` bytes
    that evicts the shard needed furthest in the future and does not keep a shard used later
    than everything it would have to evict (Belady's MIN, exact for equal sizes)."""
    uses = np.asarray(uses, dtype=np.int64)
    n = len(uses)
    nxt = np.full(n, NEVER, dtype=np.int64)
    last: dict[int, int] = {}
    for p in range(n - 1, -1, -1):
        s = int(uses[p])
        nxt[p] = last.get(s, NEVER)
        last[s] = p
    held: dict[int, int] = {}  # shard -> its next use
    heap: list[tuple[int, int]] = []  # (-next use, shard), lazily invalidated
    used = 0
    reads = nbytes = 0
    for p in range(n):
        s = int(uses[p])
        if s in held:
            held[s] = int(nxt[p])
            heapq.heappush(heap, (-held[s], s))
            continue
        reads += 1
        nbytes += int(sizes[s])
        if sizes[s] > capacity or nxt[p] == NEVER:
            continue  # read, used, never kept
        while used + sizes[s] > capacity and heap:
            neg, victim = heap[0]
            if victim not in held or held[victim] != -neg:
                heapq.heappop(heap)
                continue
            if -neg < nxt[p]:
                break  # everything held is needed before this shard: do not keep it
            heapq.heappop(heap)
            used -= int(sizes[victim])
            del held[victim]
        if used + sizes[s] <= capacity:
            held[s] = int(nxt[p])
            used += int(sizes[s])
            heapq.heappush(heap, (-held[s], s))
    return reads, nbytes


def batched(uses: np.ndarray, batch: int) -> np.ndarray:
    """The shards a reader of ``uses`` fetches, ``batch`` positions at a time: each shard once
    per batch, in order of first use within it (a batch's samples of one shard come from one
    fetch). What :func:`belady_reads` should be given to compare with such a reader."""
    uses = np.asarray(uses, dtype=np.int64)
    out = []
    for b in range(0, len(uses), batch):
        chunk = uses[b : b + batch]
        shards, first = np.unique(chunk, return_index=True)
        out.append(shards[np.argsort(first)])
    return np.concatenate(out) if out else np.zeros(0, np.int64)
