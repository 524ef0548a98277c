"""Writing steps into an HDF5 file (one dataset per variable per step, or a step axis)."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import glob
import json
import math
import os
import secrets
from collections.abc import Callable
from typing import Any, Protocol

import h5py
import numpy as np

from dataplane.errors import ChannelBusyError, DataplaneError, SchemaError
from dataplane.model import AttrValue, ChannelURL, VarSpec
from dataplane.transports import _posix
from dataplane.transports._files import FormatWriter
from dataplane.transports._h5repair import clear_write_flags, superblock_flags
from dataplane.transports._h5subfiles import create_virtual


class H5Target(Protocol):
    """What the writer needs of its transport."""

    path: str
    url: ChannelURL
    dataset_opts: dict[str, Any]


_META = "__dataplane"


_CHUNK_TARGET = 1 << 20  # small variables: pack steps until a chunk holds about 1 MiB
_MAX_CHUNK = 1 << 30  # HDF5 limits a chunk to 4 GiB; stay well below


def _chunks(shape: tuple[int, ...], itemsize: int) -> tuple[int, ...]:
    dims = [max(1, n) for n in shape]
    step_bytes = math.prod(dims) * itemsize
    if step_bytes <= _CHUNK_TARGET:
        return (max(1, min(1024, _CHUNK_TARGET // max(step_bytes, 1))), *dims)
    # Large steps: one step per chunk, split along the first axes if it is still too big.
    for axis in range(len(dims)):
        while math.prod(dims) * itemsize > _MAX_CHUNK and dims[axis] > 1:
            dims[axis] = (dims[axis] + 1) // 2
    return (1, *dims)


_ROW_CHUNK = 8 << 20  # arrays written in pieces: the most a piece's edge makes HDF5 hold


def _row_chunks(shape: tuple[int, ...], itemsize: int) -> tuple[int, ...]:
    """Chunks of arrays written in pieces of rows: about 8 MiB of whole rows of one step
    (smaller chunks cost HDF5 an index insertion each: 1 MiB chunks wrote at 1.6 GB/s)."""
    if not shape or math.prod(shape) * itemsize <= _ROW_CHUNK:
        return _chunks(shape, itemsize)
    dims = [max(1, n) for n in shape]
    row = math.prod(dims[1:]) * itemsize
    return (1, max(1, min(dims[0], _ROW_CHUNK // max(row, 1))), *dims[1:])


def _busy(t: H5Target, why: str) -> ChannelBusyError:
    return ChannelBusyError(
        f"{t.url.url} is open in another process (a reader or another program holds HDF5's "
        f"file lock: {why}), so it cannot be written now; it is left as it is. Close it "
        f"there first."
    )


def _locked_elsewhere(path: str) -> bool:
    """Whether another open of the file holds HDF5's lock on it (a reader, or a writer)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError as exc:
        if exc.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL):
            raise  # (a filesystem without locks: HDF5 cannot lock there either)
    finally:
        os.close(fd)  # releases our lock
    return False


def _refuse_if_open(t: H5Target) -> None:
    """Raise ChannelBusyError if another open of the file holds HDF5's lock on it."""
    if _locked_elsewhere(t.path):
        raise _busy(t, "it is locked")


def _busy_as_error(t: H5Target, fn: Callable[[], h5py.File]) -> h5py.File:
    try:
        return fn()
    except BlockingIOError as exc:  # taken between our look and HDF5's
        raise _busy(t, str(exc)) from None


class _H5Writer(FormatWriter):
    def __init__(self, t: H5Target, mode: str) -> None:
        self._t = t
        self._specs: dict[str, VarSpec] = {}
        self._pending: dict[str, Any] | None = None
        self._attrs_written: dict[str, AttrValue] | None = None
        self._direct_ok: dict[str, bool] = {}
        self._dsets: dict[str, h5py.Dataset] = {}
        self._virtual: set[str] = set()  # variables joined from subfiles (_h5subfiles)
        self._new: str | None = None  # where a new file is built until its first step
        flags = superblock_flags(t.path) if os.path.exists(t.path) else None
        if mode == "a" and flags is not None and flags & 1 and not flags & 4:
            # The last writer died before its first step (it never reached SWMR): nothing
            # was committed, and the half-built file is not worth keeping.
            mode = "w"
        if mode == "a" and os.path.exists(t.path):
            _refuse_if_open(t)
            if flags:
                clear_write_flags(t.path)  # the lease said its writer is gone
            self._f = _busy_as_error(t, lambda: h5py.File(t.path, "r+", libver="latest"))
            if _META not in self._f:
                self._f.close()
                raise DataplaneError(
                    f"{t.url.url} was not written by dataplane; append needs its layout"
                )
            self._open_meta()
            # Subfiles a killed aggregator left open for writing: HDF5 would refuse them as
            # sources of the main file's datasets (the lease says every writer is gone).
            for name in (self.written_by() or {}).get("files", [])[1:]:
                sub = os.path.join(os.path.dirname(t.path), name)
                if os.path.exists(sub) and superblock_flags(sub):
                    clear_write_flags(sub)
            n = int(self._committed[0])
            self.next_index = n
            names = json.loads(self._g.attrs["vars"])
            self._specs = {
                name: VarSpec(self._f[name].dtype, self._f[name].shape[1:]) for name in names
            }
            self._virtual = {name for name in names if self._f[name].is_virtual}
            for name in self._stored():  # drop a step that was begun but never committed
                self._f[name].resize(n, axis=0)
            self._trim_meta(n)
            self._f.swmr_mode = True
        else:
            self._f = self._new_file()
            create_meta(self._f)
            self._open_meta()

    def _new_file(self) -> h5py.File:
        """A new file, built beside the channel's path and moved there when its first step
        begins (``_place``): a file in use elsewhere is refused before anything is touched,
        and until the first step a subscriber finds no file, never one half built.

        # NOTE: h5py's mode "w" truncates the file before HDF5 tries its lock, so a writer
        # refused because a reader had the file open left it empty (0 bytes).
        """
        t = self._t
        folder, base = os.path.split(t.path)
        for old in glob.glob(os.path.join(glob.escape(folder), f".{glob.escape(base)}.*.dp-new")):
            pid = old.rsplit(".", 3)[-3]
            if pid.isdigit() and not _posix.is_alive(int(pid), 0):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(old)  # a writer killed before its first step
        if os.path.exists(t.path):
            _refuse_if_open(t)
        new = os.path.join(folder, f".{base}.{os.getpid()}.{secrets.token_hex(4)}.dp-new")
        f = h5py.File(new, "x", libver="latest")
        self._new = new
        with contextlib.suppress(FileNotFoundError):
            os.unlink(t.path)  # mode "w": the old channel goes (open readers keep their copy)
        # With its subfiles (before the new channel's aggregators make theirs).
        for old in glob.glob(os.path.join(glob.escape(t.path) + ".agg", "*.h5")):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(old)
        return f

    def _place(self) -> None:
        if self._new is not None:
            os.replace(self._new, self._t.path)
            self._new = None

    def _open_meta(self) -> None:
        self._g = self._f[_META]
        self._committed = self._g["committed"]
        self._meta = self._g["meta"]
        self._offsets = self._g["meta_offsets"]

    def _trim_meta(self, n: int) -> None:
        self._offsets.resize(n + 1, axis=0)
        self._meta.resize(int(self._offsets[n]), axis=0)

    def known_vars(self) -> dict[str, VarSpec]:
        return dict(self._specs)

    def written_by(self) -> dict[str, Any] | None:
        """How the channel's steps were written (ranks, method, files), if it says."""
        raw = self._g.attrs.get("written_by")
        return None if raw is None else dict(json.loads(raw))

    def committed(self) -> int:
        return int(self._committed[0])

    def _stored(self) -> list[str]:
        """The variables stored in this file (not joined from subfiles)."""
        return [name for name in self._specs if name not in self._virtual]

    def _create(
        self, specs: dict[str, VarSpec], pieces: bool = False, layout: dict | None = None
    ) -> None:
        sources = (layout or {}).get("sources", {})
        for name, spec in specs.items():
            if name in sources:
                create_virtual(self._f, name, spec, sources[name])
                self._virtual.add(name)
                continue
            chunks = (_row_chunks if pieces else _chunks)(spec.shape, spec.dtype.itemsize)
            self._f.create_dataset(
                name,
                (0, *spec.shape),
                # A zero-length axis must be resizable for HDF5 to accept a chunk of 1 there.
                maxshape=(None, *(n if n else None for n in spec.shape)),
                chunks=chunks,
                dtype=spec.dtype,
                **self._t.dataset_opts,
            )
        self._g.attrs["vars"] = json.dumps(list(specs))
        if layout and "written_by" in layout:
            self._g.attrs["written_by"] = json.dumps(layout["written_by"])
        self._specs = dict(specs)
        self._f.swmr_mode = True  # no new objects from here on: readers may now follow
        self._place()

    def begin(self, index: int, specs: dict[str, VarSpec], attrs: dict[str, AttrValue]) -> None:
        if not self._specs and not self._f.swmr_mode:
            self._create(specs)
        elif specs != self._specs:
            raise SchemaError(
                f"{self._t.url.url}: step {index} has variables {_describe(specs)} but the "
                f"channel has {_describe(self._specs)}; h5:// stores each variable as one dataset "
                f"with a leading step axis, so every step has the same variables and shapes "
                f"(use bp5:// or a new file for changing layouts)"
            )
        n = int(self._committed[0])
        for name in self._stored():
            self._dset(name).resize(n + 1, axis=0)
        self._pending = {"n": n, "attrs": attrs}

    def begin_ranked(
        self,
        index: int,
        specs: dict[str, VarSpec],
        attrs: dict[str, AttrValue],
        chunks: dict[str, tuple[int, ...]],
        layout: dict | None = None,
    ) -> int:
        """A step whose arrays arrive in pieces (``put_region``), or whose arrays aggregators
        write into subfiles (``layout["sources"]``: see :mod:`._h5subfiles`). A new file gets
        chunks of about 8 MiB of rows: a piece written into a chunk of a whole large step would
        make HDF5 read, patch and write that chunk, holding all of it in memory, per piece."""
        if not self._specs and not self._f.swmr_mode:
            self._create(specs, pieces=True, layout=layout)
        self.begin(index, specs, attrs)
        assert self._pending is not None
        return int(self._pending["n"])

    def put_region(self, name: str, start: tuple[int, ...], block: np.ndarray) -> None:
        assert self._pending is not None
        write_region(self._dset(name), self._pending["n"], start, block, self._raw(name))

    def _dset(self, name: str) -> h5py.Dataset:
        # h5py resolves a path on every f[name] (about 0.1 ms): a step uses each one 4 times.
        d = self._dsets.get(name)
        if d is None:
            d = self._dsets[name] = self._f[name]
        return d

    def _direct(self, name: str) -> bool:
        """Whether a step of ``name`` is exactly one unfiltered chunk (written as raw bytes)."""
        known = self._direct_ok.get(name)
        if known is None:
            d = self._dset(name)
            known = (
                d.chunks is not None
                and d.chunks[0] == 1
                and tuple(d.chunks[1:]) == tuple(d.shape[1:])
                and self._raw(name)
            )
            self._direct_ok[name] = known
        return known

    def _raw(self, name: str) -> bool:
        return raw_chunks(self._dset(name))

    def put(self, name: str, array: np.ndarray) -> None:
        assert self._pending is not None
        n = self._pending["n"]
        dset = self._dset(name)
        if array.size:
            if self._direct(name):
                # NOTE: h5py's generic write runs at ~1 GB/s here; handing HDF5 the chunk's
                # bytes (the array is C-contiguous, native order) runs at disk/page-cache speed.
                dset.id.write_direct_chunk((n,) + (0,) * (array.ndim), array)
            else:
                dset[n] = array

    def commit(self, checksums: Callable[[], dict[str, Any]]) -> None:
        p = self._pending
        assert p is not None
        self._pending = None
        n = p["n"]
        info = {"i": n, "a": p["attrs"], "c": checksums()}
        blob = np.frombuffer(json.dumps(info).encode(), np.uint8)
        end = int(self._offsets[n])
        self._meta.resize(end + blob.size, axis=0)
        self._meta[end:] = blob
        self._offsets.resize(n + 2, axis=0)
        self._offsets[n + 1] = end + blob.size
        for name in self._stored():
            self._dset(name).flush()
        self._meta.flush()
        self._offsets.flush()
        # Last: the step exists for readers once `committed` says so.
        self._committed[0] = n + 1
        self._committed.flush()

    def abort(self) -> None:
        if self._pending is not None:
            n = self._pending["n"]
            for name in self._stored():
                self._dset(name).resize(n, axis=0)
            self._pending = None

    def set_attrs(self, attrs: dict[str, AttrValue]) -> None:
        if not self._f.swmr_mode:
            self._write_root_attrs(attrs)
        g = self._g
        log, offs = g["attrs_log"], g["attrs_offsets"]
        blob = np.frombuffer(json.dumps(attrs).encode(), np.uint8)
        k = offs.shape[0] - 1
        end = int(offs[k])
        log.resize(end + blob.size, axis=0)
        log[end:] = blob
        offs.resize(k + 2, axis=0)
        offs[k + 1] = end + blob.size
        log.flush()
        offs.flush()
        self._latest_attrs = attrs

    def _write_root_attrs(self, attrs: dict[str, AttrValue]) -> None:
        for key in list(self._f.attrs):
            if key not in attrs:
                del self._f.attrs[key]
        for key, value in attrs.items():
            self._f.attrs[key] = _h5_attr(value)
        self._attrs_written = dict(attrs)

    def close(self) -> None:
        latest = getattr(self, "_latest_attrs", None)
        self._f.close()
        self._place()  # a channel that never had a step is an empty file
        if latest is not None and latest != self._attrs_written:
            # Attributes set after SWMR began: mirror them as root attributes for plain h5py.
            with h5py.File(self._t.path, "r+", libver="latest") as f:
                for key in list(f.attrs):
                    if key not in latest:
                        del f.attrs[key]
                for key, value in latest.items():
                    f.attrs[key] = _h5_attr(value)


def create_meta(f: h5py.File) -> h5py.Group:
    """The ``__dataplane`` group of a new file: the commit count, the step records and the
    channel attributes' log (the layout the module docstring of ``hdf5`` describes)."""
    g = f.create_group(_META)
    g.attrs["version"] = 1
    g.attrs["layout"] = "step-axis"
    g.create_dataset("committed", data=np.zeros(1, np.int64))
    g.create_dataset("meta", (0,), maxshape=(None,), chunks=(1 << 16,), dtype=np.uint8)
    g.create_dataset("meta_offsets", data=np.zeros(1, np.int64), maxshape=(None,), chunks=(4096,))
    g.create_dataset("attrs_log", (0,), maxshape=(None,), chunks=(1 << 14,), dtype=np.uint8)
    g.create_dataset("attrs_offsets", data=np.zeros(1, np.int64), maxshape=(None,), chunks=(256,))
    return g


def raw_chunks(d: h5py.Dataset) -> bool:
    """Whether ``d``'s chunks hold its values' bytes as they are (no filter, and a type HDF5
    stores as numpy does)."""
    return (
        d.compression is None
        and not d.shuffle
        and not d.fletcher32
        and d.dtype.kind != "b"  # h5py stores bool as an enum type
        and d.dtype.isnative
    )


def write_region(
    d: h5py.Dataset, n: int, start: tuple[int, ...], block: np.ndarray, raw: bool
) -> None:
    """Write ``block`` at ``start`` of step ``n`` of ``d`` (``raw``: :func:`raw_chunks`)."""
    lo, hi = start[0], start[0] + block.shape[0] if block.ndim else 0
    # Only chunks of one step: a raw chunk is written whole, never past the piece.
    rows = d.chunks[1] if d.chunks is not None and d.ndim > 1 and d.chunks[0] == 1 else 0
    if raw and rows and tuple(d.chunks[2:]) == tuple(d.shape[2:]) == tuple(block.shape[1:]):
        # Chunks the piece covers whole go in as raw bytes (h5py's generic write runs at
        # ~1 GB/s); only the rows at its edges go through HDF5's own write.
        first = min(-(-lo // rows) * rows, hi)
        last = max(hi // rows * rows, first)
        for c in range(first, last, rows):
            d.id.write_direct_chunk((n, c) + (0,) * (block.ndim - 1), block[c - lo : c - lo + rows])
        for a, b in ((lo, first), (last, hi)):
            if a < b:
                d[(n, slice(a, b))] = block[a - lo : b - lo]
        return
    where = tuple(slice(s, s + k) for s, k in zip(start, block.shape))
    d[(n,) + where] = block


def _describe(specs: dict[str, VarSpec]) -> str:
    return "{" + ", ".join(f"{k}: {v.dtype.name}{list(v.shape)}" for k, v in specs.items()) + "}"


def _h5_attr(value: AttrValue) -> Any:
    if isinstance(value, list):
        if not value:
            return np.zeros(0, np.float64)
        if all(isinstance(v, str) for v in value):
            return np.array(value, dtype=h5py.string_dtype())
    return value


def _from_h5_attr(value: Any) -> AttrValue:
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, np.ndarray):
        return [v.decode() if isinstance(v, bytes) else v for v in value.tolist()]
    if isinstance(value, np.generic):
        return value.item()
    return value
