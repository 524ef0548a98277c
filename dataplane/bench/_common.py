"""What every part of the benchmark shares: the configuration, the ranks, the machine's
limits, and how figures are recorded."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import socket
import time
from collections.abc import Iterator
from typing import Any

import numpy as np

import dataplane as dp
from dataplane import _progress
from dataplane.model import parse_size

from . import load

__all__ = [
    "Config",
    "Limits",
    "Recorder",
    "World",
    "evict",
    "fmt_size",
    "memcpy_gbps",
    "parse_size",
    "seq_read",
    "seq_write",
]

FILE_TRANSPORTS = ("bp5", "h5", "zarr")
STREAM_TRANSPORTS = ("shm", "sst")
TRANSPORTS = FILE_TRANSPORTS + STREAM_TRANSPORTS
SUFFIX = {"bp5": ".bp", "h5": ".h5", "zarr": ".zarr"}
_UNITS = {"KiB": 2**10, "MiB": 2**20, "GiB": 2**30}


def fmt_size(n: int) -> str:
    for unit in ("GiB", "MiB", "KiB"):
        if n >= _UNITS[unit]:
            return f"{n / _UNITS[unit]:g} {unit}"
    return f"{n} B"


@dataclasses.dataclass
class Config:
    """One run's settings; every JSON line carries them (``get_config``)."""

    dir: str
    transports: tuple[str, ...] = TRANSPORTS
    sample_size: int = 64 << 10
    samples: int = 16384
    steps: int = 64
    workers: int = 2
    compute_ms: float = 0.0
    batch_size: int = 32
    max_seconds: float = 10.0
    stream_sizes: tuple[int, ...] = (4 << 10, 1 << 20, 64 << 20)
    stream_seconds: float = 2.0
    block: int = 16
    evict: str = "auto"
    cache_dir: str | None = None
    quick: bool = False
    nodes: int | None = None
    repeats: int = 3

    def __post_init__(self) -> None:
        unknown = [t for t in self.transports if t not in TRANSPORTS]
        if unknown or not self.transports:
            raise dp.OptionError(
                f"unknown transport(s) {', '.join(unknown) or '(none given)'}; "
                f"choose from {', '.join(TRANSPORTS)}"
            )
        if self.sample_size % 4:
            raise dp.OptionError(
                f"--sample-size must be a multiple of 4 bytes (samples are float32 rows), "
                f"got {self.sample_size}"
            )
        for name in ("samples", "steps", "batch_size"):
            if getattr(self, name) < 1:
                raise dp.OptionError(f"--{name.replace('_', '-')} must be at least 1")
        if self.steps > self.samples:
            raise dp.OptionError(
                f"--steps {self.steps} > --samples {self.samples}: every step holds at least "
                f"one sample"
            )
        if self.workers < 0 or self.compute_ms < 0 or self.max_seconds <= 0:
            raise dp.OptionError("--workers and --compute-ms must be >= 0, --max-seconds > 0")
        if self.repeats < 1:
            raise dp.OptionError(f"--repeats must be at least 1, got {self.repeats}")
        if self.nodes is not None and self.nodes < 1:
            raise dp.OptionError(f"--nodes must be at least 1, got {self.nodes}")
        if self.evict not in ("auto", "drop_caches", "fadvise"):
            raise dp.OptionError(
                f"--evict must be auto, drop_caches or fadvise, got {self.evict!r}"
            )

    @property
    def file_transports(self) -> list[str]:
        return [t for t in self.transports if t in FILE_TRANSPORTS]

    @property
    def stream_transports(self) -> list[str]:
        return [t for t in self.transports if t in STREAM_TRANSPORTS]

    @property
    def rows_per_step(self) -> int:
        return -(-self.samples // self.steps)

    @property
    def data_bytes(self) -> int:
        return self.rows_per_step * self.steps * self.sample_size

    def get_config(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["transports"] = list(self.transports)
        out["stream_sizes"] = list(self.stream_sizes)
        return out


class _Single:
    """The few communicator calls the benchmark uses, for a run without MPI."""

    def Get_rank(self) -> int:  # noqa: N802 (mpi4py's names)
        return 0

    def Get_size(self) -> int:  # noqa: N802
        return 1

    def bcast(self, obj: Any, root: int = 0) -> Any:
        return obj

    def allgather(self, obj: Any) -> list[Any]:
        return [obj]

    def Ibarrier(self) -> Any:  # noqa: N802
        return self

    def Test(self) -> bool:  # noqa: N802
        return True


def _launched_by_mpi() -> bool:
    env = os.environ
    for key in ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE", "MPI_LOCALNRANKS", "SLURM_NTASKS"):
        if key in env and env[key].isdigit() and int(env[key]) > 1:
            return key != "SLURM_NTASKS" or "PMI_RANK" in env or "PMIX_RANK" in env
    return False


class World:
    """The ranks of the run: mpi4py's COMM_WORLD when started by ``mpiexec -n R`` (R > 1),
    else one rank. Also knows which ranks share a node."""

    def __init__(self, comm: Any = None) -> None:
        if comm is None and _launched_by_mpi():
            try:
                from mpi4py import MPI
            except ImportError:
                raise dp.DataplaneError(
                    "started by mpiexec with several ranks, but mpi4py is missing: "
                    "pip install 'dataplane[mpi]'"
                ) from None
            comm = MPI.COMM_WORLD
        self.comm = comm if comm is not None else _Single()
        self.rank = self.comm.Get_rank()
        self.size = self.comm.Get_size()
        hosts = self.comm.allgather(socket.gethostname())
        self.node_leader = hosts.index(hosts[self.rank]) == self.rank
        self.nodes = len(set(hosts))

    @property
    def mpi(self) -> Any:
        """The communicator to hand to ``publish(comm=...)``, or None with one rank."""
        return self.comm if self.size > 1 else None

    def barrier(self) -> None:
        """A barrier that sleeps while it waits (MPI spins, taking cores from busy ranks)."""
        req = self.comm.Ibarrier()
        while not req.Test():
            time.sleep(1e-4)

    def gather(self, value: Any) -> list[Any]:
        return list(self.comm.allgather(value))


# -- the machine's limits ----------------------------------------------------------------------
def memcpy_gbps(nbytes: int = 256 << 20, repeat: int = 5) -> float:
    """Best of ``repeat`` numpy copies of ``nbytes``: what moving bytes once costs here."""
    a = np.ones(nbytes, np.uint8)
    b = np.empty_like(a)
    np.copyto(b, a)
    best = 0.0
    for _ in range(repeat):
        t0 = time.perf_counter()
        np.copyto(b, a)
        best = max(best, a.nbytes / (time.perf_counter() - t0) / 1e9)
    return best


def _files(path: str) -> list[str]:
    if os.path.isdir(path):
        return [os.path.join(r, f) for r, _, fs in os.walk(path) for f in fs]
    return [path] if os.path.exists(path) else []


def evict(paths: list[str], how: str = "auto", world: World | None = None) -> str:
    """Make the next reads of ``paths`` (files or directory trees) come from storage.

    ``drop_caches`` writes 1 to /proc/sys/vm/drop_caches (every clean page of the node; needs
    root), ``fadvise`` asks the kernel to drop these files' pages. ``auto``: the first that is
    permitted. Returns what was done. With ``world``, every rank calls it (collective): dirty
    pages are synced everywhere before any are dropped.
    """
    files = [f for p in paths for f in _files(p)]
    for f in files:  # dirty pages cannot be dropped
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    if world is not None:
        world.barrier()
    done = "fadvise"
    if how in ("auto", "drop_caches"):
        try:
            with open("/proc/sys/vm/drop_caches", "w") as knob:
                knob.write("1\n")
            done = "drop_caches"
        except OSError as exc:
            if how == "drop_caches":
                raise dp.DataplaneError(
                    f"cannot drop the page cache ({exc}); run as root or use --evict fadvise"
                ) from None
    if done == "fadvise":
        for f in files:
            fd = os.open(f, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
    if world is not None:
        world.barrier()
    return done


def seq_write(path: str, nbytes: int, block: int = 8 << 20) -> float:
    """Seconds to write ``nbytes`` to a new file in ``block`` writes (no fsync: writers of
    simulation output do not sync either)."""
    buf = memoryview(bytes(b"\1" * block))
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    t0 = time.perf_counter()
    try:
        left = nbytes
        while left > 0:
            left -= os.write(fd, buf[: min(block, left)])
    finally:
        os.close(fd)
    return time.perf_counter() - t0


def seq_read(path: str, block: int = 8 << 20) -> float:
    """Seconds to read a file (or every file of a tree) start to end in ``block`` reads."""
    buf = bytearray(block)
    t0 = time.perf_counter()
    for f in _files(path):
        fd = os.open(f, os.O_RDONLY)
        try:
            while os.readv(fd, [buf]) > 0:
                pass
        finally:
            os.close(fd)
    return time.perf_counter() - t0


@dataclasses.dataclass
class Limits:
    """The machine's limits measured in this run (aggregate over ranks)."""

    memcpy_gbps: float
    seq_write_gbps: float
    seq_read_cold_gbps: float
    seq_read_warm_gbps: float
    evicted: str

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# -- recording figures -------------------------------------------------------------------------
class Recorder:
    """Collects figures (one dict each, written as JSON lines) and shows progress (a bar on
    stderr, one task per figure measured)."""

    def __init__(self, config: Config, world: World, show: bool | None = None) -> None:
        self.config = config
        self.world = world
        self.rows: list[dict[str, Any]] = []
        self.total = 0
        # One bar, on rank 0; ``show`` as in dataplane._progress.bar (None: on a terminal).
        self.bar = _progress.bar("bench", 0, unit=" task", show=show if world.rank == 0 else False)
        # The load of this node during each task; the job is every rank on this host.
        host = socket.gethostname()
        pids = world.gather((host, os.getpid()))
        self.meter = load.Meter(pid for h, pid in pids if h == host)
        self.loads: dict[str, list[dict[str, Any]]] = {}

    def plan(self, tasks: int) -> None:
        self.total += tasks
        self.bar.total = self.total

    @contextlib.contextmanager
    def task(self, label: str) -> Iterator[None]:
        """One measurement (a cell, or one repeat of it): shown on the bar, and the load
        of the machine while it ran recorded under ``label``."""
        self.bar.set_description_str(label)
        start = self.meter.start()
        yield
        self.loads.setdefault(label, []).append(self.meter.stop(start))
        self.bar.update()

    def finish(self) -> None:
        """Give every figure the load of the tasks it came from, over all nodes (collective)."""
        every = self.world.gather(self.loads)
        for row in self.rows:
            label = row.get("cell")
            if label is not None and row.get("rank") is None:
                row["load"] = load.merge([x for mine in every for x in mine.get(label, [])])

    def close(self) -> None:
        self.bar.close()

    def add(self, **row: Any) -> dict[str, Any]:
        """A figure; ``cell``: the label of the task(s) that measured it."""
        row.setdefault("rank", None)
        row["ranks"] = self.world.size
        row["nodes"] = self.world.nodes
        if self.config.quick:
            row["smoke_test"] = True
        row["config"] = self.config.get_config()
        self.rows.append(row)
        return row

    def add_ranks(self, per_rank: list[dict[str, Any]], **common: Any) -> None:
        """One figure per rank (only with more than one rank)."""
        if len(per_rank) > 1:
            for r, fig in enumerate(per_rank):
                self.add(**common, **fig, rank=r)
