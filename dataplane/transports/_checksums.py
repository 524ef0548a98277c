"""Checksums of stored arrays, kept per block so that every read, whole or partial, is verified.

A variable's array in a step is cut into a grid of blocks of about :data:`BLOCK_BYTES` (trailing
axes whole, the axis where that size is reached cut, the axes before it one index at a time), and
the xxh3-64 of each block is stored with the step. A read, whole or partial, is widened to the
blocks it touches; each is checked before the selection is cut out of them. A damaged byte
therefore never reaches the caller, for the cost of reading up to a block more at either end.

What a step stores for a variable (``"c"`` in its metadata):

- ``{"b": [block shape], "d": [digest, ...]}``: the grid over the whole array, digests in C
  order of the grid;
- ``[[start, count, record], ...]``: regions written by MPI ranks, each with its own ``record``
  (a grid as above, or one digest);
- a digest string: the whole array as one block (files written before blocks existed).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

import numpy as np
import xxhash

from dataplane.model import Selection

__all__ = ["BLOCK_BYTES", "Corrupt", "block_shape", "block_sums", "digest", "verified_read"]

#: Target bytes of a checksum block: a partial read reads at most this much more at either end.
#: Measured (bench_verify.py, now bench/test_read.py; h5, page cache): a verified 4 KiB row
#: costs 24 us against 14 us unverified with 64 KiB blocks (54 us with 256 KiB); a whole
#: 16 MiB step 1.2x.
BLOCK_BYTES = 64 << 10


def digest(arr: np.ndarray) -> str:
    """xxh3-64 of an array's bytes in C order, as 16 hex digits (tens of GB/s)."""
    if arr.size == 0:
        return xxhash.xxh3_64_hexdigest(b"")
    if not arr.flags.c_contiguous:
        arr = np.array(arr, order="C")
    return xxhash.xxh3_64_hexdigest(arr.reshape(-1).view(np.uint8).data)


def block_shape(
    shape: tuple[int, ...], itemsize: int, target: int = BLOCK_BYTES
) -> tuple[int, ...]:
    """The block of an array of ``shape``: whole trailing axes while they fit in ``target``
    bytes, part of the next axis, one index of each axis before it. Every block of an array
    in C order is then one contiguous run of its bytes, and the blocks follow each other."""
    block = [max(1, n) for n in shape]
    inner = itemsize
    for axis in range(len(shape) - 1, -1, -1):
        if inner * block[axis] <= target:
            inner *= block[axis]
            continue
        block[axis] = max(1, target // inner)
        for k in range(axis):
            block[k] = 1
        break
    return tuple(block)


def _runs(shape: tuple[int, ...], block: tuple[int, ...], lo: tuple[int, ...], hi: tuple[int, ...]):
    """(index in the grid of ``shape``, bytes as elements) of each block from grid corner ``lo``
    to ``hi`` (exclusive), in the order their bytes follow each other in the C-order box."""
    grid = [-(-n // b) for n, b in zip(shape, block)]
    for corner in itertools.product(*(range(a, z) for a, z in zip(lo, hi))):
        flat = 0
        size = 1
        for g, n, b, k in zip(grid, shape, block, corner):
            flat = flat * g + k
            size *= min(b, n - k * b)
        yield flat, size


def block_sums(arr: np.ndarray, target: int = BLOCK_BYTES) -> dict[str, Any]:
    """The block checksums of a C-contiguous array (see the module docstring)."""
    shape = tuple(arr.shape)
    block = block_shape(shape, arr.itemsize, target)
    if arr.size == 0:
        return {"b": list(block), "d": []}
    flat = arr.reshape(-1).view(np.uint8).data
    grid = tuple(-(-n // b) for n, b in zip(shape, block))
    out = []
    pos = 0
    for _, size in _runs(shape, block, (0,) * len(shape), grid):
        end = pos + size * arr.itemsize
        out.append(xxhash.xxh3_64_hexdigest(flat[pos:end]))
        pos = end
    return {"b": list(block), "d": out}


class Corrupt(Exception):
    """A block's bytes do not match its checksum (``where`` says which, for the message)."""

    def __init__(self, where: str, got: str, stored: str) -> None:
        super().__init__(f"checksum {got} != {stored} written with it ({where})")


def _regions(
    shape: tuple[int, ...], stored: Any
) -> list[tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...], list[str]]]:
    """(start, count, block, digests) of every checksummed region of an array of ``shape``."""

    def one(start: tuple[int, ...], count: tuple[int, ...], record: Any):
        if isinstance(record, dict):
            return start, count, tuple(int(b) for b in record["b"]), list(record["d"])
        return start, count, tuple(max(1, n) for n in count), [str(record)]

    if isinstance(stored, list):
        return [one(tuple(s), tuple(c), rec) for s, c, rec in stored]
    return [one((0,) * len(shape), shape, stored)]


def _check_box(
    data: np.ndarray,
    count: tuple[int, ...],
    block: tuple[int, ...],
    glo: list[int],
    ghi: list[int],
    digests: list[str],
    start: tuple[int, ...],
) -> None:
    """Verify the blocks ``glo``..``ghi`` of a region's grid, which ``data`` holds in C order."""
    flat = data.reshape(-1).view(np.uint8).data
    pos = 0
    itemsize = data.itemsize
    for index, size in _runs(count, block, tuple(glo), tuple(ghi)):
        end = pos + size * itemsize
        got = xxhash.xxh3_64_hexdigest(flat[pos:end])
        if index >= len(digests) or got != digests[index]:
            stored = digests[index] if index < len(digests) else "none"
            raise Corrupt(f"block {index} of the region at {list(start)}", got, stored)
        pos = end


def _rows_read(
    read: Callable[[Selection], np.ndarray],
    shape: tuple[int, ...],
    selection: Selection,
    rows: int,
    digests: list[str],
) -> np.ndarray:
    """:func:`verified_read` where each block is ``rows`` whole rows (axis 0), the common
    case (rows up to a block's size), with the least work per read."""
    first, count = selection.start[0], selection.count[0]
    g0, g1 = first // rows, -(-(first + count) // rows)
    a, z = g0 * rows, min(g1 * rows, shape[0])
    trailing = tuple(selection.count[1:]) == shape[1:]
    if a == first and z == first + count and trailing:
        box = selection
    else:
        box = Selection((a,) + (0,) * (len(shape) - 1), (z - a,) + shape[1:])
    data = read(box)
    if not data.flags.c_contiguous:
        data = np.array(data, order="C")
    flat = data.reshape(-1).view(np.uint8).data
    step = rows * (data.nbytes // max(1, z - a))
    for g, pos in zip(range(g0, g1), range(0, len(flat), step)):
        got = xxhash.xxh3_64_hexdigest(flat[pos : pos + step])
        if g >= len(digests) or got != digests[g]:
            raise Corrupt(
                f"block {g} (rows {g * rows}-)", got, digests[g] if g < len(digests) else "none"
            )
    if box is selection:
        return data
    cut = data[first - a : first - a + count]
    return cut if trailing else cut[(slice(None),) + selection.slices[1:]]


def verified_read(
    read: Callable[[Selection], np.ndarray],
    shape: tuple[int, ...],
    selection: Selection,
    stored: Any,
) -> np.ndarray:
    """``selection`` of an array of ``shape``, read through ``read`` in whole checksum blocks,
    each verified against ``stored``; raises :class:`Corrupt` on a mismatch."""
    sel_start, sel_count = selection.start, selection.count
    if 0 in sel_count:
        return read(selection)
    if isinstance(stored, dict) and shape and tuple(stored["b"][1:]) == shape[1:]:
        return _rows_read(read, shape, selection, int(stored["b"][0]), stored["d"])
    regions = _regions(shape, stored)
    single = len(regions) == 1
    out: np.ndarray | None = None
    for start, count, block, digests in regions:
        glo, ghi, a0, z0, lo, hi = [], [], [], [], [], []
        for s, c, r, n, b in zip(sel_start, sel_count, start, count, block):
            lo_i, hi_i = max(s, r) - r, min(s + c, r + n) - r
            if lo_i >= hi_i:
                break
            g0, g1 = lo_i // b, -(-hi_i // b)
            glo.append(g0)
            ghi.append(g1)
            a0.append(g0 * b)
            z0.append(min(g1 * b, n))
            lo.append(lo_i)
            hi.append(hi_i)
        else:
            box = Selection(
                tuple(r + a for r, a in zip(start, a0)),
                tuple(z - a for a, z in zip(a0, z0)),
            )
            data = read(box)
            if not data.flags.c_contiguous:  # (np.ascontiguousarray makes a 0-d array 1-d)
                data = np.array(data, order="C")
            _check_box(data, count, block, glo, ghi, digests, start)
            if not data.ndim:
                return data
            src = tuple(slice(a - b0, z - b0) for a, z, b0 in zip(lo, hi, a0))
            if single:
                return data if box == selection else data[src]
            if out is None:
                out = np.empty(sel_count, data.dtype)
            dst = tuple(slice(r + a - s, r + z - s) for r, a, z, s in zip(start, lo, hi, sel_start))
            out[dst] = data[src]
    if out is None:  # no stored region reaches the selection
        raise Corrupt(f"no checksummed region holds {selection}", "none", "none")
    return out
