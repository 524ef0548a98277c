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

import contextlib
import ctypes
import errno
import fcntl
import glob
import json
import math
import os
import re
import secrets
import threading
from collections.abc import Callable
from typing import Any, ClassVar

import h5py
import numpy as np

from dataplane.errors import (
    ChannelBusyError,
    DataplaneError,
    IntegrityError,
    OptionError,
    SchemaError,
)
from dataplane.model import AttrValue, ChannelURL, Selection, StepMeta, VarSpec
from dataplane.transports import _posix
from dataplane.transports._files import (
    FileTransport,
    FormatWriter,
    LeaseIO,
    StepSource,
    read_lease,
    writer_state,
)

__all__ = ["HDF5Transport"]

_META = "__dataplane"


# NOTE: HDF5 keeps one open file per process however many handles open it, and the handles'
# dataset objects share their chunk index. A SWMR refresh through one handle while another
# handle of the file looks up, reads or merely holds a dataset makes reads return rows of the
# wrong step (rows of the first chunk: 7 in 14,400 reads by threads opening and closing
# handles). A process that forks while it has the file open leaves the child the same state:
# the child's own open shares it, and every read after a refresh returns the first chunk
# (3,072 of 4,096 samples wrong in forked DataLoader workers). So:
# - the readers of one file in a process share one h5py.File and one object per dataset
#   (_Shared), used under its lock; the last reader closes it while no new one can open it;
# - no dataplane reader holds an HDF5 file open across fork(): they are closed before and
#   opened again on next use, in parent and child alike (_close_before_fork);
# - the arrays of uncompressed chunks are read with pread() at the byte offset HDF5's chunk
#   index gives, looked up once per chunk: no HDF5 call (nor its global lock) per read, and
#   the bytes are checked against the step's block checksums like any other read.
def _hdf5_library() -> Any:
    """The HDF5 library h5py uses (already loaded in this process), for the one call h5py
    does not offer; None where it cannot be found."""
    global _libhdf5
    if _libhdf5 is None:
        _libhdf5 = False
        try:
            with open("/proc/self/maps") as maps:
                paths = {line.split()[-1] for line in maps if "/libhdf5" in line}
            path = next(
                (p for p in paths if re.search(r"/libhdf5(_serial|_mpich|_openmpi)?[-.]", p)),
                None,
            )
            if path is not None:
                lib = ctypes.CDLL(path)
                lib.H5Pset_metadata_read_attempts.argtypes = [ctypes.c_int64, ctypes.c_uint]
                lib.H5Pset_metadata_read_attempts.restype = ctypes.c_int
                _libhdf5 = lib
        except (OSError, AttributeError):
            pass
    return _libhdf5 or None


_libhdf5: Any = None


def _open_swmr(path: str, settled: bool) -> h5py.File:
    """Open ``path`` for SWMR reading. ``settled``: no writer has it open, so metadata that
    fails its checksum is damaged for good and is not read again.

    # NOTE: a SWMR reader reads metadata whose checksum fails up to 100 times, with a growing
    # pause between tries (a live writer may be rewriting it). On a damaged or truncated file
    # that is minutes per read, with SIGTERM unseen (10 of 20 random truncations hung).
    """
    lib = _hdf5_library() if settled else None
    if lib is None:
        return h5py.File(path, "r", swmr=True)
    fapl = h5py.h5p.create(h5py.h5p.FILE_ACCESS)
    fapl.set_libver_bounds(h5py.h5f.LIBVER_EARLIEST, h5py.h5f.LIBVER_LATEST)
    if lib.H5Pset_metadata_read_attempts(fapl.id, 1) < 0:
        return h5py.File(path, "r", swmr=True)
    flags = h5py.h5f.ACC_RDONLY | h5py.h5f.ACC_SWMR_READ
    return h5py.File(h5py.h5f.open(os.fsencode(path), flags, fapl=fapl))


class _Shared:
    """The one SWMR h5py.File of a file in this process, its dataset objects, where the
    chunks of its steps lie, and a descriptor for reading them, shared by every source that
    reads the file. Use under ``lock``."""

    _open: ClassVar[dict[tuple[int, int], _Shared]] = {}
    _guard = threading.Lock()  # over _open, every instance's ``users`` and its closing

    def __init__(self, key: tuple[int, int], path: str, fd: int, settled: bool) -> None:
        self._key = key
        self.path = path
        self.fd = fd
        self.settled = settled
        self.lock = threading.RLock()
        self.users = 1
        self.rows: dict[str, int] = {}
        self._f: h5py.File | None = None
        self._datasets: dict[str, h5py.Dataset] = {}
        self._direct: dict[str, tuple[int, np.dtype, tuple[int, ...], int] | None] = {}
        self._chunk_at: dict[tuple[str, int], int] = {}

    @classmethod
    def acquire(cls, path: str, settled: bool) -> _Shared:
        """The file's shared handle (opened now if no source in this process holds it);
        ``settled``: see :func:`_open_swmr`."""
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        st = os.fstat(fd)
        key = (st.st_dev, st.st_ino)  # a rewritten file is a new one
        with cls._guard:
            shared = cls._open.get(key)
            if shared is not None:
                os.close(fd)
                shared.users += 1
                return shared
            shared = cls(key, path, fd, settled)
            try:
                with shared.lock:
                    shared.file()
            except BaseException:
                os.close(fd)
                raise
            cls._open[key] = shared
            return shared

    def file(self) -> h5py.File:
        """The open h5py.File (opened again after a fork closed it)."""
        if self._f is None:
            f = _open_swmr(self.path, self.settled)
            st = os.stat(self.path)
            if (st.st_dev, st.st_ino) != self._key:
                f.close()
                raise DataplaneError(
                    f"{self.path} was replaced by another file while open; open it again"
                )
            self._f = f
        return self._f

    def dataset(self, name: str) -> h5py.Dataset:
        d = self._datasets.get(name)
        if d is None:
            d = self._datasets[name] = self.file()[name]
        return d

    def direct(self, name: str) -> tuple[int, np.dtype, tuple[int, ...], int] | None:
        """(steps per chunk, dtype, step shape, step bytes) of dataset ``name`` when each of
        its steps is a contiguous run of raw bytes in the file (unfiltered chunks holding
        whole steps); None otherwise."""
        if name not in self._direct:
            d = self.dataset(name)
            shape = tuple(d.shape[1:])
            ok = (
                d.chunks is not None
                and tuple(d.chunks[1:]) == shape
                and all(shape)
                and d.dtype.kind in "iufc"
                and d.dtype.isnative
                and d.id.get_create_plist().get_nfilters() == 0
            )
            self._direct[name] = (
                (d.chunks[0], np.dtype(d.dtype), shape, int(np.prod(shape)) * d.dtype.itemsize)
                if ok
                else None
            )
        return self._direct[name]

    def step_at(
        self, name: str, index: int
    ) -> tuple[int, tuple[int, np.dtype, tuple[int, ...], int]] | None:
        """(byte offset, layout) of step ``index`` of dataset ``name`` if :meth:`direct`, and
        its chunk is in HDF5's chunk index; None otherwise."""
        layout = self.direct(name)
        if layout is None:
            return None
        first = index - index % layout[0]
        at = self._chunk_at.get((name, first))
        if at is None:
            info = self.dataset(name).id.get_chunk_info_by_coord((first, *(0,) * len(layout[2])))
            if info.byte_offset is None or info.filter_mask:
                return None
            # An unfiltered chunk never moves once allocated.
            at = self._chunk_at[(name, first)] = int(info.byte_offset)
        return at + (index - first) * layout[3], layout

    def close_file(self) -> None:
        self._datasets.clear()
        self.rows.clear()
        if self._f is not None:
            self._f.close()
            self._f = None

    def release(self) -> None:
        with self._guard:
            self.users -= 1
            if self.users:
                return
            del self._open[self._key]
            # Closed under the guard: a source opening the file meanwhile would get a second
            # handle of it while this one is still open (the race described above).
            with self.lock:
                self.close_file()
                os.close(self.fd)
                self.fd = -1


def _close_before_fork() -> None:
    _Shared._guard.acquire()
    for shared in _Shared._open.values():
        shared.lock.acquire()
        shared.close_file()


def _after_fork_in_parent() -> None:
    for shared in _Shared._open.values():
        shared.lock.release()
    _Shared._guard.release()


def _after_fork_in_child() -> None:
    _Shared._guard = threading.Lock()
    for shared in _Shared._open.values():
        shared.lock = threading.RLock()


os.register_at_fork(
    before=_close_before_fork,
    after_in_parent=_after_fork_in_parent,
    after_in_child=_after_fork_in_child,
)


def _pread_rows(
    fd: int, offset: int, layout: tuple[int, np.dtype, tuple[int, ...], int], sel: Selection
) -> np.ndarray:
    """Rows ``sel`` of a step whose C-order bytes start at ``offset``: the rows read whole
    with one pread, then cut along the other axes."""
    _, dtype, shape, _ = layout
    row = int(np.prod(shape[1:])) * dtype.itemsize
    first, rows = (sel.start[0], sel.count[0]) if shape else (0, 1)
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


# -- clearing a crashed SWMR writer's flags ------------------------------------------------
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


def superblock_eof(path: str) -> int | None:
    """Where the superblock says the file ends (its base address plus end-of-file address),
    or None if no superblock is found at the places HDF5 looks (0, 512, 1024, ...)."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        at = 0
        while at + 64 <= size:
            f.seek(at)
            head = f.read(64 + 4 * 8)
            if head[:8] == b"\x89HDF\r\n\x1a\n":
                version = head[8]
                width = head[9] if version >= 2 else head[13]
                if width not in (2, 4, 8):
                    return None
                base_at = {0: 24, 1: 28}.get(version, 12)
                eof_at = base_at + 2 * width
                base = int.from_bytes(head[base_at : base_at + width], "little")
                return base + int.from_bytes(head[eof_at : eof_at + width], "little")
            at = 512 if at == 0 else at * 2
    return None


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


class HDF5Transport(FileTransport):
    scheme = "h5"
    supports_changing_layout = False

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

    def format_writer(self, mode: str) -> FormatWriter:
        return _H5Writer(self, mode)

    def format_source(self) -> StepSource | None:
        if not os.path.exists(self.path):
            return None
        lease = writer_state(read_lease(self.lease_io()))
        flags = superblock_flags(self.path)
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
        if settled:
            eof, size = superblock_eof(self.path), os.path.getsize(self.path)
            if eof is not None and eof > size:
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
        return _H5Source(self, shared) if ours else _ForeignH5Source(self, shared)

    def _refusal(self) -> str:
        return (
            f"{self.url.url} is open for writing without SWMR; reading it now could return "
            f"wrong data. Wait until its writer closes it, or have the writer use SWMR "
            f"(h5py: File(..., libver='latest') and f.swmr_mode = True)."
        )


def _busy(t: HDF5Transport, why: str) -> ChannelBusyError:
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


def _refuse_if_open(t: HDF5Transport) -> None:
    """Raise ChannelBusyError if another open of the file holds HDF5's lock on it."""
    if _locked_elsewhere(t.path):
        raise _busy(t, "it is locked")


def _busy_as_error(t: HDF5Transport, fn: Callable[[], h5py.File]) -> h5py.File:
    try:
        return fn()
    except BlockingIOError as exc:  # taken between our look and HDF5's
        raise _busy(t, str(exc)) from None


class _H5Writer(FormatWriter):
    def __init__(self, t: HDF5Transport, mode: str) -> None:
        self._t = t
        self._specs: dict[str, VarSpec] = {}
        self._pending: dict[str, Any] | None = None
        self._attrs_written: dict[str, AttrValue] | None = None
        self._direct_ok: dict[str, bool] = {}
        self._dsets: dict[str, h5py.Dataset] = {}
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
            n = int(self._committed[0])
            self.next_index = n
            names = json.loads(self._g.attrs["vars"])
            self._specs = {
                name: VarSpec(self._f[name].dtype, self._f[name].shape[1:]) for name in names
            }
            for name in self._specs:  # drop a step that was begun but never committed
                self._f[name].resize(n, axis=0)
            self._trim_meta(n)
            self._f.swmr_mode = True
        else:
            self._f = self._new_file()
            g = self._f.create_group(_META)
            g.attrs["version"] = 1
            g.attrs["layout"] = "step-axis"
            g.create_dataset("committed", data=np.zeros(1, np.int64))
            g.create_dataset("meta", (0,), maxshape=(None,), chunks=(1 << 16,), dtype=np.uint8)
            g.create_dataset(
                "meta_offsets", data=np.zeros(1, np.int64), maxshape=(None,), chunks=(4096,)
            )
            g.create_dataset("attrs_log", (0,), maxshape=(None,), chunks=(1 << 14,), dtype=np.uint8)
            g.create_dataset(
                "attrs_offsets", data=np.zeros(1, np.int64), maxshape=(None,), chunks=(256,)
            )
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

    def _create(self, specs: dict[str, VarSpec]) -> None:
        for name, spec in specs.items():
            self._f.create_dataset(
                name,
                (0, *spec.shape),
                # A zero-length axis must be resizable for HDF5 to accept a chunk of 1 there.
                maxshape=(None, *(n if n else None for n in spec.shape)),
                chunks=_chunks(spec.shape, spec.dtype.itemsize),
                dtype=spec.dtype,
                **self._t.dataset_opts,
            )
        self._g.attrs["vars"] = json.dumps(list(specs))
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
        for name in self._specs:
            self._dset(name).resize(n + 1, axis=0)
        self._pending = {"n": n, "attrs": attrs}

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
                and d.compression is None
                and not d.shuffle
                and not d.fletcher32
                and d.dtype.kind != "b"  # h5py stores bool as an enum type
            )
            self._direct_ok[name] = known
        return known

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
        for name in self._specs:
            self._dset(name).flush()
        self._meta.flush()
        self._offsets.flush()
        # Last: the step exists for readers once `committed` says so.
        self._committed[0] = n + 1
        self._committed.flush()

    def abort(self) -> None:
        if self._pending is not None:
            n = self._pending["n"]
            for name in self._specs:
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


class _H5Source(StepSource):
    """Committed steps of a file in dataplane's layout, read through SWMR."""

    def __init__(self, t: HDF5Transport, shared: _Shared) -> None:
        self._t = t
        self._sh = shared
        self._lock = shared.lock
        with self._lock:
            self._names: list[str] = json.loads(shared.file()[_META].attrs.get("vars", "[]"))
        self._specs: dict[str, VarSpec] = {}
        self._count = 0
        self._closed = False

    def _meta_set(self, name: str) -> h5py.Dataset:
        return self._sh.dataset(f"{_META}/{name}")

    def refresh(self) -> int:
        with self._lock:
            return self._refresh()

    def _refresh(self) -> int:
        committed = self._meta_set("committed")
        committed.refresh()
        count = int(committed[0])
        if count != self._count:
            if not self._names:
                self._names = json.loads(self._sh.file()[_META].attrs.get("vars", "[]"))
            self._meta_set("meta_offsets").refresh()
            self._meta_set("meta").refresh()
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
            a, b = (int(x) for x in self._meta_set("meta_offsets")[index : index + 2])
            info = json.loads(self._meta_set("meta")[a:b].tobytes())
        if info.get("i", index) != index:
            raise IntegrityError(self._inconsistent(f"the metadata of step {info['i']}", index))
        specs = {name: self._spec(name) for name in self._names}
        return StepMeta(index, info["a"], specs), info["c"]

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
                return np.asarray(d[(index,) + selection.slices])
        return _pread_rows(sh.fd, where[0], where[1], selection)

    def _inconsistent(self, what: str, index: int) -> str:
        return (
            f"{self._t.url.url}: HDF5 shows {what} where step {index} was committed. HDF5 "
            f"keeps one view of a file per process: another h5py handle of this file open in "
            f"this process (outside dataplane) can corrupt it. Close that handle, or read the "
            f"file through dataplane only."
        )

    def attrs(self) -> dict[str, AttrValue]:
        with self._lock:
            offsets = self._meta_set("attrs_offsets")
            offsets.refresh()
            k = offsets.shape[0] - 1
            if k == 0:
                return {key: _from_h5_attr(v) for key, v in self._sh.file().attrs.items()}
            log = self._meta_set("attrs_log")
            log.refresh()
            a, b = (int(x) for x in offsets[k - 1 : k + 1])
            return json.loads(log[a:b].tobytes())

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        # Not under the file's lock: release takes the registry's guard, then that lock.
        self._sh.release()


class _ForeignH5Source(StepSource):
    """A file dataplane did not write, mapped by the documented rules (module docstring)."""

    def __init__(self, t: HDF5Transport, shared: _Shared) -> None:
        self._t = t
        self._sh: _Shared | None = shared
        found: dict[str, tuple[np.dtype, tuple[int, ...]]] = {}
        with shared.lock:
            shared.file().visititems(
                lambda name, obj: (
                    found.__setitem__(name, (np.dtype(obj.dtype), tuple(obj.shape)))
                    if isinstance(obj, h5py.Dataset) and obj.dtype.kind in "biufc"
                    else None
                )
            )
        self._step_axis = t.layout == "step-axis"
        if self._step_axis:
            lengths = {n: shape[0] for n, (_, shape) in found.items() if shape}
            if len(set(lengths.values())) > 1:
                shared.release()
                raise SchemaError(
                    f"{t.url.url}: layout='step-axis' needs every dataset to have the same "
                    f"length along axis 0, got {lengths}"
                )
            self._count = next(iter(lengths.values()), 0)
            found = {n: (dt, shape[1:]) for n, (dt, shape) in found.items() if shape}
        else:
            self._count = 1
        self._specs = {n: VarSpec(dt, shape) for n, (dt, shape) in found.items()}

    def _shared(self) -> _Shared:
        if self._sh is None:
            raise DataplaneError(f"{self._t.url.url} is closed")
        return self._sh

    def refresh(self) -> int:
        return self._count

    def meta(self, index: int) -> tuple[StepMeta, dict[str, str]]:
        if not 0 <= index < self._count:
            raise SchemaError(f"{self._t.url.url} has {self._count} steps, not {index + 1}")
        return StepMeta(index, {}, dict(self._specs)), {}

    def get(self, index: int, name: str, selection: Selection) -> np.ndarray:
        sh = self._shared()
        key = (index, *selection.slices) if self._step_axis else selection.slices
        with sh.lock:
            d = sh.dataset(name)
            return np.asarray(d[key] if key else d[()])

    def attrs(self) -> dict[str, AttrValue]:
        sh = self._shared()
        with sh.lock:
            return {key: _from_h5_attr(v) for key, v in sh.file().attrs.items()}

    def close(self) -> None:
        sh, self._sh = self._sh, None
        if sh is not None:
            sh.release()
