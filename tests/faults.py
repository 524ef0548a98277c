"""The fault-injection harness of the reliability tests.

What every fault test needs, in one place: writer and reader subprocesses that can be killed at
seeded points (``run_proc`` and the ``_testprocs`` programs: ``--kill-in-step``, ``--exit-after
--kill``), a process that SIGKILLs itself at the n-th call of a function (``die_at_call``), a
size-limited filesystem for disk-full (``size_limited_dir``), byte flipping and truncation
(``flip_bytes``, ``truncate``), and what a crashed run can leave behind (``leftovers``). The
conformance suite in ``dataplane.testing`` uses the same process helpers, so that third-party
transports get the same faults.
"""

from __future__ import annotations

import contextlib
import glob
import os
import signal
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from dataplane.testing import flip_bytes, read_events, run_proc, truncate, wait_for_event

__all__ = [
    "die_at_call",
    "flip_bytes",
    "kill_point",
    "leftovers",
    "mpich_segments_removed",
    "read_events",
    "run_proc",
    "size_limited_dir",
    "truncate",
    "wait_for_event",
]


def kill_point(seed: int, n: int) -> int:
    """A point in ``range(n)`` chosen by ``seed``: where a seeded fault strikes."""
    return int(np.random.default_rng(seed).integers(0, n))


@contextlib.contextmanager
def size_limited_dir(where: Path, size: str) -> Iterator[Path | None]:
    """A filesystem of ``size`` (tmpfs syntax: ``16m``) mounted at ``where``, or None where
    mounting needs a privilege this process lacks; the test then injects the error instead."""
    where.mkdir(parents=True, exist_ok=True)
    mounted = os.geteuid() == 0 and (
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(where)],
            capture_output=True,
        ).returncode
        == 0
    )
    try:
        yield where if mounted else None
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(where)], capture_output=True)


def die_at_call(
    monkeypatch: Any,
    owner: Any,
    name: str,
    nth: int,
    *,
    when: Callable[..., bool] = lambda *a, **k: True,
    before: Callable[..., None] | None = None,
) -> None:
    """Make ``owner.name`` SIGKILL the process that calls it for the ``nth`` time (1-based)
    with arguments that ``when`` accepts; ``before(*args)`` runs first, e.g. to do half of
    the call's work. Counting is per process: a forked child counts from where its parent was,
    so ``when`` should say which processes die (a DataLoader worker, not the test)."""
    real = getattr(owner, name)
    calls = [0]

    def dying(*args: Any, **kwargs: Any) -> Any:
        if when(*args, **kwargs):
            calls[0] += 1
            if calls[0] == nth:
                if before is not None:
                    before(*args, **kwargs)
                os.kill(os.getpid(), signal.SIGKILL)
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, dying)


@contextlib.contextmanager
def mpich_segments_removed() -> Iterator[None]:
    """Remove the shared-memory segments that MPICH leaves in /dev/shm when a test kills one
    of its ranks (2 MiB each, never cleaned by mpiexec)."""
    before = set(glob.glob("/dev/shm/mpich_shm_*"))
    try:
        yield
    finally:
        for path in set(glob.glob("/dev/shm/mpich_shm_*")) - before:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)


def leftovers(root: Path | str) -> dict[str, list[str]]:
    """What runs left under ``root``, by kind: temporary files (cache entries and leases being
    written), writer leases and SST contact files."""
    found: dict[str, list[str]] = {"tmp": [], "lease": [], "contact": []}
    for dirpath, _, files in os.walk(root):
        for f in files:
            path = os.path.join(dirpath, f)
            if f.endswith(".tmp") or os.path.basename(dirpath) == "tmp":
                found["tmp"].append(path)
            elif f.endswith(".lease"):
                found["lease"].append(path)
            elif f.endswith(".sst"):
                found["contact"].append(path)
    return found
