"""Steps from one process to another: ``shm://`` and ``sst://`` against ``multiprocessing.Queue``
(pickled numpy), a ring of shared-memory slots with two semaphores (the floor of any
shared-memory stream), and ``numpy.copyto`` into shared memory in one process (moving the bytes
once). One group per step size.

A round is ``steps`` steps received in steady state: before it, a writer process is started
and ``WARMUP`` steps are received untimed. Every method carries the step's index; the readers
check that the indices arrive in order with none lost, and the last step's bytes are compared
with the writer's. Latency is ``dataplane bench stream``'s to report.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import tempfile
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest

import dataplane as dp
from dataplane.bench._common import fmt_size

WARMUP = 8
CTX = mp.get_context("spawn")  # the benchmark process holds threads (prefetchers, loaders)


def payload(size: int, index: int) -> np.ndarray:
    """Step ``index``'s bytes: random, with the index in the first 8 bytes."""
    data = np.random.default_rng(0).integers(0, 255, max(size, 8), dtype=np.uint8)
    data[:8].view(np.int64)[0] = index
    return data


def index_of(x: np.ndarray) -> int:
    return int(x[:8].view(np.int64)[0])


def steps_for(size: int, nbytes: int) -> int:
    """Steps in a round: about ``nbytes``, at least 16 steps and at most 4096."""
    return max(16, min(4096, nbytes // max(size, 1)))


# -- writers (child processes) -----------------------------------------------------------------
def _dp_writer(url: str, size: int, steps: int, opts: dict) -> None:
    data = payload(size, 0)
    with dp.publish(url, queue_limit=4, rendezvous=1, **opts) as pub:
        for i in range(steps):
            data[:8].view(np.int64)[0] = i  # write() has copied the previous step
            pub.write({"x": data})


def _queue_writer(q: Any, size: int, steps: int) -> None:
    data = payload(size, 0)  # the same bytes each step: put() pickles in a feeder thread
    for i in range(steps):
        q.put((i, data))
    q.put(None)


def _ring_writer(buf: Any, free: Any, full: Any, size: int, slots: int, steps: int) -> None:
    data = payload(size, 0)
    ring = np.frombuffer(buf, np.uint8).reshape(slots, -1)
    for i in range(steps + 1):
        free.acquire()
        slot = ring[i % slots]
        if i == steps:
            slot[:8].view(np.int64)[0] = -1
        else:
            data[:8].view(np.int64)[0] = i
            slot[:] = data
        full.release()


# -- readers (this process) --------------------------------------------------------------------
class Stream:
    """A writer process and this process's end of one method's stream."""

    def __init__(self, method: str, size: int, steps: int, workdir: str) -> None:
        self.method, self.size, self.total = method, size, WARMUP + steps
        self.proc: Any = None
        self._sub: Any = None
        self._file: Any = None
        if method in ("shm://", "sst://"):
            name = f"bench-{uuid.uuid4().hex[:10]}"
            if method == "shm://":
                url, opts = f"shm://{name}", {"dir": os.path.join(workdir, "shm")}
            else:
                url, opts = f"sst://{os.path.join(workdir, name)}", {}
            self._start(_dp_writer, url, size, self.total, opts)
            self._sub = dp.subscribe(url, timeout=120, **opts)
            steps_iter = iter(self._sub)
            self.next = lambda: next(steps_iter)["x"]
        elif method == "mp.Queue":
            q = CTX.Queue(maxsize=4)
            self._start(_queue_writer, q, size, self.total)

            def get() -> np.ndarray:
                i, data = q.get(timeout=120)
                data[:8].view(np.int64)[0] = i
                return data

            self.next = get
        elif method == "ring":
            slots = 4
            buf = CTX.RawArray("b", max(size, 8) * slots)
            free, full = CTX.Semaphore(slots), CTX.Semaphore(0)
            self._start(_ring_writer, buf, free, full, size, slots, self.total)
            ring = np.frombuffer(buf, np.uint8).reshape(slots, -1)
            count = iter(range(self.total))
            held: list[int] = []

            def take() -> np.ndarray:
                # A slot is freed when the next is taken: the caller reads it in place.
                if held:
                    free.release()
                if not full.acquire(timeout=120):
                    raise dp.DataplaneError("the ring writer stopped sending")
                held[:] = [next(count) % slots]
                return ring[held[0]]

            self.next = take
        elif method == "raw copy":
            shm = "/dev/shm" if os.path.isdir("/dev/shm") else None
            self._file = tempfile.TemporaryFile(dir=shm)
            self._file.truncate(max(size, 8))
            dst = np.memmap(self._file, np.uint8, "r+", shape=(max(size, 8),))
            src = payload(size, 0)
            np.copyto(dst, src)  # fault the pages in once, as a running channel has
            count = iter(range(self.total))

            def copy() -> np.ndarray:
                src[:8].view(np.int64)[0] = next(count)
                np.copyto(dst, src)
                return dst

            self.next = copy
        else:
            raise ValueError(method)
        self.seen = [index_of(self.next()) for _ in range(WARMUP)]

    def _start(self, target: Callable[..., None], *args: Any) -> None:
        self.proc = CTX.Process(target=target, args=args, daemon=True)
        self.proc.start()

    def receive(self, steps: int) -> np.ndarray:
        """The timed part: ``steps`` steps, each looked at where it lies; the last one copied."""
        for _ in range(steps - 1):
            self.seen.append(index_of(self.next()))
        last = np.array(self.next())
        self.seen.append(index_of(last))
        return last

    def finish(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._sub is not None:
            self._sub.close()
            self._sub = None
        if self.proc is not None:
            self.proc.join(60)
            if self.proc.is_alive():
                self.proc.kill()
                self.proc.join()
                raise dp.DataplaneError(f"the {self.method} writer did not finish")
            if self.proc.exitcode != 0:
                raise dp.DataplaneError(f"the {self.method} writer failed ({self.proc.exitcode})")
            self.proc = None


@pytest.fixture
def workdir(bench_dir: str) -> Iterator[str]:
    yield tempfile.mkdtemp(prefix="stream-", dir=bench_dir)


@pytest.mark.parametrize("method", ["raw copy", "shm://", "sst://", "mp.Queue", "ring"])
def test_stream(measure, sizes, workdir: str, method: str, step_size: int) -> None:
    steps = steps_for(step_size, sizes.stream_bytes)
    streams: list[Stream] = []

    def setup() -> tuple[tuple[Stream], dict]:
        streams.append(Stream(method, step_size, steps, workdir))
        return (streams[-1],), {}

    def done(stream: Stream) -> None:
        stream.finish()

    try:
        last = measure(
            lambda stream: stream.receive(steps),
            group=f"stream {fmt_size(step_size)} steps",
            ours=method in ("shm://", "sst://"),
            nbytes=steps * step_size,
            setup=setup,
            teardown=done,
        )
        for s in streams:
            s.finish()
            assert s.seen == list(range(WARMUP + steps)), "steps lost, repeated or reordered"
        expected = payload(step_size, WARMUP + steps - 1)
        np.testing.assert_array_equal(last, expected)
    finally:
        for s in streams:
            if s.proc is not None:
                s.proc.kill()
