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
- **Ranks send their blocks to rank 0 in pieces** (``h5://``, ``bp5://``, and the unaligned
  arrays of ``zarr://`` where not every rank can write the store): rank 0 begins the step
  (``bp5://``: opens the ADIOS2 step, writing each piece out at once, a deferred ``Put`` and
  ``PerformDataWrite``; an aborted step is cut from the metadata as a failed one is),
  takes each rank's block in pieces of whole rows of at most ``PIECE_BYTES`` (32 MiB) and
  writes each into its place as it arrives, with a checksum per piece, then commits. No rank's
  memory grows by more than its own blocks and a piece (the file's arrays are chunked in about
  8 MiB of rows, so HDF5 never patches a whole step's chunk in memory; chunks a piece covers
  are written raw). A rank sends a piece when rank 0 asks for it: the blocking transfer then
  runs at full speed and no rank spins while rank 0 writes.
- **Aggregators write subfiles** (``h5://`` and ``bp5://`` with ``aggregators=K``, default
  one per node): the same, within each of K groups of ranks, whose lowest rank writes its
  group's pieces into a subfile of its own; rank 0's file joins the subfiles (HDF5 virtual
  datasets; for BP5 each step's record says where every block is) and commits a step once
  every aggregator reported it (:mod:`dataplane.parallel.aggregators`,
  :mod:`dataplane.transports._h5subfiles`, :mod:`dataplane.transports._bp5join`).
- **Chunk owners** (unaligned arrays of ``zarr://`` on a store every rank writes): every
  chunk has one owner, the aggregator of its group (``aggregators=K``; rank 0 with one),
  that gets each block's part of it and writes it whole; new such arrays get chunks of rows
  of about 8 MiB, what an owner holds (:meth:`Collective.to_owners`,
  :func:`~dataplane.parallel.plan.chunk_transfers`).
- **Otherwise the blocks travel to rank 0** (``Gatherv`` of raw bytes; blocks of whole rows
  land directly in the global array) and rank 0 writes the global array: every variable of
  ``sst://``, ``shm://`` and ``mem://``. Rank 0 needs memory for those global arrays.

Either way the channel looks exactly as if one process had written the global arrays: plain
h5py, zarr and adios2 read them as such, and readers read any hyperslab of them, only the
chunks or blocks they need. A step becomes visible only after every rank's part is in: a rank
that raises makes every rank raise and the step is dropped; a rank that dies takes the MPI
job with it before rank 0 commits. Single values (0-d arrays, Python numbers) and channel
attributes are rank 0's.

- **Ranks write through MPI-IO** (``h5://`` with an MPI-enabled h5py, no ``aggregators``
  asked for): every rank writes its own blocks into the one file itself
  (:mod:`dataplane.parallel.mpio`). An MPI-enabled adios2 is not used natively yet: it works
  through the gathering above.

The metadata travels with mpi4py's pickle-based lowercase methods as our own small JSON
strings between ranks of one job, never as data read from a channel.
"""

from __future__ import annotations

from dataplane.parallel.collective import Collective, decode_error, encode_error
from dataplane.parallel.plan import aligned_chunks, describe_local, grid_dims, plan_step, split

__all__ = [
    "Collective",
    "aligned_chunks",
    "decode_error",
    "describe_local",
    "encode_error",
    "grid_dims",
    "plan_step",
    "split",
]
