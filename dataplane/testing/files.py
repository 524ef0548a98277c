"""Tests of the file transports: stored steps, random access, crashes, damage, full disks."""

from __future__ import annotations

import gc
import os
import signal
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

import dataplane as dp
from dataplane import _testprocs
from dataplane.testing.helpers import (
    _DATAPLANE_ERRORS,
    Consumer,
    _expected,
    assert_same_array,
    flip_bytes,
    read_events,
    run_proc,
    truncate,
    wait_for_event,
)
from dataplane.testing.transport import TransportTests


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
        """A writer killed right after opening a channel leaves nothing committed: a reader
        finds no step, the next writer's append starts at step 0 (both used to crash ADIOS2),
        and nothing of the dead one is left behind once the channel is written again."""
        for _ in range(2):  # also over a channel the first dead writer began
            writer = run_proc("publish", url, "--steps", "3", "--kill-before-first-step")
            read_events(writer, 60)
            assert writer.wait(30) == -9
            # Read as it is: no step (ADIOS2 crashed closing a reader of such a file).
            got = self._verify(url)
            assert (got["error"] is None and got["count"] == 0) or (
                "nothing is stored" in got["error"]
            ), got
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
