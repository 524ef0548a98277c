"""The writer's lease beside a channel's files: who writes it (pid, host, heartbeat) and how
it ended (``open``, ``closed``, ``failed``), so that readers tell a clean end from a crash."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from dataplane.errors import ChannelBusyError, DataplaneError
from dataplane.transports import _posix

_HOST = socket.gethostname()


class LeaseIO:
    """Where a lease lives: a small file beside the data (atomic replace)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def make_parents(self) -> None:
        """Create the folders the channel goes in, as ADIOS2 does for its own files."""
        folder = os.path.dirname(os.path.abspath(self.path))
        try:
            os.makedirs(folder, exist_ok=True)
        except OSError as exc:
            raise DataplaneError(
                f"cannot create the folder {folder} for the channel: {exc.strerror}"
            ) from None

    def read(self) -> bytes | None:
        try:
            with open(self.path, "rb") as f:
                return f.read()
        except FileNotFoundError:
            return None

    def write(self, data: bytes) -> None:
        tmp = f"{self.path}.{os.getpid()}.{threading.get_ident()}.tmp"
        try:
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)  # a full disk leaves no temporary lease behind
            raise


def read_lease(io: LeaseIO) -> dict[str, Any] | None:
    raw = io.read()
    if not raw:
        return None
    try:
        info = json.loads(raw)
    except ValueError:
        return None  # being replaced; the next look will see it whole
    return info if isinstance(info, dict) else None


def writer_state(info: dict[str, Any] | None) -> str:
    """``"none"`` (no lease: not written by dataplane), ``"closed"``, ``"failed"``, ``"alive"``
    or ``"dead"``."""
    if info is None:
        return "none"
    state = info.get("state")
    if state in ("closed", "failed"):
        return str(state)
    if info.get("host") == _HOST:
        return "alive" if _posix.is_alive(int(info["pid"]), int(info.get("start", 0))) else "dead"
    # Another host: trust the heartbeat, with slack for clock skew and slow filesystems.
    age = time.time() - float(info.get("heartbeat", 0))
    return "alive" if age < max(10.0, 5 * float(info.get("interval", 1.0))) else "dead"


#: A lease as read and what it says of its writer: what :func:`lease_state` returns.
Seen = tuple[dict[str, Any] | None, str]


def lease_state(io: LeaseIO) -> Seen:
    """The lease and what it says of its writer (see :func:`writer_state`).

    # NOTE: a writer writes "closed" and then exits. A lease read just before that, judged
    # just after (its process is gone), would say "dead": a clean close reported as a crash
    # (about half the runs of a bp5 writer process). So a "dead" verdict is read again.
    """
    info = read_lease(io)
    state = writer_state(info)
    if state == "dead":
        again = read_lease(io)
        if writer_state(again) in ("closed", "failed"):
            return again, writer_state(again)
    return info, state


def setting_up(info: dict[str, Any] | None, state: str) -> bool:
    """True while a live writer is still setting the channel up: it holds nothing yet (an old
    channel it replaces may still be on disk, its format's files may be half made)."""
    return state == "alive" and info is not None and info.get("ready", True) is False


@contextlib.contextmanager
def _directory_lock(path: str) -> Iterator[None]:
    """An exclusive ``flock`` on a directory (released by the kernel if the holder dies)."""
    try:
        fd = os.open(path or ".", os.O_RDONLY | os.O_DIRECTORY)
    except FileNotFoundError:
        yield  # the format creates the directory; nothing to race on yet
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError as exc:
            if exc.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL):
                raise
        yield
    finally:
        os.close(fd)  # releases the lock


class Lease:
    """The writer's claim on a channel, refreshed by a heartbeat thread while it is open."""

    def __init__(self, io: LeaseIO, url: str, interval: float) -> None:
        self.io = io
        self.url = url
        self.interval = interval
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._info: dict[str, Any] = {}
        self._lock = threading.Lock()

    def acquire(self, clear: Callable[[], None] | None = None) -> None:
        """Claim the channel; readers take it as empty until :meth:`ready`. ``clear`` removes
        what a writer before left behind, before the claim is visible to anyone."""
        # NOTE: look and claim under one lock, or two writers starting together both find no
        # live lease and both write (found by the racing-writers test: interleaved steps in
        # BP5, h5py's own lock error in HDF5). The lock is on the directory that holds the
        # lease, for this moment only; where the filesystem has no locks, racing is possible.
        with _directory_lock(os.path.dirname(os.path.abspath(self.io.path))):
            self._claim(clear)

    def _claim(self, clear: Callable[[], None] | None) -> None:
        info = read_lease(self.io)
        if writer_state(info) == "alive":
            assert info is not None
            raise ChannelBusyError(
                f"{self.url} already has a live writer (pid {info.get('pid')} on "
                f"{info.get('host')}); one writer per channel. Its data is left untouched."
            )
        if clear is not None:
            clear()
        pid, start = _posix.my_identity()
        self._info = {
            "pid": pid,
            "start": start,
            "host": _HOST,
            "interval": self.interval,
            "state": "open",
            "ready": False,
            "heartbeat": time.time(),
        }
        self._write()
        self._thread = threading.Thread(
            target=self._beat, name=f"dataplane-lease {self.url}", daemon=True
        )
        self._thread.start()

    def ready(self, **facts: Any) -> None:
        """The writer has set the channel up: readers may look at it (``facts``: what they
        should know of how it is written, e.g. ``mpio=True``)."""
        with self._lock:  # the heartbeat thread serialises this dict
            self._info.update(facts, ready=True)
        self._write()

    def _write(self) -> None:
        with self._lock:
            self._info["heartbeat"] = time.time()
            self.io.write(json.dumps(self._info).encode())

    def _beat(self) -> None:
        while not self._stop.wait(self.interval):
            if os.getpid() != self._info["pid"]:
                return
            self._write()

    def closing(self) -> None:
        """Every step is committed and the writer is closing its format: a subscriber that the
        format has already told of the end takes that end as clean. (An SST writer's close
        waits for its slowest reader; its fast readers see the end long before the lease
        says "closed".)"""
        with self._lock:  # the heartbeat thread serialises this dict
            self._info["closing"] = True
        self._write()

    def release(self, state: str) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self._info and os.getpid() == self._info["pid"]:
            self._info["state"] = state
            try:
                self._write()
            except OSError:
                if state != "failed":
                    raise
                # Failing already (often: the disk is full). Readers find the writer gone
                # when this process ends; the error that brought us here is the one to see.
