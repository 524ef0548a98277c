"""What a cache holds on the node, kept within its capacity.

The space lock (``lock``, an flock) orders stores and evictions across the node; ``space`` is a
shared upper bound of the bytes in use, so that a store below capacity needs no scan;
``generation`` counts removals, so that a process knows when to look again at what it holds.
"""

from __future__ import annotations

import contextlib
import fcntl
import mmap
import os
import shutil
import struct
from collections.abc import Callable, Collection, Iterator

from dataplane.cache._files import open_file, pid_alive
from dataplane.cache.plans import Plans
from dataplane.cache.policy import NEVER, choose_victims

#: Read positions beyond the reported one that a shard fetched now is taken to serve (its
#: readers hold it in memory) when deciding whether to keep it.
IN_FLIGHT = 32
UNKNOWN = -1  # the space bound before the first scan


def _shared_int(path: str, initial: int) -> mmap.mmap:
    fd = open_file(path, os.O_RDWR | os.O_CREAT)
    try:
        if os.fstat(fd).st_size < 8:  # new (or from an older version)
            os.pwrite(fd, struct.pack("<q", initial), 0)
        return mmap.mmap(fd, 8)
    finally:
        os.close(fd)


class Space:
    """One process's view of the node's space accounting for the cache at ``path``."""

    def __init__(self, path: str, capacity: int, plans: Plans) -> None:
        self.path, self.capacity, self.plans = path, capacity, plans
        self._bound: mmap.mmap | None = None
        self._gen: mmap.mmap | None = None
        self._swept = False

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the node's space lock (the first time, sweep what dead processes left)."""
        fd = open_file(os.path.join(self.path, "lock"), os.O_RDWR | os.O_CREAT)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            if not self._swept:
                self._sweep()
            yield
        finally:
            os.close(fd)  # releases the flock

    def _sweep(self) -> None:
        """Remove what killed processes left: temporary entries, plans, nothing live."""
        self._swept = True
        for name in os.listdir(os.path.join(self.path, "tmp")):
            parts = name.split(".")
            if len(parts) == 3 and parts[1].isdigit() and not pid_alive(int(parts[1])):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(self.path, "tmp", name))
        self.plans.sweep()
        homes = os.path.join(self.path, "homes")
        with contextlib.suppress(FileNotFoundError):
            for job in os.listdir(homes):
                if not (job.isdigit() and pid_alive(int(job))):  # that job has ended
                    shutil.rmtree(os.path.join(homes, job), ignore_errors=True)

    def generation(self) -> int:
        """A node-wide counter that every removal of an entry bumps."""
        if self._gen is None:
            self._gen = _shared_int(os.path.join(self.path, "generation"), 0)
        return struct.unpack_from("<q", self._gen, 0)[0]

    def removed(self) -> None:
        """Record that entries went away (call under the space lock)."""
        gen = self.generation()
        assert self._gen is not None
        struct.pack_into("<q", self._gen, 0, gen + 1)

    def _bound_map(self) -> mmap.mmap:
        """The node's upper bound of the bytes in use.

        NOTE: only stores add to it (under the space lock) and every scan of the directory
        sets it to the exact figure, so removals elsewhere (eviction by another process, a
        corrupt entry, ``clear``) leave it an upper bound. While it says an entry fits, a store
        needs no scan: without it each store stat()ed every entry, O(entries) per store.
        """
        if self._bound is None:
            self._bound = _shared_int(os.path.join(self.path, "space"), UNKNOWN)
        return self._bound

    def forget(self) -> None:
        """Everything was removed (call under the lock): the next store scans."""
        struct.pack_into("<q", self._bound_map(), 0, UNKNOWN)
        self.removed()

    def make_room(
        self, key: str, size: int, keep: Collection[str], evict: Callable[[str], bool]
    ) -> bool:
        """Evict (``evict(name)``: whether it removed it) until ``size`` more bytes fit; False
        when the newcomer is the one to drop (every entry it would displace is needed sooner).
        Call under the space lock."""
        bound = self._bound_map()
        (upper,) = struct.unpack_from("<q", bound, 0)
        if 0 <= upper and upper + size <= self.capacity:
            struct.pack_into("<q", bound, 0, upper + size)
            return True
        entries, used, orphans = self._scan()
        if used + size <= self.capacity:
            struct.pack_into("<q", bound, 0, used + size)
            return True
        plans = self.plans.live()

        def future(k: str, ahead: int = 0) -> int:
            return min((p.next_use(k, pos + ahead) for p, pos in plans), default=NEVER)

        # The newcomer is being read now, for the positions in flight: what counts is its use
        # after those.
        victims = choose_victims(
            entries,
            used + size - self.capacity,
            keep,
            future if plans else None,
            future(key, IN_FLIGHT) if plans else NEVER,
            held_for_peers(self.path),
        )
        for name, nbytes in victims:
            used -= nbytes  # also when another process removed it meanwhile
            if evict(name):
                self.removed()
        for name in orphans:  # records of entries that are gone
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(self.path, "seen", name))
        fits = used + size <= self.capacity
        struct.pack_into("<q", bound, 0, used + size if fits else used)
        return fits

    def _scan(self) -> tuple[list[tuple[str, int, int]], int, list[str]]:
        """(entries as (name, bytes, last use), bytes in use, records without an entry)."""
        last_use = {}
        with os.scandir(os.path.join(self.path, "seen")) as it:
            for e in it:
                with contextlib.suppress(FileNotFoundError):
                    last_use[e.name] = e.stat(follow_symlinks=False).st_mtime_ns
        found, used = scan(self.path)
        entries = [(n, size, max(mtime, last_use.pop(n, 0))) for n, size, mtime in found]
        return entries, used, list(last_use)

    def close(self, mine: bool) -> None:
        for m in (self._bound, self._gen):
            if m is not None and mine:
                m.close()
        self._bound = self._gen = None


def held_for_peers(path: str) -> set[str]:
    """Entries this node is home to for the cooperating nodes of jobs still running
    (``homes/<server pid>/``)."""
    out: set[str] = set()
    homes = os.path.join(path, "homes")
    with contextlib.suppress(FileNotFoundError):
        for job in os.listdir(homes):
            if job.isdigit() and pid_alive(int(job)):
                with contextlib.suppress(FileNotFoundError, NotADirectoryError):
                    out.update(os.listdir(os.path.join(homes, job)))
    return out


def scan(path: str) -> tuple[list[tuple[str, int, int]], int]:
    """(entries as (name, bytes, mtime), bytes in use counting entries being written).

    NOTE: writers rename ``tmp/`` files into ``entries/`` without the space lock, so ``tmp/`` is
    listed first: an entry renamed during the scan is then seen in one listing or both (counted
    once, by inode), never in neither, which undercounted and let stores exceed the capacity.
    A file being written counts its allocated blocks (fallocated ahead of its bytes).
    """
    pending: set[int] = set()
    used = 0
    with os.scandir(os.path.join(path, "tmp")) as it:
        for e in it:
            with contextlib.suppress(FileNotFoundError):
                st = e.stat(follow_symlinks=False)
                pending.add(st.st_ino)
                used += max(st.st_size, st.st_blocks * 512)
    entries = []
    with os.scandir(os.path.join(path, "entries")) as it:
        for e in it:
            with contextlib.suppress(FileNotFoundError):
                st = e.stat(follow_symlinks=False)
                if st.st_ino not in pending:
                    used += st.st_size
                entries.append((e.name, st.st_size, st.st_mtime_ns))
    return entries, used
