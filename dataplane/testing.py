"""The conformance suite every transport passes.

A transport's test file is a few lines::

    from dataplane.testing import conformance

    class TestShm(conformance("shm")):
        def make_url(self, tmp_path, name):
            return f"shm://{name}?dir={tmp_path}"

``conformance(scheme)`` assembles the suite from the transport's declared capabilities:
:class:`TransportTests` for every transport, :class:`CrossProcessTests` when its scope reaches
beyond one process, :class:`DropPolicyTests` when it supports ``policy="drop-oldest"`` (and
:class:`CrossProcessDropTests` when both). So a
capability a transport does not declare is not tested, rather than skipped.

Override ``make_url`` (a fresh channel per test), ``writer_options`` and ``reader_options``
where a transport needs them.
"""

from __future__ import annotations

import gc
import json
import multiprocessing
import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar

import numpy as np
import pytest

import dataplane as dp
from dataplane import _testprocs
from dataplane.model import DTYPES, as_array
from dataplane.registry import get_transport, resolve
from dataplane.transports.base import Transport

__all__ = [
    "Consumer",
    "CrossProcessDropTests",
    "CrossProcessTests",
    "DropPolicyTests",
    "FileCrashTests",
    "FileTransportTests",
    "TransportTests",
    "assert_same_array",
    "conformance",
    "flip_bytes",
    "sample_array",
    "truncate",
]


# -- helpers ---------------------------------------------------------------------------------
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


# -- the suite -------------------------------------------------------------------------------
def _read_only(a: np.ndarray) -> np.ndarray:
    """As a subscriber's zero-copy view arrives: memory the writer may not change."""
    a.flags.writeable = False
    return a


class TransportTests:
    """What every transport must do. Subclasses set ``scheme`` (``conformance()`` does)."""

    scheme: ClassVar[str] = ""
    #: Upper bound of every wait in these tests, seconds.
    timeout: ClassVar[float] = 20.0

    # hooks ----------------------------------------------------------------------------------
    def make_url(self, tmp_path: Any, name: str) -> str:
        return f"{self.scheme}://{name}"

    def writer_options(self, subscribers: int) -> dict[str, Any]:
        """Options for ``publish`` when ``subscribers`` will attach (e.g. a rendezvous)."""
        return {}

    def reader_options(self) -> dict[str, Any]:
        return {}

    @pytest.fixture
    def url(self, tmp_path: Any) -> str:
        return self.make_url(tmp_path, "c" + uuid.uuid4().hex[:12])

    @property
    def transport(self) -> type[Transport]:
        return get_transport(self.scheme)

    # building blocks ------------------------------------------------------------------------
    def subscribe(self, url: str, **kw: Any) -> dp.Subscriber:
        kw.setdefault("timeout", self.timeout)
        return dp.subscribe(url, **self.reader_options(), **kw)

    def publish(self, url: str, subscribers: int = 1, **kw: Any) -> Any:
        options = {**self.writer_options(subscribers), **kw}
        if not getattr(self.transport, "same_process_pairs", True):
            return RemotePublisher(url, **options)
        return dp.publish(url, **options)

    def roundtrip(
        self,
        url: str,
        steps: Sequence[tuple[Mapping[str, Any], Mapping[str, Any] | None]],
        *,
        subscribers: int = 1,
        channel_attrs: dict[str, Any] | None = None,
        sub_kwargs: dict[str, Any] | None = None,
        **pub_kwargs: Any,
    ) -> list[Consumer]:
        """Publish ``steps`` with ``subscribers`` live consumers; return the consumers."""
        consumers = [
            Consumer(self.subscribe(url, **(sub_kwargs or {}))) for _ in range(subscribers)
        ]
        for c in consumers:
            c.start()
        try:
            with self.publish(url, subscribers, **pub_kwargs) as pub:
                for key, value in (channel_attrs or {}).items():
                    pub.attrs[key] = value
                for data, attrs in steps:
                    pub.write(data, attrs)
            for c in consumers:
                c.finish(self.timeout)
        finally:
            for c in consumers:
                c.sub.close()
        return consumers

    def roundtrip_one(self, url: str, data: dict[str, Any], attrs: dict | None = None) -> dict:
        (c,) = self.roundtrip(url, [(data, attrs)])
        assert c.outcome == "closed", c.outcome
        assert c.indices == [0]
        return c.steps[0][2]

    # exact arrays ---------------------------------------------------------------------------
    @pytest.mark.parametrize("dtype", DTYPES, ids=[d.name for d in DTYPES])
    def test_every_dtype_round_trips_bit_exact(self, url: str, dtype: np.dtype) -> None:
        want = sample_array(dtype, (4, 6))
        got = self.roundtrip_one(url, {"x": want})
        assert_same_array(got["x"], want)

    SHAPES: ClassVar[dict[str, Any]] = {
        "0d": lambda: np.float64(3.25),
        "0d-array": lambda: np.array(7, dtype=np.int16),
        "empty": lambda: np.zeros(0, dtype=np.float32),
        "empty-2d": lambda: np.zeros((0, 5), dtype=np.int64),
        "empty-middle": lambda: np.zeros((3, 0, 2), dtype=np.uint8),
        "1d": lambda: np.arange(17, dtype=np.float64),
        "3d": lambda: sample_array(np.float32, (3, 4, 5)),
        "fortran": lambda: np.asfortranarray(sample_array(np.float64, (5, 7))),
        "every-other-row": lambda: sample_array(np.int32, (9, 4))[::2],
        "transposed": lambda: sample_array(np.float64, (4, 6)).T,
        "reversed": lambda: np.arange(10, dtype=np.int64)[::-1],
        "column": lambda: sample_array(np.complex128, (5, 3))[:, 1],
        "fortran-3d-slice": lambda: np.asfortranarray(sample_array(np.float32, (6, 5, 4)))[
            1::2, :, ::3
        ],
        "big-endian": lambda: np.arange(6, dtype=">f8").reshape(2, 3),
        "2MiB": lambda: np.random.default_rng(1).standard_normal(2**18),
        "read-only-int": lambda: _read_only(np.arange(12, dtype=np.int32).reshape(3, 4)),
        "read-only-buffer": lambda: np.frombuffer(bytes(range(16)), dtype=np.uint16),
        "read-only-0d": lambda: _read_only(np.array(5, dtype=np.int64)),
    }

    @pytest.mark.parametrize("shape", sorted(SHAPES))
    def test_shapes_and_layouts_round_trip(self, url: str, shape: str) -> None:
        value = self.SHAPES[shape]()
        arr = np.asarray(value)
        want = np.array(arr, dtype=arr.dtype.newbyteorder("="), order="C")
        got = self.roundtrip_one(url, {"x": value})
        assert_same_array(got["x"], want)

    def test_python_numbers_and_torch_tensors_are_accepted(self, url: str) -> None:
        data: dict[str, Any] = {"i": 3, "f": 2.5, "b": True, "l": [1.0, 2.0]}
        torch = pytest.importorskip("torch")
        t = torch.arange(12, dtype=torch.float32).reshape(3, 4).requires_grad_(True)
        data["t"] = t.T  # a strided view with grad: detached and copied exactly
        got = self.roundtrip_one(url, data)
        assert_same_array(got["i"], np.asarray(3))
        assert_same_array(got["f"], np.asarray(2.5))
        assert_same_array(got["b"], np.asarray(True))
        assert_same_array(got["l"], np.asarray([1.0, 2.0]))
        assert_same_array(got["t"], t.detach().numpy().T)

    # steps, order, attributes -----------------------------------------------------------------
    def test_steps_arrive_in_order_each_once(self, url: str) -> None:
        steps = [
            ({"u": np.full(100, i, np.float64), "n": np.int64(i)}, {"i": i}) for i in range(25)
        ]
        (c,) = self.roundtrip(url, steps, queue_limit=3)
        assert c.outcome == "closed"
        assert c.indices == list(range(25))
        for i, attrs, arrays in c.steps:
            assert attrs == {"i": i}
            assert_same_array(arrays["u"], np.full(100, i, np.float64))
            assert_same_array(arrays["n"], np.int64(i))
        assert c.sub.stats.steps == 25 and c.sub.stats.dropped == 0

    def test_step_and_channel_attributes_round_trip(self, url: str) -> None:
        attrs = {
            "time": 1.5,
            "iteration": 42,
            "big": 2**62,
            "name": "gray-scott",
            "flag": False,
            "floats": [0.5, 1.5],
            "ints": [1, 2, 3],
            "words": ["a", "b"],
            "np_scalar": np.float32(0.25),
            "np_array": np.array([1, 2], dtype=np.int16),
            "empty": [],
        }
        want = {**attrs, "np_scalar": 0.25, "np_array": [1, 2]}
        sub = self.subscribe(url)
        consumer = Consumer(sub, limit=2)
        consumer.start()
        with self.publish(url) as pub:
            pub.attrs["units"] = "m/s"
            pub.attrs["dims"] = ["x", "y"]
            pub.write({"x": np.zeros(3)}, attrs=attrs)
            pub.write({"x": np.ones(3)})
            consumer.finish(self.timeout)
            assert sub.attrs == {"units": "m/s", "dims": ["x", "y"]}
            sub.close()  # a subscriber that stops reading leaves before the writer closes
        assert consumer.outcome == "limit"
        assert consumer.steps[0][1] == want
        assert consumer.steps[1][1] == {}

    def test_every_subscriber_gets_every_step(self, url: str) -> None:
        steps = [({"u": np.arange(10) + i}, None) for i in range(12)]
        consumers = self.roundtrip(url, steps, subscribers=3, queue_limit=2)
        for c in consumers:
            assert c.outcome == "closed"
            assert c.indices == list(range(12))
            for i, _, arrays in c.steps:
                assert_same_array(arrays["u"], np.arange(10) + i)

    def writer_thread(self, url: str, body: Any, **kw: Any) -> _WriterThread:
        """Run ``body(pub)`` on a publisher in a thread (it may wait for subscribers to attach)."""
        t = _WriterThread(lambda: self.publish(url, **kw), body)
        t.start()
        return t

    def test_end_of_stream_ends_iteration(self, url: str) -> None:
        sub = self.subscribe(url)

        def body(pub: Any) -> None:
            for _ in range(3):
                pub.write({"x": np.zeros(2)})

        t = self.writer_thread(url, body)
        assert [step.index for step in sub] == [0, 1, 2]
        t.join(self.timeout)
        assert not t.errors
        assert sub.ended
        assert sub.next() is None  # stays ended
        assert list(sub) == []
        sub.close()

    def test_stats_count_steps_and_bytes(self, url: str) -> None:
        steps = [({"a": np.zeros(10, np.float32), "b": np.zeros((2, 3), np.int64)}, None)] * 4
        (c,) = self.roundtrip(url, steps)
        stats = c.sub.stats
        assert (stats.steps, stats.dropped, stats.bytes) == (4, 0, 4 * (40 + 48))
        assert stats.as_dict() == {"steps": 4, "dropped": 0, "bytes": 4 * 88}

    # reading parts ------------------------------------------------------------------------------
    def test_hyperslab_and_variable_selection(self, url: str) -> None:
        u = sample_array(np.float64, (6, 8))
        sub = self.subscribe(url, vars=["u"])
        got: dict[str, Any] = {}

        def consume() -> None:
            step = next(sub)
            got["keys"] = step.keys()
            got["part"] = np.array(step.read("u", start=(1, 2), count=(3, 4)))
            got["tail"] = np.array(step.read("u", start=(4, 6)))
            got["row"] = np.array(step.read("u", count=(1, 8)))
            try:
                step.read("u", start=(5, 0), count=(2, 8))
            except dp.SchemaError as exc:
                got["oob"] = str(exc)
            try:
                step["v"]
            except KeyError as exc:
                got["missing"] = exc
            torch = pytest.importorskip("torch")
            got["torch"] = step.torch("u", start=(0, 0), count=(2, 2))
            assert isinstance(got["torch"], torch.Tensor)

        t = threading.Thread(target=consume, daemon=True)
        t.start()
        with self.publish(url) as pub:
            pub.write({"u": u, "v": np.zeros(3)})
            t.join(self.timeout)
        sub.close()
        assert got["keys"] == ["u"]
        assert_same_array(got["part"], u[1:4, 2:6])
        assert_same_array(got["tail"], u[4:, 6:])
        assert_same_array(got["row"], u[:1])
        assert "outside variable 'u'" in got["oob"]
        assert isinstance(got["missing"], dp.VariableNotFoundError)
        assert "available: u" in str(got["missing"])
        np.testing.assert_array_equal(got["torch"].numpy(), u[:2, :2])

    def test_step_is_invalid_after_the_subscriber_advances(self, url: str) -> None:
        sub = self.subscribe(url)
        seen: dict[str, Any] = {}

        def consume() -> None:
            first = next(sub)
            seen["first"] = np.array(first["x"])
            second = next(sub)
            seen["second"] = np.array(second["x"])
            try:
                first["x"]
            except dp.DataplaneError as exc:
                seen["error"] = str(exc)

        t = threading.Thread(target=consume, daemon=True)
        t.start()
        with self.publish(url) as pub:
            pub.write({"x": np.zeros(4)})
            pub.write({"x": np.ones(4)})
            t.join(self.timeout)
        sub.close()
        assert_same_array(seen["second"], np.ones(4))
        assert "released" in seen["error"]

    # waiting ----------------------------------------------------------------------------------
    def test_timeout_raises_and_the_channel_stays_usable(self, url: str) -> None:
        sub = self.subscribe(url)
        go = threading.Event()

        def body(pub: Any) -> None:
            pub.write({"x": np.zeros(1)})
            go.wait(self.timeout)
            pub.write({"x": np.ones(1)})

        t = self.writer_thread(url, body)
        assert _index(sub.next(timeout=self.timeout)) == 0
        t0 = time.monotonic()
        with pytest.raises(dp.StepTimeoutError, match="within 0.3s"):
            sub.next(timeout=0.3)
        assert time.monotonic() - t0 < self.timeout
        assert sub.poll(0.05) is None
        go.set()
        assert _index(sub.next(timeout=self.timeout)) == 1
        assert sub.next(timeout=self.timeout) is None
        t.join(self.timeout)
        assert not t.errors
        sub.close()

    def test_timeout_without_any_writer(self, url: str) -> None:
        with self.subscribe(url, timeout=0.3) as sub:
            with pytest.raises(dp.StepTimeoutError):
                next(sub)

    # failures -----------------------------------------------------------------------------------
    def test_writer_exception_breaks_the_channel_after_completed_steps(self, url: str) -> None:
        c = Consumer(self.subscribe(url))
        c.start()
        with pytest.raises(RuntimeError, match="simulation blew up"):
            with self.publish(url) as pub:
                pub.write({"x": np.zeros(2)})
                pub.write({"x": np.ones(2)})
                raise RuntimeError("simulation blew up")
        c.finish(self.timeout)
        c.sub.close()
        assert c.indices == [0, 1]
        assert isinstance(c.outcome, dp.ChannelBroken), c.outcome

    def test_a_step_that_fails_midway_is_dropped_whole_and_burns_no_index(self, url: str) -> None:
        """A write that fails after the step began (an I/O error, a signal) leaves no part of
        that step visible, and the next write takes the same index: no gap in the sequence."""
        c = Consumer(self.subscribe(url))
        c.start()
        with self.publish(url) as pub:
            pub.write({"x": np.zeros(3), "y": np.zeros(2)})
            writer = pub._writer
            real_put, puts = writer.put, []

            def put_then_fail(name: str, arr: np.ndarray) -> None:
                puts.append(name)
                if len(puts) == 2:
                    raise OSError(28, "No space left on device (injected)")
                real_put(name, arr)

            writer.put = put_then_fail
            with pytest.raises(dp.StorageFullError, match="while writing step 1; step 0 is"):
                pub.write({"x": np.full(3, 7.0), "y": np.full(2, 7.0)})
            writer.put = real_put
            assert puts == ["x", "y"] and pub.next_index == 1
            pub.write({"x": np.ones(3), "y": np.ones(2)})
        c.finish(self.timeout)
        c.sub.close()
        assert c.outcome == "closed"
        assert c.indices == [0, 1]
        assert_same_array(c.steps[1][2]["x"], np.ones(3))
        assert_same_array(c.steps[1][2]["y"], np.ones(2))

    def test_abandoned_publisher_breaks_the_channel(self, url: str) -> None:
        c = Consumer(self.subscribe(url))
        c.start()
        pub = self.publish(url)
        pub.write({"x": np.zeros(2)})
        del pub
        gc.collect()
        c.finish(self.timeout)
        c.sub.close()
        assert c.indices == [0]
        assert isinstance(c.outcome, dp.ChannelBroken), c.outcome

    def test_bad_step_is_refused_whole(self, url: str) -> None:
        c = Consumer(self.subscribe(url))
        c.start()
        with self.publish(url) as pub:
            with pytest.raises(dp.SchemaError, match="object"):
                pub.write({"a": np.zeros(3), "b": np.array([None, 1], dtype=object)})
            assert pub.write({"a": np.ones(3), "b": np.zeros(2)}) == 0
        c.finish(self.timeout)
        c.sub.close()
        assert c.indices == [0]
        assert sorted(c.steps[0][2]) == ["a", "b"]
        assert_same_array(c.steps[0][2]["a"], np.ones(3))

    def test_dtype_change_is_refused(self, url: str) -> None:
        with self.publish(url, subscribers=0) as pub:
            pub.write({"u": np.zeros(3, np.float64)})
            with pytest.raises(dp.SchemaError, match=r"float64 in step 0 but float32 in step 1"):
                pub.write({"u": np.zeros(3, np.float32)})
            pub.write({"u": np.ones(3, np.float64)})

    def test_changing_variables_and_shapes(self, url: str) -> None:
        """Transports declare whether a step may change the layout; either way nothing is lost."""
        steps = [
            {"a": np.arange(3.0)},
            {"a": np.arange(5.0), "b": np.int8(7)},
            {"b": np.int8(8)},
        ]
        sub = self.subscribe(url)
        c = Consumer(sub)
        c.start()
        with self.publish(url) as pub:
            pub.write(steps[0])
            if getattr(self.transport, "supports_changing_layout", True):
                pub.write(steps[1])
                pub.write(steps[2])
                want = steps
            else:
                for bad in steps[1:]:
                    with pytest.raises(dp.SchemaError, match="same variables and shapes"):
                        pub.write(bad)
                pub.write({"a": np.arange(3.0) + 1})
                want = [steps[0], {"a": np.arange(3.0) + 1}]
        c.finish(self.timeout)
        sub.close()
        assert c.outcome == "closed" and c.indices == list(range(len(want)))
        for (_, _, got), expected in zip(c.steps, want):
            assert sorted(got) == sorted(expected)
            for name, value in expected.items():
                assert_same_array(got[name], np.asarray(value))

    @pytest.mark.parametrize(
        "value",
        [
            np.array([None, 1], dtype=object),
            np.array(["a", "b"]),
            np.array([b"x"]),
            np.zeros(2, dtype=[("a", "f4")]),
            np.array(["2020-01-01"], dtype="datetime64[D]"),
            "a string",
            {"a": 1},
            np.ma.masked_array([1.0, 2.0], mask=[False, True]),
            np.ma.masked_array([1.0, 2.0]),
        ],
        ids=[
            "object",
            "unicode",
            "bytes",
            "structured",
            "datetime",
            "str",
            "dict",
            "masked",
            "masked-none",
        ],  # fmt: skip
    )
    def test_non_numeric_data_is_refused(self, url: str, value: Any) -> None:
        """Nothing that a transport would store as something else: objects (pickling),
        strings, records, dates, and masked arrays (no transport keeps the mask)."""
        with self.publish(url, subscribers=0) as pub:
            with pytest.raises(dp.SchemaError):
                pub.write({"x": value})

    @pytest.mark.parametrize(
        "name",
        [
            "",
            "../x",
            "a/b",
            ".hidden",
            "-x",
            "x" * 200,
            "a b",
            "é",
            "__dpx",
            "a\0b",
            3,
            None,
            "__dataplane",
            "__x",
            "zarr.json",
            "u.JSON",
        ],  # fmt: skip
    )
    def test_unsafe_variable_names_are_refused(self, url: str, name: Any) -> None:
        """One rule for every transport, so a name one accepts all others can store."""
        with self.publish(url, subscribers=0) as pub:
            with pytest.raises(dp.SchemaError, match="name"):
                pub.write({name: np.zeros(1)})
            with pytest.raises(dp.SchemaError, match="name"):
                pub.write({"x": np.zeros(1)}, attrs={name: 1})

    def test_duplicate_names_are_refused(self, url: str) -> None:
        with self.publish(url, subscribers=0) as pub:
            with pytest.raises(dp.SchemaError, match="twice"):
                pub.write([("u", np.zeros(2)), ("u", np.ones(2))])

    @pytest.mark.parametrize(
        "value",
        [{"a": 1}, None, [[1, 2]], [1, "a"], object(), 2**70, b"bytes"],
        ids=["dict", "none", "nested", "mixed", "object", "huge-int", "bytes"],
    )
    def test_bad_attribute_values_are_refused(self, url: str, value: Any) -> None:
        with self.publish(url, subscribers=0) as pub:
            with pytest.raises(dp.SchemaError, match="attribute"):
                pub.write({"x": np.zeros(1)}, attrs={"a": value})
            with pytest.raises(dp.SchemaError, match="attribute"):
                pub.attrs["a"] = value

    def test_bad_arguments_are_refused(self, url: str) -> None:
        with pytest.raises(dp.OptionError, match="policy"):
            dp.publish(url, policy="sometimes")
        with pytest.raises(dp.OptionError, match="queue_limit"):
            dp.publish(url, queue_limit=0)
        with pytest.raises(dp.OptionError, match="queue_limit"):
            dp.publish(url, queue_limit=10**9)
        with pytest.raises(dp.OptionError, match="start"):
            dp.subscribe(url, start="middle")
        with pytest.raises(dp.OptionError, match="timeout"):
            dp.subscribe(url, timeout=-1)
        with pytest.raises(TypeError, match="no_such_option"):
            dp.publish(url, no_such_option=1)
        sep = "&" if "?" in url else "?"
        with pytest.raises(dp.UnknownOptionError, match="bogus"):
            dp.subscribe(f"{url}{sep}bogus=1")
        with pytest.raises(dp.OptionError, match="mode"):
            dp.publish(url, mode="x")

    def test_unknown_scheme_lists_the_known_ones(self) -> None:
        with pytest.raises(dp.UnknownSchemeError) as info:
            dp.publish("nosuch://x")
        assert f"{self.scheme}://" in str(info.value)
        assert isinstance(info.value, ValueError)

    def test_one_writer_per_channel(self, url: str) -> None:
        with self.publish(url, subscribers=0):
            with pytest.raises(dp.ChannelBusyError, match="writer"):
                dp.publish(url)

    def test_transport_pickles_as_how_to_reopen(self, url: str) -> None:
        import pickle

        parsed, cls = resolve(url)
        t = cls.from_url(parsed, {})
        again = pickle.loads(pickle.dumps(t))
        assert type(again) is cls and again.url == t.url and again.options == t.options
        json.dumps(t.get_config())


class DropPolicyTests(TransportTests):
    """For streams that support ``policy="drop-oldest"``."""

    def test_drop_oldest_never_blocks_and_counts_drops(self, url: str) -> None:
        n = 60
        sub = self.subscribe(url)

        def body(pub: Any) -> None:
            for i in range(n):
                pub.write({"x": np.full(1000, i)})

        t = self.writer_thread(url, body, policy="drop-oldest", queue_limit=2)
        first = sub.next()  # attach (the writer waits for that), then stop reading
        t.join(self.timeout)
        assert not t.is_alive(), "drop-oldest writer blocked on a subscriber"
        assert not t.errors
        c = Consumer(sub)
        c.run()
        sub.close()
        assert first is not None
        got = [first.index] + c.indices
        assert c.outcome == "closed"
        assert got == sorted(set(got)) and got[-1] == n - 1
        assert 1 <= len(got) < n, got
        assert sub.stats.dropped == n - len(got), (sub.stats, got)
        for i, _, arrays in c.steps:
            assert_same_array(arrays["x"], np.full(1000, i))

    def test_block_policy_bounds_the_writer(self, url: str) -> None:
        written: list[int] = []
        n, limit = 24, 2
        sub = self.subscribe(url)

        def fill(pub: Any) -> None:
            for i in range(n):
                written.append(pub.write({"x": np.full(10, i)}))

        t = self.writer_thread(url, fill, queue_limit=limit)
        first = sub.next()  # attach, then stop reading for a while
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline and len(written) < n:
            time.sleep(0.01)
        # The subscriber holds one step; the writer may be queue_limit steps (plus what the
        # transport buffers in between) ahead, and then waits.
        bound = self.transport.steps_ahead(limit)
        assert len(written) <= 1 + bound < n, (written, bound)
        assert _index(first) == 0
        c = Consumer(sub)
        c.run()
        t.join(self.timeout)
        assert not t.errors
        sub.close()
        assert [0] + c.indices == list(range(n)) and sub.stats.dropped == 0

    def _late_join_without_replay(self, url: str) -> None:
        """A stream that keeps nothing for late subscribers: one that joins a running writer
        gets every step from some point on, without gaps, through the last."""
        stop = threading.Event()

        def body(pub: Any) -> None:
            i = 0
            while not stop.is_set() or i < 30:
                pub.write({"x": np.full(2, i)})
                i += 1
                time.sleep(0.02)

        t = self.writer_thread(url, body, subscribers=0)
        time.sleep(0.3)
        sub = self.subscribe(url)
        c = Consumer(sub)
        c.start()
        time.sleep(1.0)
        stop.set()
        t.join(self.timeout)
        c.finish(self.timeout)
        sub.close()
        assert not t.errors and c.outcome == "closed"
        assert len(c.indices) >= 5 and c.indices == list(range(c.indices[0], c.indices[-1] + 1))
        for i, _, arrays in c.steps:
            assert_same_array(arrays["x"], np.full(2, i))

    def test_late_subscribers_start_first_or_latest(self, url: str) -> None:
        if not self.transport.supports_replay:
            self._late_join_without_replay(url)
            return
        with self.publish(url, subscribers=0, queue_limit=4) as pub:
            for i in range(3):
                pub.write({"x": np.full(2, i)})
            first = self.subscribe(url, start="first")
            latest = self.subscribe(url, start="latest")
            c1, c2 = Consumer(first), Consumer(latest)
            c1.start()
            c2.start()
            for i in range(3, 5):
                pub.write({"x": np.full(2, i)})
        for c in (c1, c2):
            c.finish(self.timeout)
            c.sub.close()
        assert c1.indices == [0, 1, 2, 3, 4]
        assert c2.indices == [3, 4]
        assert c1.sub.stats.dropped == 0 and c2.sub.stats.dropped == 0


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


class CrossProcessTests(TransportTests):
    """For transports whose channels reach other processes: real subprocess writers/readers."""

    def expected_digests(self, n: int, size: int = 1000) -> dict[int, dict[str, str]]:
        return {
            i: {
                k: _testprocs.digest(np.asarray(v))
                for k, v in sorted(_testprocs.make_step(i, size).items())
            }
            for i in range(n)
        }

    def writer_args(self, subscribers: int) -> list[str]:
        """``writer_options`` as command-line options of ``_testprocs publish``."""
        return [f"--opt={k}={json.dumps(v)}" for k, v in self.writer_options(subscribers).items()]

    def test_subscriber_processes_each_get_every_step(self, url: str) -> None:
        n = 30
        opts = self.writer_args(3)
        readers = [run_proc("subscribe", url, "--timeout", "30") for _ in range(3)]
        writer = run_proc("publish", url, "--steps", str(n), "--queue-limit", "3", *opts)
        want = self.expected_digests(n)
        read_events(writer, 60)
        for proc in readers:
            events = read_events(proc, 60)
            steps = [e for e in events if "index" in e]
            assert [e["index"] for e in steps] == list(range(n))
            assert all(e["digests"] == want[e["index"]] for e in steps)
            assert events[-1]["end"] == "closed"

    def _end_writer_after_step_4(
        self, url: str, end: Any
    ) -> tuple[list[int], str | BaseException, float, int, str]:
        """Follow a writer process that writes steps 0-4 and stays open; once step 4 is in,
        ``end(writer)``. Returns the steps received, how the stream ended ("closed" or the
        exception), seconds from ``end`` to that, the writer's exit status and its stderr."""
        sub = self.subscribe(url, timeout=self.timeout)
        writer = run_proc("publish", url, "--steps", "5", "--hang", *self.writer_args(1))
        got: list[int] = []
        outcome: str | BaseException = "closed"
        t0 = time.monotonic()
        try:
            for step in sub:
                got.append(step.index)
                if step.index == 4:
                    wait_for_event(writer, "hanging", 30)
                    end(writer)
                    t0 = time.monotonic()
        except dp.DataplaneError as exc:
            outcome = exc
        finally:
            elapsed = time.monotonic() - t0
            sub.close()
            try:
                _, err = writer.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                writer.kill()
                _, err = writer.communicate()
        return got, outcome, elapsed, writer.returncode, err

    def test_writer_process_killed_gives_channel_broken(self, url: str) -> None:
        got, outcome, elapsed, _, _ = self._end_writer_after_step_4(url, lambda w: w.kill())
        assert got == [0, 1, 2, 3, 4]
        assert isinstance(outcome, dp.ChannelBroken), outcome
        assert re.search("died|gone", str(outcome)), outcome
        # Detected from liveness, well before the subscriber's own timeout.
        assert elapsed < self.timeout / 2

    def test_two_writers_racing_one_wins_whole(self, url: str, tmp_path: Any) -> None:
        """Two writer processes started at the same moment, three times: each time exactly one
        writes the channel, whole and alone; the other is told it is busy and writes nothing.
        The winner stays open until the loser has given up, however the two are scheduled."""
        opts = self.writer_args(1)
        for round_ in range(3):
            where = f"{url}-race{round_}" if "?" not in url else url
            flag = tmp_path / f"race{round_}.done"
            sub = self.subscribe(where)
            c = Consumer(sub)
            c.start()
            args = ("publish", where, "--steps", "8", "--size", "64", *opts)
            procs = {tag: run_proc(*args, "--tag", tag, "--close-after", str(flag)) for tag in "ab"}
            deadline = time.monotonic() + 90
            while all(p.poll() is None for p in procs.values()) and time.monotonic() < deadline:
                time.sleep(0.02)
            flag.touch()  # the first to finish was refused: the winner may close now
            outs = {}
            for tag, proc in procs.items():
                try:
                    out, err = proc.communicate(timeout=60)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    out, err = proc.communicate()
                outs[tag] = (proc.returncode, out, err)
            c.finish(self.timeout)
            sub.close()
            codes = sorted(rc for rc, _, _ in outs.values())
            assert codes == [0, 3], {t: (rc, err[-1500:]) for t, (rc, _, err) in outs.items()}
            winner = next(t for t, (rc, _, _) in outs.items() if rc == 0)
            loser_out = outs["b" if winner == "a" else "a"][1]
            assert '"busy"' in loser_out and "writer" in loser_out.lower()
            assert c.indices == list(range(8)) and c.outcome == "closed"
            assert {attrs["tag"] for _, attrs, _ in c.steps} == {winner}, "no interleaving"

    def test_subscribers_arriving_while_the_writer_sets_up_wait_for_its_steps(
        self, url: str
    ) -> None:
        """Until its first step is committed a channel is simply empty: a subscriber waiting
        before the writer starts (it looks again every few milliseconds while the writer sets
        up) and subscriber processes started with the writer get every step, then its end."""
        opts = self.writer_args(3)
        for round_ in range(3):
            where = f"{url}-setup{round_}" if "?" not in url else url
            early = Consumer(self.subscribe(where, timeout=60))
            early.start()
            writer = run_proc("publish", where, "--steps", "3", "--sleep", "0.05", *opts)
            others = [run_proc("subscribe", where, "--timeout", "60") for _ in range(2)]
            assert [e["wrote"] for e in read_events(writer, 90) if "wrote" in e] == [0, 1, 2]
            early.finish(60)
            early.sub.close()
            assert early.indices == [0, 1, 2] and early.outcome == "closed", early.outcome
            for proc in others:
                events = read_events(proc, 90)
                assert [e["index"] for e in events if "index" in e] == [0, 1, 2], events
                assert events[-1]["end"] == "closed", events

    def test_a_writer_process_that_closes_is_end_of_stream_every_time(self, url: str) -> None:
        """A writer process that writes its steps, closes and exits at once: its subscriber
        gets every step and then the end of the stream, never ChannelBroken (a lease read
        before the close and judged after the exit said "dead" in about half the runs)."""
        opts = self.writer_args(1)
        for round_ in range(6):
            where = f"{url}-close{round_}" if "?" not in url else url
            c = Consumer(self.subscribe(where, timeout=60))
            c.start()
            writer = run_proc("publish", where, "--steps", "3", *opts)
            read_events(writer, 60)
            c.finish(60)
            c.sub.close()
            assert c.indices == [0, 1, 2] and c.outcome == "closed", (round_, c.outcome)

    def test_sigterm_ends_the_stream_cleanly(self, url: str) -> None:
        """A scheduler's SIGTERM to the writer: every completed step, then end of stream (not
        ChannelBroken), and the writer exits with 143 as SIGTERM's default action would."""
        got, outcome, _, code, err = self._end_writer_after_step_4(
            url, lambda w: w.send_signal(signal.SIGTERM)
        )
        assert got == [0, 1, 2, 3, 4]
        assert outcome == "closed", outcome
        assert code == 143, (code, err[-2000:])

    @pytest.mark.parametrize("seed", range(3))
    def test_writer_killed_mid_step_leaves_no_partial_step(self, url: str, seed: int) -> None:
        opts = self.writer_args(1)
        kill_at = int(np.random.default_rng(seed).integers(0, 10))
        sub = self.subscribe(url)
        writer = run_proc("publish", url, "--steps", "10", "--kill-in-step", str(kill_at), *opts)
        want = self.expected_digests(10)
        c = Consumer(sub)
        c.start()
        c.finish(self.timeout)
        read_events(writer, 30)
        sub.close()
        assert c.indices == list(range(kill_at))
        for i, _, arrays in c.steps:
            assert {k: _testprocs.digest(v) for k, v in sorted(arrays.items())} == want[i]
        assert isinstance(c.outcome, dp.ChannelBroken | dp.StepTimeoutError), c.outcome
        if kill_at:  # a writer that never completed a step may look like one that never came
            assert isinstance(c.outcome, dp.ChannelBroken), c.outcome

    @pytest.mark.parametrize("seed", range(3))
    def test_writer_killed_at_a_seeded_moment_gives_the_committed_prefix(
        self, url: str, seed: int
    ) -> None:
        """SIGKILL at a random moment of a steady stream: a subscriber process gets steps
        0..k-1 exact, with every step the writer had completed among them, then ChannelBroken."""
        n = 400
        reader = run_proc("subscribe", url, "--timeout", str(self.timeout))
        writer = run_proc(
            "publish", url, "--steps", str(n), "--sleep", "0.005", *self.writer_args(1)
        )
        wait_for_event(writer, "wrote", self.timeout)
        time.sleep(float(np.random.default_rng(seed).uniform(0.0, 0.8)))
        writer.kill()
        wrote = [e["wrote"] for e in read_events(writer, 30) if "wrote" in e]
        events = read_events(reader, 2 * self.timeout)
        got = [e for e in events if "index" in e]
        want = self.expected_digests(n)
        assert [e["index"] for e in got] == list(range(len(got)))
        assert all(e["digests"] == want[e["index"]] for e in got)
        assert len(wrote) < n, "the writer finished before it was killed: make the run longer"
        assert len(got) >= len(wrote), (len(got), len(wrote))
        assert events[-1]["end"] == "broken", events[-1]

    def test_subscriber_killed_mid_stream_the_writer_carries_on(self, url: str) -> None:
        """One of two subscriber processes is SIGKILLed after 6 steps while the writer runs under
        policy="block" with a queue of 2: the writer still writes all 40 steps and the other
        subscriber gets every one of them (a dead reader's slots are released)."""
        n = 40
        survivor = run_proc("subscribe", url, "--timeout", str(self.timeout))
        victim = run_proc(
            "subscribe", url, "--sleep", "0.05", "--exit-after", "5", "--kill",
            "--timeout", str(self.timeout),
        )  # fmt: skip
        writer = run_proc(
            "publish", url, "--steps", str(n), "--queue-limit", "2", *self.writer_args(2)
        )
        wrote = [e["wrote"] for e in read_events(writer, 3 * self.timeout) if "wrote" in e]
        events = read_events(survivor, 3 * self.timeout)
        victim_got = [e["index"] for e in read_events(victim, 30) if "index" in e]
        assert victim.returncode == -signal.SIGKILL and victim_got == list(range(6))
        assert wrote == list(range(n))
        assert [e["index"] for e in events if "index" in e] == list(range(n))
        assert events[-1]["end"] == "closed"

    def test_reader_ten_times_slower_gets_every_step_and_the_writer_stays_bounded(
        self, url: str
    ) -> None:
        """policy="block", queue_limit=4, 1.5 MiB steps: a subscriber process 10x slower than
        the writer gets all N steps once, in order, exact; the writer (with any helper process
        it runs) does not grow with N: it waits instead of queueing."""
        n, size, mib = 48, 131072, 1 << 20
        reader = run_proc("subscribe", url, "--sleep", "0.05", "--timeout", str(self.timeout))
        writer = run_proc(
            "publish", url, "--steps", str(n), "--size", str(size), "--queue-limit", "4",
            "--sleep", "0.005", *self.writer_args(1),
        )  # fmt: skip
        wrote = [e for e in read_events(writer, 3 * self.timeout) if "wrote" in e]
        events = read_events(reader, 3 * self.timeout)
        got = [e for e in events if "index" in e]
        want = self.expected_digests(n, size)
        assert [e["index"] for e in got] == list(range(n))
        assert all(e["digests"] == want[e["index"]] for e in got)
        assert events[-1]["end"] == "closed"
        # After a warm-up (buffers, the queue filling: 13 steps for sst:// here), none. Queueing
        # every step instead would add another 1.5 MiB per step, 48 MiB.
        rss = [e["rss"] for e in wrote]
        growth = max(rss[16:]) - rss[16]
        assert growth < 12 * mib, f"writer grew {growth / mib:.1f} MiB over {n - 16} steps: {rss}"


class FileTransportTests(TransportTests):
    """For transports that store steps (``supports_random_access``): random access, append,
    interop with the plain library, crashes at random points, corrupted and truncated files.

    Subclasses implement the bypass hooks, which read with the plain library (h5py, zarr,
    adios2) so that a transport is checked against what is really on disk.
    """

    # bypass hooks -------------------------------------------------------------------------------
    def plain_read(self, url: str) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """Every variable with all its steps stacked on axis 0, and the channel attributes,
        read with the plain library."""
        raise NotImplementedError

    def data_files(self, url: str) -> list[str]:
        """The files holding the arrays (what the corruption tests damage)."""
        raise NotImplementedError

    def corruption_targets(self, url: str) -> list[tuple[str, int, int]]:
        """(file, offset, length) byte ranges that hold array data; a flip there must be caught
        by the checksum. Default: none known (only random flips are tested)."""
        return []

    # tests ----------------------------------------------------------------------------------------
    def _write(self, url: str, n: int, **kw: Any) -> list[dict[str, Any]]:
        steps = [_testprocs.make_step(i, 64) for i in range(n)]
        with self.publish(url, 0, **kw) as pub:
            pub.attrs["units"] = "m/s"
            pub.attrs["dims"] = ["x", "y"]
            for i, data in enumerate(steps):
                pub.write(data, attrs={"i": i, "time": i * 0.5})
        return steps

    def test_random_access(self, url: str) -> None:
        steps = self._write(url, 5)
        with dp.open(url) as arc:
            assert len(arc) == 5
            assert arc.vars == {
                "u": dp.VarSpec(np.dtype("float64"), (64,)),
                "k": dp.VarSpec(np.dtype("int32"), (16, 4)),
                "t": dp.VarSpec(np.dtype("float64"), ()),
            }
            assert arc.attrs == {"units": "m/s", "dims": ["x", "y"]}
            for i in (3, 0, 4, 1, 2, -1):
                want = steps[i]
                step = arc[i]
                assert step.index == (i % 5) and step.attrs == {"i": i % 5, "time": (i % 5) * 0.5}
                for name, value in want.items():
                    assert_same_array(step[name], np.asarray(value))
            assert_same_array(arc.read("k", 2, start=(1, 1), count=(3, 2)), steps[2]["k"][1:4, 1:3])
            with pytest.raises(dp.SchemaError, match="out of range"):
                arc[5]
            with pytest.raises(dp.VariableNotFoundError, match="available: k, t, u"):
                arc[0]["nope"]

    def test_plain_library_reads_what_dataplane_wrote(self, url: str) -> None:
        steps = self._write(url, 3)
        arrays, attrs = self.plain_read(url)
        assert attrs == {"units": "m/s", "dims": ["x", "y"]}
        assert sorted(arrays) == ["k", "t", "u"]
        for name in arrays:
            want = np.stack([np.asarray(s[name]) for s in steps])
            assert_same_array(arrays[name], want)

    def test_append_continues_the_step_sequence(self, url: str) -> None:
        self._write(url, 3)
        with self.publish(url, 0, mode="a") as pub:
            assert pub.next_index == 3
            with pytest.raises(dp.SchemaError, match="float64"):
                pub.write({**_testprocs.make_step(3, 64), "u": np.zeros(64, np.float32)})
            for i in (3, 4):
                assert pub.write(_testprocs.make_step(i, 64), attrs={"i": i}) == i
        with dp.open(url) as arc:
            assert len(arc) == 5
            for i in range(5):
                assert_same_array(arc[i]["u"], _testprocs.make_step(i, 64)["u"])
            assert arc[4].attrs == {"i": 4}

    def test_publishing_into_a_folder_that_does_not_exist_makes_it(self, url: str) -> None:
        scheme, rest = url.split("://", 1)
        head, tail = rest.rsplit("/", 1) if "/" in rest else ("", rest)
        deep = f"{scheme}://{head}/new/deeper/{tail}" if head else f"{scheme}://new/deeper/{tail}"
        with self.publish(deep, 0) as pub:
            pub.write({"x": np.arange(3.0)})
        with dp.open(deep) as arc:
            assert_same_array(arc[0]["x"], np.arange(3.0))

    def test_a_dropped_archive_lets_go_of_its_files(self, url: str) -> None:
        """``dp.open`` handles dropped without ``close()``: their files are closed all the same
        (descriptors back to where they were), so a new writer can take the channel."""
        self._write(url, 3)
        gc.collect()
        before = len(os.listdir("/proc/self/fd"))
        for _ in range(3):
            arc = dp.open(url)
            assert arc[2]["u"].shape == (64,)
            del arc
        gc.collect()
        assert len(os.listdir("/proc/self/fd")) <= before
        with self.publish(url, 0) as pub:  # mode "w": nothing holds the old channel open
            pub.write(_testprocs.make_step(0, 64))

    def test_second_writer_is_refused_and_leaves_data_alone(self, url: str) -> None:
        with self.publish(url, 0) as pub:
            pub.write({"x": np.arange(4.0)})
            for mode in ("w", "a"):
                with pytest.raises(dp.ChannelBusyError, match="live writer"):
                    dp.publish(url, mode=mode)
            pub.write({"x": np.arange(4.0) + 1})
        with dp.open(url) as arc:
            assert len(arc) == 2
            assert_same_array(arc[1]["x"], np.arange(4.0) + 1)


class FileCrashTests(FileTransportTests):
    """For stored data that other processes can reach: real writer processes killed at seeded
    points, slow and dead writers, flipped bytes and truncated files (read in a subprocess, so
    that a hang is a test failure)."""

    def test_live_reader_sees_slow_writer_then_dead_writer(self, url: str) -> None:
        """Finished (other tests), slow: StepTimeoutError, gone: ChannelBroken."""
        sub = self.subscribe(url, timeout=self.timeout)
        writer = run_proc("publish", url, "--steps", "2", "--hang", "--size", "64")
        try:
            wait_for_event(writer, "hanging", self.timeout)
            assert [next(sub).index for _ in range(2)] == [0, 1]
            with pytest.raises(dp.StepTimeoutError, match="alive"):
                sub.next(timeout=0.5)
            writer.kill()
            writer.wait(10)
            with pytest.raises(dp.ChannelBroken, match="died"):
                sub.next(timeout=self.timeout)
        finally:
            sub.close()
            if writer.poll() is None:
                writer.kill()
            writer.communicate()

    @pytest.mark.parametrize("seed", range(8))
    def test_writer_killed_at_random_points(self, url: str, seed: int) -> None:
        """Every completed step stays readable and exact; no partial step is ever visible."""
        rng = np.random.default_rng(seed)
        n = 12
        args = ["publish", url, "--steps", str(n), "--size", "20000"]
        if seed % 2:
            args += ["--kill-in-step", str(int(rng.integers(0, n)))]  # die inside a step
            writer = run_proc(*args)
        else:
            writer = run_proc(*args, "--sleep", "0.01")
            time.sleep(float(rng.uniform(0.0, 0.6)))  # die anywhere, often mid-write
            writer.kill()
        events = read_events(writer, 60)
        wrote = [e["wrote"] for e in events if "wrote" in e]
        want = _expected(n, 20000)
        got = self._verify(url)
        if wrote == [] and got["error"] and "nothing is stored" in got["error"]:
            got = {"count": 0, "steps": {}}  # killed before its first step reached the disk
        else:
            assert got["error"] is None, got["error"]
        count = got["count"]
        assert count >= len(wrote), (count, wrote)  # everything reported written is there
        assert count <= n
        for i, digests in got["steps"].items():
            assert digests == want[int(i)], f"step {i} differs from what was written"
        # A live subscriber gets the same steps and then learns the writer is gone (or, if
        # it died before leaving any trace, that no writer came).
        sub = self.subscribe(url, timeout=3.0)
        c = Consumer(sub)
        c.run()
        sub.close()
        assert c.indices == list(range(count))
        if count < n or not any("closed" in e for e in events):
            nothing = count == 0 and isinstance(c.outcome, dp.StepTimeoutError)
            assert isinstance(c.outcome, dp.ChannelBroken) or nothing, c.outcome
        # The next writer of the channel can continue it.
        with self.publish(url, 0, mode="a") as pub:
            assert pub.next_index == count
            pub.write(_testprocs.make_step(count, 20000))
        final = self._verify(url)
        assert final["error"] is None and final["count"] == count + 1, final

    def test_a_channel_is_empty_while_its_new_writer_sets_it_up(self, url: str) -> None:
        """A new writer (mode "w") that has claimed a channel but not set it up yet: readers
        find nothing (not the old channel it replaces, nor its half-made files), then the new
        writer's steps."""
        self._write(url, 3)
        writer = run_proc("publish", url, "--steps", "2", "--stop-in-setup", "--tag", "new")
        try:
            wait_for_event(writer, "setting_up", 60)
            deadline = time.monotonic() + 30
            while _testprocs.process_state(writer.pid) != "T" and time.monotonic() < deadline:
                time.sleep(0.01)  # stopped, its claim on the channel made
            with self.subscribe(url, timeout=0.5) as sub:
                with pytest.raises(dp.StepTimeoutError, match="alive"):
                    next(sub)
            with pytest.raises(dp.DataplaneError, match="setting it up"):
                dp.open(url)
            sub = self.subscribe(url, timeout=60)
            c = Consumer(sub)
            c.start()
            os.kill(writer.pid, signal.SIGCONT)
            assert [e["wrote"] for e in read_events(writer, 60) if "wrote" in e] == [0, 1]
            c.finish(60)
            sub.close()
            assert c.indices == [0, 1] and c.outcome == "closed", c.outcome
            assert [attrs["tag"] for _, attrs, _ in c.steps] == ["new", "new"]
        finally:
            if writer.poll() is None:
                os.kill(writer.pid, signal.SIGCONT)
                writer.kill()
            writer.communicate()

    def test_append_after_a_writer_killed_before_its_first_step(self, url: str) -> None:
        """A writer killed right after opening a channel leaves nothing committed: the next
        writer's append starts at step 0 (it used to crash ADIOS2), and nothing of the dead
        one is left behind once the channel is written again."""
        for _ in range(2):  # also over a channel the first dead writer began
            writer = run_proc("publish", url, "--steps", "3", "--kill-before-first-step")
            read_events(writer, 60)
            assert writer.wait(30) == -9
        with self.publish(url, 0, mode="a") as pub:
            assert pub.next_index == 0
            pub.write(_testprocs.make_step(0, 64))
        got = self._verify(url)
        assert got["error"] is None and got["count"] == 1, got
        assert got["steps"]["0"] == _expected(1, 64)[0]
        folder = os.path.dirname(self.data_files(url)[0])
        assert not [n for n in os.listdir(folder) if n.endswith(".dp-new")]

    def _verify(self, url: str) -> dict[str, Any]:
        """Read everything in a subprocess, so that a hang is a test failure, not a stuck run."""
        proc = run_proc("verify", url)
        (result,) = read_events(proc, 60)
        return result

    @pytest.mark.parametrize("seed", range(6))
    def test_corrupted_bytes_never_come_back_as_values(self, url: str, seed: int) -> None:
        self._write(url, 4)
        want = {i: _testprocs.step_digests(dp.open(url)[i]) for i in range(4)}
        targets = self.corruption_targets(url)
        rng = np.random.default_rng(seed)
        if targets and seed % 2 == 0:
            path, offset, length = targets[int(rng.integers(0, len(targets)))]
            spots = [offset + int(rng.integers(0, length))]
        else:
            files = self.data_files(url)
            path = files[int(rng.integers(0, len(files)))]
            size = os.path.getsize(path)
            spots = [int(x) for x in rng.integers(0, size, 8)]
        flip_bytes(path, spots)
        got = self._verify(url)
        if targets and seed % 2 == 0:
            assert got["error"] is not None and "IntegrityError" in got["error"], got
            assert "step" in got["error"] and "variable" in got["error"]
        for i, digests in got["steps"].items():
            assert digests == want[int(i)], f"corrupt step {i} came back as values: {got}"

    @pytest.mark.parametrize("seed", range(3))
    def test_damaged_bytes_never_come_back_through_partial_reads(self, url: str, seed: int) -> None:
        """A flipped byte inside one row: every partial read (archive and live subscriber) that
        touches it raises IntegrityError, every other read returns exactly what was written."""
        rows, width = 2048, 64  # 1 MiB steps: several checksum blocks each
        steps = [np.random.default_rng([seed, i]).standard_normal((rows, width)) for i in range(3)]
        with self.publish(url, 0) as pub:
            for u in steps:
                pub.write({"u": u})
        hit_step, hit_row = 1, int(np.random.default_rng(seed).integers(0, rows))
        needle = steps[hit_step][hit_row].tobytes()
        where = []
        for path in self.data_files(url):
            with open(path, "rb") as f:
                at = f.read().find(needle)
            if at >= 0:
                where.append((path, at))
        assert len(where) == 1, f"row {hit_row} of step {hit_step} not found once: {where}"
        flip_bytes(
            where[0][0], [where[0][1] + 8 * int(np.random.default_rng(seed).integers(width))]
        )
        rng = np.random.default_rng(seed + 100)
        reads = [(hit_step, hit_row, 1, 0, width), (hit_step, hit_row, 1, 5, 3)]
        reads += [
            (
                int(rng.integers(3)),
                int(r),
                int(rng.integers(1, 40)),
                int(c),
                int(rng.integers(1, 8)),
            )
            for r, c in zip(rng.integers(0, rows - 40, 60), rng.integers(0, width - 8, 60))
        ]

        def check(read: Callable[[int, tuple[int, int], tuple[int, int]], np.ndarray]) -> int:
            failed = 0
            for i, r, n, c, m in reads:
                try:
                    got = read(i, (r, c), (n, m))
                except dp.IntegrityError as exc:
                    assert i == hit_step and "corrupt" in str(exc), exc
                    failed += 1
                    continue
                assert_same_array(got, steps[i][r : r + n, c : c + m])
            return failed

        with dp.open(url) as arc:
            assert check(lambda i, s, n: arc.read("u", i, start=s, count=n)) >= 2
            with pytest.raises(dp.IntegrityError, match="corrupt"):
                arc[hit_step]["u"]
        sub = self.subscribe(url, timeout=self.timeout)
        try:
            failed = 0
            for step in sub:
                for i, r, n, c, m in reads:
                    if i != step.index:
                        continue
                    try:
                        got = step.read("u", start=(r, c), count=(n, m))
                    except dp.IntegrityError:
                        assert i == hit_step
                        failed += 1
                        continue
                    assert_same_array(got, steps[i][r : r + n, c : c + m])
            assert failed >= 2 and sub.stats.steps == 3
        finally:
            sub.close()

    @pytest.mark.parametrize("seed", range(10))
    def test_cut_at_a_random_byte_gives_an_error_not_a_hang(self, url: str, seed: int) -> None:
        """One data file cut at a random byte: every step read is exact or the read fails with
        a dataplane error, within the subprocess's minute (an HDF5 SWMR reader used to retry
        a damaged metadata read for minutes, 10 of 20 random cuts)."""
        with self.publish(url, 0) as pub:
            for i in range(4):
                pub.write(_testprocs.make_step(i, 20000), attrs={"i": i})
        want = _expected(4, 20000)
        rng = np.random.default_rng(seed)
        files = self.data_files(url)
        path = files[int(rng.integers(0, len(files)))]
        os.truncate(path, int(rng.integers(0, os.path.getsize(path))))
        got = self._verify(url)
        assert got["error"] is None or got["error"].split(":")[0] in _DATAPLANE_ERRORS, got
        for i, digests in got["steps"].items():
            assert digests == want[int(i)], f"cut step {i} came back wrong: {got}"

    @pytest.mark.parametrize("fraction", [0.0, 0.3, 0.6, 0.9, 0.99])
    def test_truncated_files_give_an_error_not_a_hang(self, url: str, fraction: float) -> None:
        self._write(url, 4)
        want = {i: _testprocs.step_digests(dp.open(url)[i]) for i in range(4)}
        for path in self.data_files(url):
            truncate(path, fraction)
        got = self._verify(url)
        for i, digests in got["steps"].items():
            assert digests == want[int(i)], f"truncated step {i} came back wrong: {got}"
        if got["error"] is None:
            assert (
                got["count"] < 4
                or fraction == 0.0
                or all(got["steps"][str(i)] == want[i] for i in range(4))
            )


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


class CrossProcessDropTests(CrossProcessTests):
    """For streams that reach other processes and support ``policy="drop-oldest"``."""

    def test_slow_reader_process_under_drop_oldest_counts_every_missed_step(self, url: str) -> None:
        """published = delivered + dropped, exactly, for a subscriber process that falls behind;
        what it gets is in order, each once, exact."""
        n = 150
        reader = run_proc("subscribe", url, "--sleep", "0.01", "--timeout", str(self.timeout))
        writer = run_proc(
            "publish", url, "--steps", str(n), "--policy", "drop-oldest", "--queue-limit", "2",
            *self.writer_args(1),
        )  # fmt: skip
        wrote = [e["wrote"] for e in read_events(writer, 3 * self.timeout) if "wrote" in e]
        events = read_events(reader, 3 * self.timeout)
        got = [e for e in events if "index" in e]
        indices = [e["index"] for e in got]
        want = self.expected_digests(n)
        assert wrote == list(range(n))
        assert indices == sorted(set(indices)) and set(indices) <= set(range(n))
        assert all(e["digests"] == want[e["index"]] for e in got)
        assert events[-1]["end"] == "closed", events[-1]
        stats = events[-1]["stats"]
        assert stats["steps"] == len(got) and 0 < stats["dropped"] < n, stats
        assert stats["steps"] + stats["dropped"] == n, stats


def conformance(scheme: str, **capabilities: Any) -> type:
    """The conformance suite for ``scheme``, assembled from its declared capabilities.

    ``capabilities`` override the class's declarations where an instance differs, e.g.
    ``conformance("zarr", scope="process")`` for fsspec's in-process memory filesystem.
    """
    cls = get_transport(scheme)

    def has(name: str) -> Any:
        return capabilities.get(name, getattr(cls, name))

    bases: list[type] = []
    if has("scope") != "process":
        both = has("supports_drop_policy")
        bases.append(CrossProcessDropTests if both else CrossProcessTests)
    if has("supports_drop_policy"):
        bases.append(DropPolicyTests)
    if has("supports_random_access"):
        bases.append(FileCrashTests if has("scope") != "process" else FileTransportTests)
    bases.append(TransportTests)
    return type(f"{scheme.capitalize()}TransportTests", tuple(bases), {"scheme": scheme})
