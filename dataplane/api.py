"""The public entry points: ``publish``, ``subscribe`` and ``open``, and their option checks.

Transports implement a few primitives (``transports/base.py``); what every transport shares
on top of them lives in :mod:`dataplane.publisher` (input checks, the dtype-per-variable rule,
channel attributes, asynchronous publishing), :mod:`dataplane.subscriber` (end-of-stream and
drop accounting, statistics) and :mod:`dataplane.parallel` (MPI ranks writing one channel).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Any

import numpy as np

from dataplane._sigterm import end_cleanly_on_sigterm
from dataplane.errors import DataplaneError, OptionError, SchemaError
from dataplane.model import ChannelURL, check_timeout
from dataplane.parallel.collective import Collective
from dataplane.parallel.mpio import MPIIOPublisher
from dataplane.parallel.publisher import ParallelPublisher
from dataplane.publisher import ChannelAttrs, Publisher
from dataplane.registry import get_transport, resolve
from dataplane.subscriber import Archive, Subscriber, SubscriberStats
from dataplane.transports.base import POLICIES, Located, Transport, coerce_option

__all__ = [
    "Archive",
    "ChannelAttrs",
    "Located",
    "ParallelPublisher",
    "Publisher",
    "Subscriber",
    "SubscriberStats",
    "open",
    "publish",
    "read_located",
    "subscribe",
]

#: Largest accepted ``queue_limit``; a ring that deep is a configuration mistake.
MAX_QUEUE_LIMIT = 4096


#: Options of ``publish`` and ``subscribe`` that the URL may carry too (``?queue_limit=8``).
_PUBLISH_URL_OPTIONS: dict[str, tuple[type, ...]] = {
    "policy": (str,),
    "queue_limit": (int,),
    "asynchronous": (bool,),
    "mode": (str,),
    "aggregators": (int,),
}
_SUBSCRIBE_URL_OPTIONS: dict[str, tuple[type, ...]] = {
    "timeout": (float,),
    "start": (str,),
    "vars": (str,),
}


def _transport(url: str | ChannelURL, options: dict[str, Any]) -> Transport:
    parsed, cls = resolve(url)
    return cls.from_url(parsed, options)


def _url_options(
    url: str, table: dict[str, tuple[type, ...]], given: dict[str, Any], defaults: dict[str, Any]
) -> tuple[ChannelURL, dict[str, Any]]:
    """Take the options in ``table`` out of the URL's query (the rest are the transport's):
    the URL's value wins over a default, and one given both ways must agree."""
    parsed = ChannelURL.parse(url)
    out = dict(given)
    for key, kinds in table.items():
        if key not in parsed.query:
            continue
        raw = parsed.query[key]
        value: Any = tuple(v for v in raw.split(",") if v) if key == "vars" else None
        if value is None:
            value = coerce_option(key, raw, kinds)
        if given[key] != defaults[key] and given[key] != value:
            raise OptionError(
                f"option {key!r} is given both in the URL ({value!r}) and as a keyword "
                f"({given[key]!r}); give it once"
            )
        out[key] = value
    rest = {k: v for k, v in parsed.query.items() if k not in table}
    return dataclasses.replace(parsed, query=rest), out


def publish(
    url: str,
    comm: Any = None,
    policy: str = "block",
    queue_limit: int = 4,
    asynchronous: bool = False,
    mode: str = "w",
    aggregators: int | None = None,
    **opts: Any,
) -> Publisher | ParallelPublisher | MPIIOPublisher:
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
    aggregators
        With ``comm``: how many ranks write files (``h5://``: each writes its group's blocks
        into a subfile, joined in the main file; default one per node; 1 for one file). See
        :mod:`dataplane.parallel.aggregators`.
    **opts
        Transport options (see each transport's documentation).

    Notes
    -----
    ``policy``, ``queue_limit``, ``asynchronous``, ``mode`` and ``aggregators`` may also be
    given in the URL (``shm://run?queue_limit=8``), as may every transport option.

    Where SIGTERM has its default action, the first ``publish`` of the main thread makes it
    raise :class:`dataplane.Terminated` in this process instead, so that ``with publish(...)``
    ends the channel cleanly when a scheduler ends the job (exit status 143 all the same).
    """
    parsed, got = _url_options(
        url,
        _PUBLISH_URL_OPTIONS,
        {
            "policy": policy,
            "queue_limit": queue_limit,
            "asynchronous": asynchronous,
            "mode": mode,
            "aggregators": aggregators,
        },
        {
            "policy": "block",
            "queue_limit": 4,
            "asynchronous": False,
            "mode": "w",
            "aggregators": None,
        },
    )
    aggregators = got["aggregators"]
    policy, queue_limit, asynchronous, mode = (
        got["policy"],
        got["queue_limit"],
        got["asynchronous"],
        got["mode"],
    )
    if policy not in POLICIES:
        raise OptionError(f"policy must be one of {', '.join(POLICIES)}, got {policy!r}")
    if isinstance(queue_limit, bool) or not isinstance(queue_limit, (int, np.integer)):
        raise OptionError(f"queue_limit must be an integer, got {queue_limit!r}")
    if not 1 <= queue_limit <= MAX_QUEUE_LIMIT:
        raise OptionError(f"queue_limit must be between 1 and {MAX_QUEUE_LIMIT}, got {queue_limit}")
    if mode not in ("w", "a"):
        raise OptionError(f"mode must be 'w' (new channel) or 'a' (append), got {mode!r}")
    if comm is not None and comm.Get_size() > 1:
        transport = _transport(parsed, dict(opts))  # checks the URL and options on every rank
        if aggregators is None and not asynchronous and transport.mpio():
            return MPIIOPublisher(comm, transport, mode)
        return ParallelPublisher(
            comm,
            lambda: _publisher(
                _transport(parsed, dict(opts)), policy, queue_limit, asynchronous, mode
            ),
            transport,
            aggregators,
        )
    if aggregators is not None and comm is None:
        raise OptionError(
            "aggregators is for ranks writing together: pass comm=<an mpi4py communicator>"
        )
    return _publisher(_transport(parsed, opts), policy, queue_limit, asynchronous, mode)


def _publisher(
    transport: Transport, policy: str, queue_limit: int, asynchronous: bool, mode: str
) -> Publisher:
    """The publisher of one process (rank 0's, under MPI)."""
    end_cleanly_on_sigterm()
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

    Notes
    -----
    ``vars`` (``?vars=a,b``), ``timeout`` and ``start`` may also be given in the URL, as may
    every transport option.
    """
    parsed, got = _url_options(
        url,
        _SUBSCRIBE_URL_OPTIONS,
        {"vars": vars, "timeout": timeout, "start": start},
        {"vars": None, "timeout": None, "start": "first"},
    )
    vars, timeout, start = got["vars"], got["timeout"], got["start"]
    if start not in ("first", "latest"):
        raise OptionError(f"start must be 'first' or 'latest', got {start!r}")
    names = None if vars is None else _var_filter(vars)
    timeout = check_timeout(timeout)
    transport = _transport(parsed, opts)
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


def read_located(
    scheme: str, fd: int, at: Located, first: int, rows: int, out: np.ndarray | None = None
) -> np.ndarray | None:
    """Rows ``first:first+rows`` of what :meth:`Archive.locate` found, read from ``fd`` (the
    file, opened by the caller; into ``out`` if given) and verified; None where they cannot
    be vouched for (read them through the archive then: it says what is wrong)."""
    return get_transport(scheme).read_located(fd, at, first, rows, out)


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
