"""``NodeCache``: a directory of shard files shared by every process on a node.

Layout of ``PATH``::

    entries/<key>           one shard: header, JSON table of arrays, 64-byte aligned payload
    seen/<key>              the entry's identity when its checksum last matched (so a new
                            process need not hash it again); its mtime is the entry's last use
    tmp/<key>.<pid>.<rand>  an entry being written (space reserved up front), renamed when done
    plans/<id>.npz, .pos    a consumer's future order of shards and its position (for eviction)
    stats/<pid>.json        each process's counters (``dataplane cache stats`` adds them up)
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
import ctypes
import errno
import fcntl
import hashlib
import json
import mmap
import multiprocessing.util
import os
import re
import secrets
import stat
import struct
import threading
import time
import warnings
import weakref
from collections import OrderedDict
from collections.abc import Callable, Collection, Iterator
from typing import Any

import numpy as np
import xxhash

from dataplane.cache.policy import NEVER, Plan
from dataplane.errors import DataplaneError, OptionError
from dataplane.model import check_seconds

__all__ = ["CacheWarning", "NodeCache", "cache_stats", "clear_cache", "parse_size"]

_MAGIC = b"DPCACHE1"
_HEADER = struct.Struct("<8sQQQ")  # magic, table length, payload length, xxh3-64 of payload
_ALIGN = 64
_KEY_SLOTS = 1 << 20  # byte-range lock slots in keys.lock
_KEY_RE = re.compile(r"^[0-9a-f]{40}$")
_STATS_EVERY = 0.5  # seconds between writes of a process's counters
#: Read positions beyond the reported one that a shard fetched now is taken to serve (its
#: readers hold it in memory) when deciding whether to keep it.
IN_FLIGHT = 32
_UNKNOWN = -1  # the space bound before the first scan
_COARSE_CLOCK = 5  # CLOCK_REALTIME_COARSE: the clock file times are taken from
SUBDIRS = ("entries", "seen", "tmp", "plans", "stats")
_UNITS = {"": 1, "B": 1, "K": 1000, "M": 1000**2, "G": 1000**3, "T": 1000**4}
_UNITS.update({"KI": 1 << 10, "MI": 1 << 20, "GI": 1 << 30, "TI": 1 << 40})
COUNTERS = (
    "hits",
    "misses",
    "bytes_from_source",
    "bytes_from_cache",
    "evictions",
    "bypassed",
    "fetch_wait_s",
    "degraded",
    "corrupt",
    "verified",
)


class CacheWarning(RuntimeWarning):
    """The cache could not store an entry (full disk, failed write) and is being bypassed."""


def parse_size(size: Any) -> int:
    """Bytes from an int or a string such as ``"40GB"``, ``"512MiB"``, ``"1.5G"``."""
    if isinstance(size, (int, np.integer)) and not isinstance(size, bool):
        value = int(size)
    else:
        m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([KMGT]?I?)B?\s*", str(size).upper())
        if not m:
            raise OptionError(f"size {size!r} is not a number of bytes such as 40GB or 512MiB")
        value = int(float(m.group(1)) * _UNITS[m.group(2)])
    if value <= 0:
        raise OptionError(f"a cache capacity must be positive, got {size!r}")
    return value


def _layout(arrays: dict[str, np.ndarray]) -> tuple[int, bytes, list[int]]:
    offsets = []
    pos = 0
    for a in arrays.values():
        offsets.append(pos)
        pos += -(-a.nbytes // _ALIGN) * _ALIGN
    table = json.dumps(
        [[n, a.dtype.str, list(a.shape), o] for (n, a), o in zip(arrays.items(), offsets)]
    ).encode()
    head = -(-(_HEADER.size + len(table)) // _ALIGN) * _ALIGN
    return head + pos, table, offsets


def _identity(st: os.stat_result) -> str:
    return f"{st.st_ino} {st.st_size} {st.st_mtime_ns} {st.st_ctime_ns}\n"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


_NOFOLLOW = os.O_NOFOLLOW | os.O_CLOEXEC


def _open(path: str, flags: int, mode: int = 0o600) -> int:
    """``os.open`` that never follows a symbolic link: the cache's files are its own, and a
    link planted in its directory would make it write (or read) wherever the link points."""
    try:
        return os.open(path, flags | _NOFOLLOW, mode)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise DataplaneError(
                f"{path} is a symbolic link; a cache directory holds only the cache's own "
                f"files. Remove it (and check who else can write to {os.path.dirname(path)})."
            ) from None
        raise


def _owned_dir(path: str) -> None:
    """Make ``path`` a directory only this user can use, or raise: not a link, ours, 0700."""
    os.makedirs(path, mode=0o700, exist_ok=True)
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid():
        raise DataplaneError(
            f"{path} must be a directory owned by you (uid {os.getuid()}), not a link: a cache "
            f"holds the data of whoever runs the job. Use a directory of your own."
        )
    if st.st_mode & 0o077:
        os.chmod(path, 0o700)


class _Mapping:
    """A read-only shared mapping of a whole file that keeps no file descriptor (Python's
    ``mmap`` keeps a duplicate of it for its whole life: one per cache entry a process ever
    mapped). Unmapped when the last array viewing it is gone."""

    _libc: Any = None

    def __init__(self, fd: int, size: int) -> None:
        libc = _Mapping._libc
        if libc is None:
            libc = _Mapping._libc = ctypes.CDLL(None, use_errno=True)
            libc.mmap.restype = ctypes.c_void_p
            libc.mmap.argtypes = [
                ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                ctypes.c_long,
            ]  # fmt: skip
            libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        self.size = size
        self.addr = 0
        addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        if addr is None or addr == ctypes.c_void_p(-1).value:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))
        self.addr = addr
        self.__array_interface__ = {
            "shape": (size,),
            "typestr": "|u1",
            "data": (addr, True),
            "version": 3,
        }

    def __del__(self) -> None:
        if self.addr:
            self._libc.munmap(self.addr, self.size)
            self.addr = 0


def _close_fd_in(pid: int, fd: int) -> None:
    if os.getpid() == pid:
        os.close(fd)


class _Counters:
    """A process's counters and where they go; flushed when the cache goes (without keeping
    it alive: a finalizer holding the cache's own method kept every cache forever)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.pid = os.getpid()
        self.values: dict[str, float] = dict.fromkeys(COUNTERS, 0)
        self.written = 0.0
        self.dirty = False

    def flush(self) -> None:
        if self.pid != os.getpid() or not self.dirty:
            return
        self.dirty = False
        self.written = time.monotonic()
        path = os.path.join(self.path, "stats", f"{self.pid}.json")
        tmp = f"{path}.{secrets.token_hex(4)}.tmp"
        with contextlib.suppress(OSError):
            fd = _open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
            with os.fdopen(fd, "w") as f:
                json.dump(self.values, f)
            os.replace(tmp, path)
        with contextlib.suppress(OSError):
            os.unlink(tmp)


class NodeCache:
    """Shards on node-local storage, shared by every process that names the same ``path``.

    Parameters
    ----------
    path
        A directory on node-local storage (created if missing).
    capacity
        Bytes it may hold (``"40GB"``, ``"512MiB"`` or an int). Never exceeded.
    lock_timeout
        Seconds to wait for another process's fetch of the same shard before fetching anyway.
    """

    def __init__(
        self, path: str | os.PathLike, capacity: Any = "40GB", *, lock_timeout: float = 600.0
    ):
        self.path = os.path.abspath(os.fspath(path))
        self.capacity = parse_size(capacity)
        self.lock_timeout = check_seconds(lock_timeout, "lock_timeout")
        # Owner-only: entries hold the data of whoever runs the job. (makedirs applies its
        # mode to the last component only, so the root is made first.) The root may be a
        # link the user made; what is inside it may not.
        _owned_dir(os.path.realpath(self.path))
        for sub in SUBDIRS:
            _owned_dir(os.path.join(self.path, sub))
        self._reset()

    # -- per-process state -------------------------------------------------------------------
    def _reset(self) -> None:
        self._pid = os.getpid()
        self._mutex = threading.Lock()
        self._key_mutexes: dict[int, threading.Lock] = {}
        self._keys_fd: int | None = None
        self._keys_closer: Any = None
        # key -> (inode, generation when last seen live, arrays viewing its mapping)
        self._maps: OrderedDict[str, tuple[int, int, dict[str, np.ndarray]]] = OrderedDict()
        self._gen: mmap.mmap | None = None
        self._space_map: mmap.mmap | None = None
        self._maps_gen = -1  # the generation the mappings were last checked at
        self._positions: dict[str, mmap.mmap] = {}  # plan -> its shared position
        self._verified: set[str] = set()
        # Entries verified here but not yet recorded in seen/: key -> their change time.
        self._unrecorded: dict[str, int] = {}
        self._plans: dict[str, tuple[int, Plan]] = {}  # plan -> (file mtime, plan)
        self._counters = _Counters(self.path)
        self._warned = False
        self._swept = False
        # At exit, and in DataLoader workers (which end through os._exit), multiprocessing's
        # finalizers still run.
        multiprocessing.util.Finalize(self, self._counters.flush, exitpriority=10)

    def _check_process(self) -> None:
        if self._pid != os.getpid():  # after fork: locks, fds and maps are the parent's
            self._reset()

    def __reduce__(self):
        return (type(self), (self.path, self.capacity), {"lock_timeout": self.lock_timeout})

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.lock_timeout = state["lock_timeout"]

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

    def _entry(self, key: str) -> str:
        if not _KEY_RE.match(key):
            raise DataplaneError(f"cache key {key!r} is not one NodeCache.key() made")
        return os.path.join(self.path, "entries", key)

    def __contains__(self, key: str) -> bool:
        return os.path.exists(self._entry(key))

    # -- reading ------------------------------------------------------------------------------
    def get(self, key: str) -> dict[str, np.ndarray] | None:
        """The arrays of entry ``key`` (read-only views of its mapping), or None."""
        self._check_process()
        arrays = self._map(key)
        if arrays is not None:
            self._count("hits", 1)
            self._count("bytes_from_cache", sum(a.nbytes for a in arrays.values()))
        return arrays

    def _generation(self) -> int:
        """A node-wide counter that every removal of an entry bumps (a shared mapping)."""
        if self._gen is None:
            fd = _open(os.path.join(self.path, "generation"), os.O_RDWR | os.O_CREAT)
            try:
                if os.fstat(fd).st_size < 8:
                    os.posix_fallocate(fd, 0, 8)
                self._gen = mmap.mmap(fd, 8)
            finally:
                os.close(fd)
        return struct.unpack_from("<q", self._gen, 0)[0]

    def generation(self) -> int:
        """A node-wide count of entry removals: while it stays the same, an entry seen in the
        cache is still there."""
        self._check_process()
        return self._generation()

    def _removed(self) -> None:
        """Record that entries went away (call under the space lock)."""
        self._generation()
        assert self._gen is not None
        struct.pack_into("<q", self._gen, 0, struct.unpack_from("<q", self._gen, 0)[0] + 1)

    def _prune_maps(self, gen: int) -> None:
        """Let go of the mappings of entries removed since the last look: an unlinked file
        keeps its disk space (and a descriptor) while it is mapped, so holding evicted
        entries would put the cache over its capacity on disk (the soak found 1 descriptor
        per epoch held this way)."""
        with self._mutex:
            if gen == self._maps_gen:
                return
            self._maps_gen = gen
            held = [(k, v[0]) for k, v in self._maps.items()]
        gone = []
        for k, ino in held:
            try:
                if os.stat(self._entry(k)).st_ino != ino:
                    gone.append(k)
            except FileNotFoundError:
                gone.append(k)
        with self._mutex:
            for k in gone:
                self._maps.pop(k, None)  # readers' views keep their own mapping alive

    def _map(self, key: str) -> dict[str, np.ndarray] | None:
        gen = self._generation()
        self._prune_maps(gen)
        with self._mutex:
            got = self._maps.get(key)
        if got is not None and got[1] == gen:
            return got[2]  # nothing was removed since we last saw it live
        path = self._entry(key)
        try:
            ino = os.stat(path).st_ino
        except FileNotFoundError:
            return None
        if got is not None and got[0] == ino:
            # Still the live entry. An evicted one is never served from an old mapping, so
            # what readers hold through the cache stays within what its capacity allows.
            with self._mutex:
                self._maps[key] = (ino, gen, got[2])
                self._maps.move_to_end(key)
            return got[2]
        opened = self._open_entry(key)
        if opened is None:
            return None
        mm, st, head, tlen = opened
        if key not in self._verified and not self._verify(key, mm, st, head):
            return None
        arrays = {}
        for name, dtype, shape, offset in json.loads(bytes(mm[_HEADER.size : _HEADER.size + tlen])):
            dt = np.dtype(dtype)
            count = int(np.prod(shape, dtype=np.int64))
            start = head + offset
            arrays[name] = mm[start : start + count * dt.itemsize].view(dt).reshape(shape)
        with contextlib.suppress(OSError):
            # Last use, for LRU order: on the record, since the entry's own times vouch for it.
            os.utime(self._seen_path(key), follow_symlinks=False)
        with self._mutex:
            self._maps[key] = (st.st_ino, gen, arrays)
            while len(self._maps) > 512:
                self._maps.popitem(last=False)  # the arrays keep their mapping alive
        return arrays

    def _open_entry(self, key: str) -> tuple[np.ndarray, os.stat_result, int, int] | None:
        """Map entry ``key`` and check its header: (bytes, stat, payload start, table length),
        or None (missing, or found damaged and removed)."""
        try:
            fd = os.open(self._entry(key), os.O_RDONLY | _NOFOLLOW)
        except FileNotFoundError:
            return None
        except OSError as exc:
            if exc.errno != errno.ELOOP:
                raise
            self._corrupt(key, "it is a symbolic link")
            return None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_size < _HEADER.size:
                self._corrupt(key, "it is shorter than its header")
                return None
            mm = np.asarray(_Mapping(fd, st.st_size))
        finally:
            os.close(fd)
        magic, tlen, plen, _ = _HEADER.unpack_from(mm.data, 0)
        head = -(-(_HEADER.size + tlen) // _ALIGN) * _ALIGN
        if magic != _MAGIC or head + plen != st.st_size:
            self._corrupt(key, "its header does not match its size")
            return None
        return mm, st, head, tlen

    def _verify(self, key: str, mm: np.ndarray, st: os.stat_result, head: int) -> bool:
        """Check the entry's payload against its checksum, unless a record says it matched
        and the file has not changed since; record a match. False: corrupt (removed)."""
        if self._seen(key) != _identity(st):
            # A write after this moment gives the file a later change time than it has now,
            # so recording what we hash now is safe; within the same clock tick it is not.
            settled = time.clock_gettime_ns(_COARSE_CLOCK) > st.st_ctime_ns
            checksum = _HEADER.unpack_from(mm.data, 0)[3]
            if xxhash.xxh3_64_intdigest(mm[head:].data) != checksum:
                self._corrupt(key, "its checksum does not match")
                return False
            self._count("verified", 1)
            if settled:
                self._record(key, st)
            else:
                self._unrecorded[key] = st.st_ctime_ns
        self._verified.add(key)
        return True

    def _settle(self, wait: bool = False) -> None:
        """Record the entries this process stored or checked within the file clock's last
        tick, once the clock has moved on (checking them again then), so that other processes
        need not hash them. ``wait``: let the clock move on first."""
        if not self._unrecorded:
            return
        if wait:
            time.sleep(0.005)
        now = time.clock_gettime_ns(_COARSE_CLOCK)
        for key, changed in list(self._unrecorded.items()):
            if changed >= now or self._unrecorded.pop(key, None) is None:
                continue  # not yet, or another thread took it
            self._verified.discard(key)
            opened = self._open_entry(key)
            if opened is not None:
                self._verify(key, opened[0], opened[1], opened[2])

    def _seen_path(self, key: str) -> str:
        return os.path.join(self.path, "seen", key)

    def _seen(self, key: str) -> str | None:
        """What ``seen/<key>`` says the entry was when its checksum last matched."""
        try:
            fd = _open(self._seen_path(key), os.O_RDONLY)
        except FileNotFoundError:
            return None
        try:
            return os.read(fd, 128).decode(errors="replace")
        finally:
            os.close(fd)

    def _record(self, key: str, st: os.stat_result) -> None:
        """Record that the entry, as ``st`` describes it, matched its checksum. A reader that
        sees a half-written record sees no match and hashes the entry itself; one that could
        not be written (a full disk) only means the next process hashes it too."""
        with contextlib.suppress(OSError):
            fd = _open(self._seen_path(key), os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            try:
                os.write(fd, _identity(st).encode())
            finally:
                os.close(fd)

    def _unlink_entry(self, key: str) -> bool:
        """Remove an entry and its record; whether the entry was there."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._seen_path(key))
        try:
            os.unlink(self._entry(key))
        except FileNotFoundError:
            return False
        return True

    def _corrupt(self, key: str, why: str) -> None:
        """Count, warn and remove a damaged entry, so it is fetched again."""
        self._count("corrupt", 1)
        warnings.warn(
            f"cache entry {key} in {self.path} is corrupt ({why}); removed and fetched again",
            CacheWarning,
            stacklevel=4,
        )
        self._unlink_entry(key)
        with self._mutex:
            self._maps.pop(key, None)

    # -- fetching -----------------------------------------------------------------------------
    def fetch(
        self,
        key: str,
        produce: Callable[[], dict[str, np.ndarray]],
        *,
        keep: Collection[str] = (),
    ) -> dict[str, np.ndarray]:
        """The arrays of entry ``key``: from the cache, or from ``produce()`` (called once per
        node however many processes ask at the same time) and then stored. Entries in ``keep``
        (the rest of the caller's batch) are not evicted to make room for it."""
        got = self.get(key)
        if got is not None:
            return got
        with self._key_lock(key):
            got = self.get(key)  # fetched by whoever held the lock while we waited
            if got is not None:
                return got
            arrays = {n: np.ascontiguousarray(a) for n, a in produce().items()}
            self._count("misses", 1)
            self._count("bytes_from_source", sum(a.nbytes for a in arrays.values()))
            try:
                self._store(key, arrays, keep)
            except OSError as exc:
                self._degrade(exc)
        return arrays

    @contextlib.contextmanager
    def _key_lock(self, key: str) -> Iterator[None]:
        """Exclusive per key, across threads (a mutex) and processes (a byte-range lock the
        kernel releases when its holder dies, so a waiter takes over at once)."""
        self._check_process()
        slot = int(key[:8], 16) % _KEY_SLOTS
        with self._mutex:
            mutex = self._key_mutexes.setdefault(slot, threading.Lock())
            if self._keys_fd is None:
                self._keys_fd = _open(os.path.join(self.path, "keys.lock"), os.O_RDWR | os.O_CREAT)
                # A cache dropped without close() closes it all the same.
                self._keys_closer = weakref.finalize(self, _close_fd_in, os.getpid(), self._keys_fd)
            fd = self._keys_fd
        t0 = time.perf_counter()
        with mutex:
            deadline = time.monotonic() + self.lock_timeout
            locked = False
            delay = 0.001
            while True:
                try:
                    fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, slot)
                    locked = True
                    break
                except OSError as exc:
                    if exc.errno not in (errno.EACCES, errno.EAGAIN):
                        raise
                if time.monotonic() > deadline:
                    break  # the holder is alive but stuck: fetch anyway rather than hang
                time.sleep(delay)
                delay = min(delay * 2, 0.02)
            self._count("fetch_wait_s", time.perf_counter() - t0)
            try:
                yield
            finally:
                if locked:
                    fcntl.lockf(fd, fcntl.LOCK_UN, 1, slot)

    def _store(self, key: str, arrays: dict[str, np.ndarray], keep: Collection[str] = ()) -> None:
        self._settle()
        size, table, offsets = _layout(arrays)
        if size > self.capacity:
            self._count("bypassed", 1)
            return
        tmp = os.path.join(self.path, "tmp", f"{key}.{os.getpid()}.{secrets.token_hex(4)}")
        with self._space():
            if not self._make_room(key, size, keep):
                self._count("bypassed", 1)
                return
            fd = _open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL)
            try:
                # Reserve every block now: a full disk fails here, not later as a SIGBUS.
                os.posix_fallocate(fd, 0, size)
            except BaseException:
                os.close(fd)
                os.unlink(tmp)
                raise
        try:
            head = size - sum(-(-a.nbytes // _ALIGN) * _ALIGN for a in arrays.values())
            h = xxhash.xxh3_64()
            for a, o in zip(arrays.values(), offsets):
                if a.nbytes:
                    os.pwrite(fd, a.reshape(-1).view(np.uint8).data, head + o)
                pad = -(-a.nbytes // _ALIGN) * _ALIGN - a.nbytes
                h.update(a.reshape(-1).view(np.uint8).data if a.nbytes else b"")
                h.update(b"\0" * pad)
            os.pwrite(fd, _HEADER.pack(_MAGIC, len(table), size - head, h.intdigest()) + table, 0)
            os.close(fd)
            fd = -1
            os.rename(tmp, self._entry(key))
            self._verified.add(key)  # we computed its checksum from the bytes we wrote
            # Recorded once the file clock has moved on.
            self._unrecorded[key] = os.stat(self._entry(key)).st_ctime_ns
        except BaseException:
            if fd >= 0:
                os.close(fd)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise

    @contextlib.contextmanager
    def _space(self) -> Iterator[None]:
        fd = _open(os.path.join(self.path, "lock"), os.O_RDWR | os.O_CREAT)
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
            if len(parts) == 3 and parts[1].isdigit() and not _pid_alive(int(parts[1])):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(self.path, "tmp", name))
        for name in os.listdir(os.path.join(self.path, "plans")):
            pid = name.split("-", 1)[0]
            if pid.isdigit() and not _pid_alive(int(pid)):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(self.path, "plans", name))

    def usage(self) -> tuple[int, int]:
        """(entries, bytes) in the cache, counting entries being written."""
        n = used = 0
        for sub in ("entries", "tmp"):
            with os.scandir(os.path.join(self.path, sub)) as it:
                for e in it:
                    with contextlib.suppress(FileNotFoundError):
                        used += e.stat().st_blocks * 512 if sub == "tmp" else e.stat().st_size
                        n += sub == "entries"
        return n, used

    def _space_bound(self) -> mmap.mmap:
        """The node's upper bound of the bytes in use, shared through a mapped file.

        NOTE: only stores add to it (under the space lock) and every scan of the directory
        sets it to the exact figure, so removals elsewhere (eviction by another process, a
        corrupt entry, ``clear``) leave it an upper bound. While it says an entry fits, a store
        needs no scan: without it each store stat()ed every entry, O(entries) per store.
        """
        if self._space_map is None:
            fd = _open(os.path.join(self.path, "space"), os.O_RDWR | os.O_CREAT)
            try:
                if os.fstat(fd).st_size < 8:  # new (or from an older version): unknown
                    os.pwrite(fd, struct.pack("<q", _UNKNOWN), 0)
                self._space_map = mmap.mmap(fd, 8)
            finally:
                os.close(fd)
        return self._space_map

    def _make_room(self, key: str, size: int, keep: Collection[str] = ()) -> bool:
        """Evict until ``size`` more bytes fit; False when the newcomer is the one to drop
        (every entry it would displace is needed sooner). Called under the space lock."""
        bound = self._space_bound()
        (upper,) = struct.unpack_from("<q", bound, 0)
        if 0 <= upper and upper + size <= self.capacity:
            struct.pack_into("<q", bound, 0, upper + size)
            return True
        return self._scan_and_evict(key, size, keep)

    def _scan_and_evict(self, key: str, size: int, keep: Collection[str]) -> bool:
        entries = []
        used = 0
        last_use = {}
        with os.scandir(os.path.join(self.path, "seen")) as it:
            for e in it:
                with contextlib.suppress(FileNotFoundError):
                    last_use[e.name] = e.stat(follow_symlinks=False).st_mtime_ns
        for sub in ("entries", "tmp"):
            with os.scandir(os.path.join(self.path, sub)) as it:
                for e in it:
                    try:
                        st = e.stat()
                    except FileNotFoundError:
                        continue
                    if sub == "tmp":
                        used += max(st.st_size, st.st_blocks * 512)
                    else:
                        used += st.st_size
                        used_at = max(st.st_mtime_ns, last_use.pop(e.name, 0))
                        entries.append((e.name, st.st_size, used_at))
        bound = self._space_bound()
        if used + size <= self.capacity:
            struct.pack_into("<q", bound, 0, used + size)
            return True
        plans = self._live_plans()

        def future(k: str, ahead: int = 0) -> int:
            return min((p.next_use(k, pos + ahead) for p, pos in plans), default=NEVER)

        # The newcomer is being read now, for the positions in flight: what counts is its use
        # after those. If every entry it would displace is needed before that, it is not kept.
        mine = future(key, IN_FLIGHT) if plans else NEVER
        # Entries nobody needs first (oldest first), then the one needed furthest ahead.
        ranked = sorted(entries, key=lambda e: (-future(e[0]) if plans else 0, e[2]))
        for name, nbytes, _ in ranked:
            if used + size <= self.capacity:
                break
            if name in keep:
                continue
            if plans and future(name) != NEVER and future(name) < mine:
                break
            if self._unlink_entry(name):
                used -= nbytes
                self._count("evictions", 1)
                self._removed()
        for name in last_use:  # records of entries that are gone
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._seen_path(name))
        fits = used + size <= self.capacity
        struct.pack_into("<q", bound, 0, used + size if fits else used)
        return fits

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
        name = f"{os.getpid()}-{re.sub(r'[^A-Za-z0-9_.-]', '_', plan_id)}"
        base = os.path.join(self.path, "plans", name)
        tmp = f"{base}.{secrets.token_hex(4)}.tmp"
        blob = np.frombuffer("\n".join(keys).encode(), dtype=np.uint8)
        with os.fdopen(_open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL), "wb") as f:
            np.savez(f, keys=blob, uses=np.asarray(uses, dtype=np.int64))
        self.advance(name, 0)
        os.replace(tmp, base + ".npz")
        return name

    def advance(self, plan: str, position: int) -> None:
        """Tell eviction and prefetching that the consumer of ``plan`` reached ``position``."""
        self._check_process()
        pos = self._positions.get(plan)
        if pos is None:
            fd = _open(os.path.join(self.path, "plans", plan + ".pos"), os.O_RDWR | os.O_CREAT)
            try:
                if os.fstat(fd).st_size < 8:
                    os.posix_fallocate(fd, 0, 8)
                pos = self._positions[plan] = mmap.mmap(fd, 8)
            finally:
                os.close(fd)
        struct.pack_into("<q", pos, 0, int(position))

    def drop_plan(self, plan: str) -> None:
        """Forget a plan (its consumer moved on to another)."""
        self._positions.pop(plan, None)
        for ext in (".npz", ".pos"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(self.path, "plans", plan + ext))

    def load_plan(self, plan: str) -> tuple[Plan, int] | None:
        """A plan and its consumer's position (None if gone)."""
        base = os.path.join(self.path, "plans", plan)
        try:
            mtime = os.stat(base + ".npz").st_mtime_ns
            with os.fdopen(_open(base + ".pos", os.O_RDONLY), "rb") as f:
                (position,) = struct.unpack("<q", f.read(8))
        except (FileNotFoundError, struct.error):
            return None
        cached = self._plans.get(plan)
        if cached is None or cached[0] != mtime:
            try:
                with np.load(base + ".npz", allow_pickle=False) as z:
                    keys = bytes(z["keys"]).decode().split("\n") if len(z["keys"]) else []
                    uses = z["uses"]
            except (OSError, ValueError, KeyError):
                return None
            cached = self._plans[plan] = (mtime, Plan(keys, uses))
        return cached[1], position

    def _live_plans(self) -> list[tuple[Plan, int]]:
        out = []
        for name in os.listdir(os.path.join(self.path, "plans")):
            if name.endswith(".npz"):
                got = self.load_plan(name[:-4])
                if got is not None and got[1] < len(got[0]):
                    out.append(got)
        return out

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
            self._settle(wait=True)
        self.flush_stats()
        with self._mutex:
            mine = self._pid == os.getpid()
            if self._keys_fd is not None:
                self._keys_closer()
            self._keys_fd = None
            self._maps.clear()
            for small in (self._space_map, self._gen, *self._positions.values()):
                if small is not None and mine:
                    small.close()
            self._space_map = self._gen = None
            self._positions = {}
            self._maps_gen = -1

    def clear(self) -> None:
        """Remove every entry, plan and counter (entries mapped by running readers stay
        readable to them until they let go)."""
        with self._space():
            for sub in SUBDIRS:
                for name in os.listdir(os.path.join(self.path, sub)):
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(os.path.join(self.path, sub, name))
            struct.pack_into("<q", self._space_bound(), 0, _UNKNOWN)  # scan at the next store
            self._removed()
        self._counters.values = dict.fromkeys(COUNTERS, 0)


def cache_stats(path: str) -> dict[str, Any]:
    """Node-wide figures of the cache at ``path``: entries, bytes, and every counter summed
    over the processes that used it."""
    if not os.path.isdir(os.path.join(path, "entries")):
        raise DataplaneError(f"{path} is not a dataplane cache directory (no entries/)")
    cache = NodeCache.__new__(NodeCache)
    cache.path = os.path.abspath(path)
    entries, used = NodeCache.usage(cache)
    totals: dict[str, Any] = dict.fromkeys(COUNTERS, 0.0)
    sdir = os.path.join(path, "stats")
    for name in os.listdir(sdir):
        if name.endswith(".json"):
            with contextlib.suppress(OSError, ValueError):
                with open(os.path.join(sdir, name)) as f:
                    for k, v in json.load(f).items():
                        if k in totals:
                            totals[k] += v
    return {"path": cache.path, "entries": entries, "bytes": used, **totals}


def clear_cache(path: str) -> None:
    """Empty the cache at ``path``."""
    if not os.path.isdir(os.path.join(path, "entries")):
        raise DataplaneError(f"{path} is not a dataplane cache directory (no entries/)")
    NodeCache(path, capacity=1).clear()
