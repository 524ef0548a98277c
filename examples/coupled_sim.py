"""Use 3, the simulation side: publish every step, take steering messages between steps.

Launched on its own (``mpiexec -n 2``), like the trainer (``coupled_trainer.py``): no server,
no shared launcher. It publishes each output step on the data channel and, between its own
steps, looks at the control channel without waiting (``poll``): a message that sets ``alpha``
changes the physics from the next step on, ``stop`` ends the run (the trainer has what it
needs). Rank 0 reads the control channel and broadcasts what it got.

    # one node, shared memory
    mpiexec -n 2 python examples/coupled_sim.py --data shm://heat --control shm://heat-ctl &
    mpiexec -n 1 python examples/coupled_trainer.py --data shm://heat --control shm://heat-ctl
    # across nodes: ADIOS2 SST, contact files on a shared filesystem
    mpiexec -n 2 python examples/coupled_sim.py --data sst:///scratch/heat \\
        --control sst:///scratch/heat-ctl &
"""

from __future__ import annotations

import argparse

from heat import Heat  # examples/ is the script's directory
from mpi4py import MPI

import dataplane as dp


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True, help="channel to publish steps on")
    ap.add_argument("--control", required=True, help="channel the trainer steers on")
    ap.add_argument("--n", type=int, default=64, help="grid is N x N (default 64)")
    ap.add_argument("--steps", type=int, default=500, help="at most this many output steps")
    ap.add_argument("--every", type=int, default=5, help="iterations per output step")
    ap.add_argument(
        "--readers", type=int, default=1, help="subscribers to wait for before the first step"
    )
    args = ap.parse_args()
    comm = MPI.COMM_WORLD
    sim = Heat(args.n, comm)
    shape = (args.n, args.n)
    control = dp.subscribe(args.control, timeout=0) if sim.rank == 0 else None
    stopped = None
    # rendezvous: the first step waits until the trainer has subscribed (a stream keeps
    # nothing for subscribers that come later than its ring holds).
    with dp.publish(args.data, comm=comm, rendezvous=args.readers) as pub:
        for k in range(args.steps):
            sim.advance(args.every)
            pub.write(
                {
                    "u": dp.Block(sim.block, start=(sim.row0, 0), shape=shape),
                    "dudt": dp.Block(sim.dudt(), start=(sim.row0, 0), shape=shape),
                },
                attrs={"time": sim.time, "alpha": sim.alpha},
            )
            # Steering: whatever arrived since the last step, without waiting for anything.
            messages = []
            while control is not None and (msg := control.poll(0)) is not None:
                messages.append(dict(msg.attrs))
            for msg in comm.bcast(messages, root=0):
                if msg.get("command") == "set":
                    sim.alpha = float(msg["alpha"])
                    if sim.rank == 0:
                        print(f"step {k}: trainer set alpha = {sim.alpha}", flush=True)
                elif msg.get("command") == "stop":
                    stopped = (k, msg.get("reason", ""))
            if stopped:
                break
    if control is not None:
        control.close()
    if sim.rank == 0:
        why = f"stopped by the trainer at step {stopped[0]}: {stopped[1]}" if stopped else "done"
        print(f"simulation published {k + 1} steps; {why}", flush=True)


if __name__ == "__main__":
    main()
