"""Subfiles of an ``h5://`` channel that MPI aggregators write, and the virtual datasets of
its main file that join them into one global array per variable.

Serial h5py (what PyPI gives) cannot write one file from several processes, so with
``aggregators=K > 1`` each of K groups of ranks has one process, its aggregator, that writes
the group's blocks into a subfile of its own. Rank 0 keeps the channel's main file: the step
records and commit count as for one writer, and for every array variable an HDF5 virtual
dataset (VDS) whose mappings place each rank's block, read from its group's subfile, where it
sits in the global array. Plain h5py opening the main file sees one dataset per variable with
a leading step axis, as for a file written by one process.

The mappings are fixed when the dataset is created (HDF5 cannot add any later) and unlimited
along the step axis: every step must have the blocks of the first. Subfile paths are relative
to the main file's folder, which HDF5 searches for them, so the channel can be moved whole.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from typing import Any

import h5py

from dataplane.model import VarSpec

__all__ = ["Subfile", "create_virtual", "subfile_name"]


def subfile_name(main: str, token: str, group: int) -> str:
    """Group ``group``'s subfile, relative to the folder of the main file ``main``
    (``token`` tells one channel's subfiles from an earlier one's of the same name)."""
    return f"{os.path.basename(main)}.agg/{token}-{group:05d}.h5"


def create_virtual(
    f: h5py.File, name: str, spec: VarSpec, boxes: list[tuple[str, list[int], list[int]]]
) -> None:
    """Dataset ``name`` of ``f`` as a VDS with a leading unlimited step axis: each of
    ``boxes`` (subfile, start, count) maps that region of every step of the subfile's dataset
    ``name`` to the same region of this one."""
    shape = tuple(spec.shape)
    unlimited = h5py.h5s.UNLIMITED
    space = h5py.h5s.create_simple((0, *shape), (unlimited, *shape))
    dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
    for path, start, count in boxes:
        where = (0, *start)
        counts = (unlimited, *(1,) * len(shape))
        block = (1, *count)
        virtual = space.copy()
        virtual.select_hyperslab(where, counts, block=block)
        source = h5py.h5s.create_simple((0, *shape), (unlimited, *shape))
        source.select_hyperslab(where, counts, block=block)
        dcpl.set_virtual(virtual, path.encode(), name.encode(), source)
    h5py.h5d.create(f.id, name.encode(), h5py.h5t.py_create(spec.dtype), space, dcpl=dcpl)


class Subfile:
    """An aggregator's subfile: per array variable, a dataset with the global shape and a
    leading step axis, of which only its group's regions are ever written (HDF5 allocates
    only the chunks written). Followed by readers through SWMR, like a main file."""

    def __init__(
        self,
        path: str,
        specs: dict[str, VarSpec],
        chunking: Any,
        opts: dict[str, Any],
        append: bool = False,
    ) -> None:
        """A new subfile at ``path`` (built beside it, then moved there), or with ``append``
        the one there; ``chunking(shape, itemsize)`` gives a variable's chunks."""
        self.path = path
        self._row = -1
        if append:
            # (A killed aggregator's write flags were cleared with the main file's: _H5Writer.)
            self._f = h5py.File(path, "r+", libver="latest")
        else:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            tmp = f"{path}.{secrets.token_hex(4)}.tmp"
            self._f = h5py.File(tmp, "x", libver="latest")
            try:
                for name, spec in specs.items():
                    self._f.create_dataset(
                        name,
                        (0, *spec.shape),
                        maxshape=(None, *spec.shape),
                        chunks=chunking(spec.shape, spec.dtype.itemsize),
                        dtype=spec.dtype,
                        **opts,
                    )
                os.replace(tmp, path)
            except BaseException:
                self._f.close()
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)
                raise
        # Before rank 0 makes the main file visible: a reader's VDS opens this file with
        # SWMR read, which HDF5 refuses for a file open for writing without SWMR.
        self._f.swmr_mode = True
        self._dsets = {name: self._f[name] for name in specs}

    def begin(self, row: int) -> None:
        """Make room for step ``row`` (dropping what a step begun there and not committed
        left)."""
        for d in self._dsets.values():
            d.resize(row + 1, axis=0)
        self._row = row

    def dataset(self, name: str) -> h5py.Dataset:
        return self._dsets[name]

    @property
    def row(self) -> int:
        return self._row

    def flush(self) -> None:
        for d in self._dsets.values():
            d.flush()

    def close(self, rows: int | None) -> None:
        """Close it; ``rows``: the committed steps, past which nothing is kept."""
        try:
            if rows is not None:
                for d in self._dsets.values():
                    if d.shape[0] > rows:
                        d.resize(rows, axis=0)
        finally:
            self._f.close()
