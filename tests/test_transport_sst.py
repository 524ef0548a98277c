"""sst:// passes the conformance suite (real SST engines, WAN transport, real processes)."""

import os
import signal

import pytest

import dataplane as dp
from dataplane.testing import conformance, read_events, run_proc, wait_for_event


class TestSST(conformance("sst")):
    def make_url(self, tmp_path, name):
        return f"sst://{tmp_path}/{name}"

    def writer_options(self, subscribers):
        return {"rendezvous": subscribers}


@pytest.mark.timeout(120)
def test_stale_contact_file_of_a_killed_writer_never_blocks_the_next_run(tmp_path):
    url = f"sst://{tmp_path}/run"
    contact = tmp_path / "run.sst"
    crashed = run_proc("publish", url, "--steps", "2", "--hang")
    wait_for_event(crashed, "hanging", 60)
    assert contact.exists()
    os.kill(crashed.pid, signal.SIGKILL)
    crashed.wait(10)
    assert contact.exists()  # SIGKILL leaves it behind

    # A reader arriving now waits for the next writer instead of dialling the dead contact.
    with pytest.raises(dp.StepTimeoutError, match="dead; waiting for the next"):
        with dp.subscribe(url, timeout=2) as sub:
            sub.next()
    reader = run_proc("subscribe", url, "--timeout", "60")
    wait_for_event(reader, "subscribed", 60)

    # The next run starts over the stale file and the waiting reader gets every step.
    writer = run_proc("publish", url, "--steps", "3", "--opt", "rendezvous=1")
    wrote = [e["wrote"] for e in read_events(writer, 90) if "wrote" in e]
    got = read_events(reader, 90)
    assert wrote == [0, 1, 2]
    assert [e["index"] for e in got if "index" in e] == [0, 1, 2]
    assert got[-1]["end"] == "closed"
    assert not contact.exists()  # a writer that closes removes its contact file


@pytest.mark.timeout(60)
def test_unknown_data_transport_is_refused(tmp_path):
    with pytest.raises(dp.OptionError, match="data_transport"):
        dp.publish(f"sst://{tmp_path}/x", data_transport="carrier-pigeon")


@pytest.mark.timeout(120)
def test_a_crashed_reader_relay_is_reported_not_waited_for(tmp_path):
    """adios2 can crash inside SST (a segfault in the relay that runs the engine): the
    subscriber gets ChannelBroken naming the signal and where it happened, never a hang."""
    url = f"sst://{tmp_path}/crash"
    writer = run_proc("publish", url, "--steps", "2", "--hang", "--opt", "rendezvous=1")
    try:
        with dp.subscribe(url, timeout=60) as sub:
            assert sub.next().index == 0
            relay = sub._reader._stream._proc  # the process that runs the SST reader engine
            os.kill(relay.pid, signal.SIGSEGV)
            relay.wait(30)
            with pytest.raises(dp.ChannelBroken, match="SIGSEGV.*Segmentation fault.*_sst_relay"):
                for _ in range(3):
                    sub.next(timeout=30)
    finally:
        writer.kill()
        writer.wait(10)


@pytest.mark.timeout(120)
def test_a_fast_reader_gets_a_clean_end_while_the_writer_waits_for_a_slow_one(tmp_path):
    """SST's close waits until every reader has taken every step, so a fast reader sees the
    end long before the writer's lease says "closed" (flaky before: a slow subscriber process
    on a busy machine made the fast one report ChannelBroken after every step). The writer
    says it is closing first: the fast reader's end is clean, the slow one still gets all."""
    url = f"sst://{tmp_path}/run"
    with dp.subscribe(url, timeout=60) as slow, dp.subscribe(url, timeout=60) as fast:
        writer = run_proc("publish", url, "--steps", "3", "--opt", "rendezvous=2")
        got = [fast.next().index]
        relay = slow._reader._stream._proc  # the process that runs the slow SST reader
        os.kill(relay.pid, signal.SIGSTOP)  # the slowest reader there is
        try:
            while (step := fast.next()) is not None:
                got.append(step.index)
            assert writer.poll() is None  # still closing: the end came before "closed"
        finally:
            os.kill(relay.pid, signal.SIGCONT)
        assert got == [0, 1, 2]
        assert [s.index for s in iter(slow.next, None)] == [0, 1, 2]
        assert read_events(writer, 60)[-1] == {"closed": True}
