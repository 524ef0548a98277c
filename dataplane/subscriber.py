"""``Subscriber`` (steps as they are published) and ``Archive`` (stored steps, any order)."""

from __future__ import annotations

import os
import weakref
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from dataplane.errors import DataplaneError, SchemaError, StepTimeoutError
from dataplane.model import AttrValue, Step, StepMeta, VarSpec, check_timeout
from dataplane.parallel.plan import split
from dataplane.transports.base import Archive as _ArchiveImpl
from dataplane.transports.base import Located, Reader, Transport

__all__ = ["Archive", "Subscriber", "SubscriberStats"]

_UNSET: Any = object()


@dataclass(frozen=True)
class SubscriberStats:
    """What a subscriber has received so far."""

    steps: int = 0
    #: Steps the writer published that this subscriber never saw (dropping policies only).
    dropped: int = 0
    #: Bytes of the (selected) variables of the received steps.
    bytes: int = 0

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


class Subscriber:
    """Iterates over the steps of one channel, in order, each complete step once.

    The :class:`Step` it yields is valid until the next one is taken: zero-copy transports
    reuse its memory afterwards. Copy arrays you want to keep.
    """

    def __init__(
        self,
        transport: Transport,
        reader: Reader,
        *,
        vars: tuple[str, ...] | None = None,
        timeout: float | None = None,
    ) -> None:
        self.transport = transport
        self.url = transport.url.url
        self.timeout = timeout
        self._reader = reader
        self._vars = vars
        self._current: int | None = None  # index of the step that may be read now
        self._serial = 0
        self._last_index: int | None = None
        self._steps = self._dropped = self._bytes = 0
        self._sized: tuple[dict[str, Any] | None, int] = (None, 0)  # a layout and its bytes
        self._ended = False
        self._closed = False
        self._finalizer = weakref.finalize(self, reader.close)
        #: The mpi4py communicator of ``subscribe(comm=...)``, which :meth:`part` splits over.
        self.comm: Any = None

    @property
    def stats(self) -> SubscriberStats:
        return SubscriberStats(self._steps, self._dropped, self._bytes)

    @property
    def attrs(self) -> dict[str, AttrValue]:
        """Channel-level attributes as last published by the writer."""
        self._check_open()
        return self._reader.attrs()

    @property
    def ended(self) -> bool:
        """True once the writer closed and every step was delivered."""
        return self._ended

    def _check_open(self) -> None:
        if self._closed:
            raise DataplaneError(f"subscriber of {self.url} is closed")

    def __iter__(self) -> Subscriber:
        return self

    def __next__(self) -> Step:
        step = self.next()
        if step is None:
            raise StopIteration
        return step

    def next(self, timeout: float | None = _UNSET) -> Step | None:
        """The next step, or ``None`` at end of stream.

        Raises ``StepTimeoutError`` when no step arrives within ``timeout`` (default: the
        subscriber's) and ``ChannelBroken`` when the writer is gone.
        """
        self._check_open()
        if self._ended:
            return None
        wait = self.timeout if timeout is _UNSET else check_timeout(timeout)
        self._serial += 1  # invalidates the previous Step before its memory is released
        meta = self._reader.next_step(wait)
        if meta is None:
            self._ended = True
            return None
        return self._deliver(meta)

    def part(self, step: Step, name: str, axes: int | Iterable[int] = 0) -> np.ndarray:
        """This rank's part of ``step[name]``: an even split of the global array over the
        ranks of ``comm`` (rows by default; several ``axes`` cut a grid), read as a hyperslab,
        however the writer's ranks decomposed it. See :func:`dataplane.split`."""
        rank, size = (0, 1) if self.comm is None else (self.comm.Get_rank(), self.comm.Get_size())
        if name not in step.vars:
            return step[name]  # raises VariableNotFoundError, listing the variables
        return step.read(name, *split(step.vars[name].shape, size, rank, axes))

    def poll(self, timeout: float = 0.0) -> Step | None:
        """The next step if one arrives within ``timeout`` (default: only if one is ready),
        else ``None``. For steering loops that check a control channel between their own steps.
        """
        try:
            return self.next(timeout)
        except StepTimeoutError:
            return None

    def _deliver(self, meta: StepMeta) -> Step:
        if self._vars is not None:
            meta = StepMeta(
                meta.index, meta.attrs, {k: v for k, v in meta.vars.items() if k in self._vars}
            )
        if self._last_index is not None:
            expected: int | None = self._last_index + 1
        else:
            expected = self._reader.first_index
        if expected is not None and meta.index > expected:
            self._dropped += meta.index - expected
        self._last_index = meta.index
        self._steps += 1
        if meta.vars is not self._sized[0]:  # transports reuse one dict for a repeated layout
            self._sized = (meta.vars, sum(spec.nbytes for spec in meta.vars.values()))
        self._bytes += self._sized[1]
        serial = self._serial
        return Step(
            meta,
            self._reader.get,
            channel=self.url,
            valid=lambda: self._serial == serial and not self._closed,
        )

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._finalizer.detach()
        self._reader.close()

    def __enter__(self) -> Subscriber:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<Subscriber {self.url} {self.stats}>"


def _close_in(pid: int, impl: _ArchiveImpl) -> None:
    if os.getpid() == pid:
        impl.close()


class Archive:
    """Stored steps of a channel, readable in any order."""

    def __init__(self, transport: Transport, impl: _ArchiveImpl) -> None:
        self.transport = transport
        self.url = transport.url.url
        self._impl = impl
        # Dropped without close(): its file is let go all the same (by the process that
        # opened it; a forked copy's handles are its parent's).
        self._finalizer = weakref.finalize(self, _close_in, os.getpid(), impl)

    def __len__(self) -> int:
        return len(self._impl)

    @property
    def vars(self) -> dict[str, VarSpec]:
        return self._impl.vars()

    @property
    def attrs(self) -> dict[str, AttrValue]:
        return self._impl.attrs()

    @property
    def written_by(self) -> dict[str, Any] | None:
        """How MPI ranks wrote the channel: ``ranks``, ``method`` (``"aggregators"``: the
        ranks' blocks went to aggregators in pieces, ``"own-chunks"``: each rank wrote its
        own chunks), ``aggregators`` and ``files`` (relative to the channel's folder); None
        for a channel one process wrote, or a format that does not record it."""
        return self._impl.written_by()

    def _index(self, step: int) -> int:
        n = len(self._impl)
        if isinstance(step, bool) or not isinstance(step, (int, np.integer)):
            raise SchemaError(f"step must be an integer, got {step!r}")
        i = int(step) + n if step < 0 else int(step)
        if not 0 <= i < n:
            raise SchemaError(f"step {step} is out of range: {self.url} has {n} steps")
        return i

    def __getitem__(self, step: int) -> Step:
        i = self._index(step)
        return Step(
            self._impl.meta(i), lambda name, sel: self._impl.get(i, name, sel), channel=self.url
        )

    def __iter__(self) -> Iterator[Step]:
        for i in range(len(self)):
            yield self[i]

    def read(self, name: str, step: int, start: Any = None, count: Any = None) -> np.ndarray:
        """Read a hyperslab of variable ``name`` in step ``step``."""
        return self[step].read(name, start, count)

    def version(self, step: int) -> str | None:
        """A string that changes whenever step ``step``'s content does (its checksums, or the
        file's size and modification time for files dataplane did not write); None when
        nothing tells. Caches key on it."""
        return self._impl.version(self._index(step))

    def locate(self, step: int) -> dict[str, Located] | None:
        """Where each variable of step ``step`` lies as raw bytes in the channel's file, or
        None where the format or the layout has no such place (see
        :class:`~dataplane.transports.base.Located`; read with
        :func:`dataplane.api.read_located`)."""
        return self._impl.locate(self._index(step))

    def close(self) -> None:
        self._finalizer()

    def __enter__(self) -> Archive:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<Archive {self.url} steps={len(self)}>"
