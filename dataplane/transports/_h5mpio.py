"""Writing an ``h5://`` channel from every MPI rank at once through parallel HDF5 (an
MPI-enabled h5py: ``driver="mpio"``).

Every rank opens the file and writes its own blocks into the global datasets, from its own
memory. HDF5 requires every call that changes the file's structure (creating or growing a
dataset, attributes) to be made by every rank alike, so each method here is collective;
only raw values are written by one rank (its blocks; rank 0 the step records). The file is
the one a single dataplane writer makes. The writer's lease is rank 0's.

Readers: HDF5 1.10 cannot combine SWMR with MPI-IO, and a file HDF5 changes without SWMR may
be inconsistent on disk at any moment (parallel HDF5 does not mark it "open for writing"), so
the lease says ``mpio`` and readers do not open the file while it says the writer is alive: a
live subscriber takes every step, verified, once the writer closed it.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
from typing import Any

import h5py
import numpy as np

import dataplane.errors as errors
from dataplane.errors import DataplaneError, OptionError, SchemaError
from dataplane.model import AttrValue, VarSpec
from dataplane.transports._checksums import block_sums
from dataplane.transports._h5repair import clear_write_flags, superblock_flags
from dataplane.transports._h5writer import (
    _META,
    _describe,
    _h5_attr,
    _row_chunks,
    create_meta,
)
from dataplane.transports._lease import Lease

__all__ = ["MPIIOWriter", "available"]


def available() -> bool:
    """Whether h5py is built against parallel HDF5."""
    return bool(h5py.get_config().mpi)


class MPIIOWriter:
    """The channel's file open on every rank of ``comm`` (collective to make and to use)."""

    def __init__(self, t: Any, comm: Any, mode: str) -> None:
        if not available():
            raise OptionError("this h5py is not built with MPI (h5py.get_config().mpi is False)")
        self._t = t
        self._comm = comm
        self.rank = comm.Get_rank()
        self._lease: Lease | None = None
        self._f: h5py.File | None = None
        self._specs: dict[str, VarSpec] = {}
        error: BaseException | None = None
        if self.rank == 0:
            try:
                io = t.lease_io()
                io.make_parents()
                lease = Lease(io, t.url.url, t.heartbeat)
                lease.acquire(t.clear_leftovers)  # another writer's channel: ChannelBusyError
                self._lease = lease
                if mode == "w":
                    _remove_old(t.path)
            except Exception as exc:
                error = exc
                if self._lease is not None:
                    self._lease.release("failed")
                    self._lease = None
        self._all_ok(error, root_only=True)
        append = comm.bcast(mode == "a" and os.path.exists(t.path), root=0)
        if append and self.rank == 0 and superblock_flags(t.path):
            clear_write_flags(t.path)  # its writer died (this one holds the lease now)
        comm.Barrier()
        try:
            self._f = h5py.File(
                t.path, "r+" if append else "w", driver="mpio", comm=comm, libver="latest"
            )
            if append:
                self.next_index = self._open_existing()
            else:
                self._create_meta()
                self.next_index = 0
        except Exception as exc:
            error = exc
        try:
            self._all_ok(error)
        except BaseException:
            if self._lease is not None:
                self._lease.release("failed")
            raise
        if self._lease is not None:
            self._lease.ready(mpio=True)  # readers wait for the close (see hdf5.py)

    # -- collective error handling ---------------------------------------------------------
    def _all_ok(self, error: BaseException | None, root_only: bool = False) -> None:
        """Raise on every rank if any rank had ``error`` (the first rank's, by rank; with
        ``root_only``, only rank 0 can have one)."""
        mine = None if error is None else [type(error).__name__, str(error)]
        if root_only:
            got = [self._comm.bcast(mine, root=0)]
        else:
            got = self._comm.allgather(mine)
        for rank, text in enumerate(got):
            if text is not None:
                if rank == self.rank and error is not None:
                    raise error
                cls = getattr(errors, text[0], None)
                if not (isinstance(cls, type) and issubclass(cls, DataplaneError)):
                    raise DataplaneError(f"rank {rank}: {text[0]}: {text[1]}")
                raise cls(f"rank {rank}: {text[1]}")

    # -- layout ------------------------------------------------------------------------------
    def _create_meta(self) -> None:
        f = self._f
        assert f is not None
        g = create_meta(f)
        g.attrs["written_by"] = json.dumps(
            {
                "ranks": self._comm.Get_size(),
                "method": "mpio",
                "aggregators": self._comm.Get_size(),
                "files": [os.path.basename(self._t.path)],
            }
        )

    def _open_existing(self) -> int:
        f = self._f
        assert f is not None
        if _META not in f:
            raise DataplaneError(
                f"{self._t.url.url} was not written by dataplane; append needs its layout"
            )
        g = f[_META]
        n = int(g["committed"][0])
        names = json.loads(g.attrs.get("vars", "[]"))
        self._specs = {k: VarSpec(np.dtype(f[k].dtype), tuple(f[k].shape[1:])) for k in names}
        for k in names:  # a step begun and never committed
            f[k].resize(n, axis=0)
        offsets = g["meta_offsets"]
        offsets.resize(n + 1, axis=0)
        g["meta"].resize(int(offsets[n]), axis=0)
        return n

    # -- a step --------------------------------------------------------------------------------
    def begin(self, n: int, specs: dict[str, VarSpec]) -> None:
        """Collective: make room for step ``n`` (creating the datasets at the first step)."""
        f = self._f
        assert f is not None
        if not self._specs:
            for name, spec in specs.items():
                f.create_dataset(
                    name,
                    (0, *spec.shape),
                    maxshape=(None, *(k if k else None for k in spec.shape)),
                    chunks=_row_chunks(spec.shape, spec.dtype.itemsize),
                    dtype=spec.dtype,
                    # Parallel HDF5 allocates a step's chunks when the dataset grows; filling
                    # them first doubled every step's writes (36 ms of 69 for 64 MiB). The
                    # ranks' blocks cover every element before the step is committed.
                    fill_time="never",
                )
            f[_META].attrs["vars"] = json.dumps(list(specs))
            self._specs = dict(specs)
        elif specs != self._specs:
            raise SchemaError(
                f"{self._t.url.url}: step {n} has variables {_describe(specs)} but the channel "
                f"has {_describe(self._specs)}; h5:// stores each variable as one dataset with a "
                f"leading step axis, so every step has the same variables and shapes"
            )
        for name in self._specs:
            f[name].resize(n + 1, axis=0)

    def put(self, n: int, name: str, start: tuple[int, ...], block: np.ndarray) -> Any:
        """This rank's ``block`` at ``start`` of step ``n`` (independent I/O); its checksum
        record."""
        f = self._f
        assert f is not None
        block = np.ascontiguousarray(block)
        where = tuple(slice(s, s + c) for s, c in zip(start, block.shape))
        f[name][(n,) + where] = block
        return block_sums(block)

    def abort(self, n: int) -> None:
        """Collective: drop step ``n``."""
        f = self._f
        assert f is not None
        for name in self._specs:
            f[name].resize(n, axis=0)

    def commit(self, n: int, info: dict[str, Any]) -> None:
        """Collective: step ``n``'s record (rank 0's ``info``) and the commit count, flushed.

        One flush, not one before the count as with SWMR: no reader opens the file before
        its writer closed it (module docstring), and a second flush cost every step a
        collective sync."""
        f = self._f
        assert f is not None
        g = f[_META]
        blob = np.frombuffer(json.dumps(info).encode(), np.uint8)
        size = int(self._comm.bcast(blob.size, root=0))
        meta, offsets = g["meta"], g["meta_offsets"]
        end = int(offsets[n])
        meta.resize(end + size, axis=0)
        offsets.resize(n + 2, axis=0)
        if self.rank == 0:
            meta[end:] = blob
            offsets[n + 1] = end + size
            g["committed"][0] = n + 1
        f.flush()

    def set_attrs(self, attrs: dict[str, AttrValue]) -> None:
        """Collective: the channel attributes (rank 0's), logged and as root attributes."""
        f = self._f
        assert f is not None
        g = f[_META]
        log, offs = g["attrs_log"], g["attrs_offsets"]
        blob = np.frombuffer(json.dumps(attrs).encode(), np.uint8)
        k = offs.shape[0] - 1
        end = int(offs[k])
        log.resize(end + blob.size, axis=0)
        offs.resize(k + 2, axis=0)
        if self.rank == 0:
            log[end:] = blob
            offs[k + 1] = end + blob.size
        for key in list(f.attrs):
            if key not in attrs:
                del f.attrs[key]
        for key, value in attrs.items():
            f.attrs[key] = _h5_attr(value)

    def close(self, failed: bool) -> None:
        """Collective. The lease ends as ``failed`` or ``closed``."""
        error: BaseException | None = None
        try:
            if self._f is not None:
                self._f.close()
                self._f = None
        except Exception as exc:
            error = exc
        try:
            self._all_ok(error)
        finally:
            if self._lease is not None:
                self._lease.release("failed" if failed or error else "closed")
                self._lease = None


def _remove_old(path: str) -> None:
    """Mode "w": the old channel goes (readers holding it keep their copy), with its
    subfiles."""
    for old in [path, *glob.glob(os.path.join(glob.escape(path) + ".agg", "*.h5"))]:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(old)
