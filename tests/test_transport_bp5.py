"""bp5:// passes the conformance suite; the bypass hooks read with plain adios2."""

from __future__ import annotations

import glob
import os

import numpy as np
from adios2 import FileReader

from dataplane.testing import conformance


class TestBP5(conformance("bp5")):
    def make_url(self, tmp_path, name):
        return f"bp5://{tmp_path}/{name}.bp"

    @staticmethod
    def path(url: str) -> str:
        return url.split("://", 1)[1]

    def plain_read(self, url):
        with FileReader(self.path(url)) as f:
            n = f.num_steps()
            arrays = {}
            for name, desc in f.available_variables().items():
                if name.startswith("__dp"):
                    continue
                shape = [int(x) for x in desc["Shape"].split(",")] if desc["Shape"] else []
                flat = f.read(name, step_selection=[0, n])  # steps come back concatenated
                arrays[name] = np.asarray(flat).reshape([n, *shape])
            attrs = {}
            for name, desc in f.available_attributes().items():
                if name.startswith(("step/", "__dp")):
                    continue
                value = f.read_attribute(name)
                if isinstance(value, np.ndarray):
                    value = value.tolist()
                    if desc["Elements"] == "1":
                        value = value[0]
                attrs[name] = value
        return arrays, attrs

    def data_files(self, url):
        return sorted(glob.glob(os.path.join(self.path(url), "data.*")))

    def corruption_targets(self, url):
        # BP5 pads and aligns blocks, so find where step 1's "u" really lies in the data files.
        from dataplane._testprocs import make_step

        needle = np.asarray(make_step(1, 64)["u"]).tobytes()
        out = []
        for f in self.data_files(url):
            with open(f, "rb") as fh:
                at = fh.read().find(needle)
            if at >= 0:
                out.append((f, at, len(needle)))
        assert out, "step 1 of 'u' not found in the data files"
        return out
