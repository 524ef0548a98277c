"""Consumers' published futures: for each, the order in which it will read shards and how far
it got, in ``<cache>/plans`` (``<pid>-<id>.npz`` and a shared 8-byte ``.pos``). Eviction and the
prefetcher read them."""

from __future__ import annotations

import contextlib
import mmap
import os
import re
import secrets
import struct

import numpy as np

from dataplane.cache._files import open_file, pid_alive
from dataplane.cache.policy import Plan


class Plans:
    """The plans in one cache directory, as one process sees and publishes them."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._positions: dict[str, mmap.mmap] = {}  # plan -> its shared position
        self._loaded: dict[str, tuple[int, Plan]] = {}  # plan -> (file mtime, plan)

    def publish(self, plan_id: str, keys: list[str], uses: np.ndarray) -> str:
        """Publish a consumer's future: ``uses[p]`` is the index in ``keys`` of the shard read
        at position ``p``. Returns the plan's file id (pass it to :meth:`advance`)."""
        name = f"{os.getpid()}-{re.sub(r'[^A-Za-z0-9_.-]', '_', plan_id)}"
        base = os.path.join(self.path, name)
        tmp = f"{base}.{secrets.token_hex(4)}.tmp"
        blob = np.frombuffer("\n".join(keys).encode(), dtype=np.uint8)
        with os.fdopen(open_file(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL), "wb") as f:
            np.savez(f, keys=blob, uses=np.asarray(uses, dtype=np.int64))
        self.advance(name, 0)
        os.replace(tmp, base + ".npz")
        return name

    def advance(self, plan: str, position: int) -> None:
        """Tell eviction and prefetching that the consumer of ``plan`` reached ``position``."""
        pos = self._positions.get(plan)
        if pos is None:
            fd = open_file(os.path.join(self.path, plan + ".pos"), os.O_RDWR | os.O_CREAT)
            try:
                if os.fstat(fd).st_size < 8:
                    os.posix_fallocate(fd, 0, 8)
                pos = self._positions[plan] = mmap.mmap(fd, 8)
            finally:
                os.close(fd)
        struct.pack_into("<q", pos, 0, int(position))

    def drop(self, plan: str) -> None:
        """Forget a plan (its consumer moved on to another)."""
        self._positions.pop(plan, None)
        for ext in (".npz", ".pos"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(self.path, plan + ext))

    def load(self, plan: str) -> tuple[Plan, int] | None:
        """A plan and its consumer's position (None if gone)."""
        base = os.path.join(self.path, plan)
        try:
            mtime = os.stat(base + ".npz").st_mtime_ns
            with os.fdopen(open_file(base + ".pos", os.O_RDONLY), "rb") as f:
                (position,) = struct.unpack("<q", f.read(8))
        except (FileNotFoundError, struct.error):
            return None
        cached = self._loaded.get(plan)
        if cached is None or cached[0] != mtime:
            try:
                with np.load(base + ".npz", allow_pickle=False) as z:
                    keys = bytes(z["keys"]).decode().split("\n") if len(z["keys"]) else []
                    uses = z["uses"]
            except (OSError, ValueError, KeyError):
                return None
            cached = self._loaded[plan] = (mtime, Plan(keys, uses))
        return cached[1], position

    def live(self) -> list[tuple[Plan, int]]:
        """Every plan whose consumer has not reached its end, with its position."""
        out = []
        for name in os.listdir(self.path):
            if name.endswith(".npz"):
                got = self.load(name[:-4])
                if got is not None and got[1] < len(got[0]):
                    out.append(got)
        return out

    def sweep(self) -> None:
        """Remove the plans of processes that are gone."""
        for name in os.listdir(self.path):
            pid = name.split("-", 1)[0]
            if pid.isdigit() and not pid_alive(int(pid)):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(self.path, name))

    def close(self, mine: bool) -> None:
        """Let go of the position mappings (``mine``: made in this process)."""
        if mine:
            for pos in self._positions.values():
                pos.close()
        self._positions = {}
