"""One process's mappings of cache entries, held while the entries are live."""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from collections.abc import Callable

import numpy as np

Arrays = dict[str, np.ndarray]
#: Mappings a process holds (page tables built once per process: an epoch over more entries
#: than this maps and faults in every entry again, a third of its time over 64 KiB rows).
HELD = 16384
#: Held mappings checked for eviction per removal seen (in turn, so that a cache evicting
#: all the time does not cost a stat of every mapping per eviction).
PRUNE_EACH = 256


class Maps:
    """Entry key -> (inode, the removal generation it was last seen live at, arrays viewing
    its mapping). An evicted entry is never served from an old mapping, so what readers hold
    through the cache stays within what its capacity allows."""

    def __init__(self, entry_path: Callable[[str], str], limit: int = HELD) -> None:
        self._path = entry_path
        self._limit = limit
        self._mutex = threading.Lock()
        self._maps: OrderedDict[str, tuple[int, int, Arrays]] = OrderedDict()
        self._gen = -1  # the generation the mappings were last checked at
        self._turn = 0  # where the next prune starts among the held mappings

    def live(self, key: str, gen: int) -> Arrays | None:
        """The arrays of ``key``'s mapping if it is still of the live entry, else None."""
        self._prune(gen)
        with self._mutex:
            got = self._maps.get(key)
        if got is None:
            return None
        if got[1] == gen:
            return got[2]  # nothing was removed since we last saw it live
        try:
            ino = os.stat(self._path(key)).st_ino
        except FileNotFoundError:
            return None
        if got[0] != ino:
            return None
        with self._mutex:
            self._maps[key] = (ino, gen, got[2])
            self._maps.move_to_end(key)
        return got[2]

    def live_many(self, keys: list[str], gen: int) -> list[Arrays | None]:
        """:meth:`live` of each key, where nothing was removed since it was last seen live
        (one look under the lock); None for the others, which :meth:`live` then checks."""
        self._prune(gen)
        out: list[Arrays | None] = []
        with self._mutex:
            for key in keys:
                got = self._maps.get(key)
                out.append(got[2] if got is not None and got[1] == gen else None)
        return out

    def add(self, key: str, ino: int, gen: int, arrays: Arrays) -> None:
        with self._mutex:
            self._maps[key] = (ino, gen, arrays)
            while len(self._maps) > self._limit:
                self._maps.popitem(last=False)  # the arrays keep their mapping alive

    def drop(self, key: str) -> None:
        with self._mutex:
            self._maps.pop(key, None)

    def clear(self) -> None:
        with self._mutex:
            self._maps.clear()
            self._gen = -1

    def _prune(self, gen: int) -> None:
        """Let go of the mappings of entries removed since the last look: an unlinked file
        keeps its disk space (and a descriptor) while it is mapped, so holding evicted
        entries would put the cache over its capacity on disk (the soak found 1 descriptor
        per epoch held this way). Up to ``PRUNE_EACH`` of them per removal, in turn; an
        entry is also checked whenever it is used."""
        with self._mutex:
            if gen == self._gen:
                return
            self._gen = gen
            held = [(k, v[0]) for k, v in self._maps.items()]
            start = self._turn % max(1, len(held))
            self._turn = start + PRUNE_EACH
        held = (held[start:] + held[:start])[:PRUNE_EACH]
        gone = []
        for k, ino in held:
            try:
                if os.stat(self._path(k)).st_ino != ino:
                    gone.append(k)
            except FileNotFoundError:
                gone.append(k)
        with self._mutex:
            for k in gone:
                self._maps.pop(k, None)  # readers' views keep their own mapping alive
