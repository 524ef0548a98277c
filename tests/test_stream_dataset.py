"""StreamDataset over live channels: real writer processes, real DataLoader workers."""

from __future__ import annotations

import threading
import uuid

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

import dataplane as dp
from dataplane.loaders import StreamDataset
from dataplane.loaders._buffer import Buffer as _Buffer
from dataplane.testing import read_events, run_proc

pytestmark = pytest.mark.timeout(180)

SIZE = 40  # the test writer's "k" has SIZE // 4 rows of 4: row r of step i is [4r..4r+3]*(i+1)
ROWS = SIZE // 4


def writer(url: str, steps: int, *opts: str, sleep: float = 0.0, **kw):
    args = ["publish", url, "--steps", str(steps), "--size", str(SIZE)]
    if sleep:
        args += ["--sleep", str(sleep)]
    for o in opts:
        args += ["--opt", o]
    for key, value in kw.items():
        args += [f"--{key.replace('_', '-')}", str(value)]
    return run_proc(*args)


def step_of(k: torch.Tensor) -> int:
    """The step a row of "k" came from."""
    return int(k[1] - k[0]) - 1


def consume(ds: StreamDataset, workers: int, out: list, batch: int = 4) -> None:
    for got in DataLoader(ds, batch_size=batch, num_workers=workers):
        k = got[0] if isinstance(got, (list, tuple)) else got
        out.extend((step_of(row), int(row[0]) // (4 * (step_of(row) + 1))) for row in k)


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("world", [1, 2])
def test_every_step_feeds_exactly_one_consumer(workers, world) -> None:
    url = f"shm://sd-{uuid.uuid4().hex[:8]}"
    consumers = world * max(workers, 1)
    steps = 24
    proc = writer(url, steps, f"rendezvous={consumers}")
    seen: list[list] = [[] for _ in range(world)]
    errors: list[BaseException] = []

    def rank(r: int) -> None:
        try:
            ds = StreamDataset(url, vars=("k",), buffer=7, timeout=60, rank=r, world=world)
            consume(ds, workers, seen[r])
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    read_events(proc, timeout=60)
    assert not errors, errors
    every = sorted(x for s in seen for x in s)
    assert every == [(i, r) for i in range(steps) for r in range(ROWS)], "each row exactly once"
    if world == 2:
        ranks = [{i for i, _ in s} for s in seen]
        assert not ranks[0] & ranks[1] and len(ranks[0]) == len(ranks[1]) == steps // 2


def test_shuffle_buffer_mixes_within_its_window() -> None:
    url = f"shm://sd-{uuid.uuid4().hex[:8]}"
    proc = writer(url, 10, "rendezvous=1")
    got: list = []
    consume(StreamDataset(url, vars="k", buffer=25, seed=3, timeout=60), 0, got)
    read_events(proc, timeout=60)
    steps = [i for i, _ in got]
    assert sorted(got) == [(i, r) for i in range(10) for r in range(ROWS)]
    assert steps != sorted(steps), "shuffled"
    # Memory is bounded: the n-th sample out (from 0) is one of the first n + buffer to arrive.
    arrival = {x: n for n, x in enumerate(sorted(got))}
    assert all(arrival[x] < n + 25 for n, x in enumerate(got))


def test_a_file_still_being_written_with_workers(tmp_path) -> None:
    url = f"h5://{tmp_path}/live.h5"
    proc = writer(url, 12, sleep=0.05)
    got: list = []
    consume(StreamDataset(url, vars=("k",), buffer=1, timeout=60), 2, got)
    read_events(proc, timeout=60)
    assert sorted(got) == [(i, r) for i in range(12) for r in range(ROWS)]


def test_step_samples_and_dict_vars(tmp_path) -> None:
    url = f"bp5://{tmp_path}/run.bp"
    read_events(writer(url, 6), timeout=60)
    ds = StreamDataset(url, vars={"field": "u", "time": "t"}, sample="step", buffer=1)
    samples = list(ds)
    assert [float(s["time"]) for s in samples] == [i * 0.5 for i in range(6)]
    assert samples[0]["field"].shape == (SIZE,) and samples[0]["field"].dtype == torch.float64
    assert ds.stats["steps"] == 6 and ds.stats["samples"] == 6 and ds.stats["dropped"] == 0


def test_replay_buffer_paced_by_the_stream(tmp_path) -> None:
    url = f"zarr://{tmp_path}/run.zarr"
    read_events(writer(url, 8), timeout=60)
    ds = StreamDataset(
        url, vars="k", buffer=15, replacement=True, samples_per_step=5, seed=1, dtype="float64"
    )
    got = [(step_of(k), int(k[0])) for k in ds]
    assert len(got) == 8 * 5
    assert all(isinstance(v, int) for _, v in got)
    # FIFO of 15 rows holds the newest 1.5 steps: the draws after step i come from i or i-1.
    for n, (i, _) in enumerate(got):
        assert (n // 5) - 1 <= i <= n // 5
    again = [(step_of(k), int(k[0])) for k in ds]
    assert again == got, "the same seed draws the same samples"


def test_replay_buffer_free_running_ends_with_the_stream() -> None:
    url = f"shm://sd-{uuid.uuid4().hex[:8]}"
    proc = writer(url, 20, "rendezvous=1", sleep=0.02)
    ds = StreamDataset(url, vars="k", buffer=30, replacement=True, mode="reservoir", timeout=60)
    got = [step_of(k) for k in ds]
    read_events(proc, timeout=60)
    # Training here is faster than the simulation: many more draws than rows, all ending
    # when the writer closed, each from a step that had arrived.
    assert len(got) > 20 * ROWS and set(got) <= set(range(20))
    assert ds.stats["steps"] == 20


def test_consumer_that_stops_early_releases_the_stream() -> None:
    url = f"shm://sd-{uuid.uuid4().hex[:8]}"
    proc = writer(url, 1000, "rendezvous=1", sleep=0.01)
    ds = StreamDataset(url, vars="k", buffer=30, replacement=True, timeout=60)
    it = iter(ds)
    first = [next(it) for _ in range(50)]
    it.close()  # the background reader leaves and the subscription closes
    assert len(first) == 50
    proc.kill()
    proc.wait()


def test_writer_death_raises_channel_broken_through_workers() -> None:
    url = f"shm://sd-{uuid.uuid4().hex[:8]}"
    proc = writer(url, 10, "rendezvous=2", kill_in_step=5)
    got: list = []
    with pytest.raises(dp.ChannelBroken):
        consume(StreamDataset(url, vars="k", buffer=1, timeout=60), 2, got)
    read_events(proc, timeout=60)
    assert {i for i, _ in got} <= set(range(5))


def test_state_dict_resumes_the_stream_position(tmp_path) -> None:
    url = f"h5://{tmp_path}/run.h5"
    read_events(writer(url, 10), timeout=60)
    ds = StreamDataset(url, vars="k", buffer=1, seed=4)
    got: list = []
    consume(ds, 2, got)
    state = ds.state_dict()
    assert state == {"position": 10, "seed": 4, "rank": 0, "world": 1}
    resumed = StreamDataset(url, vars="k", buffer=1, seed=4)
    resumed.load_state_dict({**state, "position": 6})
    rest: list = []
    consume(resumed, 0, rest)
    assert sorted({i for i, _ in rest}) == [6, 7, 8, 9]
    with pytest.raises(dp.OptionError, match="seed"):
        resumed.load_state_dict({**state, "seed": 5})


def test_state_mid_stream_never_skips_a_step(tmp_path) -> None:
    url = f"h5://{tmp_path}/run.h5"
    read_events(writer(url, 10), timeout=60)
    ds = StreamDataset(url, vars="k", buffer=25)
    it = iter(ds)
    taken = [step_of(next(it)) for _ in range(40)]
    position = ds.state_dict()["position"]
    # Rows of steps before the position were all yielded; the buffer's rows were not.
    assert all(sum(1 for s in taken if s == i) == ROWS for i in range(position)), (position, taken)
    it.close()


def test_buffer_never_holds_more_than_its_capacity() -> None:
    rng = np.random.default_rng(0)
    for mode in ("fifo", "reservoir"):
        buf = _Buffer(10, mode, rng)
        for i in range(1000):
            buf.add((np.array([i]),), i)
            assert len(buf) <= 10
        kept = sorted(int(s[0][0]) for s in buf.samples if s is not None)
        if mode == "fifo":
            assert kept == list(range(990, 1000))
        else:
            assert kept[0] < 900, "a reservoir keeps old samples too"


def test_bad_options_are_refused() -> None:
    with pytest.raises(dp.OptionError, match="buffer must be"):
        StreamDataset("shm://x", vars="k", buffer=0)
    with pytest.raises(dp.OptionError, match="pass replacement=True"):
        StreamDataset("shm://x", vars="k", mode="reservoir")
    with pytest.raises(dp.OptionError, match="mode must be one of"):
        StreamDataset("shm://x", vars="k", mode="lifo", replacement=True)
    with pytest.raises(dp.OptionError, match="samples_per_step must be"):
        StreamDataset("shm://x", vars="k", replacement=True, samples_per_step=0)
    with pytest.raises(dp.OptionError, match="start must be"):
        StreamDataset("shm://x", vars="k", start="middle")


def test_sst_stream_across_processes(tmp_path) -> None:
    url = f"sst://{tmp_path}/run"
    proc = writer(url, 8, "rendezvous=1")
    got: list = []
    consume(StreamDataset(url, vars=("k",), buffer=5, timeout=60), 0, got)
    read_events(proc, timeout=60)
    assert sorted(got) == [(i, r) for i in range(8) for r in range(ROWS)]
