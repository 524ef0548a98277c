"""Faults across components: a DataLoader worker dying while it fills the cache, and one crashed
workflow leaving every kind of leftover behind for the next run. (Per-transport faults are in
the conformance suite; per-component ones beside their component's tests.)"""

from __future__ import annotations

import glob
import json
import os
import signal
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, get_worker_info

import dataplane as dp
from dataplane.cache import CacheWarning, NodeCache
from dataplane.loaders import SampleDataset, ShuffleSampler

from faults import die_at_call, kill_points, leftovers, read_events, run_proc, wait_for_event

pytestmark = pytest.mark.timeout(180)

STEPS, ROWS, WIDTH = 8, 64, 256  # float32 rows of 1 KiB, 64 KiB per step


def write_rows(url: str) -> None:
    with dp.publish(url) as pub:
        for s in range(STEPS):
            pub.write(
                {"x": np.repeat((s * 1000 + np.arange(ROWS, dtype=np.float32))[:, None], WIDTH, 1)}
            )


def ids(batch: torch.Tensor) -> list[int]:
    return batch[:, 0].to(torch.int64).tolist()


@pytest.mark.parametrize("seed", range(3))
def test_a_dataloader_worker_killed_while_filling_the_cache(tmp_path, monkeypatch, seed) -> None:
    """SIGKILL inside a worker's write of a cache entry (at a seeded write, after half its
    bytes): the DataLoader raises instead of hanging, no entry is ever half written, and the
    next epoch serves every sample exactly, the dead worker's temporary file swept."""
    url = f"h5://{tmp_path}/run.h5"
    write_rows(url)
    path = tmp_path / "c"
    tmp_dir = str(path / "tmp")
    real_pwrite = os.pwrite

    def into_the_cache(fd: int, data, offset: int) -> bool:
        in_worker = get_worker_info() is not None
        return in_worker and os.readlink(f"/proc/self/fd/{fd}").startswith(tmp_dir)

    def half(fd: int, data, offset: int) -> None:
        real_pwrite(fd, bytes(data)[: len(data) // 2], offset)

    # Two writes per entry (payload, then header and table): die in the 1st to 6th.
    nth = kill_points(seed, 6)[0] + 1
    die_at_call(monkeypatch, os, "pwrite", nth, when=into_the_cache, before=half)

    def epoch() -> list[int]:
        ds = SampleDataset(url, "x", cache=NodeCache(path, capacity="64MiB"),
                           shard_bytes=64 * 1024, prefetch=False)  # fmt: skip
        sampler = ShuffleSampler(ds, seed=seed)
        loader = DataLoader(ds, batch_size=16, sampler=sampler, num_workers=2, timeout=60)
        try:
            return [i for batch in loader for i in ids(batch)]
        finally:
            ds.close()

    with pytest.raises(RuntimeError, match="DataLoader worker"):
        epoch()
    dead_tmp = os.listdir(tmp_dir)
    assert len(dead_tmp) >= 1, "the worker died with an entry half written"
    entries = os.listdir(path / "entries")
    with warnings.catch_warnings():
        warnings.simplefilter("error", CacheWarning)  # a damaged entry would warn
        check = NodeCache(path, capacity="64MiB")
        for k in entries:
            assert check.get(k) is not None, f"entry {k} is incomplete"
        assert check.stats["corrupt"] == 0

    monkeypatch.undo()
    with warnings.catch_warnings():
        warnings.simplefilter("error", CacheWarning)
        got = epoch()
    assert sorted(got) == [s * 1000 + r for s in range(STEPS) for r in range(ROWS)]
    assert os.listdir(tmp_dir) == [], f"{len(dead_tmp)} temporary file(s) of the dead worker left"
    assert len(os.listdir(path / "entries")) == STEPS


CRASH = textwrap.dedent(
    """
    import os, sys, threading, time, numpy as np
    import dataplane as dp
    from dataplane._testprocs import make_step
    from dataplane.cache import NodeCache
    urls, cache_path = sys.argv[1:-1], sys.argv[-1]
    pubs = []
    for url in urls:
        pub = dp.publish(url)
        for i in range(2):
            pub.write(make_step(i))
        w = pub._writer  # then die in the middle of step 2: begun, part of its data written
        step = make_step(2)
        specs = {k: dp.VarSpec(np.asarray(v).dtype, np.shape(v)) for k, v in step.items()}
        w.begin_step(2, specs, {})
        w.put("u", step["u"])
        pubs.append(pub)
    real = os.pwrite
    def stuck(fd, data, offset):  # a cache entry half written when the end comes
        if "/cache/tmp/" in os.readlink(f"/proc/self/fd/{fd}"):
            real(fd, bytes(data)[: len(data) // 2], offset)
            print('{"ready": true}', flush=True)
            time.sleep(3600)
        return real(fd, data, offset)
    os.pwrite = stuck
    NodeCache(cache_path, capacity="16MiB").fetch("a" * 40, lambda: {"z": np.ones(1 << 16)})
    """
)


def test_leftovers_of_a_crashed_run_never_block_the_next(tmp_path) -> None:
    """One job with a writer on every cross-process transport, each inside a step, and a cache
    entry half written, is killed whole (its helper processes too). What it leaves (dead
    leases, partial steps, shared-memory segments, an SST contact file, a temporary cache
    entry) neither blocks nor leaks into the next run, which writes and reads every channel
    whole; the crashed run's segments and temporary files are gone afterwards."""
    urls = {
        "bp5": f"bp5://{tmp_path}/a.bp",
        "h5": f"h5://{tmp_path}/b.h5",
        "zarr": f"zarr://{tmp_path}/c.zarr",
        "shm": f"shm://crash-{tmp_path.name}?dir={tmp_path}/shm",
        "sst": f"sst://{tmp_path}/e",
    }
    cache_path = str(tmp_path / "cache")
    before = set(glob.glob("/dev/shm/dp-*"))
    job = subprocess.Popen(
        [sys.executable, "-c", CRASH, *urls.values(), cache_path],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    wait_for_event(job, "ready", 90)
    segments = set(glob.glob("/dev/shm/dp-*")) - before
    os.killpg(job.pid, signal.SIGKILL)
    job.communicate(timeout=30)

    left = leftovers(tmp_path)
    leases = {p: json.loads(Path(p).read_text()) for p in left["lease"]}
    assert len(leases) == 4 and all(info["state"] == "open" for info in leases.values()), leases
    assert left["contact"] == [f"{tmp_path}/e.sst"], left  # the crashed SST writer's
    assert len(left["tmp"]) == 1, left  # the cache entry being written
    assert len(segments) >= 2, segments  # the shm:// channel's, and the SST relay's

    # The next run: every channel written again (files continue after their complete steps),
    # each read whole by a subscriber process, and the cache used again. (A subscriber that
    # came before the new writer of a file would rightly be told the old writer died.)
    files = ("bp5", "h5", "zarr")
    writers, readers = {}, {}
    for scheme, url in urls.items():
        if scheme in files:
            writers[scheme] = run_proc("publish", url, "--steps", "3", "--mode", "a")
        else:
            readers[scheme] = run_proc("subscribe", url, "--timeout", "60")
            writers[scheme] = run_proc("publish", url, "--steps", "3", "--opt=rendezvous=1")
    cache = NodeCache(cache_path, capacity="16MiB")
    assert cache.fetch("a" * 40, lambda: {"z": np.ones(1 << 16)})["z"].sum() == 1 << 16
    for scheme, url in urls.items():
        wrote = [e["wrote"] for e in read_events(writers[scheme], 90) if "wrote" in e]
        if scheme in files:
            readers[scheme] = run_proc("subscribe", url, "--timeout", "60")
        events = read_events(readers[scheme], 90)
        got = [e["index"] for e in events if "index" in e]
        first = 2 if scheme in files else 0  # no trace of the partial step
        assert wrote == [first, first + 1, first + 2], (scheme, wrote)
        assert got == list(range(first + 3)) and events[-1]["end"] == "closed", (scheme, events)
    assert set(glob.glob("/dev/shm/dp-*")) & segments == set(), "the crashed run's segments"
    after = leftovers(tmp_path)
    assert after["tmp"] == [] and after["contact"] == [], after
    states = [json.loads(Path(p).read_text())["state"] for p in after["lease"]]
    assert states == ["closed"] * 4, states
