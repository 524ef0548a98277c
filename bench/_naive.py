"""The per-sample h5py Dataset most users write, the baseline of the loader benchmarks."""

from __future__ import annotations

from typing import Any

import h5py
import numpy as np
from torch.utils.data import Dataset


class NaiveH5Dataset(Dataset):
    """Open the file lazily (in each worker), read one sample per ``__getitem__``.

    ``step_axis``: the dataset is ``(steps, rows, ...)`` and samples are the rows of all steps
    (what dataplane's h5:// writes); otherwise ``(samples, ...)``.
    """

    def __init__(self, path: str, name: str, step_axis: bool) -> None:
        self.path, self.name, self.step_axis = path, name, step_axis
        with h5py.File(path, "r") as f:
            shape = f[name].shape
        self.rows = shape[1] if step_axis else 1
        self.n = shape[0] * shape[1] if step_axis else shape[0]
        self._f: Any = None

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> np.ndarray:
        if self._f is None:
            self._f = h5py.File(self.path, "r")
        d = self._f[self.name]
        return d[i // self.rows, i % self.rows] if self.step_axis else d[i]
