"""shm:// beyond the conformance suite: segment hygiene, crashes on either side, zero copy."""

from __future__ import annotations

import json
import os
import stat
import threading
import time
import uuid

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import dataplane as dp
from dataplane.testing import Consumer, assert_same_array, read_events, run_proc, wait_for_event
from dataplane.transports import _posix
from dataplane.transports.shm import choose_slot, default_dir

TIMEOUT = 20.0


@pytest.fixture
def url() -> str:
    return f"shm://t{uuid.uuid4().hex[:10]}"


def channel_file(url: str) -> str:
    return os.path.join(default_dir(), url.split("://")[1] + ".json")


def token_of(url: str) -> str:
    with open(channel_file(url)) as f:
        return json.load(f)["token"]


def segments(token: str) -> list[str]:
    return _posix.list_segments(f"dp-{token}-")


def test_segments_are_private_and_unguessable(url: str) -> None:
    with dp.publish(url) as pub:
        pub.write({"x": np.zeros(1000)})
        token = token_of(url)
        names = segments(token)
        assert len(names) == 2  # control + one slot
        for name in names:
            mode = os.stat(os.path.join(_posix.SHM_DIR, name)).st_mode
            assert stat.S_IMODE(mode) == 0o600, oct(mode)
        assert len(token) == 16 and int(token, 16) >= 0  # 64 random bits
        assert stat.S_IMODE(os.stat(default_dir()).st_mode) == 0o700
        assert stat.S_IMODE(os.stat(channel_file(url)).st_mode) == 0o600


def test_nothing_left_after_clean_close(url: str) -> None:
    readers = [run_proc("subscribe", url, "--timeout", "30") for _ in range(2)]
    with dp.publish(url, rendezvous=2, queue_limit=32) as pub:
        token = token_of(url)
        local = dp.subscribe(url, timeout=TIMEOUT)
        for i in range(20):
            pub.write({"x": np.full(5000, i)})
    assert [s.index for s in local] == list(range(20))
    for proc in readers:
        assert read_events(proc, 30)[-1]["end"] == "closed"
    assert segments(token)  # the local subscriber is still attached
    local.close()
    assert segments(token) == []
    assert not os.path.exists(channel_file(url))


def test_crash_leftovers_are_removed_at_the_next_start(url: str) -> None:
    writer = run_proc("publish", url, "--steps", "3", "--hang")
    wait_for_event(writer, "hanging", 30)
    token = token_of(url)
    writer.kill()
    writer.wait(10)
    assert segments(token), "a killed writer leaves its segments"
    # The next writer of any channel sweeps them; a stale channel file does not block it.
    with dp.publish(url) as pub:
        assert segments(token) == []
        sub = dp.subscribe(url, timeout=TIMEOUT)
        pub.write({"x": np.arange(3)})
        assert_same_array(next(sub)["x"], np.arange(3))
    sub.close()


def test_dead_subscriber_releases_its_slots_under_block(url: str) -> None:
    n = 30
    # One subscriber takes step 0 and is killed while holding it; one stays healthy.
    doomed = run_proc("subscribe", url, "--exit-after", "0", "--kill")
    with dp.publish(url, queue_limit=2, rendezvous=1) as pub:
        healthy = Consumer(dp.subscribe(url, timeout=TIMEOUT))
        healthy.start()
        t0 = time.monotonic()
        for i in range(n):
            pub.write({"x": np.full(100, i)})
        elapsed = time.monotonic() - t0
    healthy.finish(TIMEOUT)
    healthy.sub.close()
    events = read_events(doomed, 30)
    assert doomed.returncode == -9 and [e["index"] for e in events if "index" in e] == [0]
    assert healthy.indices == list(range(n))
    assert elapsed < TIMEOUT  # the writer was not stalled for good by the dead reader


def test_dead_subscriber_never_stalls_drop_oldest(url: str) -> None:
    doomed = run_proc("subscribe", url, "--exit-after", "0", "--kill")
    pub = dp.publish(url, policy="drop-oldest", queue_limit=2, rendezvous=1)
    pub.write({"x": np.full(1000, -1)})
    read_events(doomed, 30)
    done = threading.Event()

    def write() -> None:
        with pub:
            for i in range(200):
                pub.write({"x": np.full(1000, i)})
        done.set()

    threading.Thread(target=write, daemon=True).start()
    assert done.wait(TIMEOUT)


def test_subscriber_exit_does_not_unlink_the_channel(url: str) -> None:
    """Python 3.11's resource tracker would unlink segments a mere reader attached to."""
    first = run_proc("subscribe", url, "--exit-after", "1")
    with dp.publish(url, queue_limit=2, rendezvous=1) as pub:
        token = token_of(url)
        for i in range(2):
            pub.write({"x": np.full(10, i)})
        assert [e["index"] for e in read_events(first, 30) if "index" in e] == [0, 1]
        before = sorted(segments(token))
        second = run_proc("subscribe", url, "--start", "latest", "--timeout", "30")
        wait_for_event(second, "subscribed", 30)
        time.sleep(0.2)  # let it register before steps it should see
        for i in range(2, 6):
            pub.write({"x": np.full(10, i)})
        assert sorted(segments(token))[: len(before)] == before
    events = read_events(second, 30)
    assert [e["index"] for e in events if "index" in e] == [2, 3, 4, 5]


def test_zero_copy_views_are_read_only_views_of_the_slot(url: str) -> None:
    with dp.publish(url) as pub:
        sub = dp.subscribe(url, timeout=TIMEOUT)
        pub.write({"x": np.arange(1000.0)})
        step = next(sub)
        a, b = step["x"], step.read("x", start=(10,), count=(5,))
        assert not a.flags.writeable and not a.flags.owndata
        assert np.shares_memory(a, b)
        with pytest.raises(ValueError, match="read-only"):
            a[0] = 1
        t = step.torch("x", copy=False)
        assert t.data_ptr() == a.ctypes.data
        assert step.torch("x").data_ptr() != a.ctypes.data
    sub.close()


def test_slots_grow_for_larger_steps(url: str) -> None:
    sizes = [10, 3_000_000, 10, 5_000_000, 100]
    with dp.publish(url, queue_limit=1) as pub:
        sub = dp.subscribe(url, timeout=TIMEOUT)
        c = Consumer(sub)
        c.start()
        for i, n in enumerate(sizes):
            pub.write({"x": np.full(n, i, dtype=np.uint8)})
    c.finish(TIMEOUT)
    sub.close()
    assert [a["x"].shape[0] for _, _, a in c.steps] == sizes
    for i, _, arrays in c.steps:
        assert (arrays["x"] == i).all()


def test_second_writer_in_another_process_is_refused(url: str) -> None:
    with dp.publish(url):
        proc = run_proc("publish", url, "--steps", "1")
        out, _ = proc.communicate(timeout=30)
        assert proc.returncode == 3  # the test writer's exit status for ChannelBusyError
        assert '"busy"' in out and "already has a live writer" in out


def test_subscriber_table_full(url: str) -> None:
    with dp.publish(url, max_subscribers=2):
        subs = [dp.subscribe(url) for _ in range(2)]
        with pytest.raises(dp.DataplaneError, match="max_subscribers"):
            dp.subscribe(url)
        for s in subs:
            s.close()
        dp.subscribe(url).close()  # a freed row is reused


def test_channel_attributes_have_a_size_limit(url: str) -> None:
    with dp.publish(url) as pub:
        pub.attrs["big"] = "x" * (300 * 1024)
        with pytest.raises(dp.SchemaError, match="limit"):
            pub.write({"x": np.zeros(1)})
        pub.attrs["big"] = "small"


def test_bad_options(url: str) -> None:
    with pytest.raises(dp.OptionError, match="max_subscribers"):
        dp.publish(url, max_subscribers=0)
    with pytest.raises(dp.OptionError, match="rendezvous"):
        dp.publish(url, rendezvous=99)
    with pytest.raises(dp.SchemaError, match="channel name"):
        dp.publish("shm://../etc/passwd")
    with pytest.raises(dp.OptionError, match="append"):
        dp.publish(url, mode="a")
    with pytest.raises(dp.StepTimeoutError, match="rendezvous"):
        dp.publish(url, rendezvous=1, rendezvous_timeout=0.2)
    with pytest.raises(dp.OptionError, match="not a valid int"):
        dp.publish(url + "?rendezvous=two")


def test_options_from_the_url(url: str, tmp_path) -> None:
    with dp.publish(f"{url}?dir={tmp_path}&max_subscribers=3") as pub:
        assert os.path.exists(tmp_path / (url.split("://")[1] + ".json"))
        sub = dp.subscribe(f"{url}?dir={tmp_path}", timeout=TIMEOUT)
        pub.write({"x": np.ones(2)})
        assert_same_array(next(sub)["x"], np.ones(2))
        assert pub.transport.get_config()["options"]["max_subscribers"] == 3
    sub.close()


def _hold_the_lock_and_hang(token: str, held: object) -> None:
    from dataplane.transports._shm_control import _Control

    ctl = _Control.attach(token)
    ctl.locked.__enter__()
    held.set()  # type: ignore[attr-defined]
    time.sleep(600)


@pytest.mark.timeout(120)
def test_a_process_killed_holding_the_channel_lock_does_not_stall_the_channel(url: str) -> None:
    """The channel lock is a robust process-shared mutex (no system call per step): a holder
    that dies is released by the kernel as flock's would be, and the channel goes on, every
    step delivered."""
    import multiprocessing

    from dataplane.transports._shm_control import _MUTEX

    with dp.publish(url, queue_limit=16) as pub:
        sub = dp.subscribe(url, timeout=TIMEOUT)
        pub.write({"x": np.full(100, 0)})
        assert pub._writer._ctl.h.lock_kind == _MUTEX  # glibc has them: not the flock fallback
        ctx = multiprocessing.get_context("spawn")
        held = ctx.Event()
        holder = ctx.Process(target=_hold_the_lock_and_hang, args=(token_of(url), held))
        holder.start()
        try:
            assert held.wait(60), "the holder never took the lock"
        finally:
            holder.kill()
            holder.join(30)
        for i in range(1, 10):
            pub.write({"x": np.full(100, i)})
        got = []
        for step in sub:
            assert_same_array(step["x"], np.full(100, step.index))
            got.append(step.index)
            if step.index == 9:
                break
    assert got == list(range(10))
    sub.close()


def test_a_channel_of_another_dataplane_version_is_named_and_never_swept(url: str) -> None:
    from dataplane.transports._shm_control import _MAGIC, _Control, sweep

    with dp.publish(url) as pub:
        pub.write({"x": np.arange(3)})
        ctl = pub._writer._ctl
        ctl.h.magic = _MAGIC - 1  # what the previous layout's writer would have written
        try:
            with pytest.raises(dp.DataplaneError, match="another version of dataplane"):
                dp.subscribe(url, timeout=1)
            assert token_of(url) not in sweep(default_dir())
            assert segments(token_of(url))
        finally:
            ctl.h.magic = _MAGIC
        with dp.subscribe(url, timeout=TIMEOUT) as sub:
            pub.write({"x": np.arange(3) + 1})
            for i in range(2):  # the step written before it subscribed is still held for it
                assert_same_array(next(sub)["x"], np.arange(3) + i)
    del _Control


def test_where_libc_has_no_robust_mutex_the_channel_locks_with_flock_across_processes(
    url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The header says how the channel is locked: a subscriber in another process (whose libc
    has the mutex) follows the writer's flock, and every step arrives as written."""
    from dataplane._testprocs import digest
    from dataplane.transports._shm_control import _FLOCK

    monkeypatch.setattr(_posix, "init_shared_mutex", lambda addr: False)
    reader = run_proc("subscribe", url, "--timeout", "30")
    with dp.publish(url, rendezvous=1, queue_limit=3) as pub:
        assert pub._writer._ctl.h.lock_kind == _FLOCK
        sent = []
        for i in range(40):
            x = np.arange(2000, dtype=np.float64) * (i + 1)
            pub.write({"x": x})
            sent.append(digest(x))
    events = read_events(reader, 60)
    got = [e["digests"]["x"] for e in events if "index" in e]
    assert got == sent
    assert events[-1]["end"] == "closed"


def _choose_reference(
    seqs: list[int], caps: list[int], pinned: set[int], min_cursor: int | None, ql: int
) -> int | None:
    """The slot rules stated plainly (the writer's first version, before it became one pass)."""
    if min_cursor is not None and len([s for s in seqs if s >= min_cursor]) >= ql:
        return None
    empty = seqs.count(-1)
    if empty and len(seqs) - empty < ql:
        return max((i for i, s in enumerate(seqs) if s < 0), key=lambda i: caps[i])
    free = [
        (s, i)
        for i, s in enumerate(seqs)
        if s >= 0 and s not in pinned and (min_cursor is None or s < min_cursor)
    ]
    if free:
        return min(free)[1]
    return seqs.index(-1) if empty else None


@settings(max_examples=2000, deadline=None)
@given(st.lists(st.integers(-1, 12), min_size=1, max_size=9), st.data())
def test_choose_slot_follows_the_slot_rules(drawn: list[int], data) -> None:
    seqs: list[int] = []
    for s in drawn:  # slots hold distinct steps, or nothing (-1)
        seqs.append(-1 if s in seqs and s >= 0 else s)
    caps = data.draw(st.lists(st.integers(0, 3), min_size=len(seqs), max_size=len(seqs)))
    pinned = set(data.draw(st.lists(st.sampled_from([-1, *seqs]), max_size=4)))
    min_cursor = data.draw(st.none() | st.integers(0, 14))
    ql = data.draw(st.integers(1, len(seqs)))
    got = choose_slot(seqs, caps, pinned, min_cursor, ql)
    assert got == _choose_reference(seqs, caps, pinned, min_cursor, ql)
    if got is not None:  # never a step being read or one the slowest subscriber still needs
        assert seqs[got] not in pinned or seqs[got] < 0
        assert min_cursor is None or seqs[got] < min_cursor


def test_a_step_failing_midway_in_the_fused_write_is_dropped_whole(url: str, monkeypatch) -> None:
    """The writer copies a small step's arrays in one call (not put by put): a copy that fails
    there leaves nothing of the step visible, and the next write takes its index."""
    from dataplane.transports import shm as shm_module

    calls = []

    class FailingSecondCopy:
        def __getattr__(self, name: str):
            return getattr(np, name)

        @staticmethod
        def copyto(dst: np.ndarray, src: np.ndarray, casting: str) -> None:
            calls.append(dst.shape)
            if len(calls) == 2:
                raise OSError(28, "No space left on device (injected)")
            np.copyto(dst, src, casting=casting)

    with dp.publish(url) as pub, dp.subscribe(url, timeout=TIMEOUT) as sub:
        pub.write({"x": np.zeros(3), "y": np.zeros(2)})
        monkeypatch.setattr(shm_module, "np", FailingSecondCopy())
        with pytest.raises(dp.StorageFullError, match="while writing step 1; step 0 is"):
            pub.write({"x": np.full(3, 7.0), "y": np.full(2, 7.0)})
        monkeypatch.undo()
        assert calls == [(3,), (2,)] and pub.next_index == 1
        pub.write({"x": np.ones(3), "y": np.ones(2)})
        got = []
        for _ in range(2):
            s = sub.next()
            got.append((s.index, np.array(s["x"]), np.array(s["y"])))
    assert [g[0] for g in got] == [0, 1]
    assert_same_array(got[0][1], np.zeros(3)) and assert_same_array(got[1][1], np.ones(3))
    assert_same_array(got[1][2], np.ones(2))


_inherited: dict = {}


def _use_inherited_ends(out) -> None:
    for what, call in (
        ("write", lambda: _inherited["pub"].write({"x": np.ones(3)})),
        ("next", lambda: _inherited["sub"].next(1.0)),
    ):
        try:
            call()
            out.put((what, "no error"))
        except dp.DataplaneError as exc:
            out.put((what, str(exc)))


@pytest.mark.timeout(60)
def test_ends_inherited_by_a_forked_child_refuse_to_be_used_there(url: str) -> None:
    """The per-step process check does without a system call (the pid is refreshed at fork):
    a forked child that uses its parent's ends still gets a clear error, not a shared slot."""
    import multiprocessing

    ctx = multiprocessing.get_context("fork")
    with dp.publish(url) as pub, dp.subscribe(url, timeout=TIMEOUT) as sub:
        pub.write({"x": np.zeros(3)})
        _inherited.update(pub=pub, sub=sub)
        out = ctx.Queue()
        child = ctx.Process(target=_use_inherited_ends, args=(out,))
        child.start()
        got = dict(out.get(timeout=30) for _ in range(2))
        child.join(30)
        _inherited.clear()
        assert "was opened in process" in got["write"], got
        assert "was opened in process" in got["next"], got
        # The parent's ends are untouched.
        pub.write({"x": np.ones(3)})
        assert sub.next().index == 0 and sub.next().index == 1
