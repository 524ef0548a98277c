"""Use 3, the trainer side: learn online from the live simulation and steer it.

Subscribes to the simulation's data channel and fits a surrogate of its operator
(``u -> du/dt``, a 3x3 convolution) on every step as it arrives. It steers back on a second
channel that it publishes: after ``--steer-at`` steps it changes the simulation's diffusion
coefficient (the surrogate then has to follow the new physics: its error jumps, and falls
again), and once the error has stayed below ``--tol`` for a few steps under the new physics it
tells the simulation to stop. Control messages are ordinary steps: small arrays and
attributes, with the same guarantees as the data.

    mpiexec -n 1 python examples/coupled_trainer.py --data shm://heat --control shm://heat-ctl
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from torch import nn

import dataplane as dp


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True, help="the simulation's channel")
    ap.add_argument("--control", required=True, help="channel to steer the simulation on")
    ap.add_argument("--steer-at", type=int, default=20, help="step to change alpha at")
    ap.add_argument("--alpha", type=float, default=0.1, help="the new alpha")
    ap.add_argument("--tol", type=float, default=1e-4, help="relative error to stop at")
    ap.add_argument("--timeout", type=float, default=120, help="seconds to wait per step")
    args = ap.parse_args()
    torch.manual_seed(0)
    model = nn.Conv2d(1, 1, 3, padding=1, bias=False)
    nn.init.zeros_(model.weight)
    opt = torch.optim.LBFGS(model.parameters(), lr=1, max_iter=5, history_size=10)
    steered, good, stop_sent, errors = None, 0, False, []
    # Subscribe first: the simulation's first step waits for this subscriber. Then open the
    # control channel with rendezvous=1: it opens once the simulation listens (it does from
    # its first step on), so no message is sent before anyone listens.
    with (
        dp.subscribe(args.data, timeout=args.timeout) as sub,
        dp.publish(args.control, rendezvous=1) as control,
    ):
        for step in sub:
            u = torch.from_numpy(np.array(step["u"]))[None, None]
            dudt = torch.from_numpy(np.array(step["dudt"]))[None, None]
            scale = u.abs().amax().clamp_min(1e-6)
            u, dudt = u / scale, dudt / scale

            def closure(u=u, dudt=dudt) -> torch.Tensor:
                opt.zero_grad()
                loss = ((model(u) - dudt) ** 2).sum() / (dudt**2).sum().clamp_min(1e-12)
                loss.backward()
                return loss

            err = float(closure().detach())  # on a step it has not trained on yet
            opt.step(closure)
            errors.append(err)
            if steered is None and len(errors) == args.steer_at:
                control.write(
                    {"alpha": np.float64(args.alpha)}, attrs={"command": "set", "alpha": args.alpha}
                )
                steered = step.index
                print(f"step {step.index}: error {err:.2e}; set alpha = {args.alpha}", flush=True)
            elif steered is not None and not stop_sent and step.attrs.get("alpha") == args.alpha:
                good = good + 1 if err < args.tol else 0
                if good == 3:
                    reason = f"surrogate error {err:.1e} < {args.tol:g} under alpha={args.alpha}"
                    control.write({"stop": np.int8(1)}, attrs={"command": "stop", "reason": reason})
                    print(f"step {step.index}: {reason}; stop", flush=True)
                    stop_sent = True
        stats = sub.stats
    print(
        f"trainer received {stats.steps} steps ({stats.bytes / 1e6:.1f} MB), "
        f"{stats.dropped} dropped; first error {errors[0]:.2e}, last {errors[-1]:.2e}",
        flush=True,
    )


if __name__ == "__main__":
    main()
