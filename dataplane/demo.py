"""The coupled simulation-to-training demo behind ``dataplane demo``.

A 2-D Gray-Scott reaction-diffusion simulation (numpy) publishes training pairs (the state and
the state a few iterations later) to ``shm://`` every few iterations, and the same steps to an
HDF5 file. A separate trainer process trains a small convolutional network online through a
``StreamDataset`` (a replay buffer over the live stream), then runs one offline epoch over the
stored file through ``SampleDataset`` + ``ShuffleSampler``. No server: the simulation only calls
``publish``/``write``; the trainer only uses ``dataplane.loaders``.

Run ``dataplane demo --help`` for the knobs; ``python -m dataplane.demo train ...`` is the
trainer's entry point (the demo starts it for you).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np

import dataplane as dp
from dataplane import _progress

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


def simulate(
    url: str, steps: int, size: int, every: int, policy: str, progress: Any, stored: str
) -> dict:
    """Run the simulation, publishing ``steps`` steps live to ``url`` and to the file
    ``stored``; returns timing figures. ``progress``: a tqdm bar (or None) counting steps.

    Each step holds a training pair: ``x``, the state (u and v stacked), and ``y``, the state
    ``every`` iterations later, as a surrogate's training data would.
    """
    sim = GrayScott(size)
    t0 = time.perf_counter()
    waited = 0.0
    with (
        dp.publish(url, policy=policy, queue_limit=4, rendezvous=1, rendezvous_timeout=120) as pub,
        dp.publish(stored, asynchronous=True) as store,
    ):
        pub.attrs.update(model="gray-scott", du=sim.du, dv=sim.dv, f=sim.f, k=sim.k, every=every)
        store.attrs.update(pub.attrs)
        t_start = time.perf_counter()
        for _ in range(steps):
            x = np.stack([sim.u, sim.v])
            sim.advance(every)
            step = {"x": x, "y": np.stack([sim.u, sim.v])}
            tw = time.perf_counter()
            pub.write(step, attrs={"iteration": sim.iteration})
            store.write(step, attrs={"iteration": sim.iteration})
            waited += time.perf_counter() - tw
            if progress is not None:
                progress.set_postfix_str(f"iteration {sim.iteration}", refresh=False)
                progress.update()
    return {
        "sim_seconds": time.perf_counter() - t_start,
        "publish_seconds": waited,
        "startup_seconds": t_start - t0,
    }


def train(
    url: str, out: Path, stored: str | None = None, *, lr: float = 1e-3, report: bool = False
) -> dict:
    """Train a small CNN online from ``url``, then one offline epoch over ``stored``; writes
    summary.json and loss.png. ``report``: print a JSON line on stdout every 20 batches
    (``{"batch": n, "error": e}``), which ``run_demo`` shows as a progress bar.

    Online, a ``StreamDataset`` keeps a replay buffer of the latest steps and draws 8 samples
    per published step. Offline, a ``SampleDataset`` over the stored file is read in shuffled
    order by ``ShuffleSampler`` with two DataLoader workers. The network predicts the change
    over one published step; its error is reported relative to the change itself: 1.0 is what
    "copy the last step" scores, and lower means it has learnt some of the dynamics.
    """
    import torch
    from torch import nn

    from dataplane.loaders import SampleDataset, ShuffleSampler, StreamDataset

    torch.manual_seed(0)
    torch.set_num_threads(1)  # leave the other core to the simulation

    def conv(cin: int, cout: int) -> nn.Conv2d:
        return nn.Conv2d(cin, cout, kernel_size=3, padding=1, padding_mode="circular")

    net = nn.Sequential(conv(2, 16), nn.GELU(), conv(16, 16), nn.GELU(), conv(16, 2))
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    scale: list[float] = []

    def fit(x: torch.Tensor, y: torch.Tensor, learn: bool = True) -> float:
        change = y - x
        if not scale:
            scale.append(float(change.std()) or 1.0)
        target = change / scale[0]
        loss = nn.functional.mse_loss(net(x), target)
        if learn:
            opt.zero_grad()
            loss.backward()
            opt.step()
        return loss.item() / max(float(target.pow(2).mean()), 1e-30)

    errors: list[float] = []
    live = StreamDataset(
        url,
        vars=("x", "y"),
        sample="step",
        buffer=32,
        replacement=True,
        samples_per_step=8,
        timeout=120,
    )
    t_first = None
    for x, y in torch.utils.data.DataLoader(live, batch_size=4, num_workers=0):
        t_first = t_first or time.perf_counter()
        errors.append(fit(x, y))
        if report and len(errors) % 20 == 0:
            _report(batch=len(errors), error=float(np.mean(errors[-20:])))
    elapsed = time.perf_counter() - (t_first or time.perf_counter())
    stats = live.stats
    summary: dict = {
        "steps": stats["steps"],
        "dropped": stats["dropped"],
        "bytes": stats["bytes"],
        "train_seconds": elapsed,
        "first_error": float(np.mean(errors[:10])) if errors else float("nan"),
        "final_error": float(np.mean(errors[-10:])) if errors else float("nan"),
        "errors": errors,
    }
    if report:
        _report(batch=len(errors), error=float(np.mean(errors[-20:])) if errors else None)
        _report(phase="offline epoch")
    if stored is not None:
        ds = SampleDataset(stored, vars=("x", "y"), sample="step")
        sampler = ShuffleSampler(ds, seed=0, block=None)
        t0 = time.perf_counter()
        offline = [
            fit(x, y)
            for x, y in torch.utils.data.DataLoader(
                ds, batch_size=8, sampler=sampler, num_workers=2
            )
        ]
        summary["offline"] = {
            "url": stored,
            "samples": len(sampler),
            "batches": len(offline),
            "seconds": time.perf_counter() - t0,
            "error": float(np.mean(offline)) if offline else float("nan"),
        }
    out.mkdir(parents=True, exist_ok=True)
    summary["plot"] = _plot(errors, out / "loss.png")
    (out / "summary.json").write_text(json.dumps(summary))
    return summary


def _report(**fields: Any) -> None:
    print(json.dumps(fields), flush=True)


def _plot(errors: list[float], path: Path) -> str | None:
    try:
        import matplotlib
    except ImportError:
        print(
            "dataplane demo: no plot: matplotlib is missing (pip install 'dataplane[demo]')",
            file=sys.stderr,
        )
        return None
    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=120)
    ax.semilogy(errors, label="online CNN")
    ax.axhline(1.0, linestyle="--", color="gray", label="copy the last step")
    ax.set_xlabel("batch drawn from the replay buffer of the shm:// stream")
    ax.set_ylabel("error / error of copying")
    ax.set_title("Gray-Scott surrogate trained online through dataplane")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return str(path)


def run_demo(
    steps: int,
    size: int,
    every: int,
    out: Path,
    policy: str = "block",
    url: str | None = None,
    progress: bool | None = None,
) -> dict:
    """Start the trainer process, run the simulation, print the table; returns the summary.
    ``progress``: two bars on stderr, the simulation's steps and the trainer's batches (None:
    only on a terminal)."""
    url = url or f"shm://demo-{uuid.uuid4().hex[:8]}"
    out.mkdir(parents=True, exist_ok=True)
    stored = f"h5://{(out / 'gray-scott.h5').resolve()}"
    mb = 2 * 2 * size * size * 4 / 2**20
    print(
        f"dataplane demo: Gray-Scott {size}x{size}, {steps} steps of {mb:.2f} MiB over {url}, "
        f"a trainer in a separate process; the same steps stored in {stored}",
        flush=True,
    )
    trainer = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "dataplane.demo",
            "train",
            url,
            "--out",
            str(out),
            "--stored",
            stored,
            "--report",
        ],
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        stdout=subprocess.PIPE,
        text=True,
    )
    sim_bar = _progress.bar("simulation", steps, show=progress, position=0)
    train_bar = _progress.bar("training", unit=" batch", show=progress, position=1)
    follow = threading.Thread(target=_follow, args=(trainer.stdout, train_bar), daemon=True)
    follow.start()
    try:
        sim = simulate(url, steps, size, every, policy, progress=sim_bar, stored=stored)
        code = trainer.wait(timeout=600)
        follow.join(60)
    except BaseException:
        trainer.kill()
        trainer.wait()
        raise
    finally:
        train_bar.close()
        sim_bar.close()
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
            f"{summary['final_error']:.3f} x the error of copying the last step online "
            f"(first steps: {summary['first_error']:.3f})",
        ),
        (
            "offline epoch",
            f"{summary['offline']['samples']} stored steps in shuffled order (SampleDataset + "
            f"ShuffleSampler, 2 workers) in {summary['offline']['seconds']:.1f} s, error "
            f"{summary['offline']['error']:.3f}",
        ),
        ("loss curve", summary.get("plot") or "(no plot)"),
    ]
    width = max(len(k) for k, _ in rows)
    print()
    for key, value in rows:
        print(f"  {key:<{width}}  {value}")
    return summary


def _follow(lines: Any, bar: Any) -> None:
    """Show the trainer's reports (JSON lines on its stdout) on ``bar``; pass anything else
    through to this process's stdout."""
    for line in lines:
        try:
            fields = json.loads(line)
        except json.JSONDecodeError:
            fields = None
        if not isinstance(fields, dict):
            bar.write(line.rstrip("\n"), file=sys.stdout)
        elif "phase" in fields:
            bar.set_description_str(f"training ({fields['phase']})")
        else:
            if fields.get("error") is not None:
                bar.set_postfix_str(f"error {fields['error']:.3f} of copying", refresh=False)
            bar.update(fields["batch"] - bar.n)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m dataplane.demo")
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="the trainer process (started by `dataplane demo`)")
    t.add_argument("url")
    t.add_argument("--out", type=Path, default=Path("demo_out"))
    t.add_argument("--stored", help="the file the simulation also writes (offline epoch)")
    t.add_argument("--report", action="store_true", help="progress as JSON lines on stdout")
    args = ap.parse_args(argv)
    train(args.url, args.out, args.stored, report=args.report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
