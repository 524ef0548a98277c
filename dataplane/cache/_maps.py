"""One process's mappings of cache entries: held while the entries are live, each entry
checked once per node, a damaged one removed."""

from __future__ import annotations

import contextlib
import os
import re
import threading
from collections import OrderedDict
from collections.abc import Callable

import numpy as np

from dataplane.cache import _entry as entry
from dataplane.cache._files import open_file, owned_dir
from dataplane.errors import DataplaneError

Arrays = dict[str, np.ndarray]
#: Mappings a process holds (page tables built once per process: an epoch over more entries
#: than this maps and faults in every entry again, a third of its time over 64 KiB rows).
HELD = 16384
#: Held mappings checked for eviction per removal seen (in turn, so that a cache evicting
#: all the time does not cost a stat of every mapping per eviction).
PRUNE_EACH = 256
_KEY_RE = re.compile(r"^[0-9a-f]{40}$")


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


class Entries:
    """The entries of one cache directory as one process maps them (:class:`Maps`), checks
    them (``entry.Checks``: once per node) and removes them with their records.

    ``count(name, value)`` is told what it did (``mapped``, ``verified``); ``removed(key,
    why, outdated)`` of each entry it removed as damaged, or as another version's."""

    def __init__(
        self,
        path: str,
        count: Callable[[str, float], None],
        removed: Callable[[str, str, bool], None],
    ) -> None:
        self.path = path
        self.maps = Maps(self.file)
        self.checks = entry.Checks(os.path.join(path, "seen"))
        self._count, self._removed = count, removed

    def file(self, key: str) -> str:
        if not _KEY_RE.match(key):
            raise DataplaneError(f"cache key {key!r} is not one NodeCache.key() made")
        return os.path.join(self.path, "entries", key)

    def map(self, key: str, gen: int, populate: bool = False) -> Arrays | None:
        """The arrays of entry ``key`` (``gen``: the cache's removal generation now), mapped
        now if not held, and checked; None if missing or damaged (removed)."""
        arrays = self.maps.live(key, gen)
        if arrays is not None:
            return arrays
        mapped = self.open(key, populate)
        if mapped is None or not self._checked(key, mapped):
            return None
        try:
            arrays = mapped.arrays()
        except entry.Damaged as exc:
            self.remove(key, str(exc))
            return None
        self._count("mapped", 1)
        with contextlib.suppress(OSError):
            # Last use, for LRU order: on the record, since the entry's own times vouch for it.
            os.utime(self.checks.record_path(key), follow_symlinks=False)
        self.maps.add(key, mapped.stat.st_ino, gen, arrays)
        return arrays

    def open(self, key: str, populate: bool = False) -> entry.Mapped | None:
        """Entry ``key`` mapped, its header checked; None if missing, or damaged (removed)."""
        try:
            return entry.Mapped(self.file(key), populate)
        except FileNotFoundError:
            return None
        except entry.Outdated as exc:
            self.remove(key, str(exc), outdated=True)
            return None
        except entry.Damaged as exc:
            self.remove(key, str(exc))
            return None

    def _checked(self, key: str, mapped: entry.Mapped) -> bool:
        """Whether the entry is sound (hashed once per node); a bad one is removed."""
        verdict = self.checks.check(key, mapped)
        if verdict == "bad":
            self.remove(key, "its checksum does not match")
            return False
        if verdict == "hashed":
            self._count("verified", 1)
        return True

    def settle(self, wait: bool = False) -> None:
        """Record the entries this process wrote once their times have settled."""
        for key in self.checks.settle(self.open, wait):
            self.remove(key, "its checksum does not match")

    def held_for_peers(self, key: str, server: int) -> None:
        """Mark entry ``key`` as one this node is home to for the job whose cache server is
        process ``server``: other nodes get it from here, so eviction takes it last while
        that job runs."""
        folder = os.path.join(self.path, "homes", str(int(server)))
        owned_dir(folder)
        os.close(open_file(os.path.join(folder, key), os.O_WRONLY | os.O_CREAT))

    def unlink(self, key: str) -> bool:
        """Remove an entry and its records; whether the entry was there."""
        records = [self.checks.record_path(key)]
        with contextlib.suppress(FileNotFoundError):
            homes = os.path.join(self.path, "homes")
            records += [os.path.join(homes, job, key) for job in os.listdir(homes)]
        for record in records:
            with contextlib.suppress(FileNotFoundError, NotADirectoryError):
                os.unlink(record)
        try:
            os.unlink(self.file(key))
        except FileNotFoundError:
            return False
        return True

    def remove(self, key: str, why: str, outdated: bool = False) -> None:
        """Remove a damaged entry (or one another version wrote), so it is fetched again."""
        self._removed(key, why, outdated)
        self.unlink(key)
        self.checks.forget(key)
        self.maps.drop(key)
