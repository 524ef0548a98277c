"""Reading the steps of many files from their bytes, where a look located them.

A dataset of many files opens each one once at construction, to count and describe its steps
(``_sources``). Where the format stores a step's variables as raw bytes (HDF5: unfiltered chunks
holding whole steps), that look also records where (:meth:`dataplane.api.Archive.locate`), and
shard reads then take those bytes with one ``pread`` per variable, verified against the step's
checksums, instead of opening the file again with its library: an HDF5 open, its metadata reads
and its close cost about 2 ms of CPU per file here, and a dozen metadata round trips on a
parallel filesystem.

What a look found holds while the file is as it was then (size, modification time, inode):
a file that changed since, or bytes that do not match their checksums, are read through the
archive instead, which reads the file as it is now and reports what is wrong.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from typing import Any

import numpy as np

from dataplane import api
from dataplane.loaders._sources import stat_signature
from dataplane.model import ChannelURL

#: Files this process keeps open for such reads.
OPEN_AT_ONCE = 64

#: Per variable a dataset reads: [byte offset, dtype, shape, checksums] (JSON-able).
Place = list


def places(found: dict[str, api.Located] | None, names: tuple[str, ...]) -> list[Place] | None:
    """What :meth:`~dataplane.api.Archive.locate` found, kept for the variables ``names``;
    None unless it found every one."""
    if found is None or any(n not in found for n in names):
        return None
    return [[found[n].offset, found[n].dtype, list(found[n].shape), found[n].stored] for n in names]


class DirectReads:
    """Rows of located steps, straight from their files (see the module).

    ``files``, ``sigs``: the dataset's files and their signatures when looked at;
    ``where``: per step, (file, step in the file); ``located``: per step, its :func:`places`
    or None. The lists are the snapshot's own (they grow with it). Pickles without handles.
    """

    def __init__(
        self,
        files: list[str],
        sigs: list[str | None],
        where: list[tuple[int, int]],
        located: list[list[Place] | None],
    ) -> None:
        self.files, self.sigs, self.where, self.located = files, sigs, where, located
        self.reads = 0  # rows read here, not through an archive (for tests and benchmarks)
        self._reset()

    def _reset(self) -> None:
        # file -> (fd, scheme), or None: changed since the look
        self._fds: OrderedDict[int, tuple[int, str] | None] = OrderedDict()
        self._lock = threading.Lock()
        self._pid = os.getpid()

    def rows(
        self, i: int, r0: int, r1: int | None, out: list[np.ndarray] | None = None
    ) -> list[np.ndarray] | None:
        """Rows ``r0:r1`` of step ``i`` (``r1=None``: the whole step), one array per variable
        (into ``out`` if given); None where the step was not located or its file cannot vouch
        for it now."""
        place = self.located[i] if i < len(self.located) else None
        if place is None:
            return None
        with self._lock:
            opened = self._fd(self.where[i][0])
            if opened is None:
                return None
            fd, scheme = opened
            got = []
            for v, (offset, dtype, shape, stored) in enumerate(place):
                at = api.Located(offset, dtype, tuple(shape), stored)
                first, count = (r0, (shape[0] if r1 is None else r1) - r0) if shape else (0, 1)
                rows = api.read_located(
                    scheme, fd, at, first, count, None if out is None else out[v]
                )
                if rows is None:
                    return None
                got.append(rows)
        self.reads += 1
        return got

    def _fd(self, k: int) -> tuple[int, str] | None:
        if self._pid != os.getpid():  # a fork's copies of the parent's descriptors
            self._close_all()
            self._pid = os.getpid()
        if k in self._fds:
            self._fds.move_to_end(k)
            return self._fds[k]
        url = ChannelURL.parse(self.files[k])
        got: tuple[int, str] | None = None
        try:
            fd = os.open(url.path, os.O_RDONLY)
        except OSError:
            pass  # gone or unreadable: the archive says why
        else:
            if stat_signature(os.fstat(fd)) == self.sigs[k]:
                got = fd, url.scheme
            else:
                os.close(fd)
        self._fds[k] = got
        while len(self._fds) > OPEN_AT_ONCE:
            old = self._fds.popitem(last=False)[1]
            if old is not None:
                os.close(old[0])
        return got

    def _close_all(self) -> None:
        for got in self._fds.values():
            if got is not None:
                os.close(got[0])
        self._fds.clear()

    def close(self) -> None:
        with self._lock:
            if self._pid == os.getpid():
                self._close_all()
            self._fds.clear()

    def spec(self) -> dict[str, Any]:
        """JSON-able arguments that rebuild it (for the prefetch process)."""
        return {
            "files": self.files,
            "sigs": self.sigs,
            "where": [list(w) for w in self.where],
            "located": self.located,
        }

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> DirectReads:
        return cls(spec["files"], spec["sigs"], [tuple(w) for w in spec["where"]], spec["located"])

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k not in ("_fds", "_lock", "_pid")}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._reset()


def step_rows(
    arc: Any,
    direct: DirectReads | None,
    i: int,
    names: tuple[str, ...],
    rows: dict[str, tuple[np.dtype, tuple[int, ...]]],
    r0: int = 0,
    r1: int | None = None,
    out: list[np.ndarray] | None = None,
) -> list[np.ndarray]:
    """Rows ``r0:r1`` of step ``i`` of each variable (``r1=None``: whole variables), from the
    bytes a look located where ``direct`` can vouch for them, else through ``arc``; into
    ``out`` if given. ``rows``: each variable's row dtype and shape (rows mode)."""
    got = direct.rows(i, r0, r1, out) if direct is not None else None
    if got is not None:
        return got
    step = arc[i]
    if r1 is None:
        got = [step[name] for name in names]
    else:
        got = []
        for name in names:
            shape = rows[name][1]
            got.append(step.read(name, (r0, *(0,) * len(shape)), (r1 - r0, *shape)))
    if out is None:
        return got
    for dst, arr in zip(out, got):
        dst[...] = arr
    return out
