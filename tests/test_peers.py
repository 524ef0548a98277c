"""Cooperating node caches: where each shard lives (pure, property tested), the peer
protocol against real server processes, and fallbacks to the source when a peer fails."""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import warnings

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from dataplane.cache import CacheWarning, NodeCache, cache_stats
from dataplane.cache import peers as peers_mod
from dataplane.cache.peers import PeerError, Peers, first_uses, homes
from dataplane.cache.policy import NEVER
from dataplane.cache.space import held_for_peers
from dataplane.loaders.order import epoch_order, every_rank

pytestmark = pytest.mark.timeout(120)


# -- homes: pure ------------------------------------------------------------------------------
@st.composite
def plans(draw):
    """A shard layout, every rank's order of it, which node each rank is on, shard sizes."""
    sizes = draw(st.lists(st.integers(1, 30), min_size=1, max_size=25))
    bounds = np.concatenate(([0], np.cumsum(sizes))).astype(np.int64)
    nodes = draw(st.integers(1, 4))
    world = draw(st.integers(nodes, 8))
    rank_nodes = sorted(draw(st.permutations(list(range(nodes)) * world))[:world])
    if set(rank_nodes) != set(range(nodes)):
        rank_nodes = [r % nodes for r in range(world)]
    orders = every_rank(
        bounds,
        seed=draw(st.integers(0, 1000)),
        epoch=0,
        block=draw(st.one_of(st.none(), st.integers(1, 5))),
        world=world,
        drop_last=draw(st.booleans()),
    )
    nbytes = np.asarray(
        draw(st.lists(st.integers(1, 1000), min_size=len(sizes), max_size=len(sizes)))
    )
    return bounds, orders, rank_nodes, nodes, nbytes


@given(plans())
def test_first_uses_are_each_nodes_first_read_of_each_shard(plan) -> None:
    bounds, orders, rank_nodes, nodes, _ = plan
    first = first_uses(orders, rank_nodes, bounds, nodes)
    assert first.shape == (nodes, len(bounds) - 1)
    want = np.full(first.shape, NEVER, dtype=np.int64)
    for order, node in zip(orders, rank_nodes):
        for pos, i in enumerate(order.tolist()):
            s = int(np.searchsorted(bounds, i, side="right")) - 1
            want[node, s] = min(want[node, s], pos)
    np.testing.assert_array_equal(first, want)


@given(plans(), st.floats(1.0, 2.0))
def test_every_shard_has_one_home_that_reads_it_first_within_a_fair_share(plan, slack) -> None:
    bounds, orders, rank_nodes, nodes, nbytes = plan
    first = first_uses(orders, rank_nodes, bounds, nodes)
    got = homes(first, nbytes, slack)
    assert got.shape == (len(bounds) - 1,) and ((0 <= got) & (got < nodes)).all()
    np.testing.assert_array_equal(got, homes(first, nbytes, slack))  # every node agrees
    if nodes > 1:  # the shortcut where no share fills up gives what the walk gives
        cap = slack * nbytes.sum() / nodes + nbytes.max()
        walked = peers_mod._walk(first, nbytes, cap, first.min(axis=0))
        np.testing.assert_array_equal(got, walked)
    load = np.bincount(got, weights=nbytes, minlength=nodes)
    # No node fetches more than its fair share by more than the slack and one shard.
    assert load.max() <= slack * nbytes.sum() / nodes + nbytes.max() + 1e-9
    cap = slack * nbytes.sum() / nodes + nbytes.max()
    for s in range(len(bounds) - 1):
        readers = np.flatnonzero(first[:, s] != NEVER)
        if len(readers) and got[s] not in readers:
            # Homed where it is not read only when every reader was full then (loads only grow).
            assert all(load[n] + nbytes[s] > cap - 1e-6 for n in readers)
    if nodes == 1:
        assert (got == 0).all()


def test_homes_land_where_each_shard_is_read_first() -> None:
    """Two nodes of two ranks, a shuffled order: each shard read by one node only is homed
    there, and the fetches split about evenly."""
    bounds = np.arange(0, 64 * 10 + 1, 10)
    orders = every_rank(bounds, seed=3, epoch=0, block=4, world=4)
    for r in range(4):
        np.testing.assert_array_equal(
            orders[r], epoch_order(bounds, seed=3, epoch=0, block=4, rank=r, world=4)
        )
    first = first_uses(orders, [0, 0, 1, 1], bounds, 2)
    got = homes(first, np.full(64, 100))
    only = (first != NEVER).sum(axis=0) == 1
    assert only.sum() > 40
    for s in np.flatnonzero(only):
        assert first[got[s], s] != NEVER
    assert abs(int((got == 0).sum()) - 32) <= 4


# -- the protocol, against real server processes ----------------------------------------------
SECRET = b"k" * 32


def arrays(seed: int) -> dict[str, np.ndarray]:
    return {"x": np.arange(20000, dtype=np.float64) * seed, "y": np.arange(3) + seed}


def key(i: int) -> str:
    return NodeCache.key("peer-test", i)


@pytest.fixture
def home(tmp_path):
    """A node's cache holding entries 1 and 2, and its server process."""
    cache = NodeCache(tmp_path / "home", capacity="64MiB")
    for i in (1, 2):
        cache.fetch(key(i), lambda i=i: arrays(i))
    proc, port = peers_mod._start_server(cache.path, "127.0.0.1", SECRET, 5.0)
    yield cache, port
    proc.stdin.close()
    proc.wait(10)


def peers_for(port: int, secret: bytes = SECRET, timeout: float = 5.0, wait: float = 0.2):
    """This process as node 1 of two; node 0 is the server at ``port``."""
    return Peers(
        "job",
        1,
        ["home", "here"],
        [("127.0.0.1", port), ("127.0.0.1", 1)],
        [0, 1],
        secret,
        timeout,
        wait,
        server=os.getpid(),  # this node's server: alive while the test runs
    )


def consumer(tmp_path, peers: Peers) -> NodeCache:
    cache = NodeCache(tmp_path / "here", capacity="64MiB")
    cache.peers = peers
    return cache


def test_an_entry_comes_from_its_home_byte_for_byte(tmp_path, home) -> None:
    cache, port = home
    here = consumer(tmp_path, peers_for(port))
    calls = []
    got = here.fetch(key(1), lambda: calls.append(1) or arrays(1), home=0)
    assert calls == [], "not read from the source"
    for name, want in arrays(1).items():
        np.testing.assert_array_equal(got[name], want)
    with open(os.path.join(cache.path, "entries", key(1)), "rb") as a:
        with open(os.path.join(here.path, "entries", key(1)), "rb") as b:
            assert a.read() == b.read()
    s = here.stats
    assert s["peer_hits"] == 1 and s["bytes_from_peers"] > 160000 and s["misses"] == 0
    # A shard this node is home to is read from the source and marked to be kept for others.
    here.fetch(key(7), lambda: arrays(7), home=1)
    assert held_for_peers(here.path) == {key(7)}
    here.flush_stats()
    stats = cache_stats(here.path)
    assert stats["peer_bytes"] == s["bytes_from_peers"] and stats["source_bytes"] > 0
    assert os.listdir(os.path.join(here.path, "tmp")) == []


def test_entries_kept_for_other_nodes_are_evicted_last_while_their_job_runs(tmp_path) -> None:
    """A cache of room for three entries: the two it is home to outlast five others; once
    the job's server is gone, they are ordinary entries again (and their marks swept)."""
    peers = peers_for(1)
    cache = consumer(tmp_path, peers)
    for i in (1, 2):
        cache.fetch(key(i), lambda i=i: arrays(i), home=1)
    one = os.path.getsize(os.path.join(cache.path, "entries", key(1)))
    small = NodeCache(cache.path, capacity=3 * one)
    for i in range(10, 15):
        small.fetch(key(i), lambda i=i: arrays(i))
    held = set(os.listdir(os.path.join(cache.path, "entries")))
    assert {key(1), key(2)} <= held and len(held) == 3
    ended = subprocess.Popen([sys.executable, "-c", "pass"])
    ended.wait()
    homes_dir = os.path.join(cache.path, "homes")
    os.rename(os.path.join(homes_dir, str(os.getpid())), os.path.join(homes_dir, str(ended.pid)))
    assert held_for_peers(cache.path) == set()
    fresh = NodeCache(cache.path, capacity=3 * one)
    for i in range(20, 23):
        fresh.fetch(key(i), lambda i=i: arrays(i))
    held = set(os.listdir(os.path.join(cache.path, "entries")))
    assert held == {key(20), key(21), key(22)}
    assert os.listdir(homes_dir) == [], "the marks of an ended job are swept"
    for i in (1, 2):  # and nothing read back was wrong
        np.testing.assert_array_equal(
            fresh.fetch(key(i), lambda i=i: arrays(i))["x"], arrays(i)["x"]
        )


def test_a_receiver_slower_than_the_sender_gets_the_whole_entry(tmp_path, home) -> None:
    """An entry larger than the sockets' buffers, and a receiver that is busy before it
    reads: the server waits for it rather than breaking off."""
    cache, port = home
    big = {"x": np.arange(2 << 20, dtype=np.float64)}  # 16 MiB
    cache.fetch(key(3), lambda: big)
    here = consumer(tmp_path, peers_for(port))
    real_reserve = here._writes.reserve

    def busy_reserve(*a, **kw):
        time.sleep(0.5)  # the cause of a full send buffer, not a wait for anything
        return real_reserve(*a, **kw)

    here._writes.reserve = busy_reserve  # type: ignore[method-assign]
    got = here.fetch(key(3), lambda: pytest.fail("read from the source"), home=0)
    np.testing.assert_array_equal(got["x"], big["x"])
    assert here.stats["peer_hits"] == 1 and here.stats["peer_failures"] == 0


def _fetch_from_home(cache: NodeCache, out: str) -> None:
    """In a spawned process (a DataLoader worker's way): the cache arrives pickled."""
    got = cache.fetch(key(1), lambda: arrays(-1), home=0)
    np.save(out, got["x"])
    with open(out + ".json", "w") as f:
        json.dump(cache.stats, f)


def test_a_spawned_process_cooperates_with_the_pickled_cache(tmp_path, home) -> None:
    _, port = home
    here = consumer(tmp_path, peers_for(port))
    out = str(tmp_path / "got.npy")
    proc = multiprocessing.get_context("spawn").Process(target=_fetch_from_home, args=(here, out))
    proc.start()
    proc.join(60)
    assert proc.exitcode == 0
    np.testing.assert_array_equal(np.load(out), arrays(1)["x"])
    with open(out + ".json") as f:
        stats = json.load(f)
    assert stats["peer_hits"] == 1 and stats["misses"] == 0


def test_a_shard_its_home_does_not_hold_is_read_from_the_source(tmp_path, home) -> None:
    _, port = home
    here = consumer(tmp_path, peers_for(port, wait=0.1))
    got = here.fetch(key(9), lambda: arrays(9), home=0)
    np.testing.assert_array_equal(got["x"], arrays(9)["x"])
    assert here.stats["peer_absent"] == 1 and here.stats["misses"] == 1


@pytest.mark.parametrize("why", ["planned", "fetching"])
def test_an_entry_its_home_is_about_to_hold_is_waited_for_and_sent(tmp_path, home, why) -> None:
    """The home will read the shard later in its plan, or one of its processes is fetching
    it now: its server waits for the entry rather than send the peer to the source."""
    cache, port = home
    here = consumer(tmp_path, peers_for(port, wait=30.0))
    if why == "planned":
        cache.set_plan("later", [key(0), key(5)], np.array([0, 0, 1]))
    fetching = threading.Event()
    asked = threading.Event()

    def home_fetches() -> None:
        with cache._locks.hold(key(5)):  # what fetch() holds while it reads the source
            fetching.set()
            assert asked.wait(30)
            cache._writes.store(key(5), arrays(5))

    fetcher = threading.Thread(target=home_fetches if why == "fetching" else asked.wait)
    fetcher.start()
    assert why == "planned" or fetching.wait(30)
    real_get = here.peers.get

    def get(*a, **kw):
        asked.set()
        return real_get(*a, **kw)

    here.peers.get = get  # type: ignore[method-assign]
    result = {}
    t = threading.Thread(
        target=lambda: result.update(here.fetch(key(5), lambda: arrays(-1), home=0))
    )
    t.start()
    assert asked.wait(30)
    if why == "planned":
        cache.fetch(key(5), lambda: arrays(5))  # the home reaches it in its plan
    t.join(60)
    fetcher.join(60)
    assert not t.is_alive()
    np.testing.assert_array_equal(result["x"], arrays(5)["x"])
    assert here.stats["peer_hits"] == 1


@pytest.mark.timeout(30)
def test_a_home_that_will_not_hold_a_shard_says_so_at_once(tmp_path, home) -> None:
    """Not here, not being fetched, in no live plan of the home: the answer comes at once
    (the peer reads the source), however long the peer would have waited."""
    _, port = home
    here = consumer(tmp_path, peers_for(port, wait=600.0))
    got = here.fetch(key(8), lambda: arrays(8), home=0)
    np.testing.assert_array_equal(got["x"], arrays(8)["x"])
    assert here.stats["peer_absent"] == 1 and here.stats["misses"] == 1


def test_a_peer_with_another_secret_is_refused_both_ways(tmp_path, home) -> None:
    _, port = home
    wrong = peers_for(port, secret=b"x" * 32)
    with pytest.raises(PeerError, match="did not prove"):
        wrong.get(0, key(1), 1 << 30, lambda n: pytest.fail("nothing may be received"))
    here = consumer(tmp_path, wrong)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = here.fetch(key(1), lambda: arrays(1), home=0)
    np.testing.assert_array_equal(got["x"], arrays(1)["x"])
    assert here.stats["peer_failures"] == 1 and here.stats["misses"] == 1
    assert any(issubclass(w.category, CacheWarning) for w in caught)


def test_a_client_without_the_secret_gets_nothing(home) -> None:
    _, port = home
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(peers_mod.MAGIC + b"n" * peers_mod.NONCE)
        peers_mod._recv_exact(sock, peers_mod.NONCE + peers_mod.MAC)
        # A wrong proof, and a request right behind it.
        sock.sendall(b"\0" * peers_mod.MAC + peers_mod.REQUEST.pack(key(1).encode(), 0.0, 1 << 30))
        try:
            got = sock.recv(1 << 20)
        except ConnectionResetError:  # closed with the request unread
            got = b""
        assert got == b"", "the server closes without sending anything"


def test_sizes_are_checked_before_anything_is_reserved(tmp_path, home) -> None:
    _, port = home
    reserved = []
    with pytest.raises(PeerError, match="more than"):
        peers_for(port).get(0, key(1), 1000, lambda n: reserved.append(n))
    assert reserved == []


def test_a_dead_or_silent_peer_costs_a_timeout_and_a_read_of_the_source(tmp_path) -> None:
    dead = socket.socket()
    dead.bind(("127.0.0.1", 0))
    port = dead.getsockname()[1]
    dead.close()  # nothing listens there
    here = consumer(tmp_path, peers_for(port, timeout=1.0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CacheWarning)
        got = here.fetch(key(1), lambda: arrays(1), home=0)
    np.testing.assert_array_equal(got["x"], arrays(1)["x"])
    assert here.stats["peer_failures"] == 1
    # A peer that accepts and then says nothing: each wait is bounded by the timeout.
    silent = socket.create_server(("127.0.0.1", 0))
    try:
        here.peers = peers_for(silent.getsockname()[1], timeout=0.5)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", CacheWarning)
            got = here.fetch(key(2), lambda: arrays(2), home=0)
        np.testing.assert_array_equal(got["x"], arrays(2)["x"])
        assert here.stats["peer_failures"] == 2
    finally:
        silent.close()
    assert os.listdir(os.path.join(here.path, "tmp")) == []


def test_an_entry_damaged_at_home_is_caught_and_read_from_the_source(tmp_path, home) -> None:
    cache, port = home
    path = os.path.join(cache.path, "entries", key(2))
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) - 100)
        f.write(b"\xff\xfe")
    here = consumer(tmp_path, peers_for(port))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CacheWarning)
        got = here.fetch(key(2), lambda: arrays(2), home=0)
    np.testing.assert_array_equal(got["x"], arrays(2)["x"])
    assert here.stats["corrupt"] == 1 and here.stats["misses"] == 1
    assert os.listdir(os.path.join(here.path, "tmp")) == []


# -- real MPI ranks on two "nodes" --------------------------------------------------------------
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from test_mpi import MPIEXEC, mpiexec, mpirun  # noqa: E402


def coop_run(root, out, *flags: str, n: int = 4, timeout: float = 240) -> dict:
    os.makedirs(out, exist_ok=True)
    result = mpiexec(
        n,
        sys.executable,
        os.path.join(HERE, "mpi_coop.py"),
        str(root),
        str(out),
        *flags,
        timeout=timeout,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    with open(os.path.join(out, "result.json")) as f:
        return json.load(f)


@pytest.mark.timeout(600)
@pytest.mark.parametrize(
    "flags", [(), ("--workers", "2", "--prefetch")], ids=["batches", "workers2-prefetch"]
)
def test_cooperating_nodes_read_the_source_once_per_job(tmp_path, flags) -> None:
    """4 ranks on 2 nodes, 3 shuffled epochs; each node's cache holds 3/4 of the dataset:
    together they hold it, alone neither does. Every batch is checked."""
    coop = coop_run(tmp_path, tmp_path / "coop", *flags)
    print(f"source bytes / dataset: cooperating {coop['source_over_dataset']:.3f}")
    assert coop["bad"] == 0
    assert coop["source_over_dataset"] <= 1.1, coop
    assert coop["peer_bytes"] > 0 and coop["peer_failures"] == 0
    if not flags:  # the same caches alone, once: about nodes x the dataset
        solo = coop_run(tmp_path, tmp_path / "solo", "--solo", *flags)
        print(f"source bytes / dataset alone: {solo['source_over_dataset']:.3f}")
        assert solo["bad"] == 0 and solo["source_over_dataset"] > 1.5, solo


# -- two "hosts": network namespaces joined by a veth pair ---------------------------------------
def _ip(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)


@pytest.fixture
def hosts():
    """Two network namespaces, 10.77.<n>.1 and .2 on the two ends of a veth pair."""
    tag = f"{os.getpid() % 10000}"
    a, b = f"dpA{tag}", f"dpB{tag}"
    if shutil.which("ip") is None or _ip("netns", "add", a).returncode != 0:
        pytest.skip("network namespaces are not permitted here (ip netns add failed)")
    net = f"10.77.{os.getpid() % 250}"
    try:
        steps = [
            ("netns", "add", b),
            ("link", "add", f"va{tag}", "type", "veth", "peer", "name", f"vb{tag}"),
            ("link", "set", f"va{tag}", "netns", a),
            ("link", "set", f"vb{tag}", "netns", b),
            ("-n", a, "addr", "add", f"{net}.1/24", "dev", f"va{tag}"),
            ("-n", b, "addr", "add", f"{net}.2/24", "dev", f"vb{tag}"),
            ("-n", a, "link", "set", f"va{tag}", "up"),
            ("-n", b, "link", "set", f"vb{tag}", "up"),
            ("-n", a, "link", "set", "lo", "up"),
            ("-n", b, "link", "set", "lo", "up"),
        ]
        for step in steps:
            done = _ip(*step)
            assert done.returncode == 0, f"ip {' '.join(step)}: {done.stderr}"
        yield {"ns": (a, b), "addr": (f"{net}.1", f"{net}.2"), "link": (a, f"va{tag}")}
    finally:
        for ns in (a, b):
            _ip("netns", "delete", ns)  # takes its end of the veth pair with it


def netns_run(hosts, root, out, *flags: str) -> subprocess.Popen:
    os.makedirs(out, exist_ok=True)
    script = os.path.join(HERE, "mpi_coop.py")
    common = [str(root), str(out), "--interfaces", ",".join(hosts["addr"]), *flags]
    argv = [MPIEXEC]
    for k, ns in enumerate(hosts["ns"]):
        if k:
            argv.append(":")
        argv += ["-n", "2", "ip", "netns", "exec", ns, sys.executable, script, *common]
    return subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True
    )


def finished(proc: subprocess.Popen, out, timeout: float = 240) -> dict:
    text, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, text
    with open(os.path.join(out, "result.json")) as f:
        return json.load(f)


@pytest.mark.timeout(600)
def test_nodes_in_two_network_namespaces_serve_each_other_and_survive_a_cut_link(
    tmp_path, hosts
) -> None:
    """Each node's server listens on its own end of a veth pair. Whole: the source is read
    once. Cut halfway through epoch 1 (``ip link set ... down``): the nodes read the source
    instead, within their timeouts, and every batch is still right."""
    whole = finished(netns_run(hosts, tmp_path, tmp_path / "whole"), tmp_path / "whole")
    assert whole["bad"] == 0 and whole["peer_failures"] == 0, whole
    assert whole["source_over_dataset"] <= 1.1 and whole["peer_bytes"] > 0, whole

    out = tmp_path / "cut"
    proc = netns_run(hosts, tmp_path, out, "--cut-in", "1")
    try:
        deadline = time.monotonic() + 240
        while not (out / "cut").exists():
            assert proc.poll() is None, proc.communicate()[0]
            assert time.monotonic() < deadline, "the ranks never reached the middle of epoch 1"
            time.sleep(0.05)
        ns, dev = hosts["link"]
        done = _ip("-n", ns, "link", "set", dev, "down")
        assert done.returncode == 0, done.stderr
        (out / "cut-done").touch()
        cut = finished(proc, out)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    print(f"cut link: {cut}")
    assert cut["bad"] == 0, cut
    assert cut["peer_failures"] > 0, cut
    assert cut["source_over_dataset"] > whole["source_over_dataset"], (whole, cut)


def test_joining_refuses_bad_settings_on_every_rank(tmp_path) -> None:
    """Two ranks of one node naming two cache directories, or an address no node has: every
    rank raises (none is left waiting in a collective), saying what to change."""
    code = f"""
        from dataplane.cache import NodeCache
        from dataplane.cache.peers import PeerError
        from dataplane.errors import OptionError
        comm = MPI.COMM_WORLD
        got = []
        try:
            NodeCache({str(tmp_path)!r} + f"/c{{comm.rank}}", "1GB", comm=comm, node="same")
        except OptionError as exc:
            got.append(str(exc))
        try:
            NodeCache({str(tmp_path)!r} + f"/d{{comm.rank}}", "1GB", comm=comm,
                      node=f"n{{comm.rank}}", interface="192.0.2.1")
        except PeerError as exc:
            got.append(str(exc))
        report(got)
    """
    got = mpirun(2, code, tmp_path)
    for rank in (0, 1):
        assert len(got[rank]) == 2, got
        assert "two cache directories" in got[rank][0]
        assert "did not start" in got[rank][1] and "192.0.2.1" in got[rank][1]
