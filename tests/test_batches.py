"""``dataplane.loaders.loader``: whole batches, compared value by value with what was written
and with the batches of the documented per-sample ``DataLoader`` form."""

from __future__ import annotations

import os
import time

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

import dataplane as dp
from dataplane.cache import NodeCache
from dataplane.loaders import BatchLoader, SampleDataset, ShuffleSampler, loader

pytestmark = [
    pytest.mark.timeout(240),
    pytest.mark.filterwarnings("ignore:This DataLoader will create 4 worker processes"),
]

ROWS, COLS, STEPS = 40, 6, 5


def write_rows(url: str, steps: range = range(STEPS), mode: str = "w") -> None:
    """Row r of step s holds s*1000 + r in every column; its label is s."""
    with dp.publish(url, mode=mode) as pub:
        for s in steps:
            x = np.repeat(np.arange(ROWS, dtype=np.float32)[:, None] + s * 1000, COLS, axis=1)
            pub.write({"x": x, "label": np.full(ROWS, s, np.int64)})


def ident(x: torch.Tensor) -> int:
    v = int(x.reshape(-1)[0])
    return (v // 1000) * ROWS + v % 1000


def check_batch(x: torch.Tensor, label: torch.Tensor) -> list[int]:
    """The samples of a batch, each checked against what was written."""
    assert x.dtype == torch.float32 and x.shape[1:] == (COLS,) and x.is_contiguous()
    got = [ident(r) for r in x]
    for i, r, lab in zip(got, x, label.tolist()):
        assert lab == i // ROWS
        assert torch.equal(r, torch.full((COLS,), float((i // ROWS) * 1000 + i % ROWS)))
    return got


def dataset(url: str, tmp_path, cache: bool = True, **kw) -> SampleDataset:
    return SampleDataset(
        url,
        vars=("x", "label"),
        shard_bytes=8 * COLS * 4,
        cache=NodeCache(tmp_path / "cache", capacity="64MiB") if cache else None,
        **kw,
    )


@pytest.fixture()
def url(tmp_path) -> str:
    u = f"h5://{tmp_path}/run.h5"
    write_rows(u)
    return u


@pytest.mark.parametrize(
    "workers,context,cache,gather",
    [
        (0, None, True, "auto"),
        (1, "fork", True, "auto"),
        (2, "fork", True, "auto"),
        (2, "spawn", True, "auto"),
        (2, "fork", True, "workers"),
        (2, "spawn", False, "auto"),
        (0, None, False, "auto"),
    ],
)
def test_batches_equal_the_per_sample_loaders(
    url, tmp_path, workers, context, cache, gather
) -> None:
    """Same order, same values, same structure as ``DataLoader(ds, batch_size=...)``."""
    ds = dataset(url, tmp_path, cache)
    ds[3]  # a handle open in the parent before workers start
    sampler = ShuffleSampler(ds, seed=5, block=2)
    ours = loader(
        ds,
        16,
        sampler=sampler,
        num_workers=workers,
        gather=gather,
        multiprocessing_context=context,
    )
    assert ours.in_main == (cache and workers > 0 and gather == "auto")
    plain = DataLoader(ds, batch_size=16, sampler=sampler)
    for epoch in (0, 1):
        sampler.set_epoch(epoch)
        got = [check_batch(x, label) for x, label in ours]
        sampler.set_epoch(epoch)
        want = [[ident(r) for r in x] for x, _ in plain]
        assert got == want and len(got) == len(ours) == -(-STEPS * ROWS // 16)
        assert sorted(i for b in got for i in b) == list(range(STEPS * ROWS))
    if workers and not ours.in_main:
        # Batches gathered in a worker arrive in shared memory, not copied per sample.
        x, _ = next(iter(ours))
        assert x.is_shared()


def test_drop_last_single_var_dict_and_steps(tmp_path, url) -> None:
    ds = SampleDataset(url, vars="x", cache=NodeCache(tmp_path / "c", capacity="64MiB"))
    batches = list(loader(ds, 32, sampler=ShuffleSampler(ds, block=None), drop_last=True))
    assert len(batches) == STEPS * ROWS // 32 and all(b.shape == (32, COLS) for b in batches)
    ds = SampleDataset(url, vars={"inp": "x", "y": "label"}, dtype={"x": "float64"})
    (b,) = list(loader(ds, 500, sampler=ShuffleSampler(ds, block=None, shuffle=False)))
    assert set(b) == {"inp", "y"} and b["inp"].dtype == torch.float64
    assert b["y"].tolist() == [i // ROWS for i in range(STEPS * ROWS)]
    steps = SampleDataset(url, vars="x", sample="step")
    (b,) = list(loader(steps, 8, sampler=ShuffleSampler(steps, shuffle=False), num_workers=2))
    assert b.shape == (STEPS, ROWS, COLS)
    assert b[:, 0, 0].tolist() == [s * 1000 for s in range(STEPS)]


def _double(sample):
    x, label = sample
    return x * 2, label


def _worker_pid_batch(batch):
    x, label = batch
    return x, label, torch.full((len(x),), os.getpid())


@pytest.mark.parametrize("context", ["fork", "spawn"])
def test_transforms_run_in_the_workers(url, tmp_path, context) -> None:
    ds = dataset(url, tmp_path, transform=_double)
    ours = loader(
        ds, 16, sampler=ShuffleSampler(ds, seed=1), num_workers=2, multiprocessing_context=context
    )
    assert not ours.in_main  # a per-sample transform needs the samples in the workers
    seen = []
    for x, label in ours:
        seen += check_batch(x / 2, label)
    assert sorted(seen) == list(range(STEPS * ROWS))
    ds = dataset(url, tmp_path)
    ours = loader(
        ds,
        16,
        sampler=ShuffleSampler(ds, seed=1),
        num_workers=2,
        batch_transform=_worker_pid_batch,
        multiprocessing_context=context,
    )
    pids = set()
    seen = []
    for x, label, pid in ours:
        seen += check_batch(x, label)
        pids.update(pid.tolist())
    assert sorted(seen) == list(range(STEPS * ROWS))
    assert os.getpid() not in pids and len(pids) == 2


@pytest.mark.parametrize("workers_before,workers_after", [(2, 0), (0, 2), (2, 2)])
def test_mid_epoch_resume_on_two_ranks(url, tmp_path, workers_before, workers_after) -> None:
    """Each of two ranks stops after 3 batches and resumes: together they read every sample
    of the epoch exactly once."""
    batch = 8
    everything: list[int] = []
    for rank in (0, 1):

        def make(workers: int, rank: int = rank) -> tuple[ShuffleSampler, BatchLoader]:
            ds = dataset(url, tmp_path)
            s = ShuffleSampler(ds, seed=11, block=3, rank=rank, world=2)
            return s, loader(ds, batch, sampler=s, num_workers=workers)

        sampler, ld = make(workers_before)
        sampler.set_epoch(2)
        full = sampler.order().tolist()
        got: list[int] = []
        for i, (x, label) in enumerate(ld):
            got += check_batch(x, label)
            if i == 2:
                break
        state = sampler.state_dict(samples_seen=len(got))
        del ld
        sampler2, ld2 = make(workers_after)
        sampler2.load_state_dict(state)
        sampler2.set_epoch(2)
        for x, label in ld2:
            got += check_batch(x, label)
        assert got == full
        everything += got
    assert sorted(everything) == list(range(STEPS * ROWS))


def test_a_warm_epoch_with_workers_is_gathered_here_and_counts_exactly(url, tmp_path) -> None:
    """With workers, a cold epoch goes through them (they fetch its shards); once every shard
    is cached the main process gathers the epoch itself, as without workers: every sample
    exact, and the sampler's position is what the loop took (no worker prefetch ahead)."""
    ds = dataset(url, tmp_path)
    sampler = ShuffleSampler(ds, seed=3, block=2)
    ld = loader(ds, 8, sampler=sampler, num_workers=2)
    assert not ds.all_cached()
    cold: list[int] = []
    for x, label in ld:
        cold += check_batch(x, label)
    assert sorted(cold) == list(range(STEPS * ROWS))
    assert ds.all_cached()
    sampler.set_epoch(1)
    warm: list[int] = []
    for i, (x, label) in enumerate(ld):
        warm += check_batch(x, label)
        if i == 4:
            assert sampler.state_dict()["position"] == len(warm) == 40
    assert warm == sampler.order(1).tolist()
    reads = ds.reads
    sampler.set_epoch(2)
    assert sorted(i for x, label in ld for i in check_batch(x, label)) == list(range(200))
    assert ds.reads == reads  # nothing from the source
    ds.cache.clear()  # cold again: the workers fetch
    assert not ds.all_cached()
    sampler.set_epoch(3)
    assert sorted(i for x, label in ld for i in check_batch(x, label)) == list(range(200))


@pytest.mark.parametrize("stale", [False, True])
def test_small_batches_gathered_ahead_are_exactly_the_samplers(url, tmp_path, stale) -> None:
    """Small samples are gathered several batches at once, from the indices the sampler
    will hand out next; each batch is still the sampler's, counted when the loop takes it,
    its transform run once. Gathered batches whose indices are not the sampler's (here
    ``upcoming`` made to lie) are never delivered: each is gathered anew."""
    ds = dataset(url, tmp_path)
    sampler = ShuffleSampler(ds, seed=4, block=2)
    calls = []
    ld = loader(ds, 8, sampler=sampler, batch_transform=lambda b: calls.append(1) or b)
    assert ld._ahead > 1
    gathers = []
    real_batches, real_upcoming = ds.batches, sampler.upcoming
    ds.batches = lambda ids, *a, **k: gathers.append(len(ids)) or real_batches(ids, *a, **k)
    if stale:
        sampler.upcoming = lambda n: (real_upcoming(n)[::-1] + 1) % len(ds)
    for epoch in (0, 1):
        sampler.set_epoch(epoch)
        got: list[int] = []
        for x, label in ld:
            got += check_batch(x, label)
            assert sampler.state_dict()["position"] == len(got)
        assert got == sampler.order(epoch).tolist()
    assert len(calls) == 2 * len(ld)
    if stale:
        assert len(gathers) > len(ld)  # each stale one gathered anew
    else:
        assert len(gathers) < len(ld) and max(gathers) == 8 * ld._ahead
    # Resume mid-epoch from a batch gathered ahead.
    sampler.set_epoch(2)
    first = [i for _, (x, label) in zip(range(3), ld) for i in check_batch(x, label)]
    state = sampler.state_dict()
    again = ShuffleSampler(ds, seed=4, block=2)
    again.load_state_dict(state)
    again.set_epoch(2)
    rest = [i for x, label in loader(ds, 8, sampler=again) for i in check_batch(x, label)]
    assert first + rest == sampler.order(2).tolist()


def test_dataset_batches_are_views_of_one_gather(url, tmp_path) -> None:
    ds = dataset(url, tmp_path)
    idx = np.random.default_rng(0).permutation(len(ds))[:45]
    parts = ds.batches(idx, 8)
    assert [len(x) for x, _ in parts] == [8, 8, 8, 8, 8, 5]
    for k, (x, label) in enumerate(parts):
        assert check_batch(x, label) == idx[k * 8 : (k + 1) * 8].tolist()
        assert x.untyped_storage().data_ptr() == parts[0][0].untyped_storage().data_ptr()
    doubled = dataset(url, tmp_path, transform=_double).batches(idx, 20)
    assert [check_batch(x / 2, label) for x, label in doubled] == [
        idx[a : a + 20].tolist() for a in (0, 20, 40)
    ]
    for bad in (0, -1, 2.0, True):
        with pytest.raises(dp.OptionError, match="size must be"):
            ds.batches(idx, bad)


def test_growing_data_reaches_persistent_workers(tmp_path) -> None:
    url = f"zarr://{tmp_path}/grow.zarr"
    write_rows(url, range(2))
    ds = dataset(url, tmp_path)
    sampler = ShuffleSampler(ds, seed=0, block=None)
    ld = loader(ds, 10, sampler=sampler, num_workers=2)
    sampler.set_epoch(0)
    assert sorted(i for x, lab in ld for i in check_batch(x, lab)) == list(range(2 * ROWS))
    write_rows(url, range(2, 4), mode="a")
    sampler.set_epoch(1)
    assert len(ld) == 4 * ROWS // 10
    assert sorted(i for x, lab in ld for i in check_batch(x, lab)) == list(range(4 * ROWS))


def test_pinned_memory_and_device(url, tmp_path) -> None:
    ds = dataset(url, tmp_path)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if torch.cuda.is_available():
        ld = loader(
            ds, 16, sampler=ShuffleSampler(ds), num_workers=2, pin_memory=True, device=device
        )
    else:
        with pytest.warns(RuntimeWarning, match="no accelerator"):
            ld = loader(
                ds, 16, sampler=ShuffleSampler(ds), num_workers=2, pin_memory=True, device=device
            )
    seen = []
    for x, label in ld:
        assert x.device.type == device and label.device.type == device
        seen += check_batch(x.cpu(), label.cpu())
    assert sorted(seen) == list(range(STEPS * ROWS))
    # The main process gathers into page-locked memory where an accelerator exists.
    batch = ds.batch(list(range(16)), memory="pinned")
    assert batch[0].is_pinned() == torch.cuda.is_available()
    if not torch.cuda.is_available():
        with pytest.raises(dp.OptionError, match="no CUDA device"):
            loader(ds, 16, device="cuda")


def test_bad_options_are_refused(url, tmp_path) -> None:
    ds = dataset(url, tmp_path)
    for kwargs, match in [
        ({"batch_size": 0}, "at least 1"),
        ({"batch_size": 2.5}, "integer"),
        ({"batch_size": 4, "gather": "gpu"}, "gather must be"),
        ({"batch_size": 4, "batch_transform": 3}, "callable"),
    ]:
        with pytest.raises(dp.OptionError, match=match):
            loader(ds, **kwargs)
    with pytest.raises(dp.OptionError, match="needs a dataset with a cache"):
        loader(dataset(url, tmp_path, cache=False), 4, gather="main")
    with pytest.raises(dp.OptionError, match="no transform"):
        loader(ds, 4, gather="main", batch_transform=_worker_pid_batch, num_workers=2)
    with pytest.raises(dp.OptionError, match="SampleDataset"):
        loader(list(range(10)), 4)  # type: ignore[arg-type]
    with pytest.raises(dp.OptionError, match="memory must be"):
        ds.batch([0, 1], memory="gpu")


def _after_the_clock_moved_past(path) -> None:
    """Until the file clock is past ``path``'s change time (a tick: milliseconds)."""
    changed = os.stat(path).st_ctime_ns
    while time.clock_gettime_ns(5) <= changed:
        time.sleep(0.001)


def test_an_entry_is_hashed_once_per_node_until_its_file_changes(url, tmp_path) -> None:
    ds = dataset(url, tmp_path)
    ds.batch(list(range(len(ds))))  # fills the cache
    ds.cache.close()  # records what it stored once the clock has moved on
    entries = sorted((tmp_path / "cache" / "entries").iterdir())
    assert entries and all((tmp_path / "cache" / "seen" / e.name).exists() for e in entries)
    # A new process over the full cache hashes nothing, and reads the same values.
    again = dataset(url, tmp_path)
    x, label = again.batch(list(range(len(again))))
    assert check_batch(x, label) == list(range(STEPS * ROWS))
    assert again.cache.stats["verified"] == 0 and again.cache.stats["hits"] == len(entries)
    # A changed entry is hashed again: flipped bytes are found, whoever recorded it before.
    victim = entries[1]
    _after_the_clock_moved_past(victim)
    with open(victim, "r+b") as f:
        f.seek(os.path.getsize(victim) - 8)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0xFF]))
    third = dataset(url, tmp_path)
    with pytest.warns(dp.cache.CacheWarning, match="checksum"):
        x, label = third.batch(list(range(len(third))))
    assert check_batch(x, label) == list(range(STEPS * ROWS))
    assert third.cache.stats["corrupt"] == 1 and third.cache.stats["verified"] == 0


def _map_ahead_threads() -> list:
    import threading

    return [t for t in threading.enumerate() if t.name == "dataplane-map-ahead"]


def test_a_new_process_maps_its_epochs_shards_ahead_of_its_reads(url, tmp_path) -> None:
    """Over a full cache, the process that reads maps the plan's shards in a thread ahead of
    its reads (off the reading path); the values are those written, and the thread ends with
    the epoch. Where only workers read, the main process maps nothing."""
    ds = dataset(url, tmp_path)
    ds.batch(list(range(len(ds))))
    ds.cache.close()
    keys = ds._shard_table()[2]
    again = dataset(url, tmp_path, prefetch=False)  # a new NodeCache: nothing mapped yet
    sampler = ShuffleSampler(again, seed=3, block=2)
    batches = iter(loader(again, 16, sampler=sampler))
    seen = check_batch(*next(batches))
    ahead = again._epochs._ahead
    assert ahead is not None
    ahead._thread.join(60)  # fewer shards than its window: it maps them all, then ends
    assert ahead.done
    assert all(
        a is not None for a in again.cache._entries.maps.live_many(keys, again.cache.generation())
    )
    for x, label in batches:
        seen += check_batch(x, label)
    assert sorted(seen) == list(range(STEPS * ROWS))
    assert again.cache.stats["hits"] > 0 and again.cache.stats["misses"] == 0
    assert _map_ahead_threads() == []
    # Per-sample reads in workers: the main process publishes the plan but reads nothing.
    third = dataset(url, tmp_path, prefetch=False)
    ld = DataLoader(third, batch_size=16, sampler=ShuffleSampler(third, seed=3), num_workers=2)
    got = [i for x, label in ld for i in check_batch(x, label)]
    assert sorted(got) == list(range(STEPS * ROWS))
    assert third._epochs._ahead is None and third.cache.stats["mapped"] == 0


def test_mapping_ahead_keeps_to_its_window_and_ends_with_its_owner(tmp_path) -> None:
    from dataplane.loaders import _ahead

    cache = NodeCache(tmp_path / "c", capacity="64MiB")
    keys = [NodeCache.key("ahead", i) for i in range(_ahead.WINDOW * 2 + 5)]
    for i, k in enumerate(keys):
        cache.fetch(k, lambda i=i: {"x": np.full(16, i, np.int64)})
    reader = NodeCache(tmp_path / "c", capacity="64MiB")  # as another process would
    uses = np.repeat(np.arange(len(keys))[::-1], 4)  # the last key is read first
    owner = type("Owner", (), {})()
    ahead = _ahead.MapAhead(reader, keys, uses, 0, owner)
    deadline = time.monotonic() + 60
    while ahead._resume_at == 0 and time.monotonic() < deadline:
        time.sleep(0.01)  # until it waits for the reader
    gen = reader.generation()
    live = [k for k, a in zip(keys, reader._entries.maps.live_many(keys, gen)) if a is not None]
    # The shard read at position 0, and a window beyond it.
    assert sorted(live) == sorted(keys[::-1][: _ahead.WINDOW + 1])
    got = reader.get(keys[-1])
    assert got is not None and got["x"].tolist() == [len(keys) - 1] * 16
    ahead.at(4 * _ahead.WINDOW)  # the reader moved on: it maps further
    deadline = time.monotonic() + 60
    while reader._entries.maps.live_many(keys, gen)[-_ahead.WINDOW - 2] is None:
        assert time.monotonic() < deadline, "it did not map further"
        time.sleep(0.01)
    del owner  # its dataset is gone: the thread ends at its next look
    ahead._thread.join(10 * _ahead.POLL)
    assert ahead.done


@pytest.mark.parametrize("cache", [True, False])
def test_batch_buffers_are_reused_only_once_dropped(url, tmp_path, cache) -> None:
    """Batches the loop keeps keep their values (their buffers are never written again);
    batches it drops give their buffers to later batches (a new buffer cost 0.7-0.9 ms per
    2 MiB in page faults, four times a warm gather)."""
    ds = dataset(url, tmp_path, cache=cache)
    sampler = ShuffleSampler(ds, seed=3, block=4)
    ld = loader(ds, 8, sampler=sampler)
    kept = [b for b in ld]  # every batch held: all distinct, all exact
    assert len({b[0].data_ptr() for b in kept}) == len(kept)
    sampler.set_epoch(1)
    ptrs, seen = set(), []
    for b in ld:  # the usual loop: each batch dropped when the next arrives
        # Small batches are gathered several at once: views of one buffer.
        ptrs.add(b[0].untyped_storage().data_ptr())
        seen += check_batch(*b)
    assert sorted(seen) == list(range(ROWS * STEPS))
    assert len(ptrs) <= 3, "dropped batches' buffers are taken again"
    got = [i for b in kept for i in check_batch(*b)]
    assert sorted(got) == list(range(ROWS * STEPS)), "held batches were not written over"


def test_recycler_never_hands_out_a_buffer_still_in_use() -> None:
    import gc
    import weakref

    from dataplane.loaders._batch import Recycler

    r = Recycler()
    shape, dt = (4, 3), torch.float32

    def held_by(keep) -> None:
        t = r.take(shape, dt)
        t.fill_(7.0)
        holder = keep(t)
        ptr = t.data_ptr()
        del t
        gc.collect()
        for _ in range(Recycler.KEEP + 1):
            u = r.take(shape, dt)
            assert u.data_ptr() != ptr, keep
            u.fill_(-1.0)  # what reuse would write over the held buffer
            del u
        del holder
        gc.collect()

    w = torch.ones(3, requires_grad=True)
    held_by(lambda t: t)  # the batch itself
    held_by(lambda t: {"x": t})  # a dict of it
    held_by(lambda t: t.numpy())  # a numpy array on it
    held_by(lambda t: t[1:])  # a view
    held_by(lambda t: (t * w).sum())  # autograd keeps the input for the gradient
    held_by(lambda t: torch.utils.dlpack.to_dlpack(t))
    held_by(lambda t: weakref.ref(t))  # could bring it back

    # What it keeps stays within its bound, whatever the shapes asked for.
    r.clear()
    big = [r.take((Recycler.BYTES // 4 // 3, 3), torch.uint8) for _ in range(Recycler.KEEP)]
    assert r.nbytes() <= Recycler.BYTES
    del big
    for n in range(Recycler.SHAPES * 2):
        r.take((n + 1, 3), dt)
    assert len(r._held) <= Recycler.SHAPES and r.nbytes() <= Recycler.BYTES

    # Dropped, it is taken again; changed in place (resized, made to need grad), it is not.
    r.clear()
    t = r.take(shape, dt)
    ptr = t.data_ptr()
    del t
    assert r.take(shape, dt).data_ptr() == ptr
    for change in (lambda t: t.resize_(2, 2), lambda t: t.requires_grad_(), lambda t: t.t_()):
        r.clear()
        t = r.take(shape, dt)
        change(t)
        del t
        u = r.take(shape, dt)
        assert tuple(u.shape) == shape and u.is_contiguous() and not u.requires_grad
