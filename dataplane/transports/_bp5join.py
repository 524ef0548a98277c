"""Subfiles of a ``bp5://`` channel that MPI aggregators write, and how readers join them.

With ``aggregators=K > 1`` each of K groups of ranks has one process, its aggregator, that
writes the group's blocks into a BP5 file of its own (``<channel>.agg/<token>-<group>.bp``):
per step one ADIOS2 step holding each array with the global shape, only the group's blocks
put (a plain adios2 reader of one subfile sees its part there), and the step's record
(``__dp_step``: the channel's step index, the pieces' checksums) last. Rank 0 keeps the
channel's own file: single values, attributes, and a step record whose ``"j"`` names, per
array, the subfile and box of every rank's block. Rank 0 commits a step once every
aggregator ended its subfile step, so a reader that sees the step finds it in every subfile.

A subfile step whose channel step never committed (an aggregator or rank died, a piece
failed) is never read: readers take, per step index, the subfile's last step of that index,
and only for steps the channel committed.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import numpy as np

from dataplane.errors import IntegrityError
from dataplane.model import Selection, VarSpec
from dataplane.transports._checksums import block_sums

__all__ = ["Joined", "Subfile", "subfile_name"]


def subfile_name(main: str, token: str, group: int) -> str:
    """Group ``group``'s subfile, relative to the folder of the channel's file ``main``."""
    return f"{os.path.basename(main)}.agg/{token}-{group:05d}.bp"


class Subfile:
    """An aggregator's subfile, written through a BP5 format writer of its own (``writer``:
    ``_BP5Writer``'s ranked-step methods), one ADIOS2 step per channel step."""

    def __init__(self, writer: Any, specs: dict[str, VarSpec]) -> None:
        self._w = writer
        self._specs = specs
        self._row: int | None = None  # the step begun and not yet ended
        self._sums: dict[str, list] = {}
        self._held = 0

    def begin(self, row: int) -> None:
        """Open the subfile's step for channel step ``row`` (cutting off one begun before
        and never ended: its channel step failed)."""
        if self._row is not None:
            self._row = None
            self._w.abort()
        self._w.begin_ranked(row, self._specs, {}, {})
        self._row = row
        self._sums = {name: [] for name in self._specs}
        self._held = 0

    def put(self, name: str, start: tuple[int, ...], block: np.ndarray) -> Any:
        """A piece of the group's blocks, written out now; returns its checksum record."""
        block = block if block.flags.c_contiguous else np.array(block, order="C")
        self._w.put_region(name, start, block)
        sums = block_sums(block)
        self._sums[name].append([list(start), list(block.shape), sums])
        self._held += block.nbytes
        return sums

    def flush(self) -> None:
        """End the step: its record last, so an aggregator that dies before leaves none. The
        record says how many bytes the step holds (readers check a file cut short against it:
        the arrays' global shapes would overstate it)."""
        sums, self._row = self._sums, None
        self._w.commit(lambda: sums, {"held": self._held})

    def close(self, rows: int | None) -> None:
        try:
            if self._row is not None:
                self._row = None
                self._w.abort()
        finally:
            self._w.close()


class Joined:
    """Reads arrays that aggregators wrote into subfiles: each block's part of the asked
    selection from its subfile's step of the same index. ``open_source(path)`` opens a
    subfile for random access (``_BP5Source``); a subfile is opened again when a step is
    not in it yet (a live channel)."""

    def __init__(self, folder: str, url: str, open_source: Callable[[str], Any]) -> None:
        self._folder = folder
        self._url = url
        self._open = open_source
        self._subs: dict[str, tuple[Any, dict[int, int]]] = {}

    def read(
        self,
        index: int,
        name: str,
        spec: VarSpec,
        selection: Selection,
        boxes: list[list[Any]],
    ) -> np.ndarray:
        start, count = tuple(selection.start), tuple(selection.count)
        out: np.ndarray | None = None
        for file, at, size in boxes:
            first = [max(a, b) for a, b in zip(start, at)]
            end = [min(a + c, b + d) for a, c, b, d in zip(start, count, at, size)]
            if any(e <= f for f, e in zip(first, end)):
                continue
            source, position = self._step(file, index, name)
            box = Selection(tuple(first), tuple(e - f for f, e in zip(first, end)))
            part = source.get(position, name, box)
            if out is None and box == Selection(start, count):
                return part  # within one block: no second copy
            if out is None:
                out = np.empty(count, spec.dtype)
            out[tuple(slice(f - s, e - s) for f, e, s in zip(first, end, start))] = part
        if out is None:  # (the blocks tile the array: only an empty selection gets here)
            out = np.empty(count, spec.dtype)
        return out

    def _step(self, file: str, index: int, name: str) -> tuple[Any, int]:
        held = self._subs.get(file)
        if held is None or index not in held[1]:
            if held is not None:
                held[0].close()
                del self._subs[file]
            source = self._open(os.path.join(self._folder, file))
            try:
                source.refresh()
                # The last step of each index: an earlier one's channel step never committed.
                where = {i: p for p, i in enumerate(source.step_indices())}
            except BaseException:
                source.close()
                raise
            held = self._subs[file] = (source, where)
        position = held[1].get(index)
        if position is None:
            raise IntegrityError(
                f"{self._url}: step {index} names subfile {file} for variable {name!r}, which "
                f"does not hold that step: the subfile was replaced or cut short. Re-create "
                f"the channel."
            )
        return held[0], position

    def close(self) -> None:
        subs, self._subs = self._subs, {}
        for source, _ in subs.values():
            source.close()
