"""PyTorch datasets and samplers over dataplane channels.

``SampleDataset`` reads stored steps in any order, ``ShuffleSampler`` decides that order
(seeded, epoch-aware, distributed, resumable, block-shuffled for large reads) and
``StreamDataset`` feeds training from a live channel. This is the only part of dataplane that
imports torch, and only when one of these names is used: the prefetch process reads shards
through ``dataplane.loaders._shards`` without paying for a torch import.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from dataplane.loaders.batches import BatchLoader, loader
    from dataplane.loaders.sample import SampleDataset
    from dataplane.loaders.sampler import ShuffleSampler
    from dataplane.loaders.stream import StreamDataset

__all__ = ["BatchLoader", "SampleDataset", "ShuffleSampler", "StreamDataset", "loader"]

_WHERE = {
    "BatchLoader": "dataplane.loaders.batches",
    "loader": "dataplane.loaders.batches",
    "SampleDataset": "dataplane.loaders.sample",
    "ShuffleSampler": "dataplane.loaders.sampler",
    "StreamDataset": "dataplane.loaders.stream",
}


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(importlib.import_module(_WHERE[name]), name)
    raise AttributeError(f"module 'dataplane.loaders' has no attribute {name!r}")
