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
from .load import median_run, rank_spread, spread

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
    """Measure every file transport, ``repeats`` times with the methods interleaved (drift
    hits all alike); returns the paths of the synchronously written files (kept for the read
    phase when ``keep``)."""
    cfg = rec.config
    nbytes = cfg.data_bytes
    kept: dict[str, str] = {}
    # cell -> one (result, per-rank results) per repeat; cell = (transport, mode, variant):
    # variant "" is the channel's default way of writing, else how the plain baseline or
    # the aggregators wrote
    runs: dict[tuple[str, str, str], list[tuple[dict, list[dict]]]] = {}
    labels: dict[tuple[str, str, str], str] = {}
    written: dict[str, str] = {}
    compute: dict[str, float] = {}  # transport -> seconds of computing between async steps
    plain_as = "a file per rank" if world.size > 1 else "one process"
    mpio = world.size > 1 and "h5" in cfg.file_transports and _h5_mpio()

    def measure(cell: tuple[str, str, str], label: str, go: Any) -> dict:
        with rec.task(label):
            res = go()
            per_rank = world.gather(res)
        runs.setdefault(cell, []).append((res, per_rank))
        labels[cell] = label
        return res

    for rep in range(cfg.repeats):
        last = rep == cfg.repeats - 1

        def plain() -> dict:
            res = _plain_h5(cfg, world, workdir)
            world.barrier()
            _remove(os.path.join(workdir, f"plain-rank{world.rank}.h5"))
            return res

        measure(("plain h5py", "sync", plain_as), "write plain h5py", plain)
        if mpio:

            def plain_mpio() -> dict:
                res = _plain_h5_mpio(cfg, world, workdir)
                world.barrier()
                if world.rank == 0:
                    _remove(os.path.join(workdir, "plain-mpio.h5"))
                return res

            measure(("plain h5py", "sync", "mpio"), "write plain h5py mpio", plain_mpio)
        for transport in cfg.file_transports:
            path = os.path.join(workdir, f"data{SUFFIX[transport]}")
            url = f"{transport}://{path}"

            def sync(
                url: str = url, path: str = path, transport: str = transport, last: bool = last
            ) -> dict:
                res = write_channel(cfg, world, url, False)
                written[transport] = written_as(url, world)
                world.barrier()
                if world.rank == 0 and not (keep and last):
                    _remove(path)
                world.barrier()
                return res

            res = measure((transport, "sync", ""), f"write {transport} sync", sync)
            for k in _aggregator_counts(transport, world, written[transport]):
                other = os.path.join(workdir, f"agg{k}{SUFFIX[transport]}")

                def agg(other: str = other, transport: str = transport, k: int = k) -> dict:
                    res = write_channel(cfg, world, f"{transport}://{other}", False, aggregators=k)
                    world.barrier()
                    if world.rank == 0:
                        _remove(other)
                    return res

                measure(
                    (transport, "sync", f"aggregators={k}"),
                    f"write {transport} aggregators={k}",
                    agg,
                )
            if keep and last:
                kept[transport] = path
            # Asynchronous publish, with the simulation computing between steps twice as
            # long as a synchronous write of a step took (in the first repeat, so that every
            # repeat does the same work): output is then at most a third of the run, and the
            # background writer has room to finish each step before the next.
            if transport not in compute:
                blocked = max(p["blocked_mean"] for p in world.gather(res))
                compute[transport] = COMPUTE_FACTOR * blocked
            apath = os.path.join(workdir, f"async{SUFFIX[transport]}")

            def asyn(apath: str = apath, transport: str = transport) -> dict:
                url = f"{transport}://{apath}"
                res = write_channel(cfg, world, url, True, compute[transport])
                world.barrier()
                res["written"] = written_as(url, world)
                world.barrier()
                if world.rank == 0:
                    _remove(apath)
                return res

            measure((transport, "async", ""), f"write {transport} async", asyn)

    def figures(cell: tuple[str, str, str]) -> list[dict[str, float]]:
        """Per repeat: the figures of the cell."""
        out = []
        for res, per_rank in runs[cell]:
            blocked = max(p["blocked_mean"] for p in per_rank)
            out.append(
                {
                    "blocked": blocked,
                    "wall": res["wall"],
                    "gbps": nbytes / res["wall"] / 1e9,
                    "fraction": max(p["blocked_total"] / p["wall"] for p in per_rank),
                }
            )
        return out

    base = figures(("plain h5py", "sync", plain_as))
    base_blocked = spread([f["blocked"] for f in base])["median"]
    base_gbps = spread([f["gbps"] for f in base])["median"]
    sync_blocked: dict[str, float] = {}
    sync_seconds: dict[str, float] = {}
    for cell in runs:
        transport, mode, variant = cell
        figs = figures(cell)
        # ordered slower first: lower GB/s, or (async) more time blocked
        pick = median_run([f["gbps"] if mode == "sync" else -f["blocked"] for f in figs])
        res, per_rank = runs[cell][pick]
        f = figs[pick]
        row: dict[str, Any] = {
            "phase": "write",
            "transport": transport,
            "mode": mode,
            "written": variant or res.get("written") or written[transport],
            "blocked_ms_per_step": f["blocked"] * 1e3,
            "blocked_fraction": f["fraction"],
            "seconds": res["wall"],
            "bytes": nbytes,
            "baseline": "plain h5py",
            "vs_baseline_blocked": f["blocked"] / base_blocked,
            "gbps": None,
            "limit": "seq_write",
            "of_limit": None,
            "repeats": len(figs),
            "spread": {
                "blocked_ms_per_step": _ms(spread([x["blocked"] for x in figs])),
            },
            "rank_spread": rank_spread([p["blocked_mean"] * 1e3 for p in per_rank]),
        }
        if mode == "sync":  # from open to close, nothing but writing
            row["gbps"] = f["gbps"]
            row["vs_baseline_gbps"] = f["gbps"] / base_gbps
            row["of_limit"] = f["gbps"] / limits["seq_write_gbps"]
            row["compute_ms_per_step"] = 0.0
            row["spread"]["gbps"] = _pair(spread([x["gbps"] for x in figs]))
            if not variant:
                sync_blocked[transport] = f["blocked"]
                sync_seconds[transport] = res["wall"]
        else:
            row["compute_ms_per_step"] = compute[transport] * 1e3
            row["vs_sync_blocked"] = f["blocked"] / max(sync_blocked.get(transport, 0), 1e-9)
            # The time writing added to the simulation's run, beyond its computing.
            row["overhead_fraction"] = max(
                0.0,
                (res["wall"] - compute[transport] * cfg.steps) / max(sync_seconds[transport], 1e-9),
            )
        rec.add(**row, cell=labels[cell])
        rec.add_ranks(
            [
                {"seconds": p["seconds"], "blocked_ms_per_step": p["blocked_mean"] * 1e3}
                for p in per_rank
            ],
            phase="write",
            transport=transport,
            mode=mode,
            written=row["written"],
        )
    return kept


def _pair(s: dict[str, float]) -> list[float]:
    return [s["min"], s["max"]]


def _ms(s: dict[str, float]) -> list[float]:
    return [s["min"] * 1e3, s["max"] * 1e3]


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
