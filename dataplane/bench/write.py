"""The simulation side: what publishing costs the simulation, against a plain h5py write.

Every rank holds its rows of each step's global array ``x`` (``rows_per_step`` float32 rows
of ``sample_size`` bytes in all) and writes ``steps`` steps. Figures per file transport,
synchronous and ``asynchronous=True``: seconds blocked in ``write`` per step (the time the
simulation does not compute). Synchronous writes run back to back and give GB/s from open to
close; asynchronous ones have the simulation compute between steps (``COMPUTE_FACTOR`` times
the synchronous write of a step), the situation background writing is for. The baseline is what an
MPI simulation does with serial h5py: each rank writes its own file, one dataset per step.
"""

from __future__ import annotations

import os
import shutil
import time
from typing import Any

import numpy as np

import dataplane as dp
from dataplane.registry import get_transport, resolve

from ._common import SUFFIX, Config, Recorder, World

__all__ = ["COMPUTE_FACTOR", "rank_rows", "run", "write_channel"]

#: The simulation's compute between asynchronous steps, in synchronous writes of a step.
COMPUTE_FACTOR = 2.0


def rank_rows(cfg: Config, world: World) -> tuple[int, int]:
    """This rank's rows ``[start, stop)`` of each step's global array."""
    n, r, size = cfg.rows_per_step, world.rank, world.size
    per, extra = divmod(n, size)
    start = r * per + min(r, extra)
    return start, start + per + (1 if r < extra else 0)


def _block(cfg: Config, world: World) -> np.ndarray:
    start, stop = rank_rows(cfg, world)
    rng = np.random.default_rng(world.rank)
    return rng.standard_normal((stop - start, cfg.sample_size // 4), dtype=np.float32)


def _timed_steps(
    cfg: Config, world: World, open_: Any, write: Any, compute: float = 0.0
) -> dict[str, Any]:
    """Run one write with the clock from before open (after a barrier) to after close (and a
    barrier); ``write(handle, step, block)`` is timed per step, and followed by ``compute``
    seconds of the simulation's own work (a sleep: the cores stay free, as for a GPU code)."""
    block = _block(cfg, world)
    blocked = []
    world.barrier()
    t0 = time.perf_counter()
    handle = open_()
    try:
        for s in range(cfg.steps):
            block[:, 0] = s  # a new step's values, as a simulation would have
            t = time.perf_counter()
            write(handle, s, block)
            blocked.append(time.perf_counter() - t)
            if compute:
                time.sleep(compute)
    finally:
        handle.close()
    mine = time.perf_counter() - t0
    world.barrier()
    wall = time.perf_counter() - t0
    return {
        "wall": wall,
        "seconds": mine,
        "blocked_mean": float(np.mean(blocked)),
        "blocked_max": float(np.max(blocked)),
        "blocked_total": float(np.sum(blocked)),
    }


def write_channel(
    cfg: Config,
    world: World,
    url: str,
    asynchronous: bool,
    compute: float = 0.0,
    aggregators: int | None = None,
) -> dict[str, Any]:
    """Publish the benchmark's steps to ``url`` from every rank, timed."""

    def write(pub: Any, s: int, block: np.ndarray) -> None:
        pub.write({"x": block})

    resolve(url)  # imports the library (adios2, h5py, zarr) before the clock
    opts: dict[str, Any] = {} if aggregators is None else {"aggregators": aggregators}
    return _timed_steps(
        cfg,
        world,
        lambda: dp.publish(url, comm=world.mpi, asynchronous=asynchronous, **opts),
        write,
        compute,
    )


def written_as(url: str, world: World) -> str:
    """How the ranks wrote the channel at ``url`` (its ``written_by``), e.g. ``mpio`` or
    ``aggregators=2``; the same answer on every rank."""
    how = "one process"
    if world.rank == 0 and world.size > 1:
        with dp.open(url) as arc:
            wb = arc.written_by or {}
        how = str(wb.get("method", "rank 0 writes"))
        if how == "aggregators":
            how = f"aggregators={wb.get('aggregators')}"
    return str(world.gather(how)[0])


def _h5_mpio() -> bool:
    import h5py

    return bool(h5py.get_config().mpi)


def _plain_h5_mpio(cfg: Config, world: World, directory: str) -> dict[str, Any]:
    """Plain h5py through MPI-IO: one file, a dataset per step, each rank its hyperslab."""
    import h5py

    path = os.path.join(directory, "plain-mpio.h5")
    start, stop = rank_rows(cfg, world)
    shape = (cfg.rows_per_step, cfg.sample_size // 4)

    def write(f: Any, s: int, block: np.ndarray) -> None:
        dset = f.create_dataset(f"step{s}/x", shape=shape, dtype=np.float32)
        with dset.collective:
            dset[start:stop] = block

    return _timed_steps(
        cfg, world, lambda: h5py.File(path, "w", driver="mpio", comm=world.comm), write
    )


def _plain_h5(cfg: Config, world: World, directory: str) -> dict[str, Any]:
    import h5py

    path = os.path.join(directory, f"plain-rank{world.rank}.h5")

    def write(f: Any, s: int, block: np.ndarray) -> None:
        f.create_dataset(f"step{s}/x", data=block)

    return _timed_steps(cfg, world, lambda: h5py.File(path, "w"), write)


def _remove(path: str) -> None:
    """A channel's files: its own (a file or a BP5 folder), its lease and its subfiles."""
    for p in (path, path.rstrip("/") + ".lease", path.rstrip("/") + ".agg"):
        if os.path.isdir(p):
            shutil.rmtree(p, ignore_errors=True)
        elif os.path.exists(p):
            os.remove(p)


def run(
    rec: Recorder, world: World, workdir: str, limits: dict[str, float], keep: bool
) -> dict[str, str]:
    """Measure every file transport; returns the paths of the synchronously written files
    (kept for the read phase when ``keep``)."""
    cfg = rec.config
    nbytes = cfg.data_bytes
    kept: dict[str, str] = {}
    with rec.task("write plain h5py"):
        plain = _plain_h5(cfg, world, workdir)
        world.barrier()
        _remove(os.path.join(workdir, f"plain-rank{world.rank}.h5"))
    per_rank = world.gather(plain)
    base_gbps = nbytes / plain["wall"] / 1e9
    base_blocked = max(p["blocked_mean"] for p in per_rank)

    def figure(transport: str, mode: str, res: dict, per_rank: list[dict], **extra: Any) -> dict:
        blocked = max(p["blocked_mean"] for p in per_rank)
        row = {
            "phase": "write",
            "transport": transport,
            "mode": mode,
            "blocked_ms_per_step": blocked * 1e3,
            "blocked_fraction": max(p["blocked_total"] / p["wall"] for p in per_rank),
            "seconds": res["wall"],
            "bytes": nbytes,
            "baseline": "plain h5py",
            "vs_baseline_blocked": blocked / base_blocked,
            "gbps": None,
            "limit": "seq_write",
            "of_limit": None,
            **extra,
        }
        if mode == "sync":  # from open to close, nothing but writing
            row["gbps"] = nbytes / res["wall"] / 1e9
            row["vs_baseline_gbps"] = row["gbps"] / base_gbps
            row["of_limit"] = row["gbps"] / limits["seq_write_gbps"]
        rec.add(**row)
        rec.add_ranks(
            [
                {
                    "seconds": p["seconds"],
                    "blocked_ms_per_step": p["blocked_mean"] * 1e3,
                }
                for p in per_rank
            ],
            phase="write",
            transport=transport,
            mode=mode,
            written=extra.get("written"),
        )
        return row

    plain_as = "a file per rank" if world.size > 1 else "one process"
    figure("plain h5py", "sync", plain, per_rank, compute_ms_per_step=0.0, written=plain_as)
    if world.size > 1 and "h5" in cfg.file_transports and _h5_mpio():
        with rec.task("write plain h5py mpio"):
            res = _plain_h5_mpio(cfg, world, workdir)
            per_rank = world.gather(res)
            world.barrier()
            if world.rank == 0:
                _remove(os.path.join(workdir, "plain-mpio.h5"))
        figure("plain h5py", "sync", res, per_rank, compute_ms_per_step=0.0, written="mpio")
    for transport in cfg.file_transports:
        path = os.path.join(workdir, f"data{SUFFIX[transport]}")
        url = f"{transport}://{path}"
        with rec.task(f"write {transport} sync"):
            res = write_channel(cfg, world, url, False)
            per_rank = world.gather(res)
            world.barrier()
            how = written_as(url, world)
            world.barrier()
            if world.rank == 0 and not keep:
                _remove(path)
        sync = figure(transport, "sync", res, per_rank, compute_ms_per_step=0.0, written=how)
        for k in _aggregator_counts(transport, world, how):
            other = os.path.join(workdir, f"agg{k}{SUFFIX[transport]}")
            with rec.task(f"write {transport} aggregators={k}"):
                res = write_channel(cfg, world, f"{transport}://{other}", False, aggregators=k)
                per_rank = world.gather(res)
                world.barrier()
                if world.rank == 0:
                    _remove(other)
            figure(
                transport,
                "sync",
                res,
                per_rank,
                compute_ms_per_step=0.0,
                written=f"aggregators={k}",
            )
        if keep:
            kept[transport] = path
        # Asynchronous publish, with the simulation computing between steps twice as long as
        # a synchronous write of a step took: output is then at most a third of the run, and
        # the background writer has room to finish each step before the next (with equal
        # times any hiccup of the writer queues up and the simulation waits for it).
        compute = COMPUTE_FACTOR * sync["blocked_ms_per_step"] / 1e3
        path = os.path.join(workdir, f"async{SUFFIX[transport]}")
        with rec.task(f"write {transport} async"):
            res = write_channel(cfg, world, f"{transport}://{path}", True, compute)
            per_rank = world.gather(res)
            world.barrier()
            how = written_as(f"{transport}://{path}", world)
            world.barrier()
            if world.rank == 0:
                _remove(path)
        blocked = max(p["blocked_mean"] for p in per_rank)
        figure(
            transport,
            "async",
            res,
            per_rank,
            written=how,
            compute_ms_per_step=compute * 1e3,
            vs_sync_blocked=blocked / max(sync["blocked_ms_per_step"] / 1e3, 1e-9),
            # The time writing added to the simulation's run, beyond its computing.
            overhead_fraction=max(
                0.0, (res["wall"] - compute * cfg.steps) / max(sync["seconds"], 1e-9)
            ),
        )
    return kept


def _aggregator_counts(transport: str, world: World, default: str) -> list[int]:
    """The ``aggregators=K`` also measured for ``transport`` under MPI (h5:// and bp5:// write
    subfiles through K aggregators): one, and one per rank, unless the default write was just
    that."""
    if world.size == 1 or not get_transport(transport).subfiles:
        return []
    return [k for k in sorted({1, world.size}) if default != f"aggregators={k}"]


def prepare(rec: Recorder, world: World, workdir: str) -> dict[str, str]:
    """Write the read phase's data (untimed) when the write phase did not run."""
    paths = {}
    for transport in rec.config.file_transports:
        paths[transport] = os.path.join(workdir, f"data{SUFFIX[transport]}")
        with rec.task(f"prepare {transport} data"):
            write_channel(rec.config, world, f"{transport}://{paths[transport]}", False)
    return paths
