"""``zarr://path`` and ``zarr+PROTO://...``: steps in a Zarr v3 group, on any fsspec store.

``zarr://path`` and ``zarr+file://path`` are local directories; ``zarr+memory://name``,
``zarr+s3://bucket/key`` and any other fsspec protocol go through fsspec, with
``storage_options`` passed on unchanged (a dict, or JSON in the URL query).

Layout (what plain zarr sees)
    ``<var>``
        One array per variable with a **leading step axis** (``g["u"][t]`` is step ``t``),
        one step per chunk (several for small variables), uncompressed unless ``compressors``
        says otherwise.
    group attributes
        The channel attributes.
    ``__dataplane/``
        A group whose attributes say how many steps are committed (written last: a step is
        visible only once complete), and an array ``steps`` with one JSON string per step
        (its index, step attributes, xxh3 checksums of the blocks of each array).

As for ``h5://``, the variables and their shapes are fixed by the first step: one array per
variable is what training code reads fastest, and appending keeps every earlier chunk intact.
A writer killed mid-chunk can leave an orphan ``*.partial`` file (zarr writes chunks to a
temporary name first); it is never read.

Groups not written by dataplane: every array (``group/name`` for nested ones) is a variable;
``layout="one-step"`` (default for them) makes the store one step, ``layout="step-axis"`` takes
axis 0 as the step axis. A store holding a single array is that one variable.

Options
-------
verify : bool
    Check every read, whole or partial, against the step's block checksums (default True).
heartbeat : float
    Seconds between the writer's lease updates (default 1).
storage_options : dict or JSON string
    For fsspec (credentials, endpoints, ...).
compressors : None, str, dict or list
    Zarr v3 codecs for new arrays: a name (``"zstd"``, ``"blosc"``, ``"gzip"``), a codec
    dict such as ``{"name": "zstd", "configuration": {"level": 3}}``, codec objects, or a list.
layout : str
    ``"auto"`` (default), ``"one-step"`` or ``"step-axis"``, for stores dataplane did not write.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Callable
from typing import Any

import fsspec
import numpy as np
import zarr
import zarr.registry
from zarr.storage import FsspecStore, LocalStore

from dataplane.errors import DataplaneError, IntegrityError, OptionError, SchemaError
from dataplane.model import AttrValue, ChannelURL, Selection, StepMeta, VarSpec
from dataplane.transports._checksums import block_sums
from dataplane.transports._files import (
    FileTransport,
    FormatWriter,
    LeaseIO,
    Seen,
    StepSource,
    read_lease,
    writer_state,
)
from dataplane.transports._foreign import ForeignSource
from dataplane.transports._zarrstore import ATOMIC_PROTOCOLS, FsspecLeaseIO, parse_codecs, retrying

__all__ = ["ZarrTransport"]

_META = "__dataplane"
_CHUNK_TARGET = 1 << 20


# Stores whose writes replace an object atomically. Elsewhere (fsspec's memory and local
# filesystems) a reader can see a file while it is being written, so a chunk that already holds
# committed steps must never be rewritten: one step per chunk there.


def _chunks(shape: tuple[int, ...], itemsize: int, pack: bool) -> tuple[int, ...]:
    dims = [max(1, n) for n in shape]
    step_bytes = math.prod(dims) * itemsize
    rows = 1
    if pack and step_bytes < _CHUNK_TARGET:
        rows = max(1, min(1024, _CHUNK_TARGET // max(step_bytes, 1)))
    return (rows, *dims)


class ZarrTransport(FileTransport):
    scheme = "zarr"
    aggregates = True
    accepts_protocol = True
    supports_changing_layout = False

    def __init__(
        self,
        url: ChannelURL,
        *,
        verify: bool = True,
        heartbeat: float = 1.0,
        storage_options: dict[str, Any] | str | None = None,
        compressors: Any = None,
        layout: str = "auto",
    ) -> None:
        super().__init__(url)
        self._init_common(verify, heartbeat)
        if layout not in ("auto", "one-step", "step-axis"):
            raise OptionError(f"layout must be 'auto', 'one-step' or 'step-axis', got {layout!r}")
        if isinstance(storage_options, str):
            try:
                storage_options = json.loads(storage_options)
            except ValueError as exc:
                raise OptionError(f"storage_options must be JSON in a URL: {exc}") from None
        self.storage_options: dict[str, Any] = dict(storage_options or {})  # type: ignore[arg-type]
        self.protocol = url.protocol or "file"
        self.layout = layout
        self.compressors = parse_codecs(compressors)
        target = f"{self.protocol}://{url.path}"
        try:
            self.fs, self.root = fsspec.core.url_to_fs(target, **self.storage_options)
        except (ImportError, ValueError) as exc:
            raise OptionError(f"{url.url}: fsspec cannot open {target!r}: {exc}") from exc
        self.local = self.protocol == "file"
        self.atomic = self.protocol in ATOMIC_PROTOCOLS
        # Ranks write their own chunks where every rank sees the same store and a chunk
        # write replaces the object whole (not fsspec's memory, which is one process's).
        self.supports_rank_writes = self.atomic
        if self.protocol == "memory":
            self.scope = "process"  # fsspec's memory filesystem lives in one process

    def store(self, read_only: bool) -> Any:
        if self.local:
            return LocalStore(self.root, read_only=read_only)
        with warnings.catch_warnings():
            # zarr wraps synchronous fsspec filesystems itself and warns that it does.
            warnings.simplefilter("ignore")
            return FsspecStore.from_url(
                f"{self.protocol}://{self.url.path}",
                storage_options=self.storage_options or None,
                read_only=read_only,
            )

    def put_block(
        self, row: int, name: str, start: tuple[int, ...], block: np.ndarray
    ) -> dict[str, Any]:
        # Opened afresh: the root resized the array for this step after we last looked.
        a: Any = zarr.open_array(store=self.store(read_only=False), path=name, mode="r+")
        block = np.ascontiguousarray(block)
        where = [slice(s, s + n) for s, n in zip(start, block.shape)]
        a[tuple([row, *where])] = block
        return block_sums(block)

    def lease_io(self) -> LeaseIO:
        path = self.root.rstrip("/") + ".lease"
        return LeaseIO(path) if self.local else FsspecLeaseIO(self.fs, path)

    def format_writer(self, mode: str) -> FormatWriter:
        return _ZarrWriter(self, mode)

    def format_source(self, seen: Seen | None = None) -> StepSource | None:
        try:
            node = zarr.open(store=self.store(read_only=True), mode="r")
        except (FileNotFoundError, KeyError):
            return None
        except Exception as exc:
            if type(exc).__name__ in (
                "GroupNotFoundError",
                "NodeNotFoundError",
                "ArrayNotFoundError",
            ):
                return None
            raise
        if isinstance(node, zarr.Group) and _META in node:
            return _ZarrSource(self, node)
        state = seen[1] if seen is not None else writer_state(read_lease(self.lease_io()))
        if state != "none":
            return None  # our writer is still creating the layout
        return _foreign(self, node)


def _is_missing(exc: Exception) -> bool:
    return isinstance(exc, (FileNotFoundError, KeyError)) or type(exc).__name__.endswith(
        "NotFoundError"
    )


class _ZarrWriter(FormatWriter):
    def __init__(self, t: ZarrTransport, mode: str) -> None:
        self._t = t
        self._specs: dict[str, VarSpec] = {}
        self._arrays: dict[str, Any] = {}
        self._pending: dict[str, Any] | None = None
        self._chunk_hint: dict[str, tuple[int, ...]] = {}
        store = t.store(read_only=False)
        self._g: Any = None
        if mode == "a":
            try:
                self._g = zarr.open_group(store=store, mode="r+")
            except Exception as exc:
                if not _is_missing(exc):
                    raise
        if self._g is not None and _META in self._g:
            meta = self._g[_META]
            if "steps" not in meta or "committed" not in meta.attrs:
                self._g = None  # its writer was killed setting it up: nothing was committed
        elif self._g is not None and not list(self._g.keys()) and not dict(self._g.attrs):
            self._g = None  # an empty group: its writer was killed before making the layout
        if self._g is not None:
            if _META not in self._g:
                raise DataplaneError(
                    f"{t.url.url} was not written by dataplane; append needs its layout"
                )
            self._meta = self._g[_META]
            n = int(self._meta.attrs.get("committed", 0))
            self.next_index = n
            names = self._meta.attrs.get("vars", [])
            for name in names:
                a = self._g[name]
                self._arrays[name] = a
                self._specs[name] = VarSpec(np.dtype(a.dtype), tuple(a.shape[1:]))
                a.resize((n, *a.shape[1:]))  # drop a step begun but never committed
            self._steps = self._meta["steps"]
            self._steps.resize((n,))
            self._n = n
        else:
            self._g = zarr.open_group(store=store, mode="w")
            self._meta = self._g.create_group(_META)
            self._meta.attrs.update({"version": 1, "layout": "step-axis", "committed": 0})
            self._steps = self._meta.create_array(
                "steps", shape=(0,), chunks=(1,), dtype=str, compressors=None
            )
            self._n = 0

    def known_vars(self) -> dict[str, VarSpec]:
        return dict(self._specs)

    def chunks_of(self, name: str) -> tuple[int, ...] | None:
        a = self._arrays.get(name)
        return None if a is None else tuple(a.chunks[1:])

    def begin_ranked(
        self,
        index: int,
        specs: dict[str, VarSpec],
        attrs: dict[str, AttrValue],
        chunks: dict[str, tuple[int, ...]],
        layout: dict[str, Any] | None = None,
    ) -> int:
        self._chunk_hint = chunks
        try:
            if layout and "written_by" in layout and not self._specs and self._n == 0:
                self._meta.attrs["written_by"] = layout["written_by"]
            self.begin(index, specs, attrs)
        finally:
            self._chunk_hint = {}
        return self._n

    def begin(self, index: int, specs: dict[str, VarSpec], attrs: dict[str, AttrValue]) -> None:
        if not self._specs and self._n == 0:
            # A writer killed while creating the first step's arrays leaves some behind.
            for stale in [k for k in self._g.keys() if k != _META]:
                del self._g[stale]
            for name, spec in specs.items():
                self._arrays[name] = self._g.create_array(
                    name,
                    shape=(0, *spec.shape),
                    chunks=(1, *self._chunk_hint[name])
                    if name in self._chunk_hint
                    else _chunks(spec.shape, spec.dtype.itemsize, self._t.atomic),
                    dtype=spec.dtype,
                    compressors=self._t.compressors,
                    fill_value=np.zeros((), spec.dtype)[()],
                    # Zarr skips a chunk that equals the fill value, comparing with ==: a
                    # complex -0.0 came back as +0.0 (found by hypothesis). Store every chunk.
                    config={"write_empty_chunks": True},
                )
            self._specs = dict(specs)
            self._meta.attrs["vars"] = list(specs)
        elif specs != self._specs:
            have = ", ".join(f"{k}: {v.dtype.name}{list(v.shape)}" for k, v in self._specs.items())
            got = ", ".join(f"{k}: {v.dtype.name}{list(v.shape)}" for k, v in specs.items())
            raise SchemaError(
                f"{self._t.url.url}: step {index} has variables {{{got}}} but the channel has "
                f"{{{have}}}; zarr:// stores each variable as one array with a leading step "
                f"axis, so every step has the same variables and shapes (use bp5:// or a new "
                f"store for changing layouts)"
            )
        for a in self._arrays.values():
            a.resize((self._n + 1, *a.shape[1:]))
        self._pending = {"attrs": attrs}

    def put(self, name: str, array: np.ndarray) -> None:
        assert self._pending is not None
        if array.size:
            self._arrays[name][self._n] = array

    def put_region(self, name: str, start: tuple[int, ...], block: np.ndarray) -> None:
        assert self._pending is not None
        where = tuple(slice(s, s + k) for s, k in zip(start, block.shape))
        self._arrays[name][(self._n,) + where] = block

    def commit(self, checksums: Callable[[], dict[str, Any]]) -> None:
        p = self._pending
        assert p is not None
        self._pending = None
        n = self._n
        self._steps.resize((n + 1,))
        self._steps[n] = json.dumps({"i": n, "a": p["attrs"], "c": checksums()})
        self._meta.attrs["committed"] = n + 1  # last: the step is visible from here
        self._n = n + 1

    def abort(self) -> None:
        if self._pending is not None:
            for a in self._arrays.values():
                a.resize((self._n, *a.shape[1:]))
            self._pending = None

    def set_attrs(self, attrs: dict[str, AttrValue]) -> None:
        current = dict(self._g.attrs)
        for key in current:
            if key not in attrs:
                del self._g.attrs[key]
        self._g.attrs.update(attrs)

    def close(self) -> None:
        self._arrays.clear()


class _ZarrSource(StepSource):
    def __init__(self, t: ZarrTransport, g: Any) -> None:
        self._t = t
        self._g = g
        self._store = g.store
        self._count = 0
        self._names: list[str] = []
        self._arrays: dict[str, Any] = {}
        self._specs: dict[str, VarSpec] = {}
        self._steps: Any = None

    def refresh(self) -> int:
        def look() -> tuple[int, list[str]]:
            attrs: Any = zarr.open_group(store=self._store, path=_META, mode="r").attrs
            count, names = int(attrs.get("committed", 0)), list(attrs.get("vars", []))
            if count and not names:
                raise ValueError("committed steps but no variables: metadata being rewritten")
            return count, names

        count, names = retrying(look)
        if count != self._count:
            self._names = names
            self._steps = None
            self._arrays = {}
            self._count = count
        return count

    def finished(self) -> bool:
        return False  # the lease says when our writer is done

    def _array(self, name: str) -> Any:
        a = self._arrays.get(name)
        if a is None:
            a = self._arrays[name] = retrying(
                lambda: zarr.open_array(store=self._store, path=name, mode="r")
            )
            self._specs[name] = VarSpec(np.dtype(a.dtype), tuple(a.shape[1:]))
        return a

    def meta(self, index: int) -> tuple[StepMeta, dict[str, str]]:
        if self._steps is None or self._steps.shape[0] <= index:
            self._steps = retrying(
                lambda: zarr.open_array(store=self._store, path=f"{_META}/steps", mode="r")
            )
        steps = self._steps
        info = retrying(lambda: json.loads(str(steps[index])))
        if info.get("i", index) != index:
            raise IntegrityError(
                f"{self._t.url.url}: the metadata stored for step {index} is that of step "
                f"{info['i']}: the store is damaged"
            )
        specs = {}
        for name in self._names:
            self._array(name)
            specs[name] = self._specs[name]
        return StepMeta(index, info["a"], specs), info["c"]

    def get(self, index: int, name: str, selection: Selection) -> np.ndarray:
        a = self._array(name)
        key = (index, *selection.slices)
        return np.asarray(a[key])

    def attrs(self) -> dict[str, AttrValue]:
        return retrying(lambda: dict(zarr.open_group(store=self._store, mode="r").attrs))

    def written_by(self) -> dict[str, Any] | None:
        def look() -> Any:
            return zarr.open_group(store=self._store, path=_META, mode="r").attrs.get("written_by")

        got = retrying(look)
        return None if got is None else dict(got)

    def close(self) -> None:
        self._arrays.clear()


def _foreign(t: ZarrTransport, node: Any) -> ForeignSource:
    """A store dataplane did not write, mapped by the documented rules (module docstring)."""
    if isinstance(node, zarr.Array):
        name = t.url.path.rstrip("/").rsplit("/", 1)[-1].removesuffix(".zarr") or "data"
        arrays = {name: node}
    else:
        arrays = {path: a for path, a in node.arrays()} | dict(_nested_arrays(node))
    attrs = dict(node.attrs)

    def read(name: str, key: tuple[Any, ...]) -> np.ndarray:
        a = arrays[name]
        return np.asarray(a[key] if key else a[()])

    shapes = {n: (np.dtype(a.dtype), tuple(a.shape)) for n, a in arrays.items()}
    return ForeignSource(
        t.url.url, shapes, t.layout == "step-axis", read, lambda: dict(attrs), arrays.clear
    )


def _nested_arrays(group: Any, prefix: str = "") -> list[tuple[str, Any]]:
    out = []
    for name, sub in group.groups():
        for path, a in sub.arrays():
            out.append((f"{prefix}{name}/{path}", a))
        out.extend(_nested_arrays(sub, f"{prefix}{name}/"))
    return out
