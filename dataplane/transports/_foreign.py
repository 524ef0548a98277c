"""Stored arrays that dataplane did not write (a plain h5py file, a zarr store), as steps."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from dataplane.errors import DataplaneError, SchemaError
from dataplane.model import AttrValue, Selection, StepMeta, VarSpec
from dataplane.transports._format import StepSource


class ForeignSource(StepSource):
    """The numeric arrays of a file or store, by the documented rules: the whole of it is one
    step, or (``layout="step-axis"``) axis 0 of every array counts the steps.

    ``read(name, key)`` reads array ``name`` at the index tuple ``key`` (``()``: all of it),
    ``attrs()`` gives the file's attributes and ``release()`` lets go of it."""

    def __init__(
        self,
        url: str,
        shapes: dict[str, tuple[np.dtype, tuple[int, ...]]],
        step_axis: bool,
        read: Callable[[str, tuple[Any, ...]], np.ndarray],
        attrs: Callable[[], dict[str, AttrValue]],
        release: Callable[[], None] = lambda: None,
    ) -> None:
        self._url = url
        self._read, self._attrs, self._release = read, attrs, release
        self._closed = False
        found = {n: (np.dtype(dt), tuple(s)) for n, (dt, s) in shapes.items()}
        found = {n: v for n, v in found.items() if v[0].kind in "biufc"}
        self._step_axis = step_axis
        if step_axis:
            lengths = {n: shape[0] for n, (_, shape) in found.items() if shape}
            if len(set(lengths.values())) > 1:
                self.close()
                raise SchemaError(
                    f"{url}: layout='step-axis' needs every array to have the same length "
                    f"along axis 0, got {lengths}"
                )
            self._count = next(iter(lengths.values()), 0)
            found = {n: (dt, shape[1:]) for n, (dt, shape) in found.items() if shape}
        else:
            self._count = 1
        self._specs = {n: VarSpec(dt, shape) for n, (dt, shape) in found.items()}

    def refresh(self) -> int:
        return self._count

    def meta(self, index: int) -> tuple[StepMeta, dict[str, str]]:
        if not 0 <= index < self._count:
            raise SchemaError(f"{self._url} has {self._count} steps, not {index + 1}")
        return StepMeta(index, {}, dict(self._specs)), {}

    def get(self, index: int, name: str, selection: Selection) -> np.ndarray:
        if self._closed:
            raise DataplaneError(f"{self._url} is closed")
        key = (index, *selection.slices) if self._step_axis else tuple(selection.slices)
        return self._read(name, key)

    def attrs(self) -> dict[str, AttrValue]:
        if self._closed:
            raise DataplaneError(f"{self._url} is closed")
        return self._attrs()

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._release()
