"""Write the golden files in this folder with the plain libraries, never with dataplane.

They stand for output of simulations that never heard of dataplane; ``tests/test_interop.py``
reads them through dataplane. Run from anywhere to regenerate (the values are deterministic):

    .venv/bin/python tests/data/make_golden.py
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
STEPS = 3


def one_step_arrays() -> dict[str, np.ndarray]:
    """What the one-step files hold (a simulation's final state): nested names included."""
    return {
        "temperature": (np.arange(24, dtype=np.float32).reshape(4, 6) / 7).astype(np.float32),
        "pressure": np.linspace(1.0, 2.0, 24).reshape(4, 6),
        "grid/x": np.linspace(0.0, 1.0, 6),
        "count": np.array(42, dtype=np.int64),
    }


def step_arrays(t: int) -> dict[str, np.ndarray]:
    """Step ``t`` of the files with steps."""
    return {
        "u": np.arange(20, dtype=np.float64).reshape(4, 5) * (t + 1) + 0.25,
        "v": np.array([t, -t], dtype=np.int32),
    }


ATTRS: dict[str, object] = {"title": "heat run", "dt": 0.5, "nx": 6}


def write_h5() -> None:
    import h5py

    with h5py.File(HERE / "h5_one_step.h5", "w") as f:
        for name, value in one_step_arrays().items():
            if name == "pressure":
                f.create_dataset(name, data=value, chunks=(2, 3), compression="gzip")
            else:
                f[name] = value
        f.attrs.update(ATTRS)
    with h5py.File(HERE / "h5_step_axis.h5", "w") as f:
        steps = [step_arrays(t) for t in range(STEPS)]
        for name in steps[0]:
            f[name] = np.stack([s[name] for s in steps])
        f.attrs.update(ATTRS)


def write_zarr() -> None:
    import zarr

    for name in ("zarr_one_step.zarr", "zarr_step_axis.zarr"):
        shutil.rmtree(HERE / name, ignore_errors=True)
    g = zarr.open_group(str(HERE / "zarr_one_step.zarr"), mode="w", zarr_format=3)
    for name, value in one_step_arrays().items():
        chunks = (2, 3) if value.ndim == 2 else value.shape
        g.create_array(name, shape=value.shape, dtype=value.dtype, chunks=chunks)[...] = value
    g.attrs.update(ATTRS)
    g = zarr.open_group(str(HERE / "zarr_step_axis.zarr"), mode="w", zarr_format=3)
    steps = [step_arrays(t) for t in range(STEPS)]
    for name in steps[0]:
        value = np.stack([s[name] for s in steps])
        g.create_array(name, shape=value.shape, dtype=value.dtype, chunks=(1, *value.shape[1:]))[
            ...
        ] = value
    g.attrs.update(ATTRS)


def write_bp5() -> None:
    import adios2

    path = HERE / "bp5_steps.bp"
    shutil.rmtree(path, ignore_errors=True)
    adios = adios2.Adios()
    io = adios.declare_io("golden")
    io.set_engine("BP5")
    with adios2.Stream(io, str(path), "w") as s:
        for t in range(STEPS):
            s.begin_step()
            if t == 0:
                s.write_attribute("title", ATTRS["title"])
                s.write_attribute("dt", ATTRS["dt"])
                s.write_attribute("nx", ATTRS["nx"])
            arrays = step_arrays(t)
            u = arrays["u"]
            s.write("u", u, list(u.shape), [0, 0], list(u.shape))
            s.write("v", arrays["v"], [2], [0], [2])
            s.write("time", np.float64(t * 0.5))
            s.end_step()
    (path / "profiling.json").unlink(missing_ok=True)


if __name__ == "__main__":
    write_h5()
    write_zarr()
    write_bp5()
    for p in sorted(HERE.iterdir()):
        if p.name != Path(__file__).name:
            print(p.name)
