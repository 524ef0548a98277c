"""What the datasets and the sampler share: rank defaults, variable and dtype specs, tensors."""

from __future__ import annotations

import sys
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from dataplane.errors import OptionError

SAMPLE_KINDS = ("row", "step")


def world_defaults(rank: int | None, world: int | None) -> tuple[int, int]:
    """(rank, world) as given, else from torch.distributed or an initialised mpi4py, else (0, 1).

    mpi4py is only asked when the program already imported it: importing it here would
    initialise MPI behind the user's back.
    """
    if (rank is None) != (world is None):
        raise OptionError(f"give both rank and world, or neither (got rank={rank}, world={world})")
    if rank is None or world is None:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
        else:
            mpi = sys.modules.get("mpi4py.MPI")
            if mpi is not None and mpi.Is_initialized() and not mpi.Is_finalized():
                rank, world = mpi.COMM_WORLD.Get_rank(), mpi.COMM_WORLD.Get_size()
            else:
                rank, world = 0, 1
    for name, value in (("rank", rank), ("world", world)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise OptionError(f"{name} must be an integer, got {value!r}")
    if not 0 <= rank < world:
        raise OptionError(f"need 0 <= rank < world, got rank={rank}, world={world}")
    return int(rank), int(world)


def parse_vars(vars: Any) -> tuple[tuple[str, ...], tuple[str, ...] | None, bool]:
    """``vars`` as (stored names, output keys or None, single).

    A string gives one tensor per sample; a tuple of names a tuple; a mapping ``{key: name}``
    a dict keyed by ``key``.
    """
    if isinstance(vars, str):
        return (vars,), None, True
    if isinstance(vars, Mapping):
        keys = tuple(vars)
        names = tuple(vars.values())
        if not keys or not all(isinstance(k, str) for k in keys):
            raise OptionError(f"vars as a mapping needs string keys, got {dict(vars)!r}")
    else:
        try:
            names = tuple(vars)
        except TypeError:
            raise OptionError(
                f"vars must be a name, a tuple of names or a {{key: name}} mapping, got {vars!r}"
            ) from None
        keys = None
    if not names or not all(isinstance(n, str) and n for n in names):
        raise OptionError(f"vars must name at least one variable, got {vars!r}")
    return names, keys, False


def parse_dtypes(dtype: Any, names: tuple[str, ...]) -> dict[str, np.dtype | None]:
    """Per stored name, the dtype samples are cast to (None keeps the stored one)."""
    if isinstance(dtype, Mapping):
        unknown = set(dtype) - set(names)
        if unknown:
            raise OptionError(f"dtype names {sorted(unknown)} that are not in vars {names}")
        raw = {n: dtype.get(n) for n in names}
    else:
        raw = dict.fromkeys(names, dtype)
    out: dict[str, np.dtype | None] = {}
    for name, d in raw.items():
        if d is None:
            out[name] = None
            continue
        if isinstance(d, torch.dtype):
            d = torch.empty(0, dtype=d).numpy().dtype
        try:
            out[name] = np.dtype(d)
        except TypeError:
            raise OptionError(f"dtype {d!r} for {name!r} is not a numpy or torch dtype") from None
    return out


def check_seed(seed: Any) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise OptionError(f"seed must be a non-negative integer, got {seed!r}")
    return int(seed)


def check_transform(transform: Any) -> Any:
    if transform is not None and not callable(transform):
        raise OptionError(f"transform must be callable or None, got {transform!r}")
    return transform


def vars_config(names: tuple[str, ...], keys: tuple[str, ...] | None) -> list | dict:
    """``vars`` as given, JSON-safe (for ``get_config``)."""
    return list(names) if keys is None else dict(zip(keys, names))


def check_sample(sample: str) -> str:
    if sample not in SAMPLE_KINDS:
        raise OptionError(
            f"sample must be 'row' (the axis-0 rows of each step are samples) or 'step' "
            f"(each step is one sample), got {sample!r}"
        )
    return sample


def shape_sample(tensors: list[torch.Tensor], keys: tuple[str, ...] | None, single: bool) -> Any:
    if single:
        return tensors[0]
    if keys is not None:
        return dict(zip(keys, tensors))
    return tuple(tensors)


def as_tensor(arr: np.ndarray) -> torch.Tensor:
    """A tensor sharing ``arr``'s memory when torch can (writable, a dtype torch knows)."""
    if not arr.flags.writeable:
        arr = arr.copy()
    return torch.from_numpy(arr)
