"""The clairvoyant prefetcher: fetch shards into a ``NodeCache`` in order of next use.

It runs in its own process: h5py serialises every call in a process on one lock, and a thread
beside the training loop would also compete for its GIL. The consumer publishes its plan (the
epoch's order as shards, see :meth:`NodeCache.set_plan`) and its position; the prefetcher keeps
the shards needed next cached, a window of bytes ahead. The window starts at a few shards and
doubles whenever the consumer reaches a shard that is not there yet, up to half the cache.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import queue
import threading
import time
import warnings
from typing import Any, Protocol

import numpy as np

from dataplane.cache.store import NodeCache

__all__ = ["Prefetcher", "ShardSource"]

_IDLE = 0.01  # seconds between looks at the consumer's position when nothing is to fetch


class ShardSource(Protocol):
    """What the prefetcher fetches from (a dataset with a cache): picklable."""

    cache: NodeCache | None

    def shard_nbytes(self) -> np.ndarray: ...

    def prefetch_shard(self, shard: int, key: str) -> None: ...


class _Chooser:
    """Hands each fetch thread the next shard to fetch: the first in order of next use that is
    neither cached nor being fetched, within the window ahead of the consumer."""

    def __init__(self, source: ShardSource, cache: NodeCache, window: int) -> None:
        self.lock = threading.Lock()
        self.source = source
        self.cache = cache
        self.sizes = source.shard_nbytes()
        self.plan: str | None = None
        self.window = window
        self.limit = max(window, cache.capacity // 2)
        self.inflight: set[str] = set()

    def take(self, item: Any) -> None:
        with self.lock:
            if isinstance(item, str):
                self.plan = item
            else:
                self.source = item
                self.sizes = item.shard_nbytes()

    def pick(self) -> tuple[ShardSource, int, str] | None:
        with self.lock:
            got = self.cache.load_plan(self.plan) if self.plan else None
            if got is None or got[1] >= len(got[0]):
                return None
            plan, position = got
            ahead = 0
            for n, shard in enumerate(plan.upcoming(position, len(plan) - position)):
                ahead += int(self.sizes[shard]) if shard < len(self.sizes) else 0
                if ahead > self.window and n > 0:
                    return None
                key = plan.keys[shard]
                if key in self.inflight or key in self.cache:
                    continue
                if n == 0 and self.window < self.limit:
                    # The consumer is at a shard that is not there yet: look further ahead.
                    self.window = min(self.limit, self.window * 2)
                self.inflight.add(key)
                return self.source, shard, key
        return None

    def done(self, key: str) -> None:
        with self.lock:
            self.inflight.discard(key)


def _fetch_loop(chooser: _Chooser, stop: threading.Event) -> None:
    while not stop.is_set():
        got = chooser.pick()
        if got is None:
            time.sleep(_IDLE)
            continue
        source, shard, key = got
        try:
            source.prefetch_shard(shard, key)
        except Exception as exc:  # the readers fetch what we could not; say why once
            warnings.warn(f"prefetch of shard {shard} failed: {exc}", RuntimeWarning, stacklevel=1)
        finally:
            chooser.done(key)


def _run(
    source: ShardSource, plans: Any, stop: Any, parent: int, window: int, threads: int
) -> None:
    cache = source.cache
    assert cache is not None
    chooser = _Chooser(source, cache, window)
    halt = threading.Event()
    # Several fetches in flight: while one waits for the source (h5py holds its lock then),
    # another writes its shard into the cache.
    pool = [
        threading.Thread(target=_fetch_loop, args=(chooser, halt), daemon=True)
        for _ in range(threads)
    ]
    for t in pool:
        t.start()
    try:
        while not stop.is_set() and os.getppid() == parent:
            with contextlib.suppress(queue.Empty):
                while True:  # the newest plan (and snapshot of the source) wins
                    chooser.take(plans.get(timeout=_IDLE * 5))
            cache.flush_stats()
    finally:
        halt.set()
        for t in pool:
            t.join(30)
        cache.close()


class Prefetcher:
    """A process that keeps the next shards of the current plan in the cache."""

    def __init__(self, source: ShardSource, window: int, threads: int = 2) -> None:
        ctx = multiprocessing.get_context("spawn")
        self._plans = ctx.Queue()
        self._stop = ctx.Event()
        self._proc = ctx.Process(
            target=_run,
            args=(source, self._plans, self._stop, os.getpid(), int(window), int(threads)),
            name="dataplane-prefetch",
            daemon=True,
        )
        self._proc.start()

    @property
    def alive(self) -> bool:
        return self._proc.is_alive()

    @property
    def pid(self) -> int | None:
        return self._proc.pid

    def follow(self, plan: str) -> None:
        """Prefetch for ``plan`` from now on."""
        self._plans.put(plan)

    def update(self, source: ShardSource) -> None:
        """Read from this source from now on (a newer snapshot of growing data)."""
        self._plans.put(source)

    def close(self) -> None:
        self._stop.set()
        self._proc.join(10)
        if self._proc.is_alive():
            self._proc.kill()
            self._proc.join()
        self._plans.close()
