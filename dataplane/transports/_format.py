"""What a file format module provides (a writer, and random access or a stream for reading),
and how errors of format libraries are told apart: a full disk, damage, or ours."""

from __future__ import annotations

import errno
import os
import re
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any

import numpy as np

from dataplane.errors import DataplaneError, IntegrityError
from dataplane.model import AttrValue, Selection, StepMeta, VarSpec

#: Returned by ``StepStream.advance`` when the stream is over.
END: Any = object()


class FormatWriter(ABC):
    """Writes steps in one file format. Arrays given to ``put`` are C-contiguous."""

    next_index: int = 0

    def known_vars(self) -> dict[str, VarSpec]:
        return {}

    @abstractmethod
    def begin(self, index: int, specs: dict[str, VarSpec], attrs: dict[str, AttrValue]) -> None: ...

    @abstractmethod
    def put(self, name: str, array: np.ndarray) -> None: ...

    @abstractmethod
    def commit(self, checksums: Callable[[], dict[str, Any]]) -> None:
        """Store the arrays' checksums and make the step visible: the last thing written.

        ``checksums()`` waits for them (they are computed beside the write): call it as late
        as the format allows."""

    @abstractmethod
    def abort(self) -> None: ...

    def begin_ranked(
        self,
        index: int,
        specs: dict[str, VarSpec],
        attrs: dict[str, AttrValue],
        chunks: dict[str, tuple[int, ...]],
        layout: dict[str, Any] | None = None,
    ) -> int:
        raise NotImplementedError

    def chunks_of(self, name: str) -> tuple[int, ...] | None:
        return None

    def written_by(self) -> dict[str, Any] | None:
        """How a stored channel's steps were written (``layout["written_by"]``), if known."""
        return None

    def put_region(self, name: str, start: tuple[int, ...], block: np.ndarray) -> None:
        """Write ``block`` (C-contiguous) at ``start`` of ``name`` in the ranked step."""
        raise NotImplementedError

    @abstractmethod
    def set_attrs(self, attrs: dict[str, AttrValue]) -> None: ...

    @abstractmethod
    def close(self) -> None: ...


class StepSource(ABC):
    """Random access to the committed steps of stored data."""

    @abstractmethod
    def refresh(self) -> int:
        """Look again (new steps from a live writer); returns how many are committed."""

    def finished(self) -> bool:
        """True when the format itself knows no writer has it open (foreign files)."""
        return True

    @abstractmethod
    def meta(self, index: int) -> tuple[StepMeta, dict[str, str]]:
        """Metadata and per-variable checksums of committed step ``index``."""

    @abstractmethod
    def get(self, index: int, name: str, selection: Selection) -> np.ndarray: ...

    def attrs(self) -> dict[str, AttrValue]:
        return {}

    def written_by(self) -> dict[str, Any] | None:
        """How MPI ranks wrote the stored data, if it says (see ``Archive.written_by``)."""
        return None

    def locate(self, index: int, name: str) -> tuple[int, np.dtype, tuple[int, ...]] | None:
        """(byte offset, dtype, shape) of committed step ``index`` of ``name`` where it is one
        run of raw C-order bytes in the file; None otherwise (filters, several files)."""
        return None

    @abstractmethod
    def close(self) -> None: ...


class StepStream(ABC):
    """Sequential access for formats whose live reading is a stream (ADIOS2 engines)."""

    @property
    def connected(self) -> bool:
        """False while the stream still looks for a writer (leases it finds meanwhile are old)."""
        return True

    @abstractmethod
    def advance(self, wait: float) -> tuple[StepMeta, dict[str, str]] | None:
        """Move to the next step within ``wait`` seconds: its metadata, ``None`` if none came,
        or :data:`END` once the writer has closed the stream."""

    @abstractmethod
    def get(self, name: str, selection: Selection) -> np.ndarray: ...

    def attrs(self) -> dict[str, AttrValue]:
        return {}

    @abstractmethod
    def close(self) -> None: ...


class SourceStream(StepStream):
    """A live, in-order stream over a :class:`StepSource`."""

    def __init__(self, source: StepSource, poll: float) -> None:
        self.source = source
        self.poll = poll
        self.cursor = 0
        self.count = 0
        self.current = -1

    def advance(self, wait: float) -> tuple[StepMeta, dict[str, str]] | None:
        deadline = time.monotonic() + wait
        while True:
            if self.cursor >= self.count:
                self.count = self.source.refresh()
            if self.cursor < self.count:
                self.current = self.cursor
                self.cursor += 1
                return self.source.meta(self.current)
            if self.source.finished():
                return END
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            time.sleep(min(left, self.poll))

    def get(self, name: str, selection: Selection) -> np.ndarray:
        return self.source.get(self.current, name, selection)

    def attrs(self) -> dict[str, AttrValue]:
        return self.source.attrs()

    def close(self) -> None:
        self.source.close()


_STORAGE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
_STORAGE_TEXT = re.compile(
    r"errno = (?P<n>28|122|27)\b|(?P<t>No space left on device|Disk quota exceeded|File too large)"
)
_STORAGE_BY_TEXT = {
    "No space left on device": errno.ENOSPC,
    "Disk quota exceeded": errno.EDQUOT,
    "File too large": errno.EFBIG,
}


def storage_errors(fn: Callable[[], Any]) -> Any:
    """Run ``fn``; a full disk, quota or file size limit met inside a format library (which
    reports it as its own error type, errno only in the text) becomes an ``OSError`` with that
    errno, which ``publish`` turns into ``StorageFullError``."""
    try:
        return fn()
    except OSError as exc:
        if exc.errno in _STORAGE_ERRNOS:
            raise
        found = _STORAGE_TEXT.search(str(exc))
        if found is None:
            raise
        raise OSError(_storage_errno(found), str(exc)) from exc
    except (RuntimeError, ValueError) as exc:
        found = _STORAGE_TEXT.search(str(exc))
        if found is None:
            raise
        raise OSError(_storage_errno(found), str(exc)) from exc


def _storage_errno(found: re.Match) -> int:
    return int(found["n"]) if found["n"] else _STORAGE_BY_TEXT[found["t"]]


def guard(url: str, what: str, fn: Callable[[], Any]) -> Any:
    """Run ``fn``; an error from the format library becomes an ``IntegrityError`` saying what
    could not be read (damaged, truncated or foreign bytes), never a crash or a wrong value."""
    try:
        return fn()
    except DataplaneError:
        raise
    except Exception as exc:
        raise IntegrityError(f"{url}: cannot read {what}: {type(exc).__name__}: {exc}") from exc


def pread_rows(
    fd: int,
    offset: int,
    dtype: np.dtype,
    shape: tuple[int, ...],
    sel: Selection,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """Rows ``sel`` of an array of ``shape`` whose C-order bytes start at ``offset`` in
    ``fd``: the rows read whole with one pread (into ``out`` if given: C-contiguous, of the
    whole rows' shape), then cut along the other axes."""
    row = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
    first, rows = (sel.start[0], sel.count[0]) if shape else (0, 1)
    if out is None:
        out = np.empty((rows, *shape[1:]) if shape else (), dtype)
    buf = out.reshape(-1).view(np.uint8)
    done = 0
    while done < buf.size:
        got = os.preadv(fd, [buf[done:].data], offset + first * row + done)
        if got <= 0:
            raise IntegrityError(
                f"the file ends inside the rows being read (at byte {offset + first * row + done})"
                f": it was truncated"
            )
        done += got
    if not shape or tuple(sel.count[1:]) == shape[1:]:
        return out
    return out[(slice(None),) + sel.slices[1:]]
