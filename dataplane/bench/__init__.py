"""``dataplane bench``: both sides of a coupled workflow, measured on the user's filesystem.

Phases (``run(config, phases)``):

- the machine's limits, every run: memcpy bandwidth, sequential write and read (cold and
  warm) of ``--dir``, and (with the read phase) the DataLoader's own ceiling;
- ``write``: the simulation side (:mod:`dataplane.bench.write`);
- ``read``: the training side (:mod:`dataplane.bench.read`);
- ``stream``: coupled jobs (:mod:`dataplane.bench.stream`).

Under ``mpiexec -n R`` every rank takes part: figures are aggregates (rank ``None``) and, with
more than one rank, per rank. Every figure is one JSON line with the run's configuration and
its ratio to the limit that bounds it; the report adds a Markdown table and PNG plots.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import uuid
from typing import Any

from dataplane.errors import OptionError

from ._common import (
    Config,
    Limits,
    Recorder,
    World,
    evict,
    memcpy_gbps,
    parse_size,
    seq_read,
    seq_write,
)

__all__ = [
    "PHASES",
    "Config",
    "Limits",
    "World",
    "evict",
    "measure_limits",
    "memcpy_gbps",
    "parse_size",
    "run",
    "save",
    "seq_read",
    "seq_write",
]

PHASES = ("write", "read", "stream")


def measure_limits(rec: Recorder, world: World, workdir: str) -> Limits:
    """memcpy, and sequential write / cold read / warm read of a file per rank in ``workdir``."""
    cfg = rec.config
    with rec.task("limit: memcpy"):
        world.barrier()
        memcpy = sum(world.gather(memcpy_gbps()))
    size = min(max(cfg.data_bytes // world.size, 64 << 20), 1 << 30)
    path = os.path.join(workdir, f"seq-rank{world.rank}.bin")
    with rec.task("limit: sequential write and read of --dir"):
        world.barrier()
        # Best of two: the first large write after a quiet spell can be several times slower
        # (virtual machines hand freed memory back to the host and fault it in again).
        w = min(max(world.gather(seq_write(path, size))) for _ in range(2))
        how = evict([path], cfg.evict, world)
        cold = max(world.gather(seq_read(path)))
        world.barrier()
        warm = max(world.gather(seq_read(path)))
        os.remove(path)
    total = size * world.size
    limits = Limits(memcpy, total / w / 1e9, total / cold / 1e9, total / warm / 1e9, how)
    seq = "limit: sequential write and read of --dir"
    for what, gbps, extra in (
        ("memcpy", limits.memcpy_gbps, {"cell": "limit: memcpy"}),
        ("sequential write", limits.seq_write_gbps, {"bytes": total, "cell": seq}),
        (
            "sequential read cold",
            limits.seq_read_cold_gbps,
            {"bytes": total, "evicted": how, "cell": seq},
        ),
        ("sequential read warm", limits.seq_read_warm_gbps, {"bytes": total, "cell": seq}),
    ):
        rec.add(phase="limit", what=what, gbps=gbps, **extra)
    return limits


def run(
    config: Config,
    phases: tuple[str, ...] = PHASES,
    world: World | None = None,
    progress: bool | None = None,
) -> list[dict[str, Any]]:
    """Run the benchmark; returns every figure (on every rank). ``progress``: a bar on
    stderr (rank 0); None shows it only on a terminal."""
    unknown = [p for p in phases if p not in PHASES]
    if unknown:
        raise ValueError(f"unknown phase(s) {unknown}; choose from {', '.join(PHASES)}")
    world = world or World()
    rec = Recorder(config, world, progress)
    os.makedirs(config.dir, exist_ok=True)
    name = world.comm.bcast(f"dp-bench-{uuid.uuid4().hex[:10]}" if world.rank == 0 else None)
    workdir = os.path.join(config.dir, name)
    # The cache is node-local: one directory per node, shared by the node's ranks.
    cache_root = os.path.join(config.cache_dir or tempfile.gettempdir(), name + "-cache")
    files = len(config.file_transports)
    reps = config.repeats
    rec.plan(2)
    if "write" in phases:
        rec.plan(reps * (1 + 2 * files))
    if "read" in phases:
        # the ceiling; naive and dataplane per pattern; the data, unless the write phase ran
        rec.plan(1 + reps * files * 6 + (0 if "write" in phases else files))
        from . import nodes

        if config.nodes is not None and config.nodes > world.size:
            raise OptionError(
                f"--nodes {config.nodes} needs at least as many ranks (mpiexec -n), "
                f"got {world.size}"
            )
        split = nodes.groups(world, config.nodes)[0] if files else 1
        rec.plan(reps * len(nodes.MODES) if split > 1 else 0)
    if "stream" in phases:
        rec.plan(reps * len(config.stream_sizes) * (2 + len(config.stream_transports)))
    if world.rank == 0:
        os.makedirs(workdir)
    world.barrier()
    try:
        limits = measure_limits(rec, world, workdir).as_dict()
        paths: dict[str, str] = {}
        if "write" in phases and files:
            from . import write

            paths = write.run(rec, world, workdir, limits, keep="read" in phases)
        if "read" in phases and files:
            from . import read, write

            if not paths:
                paths = write.prepare(rec, world, workdir)
            read.run(rec, world, paths, limits, cache_root)
            from . import nodes

            transport = "h5" if "h5" in paths else next(iter(paths))
            nodes.run(rec, world, transport, paths[transport], cache_root)
        if "stream" in phases:
            from . import stream

            stream.run(rec, world)
        rec.finish()
    finally:
        world.barrier()
        if world.rank == 0:
            shutil.rmtree(workdir, ignore_errors=True)
        if world.node_leader:
            shutil.rmtree(cache_root, ignore_errors=True)
        rec.close()
    return rec.rows


def save(rows: list[dict[str, Any]], out_dir: str, command: str = "") -> dict[str, Any]:
    """Write ``bench.jsonl``, ``bench.md`` and the PNG plots into ``out_dir``; returns paths."""
    from .report import markdown, plots

    os.makedirs(out_dir, exist_ok=True)
    jsonl = os.path.join(out_dir, "bench.jsonl")
    with open(jsonl, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    md = os.path.join(out_dir, "bench.md")
    text = markdown(rows, command)
    with open(md, "w") as f:
        f.write(text)
    try:
        pngs = plots(rows, out_dir)
    except ImportError:
        print("matplotlib is missing: no plots (pip install 'dataplane[bench]')", file=sys.stderr)
        pngs = []
    return {"jsonl": jsonl, "markdown": md, "plots": pngs, "text": text}
