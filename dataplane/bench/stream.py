"""Streams between two processes: ``shm://`` and ``sst://`` against ``multiprocessing.Queue``.

For each step size: throughput (``queue_limit=4``, Queue ``maxsize=4``) and latency from
``write``/``put`` to delivery (``queue_limit=1``, so a step never waits behind another), in
steady state: the first ``WARMUP`` steps are left out. A writer child process publishes for
about ``seconds`` and this process subscribes and touches every step. ``raw copy`` is
``numpy.copyto`` of the step into shared memory in one process: moving the bytes once, the
limit every method is reported against.
"""

from __future__ import annotations

import itertools
import multiprocessing as mp
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable
from typing import Any

import numpy as np

import dataplane as dp

from ._common import Recorder, World, fmt_size
from .load import median_run, rank_spread, spread

__all__ = ["METHODS", "bench_queue", "bench_raw", "bench_stream", "run"]

WARMUP = 8
MAX_STEPS = 100000
METHODS = ("raw copy", "shm://", "sst://", "mp.Queue", "ring")


def _steps_until(seconds: float) -> Callable[[int], bool]:
    """A writer's stop rule: at least ``3 * WARMUP`` steps and ``seconds`` after the warm-up."""
    t_warm: list[float] = []

    def more(i: int) -> bool:
        if i == WARMUP:
            t_warm.append(time.perf_counter())
        if i < 3 * WARMUP:
            return True
        return i < MAX_STEPS and time.perf_counter() - t_warm[0] < seconds

    return more


# -- writers (child processes) -----------------------------------------------------------------
def _dp_writer(url: str, size: int, seconds: float, queue_limit: int, opts: dict) -> None:
    data = np.random.default_rng(0).integers(0, 255, size, dtype=np.uint8)
    more = _steps_until(seconds)
    with dp.publish(url, queue_limit=queue_limit, rendezvous=1, **opts) as pub:
        for i in itertools.count():
            if not more(i):
                break
            pub.write({"x": data, "t": np.float64(time.perf_counter())})


def _queue_writer(q: Any, size: int, seconds: float) -> None:
    data = np.random.default_rng(0).integers(0, 255, size, dtype=np.uint8)
    more = _steps_until(seconds)
    for i in itertools.count():
        if not more(i):
            break
        q.put((time.perf_counter(), data))
    q.put(None)


def _ring_writer(buf: Any, free: Any, full: Any, size: int, slots: int, seconds: float) -> None:
    data = np.random.default_rng(0).integers(0, 255, size, dtype=np.uint8)
    stride = _align8(size) + 8
    ring = np.frombuffer(buf, np.uint8)
    stamps = [ring[k * stride : k * stride + 8].view(np.float64) for k in range(slots)]
    rows = [ring[k * stride + 8 : k * stride + 8 + size] for k in range(slots)]
    more = _steps_until(seconds)
    for i in itertools.count():
        k = i % slots
        free.acquire()
        if not more(i):
            stamps[k][0] = -1.0
            full.release()
            break
        rows[k][:] = data
        stamps[k][0] = time.perf_counter()
        full.release()


def _align8(n: int) -> int:
    return (n + 7) // 8 * 8


# -- measurements -----------------------------------------------------------------------------
def _summary(size: int, sent: list[float], got: list[float]) -> dict[str, Any]:
    """Throughput over steps WARMUP.. (from the write of WARMUP to the delivery of the last),
    latency percentiles over the same steps."""
    n = len(got)
    if n <= WARMUP + 1:
        raise dp.DataplaneError(f"only {n} steps arrived; need more than {WARMUP + 1}")
    elapsed = got[-1] - sent[WARMUP]
    lat_us = (np.array(got[WARMUP:]) - np.array(sent[WARMUP:])) * 1e6
    return {
        "size": size,
        "steps": n,
        "gbps": size * (n - WARMUP) / elapsed / 1e9,
        "median_us": float(np.median(lat_us)),
        "p99_us": float(np.percentile(lat_us, 99)),
    }


def bench_raw(size: int, seconds: float) -> dict[str, Any]:
    """One process copying the step into a shared-memory buffer: the physical limit."""
    src = np.random.default_rng(0).integers(0, 255, size, dtype=np.uint8)
    with tempfile.TemporaryFile(dir="/dev/shm" if os.path.isdir("/dev/shm") else None) as f:
        f.truncate(max(size, 1))
        dst = np.memmap(f, np.uint8, "r+", shape=(size,)) if size else np.empty(0, np.uint8)
        np.copyto(dst, src)  # fault the pages in once, as a running channel has
        sent, got = [], []
        more = _steps_until(seconds)
        for i in itertools.count():
            if not more(i):
                break
            sent.append(time.perf_counter())
            np.copyto(dst, src)
            got.append(time.perf_counter())
        del dst
    return _summary(size, sent, got)


def bench_stream(
    scheme: str, size: int, seconds: float, queue_limit: int, workdir: str, ctx: Any
) -> dict[str, Any]:
    """A writer process publishes to ``scheme``; this process subscribes and reads each step."""
    name = f"bench-{uuid.uuid4().hex[:10]}"
    if scheme == "shm":
        url, opts = f"shm://{name}", {"dir": os.path.join(workdir, "shm")}
    else:
        url, opts = f"sst://{os.path.join(workdir, name)}", {}
    proc = ctx.Process(target=_dp_writer, args=(url, size, seconds, queue_limit, opts))
    proc.start()
    sent, got = [], []
    try:
        with dp.subscribe(url, timeout=120, **opts) as sub:
            for step in sub:
                now = time.perf_counter()
                x = step["x"]
                if x.nbytes != size:
                    raise dp.DataplaneError(f"{url}: a step of {x.nbytes} bytes, not {size}")
                sent.append(float(step["t"]))
                got.append(now)
    finally:
        proc.join(60)
        if proc.is_alive():
            proc.kill()
            proc.join()
    if proc.exitcode != 0:
        raise dp.DataplaneError(f"the {url} writer failed (exit code {proc.exitcode})")
    return _summary(size, sent, got)


def bench_queue(size: int, seconds: float, maxsize: int, ctx: Any) -> dict[str, Any]:
    """The baseline: numpy arrays pickled through ``multiprocessing.Queue``."""
    q = ctx.Queue(maxsize=maxsize)
    proc = ctx.Process(target=_queue_writer, args=(q, size, seconds))
    proc.start()
    sent, got = [], []
    try:
        while True:
            item = q.get(timeout=120)
            now = time.perf_counter()
            if item is None:
                break
            sent.append(item[0])
            got.append(now)
    finally:
        proc.join(60)
    return _summary(size, sent, got)


def bench_ring(size: int, seconds: float, slots: int, ctx: Any) -> dict[str, Any]:
    """The floor of any shared-memory stream: a ring of ``slots`` steps in shared memory and
    two semaphores (free, full), no metadata, no liveness checks; the reader touches each
    step in place (as shm:// readers get views) before it frees the slot."""
    stride = _align8(size) + 8
    buf = ctx.RawArray("b", stride * slots)
    free, full = ctx.Semaphore(slots), ctx.Semaphore(0)
    proc = ctx.Process(target=_ring_writer, args=(buf, free, full, size, slots, seconds))
    proc.start()
    ring = np.frombuffer(buf, np.uint8)
    stamps = [ring[k * stride : k * stride + 8].view(np.float64) for k in range(slots)]
    rows = [ring[k * stride + 8 : k * stride + 8 + size] for k in range(slots)]
    sent, got = [], []
    try:
        for i in itertools.count():
            k = i % slots
            if not full.acquire(timeout=120):
                raise dp.DataplaneError("the ring writer stopped sending")
            now = time.perf_counter()
            t = float(stamps[k][0])
            if t < 0:
                break
            if rows[k].nbytes != size:
                raise dp.DataplaneError(f"a ring step of {rows[k].nbytes} bytes, not {size}")
            sent.append(t)
            got.append(now)
            free.release()
    finally:
        proc.join(60)
        if proc.is_alive():
            proc.kill()
            proc.join()
    return _summary(size, sent, got)


def measure(method: str, size: int, seconds: float, workdir: str, ctx: Any) -> dict[str, Any]:
    """Throughput and latency of one method at one step size."""
    if method == "raw copy":
        return bench_raw(size, seconds)
    if method == "ring":
        thr = bench_ring(size, seconds, 4, ctx)
        lat = bench_ring(size, seconds / 2, 1, ctx)
    elif method == "mp.Queue":
        # Pickling large steps is slow: a shorter run says as much.
        thr = bench_queue(size, seconds, 4, ctx)
        lat = bench_queue(size, seconds / 2, 1, ctx)
    else:
        scheme = method.removesuffix("://")
        thr = bench_stream(scheme, size, seconds, 4, workdir, ctx)
        lat = bench_stream(scheme, size, seconds / 2, 1, workdir, ctx)
    thr["median_us"], thr["p99_us"] = lat["median_us"], lat["p99_us"]
    return thr


def _range(values: Any) -> list[float]:
    v = list(values)
    return [min(v), max(v)]


def run(rec: Recorder, world: World) -> None:
    """Every rank runs its own writer/reader pairs at the same time (aggregate throughput)."""
    cfg = rec.config
    methods = ["raw copy", *(f"{t}://" for t in cfg.stream_transports), "mp.Queue"]
    ctx = mp.get_context("spawn")  # the parent may hold threads (prefetchers, loaders)
    workdir = tempfile.mkdtemp(prefix="dp-bench-stream-")
    # (size, method) -> per repeat: every rank's figures
    runs: dict[tuple[int, str], list[list[dict[str, Any]]]] = {}
    try:
        for _ in range(cfg.repeats):  # every cell once per repeat: drift hits all alike
            for size in cfg.stream_sizes:
                for method in methods:
                    with rec.task(f"stream {method} {fmt_size(size)}"):
                        world.barrier()
                        fig = measure(method, size, cfg.stream_seconds, workdir, ctx)
                        runs.setdefault((size, method), []).append(world.gather(fig))
        raw: dict[int, float] = {}
        for (size, method), reps in runs.items():
            totals = [sum(f["gbps"] for f in figs) for figs in reps]
            pick = median_run(totals)
            figs, total = reps[pick], totals[pick]
            if method == "raw copy":
                raw[size] = total
            s = spread(totals)
            rec.add(
                phase="stream",
                method=method,
                step_bytes=size,
                steps=sum(f["steps"] for f in figs),
                gbps=total,
                median_us=float(np.median([f["median_us"] for f in figs])),
                p99_us=max(f["p99_us"] for f in figs),
                limit="raw copy",
                of_limit=total / raw[size] if raw.get(size) else None,
                repeats=len(reps),
                spread={
                    "gbps": [s["min"], s["max"]],
                    "median_us": _range(
                        float(np.median([f["median_us"] for f in r])) for r in reps
                    ),
                },
                rank_spread=rank_spread([f["gbps"] for f in figs]),
                cell=f"stream {method} {fmt_size(size)}",
            )
            rec.add_ranks(
                [
                    {"gbps": f["gbps"], "median_us": f["median_us"], "p99_us": f["p99_us"]}
                    for f in figs
                ],
                phase="stream",
                method=method,
                step_bytes=size,
            )
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
