"""The clairvoyant prefetcher: fetch shards into a ``NodeCache`` in order of next use.

It runs in its own process: h5py serialises every call in a process on one lock, and a thread
beside the training loop would also compete for its GIL. The consumer publishes its plan (the
epoch's order as shards, see :meth:`NodeCache.set_plan`) and its position; the prefetcher keeps
the shards needed next cached, a window of bytes ahead. The window starts at a few shards and
doubles whenever the consumer reaches a shard that is not there yet, up to half the cache.

Each process runs :func:`main`, told what to read in JSON lines on its
standard input (never pickles), and it ends when that closes or its parent dies. Several
processes follow one plan (opening many small files costs a process's CPU, not the disk's
time): each takes the next shard that no one is fetching. A
``multiprocessing`` spawn would import the training script's own imports (torch: a second)
before the first shard; this starts in a fraction of that.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import queue
import select
import subprocess
import sys
import threading
import time
import warnings
from typing import Any, Protocol

import numpy as np

from dataplane.cache.store import NodeCache

__all__ = ["Prefetcher", "PrefetchSource"]

_IDLE = 0.01  # seconds between looks at the consumer's position when nothing is to fetch


class PrefetchSource(Protocol):
    """What the prefetcher fetches from (a dataset with a cache): picklable."""

    cache: NodeCache | None

    def shard_nbytes(self) -> np.ndarray: ...

    def prefetch_shard(self, shard: int, key: str) -> None: ...

    def spec(self) -> dict[str, Any]:
        """JSON-safe ``{"factory": "module:callable", "args": {...}}`` that rebuilds it."""
        ...


class _Chooser:
    """Hands each fetch thread the next shard to fetch: the first in order of next use that is
    neither cached nor being fetched, within the window ahead of the consumer."""

    def __init__(self, source: PrefetchSource, cache: NodeCache, window: int) -> None:
        self.lock = threading.Lock()
        self.source = source
        self.cache = cache
        self.sizes = source.shard_nbytes()
        self.plan: str | None = None
        self.window = window
        self.limit = max(window, cache.capacity // 2)
        self.inflight: set[str] = set()
        # Keys another process was fetching when we tried: theirs (a reader fetches what
        # they fail to).
        self.elsewhere: set[str] = set()

    def take(self, item: Any) -> None:
        with self.lock:
            if isinstance(item, str):
                self.plan = item
                self.elsewhere.clear()
            else:
                self.source = item
                self.sizes = item.shard_nbytes()

    def pick(self) -> tuple[PrefetchSource, int, str] | None:
        with self.lock:
            got = self.cache.load_plan(self.plan) if self.plan else None
            if got is None or got[1] >= len(got[0]):
                return None
            plan, position = got
            ahead = 0
            for n, shard in enumerate(plan.upcoming(position, len(plan) - position)):
                ahead += int(self.sizes[shard]) if shard < len(self.sizes) else 0
                if ahead > self.window and n > 0:
                    return None
                key = plan.keys[shard]
                if key in self.inflight or key in self.elsewhere or key in self.cache:
                    continue
                if n == 0 and self.window < self.limit:
                    # The consumer is at a shard that is not there yet: look further ahead.
                    self.window = min(self.limit, self.window * 2)
                self.inflight.add(key)
                return self.source, shard, key
        return None

    def done(self, key: str) -> None:
        with self.lock:
            self.inflight.discard(key)
            if key not in self.cache:
                self.elsewhere.add(key)


def _fetch_loop(chooser: _Chooser, stop: threading.Event) -> None:
    while not stop.is_set():
        got = chooser.pick()
        if got is None:
            time.sleep(_IDLE)
            continue
        source, shard, key = got
        try:
            source.prefetch_shard(shard, key)
        except Exception as exc:  # the readers fetch what we could not; say why once
            warnings.warn(f"prefetch of shard {shard} failed: {exc}", RuntimeWarning, stacklevel=1)
        finally:
            chooser.done(key)


def _build(spec: dict[str, Any]) -> PrefetchSource:
    module, _, name = spec["factory"].partition(":")
    factory: Any = importlib.import_module(module)
    for part in name.split("."):
        factory = getattr(factory, part)
    source: PrefetchSource = factory(**spec["args"])
    return source


def main() -> int:
    """The prefetch process: the first line of stdin says what to read; later lines switch
    plans (``{"plan": ...}``) or sources (``{"source": ...}``); end of input ends it."""
    first = json.loads(sys.stdin.readline())
    source = _build(first["source"])
    prepare = getattr(source, "prepare", None)
    if prepare is not None:
        prepare()  # open the source (imports its library) before saying ready
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    cache = source.cache
    assert cache is not None
    chooser = _Chooser(source, cache, int(first["window"]))
    halt = threading.Event()

    def listen() -> None:
        for line in sys.stdin:
            msg = json.loads(line)
            if msg.get("stop"):
                break  # forked processes (DataLoader workers) may hold stdin open: no EOF
            chooser.take(msg["plan"] if "plan" in msg else _build(msg["source"]))
        halt.set()

    threading.Thread(target=listen, daemon=True).start()
    # Several fetches in flight: while one waits for the source (h5py holds its lock then),
    # another writes its shard into the cache.
    pool = [
        threading.Thread(target=_fetch_loop, args=(chooser, halt), daemon=True)
        for _ in range(int(first["threads"]))
    ]
    for t in pool:
        t.start()
    parent = int(first["parent"])
    while not halt.wait(_IDLE * 5):
        if os.getppid() != parent:
            halt.set()
        cache.flush_stats()
    for t in pool:
        t.join(30)
    cache.close()
    return 0


class Prefetcher:
    """Processes that keep the next shards of the current plan in the cache."""

    def __init__(
        self, source: PrefetchSource, window: int, threads: int = 2, processes: int = 1
    ) -> None:
        self._owner = os.getpid()
        self._procs: list[subprocess.Popen[str]] = []
        self._ready: set[int] = set()
        first = {
            "source": source.spec(),
            "window": int(window),
            "threads": int(threads),
            "parent": os.getpid(),
        }
        for _ in range(max(1, int(processes))):
            proc = subprocess.Popen(
                [
                    sys.executable,
                    "-c",
                    "import sys; from dataplane.cache.prefetch import main; sys.exit(main())",
                ],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )
            self._procs.append(proc)
        # Lines go out from a thread: a many-file source's spec is larger than a pipe holds
        # (214 KB for 400 files), and writing it blocked the training loop until the process
        # had started and read it (0.15 s of a new job's first epoch).
        self._outbox: queue.SimpleQueue[str | None] = queue.SimpleQueue()
        self._writer = threading.Thread(target=self._write_lines, daemon=True)
        self._writer.start()
        self._send(first)

    def _write_lines(self) -> None:
        while (line := self._outbox.get()) is not None:
            for proc in self._procs:
                assert proc.stdin is not None
                try:
                    proc.stdin.write(line)
                    proc.stdin.flush()
                except (BrokenPipeError, OSError, ValueError):  # ValueError: closed already
                    pass  # it died: readers fetch for themselves, the next epoch starts another

    def _send(self, msg: dict[str, Any]) -> None:
        self._outbox.put(json.dumps(msg) + "\n")

    def wait_ready(self, timeout: float) -> bool:
        """Wait until every process has opened its source; False if one did not in time."""
        deadline = time.monotonic() + max(0.0, timeout)
        for proc in self._procs:
            if proc.pid in self._ready:
                continue
            assert proc.stdout is not None
            # poll(), not select(): select fails on descriptors past 1023 (a process with
            # many open files, as a training job is).
            poller = select.poll()
            poller.register(proc.stdout, select.POLLIN)
            if not poller.poll(max(0.0, deadline - time.monotonic()) * 1000):
                return False
            if proc.stdout.readline().strip() != "ready":
                return False
            self._ready.add(proc.pid)
        return True

    @property
    def alive(self) -> bool:
        """Whether every process runs."""
        return all(proc.poll() is None for proc in self._procs)

    @property
    def pid(self) -> int:
        return self._procs[0].pid

    @property
    def pids(self) -> list[int]:
        return [proc.pid for proc in self._procs]

    def follow(self, plan: str) -> None:
        """Prefetch for ``plan`` from now on."""
        self._send({"plan": plan})

    def update(self, source: PrefetchSource) -> None:
        """Read from this source from now on (a newer snapshot of growing data)."""
        self._send({"source": source.spec()})

    def close(self) -> None:
        if os.getpid() != self._owner:
            return  # a forked copy (a DataLoader worker): the processes are its parent's
        self._send({"stop": True})
        self._outbox.put(None)
        self._writer.join(10)
        if self._writer.is_alive():  # a process that reads nothing: its pipe is full
            for proc in self._procs:
                proc.kill()
            self._writer.join()
        for proc in self._procs:
            if proc.stdin is not None:
                with contextlib.suppress(OSError):
                    proc.stdin.close()
        for proc in self._procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
