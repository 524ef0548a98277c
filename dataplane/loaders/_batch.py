"""Batch buffers: where a batch's tensors live (private, shared or pinned memory)."""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
import torch
from torch.utils.data import default_collate

from dataplane.errors import OptionError, SchemaError

MEMORY = ("private", "shared", "pinned")


@functools.lru_cache(maxsize=64)
def torch_dtype(dtype: np.dtype) -> torch.dtype:
    try:
        return torch.from_numpy(np.empty(0, dtype)).dtype
    except TypeError:
        raise SchemaError(
            f"torch has no dtype for {dtype}; cast the samples with SampleDataset(dtype=...)"
        ) from None


def pinnable() -> bool:
    """Whether page-locked memory means anything here (an accelerator torch can use)."""
    return torch.cuda.is_available()


def empty(shape: tuple[int, ...], dtype: np.dtype, memory: str) -> torch.Tensor:
    """An uninitialised tensor in ``memory``.

    ``"shared"`` allocates straight in shared memory, as ``default_collate`` does in a
    DataLoader worker: the worker's queue then passes a handle, not the bytes.
    """
    tdt = torch_dtype(np.dtype(dtype))
    if memory == "private":
        return torch.empty(shape, dtype=tdt)
    if memory == "pinned":
        return torch.empty(shape, dtype=tdt, pin_memory=pinnable())
    if memory == "shared":
        nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        storage = torch.UntypedStorage._new_shared(max(nbytes, 1))
        strides = [int(np.prod(shape[i + 1 :], dtype=np.int64)) for i in range(len(shape))]
        return torch.empty(0, dtype=tdt).set_(storage, 0, shape, strides)
    raise OptionError(f"memory must be one of {', '.join(MEMORY)}, got {memory!r}")


def stack(tensors: list[torch.Tensor], name: str, memory: str) -> torch.Tensor:
    """Steps of one variable as one batch tensor (they must have one shape)."""
    first = tensors[0]
    for t in tensors[1:]:
        if t.shape != first.shape:
            raise SchemaError(
                f"steps of {name!r} have shapes {tuple(first.shape)} and {tuple(t.shape)}: they "
                f"cannot form one batch; use batch_size=1, or a collate_fn that pads"
            )
    out = empty((len(tensors), *first.shape), first.numpy().dtype, memory)
    return torch.stack(tensors, out=out)


def collate(samples: list[Any], memory: str) -> Any:
    """``default_collate`` of transformed samples, with its output in ``memory``.

    In a DataLoader worker ``default_collate`` already allocates in shared memory.
    """
    batch = default_collate(samples)
    if memory == "pinned" and pinnable():
        return pin(batch)
    return batch


def pin(batch: Any) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.pin_memory()
    if isinstance(batch, dict):
        return {k: pin(v) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(pin(v) for v in batch)
    return batch


def to_device(batch: Any, device: torch.device) -> Any:
    """``batch`` on ``device``; copies from pinned memory do not wait (``non_blocking``)."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch
