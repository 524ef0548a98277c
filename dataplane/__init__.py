"""dataplane: one publish/subscribe data plane between HPC simulations and AI training.

Simulations ``publish(url)`` steps of named arrays; consumers ``subscribe(url)`` to them live or
``open(url)`` stored steps for random access. See ``dataplane.loaders`` for PyTorch datasets.
Importing this package imports no optional dependency (adios2, h5py, zarr, torch, mpi4py).
"""

from __future__ import annotations

from dataplane.api import (
    Archive,
    ParallelPublisher,
    Publisher,
    Subscriber,
    SubscriberStats,
    open,
    publish,
    subscribe,
)
from dataplane.errors import (
    ChannelBroken,
    ChannelBusyError,
    DataplaneError,
    IntegrityError,
    MissingDependencyError,
    OptionError,
    ReadOnlyError,
    SchemaError,
    StepTimeoutError,
    StorageFullError,
    Terminated,
    UnknownOptionError,
    UnknownSchemeError,
    VariableNotFoundError,
)
from dataplane.model import Block, Selection, Step, VarSpec
from dataplane.parallel import split
from dataplane.registry import known_schemes, register_transport

__version__ = "0.1.0"

__all__ = [
    "Archive",
    "Block",
    "ChannelBroken",
    "ChannelBusyError",
    "DataplaneError",
    "IntegrityError",
    "MissingDependencyError",
    "OptionError",
    "ParallelPublisher",
    "Publisher",
    "ReadOnlyError",
    "SchemaError",
    "Selection",
    "Step",
    "StepTimeoutError",
    "StorageFullError",
    "Subscriber",
    "SubscriberStats",
    "Terminated",
    "UnknownOptionError",
    "UnknownSchemeError",
    "VarSpec",
    "VariableNotFoundError",
    "__version__",
    "known_schemes",
    "open",
    "publish",
    "register_transport",
    "split",
    "subscribe",
]
