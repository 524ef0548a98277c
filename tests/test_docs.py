"""The documentation builds without a warning (mkdocs --strict), API reference included."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.timeout(180)
def test_docs_build_cleanly(tmp_path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(tmp_path / "site")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=170,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "WARNING" not in done.stderr
    api = (tmp_path / "site" / "api" / "index.html").read_text()
    for name in ("SampleDataset", "ShuffleSampler", "NodeCache", "Publisher", "StepTimeoutError"):
        assert name in api, f"{name} missing from the API reference"
    for page in ("concepts", "formats", "cache", "mpi", "examples"):
        assert (tmp_path / "site" / page / "index.html").exists()
