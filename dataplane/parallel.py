"""Publishing from MPI ranks: blocks of one global array per variable, one logical channel.

Every ``write`` is collective. The ranks first exchange a small description of their blocks
(names, dtypes, where each block sits) and check it together, so a bad block on any rank makes
*every* rank raise the same ``SchemaError`` before anything is written (holes, overlaps and
disagreeing shapes or dtypes included). Then, per variable:

- **Ranks write their own chunks** (``zarr://`` on a shared filesystem or object store) when
  every rank's block starts on a chunk boundary and ends on one or at the array's edge. The
  chunk shape is fixed at the first step from the blocks (the largest block extent along each
  axis), so an even decomposition whose blocks all have the same size, or differ only in the
  last block, qualifies. Rank 0 begins the step, the ranks write their chunks concurrently
  (no chunk is shared, so none is read-modified-written by two ranks), each block's xxh3
  checksum goes to rank 0, and rank 0 commits. Readers verify each block.
- **Otherwise the blocks travel to rank 0** (``Gatherv`` of raw bytes; blocks of whole rows
  land directly in the global array) and rank 0 writes the global array: unaligned Zarr
  blocks, and every variable of ``h5://``, ``bp5://``, ``sst://``, ``shm://`` and ``mem://``
  with the serial adios2 and h5py from PyPI. Rank 0 needs memory for those global arrays.

Either way the channel looks exactly as if one process had written the global arrays: plain
h5py, zarr and adios2 read them as such, and readers read any hyperslab of them, only the
chunks or blocks they need. A step becomes visible only after every rank's part is in: a rank
that raises makes every rank raise and the step is dropped; a rank that dies takes the MPI
job with it before rank 0 commits. Single values (0-d arrays, Python numbers) and channel
attributes are rank 0's.

MPI-enabled builds of h5py and adios2 are not used for native parallel I/O yet: they work,
through the same aggregation.

The metadata travels with mpi4py's pickle-based lowercase methods as our own small JSON
strings between ranks of one job, never as data read from a channel.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

import dataplane.errors as errors
from dataplane.errors import DataplaneError, SchemaError
from dataplane.model import Block, as_array, check_name

__all__ = ["aligned_chunks", "grid_dims", "plan_step", "split"]

# Gatherv counts are C ints; larger blocks go to rank 0 point to point, in pieces of this size.
_PIECE = 1 << 30


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


class Collective:
    """The MPI side of a parallel publisher: agree, gather, report errors to every rank."""

    def __init__(self, comm: Any) -> None:
        self.comm = comm
        self.rank = comm.Get_rank()
        self.size = comm.Get_size()
        self._buffers: dict[str, np.ndarray] = {}

    def arrive(self) -> None:
        """Wait, sleeping, until every rank got here.

        MPI implementations spin while they wait in a collective. Ranks that wait for rank 0
        to finish writing would take the cores it needs where ranks outnumber cores (a
        laptop, a shared node, CI); a non-blocking barrier polled with short sleeps first
        makes the blocking collective after it quick. It costs a barrier per collective."""
        req = self.comm.Ibarrier()
        delay = 50e-6
        while not req.Test():
            time.sleep(delay)
            delay = min(delay * 2, 2e-3)

    def agree(self, local: dict | None, error: BaseException | None) -> list[dict]:
        """Everyone's description; raises the first rank's error on every rank."""
        self.arrive()
        mine = {"error": encode_error(error) if error else None, "desc": local}
        everyone = [json.loads(s) for s in self.comm.allgather(json.dumps(mine))]
        for rank, theirs in enumerate(everyone):
            if theirs["error"]:
                if rank == self.rank and error is not None:
                    raise error
                raise decode_error(theirs["error"], f"rank {rank}: ")
        return [e["desc"] for e in everyone]

    def outcome(self, error: BaseException | None, root: int = 0) -> Any:
        """Root's success or error, on every rank (root re-raises its own)."""
        self.arrive()
        msg = self.comm.bcast(encode_error(error) if error else None, root=root)
        if msg is None:
            return
        if self.rank == root and error is not None:
            raise error
        raise decode_error(msg, f"rank {root}: ")

    def gather_reports(
        self, value: Any, error: BaseException | None
    ) -> list[tuple[Any, str | None]] | None:
        """Rank 0 gets every rank's (JSON-able value, encoded error or None)."""
        mine = json.dumps([value, encode_error(error) if error else None])
        self.arrive()
        got = self.comm.gather(mine, root=0)
        return None if got is None else [tuple(json.loads(g)) for g in got]

    def any(self, flag: bool) -> bool:
        self.arrive()
        return bool(self.comm.allreduce(1 if flag else 0, op=_mpi().MAX))

    def _buffer(self, key: str, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
        buf = self._buffers.get(key)
        if buf is None or buf.dtype != dtype or buf.shape != shape:
            buf = self._buffers[key] = np.empty(shape, dtype)
        return buf

    def gather_array(
        self, name: str, entry: dict[str, Any], local: np.ndarray | None
    ) -> np.ndarray | None:
        """Rank 0 gets the global array of ``name``; other ranks send their block."""
        MPI = _mpi()
        dtype = np.dtype(entry["dtype"])
        parts = entry["parts"]
        sizes = [math.prod(c) * dtype.itemsize for _, c in parts]
        rows = _row_blocks(entry["shape"], parts)
        if self.rank != 0:
            block = np.ascontiguousarray(local) if local is not None else np.empty(0, dtype)
            if max(sizes) < 2**31 - 1:
                self.comm.Gatherv([block.view(np.uint8).reshape(-1), MPI.BYTE], None, root=0)
            else:
                flat = block.view(np.uint8).reshape(-1)
                for off in range(0, flat.size, _PIECE):
                    self.comm.Send([flat[off : off + _PIECE], MPI.BYTE], dest=0, tag=7)
            return None
        # Buffers are kept from step to step: a write hands its arrays over before it returns,
        # and fresh memory costs a page fault per 4 KiB (a third of the step time, measured).
        out = self._buffer(name, dtype, tuple(entry["shape"]))
        own = np.ascontiguousarray(local)
        displs = [sum(sizes[:r]) for r in range(self.size)]
        if rows:  # blocks of whole rows, in rank order: receive straight into place
            recv = out.reshape(-1).view(np.uint8)
        else:
            recv = self._buffer(name + "/staging", np.dtype(np.uint8), (sum(sizes),))
        if max(sizes) < 2**31 - 1:
            send = own.view(np.uint8).reshape(-1)
            self.comm.Gatherv([send, MPI.BYTE], [recv, (sizes, displs), MPI.BYTE], root=0)
        else:
            recv[displs[0] : displs[0] + sizes[0]] = own.view(np.uint8).reshape(-1)
            for r in range(1, self.size):
                for off in range(0, sizes[r], _PIECE):
                    end = min(off + _PIECE, sizes[r])
                    self.comm.Recv(
                        [recv[displs[r] + off : displs[r] + end], MPI.BYTE], source=r, tag=7
                    )
        if not rows:
            for (start, count), d in zip(parts, displs):
                if all(count):
                    n = math.prod(count) * dtype.itemsize
                    block = recv[d : d + n].view(dtype).reshape(count)
                    out[tuple(slice(s, s + c) for s, c in zip(start, count))] = block
        return out


def _row_blocks(shape: list[int], parts: list[tuple[list[int], list[int]]]) -> bool:
    """True when the ranks' blocks are runs of whole rows in rank order (contiguous memory)."""
    row = 0
    for start, count in parts:
        if list(count[1:]) != list(shape[1:]) or any(start[1:]):
            return False
        if start[0] != row and count[0]:
            return False
        row += count[0]
    return True


def _mpi() -> Any:
    from mpi4py import MPI

    return MPI


def encode_error(exc: BaseException) -> str:
    return json.dumps([type(exc).__name__, str(exc)])


def decode_error(text: str, prefix: str) -> BaseException:
    name, message = json.loads(text)
    cls = getattr(errors, name, None)
    if isinstance(cls, type) and issubclass(cls, DataplaneError):
        return cls(prefix + message)
    return DataplaneError(f"{prefix}{name}: {message}")
