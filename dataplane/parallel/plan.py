"""Planning a parallel step: how the ranks' blocks tile each global array, checked alike on
every rank (pure functions of the ranks' descriptions)."""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from dataplane.errors import SchemaError
from dataplane.model import Block, as_array, check_name

__all__ = [
    "aligned_chunks",
    "chunk_transfers",
    "describe_local",
    "grid_dims",
    "plan_step",
    "row_chunk",
    "split",
]


def grid_dims(parts: int, ndims: int) -> tuple[int, ...]:
    """Factor ``parts`` into ``ndims`` factors as equal as possible, largest first
    (what ``MPI_Dims_create`` does)."""
    if parts < 1 or ndims < 1:
        raise SchemaError(f"need parts >= 1 and ndims >= 1, got {parts} and {ndims}")
    dims = [1] * ndims
    n = parts
    factors = []
    f = 2
    while f * f <= n:
        while n % f == 0:
            factors.append(f)
            n //= f
        f += 1
    if n > 1:
        factors.append(n)
    for f in sorted(factors, reverse=True):
        dims[dims.index(min(dims))] *= f
    return tuple(sorted(dims, reverse=True))


def split(
    shape: Iterable[int], parts: int, index: int, axes: int | Iterable[int] = 0
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """``(start, count)`` of part ``index`` of ``parts`` in an even decomposition of ``shape``.

    ``axes`` are the axes to cut (default 0: rows); with several, the parts form a grid as even
    as ``parts`` allows. Sizes differ by at most one along each axis; when there are more parts
    than rows, some parts are empty (count 0), which every read accepts. Typical use on reader
    rank ``r`` of ``n``: ``step.read("u", *dp.split(step.vars["u"].shape, n, r))``.
    """
    shape = tuple(int(n) for n in shape)
    axes = (axes,) if isinstance(axes, (int, np.integer)) else tuple(int(a) for a in axes)
    if not shape:
        raise SchemaError("a 0-d variable cannot be split; read it whole")
    if not axes or any(not 0 <= a < len(shape) for a in axes) or len(set(axes)) != len(axes):
        raise SchemaError(f"axes {axes} do not name distinct axes of a {len(shape)}-d shape")
    if not 0 <= index < parts:
        raise SchemaError(f"part index {index} is not in 0..{parts - 1}")
    dims = grid_dims(parts, len(axes))
    start = [0] * len(shape)
    count = list(shape)
    rest = index
    for axis, d in reversed(list(zip(axes, dims))):
        i = rest % d
        rest //= d
        n = shape[axis]
        start[axis] = i * (n // d) + min(i, n % d)
        count[axis] = n // d + (1 if i < n % d else 0)
    return tuple(start), tuple(count)


# -- the collective step ------------------------------------------------------------------


def describe_local(data: Mapping[str, Any] | Iterable[tuple[str, Any]]) -> tuple[dict, dict]:
    """This rank's view of a step: ``(description, arrays)``. The description is JSON-able."""
    items = list(data.items()) if isinstance(data, Mapping) else list(data)
    desc: dict[str, Any] = {}
    arrays: dict[str, np.ndarray] = {}
    for item in items:
        if not (isinstance(item, tuple) and len(item) == 2):
            raise SchemaError(f"write() takes a mapping or (name, array) pairs, got {item!r}")
        name, value = item
        check_name(name)
        if name in desc:
            raise SchemaError(f"variable {name!r} appears twice in one step")
        if isinstance(value, Block):
            arr, start, shape = value.checked(name)
            desc[name] = {"kind": "block", "start": list(start), "shape": list(shape)}
        else:
            arr = as_array(value, name)
            desc[name] = {"kind": "scalar" if arr.ndim == 0 else "join"}
        desc[name].update(dtype=arr.dtype.str, local=list(arr.shape))
        arrays[name] = arr
    return desc, arrays


def plan_step(descs: list[dict]) -> dict[str, dict[str, Any]]:
    """From every rank's description, the global step: for each variable its dtype, global
    shape and each rank's ``(start, count)``. Raises ``SchemaError`` naming the rank at fault;
    every rank computes the same plan from the same input, so all raise or none does."""
    names = list(descs[0])
    for rank, d in enumerate(descs):
        if set(d) != set(names):
            missing = sorted(set(names) - set(d))
            extra = sorted(set(d) - set(names))
            raise SchemaError(
                f"rank {rank} wrote variables {sorted(d)} but rank 0 wrote {sorted(names)} "
                f"(missing {missing}, extra {extra}); with comm= every rank writes every "
                f"variable of a step (a rank without data writes zero rows)"
            )
    plan: dict[str, dict[str, Any]] = {}
    for name in names:
        per = [d[name] for d in descs]
        kinds = {p["kind"] for p in per}
        dtypes = {p["dtype"] for p in per}
        if len(kinds) > 1:
            raise SchemaError(
                f"variable {name!r}: ranks disagree on its kind ({_by_rank(per, 'kind')}); "
                f"give every rank a Block, or every rank a plain array"
            )
        if len(dtypes) > 1:
            raise SchemaError(
                f"variable {name!r}: ranks disagree on its dtype ({_by_rank(per, 'dtype')}); "
                f"a global array has one dtype"
            )
        kind = kinds.pop()
        if kind == "scalar":
            plan[name] = {"kind": kind, "dtype": per[0]["dtype"], "shape": [], "parts": None}
            continue
        if kind == "join":
            tails = {tuple(p["local"][1:]) for p in per}
            if len(tails) > 1:
                raise SchemaError(
                    f"variable {name!r}: plain arrays from the ranks join along axis 0, so "
                    f"their other dimensions must agree; got shapes {_by_rank(per, 'local')}"
                )
            row = 0
            parts = []
            for p in per:
                n = p["local"][0]
                parts.append(([row] + [0] * (len(p["local"]) - 1), list(p["local"])))
                row += n
            shape = [row, *per[0]["local"][1:]]
        else:
            shapes = {tuple(p["shape"]) for p in per}
            if len(shapes) > 1:
                raise SchemaError(
                    f"variable {name!r}: ranks disagree on the global shape "
                    f"({_by_rank(per, 'shape')})"
                )
            shape = list(shapes.pop())
            parts = [(p["start"], p["local"]) for p in per]
            _check_tiling(name, shape, parts)
        plan[name] = {"kind": kind, "dtype": per[0]["dtype"], "shape": shape, "parts": parts}
    return plan


def aligned_chunks(
    shape: list[int],
    parts: list[tuple[list[int], list[int]]],
    existing: tuple[int, ...] | None = None,
) -> tuple[int, ...] | None:
    """A chunk shape with which no two ranks' blocks share a chunk, or None.

    ``existing`` is the chunking of an array that already exists; otherwise the largest block
    extent along each axis. Blocks must start on chunk boundaries and end on one or at the
    edge of the array. Ranks can then write their chunks concurrently; otherwise two ranks
    would read, modify and write the same chunk, and one of them would lose.
    """
    boxes = [(s, c) for s, c in parts if all(c)]
    if not boxes or not shape:
        return None
    chunk = existing or tuple(max(c[a] for _, c in boxes) for a in range(len(shape)))
    if len(chunk) != len(shape) or not all(chunk):
        return None
    for start, count in boxes:
        for a, n in enumerate(shape):
            end = start[a] + count[a]
            if start[a] % chunk[a] or (end % chunk[a] and end != n):
                return None
    return tuple(chunk)


def _by_rank(per: list[dict], key: str) -> str:
    return ", ".join(f"rank {r}: {p[key]}" for r, p in enumerate(per))


def _check_tiling(name: str, shape: list[int], parts: list[tuple[list[int], list[int]]]) -> None:
    """The blocks must cover the global array exactly once: no holes (unwritten values would
    be read as data) and no overlaps (which rank wins would be arbitrary)."""
    boxes = [(r, s, c) for r, (s, c) in enumerate(parts) if all(c)]
    for i, (ra, sa, ca) in enumerate(boxes):
        for rb, sb, cb in boxes[i + 1 :]:
            if all(a0 < b0 + bn and b0 < a0 + an for a0, an, b0, bn in zip(sa, ca, sb, cb)):
                raise SchemaError(
                    f"variable {name!r}: the blocks of rank {ra} (start {sa}, shape {ca}) and "
                    f"rank {rb} (start {sb}, shape {cb}) overlap"
                )
    covered = sum(math.prod(c) for _, _, c in boxes)
    if covered != math.prod(shape):
        raise SchemaError(
            f"variable {name!r}: the blocks cover {covered} of the {math.prod(shape)} elements "
            f"of global shape {shape}; every element must be written by exactly one rank"
        )


def row_blocks(shape: list[int], parts: list[tuple[list[int], list[int]]]) -> bool:
    """True when the ranks' blocks are runs of whole rows in rank order (contiguous memory)."""
    row = 0
    for start, count in parts:
        if list(count[1:]) != list(shape[1:]) or any(start[1:]):
            return False
        if start[0] != row and count[0]:
            return False
        row += count[0]
    return True


def row_chunk(shape: list[int], itemsize: int, target: int = 8 << 20) -> tuple[int, ...]:
    """Chunks of whole rows of about ``target`` bytes (at least one row): for arrays whose
    chunks have owners, so that an owner holds about that much, never the global step."""
    if not shape:
        return ()
    row = math.prod(shape[1:]) * itemsize
    return (max(1, min(shape[0], target // max(row, 1))), *shape[1:])


Transfer = tuple[
    tuple[int, ...], tuple[int, ...], int, list[tuple[int, tuple[int, ...], tuple[int, ...]]]
]


def chunk_transfers(
    shape: list[int],
    parts: list[tuple[list[int], list[int]]],
    chunk: tuple[int, ...],
    owner_of: list[int],
    me: int,
) -> list[Transfer]:
    """The chunks of one global array that rank ``me`` helps write, in the order every rank
    walks them (by chunk index): (chunk start, chunk count, owner, the part of each block in
    it as (rank, start, count), by rank). ``shape``: the global array's; ``parts``: every
    rank's block (start, count);
    ``chunk``: the array's chunk shape; ``owner_of[r]``: the rank that writes chunks whose
    lowest contributing rank is ``r`` (its aggregator).

    Each chunk has one owner, which assembles it from every block's part and writes it whole:
    no two ranks ever write one chunk, however the blocks fall across chunks."""
    boxes = [(r, s, c) for r, (s, c) in enumerate(parts) if all(c)]
    if not boxes or not all(chunk):
        return []
    mine = [b for b in boxes if b[0] == me or owner_of[b[0]] == me]
    wanted: set[tuple[int, ...]] = set()
    for _, s, c in mine:
        ranges = [range(s[a] // n, -(-(s[a] + c[a]) // n)) for a, n in enumerate(chunk)]
        wanted.update(itertools.product(*ranges))
    out: list[Transfer] = []
    for index in sorted(wanted):
        start = tuple(i * n for i, n in zip(index, chunk))
        end = tuple(min(st + n, e) for st, n, e in zip(start, chunk, shape))
        pieces = []
        for r, s, c in boxes:
            lo = tuple(max(a, b) for a, b in zip(s, start))
            hi = tuple(min(a + n, b) for a, n, b in zip(s, c, end))
            if all(h > x for x, h in zip(lo, hi)):
                pieces.append((r, lo, tuple(h - x for x, h in zip(lo, hi))))
        owner = owner_of[pieces[0][0]]
        if owner == me or any(r == me for r, _, _ in pieces):
            out.append((start, tuple(e - s for s, e in zip(start, end)), owner, pieces))
    return out
