"""``bp5://path/run.bp`` (ADIOS2 BP5 files) and ``sst://name`` (ADIOS2 SST streams).

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
import json
import os
import re
import secrets
import select
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np
from adios2 import bindings as ab

from dataplane.errors import (
    ChannelBroken,
    DataplaneError,
    IntegrityError,
    OptionError,
    SchemaError,
    StepTimeoutError,
)
from dataplane.model import AttrValue, ChannelURL, Selection, StepMeta, VarSpec, check_seconds
from dataplane.transports import _bp5meta, _posix
from dataplane.transports._files import (
    END,
    FileTransport,
    FormatWriter,
    LeaseIO,
    StepSource,
    StepStream,
)

__all__ = ["BP5Transport", "SSTTransport"]

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


class BP5Transport(_ADIOSTransport):
    scheme = "bp5"
    engine = "BP5"

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

    def format_writer(self, mode: str) -> FormatWriter:
        return _BP5Writer(self, mode)

    def _ready(self) -> bool:
        return all(os.path.exists(os.path.join(self.path, name)) for name in _bp5meta.FILES)

    def _empty(self) -> bool:
        """No step ever reached the file (a writer opened it and wrote none yet, or died)."""
        return os.path.getsize(os.path.join(self.path, "md.idx")) == 0

    def format_source(self) -> StepSource | None:
        return _BP5Source(self) if self._ready() else None

    def format_stream(self, vars: tuple[str, ...] | None) -> StepStream | None:
        return _BP5Stream(self) if self._ready() else None


class SSTTransport(_ADIOSTransport):
    """``sst://name``: an ADIOS2 SST stream, writer to readers over the network.

    The writer publishes a contact file ``name.sst`` (readers must see the same filesystem
    path) and a lease ``name.lease``. ``policy="block"`` maps to SST's ``QueueFullPolicy=Block``
    and ``"drop-oldest"`` to ``Discard`` with ``QueueLimit=queue_limit``: the writer never waits,
    and when the queue is full SST drops the step being written (it has no way to drop the
    oldest). SST does not tell readers what they missed, so every step carries the writer's
    step index and readers count the gaps (``sub.stats.dropped``). Readers that join late
    receive steps from about the time they join. A stale contact file left by a crashed writer
    is ignored by readers (its lease is dead) and removed by the next writer.

    Options: ``verify``, ``heartbeat``, ``data_transport`` (``"WAN"``; ``"RDMA"``, ``"UCX"`` or
    ``"MPI"`` where the adios2 build has them, else SST falls back to WAN), ``rendezvous``
    (readers the writer waits for at open), ``rendezvous_timeout``, ``params`` (more SST
    engine parameters), ``threads``. A reader that finds only a dead writer's lease waits for
    the next writer (a restarted simulation) until its timeout.
    """

    scheme = "sst"
    engine = "SST"
    supports_random_access = False
    supports_drop_policy = True
    waits_for_next_writer = True
    stream_tells_end = True

    @classmethod
    def steps_ahead(cls, queue_limit: int) -> int:
        # The writer's ring and relay (1 + 1), SST's queue, the reader relay (1) and the
        # subscriber's ring (queue_limit).
        return 2 * queue_limit + 3

    def __init__(
        self,
        url: ChannelURL,
        *,
        verify: bool = True,
        heartbeat: float = 1.0,
        data_transport: str = "WAN",
        rendezvous: int = 0,
        rendezvous_timeout: float = 60.0,
        params: dict[str, Any] | str | None = None,
        threads: int = 1,
    ) -> None:
        super().__init__(url)
        self._init_common(verify, heartbeat)
        self.path = os.path.abspath(os.path.expanduser(url.path))
        known = {"wan": "WAN", "rdma": "RDMA", "ucx": "UCX", "mpi": "MPI"}
        if str(data_transport).lower() not in known:
            raise OptionError(
                f"data_transport must be one of {', '.join(known.values())}, got {data_transport!r}"
            )
        # SST itself falls back to WAN when the build lacks the one asked for.
        self.data_transport = known[str(data_transport).lower()]
        if int(rendezvous) < 0:
            raise OptionError(f"rendezvous must be >= 0, got {rendezvous}")
        self.rendezvous = int(rendezvous)
        self.rendezvous_timeout = check_seconds(rendezvous_timeout, "rendezvous_timeout")
        self.params = _params(params)
        self.threads = int(threads)

    @property
    def contact_file(self) -> str:
        return self.path + ".sst"

    def lease_io(self) -> LeaseIO:
        return LeaseIO(self.path + ".lease")

    def reader_params(self) -> dict[str, str]:
        return {"DataTransport": self.data_transport, "OpenTimeoutSecs": "10"}

    def open_writer(self, *, policy: str, queue_limit: int, mode: str) -> Any:
        if mode == "a":
            raise OptionError("sst:// streams are not stored, so there is nothing to append to")
        self._policy, self._queue_limit = policy, queue_limit
        return super().open_writer(policy=policy, queue_limit=queue_limit, mode=mode)

    def clear_leftovers(self) -> None:
        # NOTE: a crashed writer's contact file, removed once the claim showed, was taken for
        # the new writer's by readers that looked in between: they connected to the dead
        # writer and never to the new one (whose rendezvous then timed out).
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.contact_file)

    def format_writer(self, mode: str) -> FormatWriter:
        return _SSTRelayWriter(self, self._policy, self._queue_limit)

    def format_stream(self, vars: tuple[str, ...] | None) -> StepStream | None:
        return _SSTRelayStream(self)

    def relay(self, mode: str, shm_url: str, shm_dir: str, params: dict[str, str]) -> Any:
        pid, start = _posix.my_identity()
        config = {
            "mode": mode,
            "path": self.path,
            "url": self.url.url,
            "params": params,
            "shm_url": shm_url,
            "shm_dir": shm_dir,
            "lease": self.lease_io().path,
            "parent": pid,
            "parent_start": start,
        }
        err = tempfile.TemporaryFile()
        proc = subprocess.Popen(
            [sys.executable, "-m", "dataplane.transports._sst_relay", json.dumps(config)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
        )
        proc.dataplane_stderr = err  # type: ignore[attr-defined]
        return proc


def _relay_failure(proc: Any) -> str:
    """The last lines a relay printed to stderr (why it stopped)."""
    err = getattr(proc, "dataplane_stderr", None)
    if err is None:
        return ""
    err.seek(0)
    lines = [x.strip() for x in err.read().decode(errors="replace").strip().splitlines()]
    code = proc.poll()
    died = f"exit status {code}" if code is None or code >= 0 else _signal_name(-code)
    fatal = [i for i, x in enumerate(lines) if x.startswith("Fatal Python error")]
    if fatal:  # a crash inside adios2: the error and where the relay was in Python
        where = [x for x in lines[fatal[0] :] if x.startswith("File ")][:3]
        return f"{died}: {lines[fatal[0]]}; " + "; ".join(where)
    return f"{died}: " + "; ".join(x for x in lines[-3:] if x)


def _signal_name(number: int) -> str:
    try:
        return f"killed by {signal.Signals(number).name}"
    except ValueError:
        return f"killed by signal {number}"


def _private_shm_url(kind: str) -> tuple[str, str]:
    from dataplane.transports.shm import default_dir

    return f"shm://sst-{kind}-{secrets.token_hex(8)}", default_dir()


class _SSTRelayWriter(FormatWriter):
    """Publishes through a relay process that runs the SST writer engine (see _sst_relay)."""

    def __init__(self, t: SSTTransport, policy: str, queue_limit: int) -> None:
        from dataplane.transports.shm import ShmTransport

        self._t = t
        os.makedirs(os.path.dirname(t.path) or ".", exist_ok=True)
        params = {
            "DataTransport": t.data_transport,
            "RendezvousReaderCount": str(t.rendezvous),
            # Lossless between the relays: a subscriber's policy is applied where it reads
            # (its relay drains SST into a ring with that policy), so "drop-oldest" really
            # drops the oldest steps, which SST's Discard (drop the newest) cannot do.
            "QueueLimit": str(queue_limit),
            "QueueFullPolicy": "Block",
            "OpenTimeoutSecs": str(int(max(1, t.rendezvous_timeout))),
            "StatsLevel": "0",
            **t.params,
        }
        shm_url, shm_dir = _private_shm_url("w")
        self._proc = t.relay("write", shm_url, shm_dir, params)
        try:
            ready = self._await_ready(t.rendezvous_timeout + 30)
            if "error" in ready:
                raise DataplaneError(f"{t.url.url}: SST could not open: {ready['error']}")
            shm = ShmTransport(
                ChannelURL.parse(shm_url), rendezvous=1, rendezvous_timeout=60.0, dir=shm_dir
            )
            # The relay is this ring's one subscriber. The ring is lossless whatever the policy:
            # steps are dropped only at a subscriber's own ring, where it can count them. Under
            # "block" one step here keeps the writer close to queue_limit; under "drop-oldest"
            # room for queue_limit steps rides out a relay that falls briefly behind.
            queue = 1 if policy == "block" else max(2, queue_limit)
            self._out = shm.open_writer(policy="block", queue_limit=queue, mode="w")
        except BaseException:
            self._proc.kill()
            self._proc.wait()
            raise
        self._pending: dict[str, Any] | None = None
        self._policy, self._queue_limit = policy, queue_limit

    def _await_ready(self, timeout: float) -> dict[str, Any]:
        assert self._proc.stdout is not None
        poller = select.poll()  # (select() fails on descriptors past 1023)
        poller.register(self._proc.stdout, select.POLLIN)
        ready = poller.poll(timeout * 1000)
        line = self._proc.stdout.readline() if ready else ""
        if not line:
            if self._proc.poll() is None:
                # Still waiting inside SST: SIGABRT makes it print where (faulthandler).
                self._proc.send_signal(signal.SIGABRT)
                try:
                    self._proc.wait(5)
                except subprocess.TimeoutExpired:
                    self._proc.kill()
            self._proc.wait()
            raise DataplaneError(
                f"{self._t.url.url}: the SST writer process did not start within "
                f"{timeout:.0f} s ({_relay_failure(self._proc) or 'no answer'}); with "
                f"rendezvous={self._t.rendezvous}, did that many subscribers come?"
            )
        return json.loads(line)

    def _alive(self) -> None:
        if self._proc.poll() is not None:
            raise ChannelBroken(
                f"{self._t.url.url}: the SST writer process exited ({self._proc.returncode}): "
                f"{_relay_failure(self._proc)}"
            )

    def begin(self, index: int, specs: dict[str, VarSpec], attrs: dict[str, AttrValue]) -> None:
        self._alive()
        self._pending = {"index": index, "attrs": attrs, "specs": specs, "arrays": []}

    def put(self, name: str, array: np.ndarray) -> None:
        assert self._pending is not None
        self._pending["arrays"].append((name, array))

    def commit(self, checksums: Callable[[], dict[str, Any]]) -> None:
        p = self._pending
        assert p is not None
        self._pending = None
        p["sums"] = checksums
        info = {
            "i": p["index"],
            "a": p["attrs"],
            "c": p["sums"](),
            "p": self._policy,
            "q": self._queue_limit,
        }
        self._out.begin_step(p["index"], p["specs"], {"info": json.dumps(info)})
        try:
            for name, arr in p["arrays"]:
                self._out.put(name, arr)
            self._out.end_step()
        except BaseException:
            self._out.abort_step()
            raise

    def abort(self) -> None:
        self._pending = None

    def set_attrs(self, attrs: dict[str, AttrValue]) -> None:
        self._out.set_attrs(attrs)

    def close(self) -> None:
        # The relay finishes delivering, closes SST (which waits for readers) and exits.
        self._out.close()
        code = self._proc.wait()
        if code != 0:
            raise ChannelBroken(
                f"{self._t.url.url}: the SST writer process failed ({code}): "
                f"{_relay_failure(self._proc)}"
            )


class _SSTRelayStream(StepStream):
    """Receives SST steps from a relay process that runs the SST reader (see _sst_relay)."""

    def __init__(self, t: SSTTransport) -> None:
        from dataplane.transports.shm import ShmTransport

        self._t = t
        shm_url, shm_dir = _private_shm_url("r")
        self._proc = t.relay("read", shm_url, shm_dir, {**t.reader_params(), **t.params})
        self._in = ShmTransport(ChannelURL.parse(shm_url), dir=shm_dir).open_reader(
            start="first", vars=None
        )

    @property
    def connected(self) -> bool:
        """True once the relay reached a live writer (until then, old leases do not count)."""
        return bool(getattr(self._in, "_ctl", None))

    @property
    def first_index(self) -> int | None:
        """The first step this subscriber was owed (the relay's ring starts there)."""
        return self._in.first_index

    def advance(self, wait: float) -> tuple[StepMeta, dict[str, str]] | None:
        try:
            meta = self._in.next_step(wait)
        except StepTimeoutError:
            if self._proc.poll() is not None and not self.connected:
                return END if self._proc.returncode == 0 else self._failed()
            return None
        except ChannelBroken:
            return self._failed()
        if meta is None:
            return END
        info = json.loads(str(meta.attrs["info"]))
        return _meta_from(info)

    def _failed(self) -> Any:
        why = self._in.attrs().get("relay_error") or _relay_failure(self._proc)
        raise ChannelBroken(f"{self._t.url.url}: the SST reader process failed: {why}")

    def get(self, name: str, selection: Selection) -> np.ndarray:
        return self._in.get(name, selection)

    def attrs(self) -> dict[str, AttrValue]:
        return {k: v for k, v in self._in.attrs().items() if k != "relay_error"}

    def close(self) -> None:
        self._in.close()
        if self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()


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
        io, eng = self._io, self._engine
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
        if not self._stream:
            for name in self._step_attrs - set(pending["attrs"]):
                io.RemoveAttribute(_STEP_ATTR + name)
            for name, value in pending["attrs"].items():
                _adios_attr(io, _STEP_ATTR + name, value)
            self._step_attrs = set(pending["attrs"])
        sums = pending["sums"]
        if callable(sums):
            # Write the arrays now, while their checksums are still being computed beside.
            if any(arr.size for _, arr in pending["arrays"]):
                eng.PerformDataWrite()
            sums = sums()
        info["c"] = sums
        eng.Put(self._step_var, json.dumps(info))  # last: marks the step complete
        eng.EndStep()

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


_METADATA_ROOM = 4 << 20  # what a BP5 step's metadata and the file's close may need on disk


class _BP5Writer(FormatWriter):
    def __init__(self, t: BP5Transport, mode: str) -> None:
        self._t = t
        self._known: dict[str, VarSpec] = {}
        self._attrs: dict[str, AttrValue] = {}
        self._pending: dict[str, Any] | None = None
        # NOTE: appending to a file no step ever reached (its writer died right after opening
        # it) crashes ADIOS2 (a segmentation fault): such a file is begun anew.
        append = mode == "a" and t._ready() and not t._empty()
        if append:
            _bp5meta.Checker(t.path, t.url.url).check()  # ADIOS2 would crash on damage
            source = _BP5Source(t)
            n = source.refresh()
            self.next_index = source.last_index() + 1 if n else 0
            self._known = source.all_vars()
            source.close()
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

    def begin(self, index: int, specs: dict[str, VarSpec], attrs: dict[str, AttrValue]) -> None:
        # Nothing touches ADIOS2 until commit: an aborted step leaves no trace.
        self._pending = {"index": index, "attrs": attrs, "arrays": []}

    def put(self, name: str, array: np.ndarray) -> None:
        assert self._pending is not None
        self._pending["arrays"].append((name, array))

    def commit(self, checksums: Callable[[], dict[str, Any]]) -> None:
        p = self._pending
        assert p is not None
        self._pending = None
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
        need = sum(a.nbytes for _, a in pending["arrays"]) + _METADATA_ROOM
        try:
            st = os.statvfs(self._t.path)
        except OSError:
            return  # not a local path we can ask (ADIOS2 reports its own errors)
        free = st.f_bavail * st.f_frsize
        if free < need:
            raise OSError(
                errno.ENOSPC,
                f"{free} bytes free where step {pending['index']} needs {need} with room for "
                f"its metadata (checked before writing: ADIOS2 does not survive a full disk)",
            )

    def abort(self) -> None:
        self._pending = None

    def set_attrs(self, attrs: dict[str, AttrValue]) -> None:
        if self._engine is not None:
            self._enc.channel_attrs(attrs, self._attrs)
        self._attrs = dict(attrs)

    def close(self) -> None:
        if self._engine is not None:
            self._engine.Close()


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


def _holds(info: dict[str, Any], name: str) -> bool:
    """Whether a step put variable ``name`` into ADIOS2 (zero-length arrays are not put)."""
    entry = info["v"].get(name)
    return entry is not None and (not entry[1] or 0 not in entry[1])


def _least_bytes(info: dict[str, Any]) -> int:
    # Single values travel in BP5's metadata; arrays are in the data files.
    return sum(
        VarSpec(np.dtype(d), tuple(shape)).nbytes for d, shape in info["v"].values() if shape
    )


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


class _BP5Source(StepSource):
    """Random access (ReadRandomAccess) to the complete steps of a BP5 file."""

    def __init__(self, t: BP5Transport) -> None:
        self._t = t
        _bp5meta.Checker(t.path, t.url.url).check()  # ADIOS2 crashes on damaged metadata
        self._ad = t._adios()
        self._io = t.reader_io(self._ad)
        self._engine = self._io.Open(t.path, ab.Mode.ReadRandomAccess)
        self._steps: list[tuple[int, dict[str, Any]]] = []  # (step in file, info)
        self._least: dict[int, int] = {}
        self._present: dict[str, list[int]] = {}
        self._ours = False

    def refresh(self) -> int:
        if self._steps:
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
        relative = self._relative(name, step)
        return _read_var(self._t, self._io, self._engine, name, spec, selection, relative)

    def attrs(self) -> dict[str, AttrValue]:
        return _channel_attrs(self._io)

    def close(self) -> None:
        if self._engine is not None:
            self._engine.Close()


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
        self._engine = self._io.Open(target or t.path, ab.Mode.Read)
        self._in_step = False
        self._info: dict[str, Any] | None = None
        self._foreign_index = 0
        self._file_step = -1  # ADIOS2 step number of the current step
        self._poll = 0.002 if t.engine == "SST" else t.poll_interval

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
        return _read_var(self._t, self._io, self._engine, name, spec, selection, None)

    def attrs(self) -> dict[str, AttrValue]:
        return _channel_attrs(self._io)

    def close(self) -> None:
        if self._in_step:
            self._engine.EndStep()
            self._in_step = False
        self._engine.Close()
