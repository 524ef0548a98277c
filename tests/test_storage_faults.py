"""A full disk while publishing: a clear error, the completed steps intact and readable, no
temporary files left. On a real size-limited filesystem (a tmpfs mounted for the test, which
needs root, as on the development and CI machines), else with the error injected."""

from __future__ import annotations

import errno
import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import dataplane as dp

from faults import size_limited_dir

pytestmark = pytest.mark.timeout(120)

WRITER = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    import dataplane as dp
    url = sys.argv[1]
    n, err = 0, None
    try:
        with dp.publish(url) as pub:
            for i in range(1000):
                pub.write({"x": np.full(1 << 17, i, np.float64)})  # 1 MiB
                n += 1
    except dp.StorageFullError as exc:
        err = {"type": type(exc).__name__, "errno": exc.errno, "msg": str(exc)}
    except Exception as exc:
        err = {"type": type(exc).__name__, "msg": str(exc)}
    print(json.dumps({"written": n, "error": err}), flush=True)
    """
)


@pytest.fixture
def small_fs(tmp_path):
    """A 16 MiB filesystem of its own."""
    with size_limited_dir(tmp_path / "small", "16m") as where:
        yield where


@pytest.mark.parametrize("scheme,name", [("h5", "run.h5"), ("zarr", "run.zarr"), ("bp5", "run.bp")])
def test_disk_full_while_publishing(small_fs, tmp_path, scheme, name, monkeypatch) -> None:
    if small_fs is not None:
        url = f"{scheme}://{small_fs / name}"
        done = subprocess.run(
            [sys.executable, "-c", WRITER, url], capture_output=True, text=True, timeout=100
        )
        result = json.loads(done.stdout.strip().splitlines()[-1])
        written, error = result["written"], result["error"]
        leftovers = [p.name for p in small_fs.iterdir()]
    else:  # no mount here: the transport's put fails as a full disk makes it fail
        url = f"{scheme}://{tmp_path / name}"
        written = 0
        with pytest.raises(dp.StorageFullError) as info:
            with dp.publish(url) as pub:
                for i in range(8):
                    if i == 5:
                        writer = pub._writer

                        def full(name: str, arr: np.ndarray) -> None:
                            raise OSError(errno.ENOSPC, "No space left on device")

                        writer.put = full
                    pub.write({"x": np.full(1 << 17, i, np.float64)})
                    written += 1
        error = {"type": "StorageFullError", "errno": info.value.errno, "msg": str(info.value)}
        leftovers = [p.name for p in tmp_path.iterdir()]
    assert 3 <= written <= 16
    assert error["type"] == "StorageFullError" and error["errno"] == errno.ENOSPC, error
    if written < 16 or "while writing" in error["msg"]:
        assert f"while writing step {written}" in error["msg"]
        assert f"steps 0-{written - 1} are complete" in error["msg"]
    else:  # the last write fitted; finishing the channel did not
        assert f"while closing the channel after {written} steps" in error["msg"]
    with dp.open(url) as arc:  # every completed step is there, and nothing else
        assert len(arc) == written
        for i in range(written):
            assert (arc.read("x", step=i) == i).all()
    assert not [n for n in leftovers if n.endswith(".tmp")], leftovers
    if small_fs is not None:
        assert done.returncode == 0, done.stderr[-2000:]  # ADIOS2 used to abort at exit


def test_storage_full_error_is_also_an_oserror() -> None:
    assert issubclass(dp.StorageFullError, OSError) and issubclass(
        dp.StorageFullError, dp.DataplaneError
    )


LIMITED = textwrap.dedent(
    """
    import json, os, resource, sys
    import numpy as np
    import dataplane as dp
    url, path, cap = sys.argv[1], sys.argv[2], int(sys.argv[3])
    out = {"written": [], "errors": []}
    pub = dp.publish(url)
    for i in range(3):
        out["written"].append(pub.write({"x": np.full(1 << 17, i, np.float64)}))  # 1 MiB
    if cap < 0:  # a little more than the biggest file now: the next step fails midway
        sizes = [os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs]
        cap = max(sizes + [os.path.getsize(path) if os.path.isfile(path) else 0]) + (256 << 10)
    resource.setrlimit(resource.RLIMIT_FSIZE, (cap, resource.RLIM_INFINITY))
    for attempt in range(2):
        try:
            out["written"].append(pub.write({"x": np.full(1 << 17, 3, np.float64)}))
        except dp.StorageFullError as exc:
            out["errors"].append({"errno": exc.errno, "msg": str(exc)})
        except Exception as exc:
            out["errors"].append({"type": type(exc).__name__, "msg": str(exc)})
    resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
    out["written"].append(pub.write({"x": np.full(1 << 17, 3, np.float64)}))  # room again
    pub.close()
    print(json.dumps(out), flush=True)
    """
)


@pytest.mark.parametrize("scheme,name", [("h5", "run.h5"), ("zarr", "run.zarr"), ("bp5", "run.bp")])
def test_a_file_size_limit_hit_inside_a_step_loses_nothing(tmp_path, scheme, name) -> None:
    """A step fails midway with EFBIG (the process's file size limit; a quota the free-space
    check cannot see fails the same way): StorageFullError naming the complete steps, which
    stay readable; the same writer writes on once there is room again."""
    path = tmp_path / name
    # zarr writes a file per chunk (1 MiB each here): a limit below one chunk.
    cap = 512 << 10 if scheme == "zarr" else -1
    done = subprocess.run(
        [sys.executable, "-c", LIMITED, f"{scheme}://{path}", str(path), str(cap)],
        capture_output=True,
        text=True,
        timeout=100,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["written"] == [0, 1, 2, 3], result
    assert len(result["errors"]) == 2, result
    for err in result["errors"]:
        assert err.get("errno") == errno.EFBIG, err
        assert "while writing step 3; steps 0-2 are complete" in err["msg"], err
        assert "size" in err["msg"], err
    with dp.open(f"{scheme}://{path}") as arc:
        assert len(arc) == 4
        for i in range(4):
            assert (arc.read("x", step=i) == i).all()
