"""The HDF5 superblock: its end-of-file address and the write flags a crashed SWMR writer
leaves set (cleared so that the file opens again)."""

from __future__ import annotations

import os

from dataplane.errors import DataplaneError

_M = 0xFFFFFFFF


def _rot(x: int, k: int) -> int:
    return ((x << k) | (x >> (32 - k))) & _M


def _lookup3(data: bytes) -> int:
    """Bob Jenkins' lookup3 (hashlittle), which HDF5 uses for metadata checksums."""
    n = len(data)
    a = b = c = (0xDEADBEEF + n) & _M
    i = 0
    while n > 12:
        a = (a + int.from_bytes(data[i : i + 4], "little")) & _M
        b = (b + int.from_bytes(data[i + 4 : i + 8], "little")) & _M
        c = (c + int.from_bytes(data[i + 8 : i + 12], "little")) & _M
        a = (a - c) & _M
        a ^= _rot(c, 4)
        c = (c + b) & _M  # noqa: E702
        b = (b - a) & _M
        b ^= _rot(a, 6)
        a = (a + c) & _M  # noqa: E702
        c = (c - b) & _M
        c ^= _rot(b, 8)
        b = (b + a) & _M  # noqa: E702
        a = (a - c) & _M
        a ^= _rot(c, 16)
        c = (c + b) & _M  # noqa: E702
        b = (b - a) & _M
        b ^= _rot(a, 19)
        a = (a + c) & _M  # noqa: E702
        c = (c - b) & _M
        c ^= _rot(b, 4)
        b = (b + a) & _M  # noqa: E702
        n -= 12
        i += 12
    if n == 0:
        return c
    tail = data[i : i + n] + bytes(12 - n)
    a = (a + int.from_bytes(tail[0:4], "little")) & _M
    b = (b + int.from_bytes(tail[4:8], "little")) & _M
    c = (c + int.from_bytes(tail[8:12], "little")) & _M
    c ^= b
    c = (c - _rot(b, 14)) & _M  # noqa: E702
    a ^= c
    a = (a - _rot(c, 11)) & _M  # noqa: E702
    b ^= a
    b = (b - _rot(a, 25)) & _M  # noqa: E702
    c ^= b
    c = (c - _rot(b, 16)) & _M  # noqa: E702
    a ^= c
    a = (a - _rot(c, 4)) & _M  # noqa: E702
    b ^= a
    b = (b - _rot(a, 14)) & _M  # noqa: E702
    c ^= b
    c = (c - _rot(b, 24)) & _M  # noqa: E702
    return c


def superblock(path: str) -> tuple[int | None, int | None, int]:
    """The superblock's file-consistency flags (None before version 2), where it says the file
    ends (its base address plus end-of-file address; None if no superblock is found at the
    places HDF5 looks: 0, 512, 1024, ...) and the file's size, with one read where the
    superblock is at 0 (opening many files on a parallel filesystem, each read is a round trip)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        size = os.fstat(fd).st_size
        at = 0
        while at + 64 <= size:
            head = os.pread(fd, 64 + 4 * 8, at)
            if head[:8] == b"\x89HDF\r\n\x1a\n":
                version = head[8]
                flags = head[11] if version >= 2 and at == 0 else None
                width = head[9] if version >= 2 else head[13]
                if width not in (2, 4, 8):
                    return flags, None, size
                base_at = {0: 24, 1: 28}.get(version, 12)
                eof_at = base_at + 2 * width
                base = int.from_bytes(head[base_at : base_at + width], "little")
                return flags, base + int.from_bytes(head[eof_at : eof_at + width], "little"), size
            at = 512 if at == 0 else at * 2
        return None, None, size
    finally:
        os.close(fd)


def superblock_flags(path: str) -> int | None:
    """The file-consistency flags of a version 2/3 superblock (None for older superblocks)."""
    with open(path, "rb") as f:
        head = f.read(12)
    if len(head) < 12 or head[:8] != b"\x89HDF\r\n\x1a\n" or head[8] < 2:
        return None
    return head[11]


def clear_write_flags(path: str) -> None:
    """Undo what a killed SWMR writer left in the superblock (``h5clear -s --increment``).

    Clears the "open for (SWMR) write" flags and raises the end-of-allocation address to the
    file's real size (the writer may have allocated space it never recorded). Only called when
    the writer's lease shows it is gone: SWMR writes keep the file itself consistent.
    """
    with open(path, "r+b") as f:
        head = f.read(12)
        if head[:8] != b"\x89HDF\r\n\x1a\n" or head[8] < 2:
            return
        width = head[9]
        size = 12 + 4 * width
        f.seek(0)
        block = bytearray(f.read(size + 4))
        if _lookup3(bytes(block[:size])) != int.from_bytes(block[size:], "little"):
            raise DataplaneError(f"{path}: the HDF5 superblock checksum does not match")
        block[11] = 0
        eoa_at = 12 + 2 * width  # base address, extension address, then end-of-file address
        eoa = int.from_bytes(block[eoa_at : eoa_at + width], "little")
        real = os.path.getsize(path)
        if real > eoa:
            block[eoa_at : eoa_at + width] = real.to_bytes(width, "little")
        f.seek(0)
        f.write(bytes(block[:size]) + _lookup3(bytes(block[:size])).to_bytes(4, "little"))
