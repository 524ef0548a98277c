"""The conformance suite every transport passes.

A transport's test file is a few lines::

    from dataplane.testing import conformance

    class TestShm(conformance("shm")):
        def make_url(self, tmp_path, name):
            return f"shm://{name}?dir={tmp_path}"

``conformance(scheme)`` assembles the suite from the transport's declared capabilities:
:class:`TransportTests` for every transport, :class:`CrossProcessTests` when its scope reaches
beyond one process, :class:`DropPolicyTests` when it supports ``policy="drop-oldest"`` (and
:class:`CrossProcessDropTests` when both). So a
capability a transport does not declare is not tested, rather than skipped.

Override ``make_url`` (a fresh channel per test), ``writer_options`` and ``reader_options``
where a transport needs them.
"""

from __future__ import annotations

from typing import Any

from dataplane.registry import get_transport
from dataplane.testing.files import FileCrashTests, FileTransportTests
from dataplane.testing.helpers import (
    Consumer,
    RemotePublisher,
    assert_same_array,
    flip_bytes,
    read_events,
    run_proc,
    sample_array,
    truncate,
    wait_for_event,
)
from dataplane.testing.processes import CrossProcessDropTests, CrossProcessTests
from dataplane.testing.transport import DropPolicyTests, TransportTests

__all__ = [
    "Consumer",
    "CrossProcessDropTests",
    "CrossProcessTests",
    "DropPolicyTests",
    "FileCrashTests",
    "FileTransportTests",
    "RemotePublisher",
    "TransportTests",
    "assert_same_array",
    "conformance",
    "flip_bytes",
    "read_events",
    "run_proc",
    "sample_array",
    "truncate",
    "wait_for_event",
]


def conformance(scheme: str, **capabilities: Any) -> type:
    """The conformance suite for ``scheme``, assembled from its declared capabilities.

    ``capabilities`` override the class's declarations where an instance differs, e.g.
    ``conformance("zarr", scope="process")`` for fsspec's in-process memory filesystem.
    """
    cls = get_transport(scheme)

    def has(name: str) -> Any:
        return capabilities.get(name, getattr(cls, name))

    bases: list[type] = []
    if has("scope") != "process":
        both = has("supports_drop_policy")
        bases.append(CrossProcessDropTests if both else CrossProcessTests)
    if has("supports_drop_policy"):
        bases.append(DropPolicyTests)
    if has("supports_random_access"):
        bases.append(FileCrashTests if has("scope") != "process" else FileTransportTests)
    bases.append(TransportTests)
    return type(f"{scheme.capitalize()}TransportTests", tuple(bases), {"scheme": scheme})
