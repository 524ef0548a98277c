"""`dataplane demo` runs end to end: a simulation process and a trainer process over shm://."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np

from dataplane.demo import GrayScott


def test_gray_scott_stays_bounded_and_moves() -> None:
    sim = GrayScott(32)
    before = sim.v.copy()
    sim.advance(200)
    assert np.isfinite(sim.u).all() and np.isfinite(sim.v).all()
    assert sim.u.min() > -0.5 and sim.u.max() < 1.5
    assert not np.allclose(before, sim.v)
    assert sim.iteration == 200


def test_demo_command_end_to_end(tmp_path) -> None:
    out = tmp_path / "out"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "dataplane.cli",
            "demo",
            "--steps",
            "30",
            "--size",
            "32",
            "--out",
            str(out),
            "--progress",
        ],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert result.returncode == 0, result.stderr
    assert "steps received               30 (dropped 0)" in result.stdout
    # Both bars, asked for in a log: the simulation's steps and the trainer's batches.
    bars = result.stderr.splitlines()
    assert any(line.startswith("simulation: 100%") and "30/30" in line for line in bars), bars
    assert any(line.startswith("training (offline epoch): 60 batch") for line in bars), bars
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 30 and summary["dropped"] == 0
    # Steps hold (x, y) pairs of the two fields; 8 replay draws per step in batches of 4.
    assert summary["bytes"] == 30 * 2 * 2 * 32 * 32 * 4
    assert len(summary["errors"]) == 30 * 8 // 4 and np.isfinite(summary["errors"]).all()
    # The offline epoch read every stored step once, in shuffled order, with 2 workers.
    assert summary["offline"]["samples"] == 30 and summary["offline"]["batches"] == 4
    assert np.isfinite(summary["offline"]["error"])
    assert (out / "gray-scott.h5").exists()
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_demo_refuses_bad_arguments() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "dataplane.cli", "demo", "--steps", "0"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2 and "--steps must be at least 1" in result.stderr
