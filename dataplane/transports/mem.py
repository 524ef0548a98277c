"""``mem://name``: an in-process channel between threads.

The writer's arrays are copied once into read-only arrays that every subscriber shares (zero
copies out). The channel keeps the last ``queue_limit`` steps: under ``policy="block"`` the
writer waits while a subscriber has that many unconsumed; under ``"drop-oldest"`` it never
waits and a slow subscriber skips to the oldest step still kept (the gap shows in
``step.index`` and ``sub.stats.dropped``).

Options
-------
rendezvous : int
    The writer's open waits until this many subscribers are attached (default 0).
rendezvous_timeout : float
    Seconds to wait for them before ``StepTimeoutError`` (default 60).
block_timeout : float or None
    Under ``policy="block"``, seconds a write may wait for subscribers before
    ``StepTimeoutError`` (default None: wait as long as they live).
"""

from __future__ import annotations

import threading
import time
from collections import deque

import numpy as np

from dataplane.errors import ChannelBroken, ChannelBusyError, DataplaneError, StepTimeoutError
from dataplane.model import (
    AttrValue,
    ChannelURL,
    Selection,
    StepMeta,
    VarSpec,
    check_name,
    check_seconds,
    check_timeout,
)
from dataplane.transports.base import Reader, Transport, Writer

__all__ = ["MemTransport"]

_WAITING, _OPEN, _CLOSED, _FAILED = "waiting", "open", "closed", "failed"


class _Channel:
    def __init__(self, name: str) -> None:
        self.name = name
        self.cond = threading.Condition()
        self.state = _WAITING
        self.policy = "block"
        self.queue_limit = 1
        self.steps: deque[tuple[StepMeta, dict[str, np.ndarray]]] = deque()
        self.cursors: dict[int, int] = {}  # reader id -> next index it wants
        self.attrs: dict[str, AttrValue] = {}
        self.next_index = 0

    def first_kept(self) -> int:
        return self.steps[0][0].index if self.steps else self.next_index


_channels: dict[str, _Channel] = {}
_channels_lock = threading.Lock()


def _deadline(timeout: float | None) -> float | None:
    return None if timeout is None else time.monotonic() + timeout


def _remaining(deadline: float | None) -> float | None:
    return None if deadline is None else max(0.0, deadline - time.monotonic())


class MemTransport(Transport):
    scheme = "mem"
    scope = "process"
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
    ) -> None:
        super().__init__(url)
        self.name = check_name(url.path, "channel")
        if rendezvous < 0:
            raise DataplaneError(f"rendezvous must be >= 0, got {rendezvous}")
        self.rendezvous = int(rendezvous)
        self.rendezvous_timeout = check_seconds(rendezvous_timeout, "rendezvous_timeout")
        self.block_timeout = check_timeout(block_timeout, "block_timeout")

    def open_writer(self, *, policy: str, queue_limit: int, mode: str) -> Writer:
        if mode == "a":
            raise DataplaneError("mem:// streams are not stored, so there is nothing to append to")
        with _channels_lock:
            ch = _channels.get(self.name)
            if ch is not None and ch.state == _OPEN:
                raise ChannelBusyError(
                    f"{self.url.url} already has a writer; one writer per channel"
                )
            if ch is None or ch.state != _WAITING:
                ch = _channels[self.name] = _Channel(self.name)
            with ch.cond:
                ch.state, ch.policy, ch.queue_limit = _OPEN, policy, queue_limit
        writer = _MemWriter(self, ch)
        with ch.cond:
            if not ch.cond.wait_for(
                lambda: len(ch.cursors) >= self.rendezvous, self.rendezvous_timeout
            ):
                writer.close(failed=True)
                raise StepTimeoutError(
                    f"{self.url.url}: {len(ch.cursors)} of {self.rendezvous} subscribers attached "
                    f"within rendezvous_timeout={self.rendezvous_timeout}s"
                )
        return writer

    def open_reader(self, *, start: str, vars: tuple[str, ...] | None) -> Reader:
        with _channels_lock:
            ch = _channels.get(self.name)
            if ch is None:
                ch = _channels[self.name] = _Channel(self.name)
        return _MemReader(self, ch, start)


class _MemWriter(Writer):
    def __init__(self, transport: MemTransport, ch: _Channel) -> None:
        self._t = transport
        self._ch = ch
        self._pending: tuple[StepMeta, dict[str, np.ndarray]] | None = None
        self._closed = False

    def begin_step(
        self, index: int, specs: dict[str, VarSpec], attrs: dict[str, AttrValue]
    ) -> None:
        ch = self._ch
        if ch.policy == "block":
            with ch.cond:
                # Unconsumed steps per subscriber, not index arithmetic (indices may jump).
                ok = ch.cond.wait_for(
                    lambda: all(
                        sum(1 for meta, _ in ch.steps if meta.index >= c) < ch.queue_limit
                        for c in ch.cursors.values()
                    ),
                    self._t.block_timeout,
                )
            if not ok:
                raise StepTimeoutError(
                    f"{self._t.url.url}: a subscriber did not consume its steps "
                    f"within block_timeout={self._t.block_timeout}s"
                )
        self._pending = (StepMeta(index, attrs, specs), {})

    def put(self, name: str, array: np.ndarray) -> None:
        if self._pending is None:
            raise DataplaneError("put() outside a step")
        copy = np.array(array, order="C", copy=True)
        copy.flags.writeable = False
        self._pending[1][name] = copy

    def end_step(self) -> None:
        if self._pending is None:
            raise DataplaneError("end_step() outside a step")
        ch, step = self._ch, self._pending
        self._pending = None
        with ch.cond:
            ch.steps.append(step)
            ch.next_index = step[0].index + 1
            while len(ch.steps) > ch.queue_limit:
                ch.steps.popleft()
            ch.cond.notify_all()

    def abort_step(self) -> None:
        self._pending = None

    def set_attrs(self, attrs: dict[str, AttrValue]) -> None:
        with self._ch.cond:
            self._ch.attrs = dict(attrs)

    def close(self, failed: bool = False) -> None:
        if self._closed:
            return
        self._closed = True
        self._pending = None
        ch = self._ch
        with _channels_lock:
            if _channels.get(ch.name) is ch:
                del _channels[ch.name]
        with ch.cond:
            ch.state = _FAILED if failed else _CLOSED
            ch.cond.notify_all()


class _MemReader(Reader):
    def __init__(self, transport: MemTransport, ch: _Channel, start: str) -> None:
        self._t = transport
        self._ch = ch
        self._current: dict[str, np.ndarray] = {}
        self._closed = False
        with ch.cond:
            self.first_index = ch.first_kept() if start == "first" else ch.next_index
            ch.cursors[id(self)] = self.first_index
            ch.cond.notify_all()

    def next_step(self, timeout: float | None) -> StepMeta | None:
        ch, me = self._ch, id(self)
        self._current = {}
        deadline = _deadline(timeout)
        with ch.cond:
            while True:
                cursor = ch.cursors[me]
                pos = max(0, cursor - ch.first_kept())
                if pos < len(ch.steps):
                    meta, arrays = ch.steps[pos]
                    ch.cursors[me] = meta.index + 1
                    ch.cond.notify_all()
                    self._current = arrays
                    return meta
                if ch.state == _CLOSED:
                    return None
                if ch.state == _FAILED:
                    raise ChannelBroken(
                        f"{self._t.url.url}: the writer failed or was abandoned without close(); "
                        f"every step it completed was delivered"
                    )
                left = _remaining(deadline)
                if left == 0.0:
                    raise StepTimeoutError(
                        f"{self._t.url.url}: no step after {cursor - 1} within {timeout}s "
                        f"(the writer is {'not there yet' if ch.state == _WAITING else 'alive'})"
                    )
                ch.cond.wait(left)

    def get(self, name: str, selection: Selection) -> np.ndarray:
        return selection.apply(self._current[name])

    def attrs(self) -> dict[str, AttrValue]:
        with self._ch.cond:
            return dict(self._ch.attrs)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._current = {}
        ch = self._ch
        with ch.cond:
            ch.cursors.pop(id(self), None)
            ch.cond.notify_all()
        with _channels_lock:
            if _channels.get(ch.name) is ch and ch.state == _WAITING and not ch.cursors:
                del _channels[ch.name]
