"""What the file transports (bp5, h5, zarr) share: the writer lease, checksums, live following.

A format module provides a writer (:class:`FormatWriter`) and, for reading, either random
access to committed steps (:class:`StepSource`) or a sequential stream (:class:`StepStream`);
:class:`FileTransport` turns those into the transport contract with the same guarantees for
every format:

- **Three outcomes for a live reader.** The writer keeps a *lease* beside the data (pid, host,
  heartbeat time, state). A subscriber that finds no new step looks at it: ``closed`` means end
  of stream, ``failed`` or a writer that is gone (its pid on this host, or its heartbeat
  elsewhere) means ``ChannelBroken``, and otherwise it waits until its timeout and raises
  ``StepTimeoutError``. The formats themselves cannot tell a dead writer from a slow one. A
  stream format's own end (SST's, BP5's) is clean once the lease says ``closed`` or that its
  live writer is closing, having committed every step.
- **One writer per channel.** A lease held by a live writer refuses a second one.
- **Integrity.** Every array is written with the xxh3-64 checksums of its blocks
  (:mod:`dataplane.transports._checksums`); readers verify every read, whole or partial, in
  whole blocks (``verify=False`` turns it off) and raise ``IntegrityError`` naming channel,
  step and variable on a mismatch or on bytes the format library cannot read.
"""

from __future__ import annotations

import json
import os
import time
from abc import abstractmethod
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from functools import partial
from typing import Any, ClassVar

import numpy as np
import xxhash

from dataplane.errors import ChannelBroken, DataplaneError, IntegrityError, StepTimeoutError
from dataplane.model import AttrValue, Selection, StepMeta, VarSpec, check_seconds
from dataplane.transports._checksums import Corrupt, block_sums, verified_read
from dataplane.transports._format import (
    END,
    FormatWriter,
    SourceStream,
    StepSource,
    StepStream,
    guard,
    pread_rows,
    storage_errors,
)
from dataplane.transports._lease import (
    Lease,
    LeaseIO,
    Seen,
    lease_state,
    read_lease,
    setting_up,
    writer_state,
)
from dataplane.transports.base import Archive, Located, RankedWriter, Reader, Transport, Writer

__all__ = [
    "END",
    "FileTransport",
    "FormatWriter",
    "Lease",
    "LeaseIO",
    "Seen",
    "StepSource",
    "StepStream",
    "guard",
    "lease_state",
    "read_lease",
    "setting_up",
    "storage_errors",
    "writer_state",
]


# -- the transport ---------------------------------------------------------------------------
class FileTransport(Transport):
    """Base of transports that store steps in files; subclasses provide the format hooks."""

    scope = "network"
    supports_random_access = True
    #: Variables and their shapes may change from step to step.
    supports_changing_layout: ClassVar[bool] = True
    #: How often live readers look for new steps, seconds.
    poll_interval: ClassVar[float] = 0.02
    #: Streams: a subscriber not yet connected waits for the next writer instead of reporting
    #: the death of the previous one (whose leftovers it may find).
    waits_for_next_writer: ClassVar[bool] = False
    #: The stream itself ends after the last step a dead or failed writer completed (relayed
    #: streams): the lease is consulted at that end, not while steps may still be in flight.
    stream_tells_end: ClassVar[bool] = False

    verify: bool
    heartbeat: float

    def _init_common(self, verify: bool, heartbeat: float) -> None:
        self.verify = bool(verify)
        self.heartbeat = check_seconds(heartbeat, "heartbeat", zero=False)

    # hooks ------------------------------------------------------------------------------------
    @abstractmethod
    def lease_io(self) -> LeaseIO: ...

    @abstractmethod
    def format_writer(self, mode: str) -> FormatWriter: ...

    def clear_leftovers(self) -> None:
        """Remove what a writer that is gone left beside the data and readers must not take
        for the new writer's (called while claiming the channel, before the claim shows)."""

    def format_source(self, seen: Seen | None = None) -> StepSource | None:
        """Random access to what is stored, or None while nothing exists yet. ``seen``: the
        writer's lease and its state as the caller just read them (not read again)."""
        return None

    def format_stream(self, vars: tuple[str, ...] | None) -> StepStream | None:
        """A live stream; the default follows ``format_source`` by polling."""
        source = self.format_source()
        return None if source is None else SourceStream(source, self.poll_interval)

    # contract ---------------------------------------------------------------------------------
    def open_writer(self, *, policy: str, queue_limit: int, mode: str) -> Writer:
        io = self.lease_io()
        io.make_parents()
        lease = Lease(io, self.url.url, self.heartbeat)
        lease.acquire(self.clear_leftovers)
        try:
            fw = self.format_writer(mode)
            lease.ready()
        except BaseException:
            lease.release("failed")
            raise
        return _FileWriter(self, fw, lease)

    def open_reader(self, *, start: str, vars: tuple[str, ...] | None) -> Reader:
        return _FileReader(self, start, vars)

    def open_archive(self) -> Archive:
        seen = lease_state(self.lease_io())
        if setting_up(*seen):
            raise DataplaneError(
                f"{self.url.url}: its writer is setting it up: nothing is stored there yet"
            )
        source = guard(self.url.url, "the file", partial(self.format_source, seen))
        if source is None:
            raise DataplaneError(f"{self.url.url}: nothing is stored there (no such file)")
        return _FileArchive(self, source)

    @classmethod
    def read_located(
        cls, fd: int, at: Located, first: int, rows: int, out: np.ndarray | None = None
    ) -> np.ndarray | None:
        shape = tuple(at.shape)
        sel = (
            Selection((first, *(0,) * (len(shape) - 1)), (rows, *shape[1:]))
            if shape
            else Selection((), ())
        )
        dtype = np.dtype(at.dtype)

        def read(box: Selection) -> np.ndarray:
            # Straight into `out` where the checksum blocks need no more than was asked for.
            into = out if box == sel else None
            return pread_rows(fd, at.offset, dtype, shape, box, into)

        try:
            got = read(sel) if at.stored is None else verified_read(read, shape, sel, at.stored)
        except (Corrupt, IntegrityError):  # (pread_rows: the file ends early)
            return None
        if out is not None and got is not out:
            out[...] = got
            return out
        return got

    def checked(
        self,
        index: int,
        name: str,
        selection: Selection,
        spec: VarSpec,
        stored: Any,
        read: Callable[[Selection], np.ndarray],
    ) -> np.ndarray:
        """``read(selection)``, widened to the checksum blocks it touches and verified against
        ``stored`` (see :mod:`dataplane.transports._checksums`), whole or partial."""
        what = f"variable {name!r} of step {index}"

        def guarded(sel: Selection) -> np.ndarray:
            return guard(self.url.url, what, partial(read, sel))

        if not self.verify or not stored:
            return guarded(selection)
        try:
            return verified_read(guarded, spec.shape, selection, stored)
        except Corrupt as exc:
            raise IntegrityError(
                f"{self.url.url}: {what} is corrupt: {exc}. Re-create the file, or open with "
                f"verify=False to read it anyway."
            ) from None


_HASH_IN_THREAD = 1 << 20  # arrays this big are hashed beside the write, not before it


class _FileWriter(RankedWriter):
    def __init__(self, t: FileTransport, fw: FormatWriter, lease: Lease) -> None:
        self._t = t
        self._fw = fw
        self._lease = lease
        self._closed = False
        self.next_index = fw.next_index
        self._holding: list[np.ndarray] = []
        self._sums: dict[str, Future[dict] | dict | list] = {}
        self._pool: ThreadPoolExecutor | None = None

    def known_vars(self) -> dict[str, VarSpec]:
        return self._fw.known_vars()

    def begin_step(
        self, index: int, specs: dict[str, VarSpec], attrs: dict[str, AttrValue]
    ) -> None:
        if self._closed:
            raise DataplaneError(f"writer of {self._t.url.url} is closed")
        storage_errors(partial(self._fw.begin, index, specs, attrs))

    def put(self, name: str, array: np.ndarray) -> None:
        # (np.ascontiguousarray would turn a 0-d array into a 1-d one.)
        arr = array if array.flags.c_contiguous else np.array(array, order="C")
        self._holding.append(arr)  # formats may write at commit (ADIOS2 deferred puts)
        if arr.nbytes >= _HASH_IN_THREAD:
            # NOTE: xxhash and the format libraries' large writes both run without the GIL:
            # hashing on a second core while the bytes are written makes the checksum almost
            # free (measured: a 64 MiB HDF5 step 13.2 ms, +2.3 ms hashed first, +0.7 ms beside).
            if self._pool is None:
                self._pool = ThreadPoolExecutor(1, thread_name_prefix="dataplane-checksum")
            self._sums[name] = self._pool.submit(block_sums, arr)
        else:
            self._sums[name] = block_sums(arr)
        storage_errors(partial(self._fw.put, name, arr))

    def begin_ranked(
        self,
        index: int,
        specs: dict[str, VarSpec],
        attrs: dict[str, AttrValue],
        chunks: dict[str, tuple[int, ...]],
        layout: dict[str, Any] | None = None,
    ) -> int:
        """Begin a step whose arrays the ranks write with ``put_block`` (see
        :meth:`RankedWriter.begin_ranked`); returns the step's row in the file."""
        if self._closed:
            raise DataplaneError(f"writer of {self._t.url.url} is closed")
        return self._fw.begin_ranked(index, specs, attrs, chunks, layout)

    def written_by(self) -> dict[str, Any] | None:
        return self._fw.written_by()

    def chunks_of(self, name: str) -> tuple[int, ...] | None:
        """The chunk shape of a variable's array (without the step axis), if it has one."""
        return self._fw.chunks_of(name)

    def end_ranked(self, blocks: dict[str, list]) -> None:
        """Commit a ranked step: ``blocks`` holds each variable's block checksums."""
        self._sums.update(blocks)
        self.end_step()

    def put_region(self, name: str, start: tuple[int, ...], block: np.ndarray) -> Any:
        """Write a piece of a ranked step that a rank sent (``Transport.aggregates``)."""
        block = block if block.flags.c_contiguous else np.array(block, order="C")
        storage_errors(partial(self._fw.put_region, name, start, block))
        return block_sums(block)

    def end_step(self) -> None:
        pending = self._sums

        def sums() -> dict[str, Any]:
            return {n: s.result() if isinstance(s, Future) else s for n, s in pending.items()}

        try:
            storage_errors(partial(self._fw.commit, sums))
        finally:
            self._holding = []
            self._sums = {}

    def abort_step(self) -> None:
        for s in self._sums.values():
            if isinstance(s, Future):
                s.result()  # let the hash finish before the array is let go
        self._holding = []
        self._sums = {}
        storage_errors(self._fw.abort)

    def set_attrs(self, attrs: dict[str, AttrValue]) -> None:
        storage_errors(partial(self._fw.set_attrs, attrs))

    def close(self, failed: bool = False) -> None:
        if self._closed:
            return
        self._closed = True
        if self._pool is not None:
            self._pool.shutdown()
        try:
            if not failed:
                self._lease.closing()
            storage_errors(self._fw.close)
        except BaseException:
            self._lease.release("failed")
            raise
        self._lease.release("failed" if failed else "closed")


class _FileReader(Reader):
    def __init__(self, t: FileTransport, start: str, vars: tuple[str, ...] | None) -> None:
        self._t = t
        self._vars = vars
        self._start = start
        self._stream: StepStream | None = None
        self._lease_io = t.lease_io()
        self._current: tuple[StepMeta, dict[str, str]] | None = None
        self._skip_below = -1
        self._closed = False
        self._open_stream(*lease_state(self._lease_io))

    def _open_stream(self, lease: dict[str, Any] | None, state: str) -> bool:
        # Stored data is not looked at while its writer sets it up; a stream's writer may be
        # waiting for this reader to connect (rendezvous) before it is set up.
        waits = self._t.supports_random_access and setting_up(lease, state)
        if self._stream is None and not waits:
            self._stream = guard(
                self._t.url.url, "the file", lambda: self._t.format_stream(self._vars)
            )
            if self._stream is not None and self._start == "latest":
                # Steps already committed when the subscriber arrived are skipped.
                source = getattr(self._stream, "source", None)
                if source is not None:
                    self._skip_below = source.refresh()
                    self.first_index = self._skip_below
        return self._stream is not None

    def next_step(self, timeout: float | None) -> StepMeta | None:
        if self._closed:
            raise DataplaneError(f"subscriber of {self._t.url.url} is closed")
        self._current = None
        deadline = None if timeout is None else time.monotonic() + timeout
        poll = self._t.poll_interval
        while True:
            lease, state = lease_state(self._lease_io)  # read before looking for steps
            if self._open_stream(lease, state):
                assert self._stream is not None
                settled = state in ("closed", "failed", "dead") and not self._t.stream_tells_end
                wait = 0.0 if settled else min(poll * 5, 0.25)
                if deadline is not None:
                    wait = min(wait, max(0.0, deadline - time.monotonic()))
                got = guard(self._t.url.url, "the next step", partial(self._stream.advance, wait))
                if got is END:
                    self._ended()
                    return None
                if got is not None:
                    meta = got[0]
                    if meta.index < self._skip_below:
                        continue
                    if self.first_index is None:
                        owed = getattr(self._stream, "first_index", None)
                        self.first_index = meta.index if owed is None else owed
                    self._current = got
                    return meta
            # No new step. The lease was read before looking, so a closed writer's last
            # step would have been found.
            waiting_for_next = self._t.waits_for_next_writer and (
                self._stream is None or not self._stream.connected
            )
            if state == "closed" and self._stream is not None:
                return None
            in_flight = (
                self._t.stream_tells_end and self._stream is not None and (self._stream.connected)
            )
            if state in ("failed", "dead") and not waiting_for_next and not in_flight:
                raise self._broken(lease, state)
            if deadline is not None and time.monotonic() >= deadline:
                if state in ("failed", "dead") and lease:
                    what = f"its last writer (pid {lease.get('pid')}) {state}; waiting for the next"
                elif setting_up(lease, state):
                    assert lease is not None
                    what = f"its writer (pid {lease.get('pid')}) is alive, setting it up"
                elif self._stream is None:
                    what = "no writer has created it yet"
                elif lease:
                    what = f"the writer (pid {lease.get('pid')}) is alive"
                else:
                    what = "it is not being written by dataplane"
                raise StepTimeoutError(f"{self._t.url.url}: no new step within {timeout}s ({what})")
            if self._stream is None:
                time.sleep(poll)

    def _ended(self) -> None:
        """The format says the stream is over: a clean end only if the writer says so too."""
        deadline = time.monotonic() + 2 * self._t.heartbeat + 1.0
        while True:
            # Read now: the one read before looking for steps may predate the writer's close.
            lease, state = lease_state(self._lease_io)
            if state in ("closed", "none") or (state == "alive" and lease and lease.get("closing")):
                return None
            if state in ("failed", "dead"):
                raise self._broken(lease, state)
            if time.monotonic() > deadline:  # ended while its writer lives and says "open"
                raise ChannelBroken(
                    f"{self._t.url.url}: the stream ended but its writer (pid "
                    f"{lease.get('pid') if lease else '?'}) never closed it"
                )
            time.sleep(0.02)  # the writer updates its lease right after closing the engine

    def _broken(self, lease: dict[str, Any] | None, state: str) -> ChannelBroken:
        assert lease is not None
        why = (
            "failed (raised inside its 'with' block or was abandoned)"
            if state == "failed"
            else (f"died (pid {lease.get('pid')} on {lease.get('host')})")
        )
        return ChannelBroken(
            f"{self._t.url.url}: the writer {why}; every step it completed was delivered"
        )

    def get(self, name: str, selection: Selection) -> np.ndarray:
        assert self._current is not None and self._stream is not None
        meta, sums = self._current
        stream = self._stream
        return self._t.checked(
            meta.index,
            name,
            selection,
            meta.vars[name],
            sums.get(name),
            lambda sel: stream.get(name, sel),
        )

    def attrs(self) -> dict[str, AttrValue]:
        return {} if self._stream is None else self._stream.attrs()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._stream is not None:
            self._stream.close()


class _FileArchive(Archive):
    #: Steps whose metadata an archive keeps decoded (random reads ask for it per read).
    META_CACHE = 4096

    def __init__(self, t: FileTransport, source: StepSource) -> None:
        self._t = t
        self._source = source
        self._count = guard(t.url.url, "the number of steps", source.refresh)
        self._metas: OrderedDict[int, tuple[StepMeta, dict[str, str]]] = OrderedDict()

    def __len__(self) -> int:
        return self._count

    def _meta(self, index: int) -> tuple[StepMeta, dict[str, str]]:
        # A committed step never changes, so its decoded metadata can be kept.
        got = self._metas.get(index)
        if got is None:
            got = guard(self._t.url.url, f"step {index}", lambda: self._source.meta(index))
            self._metas[index] = got
            if len(self._metas) > self.META_CACHE:
                self._metas.popitem(last=False)
        return got

    def meta(self, index: int) -> StepMeta:
        return self._meta(index)[0]

    def version(self, index: int) -> str | None:
        sums = self._meta(index)[1]
        if sums:  # the step's own checksums: content-addressed
            return xxhash.xxh3_64_hexdigest(json.dumps(sums, sort_keys=True).encode())
        try:  # a file dataplane did not write: its size and modification time
            st = os.stat(self._t.url.path)
        except OSError:
            return None
        return f"{st.st_size}-{st.st_mtime_ns}"

    def get(self, index: int, name: str, selection: Selection) -> np.ndarray:
        meta, sums = self._meta(index)
        return self._t.checked(
            index,
            name,
            selection,
            meta.vars[name],
            sums.get(name),
            lambda sel: self._source.get(index, name, sel),
        )

    def locate(self, index: int) -> dict[str, Located] | None:
        meta, sums = self._meta(index)
        out = {}
        for name, spec in meta.vars.items():
            at = guard(self._t.url.url, f"step {index}", partial(self._source.locate, index, name))
            if at is None or at[1] != spec.dtype or at[2] != spec.shape or 0 in spec.shape:
                return None
            stored = sums.get(name) if self._t.verify else None
            out[name] = Located(at[0], spec.dtype.str, spec.shape, stored or None)
        return out

    def attrs(self) -> dict[str, AttrValue]:
        return guard(self._t.url.url, "the channel attributes", self._source.attrs)

    def written_by(self) -> dict[str, Any] | None:
        return guard(self._t.url.url, "how it was written", self._source.written_by)

    def close(self) -> None:
        self._source.close()
