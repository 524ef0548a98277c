"""Node-local cache of shards and the clairvoyant prefetcher that fills it.

``NodeCache(path, capacity)`` is a directory shared by every process on a node that names it;
datasets store shards there (one fetch per shard per node) and read them back through mmap.
``Prefetcher`` fetches the shards of a known future order ahead of the consumer. Neither imports
a transport or torch: datasets hand them keys and functions that produce arrays.
"""

from __future__ import annotations

from dataplane.cache.policy import Plan, batched, belady_reads
from dataplane.cache.prefetch import Prefetcher
from dataplane.cache.store import CacheWarning, NodeCache, cache_stats, clear_cache, parse_size

__all__ = [
    "CacheWarning",
    "NodeCache",
    "Plan",
    "Prefetcher",
    "batched",
    "belady_reads",
    "cache_stats",
    "clear_cache",
    "parse_size",
]
