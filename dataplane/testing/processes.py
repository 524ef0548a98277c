"""Tests with writers and readers in real processes (transports that reach beyond one)."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import time
from typing import Any

import numpy as np
import pytest

import dataplane as dp
from dataplane import _testprocs
from dataplane.testing.helpers import Consumer, read_events, run_proc, wait_for_event
from dataplane.testing.transport import TransportTests


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
            ended = [e for e in events if "end" in e]
            assert [e["index"] for e in steps] == list(range(n)), ended
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
