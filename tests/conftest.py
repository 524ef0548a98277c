"""Shared test set-up: every test runs with a private shm:// directory."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _private_shm_dir(tmp_path_factory, monkeypatch):
    # Subprocesses inherit it, so writer and subscriber processes of a test meet there.
    monkeypatch.setenv("DATAPLANE_SHM_DIR", str(tmp_path_factory.mktemp("shmdir")))


@pytest.fixture(scope="session", autouse=True)
def _sweep_shm_at_exit():
    """Tests that kill processes on purpose leave segments; remove them when the run ends."""
    yield
    from dataplane.transports.shm import sweep

    sweep()
