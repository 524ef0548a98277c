"""The transport contract.

A transport moves steps of named arrays for one URL scheme. It implements a handful of
primitives (the abstract methods of :class:`Writer`, :class:`Reader` and, for stored data,
:class:`Archive`); ``dataplane.api`` derives everything users see from them: validation,
policies, asynchronous publishing, statistics, selections.

What the core may rely on:

- ``Writer.begin_step`` receives every variable's spec and the step's attributes up front,
  then ``put`` is called once per variable, then ``end_step`` publishes the step atomically.
  ``abort_step`` discards a step that was begun; nothing of it may become visible.
- Arrays given to ``put`` have a dtype from ``model.DTYPES`` in native byte order but may be
  Fortran-ordered, strided or zero-sized: the transport makes its own copy in its own layout.
- ``Reader.next_step`` returns the next complete step's metadata, ``None`` once the writer has
  closed and every step was delivered, raises ``StepTimeoutError`` when ``timeout`` expires and
  ``ChannelBroken`` when the writer is gone. ``Reader.get`` reads from the current step only.
- Capabilities are class attributes, so the core and the conformance tests ask rather than probe.
"""

from __future__ import annotations

import functools
import inspect
import typing
from abc import ABC, abstractmethod
from typing import Any, ClassVar, NamedTuple

import numpy as np

from dataplane.errors import DataplaneError, OptionError, UnknownOptionError
from dataplane.model import AttrValue, ChannelURL, Selection, StepMeta, VarSpec

__all__ = ["POLICIES", "Archive", "Located", "Reader", "Transport", "Writer"]

#: Writer policies: lossless with back-pressure, or never wait and drop the oldest steps.
POLICIES = ("block", "drop-oldest")

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def option_kinds(default: Any, hint: Any) -> tuple[type, ...]:
    """The plain types an option takes, from its default and its (evaluated) annotation:
    ``str | int | None`` gives (str, int); ``Any`` or no annotation gives ()."""
    kinds: list[type] = [] if default is None else [type(default)]
    for t in typing.get_args(hint) or (hint,):
        if t in (bool, int, float, str) and t not in kinds:
            kinds.append(t)
    return tuple(kinds)


def coerce_option(name: str, raw: str, kinds: tuple[type, ...]) -> Any:
    """Turn a ``?key=value`` string into one of ``kinds``: a number or a boolean where the
    option takes one and the text is one, else the text where it takes text. Options of no
    declared type (``Any``) take numbers as numbers and the rest as text."""
    candidates = [k for k in (bool, int, float) if k in kinds] if kinds else [int, float]
    for kind in candidates:
        if kind is bool:
            low = raw.lower()
            if low in _TRUE | _FALSE:
                return low in _TRUE
            continue
        try:
            return kind(raw)
        except ValueError:
            continue
    if not kinds or str in kinds:
        return raw
    want = " or ".join(k.__name__ for k in kinds)
    raise OptionError(f"option {name}={raw!r} in the URL is not a valid {want}")


_DECLARED: dict[type, tuple[dict[str, inspect.Parameter], dict[str, Any]]] = {}


def _declared(cls: type) -> tuple[dict[str, inspect.Parameter], dict[str, Any]]:
    """A transport class's options (keyword-only parameters of ``__init__``) and their
    evaluated annotations, looked up once per class (60 us a call: every ``open``)."""
    got = _DECLARED.get(cls)
    if got is None:
        init = cls.__dict__.get("__init__") or getattr(cls, "__init__")  # noqa: B009
        params = {
            p.name: p
            for p in inspect.signature(init).parameters.values()
            if p.kind is inspect.Parameter.KEYWORD_ONLY
        }
        try:
            hints = typing.get_type_hints(init)
        except Exception:  # an annotation that names what is imported only for type checkers
            hints = {}
        got = _DECLARED[cls] = (params, hints)
    return got


class Located(NamedTuple):
    """Where a stored step's variable lies in its file: raw C-order bytes of ``dtype`` and
    ``shape`` from byte ``offset``, with the checksums a read is verified against (``stored``;
    None: reads are not verified). What :meth:`Archive.locate` gives, for readers of many files
    that would otherwise open each with its format library; plain data (JSON-able as a list)."""

    offset: int
    dtype: str
    shape: tuple[int, ...]
    stored: Any


class Transport:
    """One channel (a URL) of one scheme, with its options; opens writers and readers.

    Subclasses declare their options as keyword-only parameters of ``__init__`` (after
    ``url``); :meth:`from_url` checks user options against that signature. Instances pickle as
    "how to reopen": the URL and options, never an open handle.
    """

    scheme: ClassVar[str] = ""
    #: Where the channel can be reached from: "process", "node" or "network" (an instance may
    #: narrow it, e.g. a store in one process's memory).
    scope: str = "process"
    #: Steps are stored and can be read in any order (files), not only followed live.
    supports_random_access: ClassVar[bool] = False
    #: A subscriber can follow steps while the writer is still writing.
    supports_live_read: ClassVar[bool] = True
    #: ``policy="drop-oldest"`` is meaningful (streams); files are always lossless.
    supports_drop_policy: ClassVar[bool] = False
    #: Readers get views of shared memory instead of copies.
    supports_zero_copy: ClassVar[bool] = False
    #: A writer and readers of one channel may live in one process.
    same_process_pairs: ClassVar[bool] = True
    #: A subscriber that joins late can replay what a stream still keeps (start="first").
    supports_replay: ClassVar[bool] = False
    #: MPI ranks may write their blocks of a step straight into the channel (``put_block``)
    #: between the root writer's ``begin_ranked`` and ``end_ranked`` (its writer is then a
    #: :class:`RankedWriter`); see :mod:`dataplane.parallel`. An instance may narrow it.
    supports_rank_writes: bool = False
    #: The root writer can take a ranked step's blocks in pieces (``put_region`` between
    #: ``begin_ranked`` and ``end_ranked``) that the ranks send it: no process holds the
    #: global step (:meth:`dataplane.parallel.Collective.relay`).
    aggregates: bool = False
    #: With ``aggregators=K > 1``, each group's aggregator writes its group's blocks into a
    #: subfile of its own (:meth:`subfile`), which the channel joins (see
    #: :mod:`dataplane.parallel.aggregators`).
    subfiles: bool = False
    #: The URL may name an fsspec protocol (``zarr://s3://bucket/run.zarr``).
    accepts_protocol: ClassVar[bool] = False

    def mpio(self) -> bool:
        """Whether MPI ranks can write this channel together through MPI-IO (an MPI-enabled
        format library), each its own blocks: see :mod:`dataplane.parallel.mpio`."""
        return False

    def mpio_writer(self, comm: Any, mode: str) -> Any:
        """The channel's writer on every rank of ``comm`` (collective; ``mpio`` only)."""
        raise OptionError(f"{self.scheme}:// is not written through MPI-IO")

    def subfile_name(self, token: str, group: int) -> str:
        """Group ``group``'s subfile, relative to the channel's folder (``group=-1``: the
        channel's own file); ``subfiles`` only."""
        raise OptionError(f"{self.scheme}:// does not write subfiles")

    def subfile(self, name: str, specs: dict[str, VarSpec], append: bool) -> Any:
        """An aggregator's subfile (see :meth:`subfile_name`), new or, with ``append``, the
        one there; ``subfiles`` only."""
        raise OptionError(f"{self.scheme}:// does not write subfiles")

    def put_subfile_region(
        self, sub: Any, name: str, start: tuple[int, ...], block: np.ndarray
    ) -> Any:
        """Write a piece of the step begun in ``sub``; its checksum record."""
        raise OptionError(f"{self.scheme}:// does not write subfiles")

    @classmethod
    def read_located(
        cls, fd: int, at: Located, first: int, rows: int, out: np.ndarray | None = None
    ) -> np.ndarray | None:
        """Rows ``first:first+rows`` (axis 0) of the array ``at`` describes, read from ``fd``
        (into ``out`` if given: C-contiguous, of the rows' shape) and verified; None where
        this cannot vouch for them (the file ends early, the bytes do not match their
        checksums, or the scheme has no such reads): the caller then reads them through the
        archive, which says what is wrong."""
        return None

    @classmethod
    def steps_ahead(cls, queue_limit: int) -> int:
        """How many steps a writer under ``policy="block"`` can be ahead of a subscriber that
        holds one step and reads no further (what ``queue_limit`` bounds, plus any buffering
        the transport has in between)."""
        return queue_limit

    def __init_subclass__(cls, **kwargs: Any) -> None:
        # Each transport declares its options once, as keyword-only parameters of __init__:
        # they are recorded here (for pickling and get_config), not echoed to the base.
        super().__init_subclass__(**kwargs)
        init = cls.__dict__.get("__init__")
        if init is None:
            return

        @functools.wraps(init)
        def __init__(self: Transport, url: ChannelURL, *args: Any, **options: Any) -> None:
            if "options" not in self.__dict__:  # the outermost __init__ has them all
                self.options = dict(options)
            init(self, url, *args, **options)

        cls.__init__ = __init__  # type: ignore[method-assign]

    def __init__(self, url: ChannelURL, **options: Any) -> None:
        self.url = url
        self.options: dict[str, Any] = self.__dict__.get("options", options)

    @classmethod
    def from_url(cls, url: ChannelURL, options: dict[str, Any]) -> Transport:
        """Build the transport from a parsed URL and keyword options, checking every option."""
        params, hints = _declared(cls)
        merged: dict[str, Any] = {}
        for key, raw in url.query.items():
            p = params.get(key)
            if p is None:
                raise cls._unknown(key, params)
            merged[key] = coerce_option(key, raw, option_kinds(p.default, hints.get(key)))
        for key, value in options.items():
            if key not in params:
                raise cls._unknown(key, params)
            if key in merged and merged[key] != value:
                raise OptionError(
                    f"option {key!r} is given both in the URL ({merged[key]!r}) and as a "
                    f"keyword ({value!r}); give it once"
                )
            merged[key] = value
        return cls(url, **merged)

    @classmethod
    def _unknown(cls, key: str, params: dict) -> UnknownOptionError:
        known = ", ".join(sorted(params)) or "none"
        return UnknownOptionError(
            f"{cls.scheme}:// does not take option {key!r}; its options are: {known}"
        )

    def __reduce__(self):
        return (type(self).from_url, (self.url, dict(self.options)))

    def get_config(self) -> dict[str, Any]:
        """JSON-safe description of what this transport is, for logs and benchmarks."""
        return {
            "scheme": self.scheme,
            "url": self.url.url,
            "options": {k: v for k, v in self.options.items() if _json_safe(v)},
        }

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.url.url!r})"

    # -- what a transport implements -------------------------------------------------------
    def open_writer(self, *, policy: str, queue_limit: int, mode: str) -> Writer:
        raise DataplaneError(f"{self.scheme}:// cannot be written")

    def open_reader(self, *, start: str, vars: tuple[str, ...] | None) -> Reader:
        raise DataplaneError(f"{self.scheme}:// cannot be subscribed to")

    def put_block(
        self, row: int, name: str, start: tuple[int, ...], block: np.ndarray
    ) -> dict[str, Any]:
        """Write ``block`` at ``start`` of variable ``name`` in the step at ``row``, from any
        rank, after the root began that step; returns its block checksums
        (``supports_rank_writes`` only)."""
        raise OptionError(f"{self.scheme}:// does not take blocks from several ranks")

    def open_archive(self) -> Archive:
        raise DataplaneError(
            f"{self.url.url} is a stream: its steps are not stored, so it cannot be opened for "
            f"random access. Use dataplane.subscribe() to follow it, or record it into a file "
            f"transport with `dataplane convert`."
        )


def _json_safe(value: Any) -> bool:
    return value is None or isinstance(value, (bool, int, float, str, list, dict, tuple))


class Writer(ABC):
    """The writing end of a channel. Not thread-safe; one per channel at a time."""

    #: Index of the next step (greater than zero when appending to stored data).
    next_index: int = 0

    def known_vars(self) -> dict[str, VarSpec]:
        """Variables already in the channel (append mode), so dtypes stay consistent."""
        return {}

    @abstractmethod
    def begin_step(
        self, index: int, specs: dict[str, VarSpec], attrs: dict[str, AttrValue]
    ) -> None:
        """Start step ``index`` holding exactly ``specs``; may wait under ``policy="block"``."""

    @abstractmethod
    def put(self, name: str, array: np.ndarray) -> None:
        """Copy ``array`` (any layout) as variable ``name`` of the current step."""

    @abstractmethod
    def end_step(self) -> None:
        """Make the current step visible to readers, all at once."""

    @abstractmethod
    def abort_step(self) -> None:
        """Discard the current step; readers never see any of it."""

    def write_step(
        self,
        index: int,
        specs: dict[str, VarSpec],
        arrays: list[tuple[str, np.ndarray]],
        attrs: dict[str, AttrValue],
    ) -> None:
        """Write a whole step: begin, put each array, end; aborted on any error. Transports
        whose steps cost microseconds fuse these."""
        self.begin_step(index, specs, attrs)
        try:
            for name, arr in arrays:
                self.put(name, arr)
            self.end_step()
        except BaseException:
            self.abort_step()
            raise

    @abstractmethod
    def set_attrs(self, attrs: dict[str, AttrValue]) -> None:
        """Replace the channel-level attributes."""

    @abstractmethod
    def close(self, failed: bool = False) -> None:
        """End the channel. ``failed`` marks it broken: readers get ``ChannelBroken`` after the
        steps that completed. Must be idempotent."""


class RankedWriter(Writer):
    """The writer of a channel that MPI ranks write into (``supports_rank_writes``): the root
    begins a step, every rank writes its blocks with ``Transport.put_block``, the root commits
    it with their checksums."""

    @abstractmethod
    def begin_ranked(
        self,
        index: int,
        specs: dict[str, VarSpec],
        attrs: dict[str, AttrValue],
        chunks: dict[str, tuple[int, ...]],
        layout: dict[str, Any] | None = None,
    ) -> int:
        """Begin a step whose arrays the ranks write (``chunks`` fixes the chunking of arrays
        created now; ``layout``, read when the channel's arrays are created: ``written_by``,
        how it is written, for ``inspect``, and ``sources``, arrays that aggregators write
        into subfiles); returns the step's row in the store."""

    def written_by(self) -> dict[str, Any] | None:
        """How the stored channel's steps were written, if it says (an append continues it)."""
        return None

    @abstractmethod
    def chunks_of(self, name: str) -> tuple[int, ...] | None:
        """The chunk shape of a variable's array (without the step axis), if it has one."""

    @abstractmethod
    def end_ranked(self, blocks: dict[str, list]) -> None:
        """Commit a ranked step: ``blocks`` holds each variable's block checksums."""

    def put_region(self, name: str, start: tuple[int, ...], block: np.ndarray) -> Any:
        """Write ``block`` at ``start`` of variable ``name`` in the ranked step begun here
        (``Transport.aggregates`` only); returns its checksum record."""
        raise OptionError("this channel's writer takes no blocks from other ranks")


class Reader(ABC):
    """The reading end of a channel, for one subscriber. Not thread-safe."""

    #: Index of the first step owed to this subscriber, once known; steps missing between it
    #: and the first delivered one count as dropped.
    first_index: int | None = None

    @abstractmethod
    def next_step(self, timeout: float | None) -> StepMeta | None:
        """Release the current step and return the next one; ``None`` at end of stream."""

    @abstractmethod
    def get(self, name: str, selection: Selection) -> np.ndarray:
        """Read ``selection`` of variable ``name`` from the current step."""

    def attrs(self) -> dict[str, AttrValue]:
        """Channel-level attributes as last published."""
        return {}

    @abstractmethod
    def close(self) -> None:
        """Leave the channel. Must be idempotent."""


class Archive(ABC):
    """Stored steps, readable in any order."""

    @abstractmethod
    def __len__(self) -> int: ...

    @abstractmethod
    def meta(self, index: int) -> StepMeta:
        """Metadata of step ``index`` (0 <= index < len)."""

    @abstractmethod
    def get(self, index: int, name: str, selection: Selection) -> np.ndarray:
        """Read ``selection`` of variable ``name`` of step ``index``."""

    def attrs(self) -> dict[str, AttrValue]:
        return {}

    def version(self, index: int) -> str | None:
        """A string that changes whenever the content of step ``index`` does (e.g. its
        checksums), or None when the format records nothing of the kind. Caches key on it."""
        return None

    def written_by(self) -> dict[str, Any] | None:
        """How MPI ranks wrote the channel (ranks, method, files), where it records that."""
        return None

    def locate(self, index: int) -> dict[str, Located] | None:
        """Where each variable of step ``index`` lies as raw bytes in the channel's one file,
        or None unless every one does (see :class:`Located`)."""
        return None

    def vars(self) -> dict[str, VarSpec]:
        """Every variable with its spec in the last step that holds it."""
        out: dict[str, VarSpec] = {}
        for i in range(len(self)):
            out.update(self.meta(i).vars)
        return out

    @abstractmethod
    def close(self) -> None: ...
