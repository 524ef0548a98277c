"""What every transport delivers: exact arrays, in order, once; ends and failures."""

from __future__ import annotations

import functools
import gc
import threading
import time
from typing import Any, ClassVar

import numpy as np
import pytest

import dataplane as dp
from dataplane.model import DTYPES
from dataplane.testing.base import Hooks
from dataplane.testing.helpers import (
    Consumer,
    _index,
    _read_only,
    _WriterThread,
    assert_same_array,
    sample_array,
)
from dataplane.transports.base import Writer


class DeliveryTests(Hooks):
    """Every step delivered, exact, in order, once; ends and failures told apart."""

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
            # Through the step protocol every writer has (writers that fuse small steps test
            # their fused path's failure themselves).
            writer.write_step = functools.partial(Writer.write_step, writer)
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
