"""``h5://path/run.h5``: steps in an HDF5 file (h5py), followed live through SWMR.

Layout (what plain h5py sees)
    ``/<var>``
        One dataset per variable with a **leading step axis**: ``f["u"][t]`` is step ``t``.
        Chunked one step per chunk (several steps per chunk for small variables).
    root attributes
        The channel attributes.
    ``/__dataplane/``
        ``committed`` (how many steps are complete: written last, so a step a reader can see is
        whole), ``meta`` and ``meta_offsets`` (per step: JSON with its index, the step
        attributes and the xxh3 checksums of the blocks of each array), ``attrs_log`` (channel
        attributes as they change).

Why a step axis and not a group per step: live readers need SWMR, and a SWMR writer may only
append to datasets that exist, never create groups or datasets. So the variables, their dtypes
and shapes are fixed by the first step (``SchemaError`` otherwise), which is also the layout
training code wants (``f["u"][t]``, one chunk per step).

Live readers open with SWMR. A file that is open for writing *without* SWMR is refused (reading
it could return wrong data): detected by HDF5's file lock or, where locking is off, by the
superblock's "open for write" flag (files written with ``libver="latest"``).

Files not written by dataplane: every dataset (``group/name`` for nested ones) is a variable;
with ``layout="one-step"`` (default for them) the file is one step; with ``layout="step-axis"``
axis 0 of every dataset is the step axis (all must agree on its length). Root attributes are
channel attributes.

Options
-------
verify : bool
    Check every read, whole or partial, against the step's block checksums (default True).
heartbeat : float
    Seconds between the writer's lease updates (default 1).
compression, compression_opts, shuffle
    Passed to ``h5py.Group.create_dataset`` (e.g. ``compression="gzip"``).
layout : str
    ``"auto"`` (default), ``"one-step"`` or ``"step-axis"``: how to read files that dataplane
    did not write.
"""

from __future__ import annotations

import errno
import json
import os
from typing import Any

import h5py
import numpy as np

from dataplane.errors import DataplaneError, IntegrityError, OptionError
from dataplane.model import AttrValue, ChannelURL, Selection, StepMeta, VarSpec
from dataplane.transports import _h5mpio
from dataplane.transports._checksums import block_sums
from dataplane.transports._files import (
    FileTransport,
    FormatWriter,
    LeaseIO,
    Seen,
    StepSource,
    lease_state,
    storage_errors,
)
from dataplane.transports._foreign import ForeignSource
from dataplane.transports._format import pread_rows
from dataplane.transports._h5handles import _Shared
from dataplane.transports._h5repair import superblock
from dataplane.transports._h5subfiles import Subfile, subfile_name
from dataplane.transports._h5writer import (
    _META,
    _from_h5_attr,
    _H5Writer,
    _locked_elsewhere,
    _row_chunks,
    raw_chunks,
    write_region,
)

__all__ = ["HDF5Transport"]

# Steps, and bytes, of metadata records read at once (see _H5Source._meta_bytes).
_METAS_AT_ONCE = 4096
_META_BYTES_AT_ONCE = 1 << 20


class HDF5Transport(FileTransport):
    scheme = "h5"
    supports_changing_layout = False
    aggregates = True
    subfiles = True

    def __init__(
        self,
        url: ChannelURL,
        *,
        verify: bool = True,
        heartbeat: float = 1.0,
        compression: str | int | None = None,
        compression_opts: Any = None,
        shuffle: bool = False,
        layout: str = "auto",
    ) -> None:
        super().__init__(url)
        self._init_common(verify, heartbeat)
        if layout not in ("auto", "one-step", "step-axis"):
            raise OptionError(f"layout must be 'auto', 'one-step' or 'step-axis', got {layout!r}")
        self.path = os.path.abspath(os.path.expanduser(url.path))
        self.layout = layout
        self.dataset_opts = {
            k: v
            for k, v in (
                ("compression", compression),
                ("compression_opts", compression_opts),
                ("shuffle", shuffle),
            )
            if v not in (None, False)
        }

    def lease_io(self) -> LeaseIO:
        return LeaseIO(self.path + ".lease")

    def mpio(self) -> bool:
        # Filters need collective writes in parallel HDF5; ranks here write independently.
        return _h5mpio.available() and not self.dataset_opts

    def mpio_writer(self, comm: Any, mode: str) -> Any:
        return _h5mpio.MPIIOWriter(self, comm, mode)

    def subfile_name(self, token: str, group: int) -> str:
        if group < 0:
            return os.path.basename(self.path)
        return subfile_name(self.path, token, group)

    def subfile(self, name: str, specs: dict[str, VarSpec], append: bool) -> Subfile:
        path = os.path.join(os.path.dirname(self.path), name)
        return storage_errors(
            lambda: Subfile(path, specs, _row_chunks, self.dataset_opts, append=append)
        )

    def put_subfile_region(
        self, sub: Any, name: str, start: tuple[int, ...], block: np.ndarray
    ) -> Any:
        block = block if block.flags.c_contiguous else np.array(block, order="C")
        d = sub.dataset(name)
        storage_errors(lambda: write_region(d, sub.row, start, block, raw_chunks(d)))
        return block_sums(block)

    def format_writer(self, mode: str) -> FormatWriter:
        return _H5Writer(self, mode)

    def format_source(self, seen: Seen | None = None) -> StepSource | None:
        info, lease = seen if seen is not None else lease_state(self.lease_io())
        try:
            flags, eof, size = superblock(self.path)
        except FileNotFoundError:
            return None
        if lease == "alive" and info is not None and info.get("mpio"):
            # Written through MPI-IO, which HDF5 cannot combine with SWMR, and parallel HDF5
            # leaves no "open for writing" flag: readable once its writer closed it.
            return None
        writing_without_swmr = flags is not None and flags & 1 and not flags & 4
        if lease == "alive" and (flags is None or writing_without_swmr):
            return None  # a writer of an older version, building the file in place
        if writing_without_swmr:
            if lease != "none":
                return None  # a writer of an older version died before its first step
            if _locked_elsewhere(self.path):
                raise DataplaneError(self._refusal())
            raise IntegrityError(
                f"{self.url.url} was left open for writing (without SWMR) by a program that is "
                f"gone: its superblock says so, and nothing holds its lock. What it wrote last "
                f"may be incomplete; check the file (h5check), clear the flag (h5clear -s) if "
                f"it is sound, or write it again."
            )
        settled = lease in ("closed", "none")
        if settled and eof is not None and eof > size:
            raise IntegrityError(
                f"{self.url.url} is truncated: it is {size} bytes, its superblock says "
                f"{eof}. Copy or write it again."
            )
        try:
            shared = _Shared.acquire(self.path, settled or lease in ("dead", "failed"))
        except OSError as exc:
            if exc.errno == errno.EAGAIN or "already open for write" in str(exc):
                raise DataplaneError(self._refusal()) from exc
            raise
        with shared.lock:
            ours = _META in shared.file()
        return _H5Source(self, shared) if ours else _foreign(self, shared)

    def _refusal(self) -> str:
        return (
            f"{self.url.url} is open for writing without SWMR; reading it now could return "
            f"wrong data. Wait until its writer closes it, or have the writer use SWMR "
            f"(h5py: File(..., libver='latest') and f.swmr_mode = True)."
        )


class _H5Source(StepSource):
    """Committed steps of a file in dataplane's layout, read through SWMR."""

    def __init__(self, t: HDF5Transport, shared: _Shared) -> None:
        self._t = t
        self._sh = shared
        self._lock = shared.lock
        with self._lock:
            self._names: list[str] = self._vars()
        self._specs: dict[str, VarSpec] = {}
        self._metas: tuple[np.ndarray, bytes] | None = None  # see _meta_bytes
        self._count = 0
        self._closed = False

    def _vars(self) -> list[str]:
        """The variables' names (an attribute the writer sets with the first step)."""
        fid = self._sh.file().id
        if not h5py.h5a.exists(fid, b"vars", obj_name=_META.encode()):
            return []
        a = h5py.h5a.open(fid, b"vars", obj_name=_META.encode())  # a quarter of .attrs[...]
        raw = np.empty((), a.dtype)
        a.read(raw)
        return list(json.loads(raw.item()))

    def _meta_set(self, name: str, once: bool = False) -> h5py.Dataset:
        """Record dataset ``name``; ``once``: read whole now, so a settled file need not hold
        it open (see _Shared.transient)."""
        if once and self._sh.settled:
            return self._sh.transient(f"{_META}/{name}")
        return self._sh.dataset(f"{_META}/{name}")

    def _meta_now(self, name: str) -> h5py.Dataset:
        """Record dataset ``name`` as the file is now (no writer has a settled file, and none
        gets in while it is open here: HDF5's lock)."""
        if self._sh.settled:
            return self._sh.transient(f"{_META}/{name}")
        return self._sh.current(f"{_META}/{name}")

    def refresh(self) -> int:
        with self._lock:
            return self._refresh()

    def _refresh(self) -> int:
        count = int(self._meta_now("committed")[0])
        if count != self._count:
            if not self._names:
                self._names = self._vars()
            if not self._sh.settled:  # (a settled file's records are read when needed)
                self._sh.current(f"{_META}/meta_offsets")
                self._sh.current(f"{_META}/meta")
            self._count = count
        return count

    def finished(self) -> bool:
        return False  # the lease says when our writer is done

    def _spec(self, name: str) -> VarSpec:
        spec = self._specs.get(name)
        if spec is None:
            with self._lock:
                d = self._sh.dataset(name)
                spec = self._specs[name] = VarSpec(np.dtype(d.dtype), tuple(d.shape[1:]))
        return spec

    def meta(self, index: int) -> tuple[StepMeta, dict[str, str]]:
        with self._lock:
            info = json.loads(self._meta_bytes(index))
        if info.get("i", index) != index:
            raise IntegrityError(self._inconsistent(f"the metadata of step {info['i']}", index))
        specs = {name: self._spec(name) for name in self._names}
        return StepMeta(index, info["a"], specs), info["c"]

    def _meta_bytes(self, index: int) -> bytes:
        """Step ``index``'s JSON. The records of every committed step are read at once while
        they are small (two reads per file, not two per step: each is a round trip on a
        parallel filesystem); a committed step's record never changes."""
        known = self._metas
        if known is None or index + 1 >= len(known[0]):
            n = max(self._count, index + 1)
            offsets = (
                self._meta_set("meta_offsets", once=True)[: n + 1] if n <= _METAS_AT_ONCE else None
            )
            if offsets is None or len(offsets) <= index + 1 or offsets[-1] > _META_BYTES_AT_ONCE:
                # One step's record at a time: the datasets stay open for the next.
                a, b = (int(x) for x in self._meta_set("meta_offsets")[index : index + 2])
                return bytes(self._meta_set("meta")[a:b].tobytes())
            whole = self._meta_set("meta", once=True)[: int(offsets[-1])].tobytes()
            known = self._metas = offsets, whole
        offsets, blob = known
        return blob[int(offsets[index]) : int(offsets[index + 1])]

    def get(self, index: int, name: str, selection: Selection) -> np.ndarray:
        sh = self._sh
        with self._lock:
            d = sh.dataset(name)
            rows = sh.rows.get(name)
            if rows is None:
                rows = sh.rows[name] = d.shape[0]
            if rows <= index:
                # Only for steps not yet seen: a refresh while a handle opened elsewhere in
                # this process holds the dataset breaks HDF5's chunk index (see _Shared).
                d.refresh()
                sh.rows[name] = d.shape[0]
            where = sh.step_at(name, index)
            if where is None:
                if sh.direct(name):
                    raise IntegrityError(self._inconsistent(f"no chunk for step {index}", index))
                if sh.joined(name) and sh.seen.get(name, 0) <= index:
                    # Joined from subfiles (a VDS): HDF5 holds each subfile's chunk index as
                    # it last read it, from before this step's chunks were written there.
                    d.refresh()
                    sh.seen[name] = max(self._count, index + 1)
                return np.asarray(d[(index,) + selection.slices])
        return pread_rows(sh.fd, where[0], where[1][1], where[1][2], selection)

    def locate(self, index: int, name: str) -> tuple[int, np.dtype, tuple[int, ...]] | None:
        with self._lock:
            if name not in self._names or self._sh.joined(name):
                return None
            where = self._sh.step_at(name, index)
        if where is None:
            return None
        offset, (_, dtype, shape, _) = where
        return offset, dtype, shape

    def _inconsistent(self, what: str, index: int) -> str:
        return (
            f"{self._t.url.url}: HDF5 shows {what} where step {index} was committed. HDF5 "
            f"keeps one view of a file per process: another h5py handle of this file open in "
            f"this process (outside dataplane) can corrupt it. Close that handle, or read the "
            f"file through dataplane only."
        )

    def written_by(self) -> dict[str, Any] | None:
        with self._lock:
            raw = self._sh.file()[_META].attrs.get("written_by")
        if raw is None:
            return None
        info = dict(json.loads(raw))
        return {k: info[k] for k in ("ranks", "method", "aggregators", "files") if k in info}

    def attrs(self) -> dict[str, AttrValue]:
        with self._lock:
            offsets = self._meta_now("attrs_offsets")
            k = offsets.shape[0] - 1
            if k == 0:
                return {key: _from_h5_attr(v) for key, v in self._sh.file().attrs.items()}
            log = self._meta_now("attrs_log")
            a, b = (int(x) for x in offsets[k - 1 : k + 1])
            return json.loads(log[a:b].tobytes())

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        # Not under the file's lock: release takes the registry's guard, then that lock.
        self._sh.release()


def _foreign(t: HDF5Transport, shared: _Shared) -> ForeignSource:
    """A file dataplane did not write, mapped by the documented rules (module docstring)."""
    found: dict[str, tuple[np.dtype, tuple[int, ...]]] = {}
    with shared.lock:
        shared.file().visititems(
            lambda name, obj: (
                found.__setitem__(name, (np.dtype(obj.dtype), tuple(obj.shape)))
                if isinstance(obj, h5py.Dataset)
                else None
            )
        )

    def read(name: str, key: tuple[Any, ...]) -> np.ndarray:
        with shared.lock:
            d = shared.dataset(name)
            return np.asarray(d[key] if key else d[()])

    def attrs() -> dict[str, AttrValue]:
        with shared.lock:
            return {key: _from_h5_attr(v) for key, v in shared.file().attrs.items()}

    return ForeignSource(
        t.url.url, found, t.layout == "step-axis", read, attrs, release=shared.release
    )
