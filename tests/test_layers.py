"""Import direction is down only (DESIGN.md, "Layers"): checked by walking the imports with ast."""

from __future__ import annotations

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "dataplane"

_BOTTOM = ["dataplane.errors", "dataplane.model", "dataplane._pids"]
_FILE_PIECES = [
    "dataplane.transports.base",
    "dataplane.transports._posix",
    "dataplane.transports._checksums",
    "dataplane.transports._lease",
    "dataplane.transports._format",
]
_H5 = [
    *_FILE_PIECES,
    "dataplane.transports._files",
    "dataplane.transports._h5repair",
    "dataplane.transports._h5handles",
    "dataplane.transports._h5subfiles",
]
_ADIOS = [
    *_FILE_PIECES,
    "dataplane.transports._files",
    "dataplane.transports._adios2",
    "dataplane.transports._adios_steps",
]

# What each part of the package may import from dataplane itself (prefix match).
ALLOWED = {
    "dataplane.errors": [],
    "dataplane._pids": [],
    "dataplane.model": ["dataplane.errors"],
    # A transport imports only the contract (base), the pieces the file transports share
    # and its own helpers; sst's relay runs over a private shm:// channel (one exception).
    "dataplane.transports": _BOTTOM,
    "dataplane.transports._lease": [*_BOTTOM, "dataplane.transports._posix"],
    "dataplane.transports._shm_control": [*_BOTTOM, "dataplane.transports._posix"],
    "dataplane.transports._files": [*_BOTTOM, *_FILE_PIECES],
    "dataplane.transports.mem": [*_BOTTOM, "dataplane.transports.base"],
    "dataplane.transports._shm_reader": [
        *_BOTTOM,
        "dataplane.transports.base",
        "dataplane.transports._posix",
        "dataplane.transports._shm_control",
    ],
    "dataplane.transports.shm": [
        *_BOTTOM,
        "dataplane.transports.base",
        "dataplane.transports._posix",
        "dataplane.transports._shm_control",
        "dataplane.transports._shm_reader",
    ],
    "dataplane.transports._h5repair": _BOTTOM,
    "dataplane.transports._h5handles": [*_BOTTOM, *_FILE_PIECES, "dataplane.transports._h5repair"],
    "dataplane.transports._h5subfiles": _BOTTOM,
    "dataplane.transports._h5writer": [*_BOTTOM, *_H5],
    "dataplane.transports._h5mpio": [*_BOTTOM, *_H5, "dataplane.transports._h5writer"],
    "dataplane.transports.hdf5": [
        *_BOTTOM,
        *_H5,
        "dataplane.transports._h5writer",
        "dataplane.transports._h5mpio",
        "dataplane.transports._foreign",
    ],
    "dataplane.transports._foreign": [*_BOTTOM, "dataplane.transports._format"],
    "dataplane.transports._zarrstore": [*_BOTTOM, "dataplane.transports._lease"],
    "dataplane.transports.zarrfs": [
        *_BOTTOM,
        *_FILE_PIECES,
        "dataplane.transports._files",
        "dataplane.transports._foreign",
        "dataplane.transports._zarrstore",
    ],
    "dataplane.transports._adios_steps": [
        *_BOTTOM,
        *_FILE_PIECES,
        "dataplane.transports._files",
        "dataplane.transports._adios2",
    ],
    "dataplane.transports._bp5join": [*_BOTTOM, "dataplane.transports._checksums"],
    "dataplane.transports.bp5": [
        *_BOTTOM,
        *_ADIOS,
        "dataplane.transports._bp5meta",
        "dataplane.transports._bp5join",
    ],
    "dataplane.transports.sst": [*_BOTTOM, *_ADIOS, "dataplane.transports.shm"],
    "dataplane.transports._sst_relay": [*_BOTTOM, *_ADIOS, "dataplane.transports.shm"],
    "dataplane.registry": ["dataplane.errors", "dataplane.model", "dataplane.transports.base"],
    # MPI planning and collectives: plain data in, plain data out; mpi4py only through the
    # user's comm. The parallel publisher drives a Publisher; never the front door (api).
    "dataplane.parallel": ["dataplane.errors", "dataplane.model", "dataplane.parallel"],
    "dataplane.parallel.publisher": [
        "dataplane.errors",
        "dataplane.model",
        "dataplane.parallel",
        "dataplane.publisher",
        "dataplane.transports.base",
    ],
    "dataplane.parallel.mpio": [
        "dataplane.errors",
        "dataplane.model",
        "dataplane.parallel",
        "dataplane.publisher",
        "dataplane.transports.base",
    ],
    "dataplane._sigterm": ["dataplane.errors"],
    # The progress bars of the commands (tqdm, imported when a bar is made).
    "dataplane._progress": [],
    "dataplane.publisher": ["dataplane.errors", "dataplane.model", "dataplane.transports.base"],
    "dataplane.subscriber": [
        "dataplane.errors",
        "dataplane.model",
        "dataplane.parallel.plan",
        "dataplane.transports.base",
    ],
    # The front door: publish, subscribe, open and their option checks.
    "dataplane.api": [
        "dataplane.errors",
        "dataplane.model",
        "dataplane._sigterm",
        "dataplane.parallel",
        "dataplane.publisher",
        "dataplane.registry",
        "dataplane.subscriber",
        "dataplane.transports.base",
    ],
    "dataplane.cache": [*_BOTTOM, "dataplane.cache"],
    # A dataset's look at its files, run in helper processes that must not import torch.
    "dataplane._look": ["dataplane.errors", "dataplane.model", "dataplane.api"],
    "dataplane.loaders": [
        "dataplane.errors",
        "dataplane.model",
        "dataplane.api",
        "dataplane.cache",
        "dataplane._look",
        "dataplane.loaders",
    ],
    # Users of the public API, like any user.
    "dataplane.cli": ["dataplane"],
    "dataplane.bench": ["dataplane"],
    "dataplane.demo": ["dataplane"],
    "dataplane.testing": ["dataplane"],
    "dataplane._testprocs": ["dataplane"],
    "dataplane": ["dataplane"],
}
HEAVY = {"adios2", "h5py", "zarr", "torch", "mpi4py", "fsspec"}
# Heavy libraries a module may import at module level (they are optional dependencies).
HEAVY_ALLOWED = {
    "dataplane.transports": {"adios2", "h5py", "zarr", "fsspec", "mpi4py"},
    "dataplane.loaders": {"torch"},
    # The read benchmark's Datasets are torch Datasets; the package imports it only when run.
    "dataplane.bench.read": {"torch"},
}


def module_name(path: pathlib.Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def rule_for(module: str, table: dict) -> object:
    best = max(
        (k for k in table if module == k or module.startswith(k + ".")), key=len, default=None
    )
    return table.get(best) if best else None


def imports(path: pathlib.Path) -> list[tuple[str, bool]]:
    """(imported module, at module level?) for every import in the file."""
    tree = ast.parse(path.read_text())
    package = module_name(path)
    if path.name != "__init__.py":
        package = package.rsplit(".", 1)[0]
    top = {id(node) for node in tree.body}
    for node in tree.body:  # imports inside `if TYPE_CHECKING:` and try blocks at top level count
        if isinstance(node, (ast.If, ast.Try)):
            top.update(id(n) for n in ast.walk(node))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.extend((alias.name, id(node) in top) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            # ``from dataplane.transports import _posix`` imports the module ..._posix.
            subs = [f"{name}.{a.name}" for a in node.names if _is_module(f"{name}.{a.name}")]
            out.extend((n, id(node) in top) for n in (subs or [name]))
    return out


def _is_module(name: str) -> bool:
    if not name.startswith("dataplane."):
        return False
    path = PACKAGE.parent.joinpath(*name.split("."))
    return path.with_suffix(".py").exists() or (path / "__init__.py").exists()


FILES = sorted(PACKAGE.rglob("*.py"))


@pytest.mark.parametrize("path", FILES, ids=[module_name(p) for p in FILES])
def test_imports_go_down_only(path: pathlib.Path) -> None:
    module = module_name(path)
    allowed = rule_for(module, ALLOWED)
    assert allowed is not None, f"{module} has no layering rule; add it to ALLOWED"
    for name, _ in imports(path):
        if name == "dataplane" or name.startswith("dataplane."):
            ok = any(name == a or name.startswith(a + ".") for a in allowed)
            assert ok, f"{module} imports {name}, which is above it (allowed: {allowed})"


@pytest.mark.parametrize("path", FILES, ids=[module_name(p) for p in FILES])
def test_heavy_libraries_only_where_they_belong(path: pathlib.Path) -> None:
    module = module_name(path)
    allowed = rule_for(module, HEAVY_ALLOWED) or set()
    for name, top_level in imports(path):
        root = name.split(".")[0]
        if root in HEAVY and top_level:
            assert root in allowed, f"{module} imports {root} at module level"


def test_every_registered_scheme_has_a_conformance_class() -> None:
    """A transport is tested by the shared suite: ``class TestX(conformance("x"))``."""
    import re

    import dataplane as dp

    text = "".join(p.read_text() for p in pathlib.Path(__file__).parent.glob("test_*.py"))
    tested = set(re.findall(r'class \w+\(conformance\("(\w+)"', text))
    assert set(dp.known_schemes()) - tested == set()
