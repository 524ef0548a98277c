"""What a dataset's look found of each of its files, kept in the node cache for the next job.

A dataset of many files opens every file at construction to count, describe and locate its
steps (``_sources``): about 2 ms of CPU per HDF5 file here and a dozen metadata round trips on
a parallel filesystem, 0.7-1.2 s for 400 files, longer than a warm epoch over them. The next
job on the node (a restart, the next run of a sweep) would find the same. ``<cache>/looks/``
keeps what a look found of one file, with the file's identity then (size, modification and
change times, inode, device); a later look takes it instead of opening the file while the file
still has that identity. They are held to ``1/SHARE`` of the cache's capacity besides its
entries, the least recently used removed first.

Only a file unchanged for ``SETTLED_S`` before the look began is kept: a writer's commit that
changes no size within the clock tick of its previous write leaves the file's times as they
were, and so would go unseen; the margin also covers writers' clocks that lag ours. An entry
is JSON behind its own checksum; one that does not parse or match is looked at again.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
from typing import Any

import xxhash

from dataplane._look import Described, decode, encode

#: Seconds a file must have been unchanged before a look for what it found to be kept.
SETTLED_S = 30.0
#: The kept looks may take 1/SHARE of the cache's capacity (one look 1/16 of that).
SHARE = 64
_NOFOLLOW = os.O_NOFOLLOW | os.O_CLOEXEC


def identity(st: os.stat_result) -> str:
    """What changes when a file does, whoever changes it (a change time cannot be set back)."""
    return f"{st.st_size} {st.st_mtime_ns} {st.st_ctime_ns} {st.st_ino} {st.st_dev}"


class Looks:
    """The kept looks of one cache directory (``<cache>/looks``) for channels opened with
    ``opts`` (options that change what a look finds, e.g. ``verify``, are part of the key),
    within ``budget`` bytes."""

    def __init__(self, path: str, opts: dict[str, Any], budget: int) -> None:
        self.path, self.budget = path, budget
        self._added = 0  # bytes kept since the last prune
        try:
            self._opts: str | None = json.dumps(opts, sort_keys=True)
        except (TypeError, ValueError):  # options that are not plain data: nothing is kept
            self._opts = None
        self.taken = self.kept = 0  # files taken from here, and kept here (for tests)

    def _file(self, url: str) -> str | None:
        if self._opts is None:
            return None
        return os.path.join(self.path, hashlib.sha1(f"{url}\n{self._opts}".encode()).hexdigest())

    def get(self, url: str, st: os.stat_result) -> tuple[int, list[Described]] | None:
        """(steps, each step's :data:`Described`) of ``url`` as a look found it when the file
        was as ``st`` says it is now; None where none was kept."""
        path = self._file(url)
        if path is None:
            return None
        try:
            fd = os.open(path, os.O_RDONLY | _NOFOLLOW)
        except OSError:
            return None
        with os.fdopen(fd, "rb") as f:
            raw = f.read()
        digest, _, body = raw.partition(b"\n")
        if digest.decode("ascii", "replace") != xxhash.xxh3_64_hexdigest(body):
            return None
        try:
            kept = json.loads(body)
            if kept["url"] != url or kept["file"] != identity(st):
                return None
            steps = [decode(s) for s in kept["steps"]]
        except (KeyError, TypeError, ValueError, IndexError):
            return None
        self.taken += 1
        with contextlib.suppress(OSError):
            os.utime(path, follow_symlinks=False)  # its last use, for pruning
        return len(steps), steps

    def put(self, url: str, st: os.stat_result, steps: list[Described], began_ns: int) -> None:
        """Keep what a look that began at ``began_ns`` (``time.time_ns()``) found of every step
        of ``url`` (``st``: the file before it), if the file was settled then."""
        path = self._file(url)
        if path is None or began_ns - max(st.st_mtime_ns, st.st_ctime_ns) < SETTLED_S * 1e9:
            return
        try:
            encoded = [encode(s) for s in steps]
        except ValueError:
            return
        body = json.dumps({"url": url, "file": identity(st), "steps": encoded}).encode()
        if len(body) > self.budget // 16:
            return
        tmp = f"{path}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
        # Not kept (a full disk, a removed directory): the next job looks at the file again.
        with contextlib.suppress(OSError):
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW, 0o600)
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(xxhash.xxh3_64_hexdigest(body).encode() + b"\n" + body)
                os.replace(tmp, path)
                self.kept += 1
                self._added += len(body)
            finally:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)

    def prune(self) -> None:
        """If looks were kept since the last prune and all of them take more than the budget,
        remove the least recently used down to three quarters of it."""
        if not self._added:
            return
        self._added = 0
        files, total = [], 0
        with os.scandir(self.path) as it:
            for e in it:
                with contextlib.suppress(FileNotFoundError):
                    st = e.stat(follow_symlinks=False)
                    files.append((st.st_mtime_ns, st.st_size, e.name))
                    total += st.st_size
        if total <= self.budget:
            return
        for _, size, name in sorted(files):
            if total <= self.budget * 3 // 4:
                break
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(self.path, name))
            total -= size
