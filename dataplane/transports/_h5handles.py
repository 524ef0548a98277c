"""HDF5 files shared by the readers of one process, safe across threads and fork(), and rows
of uncompressed chunks read with pread at their byte offset."""

from __future__ import annotations

import ctypes
import os
import re
import threading
from typing import Any, ClassVar

import h5py
import numpy as np

from dataplane.errors import DataplaneError


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
    try:
        return _open_swmr_once(path, settled)
    except OSError as exc:
        if "access flag not the same" not in str(exc):
            raise
        # HDF5 opens a file once per process: a handle the program holds without SWMR (a
        # plain h5py.File) keeps dataplane from reading it, and is no sign of damage.
        raise DataplaneError(
            f"{path} is open in this process without SWMR (e.g. h5py.File(path)); close that "
            f"handle, or open it with h5py.File(path, 'r', swmr=True), then read it here"
        ) from exc


def _open_swmr_once(path: str, settled: bool) -> h5py.File:
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
        self._joined: dict[str, bool] = {}
        #: Per dataset joined from subfiles: the steps committed when it was last refreshed.
        self.seen: dict[str, int] = {}

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
            d = self._datasets[name] = self.transient(name)
        return d

    def transient(self, name: str) -> h5py.Dataset:
        """Dataset ``name`` as the file is now, not kept open: closed once dropped. For a
        settled file's metadata, read once: every dataset a process holds open makes each
        HDF5 close in it slower (a file closed beside 64 open files, each holding 5
        datasets, cost 2.5 ms to open and close; holding one each, 1.4 ms)."""
        # (h5d.open costs half of File.__getitem__, which resolves links and object types.)
        return h5py.Dataset(h5py.h5d.open(self.file().id, name.encode()))

    def current(self, name: str) -> h5py.Dataset:
        """Dataset ``name`` as the file is now: SWMR-refreshed, or opened just now."""
        d = self._datasets.get(name)
        if d is None:
            return self.dataset(name)
        d.refresh()
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

    def joined(self, name: str) -> bool:
        """Whether dataset ``name`` is a virtual dataset (joined from subfiles)."""
        got = self._joined.get(name)
        if got is None:
            got = self._joined[name] = bool(self.dataset(name).is_virtual)
        return got

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
        self.seen.clear()
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
