"""``NodeCache``: a directory of shard files shared by every process on a node.

Layout of ``PATH``::

    entries/<key>           one shard: header, JSON table of arrays, 64-byte aligned payload
    seen/<key>              the entry's identity when its checksum last matched (so a new
                            process need not hash it again); its mtime is the entry's last use
    tmp/<key>.<pid>.<rand>  an entry being written (space reserved up front), renamed when done
    plans/<id>.npz, .pos    a consumer's future order of shards and its position (for eviction)
    homes/<pid>/<key>       an entry this node is home to for the cooperating nodes of the job
                            whose cache server is process <pid>: evicted last while it runs
    stats/<pid>.json        each process's counters (``dataplane cache stats`` adds them up)
    looks/<hash>            what a dataset's look found of one of its files, for later jobs
                            (``dataplane.loaders._looks``)
    lock                    flock: space accounting and eviction
    space                   an upper bound of the bytes in use (8 bytes, mapped shared)
    keys.lock               byte-range locks, one slot per key hash: one fetch per shard per node

Entries are read through ``mmap`` (the page cache is the memory tier) and checked against
their checksum once per node: again only when the file changed since (its inode, size,
modification or change time differ from what ``seen/<key>`` recorded; any write, truncation
or replacement changes the change time, which no one can set back). A write that fails (full
disk, quota, I/O error) degrades to handing out what the source returned, with a warning and a
counter.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import multiprocessing.util
import os
import shutil
import time
import warnings
from collections.abc import Callable, Collection
from typing import Any

import numpy as np

from dataplane.cache._files import (
    COUNTERS,
    CacheWarning,
    Counters,
    KeyLocks,
    owned_dir,
)
from dataplane.cache._maps import Entries
from dataplane.cache._writes import Writes
from dataplane.cache.peers import Peers
from dataplane.cache.plans import Plans
from dataplane.cache.policy import Plan
from dataplane.cache.space import Space, scan
from dataplane.errors import DataplaneError, OptionError
from dataplane.model import check_seconds, parse_size

__all__ = ["CacheWarning", "NodeCache", "cache_stats", "clear_cache", "parse_size"]

_STATS_EVERY = 0.5  # seconds between writes of a process's counters
SUBDIRS = ("entries", "seen", "tmp", "plans", "stats", "looks", "homes")


class NodeCache:
    """Shards on node-local storage, shared by every process that names the same ``path``.

    Parameters
    ----------
    path
        A directory on node-local storage (created if missing).
    capacity
        Bytes its shards may take (``"40GB"``, ``"512MiB"`` or an int). Never exceeded. What
        datasets of many files keep of their looks (``looks/``) is held to 1/64 of it besides.
    lock_timeout
        Seconds to wait for another process's fetch of the same shard before fetching anyway.
    comm
        An MPI communicator (collective): the caches of all its nodes cooperate
        (``dataplane.cache.peers``): each shard is fetched from the source by one node, its
        home, and the others get it from there.
    node
        The name of this rank's node (default: the ranks that share memory,
        ``MPI_Comm_split_type(SHARED)``), for several "nodes" on one machine.
    interface
        The address this node's cache server listens on (loopback by default: name the
        interface the nodes reach each other on).
    peer_timeout, peer_wait
        Seconds a peer may take to answer each step of a transfer, and that a home may take
        to fetch a shard it does not hold yet, before the source is read instead.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        capacity: Any = "40GB",
        *,
        lock_timeout: float = 600.0,
        comm: Any = None,
        node: str | None = None,
        interface: str = "127.0.0.1",
        peer_timeout: float = 10.0,
        peer_wait: float = 30.0,
    ):
        self.path = os.path.abspath(os.fspath(path))
        self.capacity = parse_size(capacity, "a cache capacity")
        self.lock_timeout = check_seconds(lock_timeout, "lock_timeout")
        self.peers: Peers | None = None
        # Owner-only: entries hold the data of whoever runs the job. (makedirs applies its
        # mode to the last component only, so the root is made first.) The root may be a
        # link the user made; what is inside it may not.
        owned_dir(os.path.realpath(self.path))
        for sub in SUBDIRS:
            owned_dir(os.path.join(self.path, sub))
        self._reset()
        if comm is not None:
            self.peers = Peers.join(
                comm,
                self.path,
                node,
                interface,
                check_seconds(peer_timeout, "peer_timeout"),
                check_seconds(peer_wait, "peer_wait"),
            )

    # -- per-process state -------------------------------------------------------------------
    def _reset(self) -> None:
        self._pid = os.getpid()
        self._locks = KeyLocks(os.path.join(self.path, "keys.lock"), self.lock_timeout)
        self._entries = Entries(self.path, self._count, self._removed)
        self._plans = Plans(os.path.join(self.path, "plans"))
        self._space = Space(self.path, self.capacity, self._plans)
        self._counters = Counters(self.path)
        self._warned = self._warned_format = False
        self._writes = Writes(
            self.path,
            self.capacity,
            self._entries,
            self._space,
            self._count,
            self._evict,
            self._degrade,
            self._map,
            lambda: self.peers,
        )
        # At exit, and in DataLoader workers (which end through os._exit), multiprocessing's
        # finalizers still run.
        multiprocessing.util.Finalize(self, self._counters.flush, exitpriority=10)

    def _check_process(self) -> None:
        if self._pid != os.getpid():  # after fork: locks, fds and maps are the parent's
            self._reset()

    def __reduce__(self) -> tuple[Any, ...]:
        state = {"lock_timeout": self.lock_timeout, "peers": self.peers}
        return (type(self), (self.path, self.capacity), state)

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.lock_timeout = state["lock_timeout"]
        self.peers = state.get("peers")

    def get_config(self) -> dict[str, Any]:
        return {"class": type(self).__name__, "path": self.path, "capacity": self.capacity}

    def __repr__(self) -> str:
        return f"NodeCache({self.path!r}, capacity={self.capacity})"

    @property
    def stats(self) -> dict[str, float]:
        """This process's counters (``cache_stats(path)`` adds up every process's)."""
        return dict(self._counters.values)

    def require(self, nbytes: int, what: str = "a shard") -> None:
        """Raise unless an entry of ``nbytes`` fits in the capacity."""
        if nbytes > self.capacity:
            raise OptionError(
                f"cache capacity {self.capacity} bytes is below {what} ({nbytes} bytes); give "
                f"the cache at least {nbytes} bytes, or use smaller shards (shard_bytes=)"
            )

    # -- keys ---------------------------------------------------------------------------------
    @staticmethod
    def key(*parts: Any) -> str:
        """An entry key from JSON-able parts (source identity, version, what is in it)."""
        return hashlib.sha1(json.dumps(parts, sort_keys=True).encode()).hexdigest()

    @property
    def looks_path(self) -> str:
        """Where datasets keep what they found of their files, for later jobs on the node
        (see ``dataplane.loaders._looks``); emptied with the cache."""
        return os.path.join(self.path, "looks")

    def __contains__(self, key: str) -> bool:
        return os.path.exists(self._entries.file(key))

    # -- reading ------------------------------------------------------------------------------
    def get(self, key: str) -> dict[str, np.ndarray] | None:
        """The arrays of entry ``key`` (read-only views of its mapping), or None."""
        self._check_process()
        arrays = self._map(key)
        if arrays is not None:
            self._count("hits", 1)
            self._count("bytes_from_cache", sum(a.nbytes for a in arrays.values()))
        return arrays

    def get_many(self, keys: list[str]) -> list[dict[str, np.ndarray] | None]:
        """:meth:`get` of each key (None where missing), for the shards of a batch at once:
        entries this process holds mapped cost one look under one lock, not one call each."""
        self._check_process()
        got = self._entries.maps.live_many(keys, self._space.generation())
        hits = nbytes = 0
        for i, arrays in enumerate(got):
            if arrays is None:
                arrays = got[i] = self._map(keys[i])
                if arrays is None:
                    continue
            hits += 1
            for a in arrays.values():
                nbytes += a.nbytes
        if hits:
            self._count("hits", hits)
            self._count("bytes_from_cache", nbytes)
        return got

    def generation(self) -> int:
        """A node-wide count of entry removals: while it stays the same, an entry seen in the
        cache is still there."""
        self._check_process()
        return self._space.generation()

    def map_ahead(self, key: str) -> bool:
        """Map entry ``key``, if it is here and sound, with its page tables built now: for a
        thread that runs ahead of this process's reads, so that their first read of an entry
        costs neither the mapping nor its page faults. Whether it is mapped now."""
        self._check_process()
        return self._map(key, populate=True) is not None

    def _map(self, key: str, populate: bool = False) -> dict[str, np.ndarray] | None:
        return self._entries.map(key, self._space.generation(), populate)

    def _removed(self, key: str, why: str, outdated: bool) -> None:
        """Count and warn of a damaged entry, or one another version wrote, just removed (it
        is fetched again)."""
        if outdated:
            if not self._warned_format:
                self._warned_format = True
                warnings.warn(
                    f"cache {self.path} holds entries another version of dataplane wrote "
                    f"({key}: {why}); each is replaced as it is read (clear the cache to do it "
                    f"at once)",
                    CacheWarning,
                    stacklevel=6,
                )
            return
        self._count("corrupt", 1)
        warnings.warn(
            f"cache entry {key} in {self.path} is corrupt ({why}); removed and fetched again",
            CacheWarning,
            stacklevel=5,
        )

    # -- fetching -----------------------------------------------------------------------------
    def fetch(
        self,
        key: str,
        produce: Callable[[], dict[str, np.ndarray]],
        *,
        keep: Collection[str] = (),
        home: int | None = None,
    ) -> dict[str, np.ndarray]:
        """The arrays of entry ``key``: from the cache, or from ``produce()`` (called once per
        node however many processes ask at the same time) and then stored. Entries in ``keep``
        (the rest of the caller's batch) are not evicted to make room for it. ``home``: the
        node that fetches this shard from the source (cooperating caches): another node asks
        it first."""
        got = self.get(key)
        if got is not None:
            return got
        self._check_process()
        with self._locks.hold(key) as waited:
            self._count("fetch_wait_s", waited)
            got = self.get(key)  # fetched by whoever held the lock while we waited
            if got is not None:
                return got
            return self._writes.fill(key, produce, keep, home)

    def fetch_if_free(
        self,
        key: str,
        produce: Callable[[], dict[str, np.ndarray]],
        *,
        keep: Collection[str] = (),
        home: int | None = None,
    ) -> None:
        """Fetch entry ``key`` with ``produce()`` unless it is cached or another thread or
        process is fetching it now: a fetcher then takes another shard rather than wait."""
        self._check_process()
        if key in self:
            return
        with self._locks.try_hold(key) as held:
            if held and key not in self:  # not fetched by whoever held it a moment ago
                self._writes.fill(key, produce, keep, home)

    def usage(self) -> tuple[int, int]:
        """(entries, bytes) in the cache, counting entries being written."""
        return usage(self.path)

    def _evict(self, name: str) -> bool:
        if self._entries.unlink(name):
            self._count("evictions", 1)
            return True
        return False

    def _degrade(self, exc: OSError) -> None:
        self._count("degraded", 1)
        if not self._warned:
            self._warned = True
            warnings.warn(
                f"cache {self.path} cannot store entries ({exc}); reading from the source "
                f"directly (counted in stats['degraded'])",
                CacheWarning,
                stacklevel=4,
            )

    # -- plans (the future, for eviction) -----------------------------------------------------
    def set_plan(self, plan_id: str, keys: list[str], uses: np.ndarray) -> str:
        """Publish a consumer's future: ``uses[p]`` is the index in ``keys`` of the shard read
        at position ``p``. Returns the plan's file id (pass it to :meth:`advance`)."""
        self._check_process()
        return self._plans.publish(plan_id, keys, uses)

    def advance(self, plan: str, position: int) -> None:
        """Tell eviction and prefetching that the consumer of ``plan`` reached ``position``."""
        self._check_process()
        self._plans.advance(plan, position)

    def drop_plan(self, plan: str) -> None:
        """Forget a plan (its consumer moved on to another)."""
        self._check_process()
        self._plans.drop(plan)

    def load_plan(self, plan: str) -> tuple[Plan, int] | None:
        """A plan and its consumer's position (None if gone)."""
        self._check_process()
        return self._plans.load(plan)

    # -- stats --------------------------------------------------------------------------------
    def _count(self, name: str, value: float) -> None:
        c = self._counters
        c.values[name] += value
        c.dirty = True
        if time.monotonic() - c.written > _STATS_EVERY:
            c.flush()

    def flush_stats(self) -> None:
        """Write this process's counters where ``dataplane cache stats`` finds them."""
        self._counters.flush()

    def close(self) -> None:
        """Let go of this process's lock file and mappings (views already handed out keep
        theirs, with no file descriptor); the cache reopens them on next use."""
        if self._pid == os.getpid():
            self._entries.settle(wait=True)
        self.flush_stats()
        mine = self._pid == os.getpid()
        self._locks.close()
        self._entries.maps.clear()
        self._space.close(mine)
        self._plans.close(mine)

    def clear(self) -> None:
        """Remove every entry, plan and counter (entries mapped by running readers stay
        readable to them until they let go)."""
        with self._space.locked():
            for sub in SUBDIRS:
                for name in os.listdir(os.path.join(self.path, sub)):
                    where = os.path.join(self.path, sub, name)
                    if sub == "homes":  # a folder per job
                        shutil.rmtree(where, ignore_errors=True)
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(where)
            self._space.forget()
        self._counters.values = dict.fromkeys(COUNTERS, 0)


def usage(path: str) -> tuple[int, int]:
    """(entries, bytes) in the cache at ``path``, counting entries being written."""
    entries, used = scan(path)
    return len(entries), used


def cache_stats(path: str) -> dict[str, Any]:
    """Node-wide figures of the cache at ``path``: entries, bytes, and every counter summed
    over the processes that used it."""
    if not os.path.isdir(os.path.join(path, "entries")):
        raise DataplaneError(f"{path} is not a dataplane cache directory (no entries/)")
    entries, used = usage(path)
    totals: dict[str, Any] = dict.fromkeys(COUNTERS, 0.0)
    sdir = os.path.join(path, "stats")
    for name in os.listdir(sdir):
        if name.endswith(".json"):
            with contextlib.suppress(OSError, ValueError):
                with open(os.path.join(sdir, name)) as f:
                    for k, v in json.load(f).items():
                        if k in totals:
                            totals[k] += v
    return {
        "path": os.path.abspath(path),
        "entries": entries,
        "bytes": used,
        **totals,
        # Where this node's shards came from: the source, this cache, other nodes' caches.
        "source_bytes": totals["bytes_from_source"],
        "local_bytes": totals["bytes_from_cache"],
        "peer_bytes": totals["bytes_from_peers"],
    }


def clear_cache(path: str) -> None:
    """Empty the cache at ``path``."""
    if not os.path.isdir(os.path.join(path, "entries")):
        raise DataplaneError(f"{path} is not a dataplane cache directory (no entries/)")
    NodeCache(path, capacity=1).clear()
