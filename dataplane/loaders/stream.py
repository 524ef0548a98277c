"""``StreamDataset``: samples from a live channel, for training while the simulation runs."""

from __future__ import annotations

import functools
import multiprocessing
import multiprocessing.context
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch

import dataplane.api as api
from dataplane.errors import OptionError, StepTimeoutError
from dataplane.loaders._buffer import BUFFER_MODES, POLL, Buffer, free_running, step_samples
from dataplane.loaders._common import (
    as_tensor,
    check_sample,
    check_seed,
    check_transform,
    parse_dtypes,
    parse_vars,
    shape_sample,
    vars_config,
    world_defaults,
)
from dataplane.model import Step, check_timeout

__all__ = ["StreamDataset"]

#: Consumers (DataLoader workers of one rank) whose stream position the dataset can report.
MAX_CONSUMERS = 256


class StreamDataset(torch.utils.data.IterableDataset[Any]):
    """Samples of the steps published on a live channel, as they arrive.

    Every consumer (each DataLoader worker of each rank) subscribes on its own and uses the
    steps whose index modulo the number of consumers is its own number, so each step feeds
    exactly one consumer (every rank must use the same ``num_workers``). Iteration ends when
    the writer closes the channel and raises ``ChannelBroken`` when it dies.

    Two ways to use the bounded buffer of ``buffer`` samples (memory never grows past it):

    - ``replacement=False`` (default): a shuffle buffer. Every sample is yielded exactly
      once, in an order shuffled within a window of ``buffer`` samples.
    - ``replacement=True``: a replay buffer that keeps the newest samples (``mode="fifo"``) or
      a uniform sample of all so far (``mode="reservoir"``), and yields samples drawn from it
      with replacement. With ``samples_per_step=k`` each consumed step is followed by ``k``
      draws (training paced by the simulation). With ``samples_per_step=None`` a background
      thread takes in steps while training draws as fast as it runs: faster or slower than the
      simulation, never making it wait longer than its own ``queue_limit`` allows.

    Parameters
    ----------
    url
        A live channel: ``shm://``, ``sst://``, or a file transport still being written.
    vars, sample, dtype, transform
        As for :class:`SampleDataset`.
    seed
        Seeds the buffer's choices (with the consumer's number and the resume position).
    timeout
        Seconds to wait for each step, then ``StepTimeoutError`` (None: wait while the writer
        lives).
    start
        ``"first"`` or ``"latest"``, as for :func:`dataplane.subscribe`.
    rank, world
        This rank among the training ranks (defaults as for ``ShuffleSampler``).
    **opts
        Transport options, as for :func:`dataplane.subscribe`.
    """

    def __init__(
        self,
        url: str,
        vars: Any,
        *,
        sample: str = "row",
        buffer: int = 10_000,
        mode: str = "fifo",
        replacement: bool = False,
        samples_per_step: float | None = None,
        seed: int = 0,
        timeout: float | None = None,
        start: str = "first",
        dtype: Any = None,
        transform: Callable[[Any], Any] | None = None,
        rank: int | None = None,
        world: int | None = None,
        **opts: Any,
    ) -> None:
        super().__init__()
        self.url = url
        self.opts = dict(opts)
        self.names, self._keys, self._single = parse_vars(vars)
        self.sample = check_sample(sample)
        self._dtypes = parse_dtypes(dtype, self.names)
        if isinstance(buffer, bool) or not isinstance(buffer, (int, np.integer)) or buffer < 1:
            raise OptionError(f"buffer must be a number of samples >= 1, got {buffer!r}")
        if mode not in BUFFER_MODES:
            raise OptionError(f"mode must be one of {', '.join(BUFFER_MODES)}, got {mode!r}")
        if not replacement and (mode != "fifo" or samples_per_step is not None):
            raise OptionError(
                "mode and samples_per_step shape a replay buffer: pass replacement=True. "
                "Without replacement every sample is yielded exactly once, at the stream's pace"
            )
        if samples_per_step is not None and not (
            isinstance(samples_per_step, (int, float, np.number))
            and not isinstance(samples_per_step, bool)
            and samples_per_step > 0
        ):
            raise OptionError(f"samples_per_step must be > 0 or None, got {samples_per_step!r}")
        if start not in ("first", "latest"):
            raise OptionError(f"start must be 'first' or 'latest', got {start!r}")
        check_timeout(timeout)
        self.buffer = int(buffer)
        self.mode = mode
        self.replacement = bool(replacement)
        self.samples_per_step = samples_per_step
        self.seed = check_seed(seed)
        self.timeout = timeout
        self.start = start
        self.transform = check_transform(transform)
        self.rank, self.world = world_defaults(rank, world)
        self._resume_at = 0  # steps before this index were used before a resume
        self._stats = {"steps": 0, "samples": 0, "dropped": 0, "bytes": 0}
        # Where each consumer (worker) is: the first step index it still needs. Shared memory,
        # so the main process can report the position of its DataLoader workers.
        self._progress: Any = multiprocessing.RawArray("q", MAX_CONSUMERS)
        self._local: list[int] = [-1] * MAX_CONSUMERS
        for i in range(MAX_CONSUMERS):
            self._progress[i] = -1

    # -- who am I ----------------------------------------------------------------------------
    def _consumer(self) -> tuple[int, int, int]:
        """(this consumer's number, number of consumers, its worker slot)."""
        info = torch.utils.data.get_worker_info()
        workers, worker = (1, 0) if info is None else (info.num_workers, info.id)
        if workers > MAX_CONSUMERS:
            raise OptionError(f"at most {MAX_CONSUMERS} DataLoader workers, got {workers}")
        return self.rank * workers + worker, self.world * workers, worker

    def _mark(self, slot: int, position: int) -> None:
        self._local[slot] = position
        if self._progress is not None:
            self._progress[slot] = position

    # -- iteration ---------------------------------------------------------------------------
    def __iter__(self) -> Iterator[Any]:
        me, consumers, slot = self._consumer()
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, me, self._resume_at]))
        buf = Buffer(self.buffer, self.mode, rng)
        self._mark(slot, self._resume_at)
        sub = api.subscribe(
            self.url, vars=self.names, timeout=self.timeout, start=self.start, **self.opts
        )
        with sub:
            seen = [self._resume_at - 1]  # the last step index the channel delivered
            stop = threading.Event() if self.replacement and self.samples_per_step is None else None
            mine = self._mine(sub, me, consumers, seen, stop)
            samples = step_samples(mine, self.names, self._dtypes, self.sample, self.url)
            if not self.replacement:
                for sample, step in samples:
                    out = buf.swap(sample, step)
                    oldest = buf.oldest_step()
                    self._mark(slot, step if oldest is None else oldest)
                    if out is not None:
                        yield self._emit(out)
                for out in buf.drain():
                    yield self._emit(out)
            elif stop is None:
                per_step = float(self.samples_per_step or 0)
                credit = 0.0
                last = None
                for sample, step in samples:
                    if last is not None and step != last:
                        credit += per_step
                        while credit >= 1:
                            credit -= 1
                            yield self._emit(buf.draw())
                    buf.add(sample, step)
                    last = step
                    self._mark(slot, step)
                if last is not None:  # the draws owed for the last step
                    credit += per_step
                    while credit >= 1:
                        credit -= 1
                        yield self._emit(buf.draw())
            else:
                mark = functools.partial(self._mark, slot)
                yield from free_running(buf, samples, mark, stop, self._emit)
            self._mark(slot, seen[0] + 1)  # the stream ended: everything before its end is used

    def _mine(
        self,
        sub: api.Subscriber,
        me: int,
        consumers: int,
        seen: list[int],
        stop: threading.Event | None,
    ) -> Iterator[Step]:
        """This consumer's steps. With ``stop``, waits in short polls so that a background
        reader notices a consumer that left."""
        last_step = time.monotonic()
        while stop is None or not stop.is_set():
            try:
                step = sub.next() if stop is None else sub.next(POLL)
            except StepTimeoutError:
                if stop is None:
                    raise
                if self.timeout is not None and time.monotonic() - last_step > self.timeout:
                    raise StepTimeoutError(
                        f"no step from {self.url} within {self.timeout} s (timeout)"
                    ) from None
                continue
            if step is None:
                return
            last_step = time.monotonic()
            seen[0] = step.index
            self._stats["dropped"] = sub.stats.dropped
            if step.index >= self._resume_at and step.index % consumers == me:
                self._stats["steps"] += 1
                self._stats["bytes"] += sum(spec.nbytes for spec in step.vars.values())
                yield step

    def _emit(self, sample: tuple[np.ndarray, ...]) -> Any:
        self._stats["samples"] += 1
        s = shape_sample([as_tensor(a) for a in sample], self._keys, self._single)
        return self.transform(s) if self.transform is not None else s

    @property
    def stats(self) -> dict[str, int]:
        """What this consumer (in this process) used: its steps and their bytes, samples
        yielded, and steps the channel dropped before it could see them."""
        return dict(self._stats)

    # -- resume ------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The stream position (every step before it was used) and the buffer's seed.

        With DataLoader workers the position is the oldest of the workers' positions, and
        workers run ahead of training by the loader's prefetch: a resumed run may use a few
        steps twice, never skip one. The buffer's samples are not saved; it refills.
        """
        marks = [
            p for p in (self._progress[:] if self._progress is not None else self._local) if p >= 0
        ]
        return {
            "position": min(marks) if marks else self._resume_at,
            "seed": self.seed,
            "rank": self.rank,
            "world": self.world,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Skip the steps before ``state["position"]`` in the next iteration."""
        if state.get("seed") != self.seed:
            raise OptionError(
                f"cannot resume: the state has seed={state.get('seed')!r}, this dataset "
                f"seed={self.seed}"
            )
        position = state.get("position")
        if isinstance(position, bool) or not isinstance(position, int) or position < 0:
            raise OptionError(f"state['position'] must be a step index >= 0, got {position!r}")
        self._resume_at = position
        for i in range(MAX_CONSUMERS):
            self._mark(i, -1)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        # Shared memory travels only to processes being started (DataLoader workers).
        if multiprocessing.context.get_spawning_popen() is None:
            state["_progress"] = None
        return state

    def get_config(self) -> dict[str, Any]:
        return {
            "class": type(self).__name__,
            "url": self.url,
            "vars": vars_config(self.names, self._keys),
            "sample": self.sample,
            "buffer": self.buffer,
            "mode": self.mode,
            "replacement": self.replacement,
            "samples_per_step": self.samples_per_step,
            "seed": self.seed,
            "rank": self.rank,
            "world": self.world,
        }

    def __repr__(self) -> str:
        return f"StreamDataset({self.url!r}, vars={self.names}, buffer={self.buffer})"
