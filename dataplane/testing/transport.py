"""``TransportTests`` (every transport) and ``DropPolicyTests`` (streams that drop)."""

from __future__ import annotations

import threading
import time
from typing import Any

import numpy as np

from dataplane.testing.delivery import DeliveryTests
from dataplane.testing.helpers import Consumer, _index, assert_same_array
from dataplane.testing.refusals import RefusalTests


class TransportTests(DeliveryTests, RefusalTests):
    """What every transport must do. Subclasses set ``scheme`` (``conformance()`` does)."""


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
