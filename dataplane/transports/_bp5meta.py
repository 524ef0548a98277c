"""Checksums of a BP5 file's metadata, kept by dataplane beside ADIOS2's own files.

ADIOS2 trusts its metadata files (``md.idx``, ``md.0``, ``mmd.0``): a few damaged bytes or a
truncation there make its reader crash the whole process (a segmentation fault, 10 of 20 random
trials), and a step whose write failed midway leaves them unreadable. So after each complete
step the writer appends a line to ``dataplane.sums`` in the ``.bp`` directory: the sizes of the
three files and the xxh3-64 of what each gained since the line before. Readers check every
recorded byte before ADIOS2 opens the file (or moves to a step), and a writer whose step failed
cuts the files back to the last line, which is the state after its last complete step.

``md.idx`` byte 39 (ADIOS2's "a writer has the file open" flag) changes at open and close; it
is hashed as zero.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterator

import xxhash

from dataplane.errors import IntegrityError

__all__ = ["FILES", "Checker", "MetaLog", "cut_incomplete"]

LOG = "dataplane.sums"
FILES = ("md.idx", "md.0", "mmd.0")
_ACTIVE_FLAG = 39  # in md.idx
_INDEX_VERSION = 37  # in md.idx: 5 for BP5
_INDEX_HEADER = 64


def _increment(path: str, name: str, start: int, end: int) -> str:
    """xxh3-64 of bytes ``start:end`` of file ``name`` in the directory ``path``."""
    with open(os.path.join(path, name), "rb") as f:
        f.seek(start)
        data = bytearray(f.read(end - start))
    if len(data) != end - start:
        raise EOFError(f"{name} ends at byte {start + len(data)}, before byte {end}")
    if name == "md.idx" and start <= _ACTIVE_FLAG < end:
        data[_ACTIVE_FLAG - start] = 0
    return xxhash.xxh3_64_hexdigest(bytes(data))


def _sizes(path: str) -> list[int]:
    return [os.path.getsize(os.path.join(path, name)) for name in FILES]


def _records(path: str, pos: int = 0) -> Iterator[tuple[int, dict]]:
    """(end offset, record) of the log's complete lines from byte ``pos`` (a line cut short
    by a crash is not one)."""
    try:
        with open(os.path.join(path, LOG), "rb") as f:
            f.seek(pos)
            text = f.read()
    except FileNotFoundError:
        return
    for line in text.split(b"\n")[:-1]:
        pos += len(line) + 1
        try:
            rec = json.loads(line)
        except ValueError:
            return
        if not (
            isinstance(rec, dict) and len(rec.get("s", ())) == 3 and len(rec.get("h", ())) == 3
        ):
            return
        yield pos, rec


def _complete(path: str) -> list[int] | None:
    """The sizes of ``FILES`` up to the end of the last step ADIOS2 completed, read from its
    own records (None where they do not parse as BP5 5.2 does). A writer killed inside a
    step leaves a part of its meta-metadata, metadata or index record after that end."""
    with open(os.path.join(path, "md.idx"), "rb") as f:
        idx = f.read()
    if len(idx) < _INDEX_HEADER or idx[_INDEX_VERSION] != 5:
        return None
    pos = end = _INDEX_HEADER
    md_end = 0
    while pos + 9 <= len(idx):
        kind = idx[pos : pos + 1]
        (length,) = struct.unpack_from("<Q", idx, pos + 1)
        if pos + 9 + length > len(idx):
            break  # cut short
        if kind == b"s":
            if length < 24:
                return None
            at, size = struct.unpack_from("<2Q", idx, pos + 9)
            md_end = at + size
        pos = end = pos + 9 + length
    with open(os.path.join(path, "mmd.0"), "rb") as f:
        mmd = f.read()
    at = mmd_end = 0
    while at + 16 <= len(mmd):
        id_len, info_len = struct.unpack_from("<2Q", mmd, at)
        if at + 16 + id_len + info_len > len(mmd):
            break  # cut short
        at = mmd_end = at + 16 + id_len + info_len
    return [end, md_end, mmd_end]


def cut_incomplete(path: str) -> None:
    """Before a writer appends: cut what a writer killed inside a step left after the last
    complete step. ADIOS2 appends its next records after whatever the files hold, so a part
    of a record left there made every later one unreadable ("no known format for Metadata
    Block"). Never below what the log says complete steps hold (nothing is cut where the
    files do not parse as expected)."""
    logged = [0, 0, 0]
    for _, rec in _records(path):
        logged = list(rec["s"])
    complete = _complete(path)
    if complete is None or any(c < lo for c, lo in zip(complete, logged)):
        return
    for name, size, now in zip(FILES, complete, _sizes(path)):
        if now > size:
            os.truncate(os.path.join(path, name), size)


class MetaLog:
    """The writer's side: one line per complete step, and the way back to the last one."""

    def __init__(self, path: str, fresh: bool) -> None:
        self.path = path
        log = os.path.join(path, LOG)
        if fresh:
            # A new channel: ADIOS2 has just emptied its own files; the old log goes too.
            with open(log, "wb"):
                pass
            self._last = [0, 0, 0]
        else:
            self._last = [0, 0, 0]
            for _, rec in _records(path):
                self._last = list(rec["s"])
            if _sizes(path) != self._last:
                self.record()  # what was there before this writer (an older writer's steps)

    def record(self) -> None:
        """Log the files as they are now (call right after a step is complete)."""
        now = _sizes(self.path)
        hashes = [_increment(self.path, name, a, b) for name, a, b in zip(FILES, self._last, now)]
        line = json.dumps({"s": now, "h": hashes}, separators=(",", ":")) + "\n"
        fd = os.open(os.path.join(self.path, LOG), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line.encode())
        finally:
            os.close(fd)
        self._last = now

    def cut_back(self) -> None:
        """Cut the metadata files back to the last complete step (after a failed one)."""
        for name, size in zip(FILES, self._last):
            p = os.path.join(self.path, name)
            if os.path.getsize(p) > size:
                os.truncate(p, size)


class Checker:
    """The readers' side: checks what the log records, each line once."""

    def __init__(self, path: str, url: str) -> None:
        self.path = path
        self.url = url
        self._pos = 0  # log bytes checked
        self._last = [0, 0, 0]

    def check(self) -> None:
        """Check the lines added since the last call; IntegrityError names file and step."""
        have: list[int] | None = None
        for pos, rec in _records(self.path, self._pos):
            sizes, hashes = list(rec["s"]), rec["h"]
            if have is None:
                have = _sizes(self.path)
            for name, a, b, want, size in zip(FILES, self._last, sizes, hashes, have):
                if size < b:
                    raise IntegrityError(
                        f"{self.url}: BP5 metadata file {name} is cut short: {size} bytes "
                        f"where its complete steps end at {b}; it was truncated"
                    )
                try:
                    got = _increment(self.path, name, a, b)
                except (OSError, EOFError) as exc:
                    raise IntegrityError(
                        f"{self.url}: cannot read BP5 metadata {name}: {exc}"
                    ) from exc
                if got != want:
                    raise IntegrityError(
                        f"{self.url}: BP5 metadata file {name} is damaged (bytes {a}-{b}: "
                        f"checksum {got} != {want} written with them); ADIOS2 cannot read "
                        f"it safely. Re-create the file."
                    )
            self._pos, self._last = pos, sizes
