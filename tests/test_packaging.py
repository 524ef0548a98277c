"""The package as users install it: a wheel and an sdist built from this tree, the wheel
installed into a fresh virtualenv (offline), imported without any optional library."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import tarfile
import zipfile
from pathlib import Path

import pytest

import dataplane

ROOT = Path(__file__).resolve().parents[1]
OPTIONAL = ("torch", "h5py", "adios2", "zarr", "fsspec", "mpi4py", "matplotlib")

pytestmark = pytest.mark.timeout(300)


def run(*cmd: str, cwd: Path, env: dict[str, str] | None = None) -> str:
    done = subprocess.run(
        cmd,
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
        stdin=subprocess.DEVNULL,
    )
    assert done.returncode == 0, f"{' '.join(cmd)}:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def test_the_wheel_installs_offline_and_imports_with_no_extras(tmp_path) -> None:
    dist = tmp_path / "dist"
    # No isolation: the build uses this environment's setuptools, nothing is downloaded.
    run(
        sys.executable,
        "-m",
        "build",
        "--no-isolation",
        "--outdir",
        str(dist),
        str(ROOT),
        cwd=tmp_path,
    )
    wheel = next(dist.glob("dataplane-*.whl"))
    sdist = next(dist.glob("dataplane-*.tar.gz"))
    version = dataplane.__version__
    assert wheel.name.startswith(f"dataplane-{version}-") and sdist.name == (
        f"dataplane-{version}.tar.gz"
    ), "one version, from dataplane.__version__"
    names = zipfile.ZipFile(wheel).namelist()
    assert "dataplane/py.typed" in names and "dataplane/cache/peers.py" in names
    assert not [n for n in names if n.startswith("tests/")]
    with tarfile.open(sdist) as tar:
        assert f"dataplane-{version}/dataplane/py.typed" in tar.getnames()

    venv = tmp_path / "venv"
    run(sys.executable, "-m", "venv", str(venv), cwd=tmp_path)
    py = venv / "bin" / "python"
    run(
        str(py),
        "-m",
        "pip",
        "install",
        "--quiet",
        "--no-index",
        "--no-deps",
        str(wheel),
        cwd=tmp_path,
    )
    # The required dependencies (numpy, xxhash) come from this environment, offline; the
    # optional ones are visible too, so the check below proves import does not load them.
    site = Path(
        run(
            str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])", cwd=tmp_path
        ).strip()
    )
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    code = (
        "import sys, dataplane; "
        f"loaded = [m for m in {OPTIONAL!r} if m in sys.modules]; "
        "assert not loaded, loaded; "
        "print(dataplane.__version__, dataplane.__file__)"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    out = run(str(py), "-c", code, cwd=tmp_path, env=env).split()
    assert out[0] == version and out[1].startswith(str(venv)), out
    assert run(str(venv / "bin" / "dataplane"), "--version", cwd=tmp_path, env=env).strip() == (
        f"dataplane {version}"
    )
