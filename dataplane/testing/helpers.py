"""Helpers of the conformance suite: exact arrays, damaged files, consumers in threads and
writers and readers in real processes."""

from __future__ import annotations

import json
import multiprocessing
import os
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Sequence
from typing import Any

import numpy as np

import dataplane as dp
from dataplane import _testprocs
from dataplane.model import as_array


def sample_array(dtype: Any, shape: tuple[int, ...] = (3, 5), seed: int = 0) -> np.ndarray:
    """An array of ``dtype`` that includes the awkward values: extremes, NaN (with a payload),
    infinities and negative zero for floats."""
    dt = np.dtype(dtype)
    rng = np.random.default_rng(seed)
    n = int(np.prod(shape))
    if dt.kind == "b":
        flat = rng.integers(0, 2, n).astype(bool)
    elif dt.kind in "iu":
        info = np.iinfo(dt)
        flat = rng.integers(info.min, info.max, n, dtype=dt, endpoint=True)
        flat[: min(n, 2)] = [info.min, info.max][: min(n, 2)]
    elif dt.kind == "f":
        flat = rng.standard_normal(n).astype(dt)
        special = np.array([np.nan, np.inf, -np.inf, -0.0], dtype=dt)[:n]
        flat[: len(special)] = special
        if n > 4:  # a NaN with a non-default payload must survive bit for bit
            bits = flat.view(f"u{dt.itemsize}")
            bits[4] = bits[0] | 1
    else:  # complex
        flat = (rng.standard_normal(n) + 1j * rng.standard_normal(n)).astype(dt)
        flat[: min(n, 2)] = [complex(np.nan, -0.0), complex(np.inf, -np.inf)][: min(n, 2)]
    return flat.reshape(shape)


def assert_same_array(got: np.ndarray, want: Any) -> None:
    """Same dtype, shape and bytes (so NaN payloads and -0.0 count)."""
    want = np.asarray(want)
    assert isinstance(got, np.ndarray), f"got {type(got).__name__}, not an ndarray"
    assert got.dtype == want.dtype, f"dtype {got.dtype} != {want.dtype}"
    assert got.shape == want.shape, f"shape {got.shape} != {want.shape}"
    assert got.tobytes(order="C") == want.tobytes(order="C"), f"values differ:\n{got}\n!=\n{want}"


def flip_bytes(path: str | os.PathLike[str], offsets: Sequence[int]) -> None:
    """Invert the byte at each of ``offsets`` in the file at ``path`` (a bit flip on disk)."""
    with open(path, "r+b") as f:
        for spot in offsets:
            f.seek(spot)
            byte = f.read(1)
            f.seek(spot)
            f.write(bytes([byte[0] ^ 0xFF]))


def truncate(path: str | os.PathLike[str], fraction: float) -> int:
    """Cut the file at ``path`` to ``fraction`` of its size; returns the new size."""
    size = int(os.path.getsize(path) * fraction)
    os.truncate(path, size)
    return size


def _index(step: dp.Step | None) -> int | None:
    return None if step is None else step.index


class RemotePublisher:
    """A publisher in a subprocess, for transports whose writer and readers cannot share a
    process (``same_process_pairs = False``). Mirrors what the suite uses of ``Publisher``."""

    def __init__(self, url: str, **kwargs: Any) -> None:
        ctx = multiprocessing.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(
            target=_testprocs.serve_publisher, args=(child, url, kwargs), daemon=True
        )
        self._proc.start()
        self.url = url
        self.closed = False
        self._call_reply()
        self.attrs = _RemoteAttrs(self)
        self._finalizer = weakref.finalize(self, _abandon_remote, self._conn, self._proc)

    def _call_reply(self) -> Any:
        if not self._conn.poll(30):
            self._proc.kill()
            raise AssertionError(f"the publisher process for {self.url} did not answer in 30s")
        status, *rest = self._conn.recv()
        if status == "ok":
            return rest[0]
        name, message = rest
        cls = getattr(dp, name, None) or getattr(__builtins__, name, None)
        if not (isinstance(cls, type) and issubclass(cls, BaseException)):
            cls = RuntimeError
        raise cls(message)

    def _call(self, *cmd: Any) -> Any:
        self._conn.send(cmd)
        return self._call_reply()

    def write(self, data: Any, attrs: Any = None) -> int:
        if isinstance(data, dict):
            # Tensors that require grad do not pickle; turning them into arrays here runs the
            # same conversion the publisher would (dataplane.model.as_array).
            data = {
                k: as_array(v, str(k)) if type(v).__module__.startswith("torch") else v
                for k, v in data.items()
            }
        return self._call("write", data, attrs)

    @property
    def next_index(self) -> int:
        return self._call("next_index")

    def close(self, failed: bool = False) -> None:
        if self.closed:
            return
        self.closed = True
        self._finalizer.detach()
        try:
            self._call("close", failed)
        finally:
            self._proc.join(60)

    def __enter__(self) -> RemotePublisher:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self.close(failed=exc_type is not None)


class _RemoteAttrs(dict):
    def __init__(self, pub: RemotePublisher) -> None:
        super().__init__()
        self._pub = pub

    def __setitem__(self, key: str, value: Any) -> None:
        self._pub._call("attr", key, value)
        super().__setitem__(key, value)


def _abandon_remote(conn: Any, proc: Any) -> None:
    conn.send(("abandon",))
    conn.poll(60)
    proc.join(60)


class _WriterThread(threading.Thread):
    """A publisher's life in a thread; what it raised is kept in ``errors``."""

    def __init__(self, open_pub: Any, body: Any) -> None:
        super().__init__(daemon=True)
        self._open_pub = open_pub
        self._body = body
        self.errors: list[BaseException] = []

    def run(self) -> None:
        try:
            with self._open_pub() as pub:
                self._body(pub)
        except BaseException as exc:  # the test inspects it
            self.errors.append(exc)


class Consumer(threading.Thread):
    """Drains a subscriber in a thread, copying every step, and records how the stream ended."""

    def __init__(self, sub: dp.Subscriber, *, delay: float = 0.0, limit: int | None = None):
        super().__init__(daemon=True)
        self.sub = sub
        self.delay = delay
        self.limit = limit
        self.steps: list[tuple[int, dict, dict[str, np.ndarray]]] = []
        self.outcome: str | BaseException | None = None

    def run(self) -> None:
        try:
            for step in self.sub:
                self.steps.append(
                    (step.index, dict(step.attrs), {n: np.array(step[n]) for n in step})
                )
                if self.delay:
                    time.sleep(self.delay)
                if self.limit is not None and len(self.steps) >= self.limit:
                    self.outcome = "limit"
                    return
            self.outcome = "closed"
        except BaseException as exc:  # the test inspects it
            self.outcome = exc

    def finish(self, timeout: float) -> Consumer:
        self.join(timeout)
        assert not self.is_alive(), f"subscriber of {self.sub.url} still waiting after {timeout}s"
        return self

    @property
    def indices(self) -> list[int]:
        return [i for i, _, _ in self.steps]


def _read_only(a: np.ndarray) -> np.ndarray:
    """As a subscriber's zero-copy view arrives: memory the writer may not change."""
    a.flags.writeable = False
    return a


def run_proc(*args: str, **kw: Any) -> subprocess.Popen[str]:
    """Start ``python -m dataplane._testprocs ARGS`` with line-buffered JSON on stdout."""
    return subprocess.Popen(
        [sys.executable, "-m", "dataplane._testprocs", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kw,
    )


def read_events(proc: subprocess.Popen[str], timeout: float) -> list[dict]:
    """Every JSON line a test program printed, once it exits (killed after ``timeout``)."""
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        raise AssertionError(
            f"{proc.args!r} did not finish in {timeout}s; stderr:\n{err}"
        ) from None
    events = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    if proc.returncode not in (0, -9):
        raise AssertionError(f"{proc.args!r} exited with {proc.returncode}; stderr:\n{err}")
    return events


def wait_for_event(proc: subprocess.Popen[str], key: str, timeout: float) -> list[dict]:
    """Read a program's JSON lines until one has ``key``; returns the lines so far."""
    events: list[dict] = []
    result: dict[str, Any] = {}

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.startswith("{"):
                events.append(json.loads(line))
                if key in events[-1]:
                    result["hit"] = True
                    return

    t = threading.Thread(target=pump, daemon=True)
    t.start()
    t.join(timeout)
    if "hit" not in result:
        proc.kill()
        raise AssertionError(f"{proc.args!r} printed no {key!r} within {timeout}s: {events}")
    return events


_DATAPLANE_ERRORS = {
    name
    for name in dir(dp)
    if isinstance(getattr(dp, name), type) and issubclass(getattr(dp, name), dp.DataplaneError)
}


def _expected(n: int, size: int) -> dict[int, dict[str, str]]:
    return {
        i: {
            k: _testprocs.digest(np.asarray(v))
            for k, v in sorted(_testprocs.make_step(i, size).items())
        }
        for i in range(n)
    }
