"""The coupled simulation-to-training demo behind ``dataplane demo``.

A 2-D Gray-Scott reaction-diffusion simulation (numpy) publishes its two fields to ``shm://``
every few iterations. A separate trainer process subscribes and trains a small convolutional
network online to predict the next published step from the current one. No files, no server:
the simulation only calls ``publish``/``write``; the trainer only ``subscribe``.

Run ``dataplane demo --help`` for the knobs; ``python -m dataplane.demo train ...`` is the
trainer's entry point (the demo starts it for you).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np

import dataplane as dp

__all__ = ["GrayScott", "main", "run_demo", "train"]


class GrayScott:
    """Gray-Scott reaction-diffusion on a periodic ``n`` x ``n`` grid (explicit Euler)."""

    def __init__(
        self,
        n: int = 128,
        *,
        du: float = 0.16,
        dv: float = 0.08,
        f: float = 0.035,
        k: float = 0.060,
        seed: int = 0,
    ) -> None:
        self.du, self.dv, self.f, self.k = du, dv, f, k
        rng = np.random.default_rng(seed)
        self.u = np.ones((n, n), dtype=np.float32)
        self.v = np.zeros((n, n), dtype=np.float32)
        for _ in range(6):  # a few seeded squares so patterns grow from several places
            cx, cy = rng.integers(0, n, 2)
            r = max(2, n // 16)
            sl = (slice(max(0, cx - r), cx + r), slice(max(0, cy - r), cy + r))
            self.u[sl], self.v[sl] = 0.50, 0.25
        self.u += 0.02 * rng.standard_normal((n, n)).astype(np.float32)
        self.v += 0.02 * rng.standard_normal((n, n)).astype(np.float32)
        self.iteration = 0

    @staticmethod
    def _laplacian(a: np.ndarray) -> np.ndarray:
        return np.roll(a, 1, 0) + np.roll(a, -1, 0) + np.roll(a, 1, 1) + np.roll(a, -1, 1) - 4 * a

    def advance(self, iterations: int = 1) -> None:
        u, v = self.u, self.v
        for _ in range(iterations):
            uvv = u * v * v
            u += self.du * self._laplacian(u) - uvv + self.f * (1 - u)
            v += self.dv * self._laplacian(v) + uvv - (self.f + self.k) * v
        self.iteration += iterations


def simulate(url: str, steps: int, size: int, every: int, policy: str, progress: bool) -> dict:
    """Run the simulation, publishing ``steps`` steps; returns timing figures."""
    sim = GrayScott(size)
    t0 = time.perf_counter()
    waited = 0.0
    with dp.publish(url, policy=policy, queue_limit=4, rendezvous=1, rendezvous_timeout=120) as pub:
        pub.attrs.update(model="gray-scott", du=sim.du, dv=sim.dv, f=sim.f, k=sim.k, every=every)
        t_start = time.perf_counter()
        for i in range(steps):
            sim.advance(every)
            tw = time.perf_counter()
            pub.write({"u": sim.u, "v": sim.v}, attrs={"iteration": sim.iteration})
            waited += time.perf_counter() - tw
            if progress and (i + 1) % max(1, steps // 5) == 0:
                print(
                    f"[sim]   published step {i + 1}/{steps} (iteration {sim.iteration})",
                    flush=True,
                )
    return {
        "sim_seconds": time.perf_counter() - t_start,
        "publish_seconds": waited,
        "startup_seconds": t_start - t0,
    }


def train(url: str, out: Path, *, lr: float = 1e-3, progress: bool = True) -> dict:
    """Subscribe to ``url`` and train a small CNN online; writes summary.json and loss.png.

    The network predicts the change from one published step to the next. Its error is
    reported relative to the change itself: 1.0 is what "copy the last step" scores, and lower
    means the network has learnt some of the dynamics.
    """
    import torch
    from torch import nn

    torch.manual_seed(0)
    torch.set_num_threads(1)  # leave the other core to the simulation

    def conv(cin: int, cout: int) -> nn.Conv2d:
        return nn.Conv2d(cin, cout, kernel_size=3, padding=1, padding_mode="circular")

    net = nn.Sequential(conv(2, 16), nn.GELU(), conv(16, 16), nn.GELU(), conv(16, 2))
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    errors: list[float] = []
    prev = None
    scale = None
    t_first = None
    with dp.subscribe(url, vars=("u", "v"), timeout=120) as sub:
        for step in sub:
            if t_first is None:
                t_first = time.perf_counter()
            # Zero-copy views of shared memory, valid until the next step: stack copies them.
            cur = torch.from_numpy(np.stack([step["u"], step["v"]]))[None]
            if prev is not None:
                change = cur - prev
                if scale is None:
                    scale = float(change.std()) or 1.0
                target = change / scale
                for _ in range(3):
                    loss = nn.functional.mse_loss(net(prev), target)
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
                errors.append(loss.item() / max(float(target.pow(2).mean()), 1e-30))
                if progress and len(errors) % 50 == 0:
                    print(
                        f"[train] step {step.index:4d}  error {np.mean(errors[-10:]):.3f} "
                        f"of copying the last step",
                        flush=True,
                    )
            prev = cur
        stats = sub.stats
    elapsed = time.perf_counter() - (t_first or time.perf_counter())
    summary = {
        "steps": stats.steps,
        "dropped": stats.dropped,
        "bytes": stats.bytes,
        "train_seconds": elapsed,
        "first_error": float(np.mean(errors[:10])) if errors else float("nan"),
        "final_error": float(np.mean(errors[-10:])) if errors else float("nan"),
        "errors": errors,
    }
    out.mkdir(parents=True, exist_ok=True)
    summary["plot"] = _plot(errors, out / "loss.png")
    (out / "summary.json").write_text(json.dumps(summary))
    return summary


def _plot(errors: list[float], path: Path) -> str | None:
    try:
        import matplotlib
    except ImportError:
        print("[train] no plot: matplotlib is missing (pip install 'dataplane[demo]')")
        return None
    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=120)
    ax.semilogy(errors, label="online CNN")
    ax.axhline(1.0, linestyle="--", color="gray", label="copy the last step")
    ax.set_xlabel("step received from shm://")
    ax.set_ylabel("error / error of copying")
    ax.set_title("Gray-Scott surrogate trained online through dataplane")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return str(path)


def run_demo(
    steps: int, size: int, every: int, out: Path, policy: str = "block", url: str | None = None
) -> dict:
    """Start the trainer process, run the simulation, print the table; returns the summary."""
    url = url or f"shm://demo-{uuid.uuid4().hex[:8]}"
    out.mkdir(parents=True, exist_ok=True)
    mb = 2 * size * size * 4 / 2**20
    print(
        f"dataplane demo: Gray-Scott {size}x{size}, {steps} steps of {mb:.2f} MiB over {url}, "
        f"a trainer in a separate process",
        flush=True,
    )
    trainer = subprocess.Popen(
        [sys.executable, "-m", "dataplane.demo", "train", url, "--out", str(out)],
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        sim = simulate(url, steps, size, every, policy, progress=True)
        code = trainer.wait(timeout=600)
    except BaseException:
        trainer.kill()
        trainer.wait()
        raise
    if code != 0:
        raise dp.DataplaneError(f"the trainer process failed with exit code {code}")
    summary = json.loads((out / "summary.json").read_text())
    summary.update(sim)
    moved = summary["bytes"] / 1e6
    rows = [
        ("steps received", f"{summary['steps']} (dropped {summary['dropped']})"),
        ("MB moved", f"{moved:.1f}"),
        (
            "throughput",
            f"{moved / max(sim['sim_seconds'], 1e-9):.1f} MB/s over the run "
            f"(the trainer sets the pace: policy={policy})",
        ),
        (
            "simulation blocked in write",
            f"{sim['publish_seconds']:.2f} s of {sim['sim_seconds']:.2f} s",
        ),
        (
            "final loss",
            f"{summary['final_error']:.3f} x the error of copying the last step "
            f"(first steps: {summary['first_error']:.3f})",
        ),
        ("loss curve", summary.get("plot") or "(no plot)"),
    ]
    width = max(len(k) for k, _ in rows)
    print()
    for key, value in rows:
        print(f"  {key:<{width}}  {value}")
    return summary


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m dataplane.demo")
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="the trainer process (started by `dataplane demo`)")
    t.add_argument("url")
    t.add_argument("--out", type=Path, default=Path("demo_out"))
    args = ap.parse_args(argv)
    train(args.url, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
