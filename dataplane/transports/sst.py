"""``sst://name``: ADIOS2 SST streams, each engine in a relay process of its own (see
:mod:`dataplane.transports._sst_relay` for why); steps are encoded as for ``bp5://``."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import select
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable
from typing import Any

import numpy as np

from dataplane.errors import ChannelBroken, DataplaneError, OptionError, StepTimeoutError
from dataplane.model import AttrValue, ChannelURL, Selection, StepMeta, VarSpec, check_seconds
from dataplane.transports import _posix
from dataplane.transports._adios_steps import _ADIOSTransport, _meta_from, _params
from dataplane.transports._files import END, FormatWriter, LeaseIO, StepStream

__all__ = ["SSTTransport"]


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
        frames = [x for x in lines[fatal[0] :] if x.startswith("File ")]
        # The innermost frames say where it crashed, the relay's own frame what it was doing
        # (the crash may land in a library the relay calls, e.g. shm:// or numpy).
        where = frames[:2] + [x for x in frames[2:] if "_sst_relay" in x][:1]
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
