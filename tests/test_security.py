"""Nothing read is ever unpickled; names and keys stay inside their directories; what dataplane
creates for a channel or a cache is owner-only."""

from __future__ import annotations

import json
import os
import pickle
import stat
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

import dataplane as dp
from dataplane.cache import CacheWarning, NodeCache

pytestmark = pytest.mark.timeout(120)


class _Plant:
    """Unpickling this creates the marker file: proof that something unpickled it."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _read_everything(url: str) -> list[str]:
    """Read every variable of every step and every attribute, through each public path;
    returns the dataplane errors raised on the way (anything else fails the test)."""
    errors = []
    try:
        with dp.open(url) as arc:
            _ = arc.attrs
            for i in range(len(arc)):
                step = arc[i]
                _ = step.attrs
                for name in step.vars:
                    np.asarray(step[name])
    except dp.DataplaneError as exc:
        errors.append(f"open: {exc}")
    try:
        with dp.subscribe(url, timeout=5) as sub:
            for step in sub:
                for name in step.vars:
                    np.asarray(step[name])
    except dp.DataplaneError as exc:
        errors.append(f"subscribe: {exc}")
    cli = subprocess.run(
        [sys.executable, "-m", "dataplane.cli", "inspect", url, "--attrs", "--json"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert cli.returncode in (0, 1) and "Traceback" not in cli.stderr, cli.stderr
    return errors


def test_planted_pickles_are_never_unpickled(tmp_path) -> None:
    marker = str(tmp_path / "UNPICKLED")
    payload = pickle.dumps(_Plant(marker))
    # HDF5 written by another program: the payload as opaque bytes, a string, an attribute.
    foreign = tmp_path / "foreign.h5"
    with h5py.File(foreign, "w") as f:
        f["blob"] = np.frombuffer(payload, np.uint8)
        f["opaque"] = np.void(payload)
        f.attrs["evil"] = np.void(payload)
        f.attrs["evil_text"] = pickle.dumps(_Plant(marker), protocol=0).decode("ascii")
    # A Zarr v2 array whose codec is pickle: zarr itself would unpickle it.
    evil = tmp_path / "evil.zarr"
    (evil / "x").mkdir(parents=True)
    (evil / ".zgroup").write_text(json.dumps({"zarr_format": 2}))
    (evil / "x" / ".zarray").write_text(
        json.dumps(
            {
                "zarr_format": 2,
                "shape": [1],
                "chunks": [1],
                "dtype": "|O",
                "compressor": None,
                "filters": [{"id": "pickle", "protocol": 5}],
                "fill_value": 0,
                "order": "C",
            }
        )
    )
    (evil / "x" / "0").write_bytes(pickle.dumps(np.array([_Plant(marker)], dtype=object)))
    # dataplane's own step records replaced by the payload.
    own = tmp_path / "own.h5"
    with dp.publish(f"h5://{own}") as pub:
        pub.write({"u": np.arange(4.0)}, attrs={"t": 1.0})
    with h5py.File(own, "r+") as f:
        meta = f["__dataplane/meta"]
        meta.resize((len(payload),))
        meta[:] = np.frombuffer(payload, np.uint8)
    errors = []
    for url in (f"h5://{foreign}", f"zarr://{evil}", f"h5://{own}"):
        errors += _read_everything(url)
    assert not os.path.exists(marker), "something unpickled data read from a channel"
    assert any("zarr" in e for e in errors), errors  # refused, with a dataplane error
    assert any("own.h5" in e for e in errors), errors


def test_cache_keys_and_variable_names_stay_inside(tmp_path) -> None:
    cache = NodeCache(tmp_path / "cache", capacity="1MB")
    outside = tmp_path / "escaped"
    for key in ("../../escaped", str(outside), "a\0b", "entries/../../escaped"):
        with pytest.raises(dp.DataplaneError, match="not one NodeCache.key"):
            cache.fetch(key, lambda: {"x": np.zeros(2)})
    assert not outside.exists()
    for scheme, where in (("h5", "v.h5"), ("zarr", "v.zarr"), ("bp5", "v.bp")):
        with dp.publish(f"{scheme}://{tmp_path / where}") as pub:
            for name in ("../up", "/abs", "a\0b", "..", "x/../../y"):
                with pytest.raises(dp.SchemaError):
                    pub.write({name: np.zeros(2)})
            pub.write({"ok": np.zeros(2)})
    leftovers = {p.name for p in tmp_path.iterdir()}
    names = {"cache"} | {
        f"v.{ext}{lease}" for ext in ("h5", "zarr", "bp") for lease in ("", ".lease")
    }
    assert leftovers == names


def test_a_symlinked_cache_entry_is_not_followed_out(tmp_path) -> None:
    """Someone replaces an entry by a symlink to a file elsewhere: it is never served (the
    checksum fails) and never written through."""
    cache = NodeCache(tmp_path / "cache", capacity="1MB")
    key = NodeCache.key("sym", 0)
    cache.fetch(key, lambda: {"x": np.arange(8.0)})
    cache.close()
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious" * 100)
    entry = tmp_path / "cache" / "entries" / key
    entry.unlink()
    entry.symlink_to(victim)
    again = NodeCache(tmp_path / "cache", capacity="1MB")
    with pytest.warns(CacheWarning, match="corrupt"):
        got = again.fetch(key, lambda: {"x": np.arange(8.0)})
    np.testing.assert_array_equal(got["x"], np.arange(8.0))
    assert again.stats["corrupt"] == 1
    assert victim.read_bytes() == b"precious" * 100


def _mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_what_dataplane_creates_is_owner_only(tmp_path) -> None:
    cache = NodeCache(tmp_path / "cache", capacity="1MB")
    cache.fetch(NodeCache.key("m", 0), lambda: {"x": np.zeros(4)})
    for sub in ("", "entries", "tmp", "plans", "stats"):
        assert _mode(tmp_path / "cache" / sub) == 0o700, sub
    for entry in (tmp_path / "cache" / "entries").iterdir():
        assert _mode(entry) & 0o077 == 0, entry
    # An SST contact file says how to connect to the writer: only its owner may read it.
    url = f"sst://{tmp_path}/stream"
    pub = dp.publish(url)
    try:
        contact = tmp_path / "stream.sst"
        deadline = time.monotonic() + 30
        while not contact.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert contact.exists()
        assert _mode(contact) & 0o077 == 0, oct(_mode(contact))
    finally:
        pub.close()


@pytest.mark.parametrize(
    "planted", ["space", "generation", "lock", "keys.lock", "plans/{plan}.pos"]
)
def test_links_planted_in_a_cache_directory_are_never_followed(tmp_path, planted) -> None:
    """A symbolic link put where one of the cache's own files goes (its space counter, its
    generation, its locks, a plan's position): the cache refuses it, naming the link, and the
    file it points to is left as it was (the space and generation files used to be written
    through)."""
    cache_dir = tmp_path / "cache"
    first = NodeCache(cache_dir, capacity="1MB")
    plan = first.set_plan("p", [NodeCache.key("a", 0)], np.zeros(1, np.int64))
    first.close()
    name = planted.format(plan=plan)
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious" * 100)
    link = cache_dir / name
    link.unlink(missing_ok=True)
    link.symlink_to(victim)
    cache = NodeCache(cache_dir, capacity="1MB")
    with pytest.raises(dp.DataplaneError, match="symbolic link"):
        cache.fetch(NodeCache.key("a", 0), lambda: {"x": np.arange(8.0)})
        cache.set_plan("p", [NodeCache.key("a", 0)], np.zeros(1, np.int64))
        cache.advance(plan, 1)
        cache.load_plan(plan)
        cache._live_plans()  # what eviction reads
        raise AssertionError("every use of the cache went through")
    assert victim.read_bytes() == b"precious" * 100


def test_a_cache_directory_must_be_the_users_own(tmp_path) -> None:
    """Links in place of its folders, folders others can write to, or owned by someone else."""
    cache_dir = tmp_path / "cache"
    NodeCache(cache_dir, capacity="1MB").close()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (cache_dir / "entries").rmdir()
    (cache_dir / "entries").symlink_to(elsewhere)
    with pytest.raises(dp.DataplaneError, match="owned by you.*not a link"):
        NodeCache(cache_dir, capacity="1MB")
    (cache_dir / "entries").unlink()
    os.chmod(cache_dir, 0o777)
    NodeCache(cache_dir, capacity="1MB").close()
    assert _mode(cache_dir) == 0o700 and _mode(cache_dir / "entries") == 0o700
    linked = tmp_path / "linked"
    linked.symlink_to(cache_dir)  # a root the user links to is theirs to choose
    NodeCache(linked, capacity="1MB").close()
    if os.geteuid() == 0:  # root can give a directory away; another user finds one given
        theirs = tmp_path / "theirs"
        theirs.mkdir(mode=0o755)
        os.chown(theirs, 65534, 65534)
    else:
        theirs = Path("/")
    with pytest.raises(dp.DataplaneError, match="owned by you"):
        NodeCache(theirs, capacity="1MB")
