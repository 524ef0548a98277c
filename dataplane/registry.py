"""URL scheme to transport class.

Transports are registered by import string and imported on first use, so ``import dataplane``
pulls in none of adios2, h5py, zarr, torch or mpi4py. Third-party packages register theirs
through the entry-point group ``dataplane.transports`` (name = scheme, value =
``"module:Class"``). Registering a scheme that is already taken raises unless ``replace=True``.
"""

from __future__ import annotations

import importlib
import re
import threading
from dataclasses import dataclass

from dataplane.errors import DataplaneError, MissingDependencyError, UnknownSchemeError
from dataplane.model import ChannelURL
from dataplane.transports.base import Transport

__all__ = [
    "ENTRY_POINT_GROUP",
    "get_transport",
    "known_schemes",
    "register_transport",
    "resolve",
    "unregister_transport",
]

ENTRY_POINT_GROUP = "dataplane.transports"


@dataclass
class _Entry:
    target: str | type[Transport]
    hint: str | None
    origin: str


_BUILTIN: dict[str, tuple[str, str | None]] = {
    "mem": ("dataplane.transports.mem:MemTransport", None),
    "shm": ("dataplane.transports.shm:ShmTransport", None),
    "bp5": ("dataplane.transports.bp5:BP5Transport", "pip install 'dataplane[adios2]'"),
    "h5": ("dataplane.transports.hdf5:HDF5Transport", "pip install 'dataplane[hdf5]'"),
    "sst": ("dataplane.transports.sst:SSTTransport", "pip install 'dataplane[adios2]'"),
    "zarr": ("dataplane.transports.zarrfs:ZarrTransport", "pip install 'dataplane[zarr]'"),
}

_lock = threading.RLock()
_registry: dict[str, _Entry] = {
    scheme: _Entry(target, hint, "dataplane") for scheme, (target, hint) in _BUILTIN.items()
}
_entry_points_loaded = False
_conflicts: dict[str, str] = {}
_SCHEME_RE = re.compile(r"[a-z][a-z0-9]*\Z")


def register_transport(
    scheme: str,
    target: str | type[Transport],
    *,
    hint: str | None = None,
    replace: bool = False,
) -> None:
    """Register ``target`` ("module:Class" or the class) for URLs ``scheme://...``.

    ``hint`` is shown when importing the target fails (e.g. ``"pip install 'mypkg[x]'"``).
    """
    if not isinstance(scheme, str) or not _SCHEME_RE.match(scheme):
        raise DataplaneError(
            f"scheme {scheme!r} is not valid: lower-case letters and digits, starting with a letter"
        )
    if isinstance(target, str) and ":" not in target:
        raise DataplaneError(f"transport target {target!r} must look like 'package.module:Class'")
    with _lock:
        _load_entry_points()
        old = _registry.get(scheme)
        if old is not None and not replace and old.target != target:
            raise DataplaneError(
                f"scheme {scheme!r} is already registered to {_describe(old.target)} (from "
                f"{old.origin}); pass replace=True to override it"
            )
        _registry[scheme] = _Entry(target, hint, "register_transport")
        _conflicts.pop(scheme, None)


def unregister_transport(scheme: str) -> None:
    """Remove ``scheme`` from the registry (mostly for tests and plugins that clean up)."""
    with _lock:
        _registry.pop(scheme, None)
        _conflicts.pop(scheme, None)


def known_schemes() -> list[str]:
    """Every registered scheme, sorted."""
    with _lock:
        _load_entry_points()
        return sorted(_registry)


def get_transport(scheme: str) -> type[Transport]:
    """Import and return the transport class for ``scheme``."""
    with _lock:
        _load_entry_points()
        if scheme in _conflicts:
            raise DataplaneError(_conflicts[scheme])
        entry = _registry.get(scheme)
        if entry is None:
            raise UnknownSchemeError(
                f"no transport for scheme {scheme!r}; known schemes: "
                f"{', '.join(s + '://' for s in sorted(_registry))}. Third-party transports "
                f"register under the entry-point group {ENTRY_POINT_GROUP!r}."
            )
        if isinstance(entry.target, str):
            entry.target = _import(scheme, entry)
        return entry.target


def resolve(url: str | ChannelURL) -> tuple[ChannelURL, type[Transport]]:
    """Parse ``url`` and find its transport class."""
    parsed = url if isinstance(url, ChannelURL) else ChannelURL.parse(url)
    cls = get_transport(parsed.scheme)
    if parsed.protocol is not None and not cls.accepts_protocol:
        raise UnknownSchemeError(f"{parsed.url!r}: {parsed.scheme}:// takes no '+protocol' part")
    return parsed, cls


def _describe(target: str | type) -> str:
    return target if isinstance(target, str) else f"{target.__module__}:{target.__qualname__}"


def _import(scheme: str, entry: _Entry) -> type[Transport]:
    module_name, _, attr = str(entry.target).partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        hint = f"; install it with: {entry.hint}" if entry.hint else ""
        raise MissingDependencyError(
            f"the {scheme}:// transport cannot be imported ({exc}){hint}"
        ) from exc
    cls = getattr(module, attr, None)
    if not (isinstance(cls, type) and issubclass(cls, Transport)):
        raise DataplaneError(
            f"{entry.target} (registered for {scheme}:// by {entry.origin}) is not a "
            f"dataplane.transports.base.Transport subclass"
        )
    return cls


def _load_entry_points() -> None:
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    _entry_points_loaded = True
    from importlib.metadata import entry_points

    seen: dict[str, str] = {}
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        origin = f"entry point {ep.name} = {ep.value}"
        if ep.dist is not None:
            origin += f" of {ep.dist.name}"
        if not _SCHEME_RE.match(ep.name):
            continue
        old = _registry.get(ep.name)
        if ep.name in seen or (old is not None and old.target != ep.value):
            if ep.name in seen:
                other = seen[ep.name]
            else:
                assert old is not None
                other = f"{_describe(old.target)} (from {old.origin})"
            _conflicts[ep.name] = (
                f"scheme {ep.name!r} is claimed twice: by {origin} and by {other}; uninstall "
                f"one, or call dataplane.register_transport({ep.name!r}, ..., replace=True)"
            )
            continue
        seen[ep.name] = origin
        _registry[ep.name] = _Entry(ep.value, None, origin)
