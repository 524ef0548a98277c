"""``publish("h5://...", comm=comm)`` with an MPI-enabled h5py: native MPI-IO.

Where h5py is built against parallel HDF5 (``h5py.get_config().mpi``) and no
``aggregators`` are asked for, every rank writes its own blocks straight into the channel's
file (``driver="mpio"``): nothing travels between ranks but the step's description and the
blocks' checksum records. Each step: the ranks agree on the blocks
(:func:`~dataplane.parallel.plan.plan_step`, a bad block raises on every rank before anything
is written), grow the datasets together, each writes its blocks, the checksum records are
gathered on every rank, and rank 0's record of the step and the commit count are written
last, then flushed by all. A rank that fails makes every rank drop the step and raise.

Readers: HDF5 1.10 cannot combine SWMR with MPI-IO. A subscriber of a channel being written
this way waits (the writer's lease says it writes through MPI-IO) and takes every step,
verified, once the writer closed it; readers of the finished file see
one global dataset per variable, as from any dataplane writer (``inspect`` says
``"method": "mpio"``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from dataplane.errors import DataplaneError, Terminated
from dataplane.model import VarSpec
from dataplane.parallel.collective import Collective, encode_error
from dataplane.parallel.plan import plan_step
from dataplane.publisher import ChannelAttrs
from dataplane.transports.base import Transport

__all__ = ["MPIIOPublisher"]


class MPIIOPublisher:
    """A parallel publisher whose ranks write their blocks through parallel HDF5 (module
    docstring). ``write``, ``flush`` and ``close`` are collective."""

    def __init__(self, comm: Any, transport: Transport, mode: str) -> None:
        self.comm = comm
        self._coll = Collective(comm)
        self.rank = self._coll.rank
        self.url = transport.url.url
        self.attrs = ChannelAttrs()  # rank 0's are published
        self._closed = False
        self._w = transport.mpio_writer(comm, mode)
        self._index = int(self._w.next_index)

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def next_index(self) -> int:
        return self._index

    def write(
        self, data: Mapping[str, Any] | Iterable[tuple[str, Any]], attrs: Mapping | None = None
    ) -> int:
        """Collective: write this rank's blocks of one global step; returns its index."""
        if self._closed:
            raise DataplaneError(f"publisher of {self.url} is closed")
        descs, arrays, step_attrs = self._coll.agree_step(data, attrs)
        plan = plan_step(descs)  # the same on every rank: all raise, or none
        specs = {n: VarSpec(np.dtype(e["dtype"]), tuple(e["shape"])) for n, e in plan.items()}
        w = self._w
        n = self._index
        self._attrs_to_all()
        w.begin(n, specs)  # the same on every rank: a SchemaError is raised by all
        sums: dict[str, Any] = {}
        error = None
        try:
            for name in sorted(plan):
                entry = plan[name]
                if entry["kind"] == "scalar":
                    if self.rank == 0:
                        sums[name] = w.put(n, name, (), np.asarray(arrays[name]))
                    continue
                start, count = entry["parts"][self.rank]
                if all(count):
                    sums[name] = [start, count, w.put(n, name, tuple(start), arrays[name])]
        except Exception as exc:
            error = exc
        reports = self.comm.allgather([sums, encode_error(error) if error else None])
        if any(e for _, e in reports):
            w.abort(n)
            self._coll.agree(None, error)  # raises on every rank
        checks: dict[str, Any] = {n: [] for n, e in plan.items() if e["kind"] != "scalar"}
        for rank_sums, _ in reports:
            for name, got in rank_sums.items():
                if plan[name]["kind"] == "scalar":
                    checks[name] = got
                else:
                    checks[name].append(got)
        w.commit(n, {"i": n, "a": step_attrs, "c": checks})
        self._index += 1
        return n

    def _attrs_to_all(self) -> None:
        """Rank 0's channel attributes, if they changed, set by every rank alike."""
        mine = None
        if self.rank == 0 and self.attrs.dirty:
            self.attrs.dirty = False
            mine = self.attrs.snapshot()
        attrs = self.comm.bcast(mine, root=0)
        if attrs is not None:
            self._w.set_attrs(attrs)

    def flush(self) -> None:
        """Collective. Each step is on disk when ``write`` returns: nothing to wait for."""
        self._coll.arrive()

    def close(self, failed: bool = False) -> None:
        """Collective. The channel ends as failed if any rank says so."""
        if self._closed:
            return
        self._closed = True
        failed = self._coll.any(failed)
        try:
            self._attrs_to_all()
        finally:
            self._w.close(failed)

    def __enter__(self) -> MPIIOPublisher:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        # SIGTERM is the scheduler ending the job, not the writer failing: a clean end.
        failed = exc_type is not None and not issubclass(exc_type, Terminated)
        self.close(failed=failed)

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"next step {self._index}"
        return f"<MPIIOPublisher {self.url} rank {self.rank} {state}>"
