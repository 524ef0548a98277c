"""ADIOS2's compiled bindings, loaded without its Python package's start-up.

``import adios2`` imports torch and cupy when they are installed (1.2-1.5 s and hundreds of
MiB per process, every rank of a simulation that only writes numpy arrays, every DataLoader
worker and test process that reads a ``bp5://`` file). dataplane uses only the bindings, so it
loads their extension module under its own name: a later ``import adios2`` by the user finds it
in ``sys.modules`` and behaves as usual, torch support included.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import sys
from types import ModuleType

_NAME = "adios2.bindings.adios2_bindings"


def load_bindings() -> ModuleType:
    """The ``adios2.bindings`` extension module (ModuleNotFoundError without adios2)."""
    loaded = sys.modules.get(_NAME)
    if loaded is not None:
        return loaded
    spec = importlib.util.find_spec("adios2")  # finds the package, runs nothing of it
    if spec is None:
        raise ModuleNotFoundError("No module named 'adios2'", name="adios2")
    for folder in spec.submodule_search_locations or ():
        for suffix in importlib.machinery.EXTENSION_SUFFIXES:
            path = os.path.join(folder, "bindings", "adios2_bindings" + suffix)
            if os.path.isfile(path):
                found = importlib.util.spec_from_file_location(_NAME, path)
                if found is None or found.loader is None:
                    break
                module = importlib.util.module_from_spec(found)
                sys.modules[_NAME] = module
                try:
                    found.loader.exec_module(module)
                except BaseException:
                    del sys.modules[_NAME]
                    raise
                return module
    # A layout this loader does not know: the package's own import, start-up and all.
    from adios2 import bindings

    return bindings
