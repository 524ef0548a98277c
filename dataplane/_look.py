"""A dataset's look at its files: count, describe and locate each file's steps, in helper
processes when there are many files.

A dataset of many files opens every one at construction (``loaders/_sources``): about 1.5 ms
of CPU per HDF5 file here, all of it under h5py's one lock per process, so threads cannot
share it: 10,000 files are 15 s on one core of a node that has dozens. Helper processes take
chunks of files from the dataset's process, which looks at chunks itself meanwhile, and send
back what they found as JSON lines (never pickles). The result is the same whoever looked:
a helper that dies, hangs, or says something that does not parse has its chunk looked at by
the dataset's process, and a file a helper could not read is read there again, which raises
the real error. This module imports no torch: a helper starts in a quarter of a second.
"""

from __future__ import annotations

import json
import os
import select
import signal
import stat
import subprocess
import sys
import time
from collections import deque
from collections.abc import Sequence
from typing import Any

import numpy as np

import dataplane.api as api
from dataplane.errors import DataplaneError
from dataplane.model import ChannelURL, VarSpec

#: What a look found of a step: its variables, version and where its bytes lie.
Described = tuple[Any, "str | None", "dict[str, api.Located] | None"]
#: Files to look at per helper: a helper's start (about 0.3 s of CPU) pays off only with as
#: many (cold, 2 cores, files read ahead: 400 files 0.66 s alone, 0.72 s with one helper;
#: 1,200 files 1.62 s alone, 1.20 s with one).
HELP_FROM = 512
MAX_HELPERS = 8
#: Files a helper is given at a time.
CHUNK = 16
#: Once no chunk is left to hand out, a helper holding one this many times longer than the
#: dataset's process takes for one (and at least LAG_MIN seconds) is stopped, and its chunk
#: looked at here: a slow start or a stuck helper costs the look little.
LAG, LAG_MIN = 2.0, 0.1
# (The dataplane the program imported is found last: after the helper's own path, so that a
# site-packages directory never shadows the standard library; main() checks it is the same.)
HELPER = [
    sys.executable,
    "-c",
    "import os, sys; sys.path.append(os.environ['DATAPLANE_ROOT']); "
    "from dataplane._look import main; main()",
]
_PACKAGE = os.path.dirname(os.path.realpath(__file__))
#: Bytes at each end of a file asked for before it is looked at: HDF5 keeps its superblock and
#: first object headers at the start and what it wrote last at the end. The disk then fetches
#: a chunk's files together rather than one metadata read after another (400 cold files: a
#: look 0.87-1.08 s -> 0.62-0.67 s here).
AHEAD = 64 << 10
LEASE = ".lease"

#: (file index, URL, steps already known)
Job = tuple[int, str, int]
#: (steps now, what was found of each step from the known ones on)
Found = tuple[int, list[Described]]


def look(url: str, opts: dict[str, Any], known: int, versions: bool, locate: bool) -> Found:
    """Open ``url`` and describe its steps from ``known`` on."""
    arc = api.open(url, **opts)
    try:
        now = len(arc)
        return now, [
            (
                arc[j].vars,
                arc.version(j) if versions else None,
                arc.locate(j) if locate else None,
            )
            for j in range(known, now)
        ]
    finally:
        arc.close()


def read_ahead(jobs: Sequence[Job]) -> None:
    """Ask the kernel for the ends of each job's file (see :data:`AHEAD`) and for its writer's
    lease, without waiting."""
    if not hasattr(os, "posix_fadvise"):
        return
    for _, url, _ in jobs:
        try:
            parsed = ChannelURL.parse(url)
        except (ValueError, DataplaneError):
            continue  # advice only: the look itself reports what is wrong
        if parsed.protocol is None:  # (a remote store has nothing local to ask for)
            path = parsed.path.rstrip("/") or parsed.path
            _advise(path, AHEAD)
            # A file channel's writer leaves its lease beside it (transports/_lease.py), and a
            # look reads it first: cold, one more disk read per file (400 cold files: a look
            # 0.51-0.62 s -> 0.44-0.51 s with it asked for too).
            _advise(path + LEASE, 0)


def _advise(path: str, ends: int) -> None:
    """Have the kernel read ``path`` (a regular file) into its cache: ``ends`` bytes at
    either end, or all of it for 0."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError:
        return  # advice only
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return
        if not ends:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
            return
        os.posix_fadvise(fd, 0, min(ends, st.st_size), os.POSIX_FADV_WILLNEED)
        if st.st_size > ends:
            os.posix_fadvise(fd, st.st_size - ends, ends, os.POSIX_FADV_WILLNEED)
    except OSError:
        pass  # advice only
    finally:
        os.close(fd)


def _chunks(jobs: Sequence[Job]) -> list[list[Job]]:
    return [list(jobs[i : i + CHUNK]) for i in range(0, len(jobs), CHUNK)]


def look_chunks(
    jobs: Sequence[Job], opts: dict[str, Any], versions: bool, locate: bool
) -> dict[int, Found]:
    """What a look finds of each job's file, in this process: each chunk's files asked for
    ahead while the chunk before is looked at."""
    chunks = _chunks(jobs)
    found = {}
    read_ahead(chunks[0] if chunks else ())
    for i, chunk in enumerate(chunks):
        if i + 1 < len(chunks):
            read_ahead(chunks[i + 1])
        for k, url, known in chunk:
            found[k] = look(url, opts, known, versions, locate)
    return found


def encode(step: Described) -> list:
    """A step's description as plain JSON data (ValueError: one JSON cannot carry)."""
    specs, version, located = step
    out = {}
    for name, spec in specs.items():
        if np.dtype(spec.dtype.str) != spec.dtype:  # (a dtype its string does not describe)
            raise ValueError(f"variable {name!r} has a dtype JSON cannot carry")
        out[name] = spec.to_json()
    where = None
    if located is not None:
        where = {n: [at.offset, at.dtype, list(at.shape), at.stored] for n, at in located.items()}
    return [out, version, where]


def decode(raw: list) -> Described:
    """What :func:`encode` made, checked (TypeError, ValueError, KeyError, IndexError)."""
    specs, version, where = raw
    if version is not None and not isinstance(version, str):
        raise TypeError("a step's version is a string")
    located = None
    if where is not None:
        located = {
            n: api.Located(int(o), np.dtype(t).str, tuple(int(x) for x in shape), stored)
            for n, (o, t, shape, stored) in where.items()
        }
    return {n: VarSpec.from_json(s) for n, s in specs.items()}, version, located


def default_helpers(files: int, opts: dict[str, Any]) -> int:
    """How many helpers to start for ``files`` files: one per ``HELP_FROM`` files, up to one
    per other usable CPU; none where options JSON cannot carry."""
    if files < HELP_FROM:
        return 0
    try:
        json.dumps(opts)
    except (TypeError, ValueError):
        return 0
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(0, min(MAX_HELPERS, (cpus or 1) - 1, files // HELP_FROM))


def look_all(
    jobs: Sequence[Job],
    opts: dict[str, Any],
    versions: bool,
    locate: bool,
    helpers: int | None = None,
) -> dict[int, Found]:
    """What a look finds of each job's file, by file index (:func:`default_helpers` helper
    processes unless ``helpers`` says how many)."""
    n = default_helpers(len(jobs), opts) if helpers is None else helpers
    if n <= 0:
        return look_chunks(jobs, opts, versions, locate)
    return _SharedLook(jobs, opts, versions, locate).run(n)


class _Helper:
    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        self.proc = proc
        self.buf = b""
        self.chunk: list[Job] | None = None
        self.since = 0.0

    @property
    def fd(self) -> int:
        assert self.proc.stdout is not None
        return self.proc.stdout.fileno()

    def give(self, chunk: list[Job]) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps([[k, url, known] for k, url, known in chunk]).encode())
        self.proc.stdin.write(b"\n")
        self.proc.stdin.flush()
        self.chunk, self.since = chunk, time.monotonic()


class _SharedLook:
    """One look shared by this process and helper processes (see the module)."""

    def __init__(
        self, jobs: Sequence[Job], opts: dict[str, Any], versions: bool, locate: bool
    ) -> None:
        self.opts, self.versions, self.locate = opts, versions, locate
        self.pending = deque(_chunks(jobs))
        self.found: dict[int, Found] = {}
        self.by_helpers = 0  # files helpers looked at (for tests)
        self._own = 0.0  # seconds this process took per chunk, lately
        self._helpers: list[_Helper] = []

    def run(self, n: int) -> dict[int, Found]:
        env = {**os.environ, "DATAPLANE_ROOT": os.path.dirname(_PACKAGE)}
        first = json.dumps(
            {
                "package": _PACKAGE,
                "opts": self.opts,
                "versions": self.versions,
                "locate": self.locate,
            }
        )
        try:
            for _ in range(n):
                try:
                    proc = subprocess.Popen(
                        HELPER,
                        stdin=subprocess.PIPE,
                        stdout=subprocess.PIPE,
                        stderr=subprocess.DEVNULL,
                        env=env,
                    )
                except OSError:  # no process to be had: this one looks at the rest
                    break
                try:
                    assert proc.stdin is not None
                    proc.stdin.write(first.encode() + b"\n")
                    proc.stdin.flush()
                except OSError:  # it died at once
                    _end(proc)
                    continue
                self._helpers.append(_Helper(proc))
            while self.pending or any(h.chunk for h in self._helpers):
                self._hand_out()
                if self.pending:
                    self._look_here(self.pending.popleft())
                    self._collect(0.0)
                else:
                    self._collect(0.05)
                    self._take_back_late()
        finally:
            self._stop()
        return self.found

    def _hand_out(self) -> None:
        for h in self._helpers:
            if h.chunk is None and self.pending:
                try:
                    h.give(self.pending.popleft())
                except OSError:  # it died: its chunk goes back, it goes
                    self._drop(h)

    def _look_here(self, chunk: list[Job]) -> None:
        t0 = time.monotonic()
        read_ahead([*chunk, *(self.pending[0] if self.pending else ())])
        for k, url, known in chunk:
            if k not in self.found:
                self.found[k] = look(url, self.opts, known, self.versions, self.locate)
        took = time.monotonic() - t0
        self._own = took if not self._own else 0.5 * (self._own + took)

    def _collect(self, timeout: float) -> None:
        """Take in what the helpers sent, waiting up to ``timeout`` for something."""
        busy = {h.fd: h for h in self._helpers if h.chunk is not None}
        if not busy:
            return
        poller = select.poll()
        for fd in busy:
            poller.register(fd, select.POLLIN | select.POLLHUP | select.POLLERR)
        for fd, _ in poller.poll(timeout * 1000):
            h = busy[fd]
            data = os.read(fd, 1 << 20)
            if not data:
                self._drop(h)  # it died
                continue
            h.buf += data
            while h.chunk is not None and b"\n" in h.buf:
                line, h.buf = h.buf.split(b"\n", 1)
                if not self._answer(h, line):
                    self._drop(h)
                    break

    def _answer(self, h: _Helper, line: bytes) -> bool:
        """Take in a helper's answer for its chunk; False if it makes no sense."""
        assert h.chunk is not None
        try:
            got = json.loads(line)
            keys = [k for k, _, _ in h.chunk]
            if [item[0] for item in got] != keys:
                return False
            found = {}
            for k, now, steps in got:
                if now is None:  # it could not read that file: looked at here, and raised
                    continue
                found[k] = (int(now), [decode(s) for s in steps])
        except (TypeError, ValueError, KeyError, IndexError):
            return False
        for k, url, known in h.chunk:
            if k not in self.found:
                if k in found:
                    self.found[k] = found[k]
                    self.by_helpers += 1
                else:
                    self.found[k] = look(url, self.opts, known, self.versions, self.locate)
        h.chunk = None
        return True

    def _take_back_late(self) -> None:
        limit = max(LAG_MIN, LAG * self._own)
        for h in list(self._helpers):
            if h.chunk is not None and time.monotonic() - h.since > limit:
                self._drop(h)

    def _drop(self, h: _Helper) -> None:
        """Stop helper ``h``; what it held is looked at again."""
        if h.chunk is not None:
            self.pending.appendleft(h.chunk)
            h.chunk = None
        self._helpers.remove(h)
        _end(h.proc)

    def _stop(self) -> None:
        for h in self._helpers:
            _end(h.proc)
        self._helpers.clear()


def _end(proc: subprocess.Popen[bytes]) -> None:
    for stream in (proc.stdin, proc.stdout):
        if stream is not None:
            try:
                stream.close()
            except OSError:  # a pipe whose reader died: nothing more to say to it
                pass
    if proc.poll() is None:
        proc.kill()
    proc.wait()


def main() -> None:
    """A helper: the first line of stdin gives the options; each later line is a chunk of
    ``[index, url, known]``, answered with one line of ``[index, steps, descriptions]``
    (``null`` steps: that file could not be read here)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # its dataset's process ends it
    first = json.loads(sys.stdin.readline())
    if first["package"] != _PACKAGE:
        return  # another dataplane than the program's: it may find other things
    opts, versions, locate = first["opts"], first["versions"], first["locate"]
    for line in sys.stdin:
        out = []
        chunk = json.loads(line)
        read_ahead(chunk)
        for k, url, known in chunk:
            try:
                now, steps = look(url, opts, known, versions, locate)
                out.append([k, now, [encode(s) for s in steps]])
            except Exception:  # noqa: BLE001 -- read again by the dataset's process
                out.append([k, None, None])
        sys.stdout.write(json.dumps(out) + "\n")
        sys.stdout.flush()
