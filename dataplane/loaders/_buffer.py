"""The bounded sample buffer of ``StreamDataset`` and what fills and drains it."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from dataplane.errors import SchemaError, VariableNotFoundError
from dataplane.model import Step

BUFFER_MODES = ("fifo", "reservoir")
POLL = 0.2  # seconds between checks for "stop" while a background reader waits for a step


class Buffer:
    """At most ``capacity`` samples (tuples of arrays, one per variable), stored as copies."""

    def __init__(self, capacity: int, mode: str, rng: np.random.Generator) -> None:
        self.capacity = capacity
        self.mode = mode
        self.rng = rng
        self.samples: list[tuple[np.ndarray, ...] | None] = []
        self.steps = np.zeros(capacity, np.int64)  # the step each slot's sample came from
        self.seen = 0  # samples ever offered (reservoir sampling needs it)
        self._head = 0

    def __len__(self) -> int:
        return len(self.samples)

    def _store(self, slot: int, sample: tuple[np.ndarray, ...], step: int) -> None:
        if slot == len(self.samples):
            self.samples.append(sample)
        else:
            self.samples[slot] = sample
        self.steps[slot] = step

    def add(self, sample: tuple[np.ndarray, ...], step: int) -> None:
        """Keep ``sample`` (FIFO: evict the oldest; reservoir: keep a uniform sample of all)."""
        self.seen += 1
        if len(self.samples) < self.capacity:
            self._store(len(self.samples), sample, step)
        elif self.mode == "fifo":
            self._store(self._head, sample, step)
            self._head = (self._head + 1) % self.capacity
        else:
            slot = int(self.rng.integers(0, self.seen))
            if slot < self.capacity:
                self._store(slot, sample, step)

    def swap(self, sample: tuple[np.ndarray, ...], step: int) -> tuple[np.ndarray, ...] | None:
        """Shuffle buffer: store ``sample``; once full, hand back a random stored one in its
        place."""
        if len(self.samples) < self.capacity:
            self._store(len(self.samples), sample, step)
            return None
        slot = int(self.rng.integers(0, self.capacity))
        out = self.samples[slot]
        self._store(slot, sample, step)
        return out

    def draw(self) -> tuple[np.ndarray, ...]:
        """A uniformly drawn sample, with replacement (a copy: the slot may be overwritten)."""
        sample = self.samples[int(self.rng.integers(0, len(self.samples)))]
        assert sample is not None
        return tuple(a.copy() for a in sample)

    def drain(self) -> Iterator[tuple[np.ndarray, ...]]:
        """What is left, in random order (the end of a shuffle buffer)."""
        for slot in self.rng.permutation(len(self.samples)):
            sample = self.samples[slot]
            assert sample is not None
            yield sample
        self.samples.clear()

    def oldest_step(self) -> int | None:
        return int(self.steps[: len(self.samples)].min()) if self.samples else None


def step_samples(
    steps: Iterator[Step],
    names: tuple[str, ...],
    dtypes: dict[str, np.dtype | None],
    sample: str,
    url: str,
) -> Iterator[tuple[tuple[np.ndarray, ...], int]]:
    """(sample as arrays in ``dtypes``, its step index), copied out of each step: the step
    whole (``sample="step"``) or each of its rows."""
    for step in steps:
        arrays = []
        for name in names:
            if name not in step.vars:
                raise VariableNotFoundError(
                    f"step {step.index} of {url} has no variable {name!r} (it has: "
                    f"{', '.join(sorted(step.vars)) or 'none'})"
                )
            arr = step[name]
            d = dtypes[name]
            arrays.append(arr.astype(d) if d is not None and arr.dtype != d else arr)
        if sample == "step":
            yield tuple(np.array(a) for a in arrays), step.index
            continue
        rows = {a.shape[0] if a.ndim else -1 for a in arrays}
        if len(rows) != 1 or -1 in rows:
            raise SchemaError(
                f"step {step.index} of {url}: with sample='row' every variable needs "
                f"rows (axis 0) and the same number of them; got shapes "
                f"{[a.shape for a in arrays]}"
            )
        for j in range(rows.pop()):
            yield tuple(np.array(a[j]) for a in arrays), step.index


def free_running(
    buf: Buffer,
    samples: Iterator[tuple[tuple[np.ndarray, ...], int]],
    mark: Callable[[int], None],
    stop: threading.Event,
    emit: Callable[[tuple[np.ndarray, ...]], Any],
) -> Iterator[Any]:
    """``emit`` draws from ``buf`` as fast as the consumer asks while a thread adds
    ``samples`` as they come (``mark``-ing each one's step). Delegate to it with ``yield
    from``: closing it stops and joins that thread."""
    cond = threading.Condition()
    state: dict[str, Any] = {"done": False, "error": None}

    def take() -> None:
        try:
            for sample, step in samples:
                with cond:
                    buf.add(sample, step)
                    mark(step)
                    cond.notify_all()
        except BaseException as exc:  # travels to the consumer as a value
            state["error"] = exc
        finally:
            with cond:
                state["done"] = True
                cond.notify_all()

    thread = threading.Thread(target=take, name="dataplane-stream-buffer", daemon=True)
    thread.start()
    try:
        while True:
            with cond:
                while not len(buf) and not state["done"]:
                    cond.wait(POLL)
                if state["error"] is not None:
                    raise state["error"]
                if state["done"]:
                    return
                sample = buf.draw()
            yield emit(sample)
    finally:
        # The reader thread holds the subscription: it must leave before the ``with sub``
        # around the caller closes it. It polls, so it sees ``stop`` within a fraction of a
        # second.
        stop.set()
        thread.join()
