"""The public entry points: ``publish``, ``subscribe`` and ``open``.

Transports implement a few primitives (``transports/base.py``); this module adds what every
transport shares: input checks, the dtype-per-variable rule, channel attributes, asynchronous
publishing, end-of-stream and drop accounting, and statistics.
"""

from __future__ import annotations

import errno
import os
import queue
import signal
import threading
import weakref
from collections.abc import Iterable, Iterator, Mapping, MutableMapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from dataplane.errors import (
    DataplaneError,
    OptionError,
    SchemaError,
    StepTimeoutError,
    StorageFullError,
    Terminated,
)
from dataplane.model import (
    AttrValue,
    Block,
    Step,
    StepMeta,
    VarSpec,
    as_array,
    check_attrs,
    check_name,
    check_timeout,
)
from dataplane.parallel import (
    Collective,
    aligned_chunks,
    decode_error,
    describe_local,
    plan_step,
    split,
)
from dataplane.registry import resolve
from dataplane.transports.base import POLICIES, Reader, Transport, Writer
from dataplane.transports.base import Archive as _ArchiveImpl

__all__ = ["Archive", "Publisher", "Subscriber", "SubscriberStats", "open", "publish", "subscribe"]

#: Largest accepted ``queue_limit``; a ring that deep is a configuration mistake.
MAX_QUEUE_LIMIT = 4096
#: Steps an asynchronous publisher may hold in staging before ``write`` waits.
ASYNC_STAGING_STEPS = 2
_UNSET: Any = object()


def _transport(url: str, options: dict[str, Any]) -> Transport:
    parsed, cls = resolve(url)
    return cls.from_url(parsed, options)


def _check_timeout(timeout: float | None, what: str = "timeout") -> float | None:
    return check_timeout(timeout, what)


def publish(
    url: str,
    comm: Any = None,
    policy: str = "block",
    queue_limit: int = 4,
    asynchronous: bool = False,
    mode: str = "w",
    **opts: Any,
) -> Publisher | ParallelPublisher:
    """Open ``url`` for writing steps.

    Parameters
    ----------
    url
        ``scheme://path`` with optional ``?key=value`` transport options.
    comm
        An mpi4py communicator; open, write and close become collective. Each rank writes
        ``Block(local, start, shape)`` values, or plain arrays that join along axis 0 in rank
        order (a rank may have zero rows). See :mod:`dataplane.parallel`.
    policy
        ``"block"``: lossless, ``write`` waits while ``queue_limit`` steps are unconsumed.
        ``"drop-oldest"``: ``write`` never waits; slow subscribers miss the oldest steps.
    queue_limit
        Steps a stream holds for its subscribers.
    asynchronous
        ``write`` returns after copying into a staging buffer; a thread does the I/O and
        ``close`` re-raises anything it hit.
    mode
        ``"w"`` to start a channel, ``"a"`` to continue the step sequence of stored data.
    **opts
        Transport options (see each transport's documentation).

    Notes
    -----
    Where SIGTERM has its default action, the first ``publish`` of the main thread makes it
    raise :class:`dataplane.Terminated` in this process instead, so that ``with publish(...)``
    ends the channel cleanly when a scheduler ends the job (exit status 143 all the same).
    """
    if policy not in POLICIES:
        raise OptionError(f"policy must be one of {', '.join(POLICIES)}, got {policy!r}")
    if isinstance(queue_limit, bool) or not isinstance(queue_limit, (int, np.integer)):
        raise OptionError(f"queue_limit must be an integer, got {queue_limit!r}")
    if not 1 <= queue_limit <= MAX_QUEUE_LIMIT:
        raise OptionError(f"queue_limit must be between 1 and {MAX_QUEUE_LIMIT}, got {queue_limit}")
    if mode not in ("w", "a"):
        raise OptionError(f"mode must be 'w' (new channel) or 'a' (append), got {mode!r}")
    if comm is not None and comm.Get_size() > 1:
        transport = _transport(url, dict(opts))  # checks the URL and options on every rank
        return ParallelPublisher(
            comm,
            lambda: publish(
                url,
                policy=policy,
                queue_limit=queue_limit,
                asynchronous=asynchronous,
                mode=mode,
                **opts,
            ),
            transport,
        )
    transport = _transport(url, opts)
    _end_cleanly_on_sigterm()
    if policy == "drop-oldest" and not transport.supports_drop_policy:
        raise OptionError(
            f"{transport.scheme}:// stores every step, so policy='drop-oldest' does not apply; "
            f"use policy='block'"
        )
    writer = transport.open_writer(policy=policy, queue_limit=int(queue_limit), mode=mode)
    return Publisher(transport, writer, asynchronous=asynchronous)


def subscribe(
    url: str,
    vars: Iterable[str] | None = None,
    timeout: float | None = None,
    start: str = "first",
    comm: Any = None,
    **opts: Any,
) -> Subscriber:
    """Follow the steps of ``url`` as they are published.

    Parameters
    ----------
    vars
        Only these variables (default: all).
    timeout
        Seconds to wait for each step before ``StepTimeoutError``; ``None`` waits forever
        (a dead writer is still detected and raises ``ChannelBroken``).
    start
        ``"first"``: from the oldest step still available (streams replay what their ring
        holds). ``"latest"``: only steps published from now on.
    comm
        An mpi4py communicator of reader ranks: opening is collective (all fail if one does)
        and :meth:`Subscriber.part` reads this rank's even share of a variable. Each rank
        follows the channel itself; use ``policy="block"`` on the writer so that every rank
        sees every step.
    """
    if start not in ("first", "latest"):
        raise OptionError(f"start must be 'first' or 'latest', got {start!r}")
    names = None if vars is None else _var_filter(vars)
    timeout = _check_timeout(timeout)
    transport = _transport(url, opts)
    if comm is not None and comm.Get_size() > 1 and transport.scope == "process":
        raise OptionError(
            f"{transport.scheme}:// lives inside one process; reader ranks in other processes "
            f"cannot reach it. Use shm:// (one node) or sst:// / a file transport"
        )
    if comm is None:
        reader = transport.open_reader(start=start, vars=names)
        return Subscriber(transport, reader, vars=names, timeout=timeout)
    # Collective: every rank opens its own reader, and all fail if one does.
    coll = Collective(comm)
    sub: Subscriber | None = None
    error: BaseException | None = None
    try:
        sub = Subscriber(
            transport, transport.open_reader(start=start, vars=names), vars=names, timeout=timeout
        )
    except DataplaneError as exc:
        error = exc
    try:
        coll.agree({}, error)
    except BaseException:
        if sub is not None:
            sub.close()
        raise
    assert sub is not None
    sub.comm = comm
    return sub


def open(url: str, **opts: Any) -> Archive:  # noqa: A001 - mirrors the contract's dp.open
    """Open stored steps at ``url`` for random access."""
    transport = _transport(url, opts)
    return Archive(transport, transport.open_archive())


def _as_names(vars: Iterable[str]) -> Iterable[str]:
    if isinstance(vars, str):
        return (vars,)
    return vars


def _var_filter(vars: Iterable[str]) -> tuple[str, ...]:
    """The names to subscribe to. Looser than ``check_name``: files that dataplane did not
    write have names such as ``grid/x``, and a filter never creates anything."""
    names = tuple(_as_names(vars))
    for v in names:
        if not isinstance(v, str) or not v:
            raise SchemaError(f"vars must be variable names (non-empty strings), got {v!r}")
    return names


class ChannelAttrs(MutableMapping):
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
        self, data: Mapping[str, Any] | Iterable[tuple[str, Any]], attrs: Mapping | None = None
    ) -> int:
        """Publish one step of named arrays; returns its index.

        ``data`` maps names to numpy arrays, CPU torch tensors, numbers or :class:`Block`.
        The step becomes visible to readers all at once, after every array is written.
        """
        if self._closed:
            raise DataplaneError(f"publisher of {self.url} is closed")
        specs, arrays, step_attrs = self._prepare(data, attrs)
        index = self._index
        if self._async is not None:
            self._async.submit(index, specs, arrays, step_attrs, self._channel_attrs())
        else:
            try:
                _write_step(self._writer, index, specs, arrays, step_attrs, self._channel_attrs())
            except OSError as exc:
                raise _storage_full(exc, self.url, index) from exc
        self._index += 1
        for name, spec in specs.items():
            self._first_seen.setdefault(name, (spec.dtype, index))
        return index

    def _channel_attrs(self) -> dict[str, AttrValue] | None:
        if not self.attrs.dirty:
            return None
        self.attrs.dirty = False
        return self.attrs.snapshot()

    def _prepare(self, data: Any, attrs: Mapping | None) -> _Prepared:
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
    def _begin_ranked(
        self,
        specs: dict[str, VarSpec],
        attrs: Mapping | None,
        chunks: dict[str, tuple[int, ...]],
        arrays: dict[str, np.ndarray],
    ) -> int:
        """Begin a step that ranks write into; this process writes ``arrays`` itself."""
        if self._closed:
            raise DataplaneError(f"publisher of {self.url} is closed")
        self.flush()  # an asynchronous publisher finishes the steps before this one first
        for name, spec in specs.items():
            self._check_dtype(name, spec.dtype)
        step_attrs = check_attrs(attrs)
        writer: Any = self._writer  # a file transport's writer (supports_rank_writes)
        channel_attrs = self._channel_attrs()
        if channel_attrs is not None:
            writer.set_attrs(channel_attrs)
        row = writer.begin_ranked(self._index, specs, step_attrs, chunks)
        try:
            for name, arr in arrays.items():
                writer.put(name, arr)
        except BaseException:
            writer.abort_step()
            raise
        return int(row)

    def _end_ranked(self, specs: dict[str, VarSpec], blocks: dict[str, list] | None) -> int:
        """Commit the ranked step (``blocks``: checksums per block), or abort it (None)."""
        writer: Any = self._writer
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
                raise _storage_full(exc, self.url, self._index, closing=True) from exc
            raise
        if error is not None:
            raise error

    def __enter__(self) -> Publisher:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        # SIGTERM is the scheduler ending the job, not the writer failing: a clean end.
        failed = exc_type is not None and not issubclass(exc_type, Terminated)
        self.close(failed=failed)

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"next step {self._index}"
        return f"<Publisher {self.url} {state}>"


class ParallelPublisher:
    """``publish(url, comm=comm)`` with more than one rank: every rank writes its blocks of
    each step, rank 0 writes the global step (see :mod:`dataplane.parallel` for why).

    ``write``, ``flush`` and ``close`` are collective: call them on every rank, in the same
    order. Channel attributes set on rank 0 are published; single values are rank 0's.
    """

    def __init__(self, comm: Any, open_root: Any, transport: Transport) -> None:
        self.comm = comm
        self._transport = transport  # every rank's, for writing its own blocks
        self._coll = Collective(comm)
        self.rank = self._coll.rank
        self._inner: Publisher | None = None
        self._closed = False
        error: BaseException | None = None
        if self.rank == 0:
            try:
                self._inner = open_root()
            except Exception as exc:
                error = exc
        self._coll.outcome(error)
        info = comm.bcast(
            None if self._inner is None else [self._inner.url, self._inner.next_index], root=0
        )
        self.url, self._index = info
        self.attrs: ChannelAttrs = self._inner.attrs if self._inner is not None else ChannelAttrs()

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def next_index(self) -> int:
        return self._index

    def write(
        self, data: Mapping[str, Any] | Iterable[tuple[str, Any]], attrs: Mapping | None = None
    ) -> int:
        """Collective: publish this rank's blocks of one global step; returns its index."""
        if self._closed:
            raise DataplaneError(f"publisher of {self.url} is closed")
        desc: dict | None = None
        arrays: dict[str, np.ndarray] = {}
        error: BaseException | None = None
        try:
            if isinstance(data, (str, bytes)) or not isinstance(data, (Mapping, Iterable)):
                raise SchemaError(
                    f"write() takes a mapping of variable name to array, got {type(data).__name__}"
                )
            desc, arrays = describe_local(data)
            check_attrs(attrs)
        except Exception as exc:  # every rank must hear of it, or the others wait forever
            error = exc
        descs = self._coll.agree(desc, error)
        plan = plan_step(descs)  # the same on every rank: all raise, or none
        chunks = self._rank_chunks(plan)
        if chunks is not None:
            return self._write_ranked(plan, chunks, arrays, attrs)
        out = self._to_root(plan, arrays, skip={})
        error = None
        if self._inner is not None:
            try:
                ordered = {name: out[name] for name in descs[0]}  # the writer's order
                self._inner.write(ordered, attrs)
            except Exception as exc:
                error = exc
        self._coll.outcome(error)
        index = self._index
        self._index += 1
        return index

    def _to_root(
        self, plan: dict[str, dict[str, Any]], arrays: dict[str, np.ndarray], skip: Mapping
    ) -> dict[str, np.ndarray]:
        """On rank 0, the global arrays of the variables not in ``skip`` (single values are
        rank 0's own); empty elsewhere. Collective: every rank gathers in the same order."""
        out: dict[str, np.ndarray] = {}
        for name in sorted(plan):
            entry = plan[name]
            if entry["kind"] == "scalar":
                if self.rank == 0:
                    out[name] = arrays[name]
            elif name not in skip:
                got = self._coll.gather_array(name, entry, arrays[name])
                if got is not None:
                    out[name] = got
        return out

    def _rank_chunks(self, plan: dict[str, dict[str, Any]]) -> dict[str, tuple[int, ...]] | None:
        """Rank 0 decides, for all: the chunks of the arrays whose blocks every rank can write
        into the store itself (blocks aligned with chunks); None if there are none."""
        chunks: dict[str, tuple[int, ...]] | None = None
        inner = self._inner
        if inner is not None and getattr(inner.transport, "supports_rank_writes", False):
            writer: Any = inner._writer
            chunks = {}
            for name, entry in plan.items():
                if entry["kind"] == "scalar":
                    continue
                chunk = aligned_chunks(entry["shape"], entry["parts"], writer.chunks_of(name))
                if chunk is not None:
                    chunks[name] = chunk
        return self.comm.bcast(chunks or None, root=0)

    def _write_ranked(
        self,
        plan: dict[str, dict[str, Any]],
        chunks: dict[str, tuple[int, ...]],
        arrays: dict[str, np.ndarray],
        attrs: Mapping | None,
    ) -> int:
        """Rank 0 begins the step, every rank writes its blocks, rank 0 commits: a step is
        visible only once every rank's blocks are in (a rank that dies leaves it invisible)."""
        specs = {n: VarSpec(np.dtype(e["dtype"]), tuple(e["shape"])) for n, e in plan.items()}
        # Arrays whose blocks are not aligned with chunks, and single values: rank 0 writes.
        by_root = self._to_root(plan, arrays, skip=chunks)
        row = None
        error: BaseException | None = None
        if self._inner is not None:
            try:
                row = self._inner._begin_ranked(specs, attrs, chunks, by_root)
            except Exception as exc:
                error = exc
        self._coll.outcome(error)
        row = self.comm.bcast(row, root=0)
        sums: dict[str, list] = {}
        error = None
        transport: Any = self._transport  # a FileTransport with supports_rank_writes
        try:
            for name in sorted(chunks):
                start, count = plan[name]["parts"][self.rank]
                if all(count):
                    sums[name] = [
                        start,
                        count,
                        transport.put_block(row, name, tuple(start), arrays[name]),
                    ]
        except Exception as exc:
            error = exc
        reports = self._coll.gather_reports(sums, error)
        error = None
        if self._inner is not None:
            assert reports is not None
            failed = next(((r, e) for r, (_, e) in enumerate(reports) if e), None)
            blocks: dict[str, list] = {name: [] for name in chunks}
            for rank_sums, _ in reports:
                for name, entry in rank_sums.items():
                    blocks[name].append(entry)
            try:
                self._inner._end_ranked(specs, None if failed else blocks)
                if failed is not None:
                    error = decode_error(failed[1], f"rank {failed[0]}: ")
            except Exception as exc:
                error = exc
        self._coll.outcome(error)
        index = self._index
        self._index += 1
        return index

    def flush(self) -> None:
        """Collective: wait until rank 0 handed every step to the transport."""
        error: BaseException | None = None
        if self._inner is not None:
            try:
                self._inner.flush()
            except Exception as exc:
                error = exc
        self._coll.outcome(error)

    def close(self, failed: bool = False) -> None:
        """Collective. The channel ends as failed if any rank says so."""
        if self._closed:
            return
        self._closed = True
        failed = self._coll.any(failed)
        error: BaseException | None = None
        if self._inner is not None:
            try:
                self._inner.close(failed=failed)
            except Exception as exc:
                error = exc
        self._coll.outcome(error)

    def __enter__(self) -> ParallelPublisher:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        # SIGTERM is the scheduler ending the job, not the writer failing: a clean end.
        failed = exc_type is not None and not issubclass(exc_type, Terminated)
        self.close(failed=failed)

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"next step {self._index}"
        return f"<ParallelPublisher {self.url} rank {self.rank} {state}>"


def _write_step(
    w: Writer,
    index: int,
    specs: dict[str, VarSpec],
    arrays: list[tuple[str, np.ndarray]],
    attrs: dict[str, AttrValue],
    channel_attrs: dict[str, AttrValue] | None,
) -> None:
    if channel_attrs is not None:
        w.set_attrs(channel_attrs)
    w.begin_step(index, specs, attrs)
    try:
        for name, arr in arrays:
            w.put(name, arr)
        w.end_step()
    except BaseException:
        w.abort_step()
        raise


def _storage_full(exc: OSError, url: str, index: int, closing: bool = False) -> OSError:
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


_FORK_HOOK: list[bool] = []  # the at-fork hook below is registered once per process


def _on_sigterm(signum: int, frame: Any) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM kills at once
    raise Terminated(signum)


def _end_cleanly_on_sigterm() -> None:
    """Make SIGTERM end open channels cleanly (:class:`Terminated`) where it would otherwise
    kill the process without a word: only from the main thread, never over a handler the
    program installed itself."""
    if threading.current_thread() is not threading.main_thread():
        return
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        if not _FORK_HOOK:
            os.register_at_fork(
                before=_block_sigterm, after_in_parent=_unblock_sigterm, after_in_child=_child
            )
            _FORK_HOOK.append(True)
        signal.signal(signal.SIGTERM, _on_sigterm)


# NOTE: a forked child (a DataLoader worker) gets SIGTERM's default action back. SIGTERM is
# blocked across the fork: CPython drops a signal that reaches a Python handler in the child
# before its after-fork reset, so a terminate() right after start() would be lost.
def _block_sigterm() -> None:
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})


def _unblock_sigterm() -> None:
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})


def _child() -> None:
    if signal.getsignal(signal.SIGTERM) is _on_sigterm:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    _unblock_sigterm()


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
        self._jobs: queue.Queue = queue.Queue(maxsize=ASYNC_STAGING_STEPS)
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

    def submit(self, index: int, specs, arrays, attrs, channel_attrs) -> None:
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
                    _write_step(self._writer, index, specs, staged, attrs, channel_attrs)
                except BaseException as exc:
                    if isinstance(exc, OSError):
                        full = _storage_full(exc, self._url, index)
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
        wait = self.timeout if timeout is _UNSET else _check_timeout(timeout)
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
        self._bytes += sum(spec.nbytes for spec in meta.vars.values())
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

    def __exit__(self, exc_type, exc, tb) -> None:
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

    def close(self) -> None:
        self._finalizer()

    def __enter__(self) -> Archive:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<Archive {self.url} steps={len(self)}>"
