"""h5:// passes the conformance suite; the bypass hooks read with plain h5py."""

from __future__ import annotations

import h5py
import numpy as np

from dataplane.testing import conformance


class TestH5(conformance("h5")):
    def make_url(self, tmp_path, name):
        return f"h5://{tmp_path}/{name}.h5"

    @staticmethod
    def path(url: str) -> str:
        return url.split("://", 1)[1]

    def plain_read(self, url):
        with h5py.File(self.path(url), "r") as f:
            arrays = {k: f[k][()] for k in f if not k.startswith("__")}
            attrs = {}
            for k, v in f.attrs.items():
                if isinstance(v, np.ndarray):
                    v = [x.decode() if isinstance(x, bytes) else x for x in v.tolist()]
                attrs[k] = v
        return arrays, attrs

    def data_files(self, url):
        return [self.path(url)]

    def corruption_targets(self, url):
        out = []
        with h5py.File(self.path(url), "r") as f:
            d = f["u"]
            used = d.shape[0] * d.dtype.itemsize * int(np.prod(d.shape[1:]))
            for i in range(d.id.get_num_chunks()):
                info = d.id.get_chunk_info(i)  # small steps share a chunk: only the rows written
                out.append((self.path(url), info.byte_offset, min(info.size, used)))
        return out
