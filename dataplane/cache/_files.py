"""The cache's own files: opened without following links, in folders only their owner can
use, mapped without a descriptor; sizes; a process's counters."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import json
import mmap
import os
import secrets
import stat
import threading
import time
import weakref
from collections.abc import Iterator
from typing import Any

from dataplane._pids import process_identity
from dataplane.errors import DataplaneError

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
    "mapped",
    "bytes_from_peers",
    "peer_hits",
    "peer_absent",
    "peer_failures",
)


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` runs; a zombie (killed, not yet reaped by its parent) does
    not: it writes nothing more, though signal 0 still reaches it."""
    return process_identity(pid) is not None


class CacheWarning(RuntimeWarning):
    """The cache could not store an entry (full disk, failed write) and is being bypassed, or
    a cooperating node could not provide one (read from the source instead)."""


NOFOLLOW = os.O_NOFOLLOW | os.O_CLOEXEC
MAP_POPULATE = getattr(mmap, "MAP_POPULATE", 0)


def open_file(path: str, flags: int, mode: int = 0o600) -> int:
    """``os.open`` that never follows a symbolic link: the cache's files are its own, and a
    link planted in its directory would make it write (or read) wherever the link points."""
    try:
        return os.open(path, flags | NOFOLLOW, mode)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise DataplaneError(
                f"{path} is a symbolic link; a cache directory holds only the cache's own "
                f"files. Remove it (and check who else can write to {os.path.dirname(path)})."
            ) from None
        raise


def owned_dir(path: str) -> None:
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


class Mapping:
    """A read-only shared mapping of a whole file that keeps no file descriptor (Python's
    ``mmap`` keeps a duplicate of it for its whole life: one per cache entry a process ever
    mapped). Unmapped when the last array viewing it is gone. ``populate``: build its page
    tables now (in the kernel, without the GIL), not one fault per 64 KiB as it is read."""

    _libc: Any = None

    def __init__(self, fd: int, size: int, populate: bool = False) -> None:
        libc = Mapping._libc
        if libc is None:
            libc = Mapping._libc = ctypes.CDLL(None, use_errno=True)
            libc.mmap.restype = ctypes.c_void_p
            libc.mmap.argtypes = [
                ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                ctypes.c_long,
            ]  # fmt: skip
            libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        self.size = size
        self.addr = 0
        flags = mmap.MAP_SHARED | (MAP_POPULATE if populate else 0)
        addr = libc.mmap(None, size, mmap.PROT_READ, flags, fd, 0)
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


def close_fd_in(pid: int, fd: int) -> None:
    if os.getpid() == pid:
        os.close(fd)


class Counters:
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
            fd = open_file(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
            with os.fdopen(fd, "w") as f:
                json.dump(self.values, f)
            os.replace(tmp, path)
        with contextlib.suppress(OSError):
            os.unlink(tmp)


#: Longest sleep between two looks at a key's lock held by another process.
WAIT_POLL = 0.002


class KeyLocks:
    """Exclusive per key, across threads (a mutex) and processes (a byte-range lock in
    ``path``, one slot per key hash, that the kernel releases when its holder dies, so a
    waiter takes over at once)."""

    SLOTS = 1 << 20

    def __init__(self, path: str, timeout: float) -> None:
        self.path, self.timeout = path, timeout
        self._mutex = threading.Lock()
        self._mutexes: dict[int, threading.Lock] = {}
        self._fd: int | None = None
        self._closer: Any = None

    def _slot(self, key: str) -> tuple[int, threading.Lock, int]:
        """``key``'s slot in the lock file, its mutex in this process, the lock file."""
        slot = int(key[:8], 16) % self.SLOTS
        with self._mutex:
            mutex = self._mutexes.setdefault(slot, threading.Lock())
            if self._fd is None:
                self._fd = open_file(self.path, os.O_RDWR | os.O_CREAT)
                # Dropped without close(), it closes all the same.
                self._closer = weakref.finalize(self, close_fd_in, os.getpid(), self._fd)
            return slot, mutex, self._fd

    @contextlib.contextmanager
    def hold(self, key: str) -> Iterator[float]:
        """Hold ``key``'s lock; yields the seconds waited for it. A holder alive but stuck
        for ``timeout`` is given up on: the caller goes ahead rather than hang."""
        slot, mutex, fd = self._slot(key)
        t0 = time.perf_counter()
        with mutex:
            deadline = time.monotonic() + self.timeout
            locked = False
            delay = 0.0005
            while True:
                try:
                    fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, slot)
                    locked = True
                    break
                except OSError as exc:
                    if exc.errno not in (errno.EACCES, errno.EAGAIN):
                        raise
                if time.monotonic() > deadline:
                    break
                time.sleep(delay)
                # A fetch takes milliseconds: a longer sleep is time the reader sits idle
                # after it ended (20 ms cost a cold epoch a third of its time).
                delay = min(delay * 2, WAIT_POLL)
            try:
                yield time.perf_counter() - t0
            finally:
                if locked:
                    fcntl.lockf(fd, fcntl.LOCK_UN, 1, slot)

    @contextlib.contextmanager
    def try_hold(self, key: str) -> Iterator[bool]:
        """Hold ``key``'s lock if no one (thread or process) holds it now; yields whether
        it is held. For a fetcher that would rather take another key than wait."""
        slot, mutex, fd = self._slot(key)
        if not mutex.acquire(blocking=False):
            yield False
            return
        try:
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, slot)
            except OSError as exc:
                if exc.errno not in (errno.EACCES, errno.EAGAIN):
                    raise
                yield False
                return
            try:
                yield True
            finally:
                fcntl.lockf(fd, fcntl.LOCK_UN, 1, slot)
        finally:
            mutex.release()

    def close(self) -> None:
        with self._mutex:
            if self._fd is not None:
                self._closer()
            self._fd = None
