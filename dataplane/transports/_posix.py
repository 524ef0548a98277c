"""POSIX pieces for node-local transports: shared-memory segments, futexes, process liveness.

Segments are managed with ``shm_open`` directly, not ``multiprocessing.shared_memory``: Python
3.11's resource tracker unlinks a segment when any process that merely attached to it exits,
which would pull a live channel from under its writer.
"""

from __future__ import annotations

import _posixshmem
import ctypes
import errno
import mmap
import os
import platform
import stat
import sys
import time
from typing import Any

from dataplane._pids import process_identity
from dataplane.errors import DataplaneError

__all__ = [
    "SHM_DIR",
    "create_segment",
    "current_pid",
    "futex_wait",
    "futex_wake",
    "is_alive",
    "list_segments",
    "my_identity",
    "open_segment",
    "process_identity",
    "unlink_segment",
]

#: Where POSIX shared memory shows up as files on Linux (used to list and sweep segments).
SHM_DIR = "/dev/shm"
_POPULATE = getattr(mmap, "MAP_POPULATE", 0)


# -- segments -----------------------------------------------------------------------------
def create_segment(name: str, size: int) -> tuple[int, mmap.mmap]:
    """Create segment ``name`` exclusively, owner-only, with ``size`` bytes reserved.

    Returns the open file descriptor and a writable mapping. Space is reserved up front
    (``posix_fallocate``): a sparse segment on a full tmpfs kills the writer with SIGBUS later.
    """
    fd = _posixshmem.shm_open("/" + name, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
    try:
        os.ftruncate(fd, size)
        if hasattr(os, "posix_fallocate"):
            try:
                os.posix_fallocate(fd, 0, size)
            except OSError as exc:
                if exc.errno in (errno.ENOSPC, errno.ENOMEM, errno.EFBIG):
                    raise DataplaneError(
                        f"no room for a {size / 2**20:.1f} MiB shared-memory segment "
                        f"({os.strerror(exc.errno)}); free space in {SHM_DIR}, enlarge it, or "
                        f"lower queue_limit"
                    ) from exc
                if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                    raise
        mm = mmap.mmap(fd, size, flags=mmap.MAP_SHARED | _POPULATE)
    except BaseException:
        os.close(fd)
        unlink_segment(name)
        raise
    return fd, mm


def open_segment(name: str, *, writable: bool) -> tuple[int, mmap.mmap]:
    """Open an existing segment; read-only mappings make zero-copy views safe to hand out."""
    fd = _posixshmem.shm_open("/" + name, os.O_RDWR if writable else os.O_RDONLY, 0)
    try:
        size = os.fstat(fd).st_size
        if size == 0:
            raise FileNotFoundError(errno.ENOENT, "segment is empty (being created)", name)
        prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
        mm = mmap.mmap(fd, size, flags=mmap.MAP_SHARED | _POPULATE, prot=prot)
    except BaseException:
        os.close(fd)
        raise
    return fd, mm


def unlink_segment(name: str) -> bool:
    """Remove segment ``name``; False if it was already gone."""
    try:
        _posixshmem.shm_unlink("/" + name)
        return True
    except FileNotFoundError:
        return False


def list_segments(prefix: str) -> list[str]:
    """Names of this user's segments starting with ``prefix`` (Linux; empty elsewhere)."""
    try:
        names = os.listdir(SHM_DIR)
    except OSError:
        return []
    uid = os.getuid()
    out = []
    for name in names:
        if not name.startswith(prefix):
            continue
        try:
            st = os.stat(os.path.join(SHM_DIR, name))
        except OSError:
            continue
        if st.st_uid == uid and stat.S_ISREG(st.st_mode):
            out.append(name)
    return out


def segment_age(name: str) -> float:
    try:
        return time.time() - os.stat(os.path.join(SHM_DIR, name)).st_mtime
    except OSError:
        return 0.0


# -- process liveness ---------------------------------------------------------------------
_me: tuple[int, int] | None = None
_pid = os.getpid()


def _forked() -> None:
    global _pid
    _pid = os.getpid()


os.register_at_fork(after_in_child=_forked)


def current_pid() -> int:
    """This process's pid without a system call (``os.getpid`` makes one per call, a cost in
    per-step checks of microsecond steps); kept current across ``os.fork``."""
    return _pid


def my_identity() -> tuple[int, int]:
    """(pid, start time) of this process; recomputed after fork."""
    global _me
    pid = os.getpid()
    if _me is None or _me[0] != pid:
        _me = (pid, process_identity(pid) or 0)
    return _me


def is_alive(pid: int, start: int) -> bool:
    ident = process_identity(pid)
    return ident is not None and (start == 0 or ident == 0 or ident == start)


# -- futex ---------------------------------------------------------------------------------
_SYS_FUTEX = {
    "x86_64": 202,
    "amd64": 202,
    "aarch64": 98,
    "arm64": 98,
    "ppc64le": 221,
    "riscv64": 98,
    "s390x": 238,
}.get(platform.machine().lower())
_FUTEX_WAIT, _FUTEX_WAKE = 0, 1
_libc = None
if sys.platform.startswith("linux") and _SYS_FUTEX is not None:
    try:
        _libc = ctypes.CDLL(None, use_errno=True)
        _syscall = _libc.syscall
    except (OSError, AttributeError):
        _libc = None


_long = ctypes.c_long


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


def futex_wait(addr: int, expected: int, timeout: float) -> None:
    """Sleep while the shared 32-bit word at ``addr`` equals ``expected``, at most ``timeout``.

    Works across processes (no FUTEX_PRIVATE flag). Spurious returns are fine: callers
    re-check their condition. Without futexes, sleeps briefly instead.
    """
    if _libc is None:
        time.sleep(min(timeout, 0.0005))
        return
    ts = _Timespec(int(timeout), int((timeout - int(timeout)) * 1e9))
    # syscall() is variadic: every integer goes as a full-width long.
    _syscall(
        _long(_SYS_FUTEX or 0),
        ctypes.c_void_p(addr),
        _long(_FUTEX_WAIT),
        _long(expected & 0xFFFFFFFF),
        ctypes.byref(ts),
        None,
        _long(0),
    )


def futex_wake(addr: int) -> None:
    """Wake every process sleeping on the word at ``addr``."""
    if _libc is not None:
        _syscall(
            _long(_SYS_FUTEX or 0),
            ctypes.c_void_p(addr),
            _long(_FUTEX_WAKE),
            _long(0x7FFFFFFF),
            None,
            None,
            _long(0),
        )


# -- process-shared robust mutexes --------------------------------------------------------------
#: Bytes reserved for a pthread_mutex_t in shared memory (glibc: 40 on x86_64, 48 on aarch64).
MUTEX_BYTES = 64
MUTEX_TRIES = 200  # attempts at a held mutex before sleeping on it (about 30 us)
_EOWNERDEAD = getattr(errno, "EOWNERDEAD", 130)
_mutex_fns: Any = None


def _mutex_lib() -> Any:
    """libc's mutex functions, or None where there is no robust process-shared mutex."""
    global _mutex_fns
    if _mutex_fns is None:
        fns: Any = False
        if _libc is not None and hasattr(_libc, "pthread_mutexattr_setrobust"):
            fns = {}
            for name in ("trylock", "lock", "unlock", "consistent"):
                fn = getattr(_libc, f"pthread_mutex_{name}")
                fn.argtypes, fn.restype = [ctypes.c_void_p], ctypes.c_int
                fns[name] = fn
        _mutex_fns = fns
    return _mutex_fns or None


def init_shared_mutex(addr: int) -> bool:
    """Make a robust, process-shared mutex at ``addr`` (``MUTEX_BYTES`` of shared memory):
    locked and unlocked without a system call, and released by the kernel (the next locker
    is told) when its holder dies. False where libc has none."""
    if _mutex_lib() is None:
        return False
    assert _libc is not None
    attr = ctypes.create_string_buffer(64)  # pthread_mutexattr_t: 4 bytes in glibc and musl
    if _libc.pthread_mutexattr_init(attr) != 0:
        return False
    try:
        if (
            _libc.pthread_mutexattr_setpshared(attr, 1) != 0  # PTHREAD_PROCESS_SHARED
            or _libc.pthread_mutexattr_setrobust(attr, 1) != 0  # PTHREAD_MUTEX_ROBUST
        ):
            return False
        return _libc.pthread_mutex_init(ctypes.c_void_p(addr), attr) == 0
    finally:
        _libc.pthread_mutexattr_destroy(attr)


class SharedMutex:
    """A lock on a mutex made by :func:`init_shared_mutex`, as a context manager. It also
    excludes threads. A holder that died leaves what it guarded as it was, as ``flock`` would:
    the next holder takes the lock and goes on."""

    __slots__ = ("_m", "_try", "_lock", "_unlock", "_consistent")

    def __init__(self, addr: int) -> None:
        fns = _mutex_lib()
        if fns is None:
            raise OSError(errno.ENOSYS, "no robust process-shared mutexes in this C library")
        self._m = ctypes.c_void_p(addr)
        self._try, self._lock = fns["trylock"], fns["lock"]
        self._unlock, self._consistent = fns["unlock"], fns["consistent"]

    def __enter__(self) -> None:
        r = self._try(self._m)
        if r == 0:
            return
        # Holders keep the lock for microseconds: trying again is cheaper than sleeping in the
        # kernel and being woken, which dominates when writer and reader collide.
        tries = 1
        while r == errno.EBUSY and tries < MUTEX_TRIES:
            r = self._try(self._m)
            tries += 1
        if r == errno.EBUSY:
            r = self._lock(self._m)
        if r == 0:
            return
        if r == _EOWNERDEAD:
            r = self._consistent(self._m)
        if r != 0:
            raise OSError(r, f"cannot take a shared lock: {os.strerror(r)}")

    def __exit__(self, *exc: object) -> None:
        self._unlock(self._m)
