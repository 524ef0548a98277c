"""zarr:// (local directories) and zarr+memory:// (through fsspec) pass the conformance suite."""

from __future__ import annotations

import glob
import os

import numpy as np
import pytest
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


@pytest.mark.parametrize(
    "dies_in", [("create_group", "__dataplane"), ("create_array", "steps")], ids="-".join
)
def test_append_after_a_writer_killed_while_setting_up(tmp_path, dies_in):
    """A writer killed after creating the channel's group, before its layout group (an empty
    group: "not written by dataplane", a kill test hit it under load) or before its step index
    (KeyError: 'steps'): nothing was committed, so the append starts the channel at step 0."""
    import subprocess
    import sys

    url = f"zarr://{tmp_path}/run.zarr"
    method, name = dies_in
    code = (
        "import os, signal, zarr, dataplane as dp\n"
        f"real = zarr.Group.{method}\n"
        "def dying(self, name, *a, **k):\n"
        f"    if name == {name!r}:\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        "    return real(self, name, *a, **k)\n"
        f"zarr.Group.{method} = dying\n"
        f"dp.publish({url!r})\n"
    )
    assert subprocess.run([sys.executable, "-c", code], timeout=60).returncode == -9
    with dp.publish(url, mode="a") as pub:
        assert pub.next_index == 0
        pub.write({"u": np.arange(4.0)})
    with dp.open(url) as a:
        assert len(a) == 1
        np.testing.assert_array_equal(a[0]["u"], np.arange(4.0))


def test_append_to_a_zarr_group_not_written_by_dataplane_is_refused(tmp_path):
    """A group holding someone else's arrays (or attributes) is never written over."""
    path = str(tmp_path / "theirs.zarr")
    g = zarr.open_group(path, mode="w")
    g.create_array("t", shape=(3,), dtype="f8")[:] = [1.0, 2.0, 3.0]
    with pytest.raises(dp.DataplaneError, match="not written by dataplane"):
        dp.publish(f"zarr://{path}", mode="a")
    assert zarr.open_group(path, mode="r")["t"][:].tolist() == [1.0, 2.0, 3.0]
    only_attrs = str(tmp_path / "attrs.zarr")
    zarr.open_group(only_attrs, mode="w").attrs["owner"] = "them"
    with pytest.raises(dp.DataplaneError, match="not written by dataplane"):
        dp.publish(f"zarr://{only_attrs}", mode="a")
    assert dict(zarr.open_group(only_attrs, mode="r").attrs) == {"owner": "them"}
