"""SampleDataset and ShuffleSampler over stored output, with real DataLoader workers."""

from __future__ import annotations

import os
import pickle

import h5py
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

import dataplane as dp
from dataplane.loaders import SampleDataset, ShuffleSampler
from dataplane.testing import read_events, run_proc

pytestmark = pytest.mark.timeout(180)

ROWS, COLS, STEPS = 50, 6, 4
HERE = os.path.dirname(__file__)


def row_value(step: int, row: int) -> float:
    return step * 1000 + row


def write_rows(url: str, steps: int = STEPS, rows: int = ROWS, start: int = 0) -> None:
    """Step s holds x[r] = s*1000 + r (in every column) and label[r] = s."""
    with dp.publish(url, mode="a" if start else "w") as pub:
        write_to(pub, range(start, start + steps), rows)


def write_to(pub, steps, rows: int = ROWS) -> None:
    for s in steps:
        x = np.repeat([[row_value(s, r)] for r in range(rows)], COLS, axis=1)
        pub.write({"x": x.astype(np.float32), "label": np.full(rows, s, np.int64)})


def ident(x: torch.Tensor) -> int:
    """The global sample index a row of write_rows() holds."""
    v = int(x.reshape(-1)[0])
    return (v // 1000) * ROWS + v % 1000


@pytest.fixture(params=["h5", "bp5", "zarr"])
def stored(request, tmp_path) -> str:
    url = f"{request.param}://{tmp_path}/run.{request.param}"
    write_rows(url)
    return url


def test_rows_of_every_step_in_order(stored) -> None:
    ds = SampleDataset(stored, vars=("x", "label"))
    assert len(ds) == STEPS * ROWS and ds.steps == STEPS
    x, label = ds[ROWS + 7]
    assert x.dtype == torch.float32 and x.shape == (COLS,)
    assert float(x[0]) == row_value(1, 7) and int(label) == 1
    x, label = ds[-1]
    assert float(x[0]) == row_value(STEPS - 1, ROWS - 1)
    with pytest.raises(IndexError, match="out of range"):
        ds[STEPS * ROWS]


def test_every_sample_by_index_is_the_row_written(stored) -> None:
    """ds[i] (one sample, its own read: a per-sample loop without a cache) for every i."""
    ds = SampleDataset(stored, vars=("x", "label"))
    for i in range(len(ds)):
        x, label = ds[i]
        assert ident(x) == i and bool((x == x[0]).all()) and int(label) == i // ROWS
        assert ident(ds[i - len(ds)][0]) == i
    before = ds.reads
    ds[ROWS + 3]
    assert ds.reads - before == 2  # one row of each variable


def test_batches_come_back_in_the_asked_order_with_few_reads(stored) -> None:
    ds = SampleDataset(stored, vars={"inp": "x", "y": "label"}, dtype={"x": "float64"})
    want = [3, 140, 2, 199, 3, 57, 0]
    batch = ds.__getitems__(want)
    assert [ident(s["inp"]) for s in batch] == want
    assert all(s["inp"].dtype == torch.float64 for s in batch)
    assert [int(s["y"]) for s in batch] == [i // ROWS for i in want]
    # One run per step touched, one read per variable per run: steps 0, 1, 2, 3.
    before = ds.reads
    ds.__getitems__(list(range(60, 92)))
    assert ds.reads - before == 2  # 32 rows of one step: one hyperslab per variable
    # The samples of a batch are views of one array (no copy per sample).
    one = ds.__getitems__([5, 9, 1])
    ptrs = {s["inp"].untyped_storage().data_ptr() for s in one}
    assert len(ptrs) == 1


def test_single_variable_transform_and_step_samples(stored) -> None:
    ds = SampleDataset(stored, vars="x", dtype=torch.float16, transform=lambda t: t * 2)
    t = ds[1]
    assert t.dtype == torch.float16 and float(t[0]) == 2.0
    steps = SampleDataset(stored, vars=("x", "label"), sample="step")
    assert len(steps) == STEPS
    x, label = steps[2]
    assert x.shape == (ROWS, COLS) and float(x[3, 0]) == row_value(2, 3)
    assert label.tolist() == [2] * ROWS


def test_plain_h5py_files_are_datasets() -> None:
    # A golden file a plain h5py script wrote: one dataset per variable, leading step axis.
    path = os.path.join(HERE, "data", "h5_step_axis.h5")
    with h5py.File(path, "r") as f:
        name = next(k for k, d in f.items() if isinstance(d, h5py.Dataset) and d.ndim >= 2)
        want = f[name][...]
    whole = SampleDataset(f"h5://{path}", vars=name)  # a foreign file is one step by default
    assert whole.steps == 1 and len(whole) == want.shape[0]
    ds = SampleDataset(f"h5://{path}", vars=name, layout="step-axis")
    assert ds.steps == want.shape[0] and len(ds) == want.shape[0] * want.shape[1]
    got = torch.stack(ds.__getitems__(list(range(len(ds))))).numpy()
    np.testing.assert_array_equal(got, want.reshape(-1, *want.shape[2:]))


def test_bad_input_is_refused(tmp_path) -> None:
    url = f"bp5://{tmp_path}/odd.bp"
    with dp.publish(url) as pub:
        pub.write({"x": np.zeros((4, 2)), "y": np.zeros(4), "t": np.float64(1)})
        pub.write({"x": np.zeros((3, 2)), "y": np.zeros(5), "t": np.float64(2)})
        pub.write({"x": np.zeros((3, 3)), "y": np.zeros(3)})
    with pytest.raises(dp.VariableNotFoundError, match="step 0 .* no variable 'nope'"):
        SampleDataset(url, vars=("x", "nope"))
    with pytest.raises(dp.SchemaError, match="3 rows of 'x' but 5 of 'y'"):
        SampleDataset(url, vars=("x", "y"))
    with pytest.raises(dp.SchemaError, match="scalar .* use sample='step'"):
        SampleDataset(url, vars="t")
    with pytest.raises(dp.SchemaError, match=r"rows of 'x' are \(2,\) float64 .* \(3,\)"):
        SampleDataset(url, vars="x")
    assert len(SampleDataset(url, vars="x", sample="step")) == 3
    with pytest.raises(dp.VariableNotFoundError, match="step 2 .* no variable 't'"):
        SampleDataset(url, vars="t", sample="step")
    with pytest.raises(dp.OptionError, match="sample must be 'row'"):
        SampleDataset(url, vars="x", sample="column")
    with pytest.raises(dp.OptionError, match="not a numpy or torch dtype"):
        SampleDataset(url, vars="x", dtype="float99")
    with pytest.raises(dp.UnknownOptionError, match="does not take option 'bogus'"):
        SampleDataset(url, vars="x", bogus=1)
    with pytest.raises(dp.OptionError, match="vars must"):
        SampleDataset(url, vars=())


def test_pickles_as_how_to_reopen(stored) -> None:
    ds = SampleDataset(stored, vars=("x",))
    ds[0]  # opens a handle in this process
    clone = pickle.loads(pickle.dumps(ds))
    assert clone._io._arc is None and len(clone) == len(ds)
    assert float(clone[ROWS][0][0]) == row_value(1, 0)
    assert clone.get_config()["samples"] == len(ds)


def epoch(loader: DataLoader) -> list[int]:
    return [ident(row) for x, _ in loader for row in x]


@pytest.mark.filterwarnings("ignore:This DataLoader will create 4 worker processes")
@pytest.mark.parametrize(
    "workers,context", [(0, None), (2, "fork"), (2, "spawn"), (4, "fork"), (4, "spawn")]
)
def test_shuffled_epoch_with_workers(tmp_path, workers, context) -> None:
    url = f"h5://{tmp_path}/run.h5"
    write_rows(url)
    ds = SampleDataset(url, vars=("x", "label"), shard_bytes=10 * COLS * 4)
    ds[0]  # a handle open in the parent before the workers start
    sampler = ShuffleSampler(ds, seed=3, block=2)
    loader = DataLoader(
        ds, batch_size=16, sampler=sampler, num_workers=workers, multiprocessing_context=context
    )
    seen = epoch(loader)
    assert sorted(seen) == list(range(STEPS * ROWS))
    assert seen == sampler.order().tolist()
    assert seen != sorted(seen)


@pytest.mark.parametrize("scheme", ["bp5", "zarr"])
def test_other_formats_with_workers(tmp_path, scheme) -> None:
    url = f"{scheme}://{tmp_path}/run.{scheme}"
    write_rows(url)
    ds = SampleDataset(url, vars=("x", "label"))
    loader = DataLoader(ds, batch_size=16, sampler=ShuffleSampler(ds, block=None), num_workers=2)
    assert sorted(epoch(loader)) == list(range(STEPS * ROWS))


def _thread_count(sample):
    return sample, len(os.listdir("/proc/self/task"))


def test_bp5_reader_threads_stay_few_in_workers(tmp_path) -> None:
    url = f"bp5://{tmp_path}/big.bp"
    with dp.publish(url) as pub:
        for _ in range(2):
            pub.write({"x": np.ones((4096, 256), np.float32)})
    ds = SampleDataset(url, vars="x", sample="step", transform=_thread_count)
    counts = [n for _, n in DataLoader(ds, batch_size=None, num_workers=1)]
    # The worker's own threads plus the BP5 reader's (capped at one by default, not 16).
    assert max(counts) <= 4, counts


def test_growing_data_is_a_snapshot_until_refresh(tmp_path) -> None:
    url = f"h5://{tmp_path}/live.h5"
    # A writer that dies in the middle of step 3: steps 0-2 committed, step 3 never.
    proc = run_proc("publish", url, "--steps", "5", "--size", "40", "--kill-in-step", "3")
    read_events(proc, timeout=60)
    ds = SampleDataset(url, vars="k")
    assert ds.steps == 3 and len(ds) == 3 * 10
    rows = torch.stack(ds.__getitems__(list(range(len(ds)))))
    # Step i's k rows are arange(40).reshape(10, 4) * (i + 1): never from the partial step.
    assert set((rows[:, 1] - rows[:, 0]).tolist()) == {1, 2, 3}


def test_a_settled_file_is_not_looked_at_again_until_it_changes(tmp_path, monkeypatch) -> None:
    """An epoch's refresh of a one-file channel unchanged since a look when it had already
    been settled for a while opens nothing; steps committed since are taken in as before.
    (Settled means unchanged for SETTLED_S = 30 s; here 0, so that it is at once.)"""
    from dataplane.loaders import _sources, sample

    url = f"h5://{tmp_path}/settled.h5"
    opened = []
    real = sample.open_steps
    monkeypatch.setattr(sample, "open_steps", lambda *a, **k: opened.append(1) or real(*a, **k))
    with dp.publish(url) as pub:  # the simulation keeps writing (SWMR) while training reads
        write_to(pub, range(2))
        ds = SampleDataset(url, vars=("x", "label"))
        assert len(opened) == 1 and ds.steps == 2
        monkeypatch.setattr(_sources, "SETTLED_S", 0.0)
        ds.refresh()  # looks (not settled at the last look), and records the file as settled
        assert len(opened) == 2
        sampler = ShuffleSampler(ds, seed=1)
        for epoch in range(3):
            sampler.set_epoch(epoch)  # refreshes
            assert sorted(ident(ds[i][0]) for i in sampler) == list(range(2 * ROWS))
        assert len(opened) == 2
        write_to(pub, range(2, 3))  # committed: the file changed
        sampler.set_epoch(3)
        assert len(opened) == 3 and ds.steps == 3
        for i in sampler:
            x, label = ds[i]
            assert ident(x) == i and int(label) == i // ROWS
        assert sorted(sampler) == list(range(3 * ROWS))
    ds.close()


# HDF5 keeps one view of a file per process: workers forked from the process that holds the
# writer would inherit the writer's view, so the in-process h5 writer pairs with spawn here.
@pytest.mark.parametrize("scheme,context", [("h5", "spawn"), ("bp5", "fork"), ("zarr", "fork")])
def test_sampler_refreshes_at_each_epoch_and_workers_catch_up(tmp_path, scheme, context) -> None:
    url = f"{scheme}://{tmp_path}/grow.{scheme}"
    # The simulation keeps writing (an SWMR writer for h5) while training reads.
    with dp.publish(url) as pub:
        write_to(pub, range(2))
        ds = SampleDataset(url, vars=("x", "label"))
        sampler = ShuffleSampler(ds, seed=0, block=None)
        loader = DataLoader(
            ds,
            batch_size=10,
            sampler=sampler,
            num_workers=2,
            persistent_workers=True,
            multiprocessing_context=context,
        )
        sampler.set_epoch(0)
        first = epoch(loader)
        assert sorted(first) == list(range(2 * ROWS))
        write_to(pub, range(2, 4))
        assert len(ds) == 2 * ROWS, "fixed within an epoch"
        sampler.set_epoch(1)
        assert len(ds) == 4 * ROWS and len(sampler) == 4 * ROWS
        # The persistent workers hold the old snapshot and catch up on the new indices.
        assert sorted(epoch(loader)) == list(range(4 * ROWS))
        del loader


@pytest.mark.filterwarnings("ignore:This DataLoader will create 4 worker processes")
@pytest.mark.parametrize("workers_before,workers_after", [(2, 0), (0, 4), (2, 2)])
def test_mid_epoch_resume_is_exact(tmp_path, workers_before, workers_after) -> None:
    url = f"zarr://{tmp_path}/run.zarr"
    write_rows(url)
    batch = 8

    def make(workers: int) -> tuple[ShuffleSampler, DataLoader]:
        ds = SampleDataset(url, vars=("x", "label"), shard_bytes=5 * COLS * 4)
        s = ShuffleSampler(ds, seed=11, block=3, rank=1, world=2)
        return s, DataLoader(ds, batch_size=batch, sampler=s, num_workers=workers)

    sampler, loader = make(workers_before)
    sampler.set_epoch(2)
    full = sampler.order().tolist()
    got: list[int] = []
    for i, (x, _) in enumerate(loader):
        got.extend(ident(r) for r in x)
        if i == 4:
            break
    seen = None if workers_before == 0 else len(got)
    state = sampler.state_dict(samples_seen=seen)
    assert state["position"] == len(got) == 5 * batch
    del loader

    sampler2, loader2 = make(workers_after)
    sampler2.load_state_dict(state)
    sampler2.set_epoch(2)  # what a training loop does at the top of the resumed epoch
    got.extend(epoch(loader2))
    assert got == full, "nothing missed, nothing repeated, same order"
    # The next epoch starts from its beginning again.
    sampler2.set_epoch(3)
    assert len(epoch(loader2)) == len(sampler2)


def test_resume_refuses_a_different_shuffle(stored) -> None:
    ds = SampleDataset(stored, vars="x")
    state = ShuffleSampler(ds, seed=1, block=2).state_dict()
    with pytest.raises(dp.OptionError, match="seed=1 but this sampler seed=2"):
        ShuffleSampler(ds, seed=2, block=2).load_state_dict(state)


def test_resume_after_the_data_grew_keeps_the_saved_order(tmp_path) -> None:
    url = f"bp5://{tmp_path}/grow.bp"
    write_rows(url, steps=2)
    ds = SampleDataset(url, vars="x")
    sampler = ShuffleSampler(ds, seed=5, block=None)
    full = sampler.order().tolist()
    it = iter(sampler)
    head = [next(it) for _ in range(17)]
    state = sampler.state_dict()
    write_rows(url, steps=2, start=2)
    again = ShuffleSampler(SampleDataset(url, vars="x"), seed=5, block=None)
    again.load_state_dict(state)
    assert head + list(again) == full
    assert len(list(again)) == 4 * ROWS  # the next pass sees the grown data


def test_sampler_cost_reports_the_block_tradeoff(stored) -> None:
    ds = SampleDataset(stored, vars=("x", "label"), shard_bytes=10 * (COLS * 4 + 8))
    blocked = ShuffleSampler(ds, block=2).cost()
    uniform = ShuffleSampler(ds, block=None).cost()
    assert blocked["shards"] == uniform["shards"] == STEPS * ROWS // 10
    assert blocked["bytes_read"] == uniform["bytes_read"] == STEPS * ROWS * (COLS * 4 + 8)
    assert blocked["shards_in_flight"] <= 2 < uniform["shards_in_flight"]


def test_sampler_ranks_from_an_initialised_process_group(tmp_path) -> None:
    torch.distributed.init_process_group(
        "gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1
    )
    try:
        s = ShuffleSampler(100)
        assert (s.rank, s.world) == (0, 1)
    finally:
        torch.distributed.destroy_process_group()
    assert (ShuffleSampler(10, rank=2, world=3).rank, ShuffleSampler(10).world) == (2, 1)
    with pytest.raises(dp.OptionError, match="give both rank and world"):
        ShuffleSampler(10, rank=1)
    with pytest.raises(dp.OptionError, match="0 <= rank < world"):
        ShuffleSampler(10, rank=3, world=3)
    with pytest.raises(dp.OptionError, match="block must be None"):
        ShuffleSampler(10, block=0)


@pytest.mark.parametrize("scheme", ["h5", "bp5", "zarr"])
@pytest.mark.parametrize("cached", [False, True], ids=["direct", "cache"])
def test_a_damaged_row_never_reaches_training(tmp_path, scheme, cached) -> None:
    """A flipped byte inside one row of a stored step: the batches that hold a sample of its
    checksum block raise IntegrityError, every other sample is exact, and the cache stores
    nothing of the damaged block (its fetch is verified like any read)."""
    from dataplane.cache import NodeCache, cache_stats
    from dataplane.transports._checksums import BLOCK_BYTES

    url = f"{scheme}://{tmp_path}/run.{scheme}"
    rows, width = 2048, 64  # 512 KiB steps: several checksum blocks each
    block = BLOCK_BYTES // (width * 4)  # rows per checksum block
    assert block <= 512 and 512 % block == 0
    with dp.publish(url) as pub:
        for s in range(3):
            x = np.repeat([[s * 10_000 + r] for r in range(rows)], width, axis=1)
            pub.write({"x": x.astype(np.float32)})
    needle = np.full(width, 10_700, np.float32).tobytes()
    root = tmp_path / f"run.{scheme}"
    files = [root] if root.is_file() else [p for p in root.rglob("*") if p.is_file()]
    hits = [(p, p.read_bytes().find(needle)) for p in files]
    hits = [(p, at) for p, at in hits if at >= 0]
    assert len(hits) == 1 and hits[0][0].read_bytes().count(needle) == 1
    with open(hits[0][0], "r+b") as f:
        f.seek(hits[0][1] + 100)
        byte = f.read(1)
        f.seek(hits[0][1] + 100)
        f.write(bytes([byte[0] ^ 0x40]))
    cache = NodeCache(tmp_path / "cache", capacity="64MiB") if cached else None
    ds = SampleDataset(url, vars="x", cache=cache, prefetch=False, shard_bytes=128 << 10)
    failed = []
    for first in range(0, len(ds), 64):
        batch = list(range(first, min(first + 64, len(ds))))
        try:
            got = ds.__getitems__(batch)
        except dp.IntegrityError as exc:
            assert "corrupt" in str(exc)
            failed.append(first)
            continue
        for i, x in zip(batch, got):
            assert bool((x == (i // rows) * 10_000 + i % rows).all()), f"sample {i} is wrong"
    # Only batches that touch the damaged row's checksum block fail; through the cache, those
    # of the shard (512 rows) that holds it, since a shard is fetched whole.
    first, end = rows + 700 // block * block, rows + 700 // block * block + block
    if cached:
        first, end = rows + 512, rows + 1024
    assert failed == list(range(first - first % 64, end, 64)), failed
    if cached:  # shards of 512 rows: the shard holding the block is never stored
        assert cache_stats(str(tmp_path / "cache"))["entries"] == len(ds.shard_nbytes()) - 1
