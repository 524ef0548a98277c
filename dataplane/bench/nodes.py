"""Cooperating node caches against caches alone: shuffled epochs of a distributed sampler.

With more than one node (the machine's nodes, or ``--nodes N``: the ranks split in order into
N named nodes, each with its own cache directory, to try it on one machine), each node's
cache holds ``share(N)`` of the dataset: together they hold it, one alone does not. For each
mode, ``alone`` (``NodeCache(path)``) and ``cooperating`` (``NodeCache(path, comm=comm)``),
a fresh set of caches reads ``EPOCHS`` block-shuffled epochs through the DataLoader. Reported
per mode: the samples/s of each epoch (all ranks; epochs are read to their end, timed over
their first ``--max-seconds``), bytes read from the source over all nodes against the
dataset's size, bytes moved between nodes, and peers that failed.
"""

from __future__ import annotations

import os
import shutil
import socket
import statistics
from typing import Any

from dataplane.cache import NodeCache, cache_stats
from dataplane.loaders import SampleDataset, ShuffleSampler

from ._common import Recorder, World
from .load import median_run, spread
from .read import aggregate, loader_for, run_epoch

__all__ = ["EPOCHS", "MODES", "groups", "run", "share"]

EPOCHS = 3
SHARD = 4 << 20  # SampleDataset's default shard_bytes
MODES = ("alone", "cooperating")


def share(nodes: int) -> float:
    """The part of the dataset each node's cache holds: less than all of it, while all the
    nodes' caches together hold it half again."""
    return min(0.75, 1.5 / nodes)


def groups(world: World, nodes: int | None) -> tuple[int, int, bool]:
    """(nodes, this rank's node, whether this rank is its node's first): ``nodes`` named
    nodes of consecutive ranks, or (None) the machines the ranks run on."""
    if nodes:
        mine = world.rank * nodes // world.size
        first = (mine * world.size + nodes - 1) // nodes  # the lowest rank r with r*n//size == mine
        return nodes, mine, world.rank == first
    hosts = world.gather(socket.gethostname())
    names = list(dict.fromkeys(hosts))
    mine = names.index(hosts[world.rank])
    return len(names), mine, hosts.index(hosts[world.rank]) == world.rank


def run(rec: Recorder, world: World, transport: str, path: str, cache_root: str) -> None:
    cfg = rec.config
    nodes, node, leader = groups(world, cfg.nodes)
    if nodes < 2:
        return
    url = f"{transport}://{path}"
    part = share(nodes)
    capacity = int(cfg.data_bytes * part) + SHARD + (1 << 16)  # at least a shard
    runs: dict[str, list[dict[str, Any]]] = {mode: [] for mode in MODES}
    for _ in range(cfg.repeats):  # every cell once per repeat: drift hits all alike
        for mode in MODES:
            with rec.task(f"read {transport} across {nodes} nodes, caches {mode}"):
                cdir = os.path.join(cache_root, f"nodes-{mode}-{node}")
                kw: dict[str, Any] = {}
                if mode == "cooperating":
                    kw = {"comm": world.comm, "node": f"n{node}" if cfg.nodes else None}
                cache = NodeCache(cdir, capacity=capacity, **kw)
                ds = SampleDataset(url, vars="x", cache=cache)
                sampler = ShuffleSampler(
                    ds, seed=0, block=cfg.block, rank=world.rank, world=world.size
                )
                loader = loader_for(ds, cfg.workers, cfg.batch_size, sampler=sampler)
                epochs = []
                try:
                    for e in range(EPOCHS):
                        sampler.set_epoch(e)
                        world.barrier()
                        res = run_epoch(loader, cfg.max_seconds, cfg.compute_ms, finish=True)
                        epochs.append(aggregate(world.gather(res), cfg.sample_size))
                    del loader  # its workers exit and write their counters
                    ds.close()
                    cache.flush_stats()
                    world.barrier()
                    stats = world.gather(cache_stats(cdir) if leader else None)
                finally:
                    ds.close()
                    cache.close()
                    world.barrier()  # no node's server stops while another may ask it
                    if cache.peers is not None:
                        cache.peers.close()
                    if leader:
                        shutil.rmtree(cdir, ignore_errors=True)
                per_node = [s for s in stats if s is not None]
                later = [e["samples_per_s"] for e in epochs[1:]]
                runs[mode].append(
                    {
                        "epochs_samples_per_s": [e["samples_per_s"] for e in epochs],
                        "complete": all(e["complete"] for e in epochs),
                        "samples_per_s": statistics.median(later),
                        "source_over_dataset": sum(s["source_bytes"] for s in per_node)
                        / cfg.data_bytes,
                        "peer_bytes": sum(s["peer_bytes"] for s in per_node),
                        "peer_failures": sum(
                            s["peer_failures"] + s["peer_absent"] for s in per_node
                        ),
                    }
                )
    results: dict[str, dict[str, Any]] = {}
    for mode, reps in runs.items():
        rates = [r["samples_per_s"] for r in reps]
        pick = median_run(rates)
        s = spread(rates)
        results[mode] = rec.add(
            phase="nodes",
            transport=transport,
            mode=mode,
            cache_nodes=nodes,
            cache_share=part,
            **reps[pick],
            repeats=len(reps),
            spread={"samples_per_s": [s["min"], s["max"]]},
            cell=f"read {transport} across {nodes} nodes, caches {mode}",
        )
    results["cooperating"]["vs_alone"] = (
        results["cooperating"]["samples_per_s"] / results["alone"]["samples_per_s"]
    )
