"""Plain data of dataplane: variable specs, blocks, selections and steps. No I/O.

Everything that checks user input (names, dtypes, arrays, attributes, selections) lives here
so that every transport sees the same rules and the same messages.
"""

from __future__ import annotations

import functools
import math
import re
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from dataplane.errors import DataplaneError, OptionError, SchemaError, VariableNotFoundError

__all__ = [
    "DTYPES",
    "AttrValue",
    "Block",
    "ChannelURL",
    "Selection",
    "Step",
    "StepMeta",
    "VarSpec",
    "as_array",
    "check_attrs",
    "check_dtype",
    "check_name",
    "check_seconds",
    "check_timeout",
]

#: The dtypes a variable may have: booleans and every fixed-size numeric type that numpy,
#: ADIOS2, HDF5 and Zarr all know. Stored in native byte order.
DTYPES: tuple[np.dtype, ...] = tuple(
    np.dtype(t)
    for t in (
        "bool",
        "int8",
        "int16",
        "int32",
        "int64",
        "uint8",
        "uint16",
        "uint32",
        "uint64",
        "float16",
        "float32",
        "float64",
        "complex64",
        "complex128",
    )
)
_DTYPE_SET = frozenset(DTYPES)
_DTYPE_NAMES = ", ".join(d.name for d in DTYPES)

# Names end up as file, group, dataset and segment names: keep them portable and inert. One
# rule for every transport: "__..." is the formats' and dataplane's own (HDF5's __dataplane
# group, ADIOS2's __dp_step), and "*.json" is Zarr's metadata (a variable "zarr.json" would
# overwrite the group's).
_NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]{0,127}\Z")
_RESERVED_PREFIX = "__"
_RESERVED_SUFFIX = ".json"

AttrValue = bool | int | float | str | list[Any]


def check_name(name: object, what: str = "variable") -> str:
    """Return ``name`` if it is safe as a variable, attribute or channel name, else raise."""
    if not isinstance(name, str):
        raise SchemaError(f"{what} names are strings, got {type(name).__name__} {name!r}")
    if (
        not _NAME_RE.match(name)
        or name.startswith(_RESERVED_PREFIX)
        or name.lower().endswith(_RESERVED_SUFFIX)
    ):
        raise SchemaError(
            f"{what} name {name!r} is not safe: use 1 to 128 letters, digits, '_', '-' or '.', "
            f"not starting with '.', '-' or '{_RESERVED_PREFIX}' and not ending in "
            f"'{_RESERVED_SUFFIX}' (names become file and dataset names; those are the "
            f"formats' and dataplane's own)"
        )
    return name


def check_seconds(value: Any, what: str, *, zero: bool = True, _or: str = "") -> float:
    """A number of seconds given as an option: finite and >= 0 (> 0 unless ``zero``). NaN,
    infinities, negatives and non-numbers raise ``OptionError``."""
    try:
        seconds = math.nan if isinstance(value, bool) else float(value)
    except (TypeError, ValueError):
        seconds = math.nan
    if not math.isfinite(seconds) or seconds < 0 or (seconds == 0 and not zero):
        rule = ">= 0" if zero else "> 0"
        raise OptionError(f"{what} must be a finite number of seconds {rule}{_or}, got {value!r}")
    return seconds


_SIZE_UNITS = {"": 1, "B": 1, "K": 1000, "M": 1000**2, "G": 1000**3, "T": 1000**4}
_SIZE_UNITS.update({"KI": 1 << 10, "MI": 1 << 20, "GI": 1 << 30, "TI": 1 << 40})


def parse_size(size: Any, what: str = "a size") -> int:
    """Bytes (> 0) from an int or a string such as ``"4096"``, ``"64KiB"``, ``"40GB"`` or
    ``"1.5G"``: the one size parser of the package (cache capacities, benchmark sizes)."""
    if isinstance(size, (int, np.integer)) and not isinstance(size, bool):
        value = int(size)
    else:
        m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([KMGT]?I?)B?\s*", str(size).upper())
        if not m or isinstance(size, bool):
            raise OptionError(
                f"not a size: {size!r}; write a number of bytes such as 4096, 64KiB or 40GB"
            )
        value = int(float(m.group(1)) * _SIZE_UNITS[m.group(2)])
    if value <= 0:
        raise OptionError(f"{what} must be positive, got {size!r}")
    return value


def check_timeout(value: Any, what: str = "timeout") -> float | None:
    """As :func:`check_seconds`, or None: wait forever."""
    return None if value is None else check_seconds(value, what, _or=" or None (no limit)")


_NATIVE: dict[np.dtype, np.dtype] = {d: d for d in DTYPES}


def check_dtype(dtype: Any, name: str = "?") -> np.dtype:
    """Return the native-byte-order form of ``dtype`` if variables may have it, else raise."""
    if isinstance(dtype, np.dtype):
        known = _NATIVE.get(dtype)
        if known is not None:
            return known
    try:
        dt = np.dtype(dtype)
    except TypeError as exc:
        raise SchemaError(f"variable {name!r}: {dtype!r} is not a dtype") from exc
    native = dt.newbyteorder("=") if dt.byteorder not in ("=", "|") else dt
    if native not in _DTYPE_SET:
        raise SchemaError(
            f"variable {name!r} has dtype {dt}; dataplane stores fixed-size numbers only "
            f"({_DTYPE_NAMES}). Convert it (e.g. strings to attributes, objects to numbers); "
            f"object arrays are refused because they would need pickling."
        )
    result: np.dtype = np.dtype(native.name)
    _NATIVE[dt] = result
    return result


def _from_torch(value: Any, name: str) -> np.ndarray:
    # Recognised by module name so that dataplane never imports torch to accept a tensor.
    device = getattr(getattr(value, "device", None), "type", "cpu")
    if device != "cpu":
        raise SchemaError(
            f"variable {name!r} is a torch tensor on {device}; move it to the CPU first "
            f"(tensor.cpu())"
        )
    tensor = value.detach()
    if hasattr(tensor, "resolve_conj"):
        tensor = tensor.resolve_conj().resolve_neg()
    try:
        out: np.ndarray = tensor.numpy()
        return out
    except TypeError as exc:
        raise SchemaError(
            f"variable {name!r} is a torch tensor of dtype {tensor.dtype}, which numpy cannot "
            f"hold; convert it (e.g. tensor.float())"
        ) from exc


def as_array(value: Any, name: str = "?") -> np.ndarray:
    """Turn a numpy array, CPU torch tensor, number or array-like into a checked ndarray.

    The result keeps the caller's memory layout (it may be Fortran-ordered or strided);
    writers copy it into their own layout once. Non-native byte order is converted.
    """
    # (np.ma is imported on first use: 30 ms of a process's first write. A masked array
    # exists only once its module does.)
    if "numpy.ma" in sys.modules and isinstance(value, np.ma.MaskedArray):
        raise SchemaError(
            f"variable {name!r} is a masked array; no transport stores the mask, so its masked "
            f"values would come back as whatever lies under them. Write arr.filled(fill) (and "
            f"the mask as a variable of its own, np.ma.getmaskarray(arr), if readers need it)"
        )
    if isinstance(value, np.ndarray):
        arr = value
    elif type(value).__module__.split(".")[0] == "torch":
        arr = _from_torch(value, name)
    elif isinstance(value, Block):
        raise SchemaError(f"variable {name!r}: a Block cannot hold another Block")
    else:
        try:
            arr = np.asarray(value)
        except (TypeError, ValueError) as exc:
            raise SchemaError(f"variable {name!r}: cannot make an array of {value!r}") from exc
    dt = check_dtype(arr.dtype, name)
    if arr.dtype != dt:
        arr = arr.astype(dt)
    return arr


def _attr_value(value: Any, key: str) -> AttrValue:
    if isinstance(value, np.ndarray):
        if value.ndim > 1:
            raise SchemaError(f"attribute {key!r} is a {value.ndim}-d array; attributes are flat")
        value = value.tolist()
    elif isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        if not -(2**63) <= value < 2**64:
            raise SchemaError(f"attribute {key!r} = {value} does not fit in 64 bits")
        return value
    if isinstance(value, float):
        return value
    if isinstance(value, (list, tuple)):
        items = [_attr_value(v, key) for v in value]
        kinds = {
            bool if isinstance(v, bool) else str if isinstance(v, str) else float for v in items
        }
        if any(isinstance(v, list) for v in items) or len(kinds) > 1:
            raise SchemaError(
                f"attribute {key!r} is a list of mixed or nested values; attribute lists hold "
                f"only numbers, only strings or only booleans"
            )
        return items
    raise SchemaError(
        f"attribute {key!r} has type {type(value).__name__}; attributes are numbers, strings, "
        f"booleans or flat lists of one of them"
    )


def check_attrs(attrs: Mapping[str, Any] | None) -> dict[str, AttrValue]:
    """Return a JSON-safe copy of ``attrs`` (numpy scalars and arrays become Python values)."""
    if attrs is None:
        return {}
    if not isinstance(attrs, Mapping):
        raise SchemaError(f"attributes are a mapping of name to value, got {type(attrs).__name__}")
    return {check_name(k, "attribute"): _attr_value(v, k) for k, v in attrs.items()}


@dataclass(frozen=True)
class VarSpec:
    """A variable's dtype and (global) shape."""

    dtype: np.dtype
    shape: tuple[int, ...]

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @functools.cached_property
    def size(self) -> int:
        return math.prod(self.shape)

    @functools.cached_property
    def nbytes(self) -> int:
        return self.size * self.dtype.itemsize

    def to_json(self) -> list[Any]:
        return [self.dtype.str, list(self.shape)]

    @classmethod
    def from_json(cls, value: Sequence[Any]) -> VarSpec:
        return cls(np.dtype(value[0]), tuple(int(n) for n in value[1]))

    def __repr__(self) -> str:
        return f"VarSpec({self.dtype.name}, {self.shape})"


def _int_tuple(value: Any, what: str) -> tuple[int, ...]:
    if isinstance(value, (int, np.integer)):
        value = (value,)
    try:
        out = tuple(int(v) for v in value)
        ok = all(int(v) == v for v in value)
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise SchemaError(f"{what} must be a sequence of integers, got {value!r}")
    return out


@dataclass(frozen=True)
class Block:
    """A rank's block of a global array: ``data`` placed at ``start`` inside ``shape``."""

    data: Any
    start: tuple[int, ...]
    shape: tuple[int, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "start", _int_tuple(self.start, "Block start"))
        object.__setattr__(self, "shape", _int_tuple(self.shape, "Block shape"))

    def checked(self, name: str) -> tuple[np.ndarray, tuple[int, ...], tuple[int, ...]]:
        """Return (array, start, global shape) after checking that the block fits."""
        arr = as_array(self.data, name)
        if not (len(self.start) == len(self.shape) == arr.ndim):
            raise SchemaError(
                f"variable {name!r}: Block of a {arr.ndim}-d array needs {arr.ndim}-d start and "
                f"shape, got start={self.start} shape={self.shape}"
            )
        for axis, (s, n, g) in enumerate(zip(self.start, arr.shape, self.shape)):
            if s < 0 or g < 0 or s + n > g:
                raise SchemaError(
                    f"variable {name!r}: Block of shape {arr.shape} at {self.start} does not fit "
                    f"in global shape {self.shape} (axis {axis})"
                )
        return arr, self.start, self.shape


@dataclass(frozen=True)
class Selection:
    """A hyperslab: ``count`` elements from ``start`` along each axis."""

    start: tuple[int, ...]
    count: tuple[int, ...]

    @classmethod
    def of(
        cls, shape: Sequence[int], start: Any = None, count: Any = None, *, name: str = "?"
    ) -> Selection:
        """Check a (start, count) request against ``shape``; None means from 0 / to the end."""
        shape = tuple(shape)
        if start is None and count is None:
            return _full_selection(shape)
        st = (0,) * len(shape) if start is None else _int_tuple(start, "start")
        if count is None:
            if len(st) != len(shape):
                raise SchemaError(
                    f"variable {name!r} is {len(shape)}-d (shape {shape}) but start has "
                    f"{len(st)} entries"
                )
            ct = tuple(n - s for n, s in zip(shape, st))
        else:
            ct = _int_tuple(count, "count")
        if len(st) != len(shape) or len(ct) != len(shape):
            raise SchemaError(
                f"variable {name!r} is {len(shape)}-d (shape {shape}); start={st} and "
                f"count={ct} need {len(shape)} entries each"
            )
        for axis, (s, c, n) in enumerate(zip(st, ct, shape)):
            if s < 0 or c < 0 or s + c > n:
                raise SchemaError(
                    f"selection start={st} count={ct} is outside variable {name!r} of shape "
                    f"{shape} (axis {axis}); starts and counts are non-negative and "
                    f"start + count <= shape"
                )
        return cls(st, ct)

    @property
    def slices(self) -> tuple[slice, ...]:
        return tuple(slice(s, s + c) for s, c in zip(self.start, self.count))

    def apply(self, arr: np.ndarray) -> np.ndarray:
        """A view of this selection of ``arr`` (a 0-d array stays an array, not a scalar)."""
        if arr.ndim == 0 or (self.count == arr.shape and not any(self.start)):
            return arr
        return arr[self.slices]

    def covers(self, shape: Sequence[int]) -> bool:
        return all(s == 0 for s in self.start) and tuple(self.count) == tuple(shape)


@functools.lru_cache(maxsize=256)
def _full_selection(shape: tuple[int, ...]) -> Selection:
    return Selection((0,) * len(shape), shape)


@dataclass(frozen=True)
class StepMeta:
    """What a transport says about a step before any array is read."""

    index: int
    attrs: dict[str, AttrValue] = field(default_factory=dict)
    vars: dict[str, VarSpec] = field(default_factory=dict)


class Step:
    """One complete step delivered to a consumer.

    Arrays are read on access through ``get``, a transport's reader bound to this step.
    Transports that hand out zero-copy views make the step invalid once the subscriber
    advances; ``valid`` reports that so a stale step raises instead of returning reused memory.
    """

    __slots__ = ("index", "attrs", "vars", "_get", "_valid", "_channel")

    def __init__(
        self,
        meta: StepMeta,
        get: Callable[[str, Selection], np.ndarray],
        *,
        channel: str = "",
        valid: Callable[[], bool] | None = None,
    ) -> None:
        self.index = meta.index
        self.attrs = meta.attrs
        self.vars = meta.vars
        self._get = get
        self._valid = valid
        self._channel = channel

    def _spec(self, name: str) -> VarSpec:
        if self._valid is not None and not self._valid():
            raise DataplaneError(
                f"step {self.index} of {self._channel} was released when the subscriber moved "
                f"on; its zero-copy arrays may now hold newer data. Copy what you keep "
                f"(np.array(step['u'])) before taking the next step."
            )
        try:
            return self.vars[name]
        except KeyError:
            raise VariableNotFoundError(
                f"variable {name!r} is not in step {self.index} of {self._channel}; "
                f"available: {', '.join(sorted(self.vars)) or '(none)'}"
            ) from None

    def read(self, name: str, start: Any = None, count: Any = None) -> np.ndarray:
        """Return the hyperslab ``start``/``count`` of variable ``name`` (all of it by default)."""
        spec = self._spec(name)
        if start is None and count is None:
            return self._get(name, _full_selection(spec.shape))
        return self._get(name, Selection.of(spec.shape, start, count, name=name))

    def __getitem__(self, name: str) -> np.ndarray:
        return self.read(name)

    def torch(self, name: str, start: Any = None, count: Any = None, *, copy: bool = True) -> Any:
        """Return variable ``name`` as a CPU torch tensor.

        ``copy=False`` shares memory with a zero-copy view; such a tensor must not be modified
        (the memory is mapped read-only) and is only valid until the subscriber advances.
        """
        try:
            import torch
        except ImportError as exc:
            raise DataplaneError(
                "Step.torch() needs PyTorch: pip install 'dataplane[torch]'"
            ) from exc
        arr = self.read(name, start, count)
        if copy:
            return torch.from_numpy(np.array(arr, order="C"))
        if arr.flags.writeable:
            return torch.from_numpy(arr)
        import warnings

        with warnings.catch_warnings():
            # torch warns that the array is read-only; the docstring says so too.
            warnings.simplefilter("ignore", UserWarning)
            return torch.from_numpy(arr)

    def keys(self) -> list[str]:
        return list(self.vars)

    def __contains__(self, name: object) -> bool:
        return name in self.vars

    def __iter__(self) -> Iterator[str]:
        return iter(self.vars)

    def __len__(self) -> int:
        return len(self.vars)

    def __repr__(self) -> str:
        return f"Step(index={self.index}, vars={self.vars}, attrs={self.attrs})"


_SCHEME_RE = re.compile(r"([a-z][a-z0-9]*)(?:\+([a-z][a-z0-9\-]*))?\Z")


@dataclass(frozen=True)
class ChannelURL:
    """A parsed channel URL: ``scheme[+protocol]://path[?key=value&...]``."""

    url: str
    scheme: str
    protocol: str | None
    path: str
    query: dict[str, str]

    @classmethod
    def parse(cls, url: str) -> ChannelURL:
        from urllib.parse import parse_qsl

        from dataplane.errors import OptionError

        if not isinstance(url, str) or "://" not in url:
            raise OptionError(
                f"{url!r} is not a channel URL; write scheme://path, e.g. shm://run1 or "
                f"bp5://out/run.bp"
            )
        head, rest = url.split("://", 1)
        m = _SCHEME_RE.match(head)
        if not m:
            raise OptionError(
                f"{url!r}: scheme {head!r} is not valid; schemes are lower-case letters and "
                f"digits, optionally '+protocol' (zarr+s3://...)"
            )
        path, _, qs = rest.partition("?")
        if not path:
            raise OptionError(f"{url!r} names no channel or path after '://'")
        query: dict[str, str] = {}
        if qs:
            try:
                pairs = parse_qsl(qs, keep_blank_values=True, strict_parsing=True)
            except ValueError as exc:
                raise OptionError(f"{url!r}: cannot parse the query {qs!r}: {exc}") from None
            for k, v in pairs:
                if k in query:
                    raise OptionError(f"{url!r}: option {k!r} is given twice")
                query[k] = v
        return cls(url, m.group(1), m.group(2), path, query)
