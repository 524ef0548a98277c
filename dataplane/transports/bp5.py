"""``bp5://path/run.bp``: ADIOS2 BP5 files (``sst://`` streams share the step encoding).

Mapping (what plain adios2 sees)
    Steps are ADIOS2 steps, variables are ADIOS2 variables (0-d arrays are single values),
    channel attributes are ADIOS2 attributes of the same name, and the attributes of the
    current step are ADIOS2 attributes named ``step/<name>``. Each step also holds a string
    variable ``__dp_step``: JSON with the step index, the step attributes exactly as given,
    each variable's dtype and shape and its xxh3 checksum. It is written last, so a step
    without it (a writer that died or failed inside the step) is never delivered.

What ADIOS2 cannot hold, and how dataplane handles it
    ``bool`` and ``float16`` variables are stored as ``uint8`` and ``uint16`` (plain readers
    see those; dataplane restores the dtype). Fortran-ordered and strided arrays are copied to
    C order first (the PyPI adios2 writes them wrong without an error). Zero-length arrays are
    not put at all (reading them back fails in adios2); their shape is in ``__dp_step``.

Writers use deferred puts with statistics off (``StatsLevel=0``), about three times faster
than the defaults; ``params`` adds or overrides engine parameters. Readers start one thread
each (``Threads``; BP5 would start up to 16, too many inside DataLoader workers).

BP5 options: ``verify``, ``heartbeat`` (as for every file transport), ``params`` (dict or
JSON), ``threads``, ``operator`` (an ADIOS2 operator such as ``"blosc"`` or ``"bzip2"``,
where the build has it) with ``operator_params``.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import json
import os
import shutil
import struct
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from dataplane.errors import IntegrityError, OptionError
from dataplane.model import AttrValue, ChannelURL, Selection, StepMeta, VarSpec
from dataplane.transports import _bp5meta
from dataplane.transports._adios_steps import (
    _STEP_VAR,
    _ADIOSTransport,
    _channel_attrs,
    _decode_step,
    _define_operator,
    _foreign_meta,
    _holds,
    _io_name,
    _meta_from,
    _params,
    _read_var,
    _StepEncoder,
    ab,
)
from dataplane.transports._bp5join import Joined, Subfile, subfile_name
from dataplane.transports._files import (
    END,
    FormatWriter,
    LeaseIO,
    Seen,
    StepSource,
    StepStream,
    storage_errors,
)

__all__ = ["BP5Transport"]

#: How MPI ranks wrote the channel (``written_by``, JSON), an ADIOS2 attribute of its file.
_WRITTEN_BY = "__dp/written_by"


class BP5Transport(_ADIOSTransport):
    scheme = "bp5"
    engine = "BP5"
    aggregates = True
    subfiles = True

    def __init__(
        self,
        url: ChannelURL,
        *,
        verify: bool = True,
        heartbeat: float = 1.0,
        params: dict[str, Any] | str | None = None,
        threads: int = 1,
        operator: str | None = None,
        operator_params: dict[str, Any] | str | None = None,
    ) -> None:
        super().__init__(url)
        self._options: dict[str, Any] = {
            "verify": verify,
            "heartbeat": heartbeat,
            "params": params,
            "threads": threads,
            "operator": operator,
            "operator_params": operator_params,
        }
        self._init_common(verify, heartbeat)
        self.path = os.path.abspath(os.path.expanduser(url.path))
        self.params = _params(params)
        self.threads = int(threads)
        if self.threads < 1:
            raise OptionError(f"threads must be at least 1, got {threads}")
        self.operator = operator
        self.operator_params = _params(operator_params)
        if operator:
            _define_operator(self._adios(), operator, self.operator_params)  # fail at open

    def lease_io(self) -> LeaseIO:
        return LeaseIO(self.path.rstrip("/") + ".lease")

    # -- subfiles (aggregators=K: see ._bp5join) ----------------------------------------------
    def subfile_name(self, token: str, group: int) -> str:
        if group < 0:
            return os.path.basename(self.path)
        return subfile_name(self.path, token, group)

    def sibling(self, path: str) -> BP5Transport:
        """The same options over another BP5 file (a subfile of this channel)."""
        return BP5Transport(ChannelURL.parse(f"bp5://{path}"), **self._options)

    def subfile(self, name: str, specs: dict[str, VarSpec], append: bool) -> Subfile:
        path = os.path.join(os.path.dirname(self.path), name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        writer = storage_errors(lambda: _BP5Writer(self.sibling(path), "a" if append else "w"))
        return Subfile(writer, specs)

    def put_subfile_region(
        self, sub: Any, name: str, start: tuple[int, ...], block: np.ndarray
    ) -> Any:
        return storage_errors(lambda: sub.put(name, start, block))

    def joined(self) -> Joined:
        """A reader of the arrays this channel's aggregators wrote into subfiles."""
        return Joined(os.path.dirname(self.path), self.url.url, self._subfile_source)

    def _subfile_source(self, path: str) -> _BP5Source:
        sub = self.sibling(path)
        if not sub._ready():
            raise IntegrityError(
                f"{self.url.url}: its subfile {os.path.relpath(path, os.path.dirname(self.path))} "
                f"is missing: a channel written with aggregators is its file and its .agg "
                f"folder together. Move or copy both."
            )
        return _BP5Source(sub)

    def format_writer(self, mode: str) -> FormatWriter:
        return _BP5Writer(self, mode)

    def _ready(self) -> bool:
        return all(os.path.exists(os.path.join(self.path, name)) for name in _bp5meta.FILES)

    def _empty(self) -> bool:
        """No step ever reached the file (a writer opened it and wrote none yet, or died)."""
        return os.path.getsize(os.path.join(self.path, "md.idx")) == 0

    def format_source(self, seen: Seen | None = None) -> StepSource | None:
        return _BP5Source(self) if self._ready() else None

    def format_stream(self, vars: tuple[str, ...] | None) -> StepStream | None:
        return _BP5Stream(self) if self._ready() else None


_METADATA_ROOM = 4 << 20  # what a BP5 step's metadata and the file's close may need on disk


class _BP5Writer(FormatWriter):
    def __init__(self, t: BP5Transport, mode: str) -> None:
        self._t = t
        self._known: dict[str, VarSpec] = {}
        self._attrs: dict[str, AttrValue] = {}
        self._pending: dict[str, Any] | None = None
        self._written_by: dict[str, Any] | None = None  # as the committed steps say
        self._defined: dict[str, Any] | None = None  # as this engine's IO says
        # NOTE: appending to a file no step ever reached (its writer died right after opening
        # it) crashes ADIOS2 (a segmentation fault): such a file is begun anew.
        append = mode == "a" and t._ready() and not t._empty()
        if append:
            _bp5meta.Checker(t.path, t.url.url).check()  # ADIOS2 would crash on damage
            _bp5meta.cut_incomplete(t.path)  # what a writer killed inside a step left
            source = _BP5Source(t)
            n = source.refresh()
            self.next_index = source.last_index() + 1 if n else 0
            self._known = source.all_vars()
            self._written_by = source.written_by(whole=True)
            source.close()
        else:
            # A new channel in its place: the old one's subfiles go with it.
            for old in glob.glob(os.path.join(glob.escape(t.path.rstrip("/")) + ".agg", "*.bp")):
                shutil.rmtree(old, ignore_errors=True)
        os.makedirs(os.path.dirname(t.path) or ".", exist_ok=True)
        self._engine: Any = None
        self._open(ab.Mode.Append if append else ab.Mode.Write)
        self._log = _bp5meta.MetaLog(t.path, fresh=not append)

    def _open(self, adios_mode: Any) -> None:
        t = self._t
        self._ad = t._adios()
        self._io = self._ad.DeclareIO(_io_name("write"))
        self._io.SetEngine("BP5")
        self._io.SetParameters({"StatsLevel": "0", **t.params})
        operator = _define_operator(self._ad, t.operator, t.operator_params) if t.operator else None
        self._engine = self._io.Open(t.path, adios_mode)
        self._enc = _StepEncoder(t, self._io, self._engine, operator=operator)
        if self._attrs:
            self._enc.channel_attrs(self._attrs, {})

    def known_vars(self) -> dict[str, VarSpec]:
        return dict(self._known)

    def written_by(self) -> dict[str, Any] | None:
        return None if self._written_by is None else dict(self._written_by)

    def begin(self, index: int, specs: dict[str, VarSpec], attrs: dict[str, AttrValue]) -> None:
        # Nothing touches ADIOS2 until commit: an aborted step leaves no trace.
        self._pending = {"index": index, "attrs": attrs, "arrays": []}

    def begin_ranked(
        self,
        index: int,
        specs: dict[str, VarSpec],
        attrs: dict[str, AttrValue],
        chunks: dict[str, tuple[int, ...]],
        layout: dict[str, Any] | None = None,
    ) -> int:
        """A step whose arrays MPI ranks send in pieces (``put_region``): the ADIOS2 step opens
        now and each piece is written out as it comes, so the writer never holds the global
        step. An aborted one is cut from the metadata (:meth:`_fail`), as a failed step is."""
        need = sum(s.size * s.dtype.itemsize for s in specs.values())
        self._check_room(index, need)
        if self._engine is None:
            self._open(ab.Mode.Append)  # the last step failed: continue after the ones before
        self._pending = {"index": index, "attrs": attrs, "arrays": [], "specs": specs}
        if layout and layout.get("sources"):
            # Arrays that aggregators write into subfiles: the record says where each block is.
            self._pending["join"] = layout["sources"]
        try:
            self._enc.begin()
            if layout and "written_by" in layout and layout["written_by"] != self._defined:
                self._enc.attribute(_WRITTEN_BY, json.dumps(layout["written_by"]))
                self._defined = self._pending["written_by"] = dict(layout["written_by"])
        except BaseException:
            self._fail()
            raise
        return index

    def put_region(self, name: str, start: tuple[int, ...], block: np.ndarray) -> None:
        p = self._pending
        assert p is not None and "specs" in p
        self._enc.put_piece(name, p["specs"][name], start, block)

    def put(self, name: str, array: np.ndarray) -> None:
        assert self._pending is not None
        self._pending["arrays"].append((name, array))
        if "specs" in self._pending:
            self._enc.put_whole(name, array)  # the step is open (ranked)

    def commit(
        self, checksums: Callable[[], dict[str, Any]], extra: dict[str, Any] | None = None
    ) -> None:
        """End the step; ``extra``: more for a ranked step's record (a subfile's ``held``)."""
        p = self._pending
        assert p is not None
        self._pending = None
        if "specs" in p:
            try:
                record = {**({"j": p["join"]} if "join" in p else {}), **(extra or {})}
                self._enc.end(p["index"], p["attrs"], p["specs"], checksums, record)
            except BaseException:
                self._fail()
                raise
            self._log.record()
            self._written_by = p.get("written_by", self._written_by)
            return
        self._check_space(p)
        p["sums"] = checksums
        if self._engine is None:
            self._open(ab.Mode.Append)  # the last step failed: continue after the ones before
        try:
            self._enc.write(p["index"], p)
        except BaseException:
            self._fail()
            raise
        self._log.record()

    def _fail(self) -> None:
        """A step failed inside ADIOS2 (an I/O error, a file size limit, a quota): its engine
        cannot go on, and what it left in the metadata would make the file unreadable. Close
        it and cut the metadata back to the last complete step; the next step reopens."""
        engine, self._engine = self._engine, None
        self._defined = None  # the next engine's IO defines its attributes anew
        with contextlib.suppress(Exception):
            engine.Close()
        self._log.cut_back()

    def _check_space(self, pending: dict[str, Any]) -> None:
        """Refuse a step the disk has no room for, before ADIOS2 sees it.

        # NOTE: ADIOS2 does not survive a full disk: it loses the step's metadata, the file no
        # longer opens, and its engine aborts the process at exit. So dataplane checks first:
        # the step's bytes (uncompressed: an operator only makes it smaller) plus room for its
        # metadata and the close. Something else filling the disk at the same moment can still
        # beat the check.
        """
        self._check_room(pending["index"], sum(a.nbytes for _, a in pending["arrays"]))

    def _check_room(self, index: int, nbytes: int) -> None:
        need = nbytes + _METADATA_ROOM
        try:
            st = os.statvfs(self._t.path)
        except OSError:
            return  # not a local path we can ask (ADIOS2 reports its own errors)
        free = st.f_bavail * st.f_frsize
        if free < need:
            raise OSError(
                errno.ENOSPC,
                f"{free} bytes free where step {index} needs {need} with room for "
                f"its metadata (checked before writing: ADIOS2 does not survive a full disk)",
            )

    def abort(self) -> None:
        p, self._pending = self._pending, None
        if p is not None and "specs" in p and self._engine is not None:
            self._fail()  # its ADIOS2 step is open: cut it from the metadata

    def set_attrs(self, attrs: dict[str, AttrValue]) -> None:
        if self._engine is not None:
            self._enc.channel_attrs(attrs, self._attrs)
        self._attrs = dict(attrs)

    def close(self) -> None:
        if self._engine is not None:
            self._engine.Close()


def _data_extents(path: str) -> tuple[list[int], list[list[int]]] | None:
    """From a BP5 ``md.idx``: the subfile of each writer and where each step's data starts in it.

    None when the index cannot be parsed (another BP version): the check is then skipped.
    """
    try:
        with open(os.path.join(path, "md.idx"), "rb") as f:
            data = f.read()
        pos, writers, rank_to_sub, starts = 64, 1, [0], []
        while pos + 9 <= len(data):
            kind = data[pos : pos + 1]
            (length,) = struct.unpack_from("<Q", data, pos + 1)
            if pos + 9 + length > len(data):
                break  # a record still being written
            vals = struct.unpack_from(f"<{length // 8}Q", data, pos + 9)
            if kind == b"w":
                writers = vals[0]
                rank_to_sub = list(vals[3 : 3 + writers])
            elif kind == b"s":
                per = 2 * vals[2] + 1  # flushes: (position, size) pairs, then the final position
                starts.append([vals[3 + w * per] for w in range(writers)])
            else:
                return None
            pos += 9 + length
        return rank_to_sub, starts
    except (OSError, struct.error):
        return None


def _truncated(path: str, step: int, least: dict[int, int]) -> bool:
    """True when the data of ``step`` (its number in the file) reaches past the end of a subfile.

    ADIOS2 waits forever for bytes a truncated file does not have, so readers ask this first.
    ``least`` maps step numbers to the bytes their arrays take (0 for steps without arrays).
    A step is whole if a later step holding arrays starts inside the file (data is written in
    order); otherwise its own arrays must fit between its start and the end of the file.
    """
    if least.get(step, 0) == 0:
        return False  # nothing of this step is in the data files
    extents = _data_extents(path)
    if extents is None or step >= len(extents[1]):
        return False
    rank_to_sub, starts = extents
    for w, start in enumerate(starts[step]):
        sub = rank_to_sub[w] if w < len(rank_to_sub) else 0
        try:
            size = os.path.getsize(os.path.join(path, f"data.{sub}"))
        except OSError:
            return True
        later = next((j for j in range(step + 1, len(starts)) if least.get(j, 0) > 0), None)
        if later is not None and starts[later][w] <= size:
            continue
        if start + least.get(step, 0) > size:
            return True
    return False


def _least_bytes(info: dict[str, Any]) -> int:
    # Single values travel in BP5's metadata; arrays are in the data files (or in subfiles).
    if "held" in info:
        return int(info["held"])  # a subfile's step: its group's blocks of the arrays
    joined = info.get("j", {})
    return sum(
        VarSpec(np.dtype(d), tuple(shape)).nbytes
        for name, (d, shape) in info["v"].items()
        if shape and name not in joined
    )


class _ReaderProfile:
    """The profile ADIOS2's BP5 reader (2.10 and later) writes when it closes: always, into
    ``/tmp/<file name>_<pid in hex>_profiling.json``, whatever ``Profile`` says, and never
    removed: one file per process and file read, thousands for a training run whose
    DataLoader workers are new processes every epoch. Removed after the close unless it was
    there before or ``params={"Profile": "On"}`` asked for it."""

    def __init__(self, t: _ADIOSTransport, path: str) -> None:
        name = os.path.basename(os.path.normpath(path))
        self.path = os.path.join("/tmp", f"{name}_{os.getpid():x}_profiling.json")
        wanted = str(t.params.get("Profile", "")).lower() in ("on", "true", "1")
        self.keep = t.engine != "BP5" or wanted or os.path.exists(self.path)

    def closed(self) -> None:
        if not self.keep:
            with contextlib.suppress(FileNotFoundError):
                os.remove(self.path)


class _BP5Source(StepSource):
    """Random access (ReadRandomAccess) to the complete steps of a BP5 file."""

    def __init__(self, t: BP5Transport) -> None:
        self._t = t
        _bp5meta.Checker(t.path, t.url.url).check()  # ADIOS2 crashes on damaged metadata
        self._ad = t._adios()
        self._io = t.reader_io(self._ad)
        self._profile = _ReaderProfile(t, t.path)
        # NOTE: ADIOS2 crashes (a segmentation fault) closing a random-access reader of a
        # file no step ever reached (a writer killed right after opening it): such a file is
        # one with no steps, and ADIOS2 never sees it.
        self._engine = None if t._empty() else self._io.Open(t.path, ab.Mode.ReadRandomAccess)
        self._steps: list[tuple[int, dict[str, Any]]] = []  # (step in file, info)
        self._least: dict[int, int] = {}
        self._present: dict[str, list[int]] = {}
        self._ours = False
        self._joined: Joined | None = None

    def refresh(self) -> int:
        if self._steps or self._engine is None:
            return len(self._steps)
        nsteps = self._engine.Steps()
        ours = self._ours = bool(self._io.InquireVariable(_STEP_VAR))
        for s in range(nsteps):
            info = _decode_step(self._io, self._engine, s) if ours else _foreign_meta(self._io, s)
            if info is not None:
                self._steps.append((s, info))
        self._least = {s: _least_bytes(info) for s, info in self._steps}
        return len(self._steps)

    def last_index(self) -> int:
        return int(self._steps[-1][1]["i"]) if self._steps else -1

    def step_indices(self) -> list[int]:
        """The step index each complete step of the file records, in file order."""
        return [int(info["i"]) for _, info in self._steps]

    def written_by(self, whole: bool = False) -> dict[str, Any] | None:
        a = self._io.InquireAttribute(_WRITTEN_BY)
        if not a:
            return None
        info = dict(json.loads(a.DataString()[0]))
        if whole:
            return info
        return {k: info[k] for k in ("ranks", "method", "aggregators", "files") if k in info}

    def all_vars(self) -> dict[str, VarSpec]:
        out: dict[str, VarSpec] = {}
        for _, info in self._steps:
            out.update(_meta_from(info)[0].vars)
        return out

    def meta(self, index: int) -> tuple[StepMeta, dict[str, str]]:
        meta, sums = _meta_from(self._steps[index][1])
        return StepMeta(index, meta.attrs, meta.vars), sums

    def _relative(self, name: str, step: int) -> int:
        """ReadRandomAccess (and BlocksInfo) count a variable's steps from its first appearance
        in the file, not from the file's first step. Which steps hold a variable is in each
        step's ``__dp_step``; files dataplane did not write are taken to hold every variable in
        every step."""
        if not self._ours:
            return step
        present = self._present.get(name)
        if present is None:
            present = self._present[name] = [s for s, info in self._steps if _holds(info, name)]
        return present.index(step)

    def get(self, index: int, name: str, selection: Selection) -> np.ndarray:
        step, info = self._steps[index]
        spec = _meta_from(info)[0].vars[name]
        if _truncated(self._t.path, step, self._least):
            raise IntegrityError(
                f"{self._t.url.url}: the data of step {index} (variable {name!r} and the rest) "
                f"is cut off: the file was truncated"
            )
        if spec.size == 0:
            return np.empty(tuple(selection.count), spec.dtype)
        boxes = info.get("j", {}).get(name)
        if boxes is not None:
            if self._joined is None:
                self._joined = self._t.joined()
            return self._joined.read(int(info["i"]), name, spec, selection, boxes)
        relative = self._relative(name, step)
        return _read_var(self._t, self._io, self._engine, name, spec, selection, relative)

    def attrs(self) -> dict[str, AttrValue]:
        return _channel_attrs(self._io)

    def close(self) -> None:
        if self._joined is not None:
            self._joined.close()
        if self._engine is not None:
            self._engine.Close()
            self._profile.closed()


class _BP5Stream(StepStream):
    """Follows a BP5 file step by step while it is written (ADIOS2 streaming read)."""

    def __init__(self, t: _ADIOSTransport, target: str | None = None) -> None:
        self._t = t
        # ADIOS2 crashes on damaged metadata: check what the writer logged before it reads
        # any, and again before each step (SST's metadata never touches a disk).
        self._checker = _bp5meta.Checker(t.path, t.url.url) if t.engine == "BP5" else None
        if self._checker is not None:
            self._checker.check()
        self._ad = t._adios()
        self._io = t.reader_io(self._ad)
        self._profile = _ReaderProfile(t, target or t.path)
        self._engine = self._io.Open(target or t.path, ab.Mode.Read)
        self._in_step = False
        self._info: dict[str, Any] | None = None
        self._foreign_index = 0
        self._file_step = -1  # ADIOS2 step number of the current step
        self._poll = 0.002 if t.engine == "SST" else t.poll_interval
        self._joined: Joined | None = None

    def advance(self, wait: float) -> tuple[StepMeta, dict[str, str]] | None:
        if self._in_step:
            self._engine.EndStep()
            self._in_step = False
        deadline = time.monotonic() + wait
        while True:
            # NOTE: the adios2 bindings hold the GIL inside BeginStep, for its whole timeout.
            # Poll without waiting there and sleep here, so other threads keep running.
            if self._checker is not None:
                self._checker.check()
            status = self._engine.BeginStep(ab.StepMode.Read, 0.0)
            if status == ab.StepStatus.EndOfStream:
                return END
            if status != ab.StepStatus.OK:
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                time.sleep(min(left, self._poll))
                continue
            self._in_step = True
            self._file_step += 1
            if self._io.InquireVariable(_STEP_VAR):
                info = _decode_step(self._io, self._engine, None)
            else:
                info = _foreign_meta(self._io, self._foreign_index)
            self._foreign_index += 1
            if info is not None:
                self._info = info
                return _meta_from(info)
            self._engine.EndStep()  # a step without its marker never completed: skip it
            self._in_step = False

    def get(self, name: str, selection: Selection) -> np.ndarray:
        assert self._info is not None
        spec = _meta_from(self._info)[0].vars[name]
        path = getattr(self._t, "path", None)
        least = {self._file_step: _least_bytes(self._info)}
        if path is not None and _truncated(path, self._file_step, least):
            raise IntegrityError(
                f"{self._t.url.url}: the data of step {self._info['i']} (variable {name!r} and "
                f"the rest) is cut off: the file was truncated"
            )
        boxes = self._info.get("j", {}).get(name)
        if boxes is not None and isinstance(self._t, BP5Transport) and spec.size:
            if self._joined is None:
                self._joined = self._t.joined()
            return self._joined.read(int(self._info["i"]), name, spec, selection, boxes)
        return _read_var(self._t, self._io, self._engine, name, spec, selection, None)

    def attrs(self) -> dict[str, AttrValue]:
        return _channel_attrs(self._io)

    def close(self) -> None:
        if self._joined is not None:
            self._joined.close()
        if self._in_step:
            self._engine.EndStep()
            self._in_step = False
        self._engine.Close()
        self._profile.closed()
