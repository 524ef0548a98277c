"""``shm://name``: a shared-memory channel between processes on one node.

One copy in, zero copies out: the writer copies each array once into a shared slot; every
subscriber gets read-only numpy views of that slot. **A view is valid until its subscriber
takes the next step**; after that the writer may reuse the slot. Copy what you keep.

Layout
    A *control segment* holds a header, a slot table, a subscriber table and the channel
    attributes. Each *slot segment* holds one step: its metadata (JSON: index, attributes,
    variable names, dtypes, shapes, offsets) followed by the arrays, 64-byte aligned. Slots grow
    when a step does not fit. The writer publishes a step by setting its slot's ``seq`` under
    the channel lock, so a reader never sees a partial step.

Synchronisation
    The channel lock is a robust process-shared pthread mutex in the control segment: taken
    without a system call, and handed to the next locker when its holder dies, so a crash never
    deadlocks the channel. Where the C library has none it is ``flock`` on the segment, which
    the kernel releases likewise (the header says which). Readers sleep on a futex that the writer
    bumps per step; the writer sleeps on another that readers bump when they advance.

Liveness
    Readers check every 0.1 s of waiting whether the writer process still exists (pid and start
    time), and raise ``ChannelBroken`` once it is gone and every completed step was delivered.
    The writer, when waiting under ``policy="block"``, reaps subscribers whose process died and
    releases their slots. Under ``"drop-oldest"`` a dead subscriber holds one slot at most and
    never stalls the writer.

Names and cleanup
    Segments are named ``dp-<64 random bits>-...``, created exclusively with mode 0600. A small
    channel file ``<dir>/<name>.json`` (``dir`` is private to the user, mode 0700) maps the
    channel name to those segments. The last one out (writer or subscriber) unlinks them; a
    writer opening any channel sweeps segments left by crashed processes.

Options
-------
rendezvous : int
    ``publish`` waits until this many subscribers are attached (default 0).
rendezvous_timeout : float
    Seconds to wait for them (default 60), then ``StepTimeoutError``.
block_timeout : float or None
    Under ``policy="block"``, seconds a write may wait for slow subscribers (default None:
    as long as they live), then ``StepTimeoutError``.
max_subscribers : int
    Size of the subscriber table (default 16, at most 1024).
dir : str or None
    Directory for channel files; default ``$DATAPLANE_SHM_DIR``, else
    ``$XDG_RUNTIME_DIR/dataplane``, else ``<tmp>/dataplane-<uid>``.
start_index : int
    Index of the first step this writer will publish (default 0), for writers that forward
    another channel's steps: subscribers attached before it count drops from there.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import secrets
import time
from typing import Any, NamedTuple

import numpy as np

from dataplane.errors import (
    ChannelBusyError,
    DataplaneError,
    OptionError,
    SchemaError,
    StepTimeoutError,
)
from dataplane.model import AttrValue, ChannelURL, VarSpec, check_name, check_seconds, check_timeout
from dataplane.transports import _posix
from dataplane.transports._shm_control import (
    _CLOSED,
    _FAILED,
    _OPEN,
    _POLICY_CODE,
    _POLL,
    _REAP_EVERY,
    _SLOT_GRANULE,
    _align,
    _Control,
    _deadline,
    _dir_lock,
    _left,
    _private_dir,
    _read_channel_file,
    _slot_name,
    _write_channel_file,
    default_dir,
    sweep,
)
from dataplane.transports._shm_reader import ShmReader
from dataplane.transports.base import Reader, Transport, Writer

__all__ = ["ShmTransport", "sweep"]


class ShmTransport(Transport):
    scheme = "shm"
    scope = "node"
    supports_drop_policy = True
    supports_zero_copy = True
    supports_replay = True

    def __init__(
        self,
        url: ChannelURL,
        *,
        rendezvous: int = 0,
        rendezvous_timeout: float = 60.0,
        block_timeout: float | None = None,
        max_subscribers: int = 16,
        dir: str | None = None,
        start_index: int = 0,
    ) -> None:
        super().__init__(url)
        self.start_index = int(start_index)
        self.name = check_name(url.path, "channel")
        if not 1 <= int(max_subscribers) <= 1024:
            raise OptionError(f"max_subscribers must be between 1 and 1024, got {max_subscribers}")
        if int(rendezvous) < 0 or int(rendezvous) > int(max_subscribers):
            raise OptionError(
                f"rendezvous must be between 0 and max_subscribers={max_subscribers}, "
                f"got {rendezvous}"
            )
        self.rendezvous = int(rendezvous)
        self.rendezvous_timeout = check_seconds(rendezvous_timeout, "rendezvous_timeout")
        self.block_timeout = check_timeout(block_timeout, "block_timeout")
        self.max_subscribers = int(max_subscribers)
        self.dir = dir or default_dir()

    @property
    def channel_file(self) -> str:
        return os.path.join(self.dir, f"{self.name}.json")

    def open_writer(self, *, policy: str, queue_limit: int, mode: str) -> Writer:
        if mode == "a":
            raise OptionError("shm:// streams are not stored, so there is nothing to append to")
        return _ShmWriter(self, policy, queue_limit)

    def open_reader(self, *, start: str, vars: tuple[str, ...] | None) -> Reader:
        return ShmReader(self, start)


class _Pending(NamedTuple):
    slot: int
    step: int
    views: dict[str, np.ndarray | None]
    vars_len: int
    attrs_len: int
    data_off: int


class _WriterSlot:
    """What the writer knows of one of its slots (it alone changes them)."""

    __slots__ = ("gen", "capacity", "mm", "head", "views")

    def __init__(self, gen: int = 0, capacity: int = 0, mm: Any = None) -> None:
        self.gen, self.capacity, self.mm = gen, capacity, mm
        self.head = b""  # metadata bytes currently at the start of the slot
        self.views: dict[tuple, dict[str, np.ndarray | None]] = {}


def choose_slot(
    seqs: list[int],
    capacities: list[int],
    pinned: set[int],
    min_cursor: int | None,
    queue_limit: int,
) -> int | None:
    """The slot the next step goes into, or None when it must wait.

    ``seqs``: the step each slot holds (-1: empty); ``capacities``: their sizes; ``pinned``:
    steps subscribers are reading; ``min_cursor``: the slowest subscriber's next step under
    ``policy="block"`` (None: none, or a policy that drops). A slot holding a step the
    slowest subscriber still needs, or one being read, is never taken; an empty slot is taken
    (the largest first) while fewer than ``queue_limit`` hold steps, else the oldest free one.
    """
    # NOTE: one pass, as a step costs microseconds; tests hold it to a plain statement of
    # these rules (tests/test_shm.py).
    unconsumed = empty = 0
    first_empty = largest_empty = slot = oldest = -1
    for i, seq in enumerate(seqs):
        if seq < 0:
            empty += 1
            if first_empty < 0:
                first_empty = largest_empty = i
            elif capacities[i] > capacities[largest_empty]:
                largest_empty = i
        elif min_cursor is not None and seq >= min_cursor:
            # Count the slowest subscriber's unconsumed steps rather than compare indices:
            # indices need not start at its cursor or be contiguous (appends, relays).
            unconsumed += 1
        elif seq not in pinned and (slot < 0 or seq < oldest):
            oldest, slot = seq, i
    if unconsumed >= queue_limit:
        return None
    if empty and len(seqs) - empty < queue_limit:
        return largest_empty  # prefer a slot that already has memory
    if slot >= 0:
        return slot
    return first_empty if empty else None


class _ShmWriter(Writer):
    def __init__(self, t: ShmTransport, policy: str, queue_limit: int) -> None:
        self._t = t
        self._policy = policy
        self._queue_limit = queue_limit
        self._pending: _Pending | None = None
        self._layouts: dict[tuple, tuple[bytes, dict[str, int], int]] = {}
        self._last_layout: tuple[dict, tuple[bytes, dict[str, int], int]] | None = None
        self._closed = False
        self._pid = os.getpid()
        self._last_reap = 0.0
        nslots = queue_limit + (1 if policy == "block" else t.max_subscribers)
        directory = _private_dir(t.dir)
        with _dir_lock(directory):
            sweep(directory)
            info = _read_channel_file(t.channel_file)
            if info is not None:
                self._refuse_if_live(info)
            self._token = secrets.token_hex(8)
            self._ctl = _Control.create(self._token, nslots, t.max_subscribers)
            self._seqs = [-1] * nslots
            self._wslots = [_WriterSlot() for _ in range(nslots)]
            self._capacities = [0] * nslots
            h = self._ctl.h
            h.policy, h.queue_limit = _POLICY_CODE[policy], queue_limit
            h.next_seq = t.start_index
            pid, start = _posix.my_identity()
            _write_channel_file(t.channel_file, {"token": self._token, "pid": pid, "start": start})
        if t.rendezvous:
            self._rendezvous()

    def _refuse_if_live(self, info: dict[str, Any]) -> None:
        try:
            ctl = _Control.attach(info["token"])
        except (FileNotFoundError, PermissionError):
            return
        try:
            with ctl.locked:
                live = ctl.h.state == _OPEN and ctl.writer_alive() and not ctl.h.unlinked
                pid = ctl.h.writer_pid
        finally:
            ctl.close()
        if live:
            raise ChannelBusyError(
                f"{self._t.url.url} already has a live writer (pid {pid}); one writer per "
                f"channel. Close it first or pick another name."
            )

    def _rendezvous(self) -> None:
        ctl, want = self._ctl, self._t.rendezvous
        deadline = _deadline(self._t.rendezvous_timeout)
        while True:
            with ctl.locked:
                ctl.reap()
                have = len(ctl.live_subscribers())
                seen = ctl.h.released
            if have >= want:
                return
            left = _left(deadline)
            if left == 0.0:
                self.close(failed=True)
                raise StepTimeoutError(
                    f"{self._t.url.url}: {have} of {want} subscribers attached within "
                    f"rendezvous_timeout={self._t.rendezvous_timeout}s"
                )
            ctl.wait("released", seen, min(left, _POLL))

    def _check_usable(self) -> None:
        if self._closed:
            raise DataplaneError(f"writer of {self._t.url.url} is closed")
        if _posix.current_pid() != self._pid:
            raise DataplaneError(
                f"writer of {self._t.url.url} was opened in process {self._pid}; open a new one "
                f"in this process"
            )

    def _choose(self, index: int) -> int | None:
        """Pick a slot for step ``index`` (under the lock), or None if it must wait."""
        ctl = self._ctl
        pinned = set()
        min_cursor = None
        for s in ctl.subs[: ctl.h.sub_hwm]:
            if s.active:
                pinned.add(s.current)  # -1 (none) matches no slot's step
                cursor = s.cursor
                if min_cursor is None or cursor < min_cursor:
                    min_cursor = cursor
        if self._policy != "block":
            min_cursor = None  # nothing is "needed": slow subscribers lose the oldest steps
        # The writer alone sets seq: its own copy.
        return choose_slot(self._seqs, self._capacities, pinned, min_cursor, self._queue_limit)

    def _acquire(self, index: int) -> int:
        ctl = self._ctl
        deadline = _deadline(self._t.block_timeout)
        while True:
            with ctl.locked:
                slot = self._choose(index)
                if slot is None and time.monotonic() - self._last_reap > _REAP_EVERY:
                    self._last_reap = time.monotonic()
                    if ctl.reap():
                        slot = self._choose(index)
                if slot is not None:
                    ctl.slots[slot].seq = self._seqs[slot] = -1  # readers skip it from now
                    return slot
                seen = ctl.h.released
            left = _left(deadline)
            if left == 0.0:
                raise StepTimeoutError(
                    f"{self._t.url.url}: subscribers did not free a slot for step {index} within "
                    f"block_timeout={self._t.block_timeout}s (policy='block', "
                    f"queue_limit={self._queue_limit})"
                )
            ctl.wait("released", seen, min(left, _POLL))

    def _slot_memory(self, slot: int, size: int) -> _WriterSlot:
        """The writer's mapping of ``slot``, replaced by a larger segment if ``size`` won't fit."""
        ws = self._wslots[slot]
        if ws.capacity >= size:
            return ws
        cap = _align(max(size, int(ws.capacity * 1.5), 1), _SLOT_GRANULE)
        fd, mm = _posix.create_segment(_slot_name(self._token, slot, ws.gen + 1), cap)
        os.close(fd)
        with self._ctl.locked:
            s = self._ctl.slots[slot]
            s.gen, s.capacity = ws.gen + 1, cap
        if ws.capacity:
            _posix.unlink_segment(_slot_name(self._token, slot, ws.gen))
        self._wslots[slot] = ws = _WriterSlot(ws.gen + 1, cap, mm)
        self._capacities[slot] = cap
        return ws

    def _layout(self, specs: dict[str, VarSpec]) -> tuple[bytes, dict[str, int], int]:
        """Variables' JSON, offsets and data size; cached, as steps usually repeat their layout
        (the publisher passes a repeated layout as the same dict)."""
        last = self._last_layout
        if last is not None and last[0] is specs:
            return last[1]
        key = tuple((n, sp.dtype, sp.shape) for n, sp in specs.items())
        hit = self._layouts.get(key)
        if hit is None:
            offsets: dict[str, int] = {}
            entries, offset = [], 0
            for name, spec in specs.items():
                offsets[name] = offset
                entries.append([name, spec.dtype.str, list(spec.shape), offset])
                offset = _align(offset + spec.nbytes)
            hit = (json.dumps(entries).encode(), offsets, offset)
            if len(self._layouts) > 64:
                self._layouts.clear()
            self._layouts[key] = hit
        self._last_layout = (specs, hit)
        return hit

    def begin_step(
        self, index: int, specs: dict[str, VarSpec], attrs: dict[str, AttrValue]
    ) -> None:
        self._pending = self._begin(index, specs, attrs)

    def put(self, name: str, array: np.ndarray) -> None:
        p = self._pending
        if p is None:
            raise DataplaneError("put() outside a step")
        dst = p.views[name]
        if dst is not None:
            np.copyto(dst, array, casting="no")

    def end_step(self) -> None:
        p = self._pending
        if p is None:
            raise DataplaneError("end_step() outside a step")
        self._pending = None
        self._publish(p)

    def write_step(
        self,
        index: int,
        specs: dict[str, VarSpec],
        arrays: list[tuple[str, np.ndarray]],
        attrs: dict[str, AttrValue],
    ) -> None:
        # begin, put and end in one call: small steps cost microseconds of Python each.
        p = self._begin(index, specs, attrs)
        views = p.views
        for name, arr in arrays:
            dst = views[name]
            if dst is not None:
                np.copyto(dst, arr, casting="no")
        # An error above publishes nothing: the slot was retired when it was taken.
        self._publish(p)

    def _begin(
        self, index: int, specs: dict[str, VarSpec], attrs: dict[str, AttrValue]
    ) -> _Pending:
        """Take a slot for step ``index`` and lay the step out in it."""
        self._check_usable()
        vars_json, offsets, size = self._layout(specs)
        attrs_json = json.dumps(attrs).encode() if attrs else b"{}"
        head = vars_json + attrs_json
        data_off = _align(len(head))
        slot = self._acquire(index)
        try:
            ws = self._slot_memory(slot, data_off + size)
        except BaseException:
            self._release_unused(slot)
            raise
        if ws.head != head:
            ws.mm[: len(head)] = head
            ws.head = head
        # Keyed by the layout's JSON (names, dtypes, shapes, offsets): the cached bytes object
        # keeps its hash, where the spec tuples would be hashed again every step.
        views = ws.views.get((vars_json, data_off))
        if views is None:
            # Destination arrays over the slot, made once per layout and reused every lap.
            views = {
                name: np.ndarray(
                    spec.shape, spec.dtype, buffer=ws.mm, offset=data_off + offsets[name]
                )
                if spec.size
                else None
                for name, spec in specs.items()
            }
            if len(ws.views) > 8:
                ws.views.clear()
            ws.views[(vars_json, data_off)] = views
        return _Pending(slot, index, views, len(vars_json), len(attrs_json), data_off)

    def _publish(self, p: _Pending) -> None:
        ctl = self._ctl
        with ctl.locked:
            s = ctl.slots[p.slot]
            s.vars_len, s.attrs_len, s.data_off = p.vars_len, p.attrs_len, p.data_off
            s.seq = self._seqs[p.slot] = p.step
            ctl.h.next_seq = p.step + 1
            ctl.bump("published")

    def _release_unused(self, slot: int) -> None:
        with self._ctl.locked:
            self._ctl.slots[slot].seq = self._seqs[slot] = -1

    def abort_step(self) -> None:
        # The slot was retired (seq = -1) when it was taken; nothing of the step is visible.
        self._pending = None

    def set_attrs(self, attrs: dict[str, AttrValue]) -> None:
        self._check_usable()
        data = json.dumps(attrs, allow_nan=True).encode()
        ctl = self._ctl
        if len(data) > ctl.h.attrs_cap:
            raise SchemaError(
                f"{self._t.url.url}: channel attributes take {len(data)} bytes as JSON; the "
                f"limit is {ctl.h.attrs_cap}. Put large values in a variable instead."
            )
        with ctl.locked:
            ctypes.memmove(ctl.attrs_addr, data, len(data))
            ctl.h.attrs_len = len(data)

    def close(self, failed: bool = False) -> None:
        if self._closed:
            return
        self._closed = True
        self._pending = None
        if os.getpid() != self._pid:
            return  # a forked child: the channel belongs to the parent
        ctl = self._ctl
        with ctl.locked:
            ctl.h.state = _FAILED if failed else _CLOSED
            ctl.reap()
            if not ctl.live_subscribers():
                ctl.unlink_all()
            ctl.bump("published")
        with _dir_lock(self._t.dir):
            info = _read_channel_file(self._t.channel_file)
            if info is not None and info["token"] == self._token:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self._t.channel_file)
        self._wslots = []
        ctl.close()
