"""A cached dataset's epochs: its order published to the cache, its prefetch process."""

from __future__ import annotations

import json
import os
import warnings
import weakref
from collections.abc import Callable
from typing import Any

import numpy as np

from dataplane.cache import NodeCache, Prefetcher
from dataplane.errors import OptionError
from dataplane.loaders._ahead import MapAhead
from dataplane.loaders._shards import ShardSource

#: Prefetch processes of ``prefetch=True``. Opening an HDF5 file costs dataplane 2 ms of a
#: process's CPU, and two processes read 400 small files cold in 1.04 s against 1.56 s; but a
#: cold epoch over them on two cores was no faster with two (10.9k against 10.6k samples/s):
#: more are for nodes with cores to spare or a filesystem slow to open files (``prefetch=N``).
PROCESSES = 1


def prefetch_processes(prefetch: Any) -> int:
    """The number of prefetch processes ``prefetch`` (a bool or a count) asks for."""
    if isinstance(prefetch, bool):
        return PROCESSES if prefetch else 0
    if not isinstance(prefetch, (int, np.integer)) or prefetch < 0:
        raise OptionError(
            f"prefetch must be True, False or a number of processes (>= 0), got {prefetch!r}"
        )
    return int(prefetch)


class Epochs:
    """The prefetch process of one dataset (started on first use, given the new source when
    the snapshot grows), the plan this process last published to the cache, and the thread
    that maps the plan's shards ahead once this process reads them itself. A pickled or forked
    copy (a DataLoader worker's) has none of them: they belong to the process that made them."""

    def __init__(self, cache: NodeCache | None, processes: int, window: int) -> None:
        self.cache = cache
        self.processes = processes
        self.enabled = processes > 0 and cache is not None
        self.window = int(window)
        self.prefetcher: Prefetcher | None = None
        self._spec: str | None = None  # what the prefetch process reads now
        self._plan: str | None = None
        self._ahead: MapAhead | None = None
        # The last plan's (keys, uses, publishing pid) until this process reads, and the
        # sampler's position in it.
        self._next: tuple[list[str], np.ndarray, int] | None = None
        self._position = 0

    def start(self, source: Callable[[], ShardSource], update: bool) -> Prefetcher | None:
        """The prefetch process, started if it is not running; with ``update``, told of a
        new snapshot."""
        if not self.enabled:
            return None
        try:
            src = source()
            spec = json.dumps(src.spec(), sort_keys=True)
            if self.prefetcher is None or not self.prefetcher.alive:
                if self.prefetcher is not None:
                    self.prefetcher.close()  # one of its processes died: start them anew
                self.prefetcher = Prefetcher(src, self.window, processes=self.processes)
                self._spec = spec
                weakref.finalize(self, self.prefetcher.close)
            elif update and spec != self._spec:
                # Only a new snapshot (grown data) is a new source: the prefetch process
                # opens it anew, and re-sending the same one every epoch leaked a file
                # handle per epoch there (found by the soak: 29 -> 101 fds in 20 epochs).
                self.prefetcher.update(src)
                self._spec = spec
        except TypeError as exc:  # options that JSON cannot carry to the prefetch process
            self.enabled = False
            warnings.warn(
                f"prefetch is off for {source().url}: its options cannot be passed to the "
                f"prefetch process ({exc}); give JSON-safe options to prefetch",
                RuntimeWarning,
                stacklevel=4,
            )
            return None
        return self.prefetcher

    def plan(
        self,
        plan_id: str,
        keys: list[str],
        uses: np.ndarray,
        source: Callable[[], ShardSource],
    ) -> Callable[[int], None]:
        """Publish an epoch's shard ``uses`` (for eviction by future use) and have the
        prefetcher follow them. Returns the function that reports the reader's position."""
        cache = self.cache
        assert cache is not None
        if self._plan is not None:  # the previous epoch's future is the past now
            cache.drop_plan(self._plan)
        plan = self._plan = cache.set_plan(plan_id, keys, uses)
        prefetcher = self.start(source, update=True)
        if prefetcher is not None:
            prefetcher.follow(plan)
        self._stop_ahead()
        self._next, self._position = (keys, uses, os.getpid()), 0

        def advance(position: int) -> None:
            cache.advance(plan, position)
            self._position = position
            ahead = self._ahead
            if ahead is not None:
                ahead.at(position)

        return advance

    def reading(self) -> None:
        """This process reads from the cache: map the last plan's shards ahead of it (not
        where only workers read: their mappings are their own)."""
        nxt = self._next
        if nxt is not None and nxt[2] == os.getpid() and self.cache is not None:
            self._next = None
            self._ahead = MapAhead(self.cache, nxt[0], nxt[1], self._position, self)

    def _stop_ahead(self) -> None:
        if self._ahead is not None:
            self._ahead.stop()
            self._ahead = None

    def close(self) -> None:
        self._stop_ahead()
        self._next = None
        if self.prefetcher is not None:
            self.prefetcher.close()
            self.prefetcher = None
            self._spec = None

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["prefetcher"] = state["_spec"] = None
        state["_plan"] = None  # the publishing process's, not a copy's to drop
        state["_ahead"] = state["_next"] = None
        return state
