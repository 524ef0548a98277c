"""dataplane reads files written by plain h5py, zarr and adios2 (golden files in tests/data/).

The mapping rules are in the transport module docstrings: every dataset/array is a variable
(``group/name`` for nested ones); a file is one step unless ``layout="step-axis"`` says axis 0
is the step axis; ADIOS2 steps are steps. Files are copied first: readers must never need to
write next to the data (the lease check only reads).
"""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import dataplane as dp

DATA = Path(__file__).resolve().parent / "data"
_spec = importlib.util.spec_from_file_location("make_golden", DATA / "make_golden.py")
assert _spec is not None and _spec.loader is not None
golden = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(golden)

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def copy(tmp_path):
    def _copy(name: str) -> Path:
        src = DATA / name
        dst = tmp_path / name
        if src.is_dir():
            shutil.copytree(src, dst)
        else:
            shutil.copy(src, dst)
        return dst

    return _copy


def assert_one_step(url: str, **opts) -> None:
    expected = golden.one_step_arrays()
    with dp.open(url, **opts) as a:
        assert len(a) == 1
        assert a.attrs == golden.ATTRS
        step = a[0]
        assert sorted(step.vars) == sorted(expected)
        for name, value in expected.items():
            got = step[name]
            assert got.dtype == value.dtype and got.shape == value.shape, name
            np.testing.assert_array_equal(got, value)
        np.testing.assert_array_equal(
            step.read("temperature", (1, 2), (2, 3)), expected["temperature"][1:3, 2:5]
        )
    with dp.subscribe(url, vars=["grid/x"], timeout=10, **opts) as sub:
        steps = [(s.index, sorted(s.vars), s["grid/x"].copy()) for s in sub]
    assert [(i, v) for i, v, _ in steps] == [(0, ["grid/x"])]
    np.testing.assert_array_equal(steps[0][2], expected["grid/x"])


def assert_steps(url: str, extra: dict[int, dict[str, np.ndarray]] | None = None, **opts) -> None:
    def expected(t: int) -> dict[str, np.ndarray]:
        return {**golden.step_arrays(t), **(extra or {}).get(t, {})}

    with dp.open(url, **opts) as a:
        assert len(a) == golden.STEPS
        assert a.attrs == golden.ATTRS
        for t in (2, 0, 1):  # random access
            step = a[t]
            assert step.index == t
            for name, value in expected(t).items():
                got = step[name]
                assert got.dtype == value.dtype and got.shape == value.shape, (t, name)
                np.testing.assert_array_equal(got, value)
        np.testing.assert_array_equal(a[1].read("u", (2, 1), (2, 3)), expected(1)["u"][2:4, 1:4])
    seen = []
    with dp.subscribe(url, timeout=10, **opts) as sub:  # a finished file: iteration ends
        for step in sub:
            for name, value in expected(step.index).items():
                np.testing.assert_array_equal(step[name], value)
            seen.append(step.index)
    assert seen == list(range(golden.STEPS))


def test_plain_h5py_file_is_one_step(copy):
    assert_one_step(f"h5://{copy('h5_one_step.h5')}")


def test_plain_h5py_file_with_step_axis(copy):
    assert_steps(f"h5://{copy('h5_step_axis.h5')}", layout="step-axis")


def test_plain_h5py_file_defaults_to_one_step(copy):
    with dp.open(f"h5://{copy('h5_step_axis.h5')}") as a:
        assert len(a) == 1
        assert a[0].vars["u"].shape == (golden.STEPS, 4, 5)


def test_plain_zarr_group_is_one_step(copy):
    assert_one_step(f"zarr://{copy('zarr_one_step.zarr')}")


def test_plain_zarr_group_through_fsspec_url(copy):
    assert_one_step(f"zarr+file://{copy('zarr_one_step.zarr')}")


def test_plain_zarr_group_with_step_axis(copy):
    assert_steps(f"zarr://{copy('zarr_step_axis.zarr')}", layout="step-axis")


def test_plain_adios2_steps_are_steps(copy):
    times = {t: {"time": np.array(t * 0.5)} for t in range(golden.STEPS)}
    assert_steps(f"bp5://{copy('bp5_steps.bp')}", extra=times)


def test_step_axis_needs_agreeing_lengths(tmp_path):
    import h5py

    path = tmp_path / "bad.h5"
    with h5py.File(path, "w") as f:
        f["a"] = np.zeros((3, 2))
        f["b"] = np.zeros((4, 2))
    with pytest.raises(dp.SchemaError, match="axis 0"):
        dp.open(f"h5://{path}", layout="step-axis")


def test_convert_turns_a_plain_file_into_a_channel(copy, tmp_path):
    """A foreign BP5 run becomes ordinary dataplane h5 (what `dataplane convert` is for)."""
    dst = tmp_path / "out.h5"
    from dataplane.cli import main

    assert main(["convert", f"bp5://{copy('bp5_steps.bp')}", f"h5://{dst}", "--quiet"]) == 0
    times = {t: {"time": np.array(t * 0.5)} for t in range(golden.STEPS)}
    assert_steps(f"h5://{dst}", extra=times)


H5_WRITER = """
import sys, time, h5py, numpy as np
f = h5py.File(sys.argv[1], "w", {kwargs})
f["u"] = np.arange(10.0)
f.flush()
print("open", flush=True)
time.sleep(60)
"""


@pytest.mark.parametrize(
    "kwargs",
    ["locking=True", 'libver="latest", locking=False'],
    ids=["by-file-lock", "by-superblock-flag"],
)
def test_h5_file_open_for_writing_without_swmr_is_refused(tmp_path, kwargs):
    """A plain h5py writer (no SWMR) has the file open: reading could be wrong, so refuse.

    Old superblocks carry no flag, so HDF5's file lock tells; where locks are off (common on
    parallel filesystems) the "open for write" flag of a ``libver="latest"`` superblock does.
    """
    path = tmp_path / "busy.h5"
    proc = subprocess.Popen(
        [sys.executable, "-c", H5_WRITER.format(kwargs=kwargs), str(path)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "open"
        with pytest.raises(dp.DataplaneError, match="without SWMR"):
            dp.open(f"h5://{path}")
        with pytest.raises(dp.DataplaneError, match="without SWMR"):
            dp.subscribe(f"h5://{path}", timeout=5).next()
    finally:
        proc.kill()
        proc.wait(10)


SST_WRITER = """
import sys
import adios2
import numpy as np
sys.path.insert(0, sys.argv[2])
from make_golden import ATTRS, STEPS, step_arrays

adios = adios2.Adios()
io = adios.declare_io("plain")
io.set_engine("SST")
with adios2.Stream(io, sys.argv[1], "w") as s:
    for t in range(STEPS):
        s.begin_step()
        if t == 0:
            for key, value in ATTRS.items():
                s.write_attribute(key, value)
        u, v = step_arrays(t)["u"], step_arrays(t)["v"]
        s.write("u", u, list(u.shape), [0, 0], list(u.shape))
        s.write("v", v, [2], [0], [2])
        s.end_step()
"""


def test_plain_adios2_sst_writer_feeds_a_subscriber(tmp_path):
    """A simulation that calls adios2 SST itself, never dataplane, streams to a subscriber."""
    name = str(tmp_path / "plain")
    writer = subprocess.Popen(
        [sys.executable, "-c", SST_WRITER, name, str(DATA)],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        with dp.subscribe(f"sst://{name}", timeout=30) as sub:
            got = [(s.index, s["u"].copy(), s["v"].copy()) for s in sub]
            assert sub.attrs == golden.ATTRS
        assert writer.wait(30) == 0, writer.stderr.read() if writer.stderr else ""
    finally:
        writer.kill()
        writer.wait(10)
    assert [i for i, _, _ in got] == list(range(golden.STEPS))
    for t, u, v in got:
        np.testing.assert_array_equal(u, golden.step_arrays(t)["u"])
        np.testing.assert_array_equal(v, golden.step_arrays(t)["v"])
