"""What else the machine was doing while a figure was measured, and the spread of repeats.

``Meter`` samples ``/proc`` at the start and end of a cell: the CPU time of every user process
that is not this benchmark's own (every rank on the node and all their descendants:
DataLoader workers, prefetch processes, writers) is what others took. With the load average
and the time the hypervisor stole, it says whether a figure was measured on a busy machine.
Without ``/proc`` (not Linux) only the load average is recorded.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Iterable, Sequence
from typing import Any

__all__ = [
    "BUSY_CORES",
    "BUSY_SHARE",
    "Meter",
    "median_run",
    "merge",
    "rank_spread",
    "split_ticks",
    "spread",
]

#: A cell is "busy" when other processes took more than this share of the node's cores, and
#: at least BUSY_CORES of them, on average over the cell (or the hypervisor stole as much).
BUSY_SHARE = 0.10
BUSY_CORES = 0.25

_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def spread(values: Sequence[float]) -> dict[str, float]:
    """Median, min and max of repeated measurements of one figure."""
    return {
        "median": float(statistics.median(values)),
        "min": float(min(values)),
        "max": float(max(values)),
    }


def median_run(values: Sequence[float]) -> int:
    """The index of the repeat whose figure is the median; of an even number, the lower of
    the middle two (callers order so that lower is slower)."""
    order = sorted(range(len(values)), key=values.__getitem__)
    return order[(len(order) - 1) // 2]


def rank_spread(values: Sequence[float]) -> dict[str, float] | None:
    """One figure across ranks (None with one rank): the slowest rank bounds a step."""
    return spread(values) if len(values) > 1 else None


def _cpu_ticks() -> tuple[int, int] | None:
    """(busy, stolen) ticks of the whole node since boot, from /proc/stat."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    user, nice, system, _idle, _iowait, irq, softirq = fields[:7]
    steal = fields[7] if len(fields) > 7 else 0
    return user + nice + system + irq + softirq, steal


def _processes() -> dict[int, tuple[int, int]] | None:
    """pid -> (parent pid, CPU ticks) of every user process; kernel threads are left out
    (their work, such as writing back dirty pages, is mostly the benchmark's own I/O)."""
    out: dict[int, tuple[int, int]] = {}
    try:
        names = os.listdir("/proc")
    except OSError:
        return None
    for name in names:
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                stat = f.read()
        except OSError:  # it ended meanwhile
            continue
        # The fields after the command, which may hold spaces and parentheses.
        rest = stat[stat.rindex(")") + 2 :].split()
        pid, ppid = int(name), int(rest[1])
        if pid == 2 or ppid == 2:  # kthreadd and its threads
            continue
        # utime, stime, and cutime, cstime: the children it has waited for
        out[pid] = (ppid, sum(int(x) for x in rest[11:15]))
    return out


def _in_job(pid: int, procs: dict[int, tuple[int, int]], roots: set[int]) -> bool:
    seen = 0
    while pid not in roots and pid > 1 and seen < 64:
        pid, seen = procs.get(pid, (0, 0))[0], seen + 1
    return pid in roots


def split_ticks(
    before: dict[int, tuple[int, int]], after: dict[int, tuple[int, int]], roots: set[int]
) -> tuple[int, int]:
    """CPU ticks the job (``roots`` and their descendants) and every other user process
    spent between two snapshots. A process that ended and was waited for moved its time
    into its parent's: what it had before the first snapshot is taken off again."""
    job = other = 0
    for pid, (_, ticks) in after.items():
        delta = ticks - before.get(pid, (0, 0))[1]
        if _in_job(pid, after, roots):
            job += delta
        else:
            other += delta
    for pid, (_, ticks) in before.items():
        if pid not in after:
            if _in_job(pid, before, roots):
                job -= ticks
            else:
                other -= ticks
    return max(job, 0), max(other, 0)


class Meter:
    """Measures the load of one node during cells; ``roots``: the pids of the job's ranks."""

    def __init__(self, roots: Iterable[int]) -> None:
        self.roots = set(roots)
        self.cpus = os.cpu_count() or 1

    def start(self) -> tuple[float, tuple[int, int] | None, dict[int, tuple[int, int]] | None]:
        return time.monotonic(), _cpu_ticks(), _processes()

    def stop(
        self, start: tuple[float, tuple[int, int] | None, dict[int, tuple[int, int]] | None]
    ) -> dict[str, Any]:
        """The load during the cell: ``other_cores`` (cores other processes kept busy, on
        average), ``steal_cores`` (taken by the hypervisor), ``loadavg`` (1 minute, at the
        end) and ``busy``."""
        t0, cpu0, procs0 = start
        wall = max(time.monotonic() - t0, 1e-6)
        cpu1, procs1 = _cpu_ticks(), _processes()
        out: dict[str, Any] = {
            "loadavg": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
            "cpus": self.cpus,
            "other_cores": None,
            "steal_cores": None,
        }
        if procs0 is not None and procs1 is not None:
            _, other = split_ticks(procs0, procs1, self.roots)
            out["other_cores"] = other / _TICK / wall
        if cpu0 and cpu1:
            out["steal_cores"] = max(cpu1[1] - cpu0[1], 0) / _TICK / wall
        out["busy"] = _busy(out)
        return out


def _busy(load: dict[str, Any]) -> bool:
    limit = max(BUSY_SHARE * load["cpus"], BUSY_CORES)
    if load["other_cores"] is not None:
        return bool(load["other_cores"] > limit or (load["steal_cores"] or 0) > limit)
    # Without /proc: the load average beyond the cores this job could use.
    return load["loadavg"] is not None and load["loadavg"] > load["cpus"] + limit


def merge(loads: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    """One cell's load over its repeats (and over nodes): the worst of each."""
    if not loads:
        return None

    def worst(key: str) -> float | None:
        values = [x[key] for x in loads if x.get(key) is not None]
        return max(values) if values else None

    return {
        "loadavg": worst("loadavg"),
        "cpus": min(x["cpus"] for x in loads),
        "other_cores": worst("other_cores"),
        "steal_cores": worst("steal_cores"),
        "busy": any(x["busy"] for x in loads),
        "samples": len(loads),
    }
