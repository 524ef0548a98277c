"""Many files as one dataset: ``SampleDataset("h5:///data/*.h5")`` or a list of URLs, read
through the same shards, cache, sampler and batches as one channel; every value compared
with what was written."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from torch.utils.data import DataLoader

import dataplane as dp
from dataplane.cache import NodeCache
from dataplane.loaders import SampleDataset, ShuffleSampler, loader
from dataplane.loaders._shards import ShardSource

pytestmark = [
    pytest.mark.timeout(240),
    pytest.mark.filterwarnings("ignore:This DataLoader will create 4 worker processes"),
]

ROWS, COLS = 12, 5


def write_file(url: str, job: int, steps: int = 2, mode: str = "w", first: int = 0) -> None:
    """Row r of step s of job j holds j*10000 + s*100 + r; its label is j."""
    with dp.publish(url, mode=mode) as pub:
        for s in range(first, first + steps):
            v = job * 10000 + s * 100 + np.arange(ROWS, dtype=np.float64)
            pub.write({"x": np.repeat(v[:, None], COLS, axis=1), "job": np.full(ROWS, job)})


def values(x) -> list[int]:
    """The value each row holds (checking its columns agree)."""
    x = np.asarray(x)
    assert (x == x[:, :1]).all()
    return [int(v) for v in x[:, 0]]


def expected(jobs: list[int], steps: int = 2) -> list[int]:
    return [j * 10000 + s * 100 + r for j in jobs for s in range(steps) for r in range(ROWS)]


@pytest.fixture()
def files(tmp_path) -> list[str]:
    urls = [f"h5://{tmp_path}/data/run-{j:03d}.h5" for j in range(7)]
    os.makedirs(tmp_path / "data")
    for j, u in enumerate(urls):
        write_file(u, j)
    return urls


def test_a_glob_reads_every_file_in_order(tmp_path, files) -> None:
    ds = SampleDataset(f"h5://{tmp_path}/data/run-*.h5", vars=("x", "job"))
    assert ds.steps == 14 and len(ds) == 14 * ROWS
    x, job = ds.batch(list(range(len(ds))))
    assert values(x) == expected(list(range(7)))
    assert job.tolist() == [j for j in range(7) for _ in range(2 * ROWS)]
    # A list of URLs in its own order.
    order = [files[3], files[0], files[6]]
    ds = SampleDataset(order, vars="x")
    assert values(ds.batch(list(range(len(ds))))) == expected([3, 0, 6])
    assert values(np.stack([ds[i] for i in (0, ROWS * 2, len(ds) - 1)])) == [
        30000,
        0,
        60000 + 100 + ROWS - 1,
    ]


@pytest.mark.parametrize("workers,context", [(0, None), (2, "fork"), (2, "spawn")])
def test_shuffled_epochs_through_the_cache_with_workers(tmp_path, files, workers, context) -> None:
    cache = NodeCache(tmp_path / "cache", capacity="64MiB")
    ds = SampleDataset(
        f"h5://{tmp_path}/data/*.h5", vars="x", cache=cache, shard_bytes=4 * COLS * 8
    )
    sampler = ShuffleSampler(ds, seed=2, block=3)
    plain = DataLoader(
        ds, batch_size=10, sampler=sampler, num_workers=workers, multiprocessing_context=context
    )
    batches = loader(ds, 10, sampler=sampler, num_workers=workers, multiprocessing_context=context)
    for epoch in (0, 1):
        sampler.set_epoch(epoch)
        got = [v for x in plain for v in values(x)]
        sampler.set_epoch(epoch)
        again = [v for x in batches for v in values(x)]
        assert got == again and sorted(got) == sorted(expected(list(range(7))))
        assert got != sorted(got)


def test_files_written_later_join_at_the_next_epoch(tmp_path, files) -> None:
    ds = SampleDataset(f"h5://{tmp_path}/data/*.h5", vars="x")
    sampler = ShuffleSampler(ds, seed=0, block=None)
    sampler.set_epoch(0)
    assert len(sampler) == 14 * ROWS
    write_file(f"h5://{tmp_path}/data/run-100.h5", 100)  # a new job's output
    write_file(files[-1], 6, steps=1, mode="a", first=2)  # the last file grows
    assert len(ds) == 14 * ROWS, "a snapshot within an epoch"
    sampler.set_epoch(1)
    got = sorted(v for x in DataLoader(ds, batch_size=16, sampler=sampler) for v in values(x))
    want = expected(list(range(7))) + [60000 + 200 + r for r in range(ROWS)]
    assert got == sorted(want + expected([100]))


def test_a_look_opens_each_file_once_and_describes_what_a_read_sees(
    tmp_path, files, monkeypatch
) -> None:
    """Taking the files in opens each once, however few may stay open (taking their steps
    in after counting them reopened all but the last few), and records of every step what
    reading it shows: its variables and its version (part of the cache's keys)."""
    import dataplane.api as api
    from dataplane.loaders import _sources

    monkeypatch.setattr(_sources, "OPEN_AT_ONCE", 2)
    opened: list[str] = []
    real_open = api.open

    def counting(url, **kw):
        opened.append(url)
        return real_open(url, **kw)

    monkeypatch.setattr(api, "open", counting)
    ds = SampleDataset(f"h5://{tmp_path}/data/*.h5", vars=("x", "job"), cache=NodeCache(
        tmp_path / "c", capacity="64MiB"))  # fmt: skip
    assert sorted(opened) == sorted(files)
    write_file(f"h5://{tmp_path}/data/run-100.h5", 100)
    write_file(files[-1], 6, steps=1, mode="a", first=2)  # the last file grows
    opened.clear()
    assert ds.refresh() == 17 * ROWS
    # Unchanged files that cannot grow are not opened; the last one and the new one are.
    assert sorted(opened) == sorted([files[-1], f"h5://{tmp_path}/data/run-100.h5"])
    monkeypatch.setattr(api, "open", real_open)
    snap = ds._snap
    with _sources.Sources(snap.files, {}, snap.file_counts, False) as arc:
        for i in range(len(arc)):
            step = arc[i]
            assert snap.versions[i] == arc.version(i) is not None
            assert snap.counts[i] == step.vars["x"].shape[0] == ROWS
    x, job = ds.batch(list(range(len(ds))))
    assert values(x) == expected(list(range(7))) + [60200 + r for r in range(ROWS)] + expected(
        [100]
    )
    ds.close()


def test_an_earlier_file_that_grows_is_not_misread(tmp_path, files) -> None:
    ds = SampleDataset(f"h5://{tmp_path}/data/*.h5", vars="x")
    before = values(ds.batch(list(range(len(ds)))))
    ds.close()  # its read handles (HDF5 lets no writer in while a file is open)
    write_file(files[2], 2, steps=1, mode="a", first=2)
    with pytest.warns(RuntimeWarning, match="gained 1 steps after the dataset took it in"):
        assert ds.refresh() == len(before)
    assert values(ds.batch(list(range(len(ds))))) == before


def test_mixed_formats_and_bad_lists(tmp_path, files) -> None:
    z = f"zarr://{tmp_path}/extra.zarr"
    write_file(z, 50)
    ds = SampleDataset([files[1], z], vars="x")
    assert values(ds.batch(list(range(len(ds))))) == expected([1, 50])
    with pytest.raises(dp.OptionError, match="matches nothing"):
        SampleDataset(f"h5://{tmp_path}/none-*.h5", vars="x")
    with pytest.raises(dp.OptionError, match="empty list"):
        SampleDataset([], vars="x")
    with pytest.raises(dp.OptionError, match="twice"):
        SampleDataset([files[0], files[0]], vars="x")
    with pytest.raises(dp.OptionError, match="remote store"):
        SampleDataset("zarr+s3://bucket/run-*.zarr", vars="x")
    ds = SampleDataset(f"h5://{tmp_path}/data/*.h5", vars="x")
    os.unlink(files[4][len("h5://") :])
    with pytest.raises(dp.DataplaneError, match="run-004.h5 .*gone"):
        ds.refresh()
    with pytest.raises(dp.DataplaneError):
        SampleDataset(files[3:5], vars="x")


def _cached(tmp_path, cache: str = "cache", **kw) -> SampleDataset:
    return SampleDataset(
        f"h5://{tmp_path}/data/*.h5",
        vars=("x", "job"),
        cache=NodeCache(tmp_path / cache, capacity="64MiB"),
        shard_bytes=3 * ROWS * COLS * 8,
        **kw,
    )


def test_shards_read_the_bytes_the_look_located_without_reopening_files(
    tmp_path, files, monkeypatch
) -> None:
    """Reopening each file with its library costs 2 ms of CPU per HDF5 file: shards are read
    from where the look found each step's bytes, checked against its checksums."""
    import dataplane.api as api

    ds = _cached(tmp_path, prefetch=False)
    assert all(p is not None for p in ds._snap.located)
    opened: list[str] = []
    real_open = api.open
    monkeypatch.setattr(api, "open", lambda url, **kw: opened.append(url) or real_open(url, **kw))
    x, job = ds.batch(np.random.default_rng(0).permutation(len(ds)))
    assert sorted(values(x)) == sorted(expected(list(range(7))))
    assert (job.numpy() == (x.numpy()[:, 0] // 10000).astype(int)).all()
    assert opened == [] and ds._io.direct.reads == 14
    # What the prefetch process rebuilds from JSON reads the same way.
    table = ds._shard_table()
    spec = json.loads(json.dumps(ds._source().spec()))
    spec["args"]["cache"][0] = str(tmp_path / "other")
    source = ShardSource.from_spec(**spec["args"])
    for s in range(len(table[0]) - 1):
        source.prefetch_shard(s, table[2][s])
    assert opened == [] and source.direct.reads == 14
    other = _cached(tmp_path, "other", prefetch=False)
    assert values(other.batch(list(range(len(other))))[0]) == expected(list(range(7)))
    assert other._io.direct.reads == 0, "every shard was in the cache the source filled"


def test_a_file_changed_since_the_look_is_read_as_it_is_now(tmp_path, files) -> None:
    ds = _cached(tmp_path, prefetch=False)
    os.unlink(files[3][len("h5://") :])
    write_file(files[3], 33)  # another job's output under the same name: new bytes
    x, job = ds.batch(list(range(len(ds))))
    want = expected(list(range(7)))
    want[3 * 2 * ROWS : 4 * 2 * ROWS] = expected([33])
    assert values(x) == want and job.tolist()[3 * 2 * ROWS] == 33
    assert ds._io.direct.reads == 12  # the other six files' steps


def test_bytes_changed_behind_an_unchanged_signature_raise(tmp_path, files) -> None:
    """Rewritten in place with its size, inode and modification time kept: the located bytes
    fail their checksums and the archive, reading the file as it is, says it is corrupt."""
    ds = _cached(tmp_path, prefetch=False)
    path = files[5][len("h5://") :]
    offset = ds._snap.located[10][0][0]  # step 0 of file 5, variable x
    st = os.stat(path)
    with open(path, "r+b") as f:
        f.seek(offset + 7)
        f.write(b"\x7f")
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    x, _ = ds.batch(list(range(10 * ROWS)))  # files 0-4: fine
    assert values(x) == expected(list(range(5)))
    with pytest.raises(dp.IntegrityError, match="corrupt"):
        ds.batch([10 * ROWS + 3])


@pytest.mark.parametrize("sample", ["row", "step"])
@pytest.mark.parametrize("cached", [False, True], ids=["source", "cache"])
def test_every_read_path_takes_located_bytes(tmp_path, files, monkeypatch, sample, cached):
    import dataplane.api as api

    ds = SampleDataset(
        f"h5://{tmp_path}/data/*.h5",
        vars=("x", "job"),
        sample=sample,
        cache=NodeCache(tmp_path / "cache", capacity="64MiB") if cached else None,
        prefetch=False,
    )
    monkeypatch.setattr(api, "open", None)  # any reopening fails
    order = np.random.default_rng(1).permutation(len(ds))
    x, job = ds.batch(order)
    if sample == "step":
        assert x.shape == (14, ROWS, COLS) and job.shape == (14, ROWS)
        x = x.reshape(-1, COLS)
        want = np.array(expected(list(range(7)))).reshape(14, ROWS)[order].reshape(-1)
    else:
        want = np.array(expected(list(range(7))))[order]
    assert values(x) == want.tolist()
    assert (job.reshape(-1) == x[:, 0] // 10000).all()
    assert ds._io.direct.reads >= 14


@pytest.fixture()
def opened(monkeypatch) -> list[str]:
    """The URLs opened through ``dataplane.api.open`` from now on."""
    import dataplane.api as api

    got: list[str] = []
    real_open = api.open
    monkeypatch.setattr(api, "open", lambda url, **kw: got.append(url) or real_open(url, **kw))
    return got


def test_a_later_job_takes_what_an_earlier_look_found_of_unchanged_files(
    tmp_path, files, opened, monkeypatch
) -> None:
    """A look opens every file (2 ms of CPU per HDF5 file, more on a parallel filesystem); the
    next job on the node takes what it found from the cache while the files are unchanged."""
    from dataplane.loaders import _looks

    monkeypatch.setattr(_looks, "SETTLED_S", 0.0)  # (the files were written just now)
    first = _cached(tmp_path, prefetch=False)
    assert sorted(opened) == sorted(files)
    assert len(os.listdir(tmp_path / "cache" / "looks")) == 7
    opened.clear()
    later = _cached(tmp_path, prefetch=False)
    assert opened == []
    assert later._snap.counts == first._snap.counts
    assert later._snap.versions == first._snap.versions
    assert later._snap.located == first._snap.located
    x, job = later.batch(np.random.default_rng(3).permutation(len(later)))
    assert sorted(values(x)) == sorted(expected(list(range(7))))
    assert (job.numpy() == (x.numpy()[:, 0] // 10000).astype(int)).all()
    assert opened == [] and later._io.direct.reads == 14
    # Other options can find other things (checksums, with verify): looked at anew.
    _cached(tmp_path, prefetch=False, verify=False)
    assert sorted(opened) == sorted(files)
    later.cache.clear()
    assert os.listdir(tmp_path / "cache" / "looks") == []


def test_files_changed_since_an_earlier_look_are_looked_at_again(
    tmp_path, files, opened, monkeypatch
) -> None:
    from dataplane.loaders import _looks

    monkeypatch.setattr(_looks, "SETTLED_S", 0.0)
    _cached(tmp_path, prefetch=False).close()
    os.unlink(files[3][len("h5://") :])
    write_file(files[3], 33)  # another job's output under the same name
    write_file(files[6], 6, steps=1, mode="a", first=2)  # the last file grew
    path = files[1][len("h5://") :]
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))  # its change time moves on
    opened.clear()
    ds = _cached(tmp_path, prefetch=False)
    assert sorted(opened) == sorted([files[1], files[3], files[6]])
    want = expected(list(range(7))) + [60200 + r for r in range(ROWS)]
    want[3 * 2 * ROWS : 4 * 2 * ROWS] = expected([33])
    assert values(ds.batch(list(range(len(ds))))[0]) == want


def test_damaged_kept_looks_are_looked_at_again(tmp_path, files, opened, monkeypatch) -> None:
    from dataplane.loaders import _looks

    monkeypatch.setattr(_looks, "SETTLED_S", 0.0)
    _cached(tmp_path, prefetch=False).close()
    kept = sorted((tmp_path / "cache" / "looks").iterdir())
    raw = kept[0].read_bytes()
    kept[0].write_bytes(raw.replace(b'"<f8"', b'"<f4"'))  # a changed byte, old checksum
    kept[1].write_bytes(raw[: len(raw) // 2])  # cut short
    kept[2].write_bytes(b"not a look")
    body = json.loads(raw.partition(b"\n")[2])  # another file's look under this file's name
    body["url"] = "h5:///elsewhere.h5"
    blob = json.dumps(body).encode()
    import xxhash

    kept[3].write_bytes(xxhash.xxh3_64_hexdigest(blob).encode() + b"\n" + blob)
    opened.clear()
    ds = _cached(tmp_path, prefetch=False)
    assert len(opened) == 4
    assert values(ds.batch(list(range(len(ds))))[0]) == expected(list(range(7)))
    opened.clear()
    _cached(tmp_path, prefetch=False)
    assert opened == [], "looked at again, and kept again"


def test_files_written_lately_are_looked_at_by_every_job(tmp_path, files, opened) -> None:
    """A writer's commit that changes no size within one clock tick leaves a file's times as
    they were: what a look finds of a file changed within ``SETTLED_S`` is not kept."""
    _cached(tmp_path, prefetch=False).close()
    assert os.listdir(tmp_path / "cache" / "looks") == []
    opened.clear()
    _cached(tmp_path, prefetch=False)
    assert sorted(opened) == sorted(files)


@pytest.fixture()
def many(tmp_path) -> list[tuple[int, str, int]]:
    """40 files to look at, as jobs of the look (index, URL, steps known)."""
    os.makedirs(tmp_path / "data")
    urls = [f"h5://{tmp_path}/data/run-{j:03d}.h5" for j in range(40)]
    for j, u in enumerate(urls):
        write_file(u, j, steps=1 + j % 3)
    return [(k, u, k % 2) for k, u in enumerate(urls)]


def test_helper_processes_find_what_a_look_here_finds(many, monkeypatch) -> None:
    from dataplane import _look

    monkeypatch.setattr(_look, "LAG_MIN", 600.0)  # wait for the helpers, however slow
    here = _look.look_all(many, {}, True, True, helpers=0)
    assert [here[k][0] for k in range(40)] == [1 + k % 3 for k in range(40)]
    assert [len(here[k][1]) for k in range(40)] == [1 + k % 3 - k % 2 for k in range(40)]
    shared = _look._SharedLook(many, {}, True, True)
    assert shared.run(2) == here
    assert shared.by_helpers == 2 * _look.CHUNK, "each helper looked at the chunk it was given"
    assert _look.look_all(many, {}, False, False, helpers=1) == {
        k: (now, [(s[0], None, None) for s in steps]) for k, (now, steps) in here.items()
    }


HELPERS_THAT_FAIL = {
    "die": "sys.exit(3)",
    "hang": "time.sleep(600)",
    "babble": "print('not JSON', flush=True); time.sleep(600)",
    "lie": "print(json.dumps([[0, 1, []]]), flush=True); time.sleep(600)",
    "cannot read": "print(json.dumps([[k, None, None] for k, _, _ in json.loads(line)]), "
    "flush=True); time.sleep(600)",
}


@pytest.mark.parametrize("how", sorted(HELPERS_THAT_FAIL))
def test_what_a_failing_helper_held_is_looked_at_here(many, monkeypatch, how) -> None:
    import sys

    from dataplane import _look

    script = "import json, sys, time; sys.stdin.readline(); line = sys.stdin.readline(); "
    monkeypatch.setattr(_look, "HELPER", [sys.executable, "-c", script + HELPERS_THAT_FAIL[how]])
    procs = _spy_on_helpers(monkeypatch)
    shared = _look._SharedLook(many, {}, True, True)
    assert shared.run(2) == _look.look_all(many, {}, True, True, helpers=0)
    assert shared.by_helpers == 0 and len(procs) == 2
    assert all(p.returncode is not None for p in procs), "every helper ended"


def test_helpers_that_cannot_start_or_are_another_dataplane(tmp_path, many, monkeypatch):
    import sys

    from dataplane import _look

    here = _look.look_all(many, {}, True, True, helpers=0)
    monkeypatch.setattr(_look, "HELPER", [str(tmp_path / "no-such-python")])
    assert _look._SharedLook(many, {}, True, True).run(2) == here
    monkeypatch.setattr(_look, "HELPER", [sys.executable, "-c", "import sys; sys.exit(1)"])
    assert _look._SharedLook(many, {}, True, True).run(2) == here
    monkeypatch.undo()
    monkeypatch.setattr(_look, "LAG_MIN", 600.0)
    monkeypatch.setattr(_look, "_PACKAGE", str(tmp_path))  # as if another copy were imported
    procs = _spy_on_helpers(monkeypatch)
    shared = _look._SharedLook(many, {}, True, True)
    assert shared.run(2) == here and shared.by_helpers == 0
    assert len(procs) == 2 and all(p.returncode is not None for p in procs)


def _spy_on_helpers(monkeypatch) -> list:
    import subprocess

    from dataplane import _look

    procs: list = []
    real = subprocess.Popen
    monkeypatch.setattr(
        _look.subprocess, "Popen", lambda *a, **kw: procs.append(real(*a, **kw)) or procs[-1]
    )
    return procs


def test_a_damaged_file_raises_its_error_however_many_look(tmp_path, many, monkeypatch) -> None:
    from dataplane import _look

    monkeypatch.setattr(_look, "LAG_MIN", 600.0)
    path = many[5][1][len("h5://") :]  # in the first helper's chunk
    os.truncate(path, os.path.getsize(path) // 2)
    procs = _spy_on_helpers(monkeypatch)
    with pytest.raises(dp.IntegrityError, match="truncated"):
        _look.look_all(many, {}, True, True, helpers=2)
    assert len(procs) == 2 and all(p.returncode is not None for p in procs)
    with pytest.raises(dp.IntegrityError, match="truncated"):
        _look.look_all(many, {}, True, True, helpers=0)


def test_a_dataset_of_many_files_looks_with_helpers(tmp_path, many, monkeypatch) -> None:
    from dataplane import _look
    from dataplane.loaders import _looks

    monkeypatch.setattr(_look, "default_helpers", lambda files, opts: 2)
    monkeypatch.setattr(_look, "LAG_MIN", 600.0)
    monkeypatch.setattr(_looks, "SETTLED_S", 0.0)
    procs = _spy_on_helpers(monkeypatch)
    ds = SampleDataset(
        f"h5://{tmp_path}/data/*.h5", vars="x", cache=NodeCache(tmp_path / "c", "64MiB")
    )
    assert len(procs) == 2
    want = [
        j * 10000 + s * 100 + r for j in range(40) for s in range(1 + j % 3) for r in range(ROWS)
    ]
    x = ds.batch(np.random.default_rng(5).permutation(len(ds)))
    assert sorted(values(x)) == sorted(want)
    assert len(os.listdir(tmp_path / "c" / "looks")) == 40, "what the helpers found is kept too"
    assert ds._io.direct.reads == len(ds._snap.counts)


def _resident(path: str) -> set[int]:
    """The pages of ``path`` in the page cache (mincore)."""
    import ctypes
    import mmap

    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t] + [ctypes.c_int] * 3 + [ctypes.c_long]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
    finally:
        os.close(fd)
    pages = (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE
    vec = (ctypes.c_ubyte * pages)()
    try:
        assert libc.mincore(ctypes.c_void_p(addr), size, vec) == 0, ctypes.get_errno()
    finally:
        libc.munmap(ctypes.c_void_p(addr), size)
    return {i for i in range(pages) if vec[i] & 1}


def test_a_look_asks_for_the_ends_of_its_files_ahead(tmp_path, files) -> None:
    """A cold file's look is a dozen small reads, one after another; asking for both ends of
    the next files first lets the disk fetch them together (400 files: 0.9-1.1 s -> 0.6 s)."""
    import mmap
    import time

    from dataplane import _look
    from dataplane.bench._common import evict

    paths = [u[len("h5://") :] for u in files]
    evict(paths + [p + ".lease" for p in paths], "fadvise")
    odd = [
        (7, f"h5://{tmp_path}/missing.h5", 0),
        (8, f"zarr://{tmp_path}/data", 0),  # a directory
        (9, "zarr+s3://bucket/x.zarr", 0),
        (10, "no url", 0),
    ]
    _look.read_ahead([(k, u, 0) for k, u in enumerate(files)] + odd)
    ends = {
        p: {0, (os.path.getsize(p) - 1) // mmap.PAGESIZE, _look.AHEAD // mmap.PAGESIZE - 1}
        for p in paths
    }
    ends.update({p + ".lease": {0} for p in paths})  # the writer's lease, read first
    deadline = time.monotonic() + 60
    while any(not want <= _resident(p) for p, want in ends.items()):
        assert time.monotonic() < deadline, {p: w - _resident(p) for p, w in ends.items()}
        time.sleep(0.01)


def test_kept_looks_are_held_to_a_share_of_the_cache(tmp_path, many, opened, monkeypatch):
    """The cache's capacity bounds its entries; what looks keep is held to 1/64 of it, the
    least recently used removed first."""
    from dataplane.loaders import _looks

    monkeypatch.setattr(_looks, "SETTLED_S", 0.0)
    glob = f"h5://{tmp_path}/data/*.h5"
    want = [j * 10000 + s * 100 + r for j in range(40) for s in range(1 + j % 3) for r in range(12)]
    SampleDataset(glob, vars="x", cache=NodeCache(tmp_path / "big", "64MiB")).close()
    sizes = [p.stat().st_size for p in (tmp_path / "big" / "looks").iterdir()]
    assert len(sizes) == 40
    budget = 16 * max(sizes) + 100  # room for 16 looks of 40 (one may take 1/16)
    cache = NodeCache(tmp_path / "small", capacity=budget * _looks.SHARE)
    ds = SampleDataset(glob, vars="x", cache=cache)
    kept = list((tmp_path / "small" / "looks").iterdir())
    assert 8 <= len(kept) <= 16 and sum(p.stat().st_size for p in kept) <= budget * 3 // 4
    assert sorted(values(ds.batch(np.arange(len(ds))))) == sorted(want)
    opened.clear()
    again = SampleDataset(glob, vars="x", cache=cache)
    assert len(opened) == 40 - len(kept), "the kept looks were taken, the others looked at"
    assert sorted(values(again.batch(np.arange(len(again))))) == sorted(want)
    assert sum(p.stat().st_size for p in (tmp_path / "small" / "looks").iterdir()) <= budget
