"""The helper processes that run ADIOS2 SST engines for ``sst://`` writers and readers.

# NOTE: the adios2 bindings hold Python's GIL inside SST calls for as long as SST waits: a
# writer's open (rendezvous), ``EndStep`` on a full queue and ``Close`` (until readers have
# taken every step); a reader's open (until the writer's next step) and ``BeginStep`` (its
# whole timeout). In the caller's process that would freeze every thread, and a writer and a
# reader in one process would wait for each other forever. So each SST engine runs here, in a
# process of its own, and trades steps with the caller through a private ``shm://`` channel:
# one extra copy on each side, nothing blocked in the caller but a futex wait.

    python -m dataplane.transports._sst_relay CONFIG_JSON

CONFIG: ``mode`` ("write": shm -> SST, or "read": SST -> shm), the SST ``path``, ``url``,
engine ``params``, ``shm_url`` and ``shm_dir``, and for readers the ``lease`` path. A writer
relay prints one JSON line when SST is open (``{"ready": true}``) or failed (``{"error"}``).
Each shm step carries the step's JSON (index, attributes, checksums, dtypes) as attribute
``info``; the relay exits when the other side goes away.
"""

from __future__ import annotations

import faulthandler
import json
import os
import signal
import sys
import time
from typing import Any

import numpy as np

from dataplane.errors import ChannelBroken, StepTimeoutError
from dataplane.model import ChannelURL, Selection, VarSpec
from dataplane.transports._adios_steps import (
    _STEP_VAR,
    _channel_attrs,
    _decode_step,
    _foreign_meta,
    _meta_from,
    _read_var,
    _StepEncoder,
    ab,
)
from dataplane.transports._files import LeaseIO, read_lease, writer_state
from dataplane.transports.shm import ShmTransport

_stop = False


def _on_term(signum: int, frame: Any) -> None:
    global _stop
    _stop = True


class _Target:
    """What the shared ADIOS2 helpers need to know of the transport."""

    def __init__(self, url: str) -> None:
        self.url = ChannelURL.parse(url)
        self.operator = None


def _shm(config: dict[str, Any], **opts: Any) -> ShmTransport:
    return ShmTransport(ChannelURL.parse(config["shm_url"]), dir=config["shm_dir"], **opts)


def _say(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def run_writer(config: dict[str, Any]) -> int:
    """shm (the publisher's steps) -> SST."""
    source = _shm(config).open_reader(start="first", vars=None)
    try:
        ad = ab.ADIOS()
        io = ad.DeclareIO("dataplane-sst-writer")
        io.SetEngine("SST")
        io.SetParameters(config["params"])
        engine = io.Open(config["path"], ab.Mode.Write)
    except Exception as exc:
        _say({"error": f"{type(exc).__name__}: {exc}"})
        source.close()
        return 1
    _say({"ready": True})
    enc = _StepEncoder(_Target(config["url"]), io, engine, stream=True)  # type: ignore[arg-type]
    attrs: dict[str, Any] = {}
    try:
        while not _stop:
            try:
                meta = source.next_step(0.5)
            except StepTimeoutError:
                continue
            except ChannelBroken:
                break  # the publisher failed or died; its lease tells readers which
            if meta is None:
                break
            now = source.attrs()
            if now != attrs:
                enc.channel_attrs(now, attrs)
                attrs = now
            info = json.loads(str(meta.attrs["info"]))
            # SST writes into the memory it is given; the shm views are read-only: copy.
            arrays = [
                (name, np.array(source.get(name, Selection.of(spec.shape))))
                for name, spec in meta.vars.items()
            ]
            enc.write(
                info["i"],
                {"attrs": info["a"], "sums": info["c"], "arrays": arrays},
                extra={"p": info.get("p", "block"), "q": info.get("q", 4)},
            )
        now = source.attrs()
        if now != attrs:
            enc.channel_attrs(now, attrs)
    finally:
        engine.Close()
        source.close()
    return 0


def _wait_for_writer(config: dict[str, Any]) -> bool:
    """Until a live writer's contact file is there (stale ones from crashed writers are not)."""
    lease = LeaseIO(config["lease"])
    contact = config["path"] + ".sst"
    parent, start = int(config["parent"]), int(config["parent_start"])
    from dataplane.transports import _posix

    while not _stop:
        if os.path.exists(contact) and writer_state(read_lease(lease)) in ("alive", "none"):
            return True
        if not _posix.is_alive(parent, start):
            return False
        time.sleep(0.02)
    return False


def run_reader(config: dict[str, Any]) -> int:
    """SST -> shm (the subscriber's steps)."""
    if not _wait_for_writer(config):
        return 0
    ad = ab.ADIOS()
    io = ad.DeclareIO("dataplane-sst-reader")
    io.SetEngine("SST")
    io.SetParameters(config["params"])
    engine = io.Open(config["path"], ab.Mode.Read)
    out: Any = None  # opened at the first step, with the writer's policy and queue limit
    target = _Target(config["url"])
    failed = False
    try:
        seen: dict[str, Any] | None = None
        foreign_index = 0
        idle = 0.0
        while not _stop:
            # NOTE: SST's BeginStep with a timeout other than 0 or -1 crashes or hangs now
            # and then (ornladios/ADIOS2#1862; here: SIGSEGV in about 1 of 20 runs with 64 MiB
            # steps). Poll without waiting, and sleep in Python, briefly.
            status = engine.BeginStep(ab.StepMode.Read, 0.0)
            if status == ab.StepStatus.EndOfStream:
                break
            if status != ab.StepStatus.OK:
                idle = min(idle * 2 or 1e-4, 5e-3)
                time.sleep(idle)
                continue
            idle = 0.0
            if io.InquireVariable(_STEP_VAR):
                info = _decode_step(io, engine, None)
            else:
                info = _foreign_meta(io, foreign_index)
                foreign_index += 1
            if info is None:  # a step without its marker never completed
                engine.EndStep()
                continue
            meta, _ = _meta_from(info)
            arrays = {
                name: _read_var(target, io, engine, name, spec, Selection.of(spec.shape), None)
                for name, spec in meta.vars.items()
            }
            attrs = info["ca"] if "ca" in info else _channel_attrs(io)
            engine.EndStep()
            if out is None:
                out = _shm(
                    config, rendezvous=1, rendezvous_timeout=300.0, start_index=meta.index
                ).open_writer(
                    policy=info.get("p", "block"), queue_limit=int(info.get("q", 4)), mode="w"
                )
            if attrs != seen:
                out.set_attrs(attrs)
                seen = attrs
            out.begin_step(
                meta.index,
                {k: VarSpec(a.dtype, a.shape) for k, a in arrays.items()},
                {"info": json.dumps(info)},
            )
            for name, arr in arrays.items():
                out.put(name, np.asarray(arr))
            out.end_step()
    except BaseException as exc:  # the subscriber learns of it through the channel
        failed = True
        if out is not None:
            out.set_attrs({"relay_error": f"{type(exc).__name__}: {exc}"})
        raise
    finally:
        engine.Close()
        if out is None:  # no step came: still give the subscriber a channel that ends
            out = _shm(config, rendezvous=1, rendezvous_timeout=300.0).open_writer(
                policy="block", queue_limit=1, mode="w"
            )
        out.close(failed=failed)
    return 0


def main(config: dict[str, Any]) -> int:
    faulthandler.enable()  # a crash in adios2 leaves a traceback for the caller's error message
    signal.signal(signal.SIGTERM, _on_term)
    # The contact file says how to connect to this writer: readable by its owner only. (A
    # relay creates no other files.)
    os.umask(0o077)
    return run_writer(config) if config["mode"] == "write" else run_reader(config)


if __name__ == "__main__":
    sys.exit(main(json.loads(sys.argv[1])))
