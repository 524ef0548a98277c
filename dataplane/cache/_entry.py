"""The format of a cache entry, and the record that vouches for one.

An entry is one file: a header (magic, table length, payload length, xxh3-64 of the table
and payload), a JSON table of its arrays (name, dtype, shape, offset), then the payload, each
array 64-byte aligned. The table is checksummed with the payload: a damaged offset or shape
would otherwise hand out sound bytes as the wrong samples.

A record (``seen/<key>``) holds the entry's identity (inode, size, modification and
change times) when its payload last matched its checksum.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import json
import os
import stat
import struct
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import xxhash

from dataplane.cache._files import NOFOLLOW, Mapping, open_file

MAGIC = b"DPCACHE2"
FAMILY = b"DPCACHE"  # what every format's magic starts with
HEADER = struct.Struct("<8sQQQ")  # magic, table length, payload length, xxh3-64
ALIGN = 64
PAGE = 4096


class Damaged(Exception):
    """An entry that cannot be used; the message says why."""


class Outdated(Damaged):
    """An entry in another version's format (not damage: replaced without alarm)."""


def _padded(nbytes: int) -> int:
    return -(-nbytes // ALIGN) * ALIGN


def layout(arrays: dict[str, np.ndarray]) -> tuple[int, bytes, list[int]]:
    """(file size, table, payload offset of each array) of an entry holding ``arrays``.

    Arrays of a page or more start on a page (the table padded with spaces so that the
    payload does too): a row of 4 KiB then lies in one page, and a batch of such rows copied
    from their mappings took 23 us instead of 28 (a row across two pages costs two TLB
    entries). Smaller arrays are 64-byte aligned."""
    offsets = []
    pos = 0
    for a in arrays.values():
        pos = -(-pos // PAGE) * PAGE if a.nbytes >= PAGE else pos
        offsets.append(pos)
        pos += _padded(a.nbytes)
    table = json.dumps(
        [[n, a.dtype.str, list(a.shape), o] for (n, a), o in zip(arrays.items(), offsets)]
    ).encode()
    if any(a.nbytes >= PAGE for a in arrays.values()):
        table += b" " * (-(HEADER.size + len(table)) % PAGE)
    return _padded(HEADER.size + len(table)) + pos, table, offsets


def write(fd: int, arrays: dict[str, np.ndarray]) -> None:
    """Write the entry of ``arrays`` into ``fd`` (its space already reserved), checksum
    computed from the bytes written.

    One write from offset 0 of the whole file, header first: the page cache then holds it in
    the largest folios the filesystem makes (2 MiB on ext4 and XFS of recent kernels), which
    every later mapping maps with one page-table entry per 2 MiB instead of one per 4 KiB. A
    payload written at the table's offset (not 2 MiB-aligned) got half of it in small folios.
    """
    size, table, offsets = layout(arrays)
    head = _padded(HEADER.size + len(table))
    h = xxhash.xxh3_64(table)
    parts: list[Any] = [b""]  # the header, once the checksum is known
    pos = 0  # in the payload
    for a, at in zip(arrays.values(), offsets):
        gap = b"\0" * (at - pos)
        flat = a.reshape(-1).view(np.uint8)
        pad = b"\0" * (_padded(a.nbytes) - a.nbytes)
        for part in (gap, flat.data if a.nbytes else b"", pad):
            if len(part):
                h.update(part)
                parts.append(part)
        pos = at + _padded(a.nbytes)
    start = HEADER.pack(MAGIC, len(table), size - head, h.intdigest()) + table
    parts[0] = start + b"\0" * (head - len(start))
    _write_all(fd, [p for p in parts if len(p)], size)


def _write_all(fd: int, parts: list[Any], size: int) -> None:
    """``parts`` written at offset 0 of ``fd``, in calls of at most IOV_MAX buffers, resumed
    after a short write."""
    pos, i = 0, 0
    view: list[memoryview] = [memoryview(p).cast("B") for p in parts]
    while i < len(view):
        done = os.pwritev(fd, view[i : i + _IOV_MAX], pos)
        if done <= 0:
            raise OSError(errno.EIO, f"a cache entry write stopped at byte {pos} of {size}")
        pos += done
        while i < len(view) and done >= len(view[i]):
            done -= len(view[i])
            i += 1
        if done:
            view[i] = view[i][done:]


_IOV_MAX = os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 1024


class Mapped:
    """An entry mapped read-only, its header checked (not yet its payload)."""

    def __init__(self, path: str, populate: bool = False) -> None:
        """Raises FileNotFoundError (no entry) or :class:`Damaged`."""
        try:
            fd = os.open(path, os.O_RDONLY | NOFOLLOW)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise Damaged("it is a symbolic link") from None
            raise
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_size < HEADER.size:
                raise Damaged("it is shorter than its header")
            self.bytes = np.asarray(Mapping(fd, st.st_size, populate))
        finally:
            os.close(fd)
        self.stat = st
        magic, self._tlen, plen, self._checksum = HEADER.unpack_from(self.bytes.data, 0)
        if magic != MAGIC and magic.startswith(FAMILY):
            raise Outdated(
                f"it is in format {magic.decode(errors='replace')}, not {MAGIC.decode()}"
            )
        self._head = _padded(HEADER.size + self._tlen)
        if magic != MAGIC or self._head + plen != st.st_size:
            raise Damaged("its header does not match its size")

    def payload_matches(self) -> bool:
        """Whether the table and payload match the checksum."""
        h = xxhash.xxh3_64(self.bytes[HEADER.size : HEADER.size + self._tlen].data)
        h.update(self.bytes[self._head :].data)
        return h.intdigest() == self._checksum

    def arrays(self) -> dict[str, np.ndarray]:
        """Read-only views of the entry's arrays (they keep the mapping alive)."""
        buf, head = self.bytes, self._head
        try:
            table = _table(bytes(buf[HEADER.size : HEADER.size + self._tlen]))
            return {
                name: np.ndarray(shape, dtype, buffer=buf, offset=head + offset)
                for name, dtype, shape, offset in table
            }
        except (ValueError, TypeError) as exc:  # the table is not covered by the checksum
            raise Damaged(f"its table of arrays is not one an entry has ({exc})") from None


@functools.lru_cache(maxsize=256)
def _table(text: bytes) -> tuple[tuple[str, np.dtype, tuple[int, ...], int], ...]:
    """A table parsed (entries of one dataset share theirs: parsed once per process)."""
    return tuple(
        (name, np.dtype(dtype), tuple(shape), offset)
        for name, dtype, shape, offset in json.loads(text)
    )


def identity(st: os.stat_result) -> str:
    """What a record says of an entry: any write, truncation or replacement changes it."""
    return f"{st.st_ino} {st.st_size} {st.st_mtime_ns} {st.st_ctime_ns}\n"


def read_record(path: str) -> str | None:
    try:
        fd = open_file(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        return os.read(fd, 128).decode(errors="replace")
    finally:
        os.close(fd)


def write_record(path: str, st: os.stat_result) -> None:
    """Record that the entry ``st`` describes matched its checksum. A reader that sees a
    half-written record sees no match and hashes the entry itself. The record's time is the
    entry's last use (eviction reads it), which recording is not."""
    fd = open_file(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    try:
        os.write(fd, identity(st).encode())
        os.utime(fd, ns=(st.st_mtime_ns, st.st_mtime_ns))
    finally:
        os.close(fd)


_COARSE_CLOCK = 5  # CLOCK_REALTIME_COARSE: the clock file times are taken from


class Checks:
    """Which entries one process knows to be sound: hashed here, or vouched for by a record
    (``seen/<key>``) that still describes the file. Each entry is hashed once per node."""

    def __init__(self, seen: str) -> None:
        self.seen = seen
        self._known: set[str] = set()
        # Sound here but not yet recorded: key -> the entry's change time.
        self._unrecorded: dict[str, int] = {}

    def record_path(self, key: str) -> str:
        return os.path.join(self.seen, key)

    def check(self, key: str, mapped: Mapped) -> str:
        """``"known"``, ``"vouched"`` (a record matches), ``"hashed"`` (its checksum matched
        now) or ``"bad"``."""
        if key in self._known:
            return "known"
        st = mapped.stat
        if read_record(self.record_path(key)) == identity(st):
            self._known.add(key)
            return "vouched"
        # A write after this moment gives the file a later change time than it has now, so
        # recording what we hash now is safe; within the same clock tick it is not.
        settled = time.clock_gettime_ns(_COARSE_CLOCK) > st.st_ctime_ns
        if not mapped.payload_matches():
            return "bad"
        self.written(key, st)
        if settled:
            self._record(key, st)
        return "hashed"

    def written(self, key: str, st: os.stat_result) -> None:
        """This process wrote the entry (``st``, after its rename): sound, recorded later."""
        self._known.add(key)
        self._unrecorded[key] = st.st_ctime_ns

    def _record(self, key: str, st: os.stat_result) -> None:
        self._unrecorded.pop(key, None)
        # Not written (a full disk): the next process hashes the entry too.
        with contextlib.suppress(OSError):
            write_record(self.record_path(key), st)

    def settle(self, reopen: Callable[[str], Mapped | None], wait: bool = False) -> list[str]:
        """Record the entries that became sound here within the file clock's last tick, once
        it has moved on, hashing each again then (``reopen(key)``: it mapped, or None).
        ``wait``: let the clock move on first. Returns the keys found bad."""
        if not self._unrecorded:
            return []
        if wait:
            time.sleep(0.005)
        now = time.clock_gettime_ns(_COARSE_CLOCK)
        bad = []
        for key, changed in list(self._unrecorded.items()):
            if changed >= now or self._unrecorded.pop(key, None) is None:
                continue  # not yet, or another thread took it
            self._known.discard(key)
            mapped = reopen(key)
            if mapped is not None and self.check(key, mapped) == "bad":
                bad.append(key)
        return bad

    def forget(self, key: str) -> None:
        self._known.discard(key)
        self._unrecorded.pop(key, None)
