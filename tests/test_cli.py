"""`dataplane inspect` and `dataplane convert`, in-process and as real subprocesses."""

from __future__ import annotations

import json
import subprocess
import sys

import h5py
import numpy as np
import pytest
import zarr

import dataplane as dp
from dataplane._testprocs import digest, make_step
from dataplane.cli import main
from dataplane.testing import read_events, run_proc

pytestmark = pytest.mark.timeout(120)

FILES = {
    "h5": lambda d, n: f"h5://{d}/{n}.h5",
    "zarr": lambda d, n: f"zarr://{d}/{n}.zarr",
    "bp5": lambda d, n: f"bp5://{d}/{n}.bp",
}


def write_run(url: str, steps: int = 4) -> None:
    with dp.publish(url) as pub:
        pub.attrs["units"] = "m/s"
        pub.attrs["grid"] = [64, 32]
        for i in range(steps):
            pub.write(make_step(i, 64), attrs={"time": i * 0.5, "tag": f"s{i}"})


def assert_same_run(url: str, steps: int = 4) -> None:
    with dp.open(url) as a:
        assert len(a) == steps
        assert a.attrs == {"units": "m/s", "grid": [64, 32]}
        for i in range(steps):
            step = a[i]
            assert step.attrs == {"time": i * 0.5, "tag": f"s{i}"}
            for name, value in make_step(i, 64).items():
                assert digest(step[name]) == digest(np.asarray(value)), (i, name)


@pytest.mark.parametrize("src,dst", [("bp5", "zarr"), ("zarr", "h5"), ("h5", "bp5"), ("h5", "h5")])
def test_convert_copies_steps_and_attributes(tmp_path, capsys, src, dst):
    src_url = FILES[src](tmp_path, "src")
    dst_url = FILES[dst](tmp_path, "dst")
    write_run(src_url)
    assert main(["convert", src_url, dst_url, "--progress"]) == 0
    assert_same_run(dst_url)
    err = capsys.readouterr().err
    assert "convert: 100%" in err and "4/4" in err and "MiB/s" in err  # the bar, on stderr


def test_convert_shows_progress_on_a_terminal_only(tmp_path) -> None:
    """A bar on a terminal; nothing on a pipe (a log) unless --progress; never with --quiet."""
    import os
    import pty

    src = FILES["h5"](tmp_path, "src")
    write_run(src)
    cmd = [sys.executable, "-m", "dataplane.cli", "convert", src]
    piped = subprocess.run([*cmd, FILES["h5"](tmp_path, "a")], capture_output=True, timeout=60)
    assert piped.returncode == 0 and piped.stderr == b""
    quiet = subprocess.run(
        [*cmd, FILES["h5"](tmp_path, "b"), "--quiet", "--progress"],
        capture_output=True,
        timeout=60,
    )
    assert quiet.returncode == 0 and quiet.stderr == b""
    main_end, tty_end = pty.openpty()
    try:
        with subprocess.Popen(
            [*cmd, FILES["h5"](tmp_path, "c")], stderr=tty_end, stdout=subprocess.DEVNULL
        ) as proc:
            os.close(tty_end)
            shown = b""
            while True:
                try:
                    chunk = os.read(main_end, 4096)
                except OSError:  # EIO: the process closed its end
                    break
                if not chunk:
                    break
                shown += chunk
            assert proc.wait(timeout=60) == 0
    finally:
        os.close(main_end)
    assert b"convert: 100%" in shown and b"4/4" in shown, shown
    for url in ("a", "b", "c"):
        assert_same_run(FILES["h5"](tmp_path, url))


def test_convert_passes_compression_options_through(tmp_path):
    write_run(FILES["bp5"](tmp_path, "src"))
    assert (
        main(
            [
                "convert",
                FILES["bp5"](tmp_path, "src"),
                FILES["h5"](tmp_path, "gz"),
                "--dst-opt",
                "compression=gzip",
                "--dst-opt",
                "compression_opts=4",
                "--quiet",
            ]
        )
        == 0
    )
    with h5py.File(tmp_path / "gz.h5", "r") as f:
        assert f["u"].compression == "gzip" and f["u"].compression_opts == 4
    assert_same_run(FILES["h5"](tmp_path, "gz"))

    argv = ["convert", FILES["bp5"](tmp_path, "src"), FILES["zarr"](tmp_path, "z")]
    assert main([*argv, "--dst-opt", "compressors=zstd", "--quiet"]) == 0
    codecs = zarr.open_array(str(tmp_path / "z.zarr" / "u"), mode="r").metadata.codecs
    assert any("zstd" in type(c).__name__.lower() for c in codecs), codecs
    assert_same_run(FILES["zarr"](tmp_path, "z"))


def test_convert_selects_variables_and_steps(tmp_path):
    src, dst = FILES["h5"](tmp_path, "src"), FILES["zarr"](tmp_path, "dst")
    write_run(src)
    assert main(["convert", src, dst, "--vars", "u,t", "--steps", "2", "--quiet"]) == 0
    with dp.open(dst) as a:
        assert len(a) == 2 and sorted(a[1].vars) == ["t", "u"]


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--dst-opt", "nonsense=1"], "nonsense"),
        (["--dst-opt", "compressors=nope"], "codec"),
        (["--dst-opt", "operator=nope"], "operator"),
        (["--dst-opt", "novalue"], "key=value"),
    ],
)
def test_convert_bad_options_fail_clearly(tmp_path, capsys, argv, message):
    src = FILES["h5"](tmp_path, "src")
    write_run(src, steps=1)
    dst = FILES["bp5" if "operator" in argv[1] else "zarr"](tmp_path, "dst")
    assert main(["convert", src, dst, *argv]) == 1
    err = capsys.readouterr().err
    assert err.startswith("dataplane: error:") and message in err


def test_convert_refuses_to_overwrite_a_live_channel(tmp_path, capsys):
    src, dst = FILES["h5"](tmp_path, "src"), FILES["h5"](tmp_path, "dst")
    write_run(src, steps=1)
    with dp.publish(dst) as pub:
        pub.write({"x": np.arange(3)})
        assert main(["convert", src, dst, "--quiet"]) == 1
        assert "dataplane: error:" in capsys.readouterr().err
    with dp.open(dst) as a:
        np.testing.assert_array_equal(a[0]["x"], np.arange(3))


def test_inspect_lists_steps_variables_and_attributes(tmp_path, capsys):
    url = FILES["bp5"](tmp_path, "run")
    with dp.publish(url) as pub:
        pub.attrs["units"] = "K"
        for i in range(5):
            pub.write({"u": np.zeros((8, 4 + (i >= 3))), "n": np.int32(i)}, attrs={"t": i})
    assert main(["inspect", url]) == 0
    out = capsys.readouterr().out
    assert "(5 steps)" in out and "units = 'K'" in out
    assert "float64" in out and "0-2:{8, 4} 3-4:{8, 5}" in out
    assert "int32" in out and "5*scalar" in out

    assert main(["inspect", url, "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["steps"] == 5 and info["attrs"] == {"units": "K"}
    assert info["variables"]["u"]["shapes"]["4"] == [8, 5]
    assert info["step_attrs"]["2"] == {"t": 2}

    assert main(["inspect", url, "--attrs", "--steps", "2"]) == 0
    out = capsys.readouterr().out
    assert "(2 of 5 steps)" in out and "step 1: {'t': 1}" in out


def test_inspect_missing_file_is_an_error(tmp_path, capsys):
    assert main(["inspect", f"h5://{tmp_path}/none.h5"]) == 1
    assert "dataplane: error:" in capsys.readouterr().err


def _cli(*args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "dataplane.cli", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        stdin=subprocess.DEVNULL,
    )


@pytest.mark.parametrize(
    "stream,extra",
    [("shm", []), ("sst", ["--opt", "rendezvous=1"])],
    ids=["shm-to-h5", "sst-to-bp5"],
)
def test_convert_records_a_live_stream(tmp_path, stream, extra):
    """A live stream from another process, recorded step by step until the writer closes."""
    src = f"shm://rec-{tmp_path.name}" if stream == "shm" else f"sst://{tmp_path}/live"
    dst = FILES["h5" if stream == "shm" else "bp5"](tmp_path, "rec")
    rec = _cli("convert", src, dst, "--timeout", "60", "--progress")
    writer = run_proc("publish", src, "--steps", "6", "--size", "256", "--sleep", "0.05", *extra)
    try:
        w_out, w_err = writer.communicate(timeout=90)
        r_out, r_err = rec.communicate(timeout=90)
    finally:
        for p in (writer, rec):
            p.kill()
    assert writer.returncode == 0, w_err
    assert rec.returncode == 0, r_err
    assert "convert: 6 step " in r_err  # the bar, asked for: stderr is a pipe
    wrote = [json.loads(line) for line in w_out.splitlines() if '"wrote"' in line]
    (got,) = read_events(run_proc("verify", dst), 60)
    assert got["error"] is None and got["count"] == 6
    for w in wrote:
        assert got["steps"][str(w["wrote"])] == dict(sorted(w["digests"].items()))
    with dp.open(dst) as a:
        assert [s.attrs for s in a] == [{"i": i} for i in range(6)]
        assert "writer_pid" in a.attrs


def test_inspect_a_stream_shows_what_arrives(tmp_path):
    src = f"shm://insp-{tmp_path.name}"
    insp = _cli("inspect", src, "--steps", "3", "--timeout", "60")
    writer = run_proc("publish", src, "--steps", "3", "--size", "64", "--hang")
    try:
        out, err = insp.communicate(timeout=90)
    finally:
        writer.kill()
        writer.wait(10)
        insp.kill()
    assert insp.returncode == 0, err
    assert "(3 steps)" in out and "3*{64}" in out and "3*{16, 4}" in out
