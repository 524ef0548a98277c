"""What a dataset knows of its stored steps, and the shards it cuts them into (no torch)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from dataplane.cache import NodeCache
from dataplane.errors import OptionError, SchemaError, VariableNotFoundError
from dataplane.loaders._direct import places
from dataplane.model import VarSpec

RowSpec = dict[str, tuple[np.dtype, tuple[int, ...]]]


def shard_layout(
    counts: list[int], step_bytes: list[int], shard_bytes: int, sample: str
) -> tuple[np.ndarray, np.ndarray]:
    """Shard boundaries (in samples) and bytes for steps of ``counts`` samples and
    ``step_bytes`` bytes: a pure function of the step sizes.

    ``sample="row"``: small steps are packed whole into a shard up to ``shard_bytes``; a step
    of at least ``shard_bytes`` is cut into runs of rows of about ``shard_bytes``.
    ``sample="step"``: consecutive steps up to ``shard_bytes`` (at least one per shard).
    Steps only ever get appended: the layout of a longer list differs from that of its prefix
    at most in the prefix's last shard (a pack of small steps can grow).
    """
    offsets = np.concatenate(([0], np.cumsum(counts, dtype=np.int64)))
    starts: list[np.ndarray] = []
    sizes: list[np.ndarray] = []
    if sample == "row":
        pack_start, pack_bytes = -1, 0
        for off, count, nbytes in zip(offsets[:-1].tolist(), counts, step_bytes):
            if not count:
                continue
            big = nbytes >= shard_bytes
            if pack_start >= 0 and (big or pack_bytes + nbytes > shard_bytes):
                starts.append(np.array([pack_start]))
                sizes.append(np.array([pack_bytes]))
                pack_start, pack_bytes = -1, 0
            if not big:
                if pack_start < 0:
                    pack_start = off
                pack_bytes += nbytes
                continue
            row = nbytes // count
            per = max(1, shard_bytes // max(row, 1))
            s = np.arange(0, count, per, dtype=np.int64)
            starts.append(off + s)
            sizes.append((np.minimum(s + per, count) - s) * row)
        if pack_start >= 0:
            starts.append(np.array([pack_start]))
            sizes.append(np.array([pack_bytes]))
    else:
        begin, acc = 0, 0
        for i, nbytes in enumerate(step_bytes):
            if i > begin and acc + nbytes > shard_bytes:
                starts.append(np.array([begin]))
                sizes.append(np.array([acc]))
                begin, acc = i, 0
            acc += nbytes
        if step_bytes:
            starts.append(np.array([begin]))
            sizes.append(np.array([acc]))
    bounds = np.concatenate([*starts, [int(offsets[-1])]]).astype(np.int64)
    nbytes_arr = np.concatenate(sizes).astype(np.int64) if sizes else np.zeros(0, np.int64)
    return bounds, nbytes_arr


def step_runs(offsets: np.ndarray, a: int, b: int) -> list[tuple[int, int, int]]:
    """(step, first row, end row) of every step that samples ``a:b`` touch (rows mode)."""
    out = []
    i = int(np.searchsorted(offsets, a, side="right") - 1)
    while a < b:
        end = min(b, int(offsets[i + 1]))
        if end > a:
            out.append((i, a - int(offsets[i]), end - int(offsets[i])))
        a = end
        i += 1
    return out


class Snapshot:
    """Per step of a stored channel: its samples (rows, or 1), bytes and version, and the row
    dtype and shape of each variable. Steps are only ever appended."""

    def __init__(
        self, url: Any, names: tuple[str, ...], sample: str, files: list[str] | None = None
    ) -> None:
        self.url, self.names, self.sample = url, names, sample
        self.files = files  # several channels read as one (the list grows; see _sources)
        self.where: list[tuple[int, int]] = []  # per step: (file, step in the file)
        self.file_counts: list[int] = []  # steps of each file taken in
        self.file_sigs: list[str | None] = []  # and what each file looked like then
        self.located: list[list[Any] | None] = []  # per step: where its bytes lie (_direct)
        self.counts: list[int] = []
        self.step_bytes: list[int] = []
        self.versions: list[str | None] = []
        self.offsets = np.zeros(1, np.int64)
        self.rows: RowSpec = {}

    def __len__(self) -> int:
        return int(self.offsets[-1])

    @property
    def steps(self) -> int:
        return len(self.counts)

    def take_in(self, arc: Any, versions: bool) -> None:
        """Take in the steps of ``arc`` (an open archive) beyond those known."""
        many = self.files is not None
        for i in range(len(self.counts), len(arc)):
            seen = arc.described(i) if many else None
            if seen is None:
                self.take(i, arc[i].vars)
                if versions:
                    self.versions.append(arc.version(i))
            else:
                self.take(i, seen[0])
                if versions:
                    self.versions.append(seen[1])
            if many:
                self.where.append(arc.where(i))
                self.located.append(places(seen[2], self.names) if seen is not None else None)
        if many:
            # In place: direct reads share the list.
            self.file_counts, self.file_sigs[:] = list(arc.counts), arc.sigs
        self.offsets = np.concatenate(([0], np.cumsum(self.counts, dtype=np.int64)))

    def take(self, i: int, specs: Mapping[str, VarSpec]) -> None:
        """Take in step ``i``, whose variables are ``specs``."""
        missing = [n for n in self.names if n not in specs]
        if missing:
            raise VariableNotFoundError(
                f"step {i} of {self.url} has no variable {missing[0]!r} (it has: "
                f"{', '.join(sorted(specs)) or 'none'}); every step must hold every "
                f"variable the dataset reads"
            )
        nbytes = 0
        rows = None
        for name in self.names:
            spec = specs[name]
            nbytes += spec.nbytes
            if self.sample == "step":
                continue
            if not spec.shape:
                raise SchemaError(
                    f"variable {name!r} is a scalar in step {i} of {self.url}; sample='row' "
                    f"needs arrays with rows (axis 0): use sample='step'"
                )
            row = (spec.dtype, spec.shape[1:])
            known = self.rows.setdefault(name, row)
            if known != row:
                raise SchemaError(
                    f"rows of {name!r} are {known[1]} {known[0]} before step {i} of {self.url} "
                    f"but {row[1]} {row[0]} in it; samples of a dataset need one shape and dtype"
                )
            if rows is None:
                rows = spec.shape[0]
            elif spec.shape[0] != rows:
                raise SchemaError(
                    f"step {i} of {self.url} has {rows} rows of {self.names[0]!r} but "
                    f"{spec.shape[0]} of {name!r}; with sample='row' the variables of a step "
                    f"must have the same number of rows"
                )
        self.counts.append(1 if self.sample == "step" else int(rows or 0))
        self.step_bytes.append(nbytes)

    def layout(self, shard_bytes: int, steps: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Shard boundaries and bytes over the first ``steps`` steps (default all)."""
        n = len(self.counts) if steps is None else steps
        return shard_layout(self.counts[:n], self.step_bytes[:n], shard_bytes, self.sample)

    def steps_with(self, samples: int) -> int:
        """How many steps made a snapshot of exactly ``samples`` samples."""
        steps = int(np.searchsorted(self.offsets, samples))
        if steps >= len(self.offsets) or int(self.offsets[steps]) != samples:
            raise OptionError(
                f"{self.url} never had exactly {samples} samples (step sizes differ from when "
                f"the order was taken): was it rewritten?"
            )
        return steps

    def key(self, bounds: np.ndarray, s: int) -> str:
        """What identifies shard ``s`` in a cache: the source, what it holds, its steps'
        versions."""
        a, b = int(bounds[s]), int(bounds[s + 1])
        if self.files is not None:  # where each step is, not its place in this list
            if self.sample == "step":
                what: list = ["steps"] + [[*self._step(i), self.versions[i]] for i in range(a, b)]
            else:
                what = ["rows"] + [
                    [*self._step(i), r0, r1, self.versions[i]]
                    for i, r0, r1 in step_runs(self.offsets, a, b)
                ]
            return NodeCache.key(self.names, what)
        if self.sample == "step":
            what = ["step", a, b, self.versions[a:b]]
        else:
            what = ["row"] + [
                [i, r0, r1, self.versions[i]] for i, r0, r1 in step_runs(self.offsets, a, b)
            ]
        return NodeCache.key(self.url, self.names, what)

    def _step(self, i: int) -> tuple[str, int]:
        assert self.files is not None
        k, j = self.where[i]
        return self.files[k], j
