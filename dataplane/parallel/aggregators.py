"""Aggregators: ranks split into groups, each with one rank that writes its group's blocks
into a subfile of its own (``publish(url, comm=comm, aggregators=K)``, ``h5://``).

Groups are runs of consecutive ranks (``K`` of them, as even as the ranks allow), or, by
default, the ranks of each node (``MPI_Comm_split_type(SHARED)``), which is what ADIOS2's BP5
does. A group's lowest rank is its aggregator; the others send it their blocks in pieces
(:meth:`dataplane.parallel.Collective.relay` over the group's communicator), so no rank's
memory grows by more than its own blocks and a piece.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from dataplane.errors import OptionError
from dataplane.parallel.collective import Collective, _mpi

__all__ = ["Groups", "aggregator_count"]


def aggregator_count(comm: Any, aggregators: Any) -> tuple[int, list[int]]:
    """(K, the group of every rank). Collective. ``aggregators``: a number from 1 to the
    number of ranks, or None for one per node."""
    size = comm.Get_size()
    if aggregators is None:
        node = comm.Split_type(_mpi().COMM_TYPE_SHARED, key=comm.Get_rank())
        try:
            leader = comm.allgather(comm.Get_rank() if node.Get_rank() == 0 else -1)
            mine = comm.allgather(node.allreduce(comm.Get_rank(), op=_mpi().MIN))
        finally:
            node.Free()
        leaders = [r for r in leader if r >= 0]
        return len(leaders), [leaders.index(first) for first in mine]
    if isinstance(aggregators, str) and aggregators.strip().isdigit():
        aggregators = int(aggregators)
    if isinstance(aggregators, bool) or not isinstance(aggregators, (int, np.integer)):
        raise OptionError(
            f"aggregators must be a whole number of writing ranks, got {aggregators!r}"
        )
    k = int(aggregators)
    if not 1 <= k <= size:
        raise OptionError(f"aggregators must be between 1 and the {size} ranks, got {k}")
    return k, [r * k // size for r in range(size)]


class Groups:
    """This rank's group: its members (world ranks, in order), its aggregator and the
    group's communicator. Collective to make."""

    def __init__(self, comm: Any, k: int, group_of: list[int]) -> None:
        rank = comm.Get_rank()
        self.k = k
        self.group_of = group_of
        self.group = group_of[rank]
        self.members = [r for r, g in enumerate(group_of) if g == self.group]
        self.aggregator = self.members[0]
        self.is_aggregator = rank == self.aggregator
        self.comm = comm.Split(self.group, rank)
        self.coll = Collective(self.comm)

    def restrict(self, plan: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        """The array variables of ``plan`` with only this group's blocks, in group order."""
        return {
            name: {**entry, "parts": [entry["parts"][r] for r in self.members]}
            for name, entry in plan.items()
            if entry["kind"] != "scalar"
        }

    def close(self) -> None:
        self.comm.Free()
