"""Batch buffers: where a batch's tensors live (private, shared or pinned memory)."""

from __future__ import annotations

import functools
import os
import sys
import threading
import weakref
from collections import deque
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
        return _recycled.take(tuple(shape), tdt)
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


class Recycler:
    """Private batch buffers used again once their batch is dropped.

    A fresh buffer of a few MiB is new memory to the allocator: glibc hands it out from
    pages it returned to the system when the last batch was freed (or from a new mapping),
    and faulting them in again cost 0.7-0.9 ms per 2 MiB batch here, four times the whole
    gather; whether it happens depends on what else lies on the heap, so an epoch ran at
    33k or at 150k samples/s from one process to the next. A buffer is only reused when
    nothing holds it any more; one still in use is never written.
    """

    KEEP = 4  # per shape and dtype: the batch in use, the one being made, and slack
    SHAPES = 8  # shapes and dtypes kept (an epoch's last batch is smaller, for one)
    BYTES = 1 << 30  # the most all kept buffers may hold, in use or not (kept after training)

    def __init__(self) -> None:
        self._mutex = threading.Lock()
        self._held: dict[tuple[tuple[int, ...], torch.dtype], deque[torch.Tensor]] = {}

    def take(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        key = (shape, dtype)
        with self._mutex:
            held = self._held.pop(key, None) or deque()
            self._held[key] = held  # the most recently used shape last
            while len(self._held) > self.SHAPES:
                del self._held[next(iter(self._held))]
            for i in range(len(held)):
                t = held[i]
                # Unused: no Python reference but the deque's, ``t`` and getrefcount's
                # argument (a batch, a dict of it, a numpy array hold one), nor a weak one;
                # no C++ tensor on it (autograd's saved inputs, DLPack, a view's base); no
                # other tensor on its storage (a view; asking makes one Python storage).
                if (
                    sys.getrefcount(t) == 3
                    and weakref.getweakrefcount(t) == 0
                    and t._use_count() == 1  # type: ignore[attr-defined]
                    and torch._C._storage_Use_Count(t.untyped_storage()._cdata) == 2
                ):
                    del held[i]  # by place: remove() would compare tensors with ==
                    if _as_made(t, shape, dtype):
                        held.append(t)
                        return t
                    break  # changed in place by its user (resized, made to need grad): let go
            t = torch.empty(shape, dtype=dtype)
            held.append(t)
            if len(held) > self.KEEP:
                held.popleft()  # freed with its batch, wherever that is now
            while self._held and self.nbytes() > self.BYTES:
                oldest = next(iter(self._held.values()))
                oldest.popleft()
                if not oldest:
                    del self._held[next(iter(self._held))]
            return t

    def nbytes(self) -> int:
        """Bytes of the buffers kept (call under the mutex)."""
        return sum(t.nbytes for held in self._held.values() for t in held)

    def clear(self) -> None:
        with self._mutex:
            self._held.clear()


def _as_made(t: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype) -> bool:
    """Whether ``t`` is still what :meth:`Recycler.take` made: in-place methods (``resize_``,
    ``t_``, ``requires_grad_``) change a tensor that is then dropped."""
    return (
        tuple(t.shape) == shape
        and t.dtype == dtype
        and t.is_contiguous()
        and t.storage_offset() == 0
        and not t.requires_grad
        and t.grad is None
        and t.untyped_storage().nbytes() == t.numel() * t.element_size()
    )


_recycled = Recycler()
os.register_at_fork(after_in_child=_recycled.clear)  # a child's buffers are its own
