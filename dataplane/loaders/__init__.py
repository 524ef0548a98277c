"""PyTorch datasets and samplers over dataplane channels.

``SampleDataset`` reads stored steps in any order, ``ShuffleSampler`` decides that order
(seeded, epoch-aware, distributed, resumable, block-shuffled for large reads) and
``StreamDataset`` feeds training from a live channel. This is the only part of dataplane that
imports torch.
"""

from __future__ import annotations

from dataplane.loaders.sample import SampleDataset
from dataplane.loaders.sampler import ShuffleSampler
from dataplane.loaders.stream import StreamDataset

__all__ = ["SampleDataset", "ShuffleSampler", "StreamDataset"]
