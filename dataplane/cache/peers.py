"""Cooperative node caches: the nodes of one job serve each other's cache entries.

Every shard has a *home* node (:func:`homes`, a pure function of every node's first use of
each shard in the job's order): the home fetches it from the source and keeps it where
capacity allows; another node that needs it asks the home for its entry over a socket, and
falls back to the source only when the home neither has it nor is about to (it says so at
once), or is slow or gone. Each node runs one server process (:func:`main`), started by the
node's lowest rank, serving its cache directory's entries with ``sendfile``; it ends when that
rank does.

Every connection proves both ends hold the job's secret (made by rank 0, shared over MPI):
HMAC-SHA256 over both sides' nonces. A reply's size is checked before any space is reserved,
and what arrives is an entry whose checksum is checked before it is renamed into the cache.
Nothing received is unpickled.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import hmac
import json
import mmap
import os
import re
import secrets
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from dataplane.cache._files import NOFOLLOW, KeyLocks
from dataplane.cache.plans import Plans
from dataplane.cache.policy import NEVER
from dataplane.errors import DataplaneError, OptionError

__all__ = ["PeerError", "Peers", "first_uses", "homes"]

MAGIC = b"DPPEER1\n"
NONCE = 16
MAC = 32
REQUEST = struct.Struct("<40sdq")  # key, seconds the server may wait for it, most bytes taken
REPLY = struct.Struct("<q")  # bytes of the entry that follow, or ABSENT
ABSENT = -1
TOO_BIG = -2
#: The longest a server waits for an entry a peer asks for (its home may still be fetching).
MAX_WAIT = 60.0
#: A server waits for an entry its node's readers will reach within this many samples (ranks
#: of a job move about together); one needed later is not worth the asking node's wait.
WAIT_AHEAD = 2048
#: Seconds a peer that failed is not asked again (the source is read instead).
RETRY_AFTER = 30.0
_POLL = 0.005  # seconds between a server's looks for an entry being fetched at home
_KEY_RE = re.compile(rb"^[0-9a-f]{40}$")
_SERVER = "import sys; from dataplane.cache.peers import main; sys.exit(main())"


#: Opens a temporary file for an entry of the given size, its space reserved (None: no room).
Reserve = Callable[[int], "tuple[int, str] | None"]


class PeerError(DataplaneError, ConnectionError):
    """A peer could not be reached, did not prove it belongs to the job, or broke off."""


# -- where each shard lives: pure functions ----------------------------------------------------
def first_uses(
    orders: list[np.ndarray], rank_nodes: list[int], bounds: np.ndarray, nodes: int
) -> np.ndarray:
    """``(nodes, shards)``: the first position at which any rank of each node reads each
    shard in ``orders`` (rank ``r``'s order of samples), NEVER where a node reads none of it."""
    nshards = len(bounds) - 1
    out = np.full((nodes, nshards), NEVER, dtype=np.int64)
    for order, node in zip(orders, rank_nodes):
        order = np.asarray(order, dtype=np.int64)
        if not len(order):
            continue
        shard = np.searchsorted(bounds, order, side="right") - 1
        first = np.full(nshards, NEVER, dtype=np.int64)
        np.minimum.at(first, shard, np.arange(len(order), dtype=np.int64))
        np.minimum(out[node], first, out=out[node])
    return out


def homes(first: np.ndarray, nbytes: np.ndarray, slack: float = 1.1) -> np.ndarray:
    """The home node of each shard: the node that reads it first (``first``: see
    :func:`first_uses`), so that a fetch lands where it is needed first, unless that node
    already holds more than ``slack`` times its fair share of bytes (then the next node that
    reads it, else the least loaded): fetches from the source stay balanced. Shards no node
    reads go to the least loaded node. Every node computes the same answer from the same
    order."""
    first = np.asarray(first, dtype=np.int64)
    nodes, nshards = first.shape
    nbytes = np.asarray(nbytes, dtype=np.int64)
    if nodes <= 1 or not nshards:
        return np.zeros(nshards, dtype=np.int64)
    cap = slack * float(nbytes.sum()) / nodes + float(nbytes.max())
    earliest = first.min(axis=0)
    readers = np.argmin(first, axis=0)  # the first node to read each shard (lowest on a tie)
    if (earliest != NEVER).all():
        totals = np.bincount(readers, weights=nbytes.astype(np.float64), minlength=nodes)
        if (totals <= cap).all():
            out: np.ndarray = readers.astype(np.int64)
            return out  # no share is ever full: what the walk below gives
    return _walk(first, nbytes, cap, earliest)


def _walk(first: np.ndarray, nbytes: np.ndarray, cap: float, earliest: np.ndarray) -> np.ndarray:
    """:func:`homes` shard by shard, in order of first use, with each node's load so far."""
    nodes, nshards = first.shape
    out = np.zeros(nshards, dtype=np.int64)
    load = np.zeros(nodes, dtype=np.float64)
    for s in np.lexsort((np.arange(nshards), earliest)).tolist():
        size = float(nbytes[s])
        chosen = -1
        if earliest[s] != NEVER:
            for n in np.argsort(first[:, s], kind="stable").tolist():
                if first[n, s] == NEVER:
                    break
                if load[n] + size <= cap:
                    chosen = n
                    break
        if chosen < 0:
            chosen = int(np.argmin(load))
        out[s] = chosen
        load[chosen] += size
    return out


# -- the job's nodes ---------------------------------------------------------------------------
class Peers:
    """The job's nodes as one process sees them: which node it is on, where each node's server
    listens, which node each rank is on, and the job's secret. JSON-able (``spec``), so that
    DataLoader workers and prefetch processes of the node cooperate too."""

    def __init__(
        self,
        job: str,
        node: int,
        names: list[str],
        addresses: list[tuple[str, int]],
        rank_nodes: list[int],
        secret: bytes,
        timeout: float,
        wait: float,
        server: int = 0,
    ) -> None:
        self.job, self.node, self.names = job, int(node), list(names)
        self.server = int(server)  # this node's server process: entries are homed while it runs
        self.addresses = [(str(h), int(p)) for h, p in addresses]
        self.rank_nodes = [int(n) for n in rank_nodes]
        self.secret, self.timeout, self.wait = secret, float(timeout), float(wait)
        self._server: subprocess.Popen[bytes] | None = None
        self._down: dict[int, float] = {}  # node -> until when it is not asked again

    def spec(self) -> dict[str, Any]:
        return {
            "job": self.job,
            "node": self.node,
            "names": self.names,
            "addresses": [list(a) for a in self.addresses],
            "rank_nodes": self.rank_nodes,
            "secret": self.secret.hex(),
            "timeout": self.timeout,
            "wait": self.wait,
            "server": self.server,
        }

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> Peers:
        return cls(
            spec["job"],
            spec["node"],
            spec["names"],
            [tuple(a) for a in spec["addresses"]],
            spec["rank_nodes"],
            bytes.fromhex(spec["secret"]),
            spec["timeout"],
            spec["wait"],
            spec.get("server", 0),
        )

    def __reduce__(self) -> Any:
        return (Peers.from_spec, (self.spec(),))

    @property
    def nodes(self) -> int:
        return len(self.names)

    @classmethod
    def join(
        cls,
        comm: Any,
        path: str,
        node: str | None,
        interface: str,
        timeout: float,
        wait: float,
    ) -> Peers:
        """Collective over ``comm``: find the nodes, start one server per node (on its lowest
        rank) listening on ``interface``, and share addresses and a secret."""
        rank = comm.Get_rank()
        if node is None:
            from mpi4py import MPI

            local = comm.Split_type(MPI.COMM_TYPE_SHARED, key=rank)
            node = f"{socket.gethostname()}/{local.bcast(rank, root=0)}"
            local.Free()
        elif not isinstance(node, str) or not node:
            raise OptionError(f"node must be a non-empty string naming the node, got {node!r}")
        mine = (str(node), path)
        everyone = comm.allgather(mine)
        names = sorted({n for n, _ in everyone})
        rank_nodes = [names.index(n) for n, _ in everyone]
        paths: dict[str, str] = {}
        for n, p in everyone:
            if paths.setdefault(n, p) != p:
                raise OptionError(
                    f"ranks of node {n!r} name two cache directories ({paths[n]} and {p}): "
                    f"the ranks of one node share one cache; give them the same path"
                )
        me = names.index(str(node))
        leader = rank_nodes.index(me) == rank
        secret = comm.bcast(secrets.token_bytes(32) if rank == 0 else None, root=0)
        job = comm.bcast(secrets.token_hex(8) if rank == 0 else None, root=0)
        server = port = error = None
        if leader:
            try:
                server, port = _start_server(path, interface, secret, timeout)
            except (OSError, DataplaneError) as exc:
                error = f"node {node!r}: {exc}"
        pid = None if server is None else server.pid
        got = comm.allgather((me, interface, port, error, pid) if leader else None)
        errors = [g[3] for g in got if g is not None and g[3]]
        if errors:
            if server is not None:
                server.kill()
            raise PeerError(f"a node's cache server did not start: {'; '.join(errors)}")
        addresses: list[tuple[str, int]] = [("", 0)] * len(names)
        pids = [0] * len(names)
        for g in got:
            if g is not None:
                addresses[g[0]] = (g[1], g[2])
                pids[g[0]] = g[4]
        peers = cls(job, me, names, addresses, rank_nodes, secret, timeout, wait, pids[me])
        peers._server = server
        return peers

    def close(self) -> None:
        """Stop this process's server, if it started one."""
        if self._server is not None:
            with contextlib.suppress(OSError):
                self._server.stdin.close()  # type: ignore[union-attr]
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._server.wait(5)
            if self._server.poll() is None:
                self._server.kill()
                self._server.wait()
            self._server = None

    # -- the client --------------------------------------------------------------------------
    def get(
        self,
        node: int,
        key: str,
        most: int,
        reserve: Reserve,
    ) -> tuple[str, int] | None:
        """Ask ``node`` for entry ``key`` (at most ``most`` bytes) and receive it into the file
        ``reserve(size)`` opens (its space reserved; None: no room). Returns (the file, its
        size), or None when the peer does not hold it. Raises :class:`PeerError` when the peer
        is unreachable, slow (each wait is bounded by the timeout), or fails the handshake:
        then it is not asked again for ``RETRY_AFTER`` seconds, so that a dead peer costs one
        timeout, not one per shard."""
        host, port = self.addresses[node]
        down = self._down.get(node)
        if down is not None and time.monotonic() < down:
            raise PeerError(
                f"cache server of node {self.names[node]!r} at {host}:{port} failed less than "
                f"{RETRY_AFTER:.0f} s ago"
            )
        try:
            got = self._get(node, key, most, reserve)
        except PeerError:
            self._down[node] = time.monotonic() + RETRY_AFTER
            raise
        except _Local as exc:
            raise exc.error from None
        self._down.pop(node, None)
        return got

    def _get(self, node: int, key: str, most: int, reserve: Reserve) -> tuple[str, int] | None:
        host, port = self.addresses[node]
        try:
            with socket.create_connection((host, port), timeout=self.timeout) as sock:
                sock.settimeout(self.timeout)
                _client_handshake(sock, self.secret)
                sock.sendall(REQUEST.pack(key.encode(), self.wait, int(most)))
                # The server may wait up to ``wait`` for the entry before it answers.
                sock.settimeout(self.timeout + self.wait)
                (size,) = REPLY.unpack(_recv_exact(sock, REPLY.size))
                sock.settimeout(self.timeout)
                if size == ABSENT:
                    return None
                if size < 0 or size > most:
                    raise PeerError(
                        f"node {self.names[node]!r} offered {size} bytes for entry {key}, "
                        f"more than the {most} it may be"
                    )
                try:
                    got = reserve(size)
                except OSError as exc:  # this node's disk, not the peer
                    raise _Local(exc) from None
                if got is None:
                    return None
                fd, tmp = got
                try:
                    _recv_into_file(sock, fd, size)
                except BaseException:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(tmp)
                    raise
                finally:
                    os.close(fd)
                return tmp, size
        except (OSError, struct.error) as exc:
            raise PeerError(
                f"cache server of node {self.names[node]!r} at {host}:{port}: {exc}"
            ) from None


class _Local(Exception):
    def __init__(self, error: OSError) -> None:
        self.error = error


def _mac(secret: bytes, *parts: bytes) -> bytes:
    return hmac.new(secret, b"".join(parts), hashlib.sha256).digest()


def _client_handshake(sock: socket.socket, secret: bytes) -> None:
    mine = secrets.token_bytes(NONCE)
    sock.sendall(MAGIC + mine)
    theirs = _recv_exact(sock, NONCE)
    proof = _recv_exact(sock, MAC)
    if not hmac.compare_digest(proof, _mac(secret, b"server", mine, theirs)):
        raise PeerError("the server did not prove it belongs to this job (wrong secret)")
    sock.sendall(_mac(secret, b"client", theirs, mine))


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray(n)
    _recv_into(sock, memoryview(buf))
    return bytes(buf)


def _recv_into_file(sock: socket.socket, fd: int, size: int) -> None:
    if size == 0:
        return
    m = mmap.mmap(fd, size)
    try:
        view = memoryview(m)
        try:
            _recv_into(sock, view)
        finally:
            view.release()
    finally:
        m.close()


def _recv_into(sock: socket.socket, view: memoryview) -> None:
    """Fill ``view`` from ``sock`` (each wait bounded by the socket's timeout)."""
    got, n = 0, len(view)
    while got < n:
        k = sock.recv_into(view[got:], n - got)
        if k == 0:
            raise PeerError(f"the connection closed after {got} of {n} bytes")
        got += k


# -- the server --------------------------------------------------------------------------------
def _start_server(
    path: str, interface: str, secret: bytes, timeout: float
) -> tuple[subprocess.Popen[bytes], int]:
    """Start this node's server process; returns it and its port."""
    proc = subprocess.Popen(
        [sys.executable, "-c", _SERVER],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        close_fds=True,
    )
    assert proc.stdin is not None and proc.stdout is not None
    config = {"path": path, "host": interface, "secret": secret.hex(), "timeout": timeout}
    proc.stdin.write(json.dumps(config).encode() + b"\n")
    proc.stdin.flush()
    line = proc.stdout.readline()
    try:
        answer = json.loads(line)
    except ValueError:
        answer = {}
    if "port" not in answer:
        proc.kill()
        proc.wait()
        why = answer.get("error", "it exited before saying its port")
        raise PeerError(f"the cache server for {path} on {interface}: {why}")
    return proc, int(answer["port"])


def main() -> int:
    """A node's cache server: the first line of stdin configures it; it prints its port and
    serves until stdin closes (its rank ended)."""
    config = json.loads(sys.stdin.readline())
    node = _Node(config["path"], float(config["timeout"]))
    secret = bytes.fromhex(config["secret"])
    try:
        srv = socket.create_server((config["host"], 0))
    except OSError as exc:
        print(json.dumps({"error": f"cannot listen: {exc}"}), flush=True)
        return 1
    print(json.dumps({"port": srv.getsockname()[1]}), flush=True)

    def watch() -> None:
        sys.stdin.read()
        os._exit(0)

    threading.Thread(target=watch, daemon=True).start()
    while True:
        conn, _ = srv.accept()
        threading.Thread(target=_serve, args=(conn, node, secret), daemon=True).start()


class _Node:
    """What a server knows of its node's cache: its entries, and whether one that is not
    there yet will be soon (a process of the node fetches it now, or a live plan reads it
    within ``WAIT_AHEAD`` samples)."""

    def __init__(self, path: str, timeout: float) -> None:
        self.entries = os.path.join(path, "entries")
        self.timeout = timeout
        self._plans = Plans(os.path.join(path, "plans"))
        self._locks = KeyLocks(os.path.join(path, "keys.lock"), timeout)
        self._mutex = threading.Lock()

    def coming(self, key: str) -> bool:
        with self._locks.try_hold(key) as free:
            if not free:
                return True  # being fetched
        with self._mutex:
            live = self._plans.live()
        return any(plan.next_use(key, at) - at <= WAIT_AHEAD for plan, at in live)

    def open(self, key: str, wait: float) -> int | None:
        """Entry ``key`` opened (the descriptor keeps it while it is sent, even if it is
        evicted meanwhile), waiting up to ``wait`` seconds for it while it is coming; None
        at once when it is neither here nor coming (the peer reads the source, not wait)."""
        path = os.path.join(self.entries, key)
        end = time.monotonic() + wait
        looks = 0
        while True:
            try:
                return os.open(path, os.O_RDONLY | NOFOLLOW)
            except FileNotFoundError:
                pass
            except OSError as exc:
                if exc.errno == errno.ELOOP:
                    return None
                raise
            if time.monotonic() >= end or (looks % 100 == 0 and not self.coming(key)):
                return None
            looks += 1
            time.sleep(_POLL)


def _serve(conn: socket.socket, node: _Node, secret: bytes) -> None:
    with conn, contextlib.suppress(OSError, PeerError, struct.error):
        conn.settimeout(node.timeout)
        hello = _recv_exact(conn, len(MAGIC) + NONCE)
        if hello[: len(MAGIC)] != MAGIC:
            return
        theirs = hello[len(MAGIC) :]
        mine = secrets.token_bytes(NONCE)
        conn.sendall(mine + _mac(secret, b"server", theirs, mine))
        if not hmac.compare_digest(_recv_exact(conn, MAC), _mac(secret, b"client", mine, theirs)):
            return
        key, wait, most = REQUEST.unpack(_recv_exact(conn, REQUEST.size))
        if not _KEY_RE.match(key):
            return
        fd = node.open(key.decode(), min(max(wait, 0.0), MAX_WAIT))
        if fd is None:
            conn.sendall(REPLY.pack(ABSENT))
            return
        with open(fd, "rb") as f:
            size = os.fstat(fd).st_size
            if size > most:
                conn.sendall(REPLY.pack(TOO_BIG))
                return
            conn.sendall(REPLY.pack(size))
            # socket.sendfile waits for a slow receiver (up to the timeout each time);
            # os.sendfile on a socket with a timeout fails as soon as its buffer is full.
            conn.sendfile(f, 0, size)
