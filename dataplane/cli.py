"""The ``dataplane`` command."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import dataplane as dp

__all__ = ["main"]


def _demo(args: argparse.Namespace) -> int:
    from dataplane.demo import run_demo

    run_demo(args.steps, args.size, args.every, args.out, policy=args.policy, url=args.url)
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="dataplane", description="Move data between HPC simulations and AI training."
    )
    ap.add_argument("--version", action="version", version=f"dataplane {dp.__version__}")
    sub = ap.add_subparsers(dest="cmd", required=True)
    demo = sub.add_parser(
        "demo",
        help="simulation-to-training demo over shared memory",
        description="A Gray-Scott simulation publishes to shm:// while a separate process "
        "trains a small CNN online to predict its next step.",
    )
    demo.add_argument("--steps", type=int, default=250, help="steps to publish (default 250)")
    demo.add_argument("--size", type=int, default=128, help="grid is SIZE x SIZE (default 128)")
    demo.add_argument("--every", type=int, default=4, help="iterations per published step")
    demo.add_argument("--policy", choices=("block", "drop-oldest"), default="block")
    demo.add_argument("--url", help="channel (default: a fresh shm://demo-...)")
    demo.add_argument(
        "--out",
        type=Path,
        default=Path("demo_out"),
        help="where loss.png and summary.json go (default demo_out/)",
    )
    demo.set_defaults(func=_demo)
    args = ap.parse_args(argv)
    for name in ("steps", "size", "every"):
        if getattr(args, name, 1) < 1:
            ap.error(f"--{name} must be at least 1")
    try:
        return args.func(args)
    except dp.DataplaneError as exc:
        print(f"dataplane: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
