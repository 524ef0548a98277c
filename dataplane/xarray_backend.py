"""An xarray backend: ``xr.open_dataset("bp5://run.bp", engine="dataplane")``.

A channel opens as one Dataset: each variable with a leading ``step`` dimension, the steps'
scalar attributes (``time``, ...) as coordinates along ``step``, the channel's attributes as
the Dataset's. Arrays are lazy: indexing reads, step by step, only the hyperslab asked for
(``Archive.read``); ``chunks=`` gives dask arrays with one chunk per step. A live channel opens
as the steps committed when it is opened.

Dimension names: ``dims={"u": ("y", "x")}`` at open, else what the publisher recorded as the
channel attribute ``dims.<name>`` (a list of names; :func:`dims_attrs` makes them), else
``<name>_dim_<k>``. Registered through the ``xarray.backends`` entry point; importing
``dataplane`` imports none of xarray.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
from xarray import Dataset, Variable
from xarray.backends import BackendArray, BackendEntrypoint
from xarray.core import indexing

from dataplane.api import open as open_archive
from dataplane.errors import OptionError, SchemaError
from dataplane.subscriber import Archive

__all__ = ["DataplaneBackendEntrypoint", "dims_attrs"]

DIMS_PREFIX = "dims."
STEP = "step"
SCHEMES = ("bp5", "h5", "zarr")


def dims_attrs(dims: Mapping[str, Iterable[str]]) -> dict[str, list[str]]:
    """Channel attributes that record dimension names, for a publisher:
    ``pub.attrs.update(dims_attrs({"u": ("y", "x")}))``."""
    return {f"{DIMS_PREFIX}{name}": [str(d) for d in names] for name, names in dims.items()}


class StepArray(BackendArray):
    """Variable ``name`` of every step of an archive, read lazily: one hyperslab read per
    step touched."""

    def __init__(
        self, archive: Archive, name: str, steps: int, shape: tuple[int, ...], dtype: np.dtype
    ) -> None:
        self.archive, self.name = archive, name
        self.shape = (steps, *shape)
        self.dtype = dtype
        self._lock = threading.Lock()  # one read at a time per archive (h5py, adios2)

    def __getitem__(self, key: indexing.ExplicitIndexer) -> np.ndarray:
        return indexing.explicit_indexing_adapter(
            key, self.shape, indexing.IndexingSupport.BASIC, self._read
        )

    def _read(self, key: tuple[Any, ...]) -> np.ndarray:
        """``key``: an int or a slice per dimension (xarray's basic indexing)."""
        steps = range(self.shape[0])[key[0]] if isinstance(key[0], slice) else [int(key[0])]
        # Per dimension: the box read (start, stop), and what is kept of it.
        box: list[tuple[int, int, int | slice]] = []
        for k, n in zip(key[1:], self.shape[1:]):
            if not isinstance(k, slice):
                box.append((int(k), int(k) + 1, 0))
                continue
            r = range(n)[k]
            if not len(r):
                box.append((0, 0, slice(None)))
            elif r.step > 0:
                box.append((r[0], r[-1] + 1, slice(None, None, r.step)))
            else:  # reversed: the box from its last element, kept backwards
                box.append((r[-1], r[0] + 1, slice(None, None, r.step)))
        start = [a for a, _, _ in box]
        count = [b - a for a, b, _ in box]
        parts = []
        with self._lock:
            for s in steps:
                if any(c == 0 for c in count):
                    parts.append(np.empty(count, self.dtype))
                elif box:
                    parts.append(self.archive.read(self.name, s, start, count))
                else:
                    parts.append(np.asarray(self.archive.read(self.name, s)))
        out = np.stack(parts) if parts else np.empty((0, *count), self.dtype)
        keep: list[int | slice] = [slice(None) if isinstance(key[0], slice) else 0]
        keep += [k for _, _, k in box]
        return np.asarray(out[tuple(keep)])


class DataplaneBackendEntrypoint(BackendEntrypoint):
    """``engine="dataplane"``: a channel (``bp5://``, ``h5://``, ``zarr://`` or a file
    dataplane did not write) as an xarray Dataset."""

    open_dataset_parameters = ("filename_or_obj", "drop_variables", "dims")
    description = "Open dataplane channels (ADIOS2 BP5, HDF5, Zarr) as lazy Datasets"
    url = "https://github.com/dataplane-hpc/dataplane/blob/main/docs/xarray.md"

    def open_dataset(  # type: ignore[override]
        self,
        filename_or_obj: Any,
        *,
        drop_variables: str | Iterable[str] | None = None,
        dims: Mapping[str, Iterable[str]] | None = None,
        **options: Any,
    ) -> Dataset:
        url = str(filename_or_obj)
        if "://" not in url:
            raise OptionError(
                f"engine='dataplane' opens channel URLs (bp5://, h5://, zarr://), got {url!r}"
            )
        archive = open_archive(url, **options)
        try:
            return _dataset(archive, drop_variables, dims)
        except BaseException:
            archive.close()
            raise

    def guess_can_open(self, filename_or_obj: Any) -> bool:
        return isinstance(filename_or_obj, str) and filename_or_obj.split("://", 1)[0] in SCHEMES


def _dataset(
    archive: Archive,
    drop_variables: str | Iterable[str] | None,
    dims: Mapping[str, Iterable[str]] | None,
) -> Dataset:
    drop = {drop_variables} if isinstance(drop_variables, str) else set(drop_variables or ())
    attrs = dict(archive.attrs)
    given = {k: tuple(v) for k, v in (dims or {}).items()}
    recorded = {
        k[len(DIMS_PREFIX) :]: tuple(v)
        for k, v in attrs.items()
        if k.startswith(DIMS_PREFIX) and isinstance(v, list)
    }
    unknown = set(given) - set(archive.vars)
    if unknown:
        raise OptionError(
            f"dims names variables {sorted(unknown)} that {archive.url} does not have "
            f"(it has {sorted(archive.vars)})"
        )
    n = len(archive)
    steps = [archive[i] for i in range(n)]
    variables: dict[str, Variable] = {}
    for name, spec in archive.vars.items():
        if name in drop:
            continue
        for st in steps:
            if name in st.vars and st.vars[name].shape != spec.shape:
                raise SchemaError(
                    f"{name!r} has shape {st.vars[name].shape} in step {st.index} and "
                    f"{spec.shape} in others: xarray needs one shape along 'step'; read such "
                    f"steps with dataplane.open()"
                )
        names = (
            given.get(name)
            or recorded.get(name)
            or tuple(f"{name}_dim_{k}" for k in range(len(spec.shape)))
        )
        if len(names) != len(spec.shape):
            raise OptionError(
                f"dims for {name!r} are {names}, but it has {len(spec.shape)} dimensions "
                f"(shape {spec.shape})"
            )
        data = indexing.LazilyIndexedArray(StepArray(archive, name, n, spec.shape, spec.dtype))
        var = Variable((STEP, *names), data)
        var.encoding["preferred_chunks"] = {STEP: 1, **dict(zip(names, spec.shape))}
        variables[name] = var
    coords = _step_coords(steps, set(variables))
    ds = Dataset(
        variables,
        coords=coords,
        attrs={k: v for k, v in attrs.items() if not k.startswith(DIMS_PREFIX)},
    )
    ds.set_close(archive.close)
    return ds


def _step_coords(steps: list[Any], taken: set[str]) -> dict[str, Any]:
    """Step attributes that every step has as a scalar, as coordinates along ``step``."""
    if not steps:
        return {STEP: np.arange(0)}
    coords: dict[str, Any] = {STEP: np.asarray([s.index for s in steps])}
    for key in steps[0].attrs:
        values = [s.attrs.get(key) for s in steps]
        if key in taken or key == STEP:
            continue
        if all(isinstance(v, (bool, int, float, str)) for v in values):
            coords[key] = (STEP, np.asarray(values))
    return coords
