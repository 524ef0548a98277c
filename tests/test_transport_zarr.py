"""zarr:// (local directories) and zarr+memory:// (through fsspec) pass the conformance suite."""

from __future__ import annotations

import glob
import os

import numpy as np
import zarr

import dataplane as dp
from dataplane.testing import conformance


def plain_read(store_url: str):
    g = zarr.open_group(store_url, mode="r")
    arrays = {k: a[:] for k, a in g.arrays()}
    return arrays, dict(g.attrs)


class TestZarr(conformance("zarr")):
    def make_url(self, tmp_path, name):
        return f"zarr://{tmp_path}/{name}.zarr"

    @staticmethod
    def path(url: str) -> str:
        return url.split("://", 1)[1]

    def plain_read(self, url):
        return plain_read(self.path(url))

    def data_files(self, url):
        return sorted(
            f
            for f in glob.glob(os.path.join(self.path(url), "**", "*"), recursive=True)
            if os.path.isfile(f)
        )

    def corruption_targets(self, url):
        out = []
        for f in glob.glob(os.path.join(self.path(url), "u", "c", "**"), recursive=True):
            if os.path.isfile(f):
                rows = zarr.open_array(self.path(url) + "/u", mode="r").shape[0]
                out.append((f, 0, min(os.path.getsize(f), rows * 64 * 8)))
        return out


class TestZarrMemory(conformance("zarr", scope="process")):
    """Through fsspec's memory filesystem: the same code path as remote object stores."""

    def make_url(self, tmp_path, name):
        return f"zarr+memory://{name}"

    def plain_read(self, url):
        return plain_read("memory://" + url.split("://", 1)[1])


def test_append_after_a_writer_died_creating_its_first_arrays(tmp_path):
    """A writer killed between creating two arrays of its first step leaves them behind;
    the next writer starts the channel over them (a seeded kill test once hit this)."""
    url = f"zarr://{tmp_path}/run.zarr"
    with dp.publish(url):
        pass
    g = zarr.open_group(str(tmp_path / "run.zarr"), mode="r+")
    g.create_array("u", shape=(0, 3), dtype="f8")
    g.create_array("gone", shape=(0,), dtype="i4")
    with dp.publish(url, mode="a") as pub:
        assert pub.next_index == 0
        pub.write({"u": np.ones((2, 3)), "k": np.arange(3)})
    with dp.open(url) as a:
        assert len(a) == 1 and sorted(a[0].vars) == ["k", "u"]
        np.testing.assert_array_equal(a[0]["u"], np.ones((2, 3)))
    assert sorted(zarr.open_group(str(tmp_path / "run.zarr"), mode="r").keys()) == [
        "__dataplane",
        "k",
        "u",
    ]


def test_append_after_a_writer_killed_while_setting_up(tmp_path):
    """A writer killed between creating the channel's group and its step index left a store
    that the next append could not open (KeyError: 'steps'); nothing was committed, so the
    append starts the channel at step 0."""
    import subprocess
    import sys

    url = f"zarr://{tmp_path}/run.zarr"
    code = (
        "import os, signal, zarr, dataplane as dp\n"
        "real = zarr.Group.create_array\n"
        "def dying(self, name, *a, **k):\n"
        "    if name == 'steps':\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        "    return real(self, name, *a, **k)\n"
        "zarr.Group.create_array = dying\n"
        f"dp.publish({url!r})\n"
    )
    assert subprocess.run([sys.executable, "-c", code], timeout=60).returncode == -9
    with dp.publish(url, mode="a") as pub:
        assert pub.next_index == 0
        pub.write({"u": np.arange(4.0)})
    with dp.open(url) as a:
        assert len(a) == 1
        np.testing.assert_array_equal(a[0]["u"], np.arange(4.0))
