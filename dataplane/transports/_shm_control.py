"""The ``shm://`` control segment: its ctypes layout, the channel lock and futexes, channel
files that map a name to segments, and the sweep of what crashed processes left."""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import json
import os
import re
import secrets
import tempfile
import threading
import time
from collections.abc import Iterator
from typing import Any

from dataplane.errors import DataplaneError
from dataplane.model import AttrValue
from dataplane.transports import _posix

_MAGIC = 0x6470_6C61_6E65_0002  # "dplane" + layout 2
_VERSION = 2
_FLOCK, _MUTEX = 0, 1  # how the channel is locked
_OPEN, _CLOSED, _FAILED = 0, 1, 2
_POLICY_CODE = {"block": 0, "drop-oldest": 1}
_ALIGN = 64
_SLOT_GRANULE = 64 * 1024
_ATTRS_CAP = 256 * 1024
_POLL = 0.1  # seconds between liveness checks while waiting
_SPIN = 100e-6  # seconds to spin before sleeping on a futex
_LOCK_TRIES = 20  # non-blocking attempts at the channel lock before sleeping on it
_REAP_EVERY = 0.05
_CTL_RE = re.compile(r"dp-([0-9a-f]{16})-ctl\Z")
_U32 = 0xFFFFFFFF


class _Header(ctypes.Structure):
    _fields_ = [
        ("magic", ctypes.c_uint64),
        ("version", ctypes.c_uint32),
        ("state", ctypes.c_uint32),
        ("published", ctypes.c_uint32),  # futex: bumped on every publish and state change
        ("released", ctypes.c_uint32),  # futex: bumped when a subscriber advances/joins/leaves
        ("nslots", ctypes.c_uint32),
        ("nsubs", ctypes.c_uint32),
        ("policy", ctypes.c_uint32),
        ("queue_limit", ctypes.c_uint32),
        ("unlinked", ctypes.c_uint32),
        ("attrs_cap", ctypes.c_uint32),
        ("attrs_len", ctypes.c_uint32),
        ("sub_hwm", ctypes.c_uint32),  # rows of the subscriber table ever used
        ("pub_waiters", ctypes.c_uint32),  # readers asleep on `published`
        ("rel_waiters", ctypes.c_uint32),  # writers asleep on `released`
        ("lock_kind", ctypes.c_uint32),  # _MUTEX: `mutex` below; _FLOCK: flock on the segment
        ("writer_pid", ctypes.c_int64),
        ("writer_start", ctypes.c_uint64),
        ("next_seq", ctypes.c_int64),
        ("mutex", ctypes.c_uint64 * (_posix.MUTEX_BYTES // 8)),
    ]


class _ForeignLayout(FileNotFoundError):
    """A control segment of another dataplane version (its own layout and lock)."""


class _Slot(ctypes.Structure):
    _fields_ = [
        ("seq", ctypes.c_int64),  # step index it holds; -1 while empty or being written
        ("gen", ctypes.c_uint32),  # bumped when the segment is replaced by a larger one
        ("_pad", ctypes.c_uint32),
        ("capacity", ctypes.c_uint64),
        ("vars_len", ctypes.c_uint32),  # JSON of the variables at offset 0 of the segment
        ("attrs_len", ctypes.c_uint32),  # JSON of the step attributes right after it
        ("data_off", ctypes.c_uint64),  # where the arrays start
    ]


class _Sub(ctypes.Structure):
    _fields_ = [
        ("pid", ctypes.c_int64),
        ("start", ctypes.c_uint64),
        ("cursor", ctypes.c_int64),  # next step index wanted
        ("current", ctypes.c_int64),  # step index pinned (being read), -1 for none
        ("active", ctypes.c_uint32),
        ("_pad", ctypes.c_uint32),
    ]


def _control_type(nslots: int, nsubs: int, attrs_cap: int) -> type[ctypes.Structure]:
    class _Control(ctypes.Structure):
        _fields_ = [
            ("h", _Header),
            ("slots", _Slot * nslots),
            ("subs", _Sub * nsubs),
            ("attrs", ctypes.c_char * attrs_cap),
        ]

    return _Control


def _align(n: int, a: int = _ALIGN) -> int:
    return (n + a - 1) // a * a


def _ctl_name(token: str) -> str:
    return f"dp-{token}-ctl"


def _slot_name(token: str, slot: int, gen: int) -> str:
    return f"dp-{token}-s{slot}g{gen}"


def default_dir() -> str:
    env = os.environ.get("DATAPLANE_SHM_DIR")
    if env:
        return env
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg and os.path.isdir(xdg):
        return os.path.join(xdg, "dataplane")
    return os.path.join(tempfile.gettempdir(), f"dataplane-{os.getuid()}")


def _private_dir(path: str) -> str:
    """Create or check a directory only this user can use (channel files name our segments)."""
    os.makedirs(path, mode=0o700, exist_ok=True)
    st = os.lstat(path)
    if not os.path.isdir(path) or os.path.islink(path) or st.st_uid != os.getuid():
        raise DataplaneError(
            f"{path} must be a directory owned by you (uid {os.getuid()}), not a link; "
            f"remove it or pass dir= / set DATAPLANE_SHM_DIR"
        )
    if st.st_mode & 0o077:
        os.chmod(path, 0o700)
    return path


@contextlib.contextmanager
def _dir_lock(path: str) -> Iterator[None]:
    fd = os.open(os.path.join(path, ".lock"), os.O_CREAT | os.O_RDWR, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _read_channel_file(path: str) -> dict[str, Any] | None:
    try:
        with open(path, "rb") as f:
            info = json.loads(f.read())
    except (FileNotFoundError, ValueError):
        return None
    if not (isinstance(info, dict) and re.fullmatch(r"[0-9a-f]{16}", str(info.get("token")))):
        return None
    return info


def _write_channel_file(path: str, info: dict[str, Any]) -> None:
    tmp = f"{path}.{secrets.token_hex(4)}.tmp"
    fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(info, f)
    os.replace(tmp, path)


class _Lock:
    """The channel lock where the C library has no robust process-shared mutex: ``flock`` on
    the control segment, plus a thread lock because flock does not exclude threads sharing one
    open file description. (The mutex costs half as much per step, with no system call.)"""

    __slots__ = ("fd", "_tlock")

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._tlock = threading.Lock()

    def __enter__(self) -> None:
        self._tlock.acquire()
        try:
            # Holders keep the lock for microseconds: retrying is cheaper than sleeping in
            # the kernel and being woken, which dominates when writer and reader collide.
            for _ in range(_LOCK_TRIES):
                try:
                    fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    return
                except BlockingIOError:
                    pass
            fcntl.flock(self.fd, fcntl.LOCK_EX)
        except BaseException:
            self._tlock.release()
            raise

    def __exit__(self, *exc: object) -> None:
        try:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
        finally:
            self._tlock.release()


class _Control:
    """A mapped control segment: typed access to the shared tables, the lock, the futexes."""

    def __init__(self, token: str, fd: int, mm: Any, nslots: int, nsubs: int, attrs_cap: int):
        self.token = token
        self.fd = fd
        self.mm = mm
        self.c = _control_type(nslots, nsubs, attrs_cap).from_buffer(mm)
        self.h = self.c.h
        # Element objects made once: indexing a ctypes array builds a new object per access.
        self.slots = list(self.c.slots)
        self.subs = list(self.c.subs)
        base = ctypes.addressof(self.h)
        self.published_addr = base + _Header.published.offset
        self.released_addr = base + _Header.released.offset
        self.attrs_addr = ctypes.addressof(self.c) + type(self.c).attrs.offset
        self.mutex_addr = base + _Header.mutex.offset
        self.locked: Any = _Lock(fd)
        if self.h.lock_kind == _MUTEX:
            self.locked = _posix.SharedMutex(self.mutex_addr)
        self._pid = os.getpid()

    @classmethod
    def create(cls, token: str, nslots: int, nsubs: int) -> _Control:
        size = ctypes.sizeof(_control_type(nslots, nsubs, _ATTRS_CAP))
        fd, mm = _posix.create_segment(_ctl_name(token), size)
        fcntl.flock(fd, fcntl.LOCK_EX)  # sweepers wait until the header is written
        try:
            ctl = cls(token, fd, mm, nslots, nsubs, _ATTRS_CAP)
            h = ctl.h
            if _posix.init_shared_mutex(ctl.mutex_addr):
                h.lock_kind = _MUTEX
                ctl.locked = _posix.SharedMutex(ctl.mutex_addr)
            h.version, h.nslots, h.nsubs, h.attrs_cap = _VERSION, nslots, nsubs, _ATTRS_CAP
            h.writer_pid, h.writer_start = _posix.my_identity()
            for s in ctl.slots:
                s.seq = -1
            for sub in ctl.subs:
                sub.current = -1
            h.magic = _MAGIC
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
        return ctl

    @classmethod
    def attach(cls, token: str) -> _Control:
        """Map an existing control segment; FileNotFoundError if it is gone or half made."""
        fd, mm = _posix.open_segment(_ctl_name(token), writable=True)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            fcntl.flock(fd, fcntl.LOCK_UN)
            h = _Header.from_buffer_copy(mm, 0)
            if h.magic != _MAGIC or h.version != _VERSION:
                if h.magic >> 16 == _MAGIC >> 16:
                    raise _ForeignLayout(
                        f"segment {_ctl_name(token)} is a channel of another dataplane version "
                        f"(layout {h.magic & 0xFFFF}, this one reads {_MAGIC & 0xFFFF})"
                    )
                raise FileNotFoundError(f"segment {_ctl_name(token)} is not a dataplane channel")
            return cls(token, fd, mm, h.nslots, h.nsubs, h.attrs_cap)
        except BaseException:
            os.close(fd)
            raise

    def bump(self, which: str) -> None:
        """Advance a futex word (under the lock) and wake its sleepers, if any."""
        h = self.h
        if which == "published":
            h.published = (h.published + 1) & _U32
            if h.pub_waiters:
                _posix.futex_wake(self.published_addr)
        else:
            h.released = (h.released + 1) & _U32
            if h.rel_waiters:
                _posix.futex_wake(self.released_addr)

    def wait(self, which: str, seen: int, timeout: float) -> None:
        """Sleep until futex word ``which`` moves past ``seen`` (call without the lock).

        Spins for a few microseconds first: when the other side is about to publish or
        release, that saves two context switches, which dominate small-step latency.
        """
        h = self.h
        spin_until = time.perf_counter() + min(timeout, _SPIN)
        while time.perf_counter() < spin_until:
            if getattr(h, which) != seen:
                return
        field = "pub_waiters" if which == "published" else "rel_waiters"
        with self.locked:
            if getattr(self.h, which) != seen:
                return
            setattr(self.h, field, getattr(self.h, field) + 1)
        try:
            _posix.futex_wait(
                self.published_addr if which == "published" else self.released_addr, seen, timeout
            )
        finally:
            with self.locked:
                setattr(self.h, field, max(0, getattr(self.h, field) - 1))

    def live_subscribers(self) -> list[_Sub]:
        return [s for s in self.subs[: self.h.sub_hwm] if s.active]

    def reap(self) -> int:
        """Deactivate subscribers whose process is gone (under the lock). Returns how many."""
        n = 0
        for s in self.live_subscribers():
            if not _posix.is_alive(s.pid, s.start):
                s.active, s.current = 0, -1
                n += 1
        if n:
            self.bump("released")
        return n

    def writer_alive(self) -> bool:
        return _posix.is_alive(self.h.writer_pid, self.h.writer_start)

    def unlink_all(self) -> None:
        """Remove every segment of this channel (under the lock; nobody may use it after)."""
        self.h.unlinked = 1
        names = {_ctl_name(self.token)}
        names.update(
            _slot_name(self.token, i, s.gen) for i, s in enumerate(self.slots) if s.capacity
        )
        names.update(_posix.list_segments(f"dp-{self.token}-"))
        for name in names:
            _posix.unlink_segment(name)

    def read_attrs(self) -> dict[str, AttrValue]:
        n = self.h.attrs_len
        return json.loads(ctypes.string_at(self.attrs_addr, n)) if n else {}

    def close(self) -> None:
        # The mapping itself is released when the last view into it is collected.
        self.h = self.slots = self.subs = self.c = None  # type: ignore[assignment]
        if self.fd >= 0 and os.getpid() == self._pid:
            os.close(self.fd)
        self.fd = -1


def sweep(directory: str | None = None) -> list[str]:
    """Remove segments and channel files left behind by crashed writers and subscribers.

    A channel is stale when its writer is gone or closed and none of its subscribers lives.
    Returns the tokens of the channels removed. Runs whenever a writer opens.
    """
    removed = []
    for name in _posix.list_segments("dp-"):
        m = _CTL_RE.match(name)
        if not m:
            continue
        token = m.group(1)
        try:
            ctl = _Control.attach(token)
        except _ForeignLayout:
            continue  # another version's to judge, with its own lock
        except FileNotFoundError:
            if _posix.segment_age(name) > 60:  # a creator died before writing the header
                for seg in _posix.list_segments(f"dp-{token}-"):
                    _posix.unlink_segment(seg)
                removed.append(token)
            continue
        except PermissionError:
            continue
        try:
            with ctl.locked:
                if ctl.h.unlinked:
                    continue
                writer_done = ctl.h.state != _OPEN or not ctl.writer_alive()
                ctl.reap()
                if writer_done and not ctl.live_subscribers():
                    ctl.unlink_all()
                    removed.append(token)
        finally:
            ctl.close()
    # Orphaned segments whose control segment is already gone (a crash during cleanup).
    tokens_alive = {m.group(1) for n in _posix.list_segments("dp-") if (m := _CTL_RE.match(n))}
    for name in _posix.list_segments("dp-"):
        m = re.match(r"dp-([0-9a-f]{16})-s\d+g\d+\Z", name)
        if m and m.group(1) not in tokens_alive and _posix.segment_age(name) > 60:
            _posix.unlink_segment(name)
    if directory is not None and os.path.isdir(directory):
        for fname in os.listdir(directory):
            if fname.endswith(".json"):
                info = _read_channel_file(os.path.join(directory, fname))
                if info is None or not _posix.list_segments(f"dp-{info['token']}-ctl"):
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(os.path.join(directory, fname))
    return removed


def _deadline(timeout: float | None) -> float | None:
    return None if timeout is None else time.monotonic() + timeout


def _left(deadline: float | None) -> float:
    return _POLL if deadline is None else max(0.0, deadline - time.monotonic())
