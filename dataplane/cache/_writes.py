"""How entries come into a cache: from the source through ``produce()``, or received whole from
the home node of a cooperating cache; either way into a reserved temporary file, renamed into
place only when complete and sound."""

from __future__ import annotations

import contextlib
import os
import secrets
import warnings
from collections.abc import Callable, Collection

import numpy as np

from dataplane.cache import _entry as entry
from dataplane.cache._files import CacheWarning, open_file
from dataplane.cache._maps import Entries
from dataplane.cache.peers import PeerError, Peers
from dataplane.cache.space import Space

Arrays = dict[str, np.ndarray]


class Writes:
    """One process's stores into the cache at ``path`` (``count``: its counters; ``evict``,
    ``degrade``, ``map``: the cache's eviction, failed-write handling and mapping;
    ``peers()``: the cooperating nodes, or None)."""

    def __init__(
        self,
        path: str,
        capacity: int,
        entries: Entries,
        space: Space,
        count: Callable[[str, float], None],
        evict: Callable[[str], bool],
        degrade: Callable[[OSError], None],
        map: Callable[[str], Arrays | None],
        peers: Callable[[], Peers | None],
    ) -> None:
        self.path, self.capacity, self.entries, self.space = path, capacity, entries, space
        self._count, self._evict, self._degrade, self._map = count, evict, degrade, map
        self._peers = peers

    def fill(
        self,
        key: str,
        produce: Callable[[], Arrays],
        keep: Collection[str] = (),
        home: int | None = None,
    ) -> Arrays:
        """Entry ``key`` from its home node or ``produce()``, stored (call with its lock
        held)."""
        peers = self._peers()
        if peers is not None and home is not None and home != peers.node:
            got = self.from_peer(peers, key, int(home), keep)
            if got is not None:
                return got
        arrays = {n: np.ascontiguousarray(a) for n, a in produce().items()}
        self._count("misses", 1)
        self._count("bytes_from_source", sum(a.nbytes for a in arrays.values()))
        try:
            if self.store(key, arrays, keep) and peers is not None and home == peers.node:
                self.entries.held_for_peers(key, peers.server)
        except OSError as exc:
            self._degrade(exc)
        return arrays

    def from_peer(self, peers: Peers, key: str, home: int, keep: Collection[str]) -> Arrays | None:
        """Entry ``key`` received from node ``home`` and stored, or None (not held there, no
        room, or the peer failed: counted, and the caller reads the source)."""
        try:
            got = peers.get(home, key, self.capacity, lambda size: self.reserve(key, size, keep))
        except PeerError as exc:
            self._count("peer_failures", 1)
            warnings.warn(f"{exc}; reading the source instead", CacheWarning, stacklevel=5)
            return None
        except OSError as exc:
            self._degrade(exc)
            return None
        if got is None:
            self._count("peer_absent", 1)
            return None
        tmp, size = got
        try:
            sound = entry.Mapped(tmp).payload_matches()
        except entry.Damaged:
            sound = False
        if not sound:
            os.unlink(tmp)
            self._count("corrupt", 1)
            warnings.warn(
                f"entry {key} from node {peers.names[home]!r} does not match its checksum; "
                f"reading the source instead",
                CacheWarning,
                stacklevel=5,
            )
            return None
        self.install(tmp, key)
        self._count("peer_hits", 1)
        self._count("bytes_from_peers", size)
        return self._map(key)

    def reserve(self, key: str, size: int, keep: Collection[str] = ()) -> tuple[int, str] | None:
        """A new temporary file of ``size`` bytes for entry ``key``, its space reserved
        within the capacity (evicting if need be); None where it does not fit."""
        self.entries.settle()
        if size > self.capacity:
            self._count("bypassed", 1)
            return None
        tmp = os.path.join(self.path, "tmp", f"{key}.{os.getpid()}.{secrets.token_hex(4)}")
        with self.space.locked():
            if not self.space.make_room(key, size, keep, self._evict):
                self._count("bypassed", 1)
                return None
            fd = open_file(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL)
            try:
                # Reserve every block now: a full disk fails here, not later as a SIGBUS.
                os.posix_fallocate(fd, 0, size)
            except BaseException:
                os.close(fd)
                os.unlink(tmp)
                raise
        return fd, tmp

    def install(self, tmp: str, key: str) -> None:
        """Rename a complete, sound temporary entry into place and record it as checked."""
        try:
            os.rename(tmp, self.entries.file(key))
            self.entries.checks.written(key, os.stat(self.entries.file(key)))
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise

    def store(self, key: str, arrays: Arrays, keep: Collection[str] = ()) -> bool:
        """Store ``arrays`` as entry ``key``; whether it was (False: it does not fit)."""
        got = self.reserve(key, entry.layout(arrays)[0], keep)
        if got is None:
            return False
        fd, tmp = got
        try:
            entry.write(fd, arrays)  # sound: its checksum is computed from the bytes written
        except BaseException:
            os.close(fd)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        os.close(fd)
        self.install(tmp, key)
        return True
