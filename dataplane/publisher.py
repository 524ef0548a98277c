"""``Publisher``: writes the steps of one channel through a transport's writer, with the
checks every transport shares (the dtype-per-variable rule, channel attributes, a full disk
said plainly) and, on request, asynchronously."""

from __future__ import annotations

import errno
import queue
import threading
import weakref
from collections.abc import Iterable, Iterator, Mapping, MutableMapping
from typing import Any

import numpy as np

from dataplane.errors import DataplaneError, OptionError, SchemaError, StorageFullError, Terminated
from dataplane.model import AttrValue, Block, VarSpec, as_array, check_attrs, check_name
from dataplane.transports.base import RankedWriter, Transport, Writer

__all__ = ["ChannelAttrs", "Publisher"]

#: Steps an asynchronous publisher may hold in staging before ``write`` waits.
ASYNC_STAGING_STEPS = 2


class ChannelAttrs(MutableMapping[str, AttrValue]):
    """Channel-level attributes of a publisher; checked on assignment, sent with the next step
    and at close."""

    def __init__(self) -> None:
        self._data: dict[str, AttrValue] = {}
        self.dirty = False

    def __setitem__(self, key: str, value: Any) -> None:
        self._data.update(check_attrs({key: value}))
        self.dirty = True

    def __getitem__(self, key: str) -> AttrValue:
        return self._data[key]

    def __delitem__(self, key: str) -> None:
        del self._data[key]
        self.dirty = True

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def snapshot(self) -> dict[str, AttrValue]:
        return dict(self._data)

    def __repr__(self) -> str:
        return f"ChannelAttrs({self._data!r})"


_Prepared = tuple[dict[str, VarSpec], list[tuple[str, np.ndarray]], dict[str, AttrValue]]


class Publisher:
    """Writes steps to one channel. Use as a context manager, or call :meth:`close`."""

    def __init__(self, transport: Transport, writer: Writer, *, asynchronous: bool = False):
        self.transport = transport
        self.url = transport.url.url
        self.attrs = ChannelAttrs()
        self._writer = writer
        self._index = writer.next_index
        self._first_seen: dict[str, tuple[np.dtype, int]] = {
            name: (spec.dtype, -1) for name, spec in writer.known_vars().items()
        }
        self._names_ok: set[str] = set()
        # The last step's names and specs: a step laid out the same skips their checks.
        self._last: tuple[tuple[str, ...], dict[str, VarSpec]] | None = None
        self._closed = False
        self._async: _AsyncWriter | None = None
        if asynchronous:
            self._async = _AsyncWriter(self)
        # A publisher dropped without close() leaves a broken channel, not a quiet end.
        self._finalizer = weakref.finalize(self, _abandon, writer, self._async)

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def next_index(self) -> int:
        """Index the next written step will get."""
        return self._index

    def write(
        self,
        data: Mapping[str, Any] | Iterable[tuple[str, Any]],
        attrs: Mapping[str, Any] | None = None,
    ) -> int:
        """Publish one step of named arrays; returns its index.

        ``data`` maps names to numpy arrays, CPU torch tensors, numbers or :class:`Block`.
        The step becomes visible to readers all at once, after every array is written.
        """
        if self._closed:
            raise DataplaneError(f"publisher of {self.url} is closed")
        repeat = self._repeat(data) if attrs is None else None
        specs, arrays, step_attrs = repeat if repeat is not None else self._prepare(data, attrs)
        index = self._index
        if self._async is not None:
            self._async.submit(index, specs, arrays, step_attrs, self._channel_attrs())
        else:
            try:
                write_step(self._writer, index, specs, arrays, step_attrs, self._channel_attrs())
            except OSError as exc:
                raise storage_full(exc, self.url, index) from exc
        self._index += 1
        if repeat is None:
            for name, spec in specs.items():
                self._first_seen.setdefault(name, (spec.dtype, index))
            self._last = (tuple(specs), specs)
        return index

    def _repeat(self, data: Any) -> _Prepared | None:
        """``data`` checked as the last step was, if it has its layout (the same names in the
        same order, plain arrays or numpy scalars of the same dtypes and shapes), else None.
        Simulations write the same layout every step: this is most steps' whole check."""
        last = self._last
        if last is None or type(data) is not dict or len(data) != len(last[0]):
            return None
        arrays: list[tuple[str, np.ndarray]] = []
        specs = last[1]
        for (name, value), want in zip(data.items(), last[0]):
            if name != want:
                return None
            if type(value) is np.ndarray:
                arr = value
            elif isinstance(value, np.generic):
                arr = np.asarray(value)
            else:
                return None
            spec = specs[name]
            if arr.dtype != spec.dtype or arr.shape != spec.shape:
                return None
            arrays.append((name, arr))
        return specs, arrays, {}

    def _channel_attrs(self) -> dict[str, AttrValue] | None:
        if not self.attrs.dirty:
            return None
        self.attrs.dirty = False
        return self.attrs.snapshot()

    def _prepare(self, data: Any, attrs: Mapping[str, Any] | None) -> _Prepared:
        if isinstance(data, Mapping):
            items = list(data.items())
        elif isinstance(data, (str, bytes)) or not isinstance(data, Iterable):
            raise SchemaError(
                f"write() takes a mapping of variable name to array, got {type(data).__name__}"
            )
        else:
            items = []
            for item in data:
                if not (isinstance(item, tuple) and len(item) == 2):
                    raise SchemaError(
                        f"write() takes a mapping or (name, array) pairs, got item {item!r}"
                    )
                items.append(item)
        specs: dict[str, VarSpec] = {}
        arrays: list[tuple[str, np.ndarray]] = []
        for name, value in items:
            if type(name) is not str or name not in self._names_ok:
                self._names_ok.add(check_name(name))
            if name in specs:
                raise SchemaError(
                    f"variable {name!r} appears twice in step {self._index}; names in a step are "
                    f"unique"
                )
            if isinstance(value, Block):
                arr, start, shape = value.checked(name)
                if any(start) or arr.shape != shape:
                    raise SchemaError(
                        f"variable {name!r}: Block at {start} of shape {arr.shape} covers only "
                        f"part of global shape {shape}; partial blocks need comm= with the "
                        f"other ranks writing the rest"
                    )
            else:
                arr = as_array(value, name)
            self._check_dtype(name, arr.dtype)
            specs[name] = VarSpec(arr.dtype, arr.shape)
            arrays.append((name, arr))
        return specs, arrays, check_attrs(attrs)

    def _check_dtype(self, name: str, dtype: np.dtype) -> None:
        seen = self._first_seen.get(name)
        if seen is not None and seen[0] != dtype:
            where = "earlier in this channel" if seen[1] < 0 else f"in step {seen[1]}"
            raise SchemaError(
                f"variable {name!r} has dtype {seen[0]} {where} but {dtype} in step "
                f"{self._index}; a variable keeps one dtype for the life of a channel "
                f"(convert with .astype({seen[0].name!r}))"
            )

    # Steps whose arrays MPI ranks write themselves (ParallelPublisher, rank-writing stores).
    def begin_ranked(
        self,
        specs: dict[str, VarSpec],
        attrs: Mapping[str, Any] | None,
        chunks: dict[str, tuple[int, ...]],
        arrays: dict[str, np.ndarray],
        layout: dict[str, Any] | None = None,
    ) -> int:
        """Begin a step that ranks write into; this process writes ``arrays`` itself
        (``layout``: see :meth:`RankedWriter.begin_ranked`)."""
        if self._closed:
            raise DataplaneError(f"publisher of {self.url} is closed")
        self.flush()  # an asynchronous publisher finishes the steps before this one first
        for name, spec in specs.items():
            self._check_dtype(name, spec.dtype)
        step_attrs = check_attrs(attrs)
        writer = self._ranked()
        channel_attrs = self._channel_attrs()
        if channel_attrs is not None:
            writer.set_attrs(channel_attrs)
        row = writer.begin_ranked(self._index, specs, step_attrs, chunks, layout)
        try:
            for name, arr in arrays.items():
                writer.put(name, arr)
        except BaseException:
            writer.abort_step()
            raise
        return int(row)

    def chunks_of(self, name: str) -> tuple[int, ...] | None:
        """The chunk shape the channel gives variable ``name`` (ranked writes only)."""
        return self._ranked().chunks_of(name)

    def written_by(self) -> dict[str, Any] | None:
        """How the stored channel's steps were written, if it says (see ``inspect``)."""
        return self._writer.written_by() if isinstance(self._writer, RankedWriter) else None

    def put_region(self, name: str, start: tuple[int, ...], block: np.ndarray) -> Any:
        """Write a piece of the ranked step that another rank sent; its checksum record."""
        return self._ranked().put_region(name, start, block)

    def _ranked(self) -> RankedWriter:
        if not isinstance(self._writer, RankedWriter):
            raise OptionError(f"{self.transport.scheme}:// does not take blocks from ranks")
        return self._writer

    def end_ranked(self, specs: dict[str, VarSpec], blocks: dict[str, list[Any]] | None) -> int:
        """Commit the ranked step (``blocks``: checksums per block), or abort it (None)."""
        writer = self._ranked()
        if blocks is None:
            writer.abort_step()
            return -1
        try:
            writer.end_ranked(blocks)
        except BaseException:
            writer.abort_step()
            raise
        index = self._index
        self._index += 1
        for name, spec in specs.items():
            self._first_seen.setdefault(name, (spec.dtype, index))
        return index

    def flush(self) -> None:
        """Wait until every step written so far has been handed to the transport."""
        if self._async is not None:
            self._async.drain()

    def close(self, failed: bool = False) -> None:
        """Finish the channel; waits for asynchronous writes and re-raises their errors.

        ``failed=True`` (used when the ``with`` block raised) marks the channel broken, so
        subscribers get ``ChannelBroken`` after the completed steps instead of a clean end.
        """
        if self._closed:
            return
        self._closed = True
        self._finalizer.detach()
        error: BaseException | None = None
        try:
            if self._async is not None:
                self._async.stop()
                failed = failed or self._async.failed
        except BaseException as exc:  # re-raised below, after the channel is closed
            error = exc
            failed = True
        try:
            try:
                if not failed and self.attrs.dirty:
                    self._writer.set_attrs(self._channel_attrs() or {})
            finally:
                self._writer.close(failed=failed)
        except OSError as exc:
            if error is None:
                raise storage_full(exc, self.url, self._index, closing=True) from exc
            raise
        if error is not None:
            raise error

    def __enter__(self) -> Publisher:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        # SIGTERM is the scheduler ending the job, not the writer failing: a clean end.
        failed = exc_type is not None and not issubclass(exc_type, Terminated)
        self.close(failed=failed)

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"next step {self._index}"
        return f"<Publisher {self.url} {state}>"


def write_step(
    w: Writer,
    index: int,
    specs: dict[str, VarSpec],
    arrays: list[tuple[str, np.ndarray]],
    attrs: dict[str, AttrValue],
    channel_attrs: dict[str, AttrValue] | None,
) -> None:
    if channel_attrs is not None:
        w.set_attrs(channel_attrs)
    w.write_step(index, specs, arrays, attrs)


def storage_full(exc: OSError, url: str, index: int, closing: bool = False) -> OSError:
    """A full disk or quota while writing step ``index`` (or closing after ``index`` steps)
    as :class:`StorageFullError` saying what is safe; other errors as they are."""
    if exc.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return exc
    if exc.errno == errno.EFBIG:
        full = (
            f"{url}: a file reached the largest size allowed (the process's file size limit, "
            f"ulimit -f, or the filesystem's) while"
        )
    else:
        full = f"{url}: no space left on the device (or the quota is reached) while"
    if closing:
        return StorageFullError(
            exc.errno,
            f"{full} closing the channel after {index} steps; the steps are written but the "
            f"channel may not read as finished. Free space, then append with "
            f"publish(..., mode='a') or check it with `dataplane inspect`",
        )
    done = (
        f"steps 0-{index - 1} are complete"
        if index > 1
        else ("step 0 is complete" if index == 1 else "no step was completed")
    )
    return StorageFullError(
        exc.errno,
        f"{full} writing step {index}; {done} and readable, step {index} is not visible. Free "
        f"space (or raise the limit), then continue with publish(..., mode='a')",
    )


def _abandon(writer: Writer, async_writer: _AsyncWriter | None) -> None:
    if async_writer is not None:
        async_writer.abandon()
    writer.close(failed=True)


class _AsyncWriter:
    """Background thread that performs a publisher's writes.

    ``submit`` copies the arrays into staging buffers (reused between steps, so steady state
    allocates nothing) and returns; errors travel back as values and are re-raised by the next
    ``submit``, ``drain`` or ``stop`` with the step and URL added.
    """

    def __init__(self, pub: Publisher) -> None:
        # Holds the writer, never the publisher, so an abandoned publisher is still collected.
        self._writer = pub._writer
        self._url = pub.url
        self._reported = False
        self._jobs: queue.Queue[Any] = queue.Queue(maxsize=ASYNC_STAGING_STEPS)
        self._free: dict[tuple[str, np.dtype, tuple[int, ...]], list[np.ndarray]] = {}
        self._free_lock = threading.Lock()
        self._error: BaseException | None = None
        self._thread = threading.Thread(
            target=self._run, name=f"dataplane-publish {self._url}", daemon=True
        )
        self._thread.start()

    def _buffer(self, name: str, arr: np.ndarray) -> np.ndarray:
        key = (name, arr.dtype, arr.shape)
        with self._free_lock:
            pool = self._free.get(key)
            buf = pool.pop() if pool else None
        if buf is None:
            buf = np.empty(arr.shape, arr.dtype)
        np.copyto(buf, arr)
        return buf

    def _recycle(self, arrays: list[tuple[str, np.ndarray]]) -> None:
        with self._free_lock:
            for name, buf in arrays:
                self._free.setdefault((name, buf.dtype, buf.shape), []).append(buf)

    def submit(
        self,
        index: int,
        specs: dict[str, VarSpec],
        arrays: list[tuple[str, np.ndarray]],
        attrs: dict[str, AttrValue],
        channel_attrs: dict[str, AttrValue] | None,
    ) -> None:
        self._raise_pending()
        staged = [(name, self._buffer(name, arr)) for name, arr in arrays]
        while True:
            try:
                self._jobs.put((index, specs, staged, attrs, channel_attrs), timeout=0.1)
                return
            except queue.Full:
                self._raise_pending()

    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            index, specs, staged, attrs, channel_attrs = job
            if self._error is None:
                try:
                    write_step(self._writer, index, specs, staged, attrs, channel_attrs)
                except BaseException as exc:
                    if isinstance(exc, OSError):
                        full = storage_full(exc, self._url, index)
                        if full is not exc:
                            full.__cause__ = exc
                            exc = full
                    _add_note(exc, f"in asynchronous publish of step {index} to {self._url}")
                    self._error = exc
            self._recycle(staged)
            self._jobs.task_done()

    def _raise_pending(self, *, closing: bool = False) -> None:
        if self._error is None or (closing and self._reported):
            return  # close() does not repeat an error the caller already saw
        if not self._reported:
            self._reported = True
            raise self._error
        raise DataplaneError(
            f"an earlier asynchronous write to {self._url} failed; no later step was written"
        ) from self._error

    @property
    def failed(self) -> bool:
        return self._error is not None

    def drain(self) -> None:
        self._jobs.join()
        self._raise_pending()

    def stop(self) -> None:
        self._jobs.join()
        self._jobs.put(None)
        self._thread.join()
        self._raise_pending(closing=True)

    def abandon(self) -> None:
        if self._thread.is_alive():
            self._jobs.put(None)


def _add_note(exc: BaseException, note: str) -> None:
    if hasattr(exc, "add_note"):
        exc.add_note(note)
