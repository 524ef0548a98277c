"""The ``shm://`` subscriber: attaches to a channel, takes steps as read-only views of their
slots and releases each one when the next is taken."""

from __future__ import annotations

import json
import os
import time
from types import MappingProxyType
from typing import Any, Protocol

import numpy as np

from dataplane.errors import ChannelBroken, DataplaneError, StepTimeoutError
from dataplane.model import AttrValue, ChannelURL, Selection, StepMeta, VarSpec
from dataplane.transports import _posix
from dataplane.transports._shm_control import (
    _CLOSED,
    _FAILED,
    _OPEN,
    _POLL,
    _Control,
    _deadline,
    _ForeignLayout,
    _left,
    _read_channel_file,
    _slot_name,
)
from dataplane.transports.base import Reader


class ShmTarget(Protocol):
    """What a reader needs of its transport."""

    url: ChannelURL

    @property
    def channel_file(self) -> str: ...


_NONE: Any = MappingProxyType({})  # no step's arrays (read-only: nothing lands in it)


class ShmReader(Reader):
    def __init__(self, t: ShmTarget, start: str) -> None:
        self._t = t
        self._start = start
        self._ctl: _Control | None = None
        self._me = -1
        self._maps: dict[int, tuple[int, Any]] = {}  # slot -> (gen, read-only mmap)
        self._cur_mm: Any = None
        self._cur_off = 0
        self._cur_vars: dict[str, tuple[VarSpec, int]] = {}
        # slot -> (gen, data offset, arrays over it): a slot's views, made once per layout.
        self._views: dict[int, tuple[int, int, dict[str, np.ndarray]]] = {}
        self._cur_views: dict[str, np.ndarray] = {}
        self._vars_raw = b""
        self._vars_layout: dict[str, tuple[VarSpec, int]] = {}
        self._vars_specs: dict[str, VarSpec] = {}
        self._closed = False
        self._pid = os.getpid()
        self._writer_pid = 0
        self._alive_checked = 0.0
        # Connect now if the channel exists, so steps written from now on are kept for us.
        self._connect(None, wait=False)

    def _connect(self, deadline: float | None, *, wait: bool = True) -> bool:
        """Attach to the channel and register; with ``wait``, until ``deadline``."""
        while True:
            info = _read_channel_file(self._t.channel_file)
            if info is not None:
                try:
                    ctl = _Control.attach(info["token"])
                except _ForeignLayout as exc:
                    raise DataplaneError(
                        f"{self._t.url.url}: its writer runs another version of dataplane "
                        f"({exc}); use one version on both sides"
                    ) from None
                except FileNotFoundError:
                    ctl = None
                if ctl is not None and self._register(ctl):
                    return True
            if not wait:
                return False
            left = _left(deadline)
            if left == 0.0:
                return False
            time.sleep(min(left, 0.02))

    def _register(self, ctl: _Control) -> bool:
        """Take a row of the subscriber table of a live channel; False if it is not live."""
        free: int | None = None
        live = False
        with ctl.locked:
            h = ctl.h
            # A channel whose writer closed or died is not joined: a new writer may come.
            live = not h.unlinked and h.state == _OPEN and ctl.writer_alive()
            if live:
                free = next((i for i, s in enumerate(ctl.subs) if not s.active), None)
                if free is None and ctl.reap():
                    free = next((i for i, s in enumerate(ctl.subs) if not s.active), None)
            if free is not None:
                s = ctl.subs[free]
                kept = [sl.seq for sl in ctl.slots if sl.seq >= 0]
                s.cursor = min(kept) if (self._start == "first" and kept) else h.next_seq
                self.first_index = s.cursor
                s.current = -1
                s.pid, s.start = _posix.my_identity()
                s.active = 1
                h.sub_hwm = max(h.sub_hwm, free + 1)
                self._writer_pid = h.writer_pid
                ctl.bump("released")
        if free is None:
            nsubs = ctl.h.nsubs
            ctl.close()
            if live:
                raise DataplaneError(
                    f"{self._t.url.url} already has {nsubs} subscribers; open the publisher "
                    f"with max_subscribers=N for more"
                )
            return False
        self._ctl, self._me = ctl, free
        self._alive_checked = time.monotonic()
        return True

    def next_step(self, timeout: float | None) -> StepMeta | None:
        if _posix.current_pid() != self._pid:
            raise DataplaneError(
                f"subscriber of {self._t.url.url} was opened in process {self._pid}; subscribe "
                f"again in this process"
            )
        self._cur_mm, self._cur_vars, self._cur_views = None, _NONE, _NONE
        # The deadline is set when a look finds nothing (most steps are there at once).
        deadline, waiting = None, self._ctl is None
        if waiting:
            deadline = _deadline(timeout)
            if not self._connect(deadline):
                raise StepTimeoutError(
                    f"{self._t.url.url}: no writer opened the channel within {timeout}s "
                    f"(looked for {self._t.channel_file})"
                )
        ctl = self._ctl
        assert ctl is not None
        me = ctl.subs[self._me]
        while True:
            found = None
            with ctl.locked:
                if not me.active or me.pid != self._pid:  # (this process: checked above)
                    raise ChannelBroken(
                        f"{self._t.url.url}: this subscriber was removed from the channel "
                        f"(its process looked dead to the writer)"
                    )
                moved = me.current >= 0
                me.current = -1
                best, best_seq, cursor = -1, -1, me.cursor
                for i, sl in enumerate(ctl.slots):
                    seq = sl.seq
                    if seq >= cursor and (best < 0 or seq < best_seq):
                        best, best_seq = i, seq
                if best >= 0:
                    sl = ctl.slots[best]
                    me.current, me.cursor = best_seq, best_seq + 1
                    found = (best, sl.gen, best_seq, sl.vars_len, sl.attrs_len, sl.data_off)
                    moved = True
                if moved:
                    ctl.bump("released")
                state, seen = ctl.h.state, ctl.h.published
            if found is not None:
                return self._load(*found)
            if state == _CLOSED:
                return None
            if state == _FAILED:
                raise ChannelBroken(
                    f"{self._t.url.url}: the writer failed (raised inside its 'with' block or was "
                    f"abandoned without close()); every step it completed was delivered"
                )
            if not waiting:
                deadline, waiting = _deadline(timeout), True
            now = time.monotonic()
            if now - self._alive_checked >= _POLL:
                self._alive_checked = now
                if not ctl.writer_alive():
                    raise ChannelBroken(
                        f"{self._t.url.url}: the writer process (pid {self._writer_pid}) died; "
                        f"every step it completed was delivered"
                    )
            left = _left(deadline)
            if left == 0.0:
                raise StepTimeoutError(
                    f"{self._t.url.url}: no step after {me.cursor - 1} within {timeout}s (the "
                    f"writer, pid {self._writer_pid}, is alive)"
                )
            ctl.wait("published", seen, min(left, _POLL))

    def _load(
        self, slot: int, gen: int, seq: int, vars_len: int, attrs_len: int, data_off: int
    ) -> StepMeta:
        assert self._ctl is not None
        known = self._maps.get(slot)
        if known is None or known[0] != gen:
            try:
                fd, mm = _posix.open_segment(_slot_name(self._ctl.token, slot, gen), writable=False)
            except FileNotFoundError:
                raise ChannelBroken(
                    f"{self._t.url.url}: the segment of step {seq} is gone (the channel was "
                    f"cleaned up after its writer died)"
                ) from None
            os.close(fd)
            self._maps[slot] = known = (gen, mm)
        mm = known[1]
        raw_vars = mm[:vars_len]
        if raw_vars != self._vars_raw:
            entries = json.loads(raw_vars)
            self._vars_raw = raw_vars
            self._vars_layout = {
                e[0]: (VarSpec(np.dtype(e[1]), tuple(e[2])), e[3]) for e in entries
            }
            self._vars_specs = {k: v[0] for k, v in self._vars_layout.items()}
            self._views.clear()
        attrs = json.loads(mm[vars_len : vars_len + attrs_len]) if attrs_len > 2 else {}
        self._cur_mm, self._cur_off, self._cur_vars = mm, data_off, self._vars_layout
        views = self._views.get(slot)
        if views is None or views[0] != gen or views[1] != data_off:
            views = self._views[slot] = (gen, data_off, {})
        self._cur_views = views[2]
        return StepMeta(seq, attrs, self._vars_specs)

    def get(self, name: str, selection: Selection) -> np.ndarray:
        arr = self._cur_views.get(name)
        if arr is None:
            spec, off = self._cur_vars[name]
            if spec.size == 0:
                arr = np.empty(spec.shape, spec.dtype)
                arr.flags.writeable = False
            else:
                arr = np.frombuffer(
                    self._cur_mm, spec.dtype, count=spec.size, offset=self._cur_off + off
                ).reshape(spec.shape)
            self._cur_views[name] = arr
        return selection.apply(arr)

    def attrs(self) -> dict[str, AttrValue]:
        if self._ctl is None:
            return {}
        with self._ctl.locked:
            return self._ctl.read_attrs()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._cur_mm, self._cur_vars, self._cur_views = None, {}, {}
        self._views.clear()
        self._maps.clear()
        ctl = self._ctl
        if ctl is None or os.getpid() != self._pid:
            return
        with ctl.locked:
            me = ctl.subs[self._me]
            if me.active and me.pid == _posix.my_identity()[0]:
                me.active, me.current = 0, -1
            writer_done = ctl.h.state != _OPEN or not ctl.writer_alive()
            if writer_done and not ctl.h.unlinked:
                ctl.reap()
                if not ctl.live_subscribers():
                    ctl.unlink_all()  # the last one out after the writer ended, or crashed
            ctl.bump("released")
        ctl.close()
