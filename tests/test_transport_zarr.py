"""zarr:// (local directories) and zarr+memory:// (through fsspec) pass the conformance suite."""

from __future__ import annotations

import glob
import os

import zarr

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
