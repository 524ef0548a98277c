"""The MPI side of a parallel publisher: agree on a plan, gather blocks, report errors."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np

import dataplane.errors as errors
from dataplane.errors import DataplaneError, SchemaError
from dataplane.model import check_attrs
from dataplane.parallel.plan import Transfer, describe_local, row_blocks

# Gatherv counts are C ints; larger blocks go to rank 0 point to point, in pieces of this size.
_PIECE = 1 << 30
#: Longest sleep between two looks while a rank waits for the others. Each collective of a
#: step waits about half of it after the last rank arrived: at 1 ms, 2 ranks writing 64 MiB
#: steps through aggregators=ranks made 1.57-1.68 GB/s, at 0.1 ms 1.82-1.93 (4 ranks on 2
#: cores: 1.15-1.28 -> 1.41-1.57), what each rank writing a channel of its own makes.
_MAX_SLEEP = 1e-4


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
            delay = min(delay * 2, _MAX_SLEEP)

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

    def agree_step(self, data: Any, attrs: Any) -> tuple[list[dict], dict[str, np.ndarray], dict]:
        """Every rank's description of its blocks of one step (for ``plan_step``), this rank's
        arrays and the checked step attributes; a bad block or attribute on any rank raises
        on every rank before anything is written."""
        desc: dict | None = None
        arrays: dict[str, np.ndarray] = {}
        step_attrs: dict = {}
        error: BaseException | None = None
        try:
            if isinstance(data, (str, bytes)) or not isinstance(data, (Mapping, Iterable)):
                raise SchemaError(
                    f"write() takes a mapping of variable name to array, got {type(data).__name__}"
                )
            desc, arrays = describe_local(data)
            step_attrs = check_attrs(attrs)
        except Exception as exc:  # every rank must hear of it, or the others wait forever
            error = exc
        return self.agree(desc, error), arrays, step_attrs

    def outcome(self, error: BaseException | None, root: int = 0, value: Any = None) -> Any:
        """Root's success (with its ``value``, returned on every rank) or error, on every
        rank (root re-raises its own)."""
        self.arrive()
        msg, value = self.comm.bcast([encode_error(error) if error else None, value], root=root)
        if msg is None:
            return value
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
        rows = row_blocks(entry["shape"], parts)
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

    def relay(
        self,
        plan: dict[str, dict[str, Any]],
        arrays: dict[str, np.ndarray],
        write: Callable[[str, tuple[int, ...], np.ndarray], Any] | None,
        piece_bytes: int,
    ) -> tuple[dict[str, list], BaseException | None]:
        """Every rank's blocks of the array variables to rank 0, in pieces of whole rows of
        at most ``piece_bytes`` (one row if a row is larger), each handed to ``write(name,
        start, piece)`` as it arrives: no rank holds more than its own blocks and a piece.

        A rank waits for rank 0's word (sleeping, see :meth:`arrive`) before it sends a
        piece, so that the blocking transfer, which MPI moves only while both sides are in a
        call, runs at full speed and no rank spins while rank 0 writes.

        Rank 0 returns ``{name: [[start, count, write's record], ...]}`` and the first error
        of ``write`` (after one, it still takes every piece, so that no rank waits forever);
        the other ranks return ``({}, None)``."""
        MPI = _mpi()
        pieces = [p for p in _pieces(plan, piece_bytes) if self.rank in (0, p[1])]
        word = np.zeros(1, np.uint8)
        if self.rank != 0:
            for name, _, _, count, off in pieces:
                _wait(self.comm.Irecv([word, MPI.BYTE], source=0, tag=12))
                piece = np.ascontiguousarray(arrays[name][off : off + count[0]])
                self.comm.Send([_bytes(piece), MPI.BYTE], dest=0, tag=11)
            return {}, None
        regions: dict[str, list] = {n: [] for n, e in plan.items() if e["kind"] != "scalar"}
        error: BaseException | None = None
        for name, r, at, count, off in pieces:
            if r == 0:
                piece = np.ascontiguousarray(arrays[name][off : off + count[0]])
            else:
                piece = np.empty(count, np.dtype(plan[name]["dtype"]))
                self.comm.Send([word, MPI.BYTE], dest=r, tag=12)
                self.comm.Recv([_bytes(piece), MPI.BYTE], source=r, tag=11)
            if error is None:
                assert write is not None
                try:
                    regions[name].append([list(at), list(count), write(name, at, piece)])
                except Exception as exc:
                    error = exc
        return regions, error

    def to_owners(
        self,
        transfers: dict[str, list[Transfer]],
        plan: dict[str, dict[str, Any]],
        arrays: dict[str, np.ndarray],
        write: Callable[[str, tuple[int, ...], np.ndarray], Any],
    ) -> tuple[dict[str, list], BaseException | None]:
        """Every chunk of ``transfers`` (this rank's, from :func:`~.plan.chunk_transfers`)
        assembled by its owner from each block's part and handed whole to ``write(name,
        start, chunk)``: no rank holds more than its own blocks and a chunk, and no chunk is
        written by two ranks. A part travels when its owner asks for it (as in
        :meth:`relay`). Every rank walks the chunks in the same order, so the pairwise
        transfers cannot wait on each other in a cycle.

        Returns ``{name: [[start, count, write's record], ...]}`` of the chunks this rank
        wrote, and the first error of ``write`` (after one it still takes part in every
        transfer, so that no rank waits forever)."""
        MPI = _mpi()
        word = np.zeros(1, np.uint8)
        records: dict[str, list] = {name: [] for name in transfers}
        error: BaseException | None = None
        for name in sorted(transfers):
            dtype = np.dtype(plan[name]["dtype"])
            origin = plan[name]["parts"][self.rank][0]
            for start, count, owner, parts in transfers[name]:
                mine = owner == self.rank
                # One part that is the whole chunk is written as it is: no chunk buffer.
                whole = len(parts) == 1
                chunk = np.empty(count, dtype) if mine and not whole else None
                for r, at, size in parts:
                    if r == self.rank:
                        part = arrays[name][_box(at, size, origin)]
                        if mine:
                            if chunk is None:
                                chunk = part
                            else:
                                chunk[_box(at, size, start)] = part
                            continue
                        _wait(self.comm.Irecv([word, MPI.BYTE], source=owner, tag=14))
                        part = np.ascontiguousarray(part)
                        self.comm.Send([_bytes(part), MPI.BYTE], dest=owner, tag=15)
                    elif mine:
                        got = np.empty(size, dtype)
                        self.comm.Send([word, MPI.BYTE], dest=r, tag=14)
                        self.comm.Recv([_bytes(got), MPI.BYTE], source=r, tag=15)
                        if chunk is None:
                            chunk = got
                        else:
                            chunk[_box(at, size, start)] = got
                if chunk is not None and error is None:
                    try:
                        records[name].append([list(start), list(count), write(name, start, chunk)])
                    except Exception as exc:
                        error = exc
        return records, error


def _box(at: tuple[int, ...], size: tuple[int, ...], origin: Any) -> tuple[slice, ...]:
    """The slices of the box ``at``/``size`` (global) within an array that starts at
    ``origin``."""
    return tuple(slice(a - o, a - o + n) for a, n, o in zip(at, size, origin))


def _pieces(
    plan: dict[str, dict[str, Any]], piece_bytes: int
) -> list[tuple[str, int, tuple[int, ...], tuple[int, ...], int]]:
    """(variable, rank, start, count, first row within the rank's block) of every piece, in
    the order both sides use."""
    out = []
    for name in sorted(plan):
        entry = plan[name]
        if entry["kind"] == "scalar":
            continue
        itemsize = np.dtype(entry["dtype"]).itemsize
        for r, (start, count) in enumerate(entry["parts"]):
            if not all(count):
                continue
            per = max(1, piece_bytes // max(math.prod(count[1:]) * itemsize, 1))
            for off in range(0, count[0], per):
                rows = min(per, count[0] - off)
                out.append((name, r, (start[0] + off, *start[1:]), (rows, *count[1:]), off))
    return out


def _bytes(a: np.ndarray) -> np.ndarray:
    return a.reshape(-1).view(np.uint8)


def _wait(req: Any) -> None:
    """Wait for a point-to-point request, sleeping (MPI would spin: see :meth:`arrive`)."""
    delay = 20e-6
    while not req.Test():
        time.sleep(delay)
        delay = min(delay * 2, _MAX_SLEEP)


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
