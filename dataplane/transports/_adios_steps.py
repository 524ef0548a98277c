"""What ``bp5://`` and ``sst://`` (and the SST relay processes) share: the ADIOS2 transport
base, how a step is encoded (``__dp_step``, attributes, dtypes ADIOS2 cannot hold) and read
back."""

from __future__ import annotations

import json
import re
import threading
from typing import Any

import numpy as np

from dataplane.errors import DataplaneError, OptionError, SchemaError
from dataplane.model import AttrValue, Selection, StepMeta, VarSpec
from dataplane.transports._adios2 import load_bindings
from dataplane.transports._files import FileTransport

ab = load_bindings()

_STEP_VAR = "__dp_step"
_STEP_ATTR = "step/"
# The channel attributes exactly as given, as one JSON string: ADIOS2 attributes lose types
# (bool, one-element lists) and SST delivers string-list attributes empty.
_CHANNEL_ATTR = "__dp/channel_attrs"
_STORED_AS: dict[np.dtype, np.dtype] = {
    np.dtype(bool): np.dtype(np.uint8),
    np.dtype(np.float16): np.dtype(np.uint16),
}
_ADIOS_TYPES = {
    "char": np.int8,
    "int8_t": np.int8,
    "uint8_t": np.uint8,
    "int16_t": np.int16,
    "uint16_t": np.uint16,
    "int32_t": np.int32,
    "uint32_t": np.uint32,
    "int64_t": np.int64,
    "uint64_t": np.uint64,
    "float": np.float32,
    "double": np.float64,
    "float complex": np.complex64,
    "double complex": np.complex128,
    "long double": np.longdouble,
}
_io_counter = 0
_io_lock = threading.Lock()


def _io_name(kind: str) -> str:
    global _io_counter
    with _io_lock:
        _io_counter += 1
        return f"dataplane-{kind}-{_io_counter}"


def _params(value: Any) -> dict[str, str]:
    if value is None:
        return {}
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError as exc:
            raise OptionError(f"params must be a dict or JSON object: {exc}") from None
    if not isinstance(value, dict):
        raise OptionError(f"params must be a dict of ADIOS2 engine parameters, got {value!r}")
    return {str(k): str(v) for k, v in value.items()}


def _define_operator(ad: Any, name: str, params: dict[str, str]) -> Any:
    """An ADIOS2 operator, or ``OptionError`` when this build lacks it.

    Asked of the ADIOS object up front: a variable given an unknown operator by name aborts
    the whole process at its first Put (a C++ exception no binding catches).
    """
    try:
        return ad.DefineOperator(_io_name("op"), name, params)
    except ValueError as exc:
        why = re.sub(r"\x1b\[[0-9;]*m|\[[^]]*\]\s*", "", str(exc)).strip()
        why = why.rsplit(" : ", 1)[-1]
        raise OptionError(
            f"operator={name!r} is not available in this adios2 build ({why}); "
            f"build adios2 with it, or leave operator unset"
        ) from None


def _stored(arr: np.ndarray) -> np.ndarray:
    as_ = _STORED_AS.get(arr.dtype)
    return arr.view(as_) if as_ is not None else arr


def _adios_attr(io: Any, name: str, value: AttrValue) -> None:
    """(Re)define attribute ``name``; values ADIOS2 cannot hold are skipped (the JSON has them)."""
    if io.InquireAttribute(name):
        io.RemoveAttribute(name)
    if isinstance(value, bool):
        value = int(value)
    if isinstance(value, list):
        if not value:
            return
        if isinstance(value[0], str):
            io.DefineAttribute(name, value)
            return
        numbers = np.asarray([int(v) if isinstance(v, bool) else v for v in value])
        if numbers.dtype.kind in "iuf":
            io.DefineAttribute(name, numbers)
        return
    if isinstance(value, int) and not -(2**63) <= value < 2**63:
        io.DefineAttribute(name, np.array([value], np.uint64))
    else:
        io.DefineAttribute(name, value)  # a single value (str, int, float)


def _read_attr(a: Any) -> AttrValue:
    data = a.DataString() if a.Type() == "string" else a.Data()
    if isinstance(data, list):
        return data[0] if a.SingleValue() else list(data)
    arr = np.asarray(data)
    return arr.reshape(-1)[0].item() if a.SingleValue() else arr.tolist()


class _ADIOSTransport(FileTransport):
    """What BP5 and SST share: the ADIOS2 object, parameters, and the step encoding."""

    engine = ""
    path: str
    params: dict[str, str]
    threads: int

    def _adios(self) -> Any:
        return ab.ADIOS()

    def reader_params(self) -> dict[str, str]:
        return {"Threads": str(self.threads), "OpenTimeoutSecs": "5"}

    def reader_io(self, ad: Any) -> Any:
        io = ad.DeclareIO(_io_name("read"))
        io.SetEngine(self.engine)
        io.SetParameters({**self.reader_params(), **self.params})
        return io


class _StepEncoder:
    """Puts one dataplane step into an open ADIOS2 step (shared by BP5 and SST writers)."""

    def __init__(
        self,
        t: FileTransport,
        io: Any,
        engine: Any,
        *,
        stream: bool = False,
        operator: Any = None,
    ) -> None:
        # NOTE: over SST, redefining an attribute breaks readers (adios2 reports a null pointer
        # in DataStrings) and string lists arrive empty. A stream therefore defines each plain
        # attribute once and carries the channel attributes in every step's JSON ("ca"), which
        # also gives late joiners the current ones.
        self._stream = stream
        self._operator = operator
        self._ca: dict[str, AttrValue] = {}
        self._t = t
        self._io = io
        self._engine = engine
        self._vars: dict[str, Any] = {}
        self._ndim: dict[str, int] = {}
        self._step_var = io.DefineVariable(_STEP_VAR, "", [], [], [], False)
        self._step_attrs: set[str] = set()

    def write(
        self, index: int, pending: dict[str, Any], extra: dict[str, Any] | None = None
    ) -> None:
        eng = self._engine
        info: dict[str, Any] = {"i": index, "a": pending["attrs"], "v": {}}
        if self._stream:
            info["ca"] = self._ca
        if extra:
            info.update(extra)
        eng.BeginStep()
        for name, arr in pending["arrays"]:
            info["v"][name] = [arr.dtype.str, list(arr.shape)]
            if arr.size:
                data: Any = _stored(arr).reshape(-1) if arr.ndim == 0 else _stored(arr)
                if not data.flags.writeable:
                    # The bindings refuse read-only integer arrays (a subscriber's zero-copy
                    # view, say); the address overload takes them without a copy. ``pending``
                    # keeps the memory alive until EndStep.
                    data = data.ctypes.data
                eng.Put(self._variable(name, arr), data, ab.Mode.Deferred)
        self._step_attributes(pending["attrs"])
        sums = pending["sums"]
        if callable(sums):
            # Write the arrays now, while their checksums are still being computed beside.
            if any(arr.size for _, arr in pending["arrays"]):
                eng.PerformDataWrite()
            sums = sums()
        info["c"] = sums
        eng.Put(self._step_var, json.dumps(info))  # last: marks the step complete
        eng.EndStep()

    # -- a step whose arrays arrive in pieces (MPI ranks' blocks relayed to the writer) --------
    def begin(self) -> None:
        """Open an ADIOS2 step that :meth:`put_piece` fills and :meth:`end` closes."""
        self._engine.BeginStep()

    def put_piece(
        self, name: str, spec: VarSpec, start: tuple[int, ...], block: np.ndarray
    ) -> None:
        """``block`` at ``start`` of the global array ``name`` (shape ``spec.shape``), written
        out now: ADIOS2 holds no more than this piece (``PerformDataWrite``)."""
        if not block.size:
            return
        var = self._global(name, spec)
        var.SetSelection([list(start), list(block.shape)])
        data = np.ascontiguousarray(_stored(block))
        # Deferred, then written out at once: BP5 writes the piece from this memory (or copies
        # it there and then, with AsyncWrite), where a Sync put copies it into its buffer
        # first (32 MiB pieces: 2.0-2.5 GB/s against 0.8-0.9 here).
        self._engine.Put(var, data, ab.Mode.Deferred)
        self._engine.PerformDataWrite()

    def put_whole(self, name: str, arr: np.ndarray) -> None:
        """A variable the writer holds whole (a single value) in the open step; ``arr`` must
        live until :meth:`end`."""
        if arr.size:
            data: Any = _stored(arr).reshape(-1) if arr.ndim == 0 else _stored(arr)
            self._engine.Put(self._variable(name, arr), data, ab.Mode.Deferred)

    def end(
        self,
        index: int,
        attrs: dict[str, AttrValue],
        specs: dict[str, VarSpec],
        sums: Any,
        extra: dict[str, Any] | None = None,
    ) -> None:
        """Close the step begun with :meth:`begin`: its record (with ``extra``) last, as
        :meth:`write` does."""
        info: dict[str, Any] = {
            "i": index,
            "a": attrs,
            "v": {name: [s.dtype.str, list(s.shape)] for name, s in specs.items()},
            **(extra or {}),
        }
        self._step_attributes(attrs)
        info["c"] = sums() if callable(sums) else sums
        self._engine.Put(self._step_var, json.dumps(info))  # last: marks the step complete
        self._engine.EndStep()

    def attribute(self, name: str, value: AttrValue) -> None:
        """(Re)define a channel-level attribute of dataplane's own (``__dp/...``)."""
        _adios_attr(self._io, name, value)

    def _step_attributes(self, attrs: dict[str, AttrValue]) -> None:
        if self._stream:
            return
        io = self._io
        for name in self._step_attrs - set(attrs):
            io.RemoveAttribute(_STEP_ATTR + name)
        for name, value in attrs.items():
            _adios_attr(io, _STEP_ATTR + name, value)
        self._step_attrs = set(attrs)

    def _global(self, name: str, spec: VarSpec) -> Any:
        """Variable ``name`` with the global shape of ``spec`` (defined at its first step)."""
        shape = list(spec.shape)
        var = self._vars.get(name)
        if var is None:
            template = np.zeros(1, _STORED_AS.get(spec.dtype, spec.dtype))
            var = self._io.DefineVariable(name, template, shape, [0] * len(shape), shape, False)
            self._vars[name] = var
            self._ndim[name] = len(shape)
            if self._operator is not None and shape:
                var.AddOperation(self._operator, {})
            return var
        if self._ndim[name] != len(shape):
            raise SchemaError(
                f"{self._t.url.url}: variable {name!r} was {self._ndim[name]}-d and is now "
                f"{len(shape)}-d; an ADIOS2 variable keeps its number of dimensions"
            )
        var.SetShape(shape)
        return var

    def _variable(self, name: str, arr: np.ndarray) -> Any:
        stored = _stored(arr)
        var = self._vars.get(name)
        if var is None:
            # The template only gives the type; it must be writable (read-only memory, such as a
            # shared-memory view, is refused by the bindings here, though Put takes it).
            template = np.zeros(1, stored.dtype)
            if arr.ndim == 0:
                var = self._io.DefineVariable(name, template, [], [], [], False)
            else:
                shape = list(arr.shape)
                var = self._io.DefineVariable(name, template, shape, [0] * arr.ndim, shape, False)
            self._vars[name] = var
            self._ndim[name] = arr.ndim
            if self._operator is not None and arr.ndim:
                var.AddOperation(self._operator, {})
            return var
        if self._ndim[name] != arr.ndim:
            raise SchemaError(
                f"{self._t.url.url}: variable {name!r} was {self._ndim[name]}-d and is now "
                f"{arr.ndim}-d; an ADIOS2 variable keeps its number of dimensions"
            )
        if arr.ndim:
            var.SetShape(list(arr.shape))
            var.SetSelection([[0] * arr.ndim, list(arr.shape)])
        return var

    def channel_attrs(self, attrs: dict[str, AttrValue], previous: dict[str, AttrValue]) -> None:
        if self._stream:
            self._ca = dict(attrs)
            for name, value in attrs.items():
                if not self._io.InquireAttribute(name):
                    _adios_attr(self._io, name, value)
            return
        for name in previous:
            if name not in attrs and self._io.InquireAttribute(name):
                self._io.RemoveAttribute(name)
        for name, value in attrs.items():
            _adios_attr(self._io, name, value)
        _adios_attr(self._io, _CHANNEL_ATTR, json.dumps(attrs))


def _decode_step(io: Any, engine: Any, step_in_file: int | None) -> dict[str, Any] | None:
    """The ``__dp_step`` JSON of the current (or ``step_in_file``) step; None if absent."""
    var = io.InquireVariable(_STEP_VAR)
    if not var:
        return None
    if step_in_file is not None:
        # Every step dataplane writes holds this variable, so file and variable steps agree.
        var.SetStepSelection([step_in_file, 1])
    text = engine.Get(var, ab.Mode.Sync)
    return json.loads(text) if text else None


def _read_var(
    t: Any,
    io: Any,
    engine: Any,
    name: str,
    spec: VarSpec,
    selection: Selection,
    step_in_file: int | None,
) -> np.ndarray:
    count = tuple(selection.count)
    if spec.size == 0 or 0 in count:
        return np.empty(count, spec.dtype)
    var = io.InquireVariable(name)
    if not var:
        raise DataplaneError(f"{t.url.url}: variable {name!r} is missing from the file")
    stored: np.dtype = _STORED_AS.get(spec.dtype, spec.dtype)
    if step_in_file is not None:
        var.SetStepSelection([step_in_file, 1])
    if spec.ndim == 0:
        out = np.empty(1, stored)
        engine.Get(var, out, ab.Mode.Sync)
        return out.view(spec.dtype).reshape(())
    var.SetSelection([list(selection.start), list(count)])
    out = np.empty(count, stored)
    engine.Get(var, out, ab.Mode.Sync)
    return out.view(spec.dtype)


def _foreign_meta(io: Any, index: int) -> dict[str, Any]:
    """Metadata for a step of a file dataplane did not write: its variables as they are."""
    info: dict[str, Any] = {"i": index, "a": {}, "c": {}, "v": {}}
    for name, desc in io.AvailableVariables().items():
        kind = _ADIOS_TYPES.get(desc.get("Type", ""))
        if kind is None or name.startswith("__dp"):
            continue
        shape = (
            [int(n) for n in desc.get("Shape", "").replace(",", " ").split()]
            if desc.get("Shape")
            else []
        )
        info["v"][name] = [np.dtype(kind).str, shape]
    return info


def _holds(info: dict[str, Any], name: str) -> bool:
    """Whether a step put variable ``name`` into ADIOS2 (zero-length arrays are not put, and
    arrays aggregators wrote are in subfiles)."""
    entry = info["v"].get(name)
    joined = name in info.get("j", ())
    return entry is not None and not joined and (not entry[1] or 0 not in entry[1])


def _meta_from(info: dict[str, Any]) -> tuple[StepMeta, dict[str, str]]:
    specs = {name: VarSpec(np.dtype(d), tuple(shape)) for name, (d, shape) in info["v"].items()}
    return StepMeta(int(info["i"]), info["a"], specs), info["c"]


def _channel_attrs(io: Any) -> dict[str, AttrValue]:
    exact = io.InquireAttribute(_CHANNEL_ATTR)
    if exact:
        return json.loads(exact.DataString()[0])
    out: dict[str, AttrValue] = {}  # a file dataplane did not write: its attributes as they are
    for name in io.AvailableAttributes():
        if name.startswith((_STEP_ATTR, "__dp")) or "/" in name:
            continue
        a = io.InquireAttribute(name)
        if a:
            out[name] = _read_attr(a)
    return out
