"""``shm://name``: a shared-memory channel between processes on one node.

One copy in, zero copies out: the writer copies each array once into a shared slot; every
subscriber gets read-only numpy views of that slot. **A view is valid until its subscriber
takes the next step**; after that the writer may reuse the slot. Copy what you keep.

Layout
    A *control segment* holds a header, a slot table, a subscriber table and the channel
    attributes. Each *slot segment* holds one step: its metadata (JSON: index, attributes,
    variable names, dtypes, shapes, offsets) followed by the arrays, 64-byte aligned. Slots grow
    when a step does not fit. The writer publishes a step by setting its slot's ``seq`` under
    the channel lock, so a reader never sees a partial step.

Synchronisation
    The channel lock is ``flock`` on the control segment (the kernel releases it when a holder
    dies, so a crash never deadlocks the channel). Readers sleep on a futex that the writer
    bumps per step; the writer sleeps on another that readers bump when they advance.

Liveness
    Readers check every 0.1 s of waiting whether the writer process still exists (pid and start
    time), and raise ``ChannelBroken`` once it is gone and every completed step was delivered.
    The writer, when waiting under ``policy="block"``, reaps subscribers whose process died and
    releases their slots. Under ``"drop-oldest"`` a dead subscriber holds one slot at most and
    never stalls the writer.

Names and cleanup
    Segments are named ``dp-<64 random bits>-...``, created exclusively with mode 0600. A small
    channel file ``<dir>/<name>.json`` (``dir`` is private to the user, mode 0700) maps the
    channel name to those segments. The last one out (writer or subscriber) unlinks them; a
    writer opening any channel sweeps segments left by crashed processes.

Options
-------
rendezvous : int
    ``publish`` waits until this many subscribers are attached (default 0).
rendezvous_timeout : float
    Seconds to wait for them (default 60), then ``StepTimeoutError``.
block_timeout : float or None
    Under ``policy="block"``, seconds a write may wait for slow subscribers (default None:
    as long as they live), then ``StepTimeoutError``.
max_subscribers : int
    Size of the subscriber table (default 16, at most 1024).
dir : str or None
    Directory for channel files; default ``$DATAPLANE_SHM_DIR``, else
    ``$XDG_RUNTIME_DIR/dataplane``, else ``<tmp>/dataplane-<uid>``.
start_index : int
    Index of the first step this writer will publish (default 0), for writers that forward
    another channel's steps: subscribers attached before it count drops from there.
"""

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
from typing import Any, NamedTuple

import numpy as np

from dataplane.errors import (
    ChannelBroken,
    ChannelBusyError,
    DataplaneError,
    OptionError,
    SchemaError,
    StepTimeoutError,
)
from dataplane.model import (
    AttrValue,
    ChannelURL,
    Selection,
    StepMeta,
    VarSpec,
    check_name,
    check_seconds,
    check_timeout,
)
from dataplane.transports import _posix
from dataplane.transports.base import Reader, Transport, Writer

__all__ = ["ShmTransport", "sweep"]

_MAGIC = 0x6470_6C61_6E65_0001  # "dplane" + layout 1
_VERSION = 1
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
        ("_pad", ctypes.c_uint32),
        ("writer_pid", ctypes.c_int64),
        ("writer_start", ctypes.c_uint64),
        ("next_seq", ctypes.c_int64),
    ]


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
    """The channel lock: ``flock`` on the control segment, plus a thread lock because flock
    does not exclude threads sharing one open file description."""

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
        self.locked = _Lock(fd)
        self._pid = os.getpid()

    @classmethod
    def create(cls, token: str, nslots: int, nsubs: int) -> _Control:
        size = ctypes.sizeof(_control_type(nslots, nsubs, _ATTRS_CAP))
        fd, mm = _posix.create_segment(_ctl_name(token), size)
        fcntl.flock(fd, fcntl.LOCK_EX)  # sweepers wait until the header is written
        try:
            ctl = cls(token, fd, mm, nslots, nsubs, _ATTRS_CAP)
            h = ctl.h
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


class ShmTransport(Transport):
    scheme = "shm"
    scope = "node"
    supports_drop_policy = True
    supports_zero_copy = True
    supports_replay = True

    def __init__(
        self,
        url: ChannelURL,
        *,
        rendezvous: int = 0,
        rendezvous_timeout: float = 60.0,
        block_timeout: float | None = None,
        max_subscribers: int = 16,
        dir: str | None = None,
        start_index: int = 0,
    ) -> None:
        super().__init__(url)
        self.start_index = int(start_index)
        self.name = check_name(url.path, "channel")
        if not 1 <= int(max_subscribers) <= 1024:
            raise OptionError(f"max_subscribers must be between 1 and 1024, got {max_subscribers}")
        if int(rendezvous) < 0 or int(rendezvous) > int(max_subscribers):
            raise OptionError(
                f"rendezvous must be between 0 and max_subscribers={max_subscribers}, "
                f"got {rendezvous}"
            )
        self.rendezvous = int(rendezvous)
        self.rendezvous_timeout = check_seconds(rendezvous_timeout, "rendezvous_timeout")
        self.block_timeout = check_timeout(block_timeout, "block_timeout")
        self.max_subscribers = int(max_subscribers)
        self.dir = dir or default_dir()

    @property
    def channel_file(self) -> str:
        return os.path.join(self.dir, f"{self.name}.json")

    def open_writer(self, *, policy: str, queue_limit: int, mode: str) -> Writer:
        if mode == "a":
            raise OptionError("shm:// streams are not stored, so there is nothing to append to")
        return _ShmWriter(self, policy, queue_limit)

    def open_reader(self, *, start: str, vars: tuple[str, ...] | None) -> Reader:
        return _ShmReader(self, start)


def _deadline(timeout: float | None) -> float | None:
    return None if timeout is None else time.monotonic() + timeout


def _left(deadline: float | None) -> float:
    return _POLL if deadline is None else max(0.0, deadline - time.monotonic())


class _Pending(NamedTuple):
    slot: int
    step: int
    views: dict[str, np.ndarray | None]
    vars_len: int
    attrs_len: int
    data_off: int


class _WriterSlot:
    """What the writer knows of one of its slots (it alone changes them)."""

    __slots__ = ("gen", "capacity", "mm", "head", "views")

    def __init__(self, gen: int = 0, capacity: int = 0, mm: Any = None) -> None:
        self.gen, self.capacity, self.mm = gen, capacity, mm
        self.head = b""  # metadata bytes currently at the start of the slot
        self.views: dict[tuple, dict[str, np.ndarray | None]] = {}


class _ShmWriter(Writer):
    def __init__(self, t: ShmTransport, policy: str, queue_limit: int) -> None:
        self._t = t
        self._policy = policy
        self._queue_limit = queue_limit
        self._pending: _Pending | None = None
        self._layouts: dict[tuple, tuple[tuple, bytes, dict[str, int], int]] = {}
        self._closed = False
        self._pid = os.getpid()
        self._last_reap = 0.0
        nslots = queue_limit + (1 if policy == "block" else t.max_subscribers)
        directory = _private_dir(t.dir)
        with _dir_lock(directory):
            sweep(directory)
            info = _read_channel_file(t.channel_file)
            if info is not None:
                self._refuse_if_live(info)
            self._token = secrets.token_hex(8)
            self._ctl = _Control.create(self._token, nslots, t.max_subscribers)
            self._seqs = [-1] * nslots
            self._wslots = [_WriterSlot() for _ in range(nslots)]
            h = self._ctl.h
            h.policy, h.queue_limit = _POLICY_CODE[policy], queue_limit
            h.next_seq = t.start_index
            pid, start = _posix.my_identity()
            _write_channel_file(t.channel_file, {"token": self._token, "pid": pid, "start": start})
        if t.rendezvous:
            self._rendezvous()

    def _refuse_if_live(self, info: dict[str, Any]) -> None:
        try:
            ctl = _Control.attach(info["token"])
        except (FileNotFoundError, PermissionError):
            return
        try:
            with ctl.locked:
                live = ctl.h.state == _OPEN and ctl.writer_alive() and not ctl.h.unlinked
                pid = ctl.h.writer_pid
        finally:
            ctl.close()
        if live:
            raise ChannelBusyError(
                f"{self._t.url.url} already has a live writer (pid {pid}); one writer per "
                f"channel. Close it first or pick another name."
            )

    def _rendezvous(self) -> None:
        ctl, want = self._ctl, self._t.rendezvous
        deadline = _deadline(self._t.rendezvous_timeout)
        while True:
            with ctl.locked:
                ctl.reap()
                have = len(ctl.live_subscribers())
                seen = ctl.h.released
            if have >= want:
                return
            left = _left(deadline)
            if left == 0.0:
                self.close(failed=True)
                raise StepTimeoutError(
                    f"{self._t.url.url}: {have} of {want} subscribers attached within "
                    f"rendezvous_timeout={self._t.rendezvous_timeout}s"
                )
            ctl.wait("released", seen, min(left, _POLL))

    def _check_usable(self) -> None:
        if self._closed:
            raise DataplaneError(f"writer of {self._t.url.url} is closed")
        if os.getpid() != self._pid:
            raise DataplaneError(
                f"writer of {self._t.url.url} was opened in process {self._pid}; open a new one "
                f"in this process"
            )

    def _choose(self, index: int) -> int | None:
        """Pick a slot for step ``index`` (under the lock), or None if it must wait."""
        seqs, ql = self._seqs, self._queue_limit  # the writer alone sets seq: its own copy
        pinned = set()
        min_cursor = None
        for s in self._ctl.live_subscribers():
            c, cur = s.cursor, s.current
            if min_cursor is None or c < min_cursor:
                min_cursor = c
            if cur >= 0:
                pinned.add(cur)
        if self._policy != "block":
            min_cursor = None  # nothing is "needed": slow subscribers lose the oldest steps
        elif min_cursor is not None:
            # Count the slowest subscriber's unconsumed steps rather than compare indices:
            # indices need not start at its cursor or be contiguous (appends, relays).
            if sum(seq >= min_cursor for seq in seqs) >= ql:
                return None
        empty = seqs.count(-1)
        if empty and len(seqs) - empty < ql:
            # Prefer a slot that already has memory.
            ws = self._wslots
            return max((i for i, seq in enumerate(seqs) if seq < 0), key=lambda i: ws[i].capacity)
        oldest, slot = None, None
        for i, seq in enumerate(seqs):
            if seq < 0 or seq in pinned or (min_cursor is not None and min_cursor <= seq):
                continue
            if oldest is None or seq < oldest:
                oldest, slot = seq, i
        if slot is not None:
            return slot
        return seqs.index(-1) if empty else None

    def _acquire(self, index: int) -> int:
        ctl = self._ctl
        deadline = _deadline(self._t.block_timeout)
        while True:
            with ctl.locked:
                slot = self._choose(index)
                if slot is None and time.monotonic() - self._last_reap > _REAP_EVERY:
                    self._last_reap = time.monotonic()
                    if ctl.reap():
                        slot = self._choose(index)
                if slot is not None:
                    ctl.slots[slot].seq = self._seqs[slot] = -1  # readers skip it from now
                    return slot
                seen = ctl.h.released
            left = _left(deadline)
            if left == 0.0:
                raise StepTimeoutError(
                    f"{self._t.url.url}: subscribers did not free a slot for step {index} within "
                    f"block_timeout={self._t.block_timeout}s (policy='block', "
                    f"queue_limit={self._queue_limit})"
                )
            ctl.wait("released", seen, min(left, _POLL))

    def _slot_memory(self, slot: int, size: int) -> _WriterSlot:
        """The writer's mapping of ``slot``, replaced by a larger segment if ``size`` won't fit."""
        ws = self._wslots[slot]
        if ws.capacity >= size:
            return ws
        cap = _align(max(size, int(ws.capacity * 1.5), 1), _SLOT_GRANULE)
        fd, mm = _posix.create_segment(_slot_name(self._token, slot, ws.gen + 1), cap)
        os.close(fd)
        with self._ctl.locked:
            s = self._ctl.slots[slot]
            s.gen, s.capacity = ws.gen + 1, cap
        if ws.capacity:
            _posix.unlink_segment(_slot_name(self._token, slot, ws.gen))
        self._wslots[slot] = ws = _WriterSlot(ws.gen + 1, cap, mm)
        return ws

    def _layout(self, specs: dict[str, VarSpec]) -> tuple[tuple, bytes, dict[str, int], int]:
        """Variables' JSON, offsets and data size; cached, as steps usually repeat their layout."""
        key = tuple((n, sp.dtype, sp.shape) for n, sp in specs.items())
        hit = self._layouts.get(key)
        if hit is None:
            offsets: dict[str, int] = {}
            entries, offset = [], 0
            for name, spec in specs.items():
                offsets[name] = offset
                entries.append([name, spec.dtype.str, list(spec.shape), offset])
                offset = _align(offset + spec.nbytes)
            hit = (key, json.dumps(entries).encode(), offsets, offset)
            if len(self._layouts) > 64:
                self._layouts.clear()
            self._layouts[key] = hit
        return hit

    def begin_step(
        self, index: int, specs: dict[str, VarSpec], attrs: dict[str, AttrValue]
    ) -> None:
        self._check_usable()
        key, vars_json, offsets, size = self._layout(specs)
        attrs_json = json.dumps(attrs).encode() if attrs else b"{}"
        head = vars_json + attrs_json
        data_off = _align(len(head))
        slot = self._acquire(index)
        try:
            ws = self._slot_memory(slot, data_off + size)
        except BaseException:
            self._release_unused(slot)
            raise
        if ws.head != head:
            ws.mm[: len(head)] = head
            ws.head = head
        views = ws.views.get((key, data_off))
        if views is None:
            # Destination arrays over the slot, made once per layout and reused every lap.
            views = {
                name: np.ndarray(
                    spec.shape, spec.dtype, buffer=ws.mm, offset=data_off + offsets[name]
                )
                if spec.size
                else None
                for name, spec in specs.items()
            }
            if len(ws.views) > 8:
                ws.views.clear()
            ws.views[(key, data_off)] = views
        self._pending = _Pending(slot, index, views, len(vars_json), len(attrs_json), data_off)

    def put(self, name: str, array: np.ndarray) -> None:
        p = self._pending
        if p is None:
            raise DataplaneError("put() outside a step")
        dst = p.views[name]
        if dst is not None:
            np.copyto(dst, array, casting="no")

    def end_step(self) -> None:
        p = self._pending
        if p is None:
            raise DataplaneError("end_step() outside a step")
        self._pending = None
        ctl = self._ctl
        with ctl.locked:
            s = ctl.slots[p.slot]
            s.vars_len, s.attrs_len, s.data_off = p.vars_len, p.attrs_len, p.data_off
            s.seq = self._seqs[p.slot] = p.step
            ctl.h.next_seq = p.step + 1
            ctl.bump("published")

    def _release_unused(self, slot: int) -> None:
        with self._ctl.locked:
            self._ctl.slots[slot].seq = self._seqs[slot] = -1

    def abort_step(self) -> None:
        # The slot was retired (seq = -1) when it was taken; nothing of the step is visible.
        self._pending = None

    def set_attrs(self, attrs: dict[str, AttrValue]) -> None:
        self._check_usable()
        data = json.dumps(attrs, allow_nan=True).encode()
        ctl = self._ctl
        if len(data) > ctl.h.attrs_cap:
            raise SchemaError(
                f"{self._t.url.url}: channel attributes take {len(data)} bytes as JSON; the "
                f"limit is {ctl.h.attrs_cap}. Put large values in a variable instead."
            )
        with ctl.locked:
            ctypes.memmove(ctl.attrs_addr, data, len(data))
            ctl.h.attrs_len = len(data)

    def close(self, failed: bool = False) -> None:
        if self._closed:
            return
        self._closed = True
        self._pending = None
        if os.getpid() != self._pid:
            return  # a forked child: the channel belongs to the parent
        ctl = self._ctl
        with ctl.locked:
            ctl.h.state = _FAILED if failed else _CLOSED
            ctl.reap()
            if not ctl.live_subscribers():
                ctl.unlink_all()
            ctl.bump("published")
        with _dir_lock(self._t.dir):
            info = _read_channel_file(self._t.channel_file)
            if info is not None and info["token"] == self._token:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self._t.channel_file)
        self._wslots = []
        ctl.close()


class _ShmReader(Reader):
    def __init__(self, t: ShmTransport, start: str) -> None:
        self._t = t
        self._start = start
        self._ctl: _Control | None = None
        self._me = -1
        self._maps: dict[int, tuple[int, Any]] = {}  # slot -> (gen, read-only mmap)
        self._cur_mm: Any = None
        self._cur_off = 0
        self._cur_vars: dict[str, tuple[VarSpec, int]] = {}
        self._vars_raw = b""
        self._vars_layout: dict[str, tuple[VarSpec, int]] = {}
        self._vars_specs: dict[str, VarSpec] = {}
        self._closed = False
        self._pid = os.getpid()
        self._writer_pid = 0
        self._alive_checked = 0.0
        # Connect now if the channel exists, so steps written from now on are kept for us.
        self._connect(None, wait=False)

    def _connect(self, deadline: float | None, *, wait: bool = True) -> bool:
        """Attach to the channel and register; with ``wait``, until ``deadline``."""
        while True:
            info = _read_channel_file(self._t.channel_file)
            if info is not None:
                try:
                    ctl = _Control.attach(info["token"])
                except FileNotFoundError:
                    ctl = None
                if ctl is not None and self._register(ctl):
                    return True
            if not wait:
                return False
            left = _left(deadline)
            if left == 0.0:
                return False
            time.sleep(min(left, 0.02))

    def _register(self, ctl: _Control) -> bool:
        """Take a row of the subscriber table of a live channel; False if it is not live."""
        free: int | None = None
        live = False
        with ctl.locked:
            h = ctl.h
            # A channel whose writer closed or died is not joined: a new writer may come.
            live = not h.unlinked and h.state == _OPEN and ctl.writer_alive()
            if live:
                free = next((i for i, s in enumerate(ctl.subs) if not s.active), None)
                if free is None and ctl.reap():
                    free = next((i for i, s in enumerate(ctl.subs) if not s.active), None)
            if free is not None:
                s = ctl.subs[free]
                kept = [sl.seq for sl in ctl.slots if sl.seq >= 0]
                s.cursor = min(kept) if (self._start == "first" and kept) else h.next_seq
                self.first_index = s.cursor
                s.current = -1
                s.pid, s.start = _posix.my_identity()
                s.active = 1
                h.sub_hwm = max(h.sub_hwm, free + 1)
                self._writer_pid = h.writer_pid
                ctl.bump("released")
        if free is None:
            nsubs = ctl.h.nsubs
            ctl.close()
            if live:
                raise DataplaneError(
                    f"{self._t.url.url} already has {nsubs} subscribers; open the publisher "
                    f"with max_subscribers=N for more"
                )
            return False
        self._ctl, self._me = ctl, free
        self._alive_checked = time.monotonic()
        return True

    def next_step(self, timeout: float | None) -> StepMeta | None:
        if os.getpid() != self._pid:
            raise DataplaneError(
                f"subscriber of {self._t.url.url} was opened in process {self._pid}; subscribe "
                f"again in this process"
            )
        self._cur_mm, self._cur_vars = None, {}
        deadline = _deadline(timeout)
        if self._ctl is None and not self._connect(deadline):
            raise StepTimeoutError(
                f"{self._t.url.url}: no writer opened the channel within {timeout}s "
                f"(looked for {self._t.channel_file})"
            )
        ctl = self._ctl
        assert ctl is not None
        me = ctl.subs[self._me]
        while True:
            found = None
            with ctl.locked:
                if not me.active or me.pid != _posix.my_identity()[0]:
                    raise ChannelBroken(
                        f"{self._t.url.url}: this subscriber was removed from the channel "
                        f"(its process looked dead to the writer)"
                    )
                moved = me.current >= 0
                me.current = -1
                best, best_seq = -1, -1
                for i, sl in enumerate(ctl.slots):
                    seq = sl.seq
                    if seq >= me.cursor and (best < 0 or seq < best_seq):
                        best, best_seq = i, seq
                if best >= 0:
                    sl = ctl.slots[best]
                    me.current, me.cursor = best_seq, best_seq + 1
                    found = (best, sl.gen, best_seq, sl.vars_len, sl.attrs_len, sl.data_off)
                    moved = True
                if moved:
                    ctl.bump("released")
                state, seen = ctl.h.state, ctl.h.published
            if found is not None:
                return self._load(*found)
            if state == _CLOSED:
                return None
            if state == _FAILED:
                raise ChannelBroken(
                    f"{self._t.url.url}: the writer failed (raised inside its 'with' block or was "
                    f"abandoned without close()); every step it completed was delivered"
                )
            now = time.monotonic()
            if now - self._alive_checked >= _POLL:
                self._alive_checked = now
                if not ctl.writer_alive():
                    raise ChannelBroken(
                        f"{self._t.url.url}: the writer process (pid {self._writer_pid}) died; "
                        f"every step it completed was delivered"
                    )
            left = _left(deadline)
            if left == 0.0:
                raise StepTimeoutError(
                    f"{self._t.url.url}: no step after {me.cursor - 1} within {timeout}s (the "
                    f"writer, pid {self._writer_pid}, is alive)"
                )
            ctl.wait("published", seen, min(left, _POLL))

    def _load(
        self, slot: int, gen: int, seq: int, vars_len: int, attrs_len: int, data_off: int
    ) -> StepMeta:
        assert self._ctl is not None
        known = self._maps.get(slot)
        if known is None or known[0] != gen:
            try:
                fd, mm = _posix.open_segment(_slot_name(self._ctl.token, slot, gen), writable=False)
            except FileNotFoundError:
                raise ChannelBroken(
                    f"{self._t.url.url}: the segment of step {seq} is gone (the channel was "
                    f"cleaned up after its writer died)"
                ) from None
            os.close(fd)
            self._maps[slot] = known = (gen, mm)
        mm = known[1]
        raw_vars = mm[:vars_len]
        if raw_vars != self._vars_raw:
            entries = json.loads(raw_vars)
            self._vars_raw = raw_vars
            self._vars_layout = {
                e[0]: (VarSpec(np.dtype(e[1]), tuple(e[2])), e[3]) for e in entries
            }
            self._vars_specs = {k: v[0] for k, v in self._vars_layout.items()}
        attrs = json.loads(mm[vars_len : vars_len + attrs_len]) if attrs_len > 2 else {}
        self._cur_mm, self._cur_off, self._cur_vars = mm, data_off, self._vars_layout
        return StepMeta(seq, attrs, self._vars_specs)

    def get(self, name: str, selection: Selection) -> np.ndarray:
        spec, off = self._cur_vars[name]
        if spec.size == 0:
            arr = np.empty(spec.shape, spec.dtype)
            arr.flags.writeable = False
        else:
            arr = np.frombuffer(
                self._cur_mm, spec.dtype, count=spec.size, offset=self._cur_off + off
            ).reshape(spec.shape)
        return selection.apply(arr)

    def attrs(self) -> dict[str, AttrValue]:
        if self._ctl is None:
            return {}
        with self._ctl.locked:
            return self._ctl.read_attrs()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._cur_mm, self._cur_vars = None, {}
        self._maps.clear()
        ctl = self._ctl
        if ctl is None or os.getpid() != self._pid:
            return
        with ctl.locked:
            me = ctl.subs[self._me]
            if me.active and me.pid == _posix.my_identity()[0]:
                me.active, me.current = 0, -1
            writer_done = ctl.h.state != _OPEN or not ctl.writer_alive()
            if writer_done and not ctl.h.unlinked:
                ctl.reap()
                if not ctl.live_subscribers():
                    ctl.unlink_all()  # the last one out after the writer ended, or crashed
            ctl.bump("released")
        ctl.close()
