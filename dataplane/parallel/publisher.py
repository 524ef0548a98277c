"""``ParallelPublisher``: ``publish(url, comm=comm)`` over more than one MPI rank."""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np

from dataplane.errors import DataplaneError, OptionError, SchemaError, Terminated
from dataplane.model import VarSpec
from dataplane.parallel.aggregators import Groups, aggregator_count
from dataplane.parallel.collective import Collective, decode_error
from dataplane.parallel.plan import aligned_chunks, chunk_transfers, plan_step, row_chunk
from dataplane.publisher import ChannelAttrs, Publisher
from dataplane.transports.base import Transport

__all__ = ["ParallelPublisher"]

#: Largest piece of a block that travels to the writing rank at once (whole rows of it).
PIECE_BYTES = 32 << 20
#: About the size of a new array's chunks where chunks have owners (rows of the array).
OWNER_CHUNK_BYTES = 8 << 20


class ParallelPublisher:
    """``publish(url, comm=comm)`` with more than one rank: every rank writes its blocks of
    each step, rank 0 writes the global step (see :mod:`dataplane.parallel` for why).

    ``write``, ``flush`` and ``close`` are collective: call them on every rank, in the same
    order. Channel attributes set on rank 0 are published; single values are rank 0's.
    """

    def __init__(
        self,
        comm: Any,
        open_root: Callable[[], Publisher],
        transport: Transport,
        aggregators: Any = None,
    ) -> None:
        self.comm = comm
        self._transport = transport  # every rank's, for writing its own blocks
        self._coll = Collective(comm)
        self.rank = self._coll.rank
        self._inner: Publisher | None = None
        self._closed = False
        error: BaseException | None = None
        if self.rank == 0:
            try:
                self._inner = open_root()
            except Exception as exc:
                error = exc
        self._coll.outcome(error)
        info = comm.bcast(
            None if self._inner is None else [self._inner.url, self._inner.next_index], root=0
        )
        self.url, self._index = info
        self.attrs: ChannelAttrs = self._inner.attrs if self._inner is not None else ChannelAttrs()
        # Rank 0 writes what the ranks send it piece by piece, or the global step gathered.
        self._aggregates = bool(
            comm.bcast(self._inner is not None and self._inner.transport.aggregates, root=0)
        )
        self._groups: Groups | None = None
        self._subfile: Any = None  # this aggregator's (Transport.subfile)
        self._layout: dict[str, Any] | None = None  # the blocks of the first subfiled step
        self._rows: int | None = None  # steps committed, once a step was
        self._opened = False  # whether the aggregators opened their subfiles
        # Chunk owners (zarr:// with aggregators): the rank writing each rank's chunks.
        self._owner_of: list[int] | None = None
        self._k = 1
        self._transfers: dict[str, Any] = {}  # chunk_transfers by array layout
        self._setup_aggregators(aggregators)

    def _setup_aggregators(self, aggregators: Any) -> None:
        """Split the ranks into aggregator groups where the channel writes subfiles (all
        ranks raise alike for a bad ``aggregators``)."""
        error: BaseException | None = None
        k, group_of = 1, [0] * self._coll.size
        try:
            k, group_of = aggregator_count(self.comm, aggregators)
            transport = self._transport
            if k > 1 and not (transport.subfiles or transport.supports_rank_writes):
                if aggregators is not None:
                    raise OptionError(
                        f"{transport.scheme}:// takes aggregators=1 only (its ranks' blocks go "
                        f"to rank 0, which writes the channel); h5:// and bp5:// write "
                        f"subfiles with aggregators={k}, zarr:// on a shared store writes "
                        f"chunks through them"
                    )
                k, group_of = 1, [0] * self._coll.size
        except Exception as exc:
            error = exc
        self._coll.agree(None, error)
        existing: dict[str, Any] | None = None
        error = None
        if self._inner is not None:
            try:
                existing = self._continued(k)
            except Exception as exc:
                error = exc
        self._coll.outcome(error)
        if not self._transport.subfiles:
            if self._transport.supports_rank_writes:
                # Chunk owners: each group's lowest rank writes the chunks its group starts
                # (one group: rank 0 all of them, a chunk at a time).
                first = {g: group_of.index(g) for g in set(group_of)}
                self._owner_of = [first[g] for g in group_of]
                self._k = k
            return
        if k == 1:
            return
        existing = self.comm.bcast(existing, root=0)
        self._groups = Groups(self.comm, k, group_of)
        self._token = (
            existing["token"]
            if existing
            else self.comm.bcast(secrets.token_hex(4) if self.rank == 0 else None, root=0)
        )
        self._append = existing is not None
        if existing:
            self._layout = existing["layout"]

    def _continued(self, k: int) -> dict[str, Any] | None:
        """Rank 0: what an appended channel's subfiles are (None for a new one); raises if
        it was written with another number of aggregators."""
        assert self._inner is not None
        before = self._inner.written_by() if self._inner.next_index else None
        if self._inner.next_index == 0 or not self._transport.subfiles:
            return None  # (chunk owners may differ from one writer to the next)
        had = int((before or {}).get("aggregators", 1))
        if had != k:
            raise OptionError(
                f"{self.url} was written with aggregators={had}: append with the same number "
                f"(its arrays are {'joined from subfiles' if had > 1 else 'in one file'})"
            )
        if k == 1:
            return None
        assert before is not None
        return {"token": before["token"], "layout": before["layout"]}

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def next_index(self) -> int:
        return self._index

    def write(
        self, data: Mapping[str, Any] | Iterable[tuple[str, Any]], attrs: Mapping | None = None
    ) -> int:
        """Collective: publish this rank's blocks of one global step; returns its index."""
        if self._closed:
            raise DataplaneError(f"publisher of {self.url} is closed")
        descs, arrays, _ = self._coll.agree_step(data, attrs)
        plan = plan_step(descs)  # the same on every rank: all raise, or none
        if self._groups is not None:
            return self._write_subfiled(plan, arrays, attrs)
        chunks = self._rank_chunks(plan)
        if chunks is not None or self._aggregates:
            return self._write_ranked(plan, chunks or {}, arrays, attrs)
        out = self._to_root(plan, arrays, skip={})
        error = None
        if self._inner is not None:
            try:
                ordered = {name: out[name] for name in descs[0]}  # the writer's order
                self._inner.write(ordered, attrs)
            except Exception as exc:
                error = exc
        self._coll.outcome(error)
        index = self._index
        self._index += 1
        return index

    def _to_root(
        self, plan: dict[str, dict[str, Any]], arrays: dict[str, np.ndarray], skip: Mapping
    ) -> dict[str, np.ndarray]:
        """On rank 0, the global arrays of the variables not in ``skip`` (single values are
        rank 0's own); empty elsewhere. Collective: every rank gathers in the same order."""
        out: dict[str, np.ndarray] = {}
        for name in sorted(plan):
            entry = plan[name]
            if entry["kind"] == "scalar":
                if self.rank == 0:
                    out[name] = arrays[name]
            elif name not in skip:
                got = self._coll.gather_array(name, entry, arrays[name])
                if got is not None:
                    out[name] = got
        return out

    def _rank_chunks(self, plan: dict[str, dict[str, Any]]) -> dict[str, tuple[int, ...]] | None:
        """Rank 0 decides, for all: the chunks of the arrays whose blocks every rank can write
        into the store itself (blocks aligned with chunks); None if there are none."""
        chunks: dict[str, tuple[int, ...]] | None = None
        inner = self._inner
        if inner is not None and inner.transport.supports_rank_writes:
            chunks = {}
            for name, entry in plan.items():
                if entry["kind"] == "scalar":
                    continue
                chunk = aligned_chunks(entry["shape"], entry["parts"], inner.chunks_of(name))
                if chunk is not None:
                    chunks[name] = chunk
        return self.comm.bcast(chunks or None, root=0)

    def _write_ranked(
        self,
        plan: dict[str, dict[str, Any]],
        chunks: dict[str, tuple[int, ...]],
        arrays: dict[str, np.ndarray],
        attrs: Mapping | None,
    ) -> int:
        """Rank 0 begins the step, every rank writes its blocks aligned with ``chunks``, the
        others reach rank 0 in pieces of at most :data:`PIECE_BYTES` that it writes as they
        arrive (where the channel takes pieces: no rank's memory grows by more than its own
        blocks and a piece), and rank 0 commits: a step is visible only once every rank's
        blocks are in (a rank that dies leaves it invisible)."""
        specs = {n: VarSpec(np.dtype(e["dtype"]), tuple(e["shape"])) for n, e in plan.items()}
        # Arrays whose blocks are not aligned with chunks, and single values: rank 0 writes
        # them; the arrays in pieces the ranks send it, where the channel takes pieces.
        unaligned = {n: e for n, e in plan.items() if e["kind"] != "scalar" and n not in chunks}
        if self._aggregates:
            by_root = {n: arrays[n] for n, e in plan.items() if e["kind"] == "scalar"}
        else:
            by_root = self._to_root(plan, arrays, skip=chunks)
        owners = self._owner_of if unaligned else None
        row = None
        error: BaseException | None = None
        if self._inner is not None:
            written_by = {
                "ranks": self._coll.size,
                # Ranks write their own chunks, or send them in pieces to rank 0 or to the
                # chunks' owners, or both.
                "method": "own-chunks" if chunks and not unaligned else "aggregators",
                "aggregators": self._k if owners is not None else 1,
                "files": [os.path.basename(self._transport.url.path)],
            }
            # Arrays with chunk owners, where new: chunks of rows (the owners' memory).
            hints = (
                {
                    **{
                        n: row_chunk(e["shape"], specs[n].dtype.itemsize, OWNER_CHUNK_BYTES)
                        for n, e in unaligned.items()
                    },
                    **chunks,
                }
                if owners
                else chunks
            )
            try:
                row = self._inner.begin_ranked(
                    specs, attrs, hints, by_root, {"written_by": written_by}
                )
            except Exception as exc:
                error = exc
        self._coll.outcome(error)
        inner = self._inner
        row, layout = self.comm.bcast(
            None
            if inner is None
            else [row, {n: inner.chunks_of(n) for n in unaligned} if owners else {}],
            root=0,
        )
        sums: dict[str, list] = {}
        error = None
        transport = self._transport
        try:
            for name in sorted(chunks):
                start, count = plan[name]["parts"][self.rank]
                if all(count):
                    put = transport.put_block(row, name, tuple(start), arrays[name])
                    sums[name] = [[start, count, put]]
        except Exception as exc:
            error = exc
        missing = [n for n in unaligned if owners is not None and not layout.get(n)]
        if missing:  # (the same on every rank: none takes part in a transfer)
            error = error or DataplaneError(
                f"{self.url}: the store gave no chunk shape for {', '.join(missing)}; the step "
                f"is not written"
            )
        elif owners is not None:
            written, owner_error = self._coll.to_owners(
                self._owned(unaligned, layout, owners),
                plan,
                arrays,
                lambda name, start, chunk: transport.put_block(row, name, start, chunk),
            )
            for name, records in written.items():
                sums.setdefault(name, []).extend(records)
            error = error or owner_error
        reports = self._coll.gather_reports(sums, error)
        relayed: dict[str, list] = {}
        error = None
        if self._aggregates and unaligned and owners is None:
            inner = self._inner
            relayed, error = self._coll.relay(
                unaligned, arrays, None if inner is None else inner.put_region, PIECE_BYTES
            )
        if self._inner is not None:
            assert reports is not None
            failed = next(((r, e) for r, (_, e) in enumerate(reports) if e), None)
            blocks: dict[str, list] = {name: [] for name in chunks}
            for rank_sums, _ in reports:
                for name, entries in rank_sums.items():
                    blocks.setdefault(name, []).extend(entries)
            blocks.update(relayed)
            try:
                ok = failed is None and error is None
                self._inner.end_ranked(specs, blocks if ok else None)
                if failed is not None:
                    error = decode_error(failed[1], f"rank {failed[0]}: ")
            except Exception as exc:
                error = error or exc
        self._coll.outcome(error)
        index = self._index
        self._index += 1
        return index

    def _owned(
        self,
        plan: dict[str, dict[str, Any]],
        chunks: dict[str, tuple[int, ...] | None],
        owners: list[int],
    ) -> dict[str, list]:
        """This rank's part in writing each array of ``plan`` by chunk owners (the same layout
        every step: planned once)."""
        out = {}
        for name, entry in plan.items():
            key = json.dumps([name, entry["shape"], entry["parts"], chunks[name]])
            if key not in self._transfers:
                if len(self._transfers) > 64:
                    self._transfers.clear()
                chunk = chunks[name]
                assert chunk, name
                self._transfers[key] = chunk_transfers(
                    entry["shape"], entry["parts"], tuple(chunk), owners, self.rank
                )
            out[name] = self._transfers[key]
        return out

    def _write_subfiled(
        self,
        plan: dict[str, dict[str, Any]],
        arrays: dict[str, np.ndarray],
        attrs: Mapping | None,
    ) -> int:
        """A step with aggregators: each group's blocks travel in pieces to its aggregator,
        which writes them into its subfile; rank 0 commits once every aggregator reported
        its pieces' checksums (an aggregator that fails or dies leaves the step invisible)."""
        groups = self._groups
        assert groups is not None
        specs = {n: VarSpec(np.dtype(e["dtype"]), tuple(e["shape"])) for n, e in plan.items()}
        blocks = {n: e["parts"] for n, e in plan.items() if e["kind"] != "scalar"}
        layout = json.loads(json.dumps(blocks))  # lists all through, as read back from a file
        if self._layout is None:
            self._layout = layout
        elif layout != self._layout:
            # Every rank has the same plan: all raise here, nothing was written.
            raise SchemaError(
                f"{self.url}: with aggregators={groups.k}, every step has the blocks of the "
                f"first (the channel joins fixed regions of its subfiles), but the "
                f"variables or blocks changed: first {_blocks(self._layout)}, now "
                f"{_blocks(layout)}. Keep each rank's blocks, or use aggregators=1."
            )
        transport = self._transport
        names = {g: transport.subfile_name(self._token, g) for g in range(groups.k)}
        error: BaseException | None = None
        if not self._opened:  # the first step here: the subfiles open
            if groups.is_aggregator:
                try:
                    self._subfile = transport.subfile(
                        names[groups.group], {n: specs[n] for n in blocks}, self._append
                    )
                except Exception as exc:
                    error = exc
            self._coll.agree(None, error)  # every subfile is ready before readers see any
            self._opened = True
        row = None
        error = None
        if self._inner is not None:
            sources = {
                name: [
                    (names[groups.group_of[r]], start, count)
                    for r, (start, count) in enumerate(parts)
                    if all(count)
                ]
                for name, parts in layout.items()
            }
            written_by = {
                "ranks": self._coll.size,
                "method": "aggregators",
                "aggregators": groups.k,
                "files": [transport.subfile_name("", -1)] + [names[g] for g in range(groups.k)],
                "token": self._token,
                "layout": layout,
            }
            scalars = {n: arrays[n] for n, e in plan.items() if e["kind"] == "scalar"}
            try:
                row = self._inner.begin_ranked(
                    specs, attrs, {}, scalars, {"sources": sources, "written_by": written_by}
                )
            except Exception as exc:
                error = exc
        row = self._coll.outcome(error, value=row)
        error = None
        sub = self._subfile
        if sub is not None:
            try:
                sub.begin(row)
            except Exception as exc:
                error = exc

        def write(name: str, start: tuple[int, ...], piece: np.ndarray) -> Any:
            if error is not None:
                raise error
            assert sub is not None
            return transport.put_subfile_region(sub, name, start, piece)

        regions, relay_error = groups.coll.relay(
            groups.restrict(plan), arrays, write if sub is not None else None, PIECE_BYTES
        )
        error = error or relay_error
        if sub is not None and error is None:
            try:
                sub.flush()  # before rank 0 hears of it: a committed step is in the subfile
            except Exception as exc:
                error = exc
        reports = self._coll.gather_reports(regions, error)
        error = None
        if self._inner is not None:
            assert reports is not None
            failed = next(((r, e) for r, (_, e) in enumerate(reports) if e), None)
            merged: dict[str, list] = {name: [] for name in blocks}
            for rank_regions, _ in reports:
                for name, got in rank_regions.items():
                    merged[name].extend(got)
            try:
                self._inner.end_ranked(specs, merged if failed is None else None)
                if failed is not None:
                    error = decode_error(failed[1], f"rank {failed[0]}: ")
            except Exception as exc:
                error = error or exc
        self._coll.outcome(error)
        self._rows = row + 1
        index = self._index
        self._index += 1
        return index

    def flush(self) -> None:
        """Collective: wait until rank 0 handed every step to the transport."""
        error: BaseException | None = None
        if self._inner is not None:
            try:
                self._inner.flush()
            except Exception as exc:
                error = exc
        self._coll.outcome(error)

    def close(self, failed: bool = False) -> None:
        """Collective. The channel ends as failed if any rank says so."""
        if self._closed:
            return
        self._closed = True
        failed = self._coll.any(failed)
        error: BaseException | None = None
        if self._subfile is not None:
            try:
                self._subfile.close(self._rows)
            except Exception as exc:
                error = exc
            self._subfile = None
        self._coll.agree(None, error)  # the subfiles are whole before the channel says so
        if self._inner is not None:
            try:
                self._inner.close(failed=failed)
            except Exception as exc:
                error = exc
        self._coll.outcome(error)
        if self._groups is not None:
            self._groups.close()

    def __enter__(self) -> ParallelPublisher:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        # SIGTERM is the scheduler ending the job, not the writer failing: a clean end.
        failed = exc_type is not None and not issubclass(exc_type, Terminated)
        self.close(failed=failed)

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"next step {self._index}"
        return f"<ParallelPublisher {self.url} rank {self.rank} {state}>"


def _blocks(layout: dict[str, Any]) -> str:
    return "; ".join(
        f"{name}: " + ", ".join(f"rank {r} {s}+{c}" for r, (s, c) in enumerate(parts))
        for name, parts in sorted(layout.items())
    )
