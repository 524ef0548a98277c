"""The xarray backend: every file transport round-trips through ``engine="dataplane"``, values
compared with what was written; reads are lazy and touch only the steps asked for."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

import dataplane as dp
from dataplane.errors import OptionError, SchemaError
from dataplane.subscriber import Archive

xr = pytest.importorskip("xarray", reason="the [xarray] extra is not installed")
from dataplane.xarray_backend import dims_attrs  # noqa: E402

STEPS = 4


def u_at(t: int) -> np.ndarray:
    return (np.arange(30, dtype=np.float32).reshape(6, 5) + 100 * t).astype(np.float32)


def v_at(t: int) -> np.ndarray:
    return np.arange(3, dtype=np.int64) * (t + 1)


def url_for(scheme: str, tmp_path) -> str:
    return {
        "h5": f"h5://{tmp_path}/run.h5",
        "bp5": f"bp5://{tmp_path}/run.bp",
        "zarr": f"zarr://{tmp_path}/run.zarr",
    }[scheme]


def publish(url: str) -> None:
    with dp.publish(url) as pub:
        pub.attrs.update({"units": "m", **dims_attrs({"u": ("y", "x")})})
        for t in range(STEPS):
            pub.write({"u": u_at(t), "v": v_at(t)}, attrs={"time": 0.5 * t, "label": f"s{t}"})


@pytest.fixture(params=["h5", "bp5", "zarr"])
def channel(request, tmp_path) -> str:
    url = url_for(request.param, tmp_path)
    publish(url)
    return url


def test_a_channel_opens_as_one_dataset_with_named_dims_coords_and_attrs(channel) -> None:
    with xr.open_dataset(channel, engine="dataplane") as ds:
        assert ds["u"].dims == ("step", "y", "x") and ds["v"].dims == ("step", "v_dim_0")
        assert ds["u"].dtype == np.float32 and ds["v"].dtype == np.int64
        np.testing.assert_array_equal(ds["u"].values, np.stack([u_at(t) for t in range(STEPS)]))
        np.testing.assert_array_equal(ds["v"].values, np.stack([v_at(t) for t in range(STEPS)]))
        assert ds["step"].values.tolist() == list(range(STEPS))
        assert ds["time"].dims == ("step",)
        np.testing.assert_array_equal(ds["time"].values, 0.5 * np.arange(STEPS))
        assert ds["label"].values.tolist() == [f"s{t}" for t in range(STEPS)]
        assert ds.attrs["units"] == "m" and not [k for k in ds.attrs if k.startswith("dims.")]
        # Label-based selection through the coordinate.
        np.testing.assert_array_equal(ds["u"].sel(step=2).values, u_at(2))


def test_dims_given_at_open_name_the_dimensions(channel) -> None:
    with xr.open_dataset(channel, engine="dataplane", dims={"v": ("k",)}) as ds:
        assert ds["v"].dims == ("step", "k") and ds["u"].dims == ("step", "y", "x")
    with pytest.raises(OptionError, match="2 dimensions"):
        xr.open_dataset(channel, engine="dataplane", dims={"u": ("a",)})
    with pytest.raises(OptionError, match="does not have"):
        xr.open_dataset(channel, engine="dataplane", dims={"w": ("a",)})


def test_reads_are_lazy_and_touch_only_what_is_asked(channel, monkeypatch) -> None:
    reads: list[tuple] = []
    real = Archive.read

    def counted(self, name, step, start=None, count=None):
        reads.append(
            (
                name,
                step,
                None if start is None else list(start),
                None if count is None else list(count),
            )
        )
        return real(self, name, step, start, count)

    monkeypatch.setattr(Archive, "read", counted)
    with xr.open_dataset(channel, engine="dataplane") as ds:
        assert reads == [], "opening reads no array"
        got = ds["u"].isel(step=2, y=slice(1, 3), x=4).values
        np.testing.assert_array_equal(got, u_at(2)[1:3, 4])
        assert reads == [("u", 2, [1, 4], [2, 1])]
        reads.clear()
        got = ds["u"][1:4:2, ::2].values
        np.testing.assert_array_equal(got, np.stack([u_at(1), u_at(3)])[:, ::2])
        assert [r[1] for r in reads] == [1, 3], "one read per step touched"
        reads.clear()
        assert ds["v"].isel(step=slice(0, 0)).values.shape == (0, 3) and reads == []


def test_chunks_give_dask_arrays_of_one_step_each(channel) -> None:
    pytest.importorskip("dask", reason="dask is not installed")
    with xr.open_dataset(channel, engine="dataplane", chunks={}) as ds:
        assert ds["u"].chunks == ((1,) * STEPS, (6,), (5,))
        np.testing.assert_array_equal(
            ds["u"].mean("step").compute().values, np.stack([u_at(t) for t in range(STEPS)]).mean(0)
        )


def test_a_file_dataplane_did_not_write_opens_too(tmp_path) -> None:
    path = tmp_path / "plain.h5"
    data = np.arange(24, dtype=np.float64).reshape(4, 6)
    with h5py.File(path, "w") as f:
        f["x"] = data
        f.attrs["source"] = "h5py"
    with xr.open_dataset(f"h5://{path}", engine="dataplane", layout="step-axis") as ds:
        np.testing.assert_array_equal(ds["x"].values, data)
        assert ds["x"].dims == ("step", "x_dim_0") and ds.attrs["source"] == "h5py"


def test_steps_of_different_shapes_and_bad_urls_are_refused(tmp_path) -> None:
    url = f"bp5://{tmp_path}/ragged.bp"  # bp5:// lets a variable's shape change
    with dp.publish(url) as pub:
        pub.write({"u": np.zeros(3)})
        pub.write({"u": np.zeros(4)})
    with pytest.raises(SchemaError, match="one shape along 'step'"):
        xr.open_dataset(url, engine="dataplane")
    with pytest.raises(OptionError, match="channel URLs"):
        xr.open_dataset(str(tmp_path / "ragged.bp"), engine="dataplane")


def test_the_engine_is_registered_and_import_dataplane_loads_no_xarray() -> None:
    assert "dataplane" in xr.backends.list_engines()
    import subprocess
    import sys

    code = "import sys, dataplane; assert 'xarray' not in sys.modules"
    assert subprocess.run([sys.executable, "-c", code], timeout=60).returncode == 0


def test_every_kind_of_basic_selection_gives_numpys_answer(channel) -> None:
    """Through xarray, and straight through the backend array (which may be handed reversed
    or strided slices as they are)."""
    from dataplane.xarray_backend import StepArray

    full = np.stack([u_at(t) for t in range(STEPS)])
    keys = [
        np.s_[::-1, ::-1],
        np.s_[3:0:-2, 4:1:-1, ::-2],
        np.s_[1, :, 4],
        np.s_[:, 5:2],
        np.s_[-1, -2:, 1:2],
        (np.s_[2:2],),
    ]
    with xr.open_dataset(channel, engine="dataplane") as ds:
        for key in keys:
            np.testing.assert_array_equal(ds["u"][key].values, full[key])
    with dp.open(channel) as arc:
        arr = StepArray(arc, "u", STEPS, (6, 5), np.dtype(np.float32))
        for key in keys:
            whole = tuple(key) + (slice(None),) * (3 - len(key))
            np.testing.assert_array_equal(arr._read(whole), full[whole])
