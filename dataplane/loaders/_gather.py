"""Gathering a batch's samples into its buffers, from the source or from cached shards."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from dataplane.cache import NodeCache
from dataplane.loaders._direct import DirectReads, step_rows
from dataplane.loaders._snapshot import Snapshot

#: Rows between two wanted rows are read along (one call instead of two) while the gap is
#: smaller than this: a second call costs more than reading this many bytes on any filesystem.
GAP_BYTES = 256 << 10

Dtypes = dict[str, "np.dtype | None"]


def rows_from_source(
    arc: Any,
    snap: Snapshot,
    idx: np.ndarray,
    outs: list[np.ndarray],
    direct: DirectReads | None = None,
) -> tuple[int, int]:
    """Rows ``idx`` into ``outs`` (one per variable), with one hyperslab read per variable
    per run of nearby rows of a step (through ``direct`` where it can). Returns the reads
    and bytes read."""
    if len(idx) == 1:  # one sample (a per-sample __getitem__): no runs to find
        row = int(idx[0])
        i = int(np.searchsorted(snap.offsets, row, side="right")) - 1
        first = row - int(snap.offsets[i])
        got = step_rows(arc, direct, i, snap.names, snap.rows, first, first + 1)
        for out, block in zip(outs, got):
            out[0] = block[0]
        return len(got), sum(block.nbytes for block in got)
    row_bytes = sum(
        int(np.prod(shape, dtype=np.int64)) * dtype.itemsize for dtype, shape in snap.rows.values()
    )
    gap = max(1, GAP_BYTES // max(row_bytes, 1))
    steps = np.searchsorted(snap.offsets, idx, side="right") - 1
    local = idx - snap.offsets[steps]
    order = np.lexsort((local, steps))
    steps, local = steps[order], local[order]
    # Runs: same step, and the next wanted row is within `gap` rows of the last one.
    cut = np.flatnonzero((np.diff(steps) != 0) | (np.diff(local) > gap)) + 1
    reads = nbytes = 0
    for run in np.split(np.arange(len(idx)), cut):
        if not len(run):
            continue
        first, last = int(local[run[0]]), int(local[run[-1]])
        i = int(steps[run[0]])
        where = order[run]
        pick = local[run] - first
        got = step_rows(arc, direct, i, snap.names, snap.rows, first, last + 1)
        for out, block in zip(outs, got):
            reads += 1
            nbytes += block.nbytes
            out[where] = block[pick]
    return reads, nbytes


def steps_from_source(
    arc: Any,
    names: tuple[str, ...],
    dtypes: Dtypes,
    idx: np.ndarray,
    direct: DirectReads | None = None,
) -> tuple[list[list[np.ndarray]], int]:
    """Whole steps ``idx`` (through ``direct`` where it can): one list of arrays per
    variable, and the bytes read."""
    columns: list[list[np.ndarray]] = [[] for _ in names]
    nbytes = 0
    for i in idx.tolist():
        for k, arr in enumerate(step_rows(arc, direct, i, names, {})):
            name = names[k]
            nbytes += arr.nbytes
            columns[k].append(_cast(arr, dtypes[name]))
    return columns, nbytes


def from_cache(
    cache: NodeCache,
    snap: Snapshot,
    dtypes: Dtypes,
    table: tuple[np.ndarray, np.ndarray, list[str]],
    idx: np.ndarray,
    outs: list[np.ndarray] | None,
    produce: Callable[[int], Callable[[], dict[str, np.ndarray]]],
    homes: np.ndarray | None = None,
) -> list[list[np.ndarray]] | None:
    """Samples ``idx`` from the cached shards (fetching missing ones with ``produce(s)``, or
    from the shard's home node, ``homes[s]``, where caches cooperate): rows into ``outs``, or
    (``outs=None``, whole steps) one list of arrays per variable."""
    bounds, _, keys = table
    shard = np.searchsorted(bounds, idx, side="right") - 1
    local = (idx - bounds[shard]).tolist()
    shards = shard.tolist()
    used = list(dict.fromkeys(shards))  # the batch's shards, in order of first use
    held = cache.get_many([keys[s] for s in used])
    if None in held:
        batch = {keys[s] for s in used}  # not evicted while this batch is gathered
        # Fetch first what no other process is fetching; then wait for the rest.
        home = (lambda s: None) if homes is None else (lambda s: int(homes[s]))  # noqa: E731
        for s, arrays in zip(used, held):
            if arrays is None:
                cache.fetch_if_free(keys[s], produce(s), keep=batch, home=home(s))
        held = [
            arrays
            if arrays is not None
            else cache.fetch(keys[s], produce(s), keep=batch, home=home(s))
            for s, arrays in zip(used, held)
        ]
    of = dict(zip(used, held))
    if outs is None:
        return [
            [_cast(of[s][f"{i}/{name}"], dtypes[name]) for s, i in zip(shards, idx.tolist())]
            for name in snap.names
        ]
    if len(idx):
        for out, name in zip(outs, snap.names):
            # A view of each row, shaped (1, ...) (an index into a (rows, 1, ...) view: half
            # the cost of a slice), all copied in one call.
            rows = {s: arrays[name][:, None] for s, arrays in of.items()}
            col = [rows[s][i] for s, i in zip(shards, local)]
            np.concatenate(col, axis=0, out=out, casting="unsafe")
    return None


def _cast(arr: np.ndarray, dtype: np.dtype | None) -> np.ndarray:
    return arr.astype(dtype) if dtype is not None and arr.dtype != dtype else arr
