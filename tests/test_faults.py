"""Faults across components: one crashed workflow leaving every kind of leftover behind for the
next run. (Per-transport faults are in the conformance suite; per-component ones beside their
component's tests, e.g. a DataLoader worker dying while it fills the cache in test_cache.py.)"""

from __future__ import annotations

import glob
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from dataplane.cache import NodeCache

from faults import leftovers, read_events, run_proc, wait_for_event

pytestmark = pytest.mark.timeout(180)

CRASH = textwrap.dedent(
    """
    import os, sys, time, numpy as np
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
    real = os.pwritev
    def stuck(fd, buffers, offset):  # a cache entry half written when the end comes
        if "/cache/tmp/" in os.readlink(f"/proc/self/fd/{fd}"):
            whole = b"".join(bytes(b) for b in buffers)
            real(fd, [whole[: len(whole) // 2]], offset)
            print('{"ready": true}', flush=True)
            time.sleep(3600)
        return real(fd, buffers, offset)
    os.pwritev = stuck
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
