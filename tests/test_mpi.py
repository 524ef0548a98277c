"""Real MPI processes (the mpich wheel's mpiexec in the virtualenv).

Parallel publishing is not implemented yet; until it is, a communicator of more than one rank
must be refused with a clear error on every rank, and a one-rank communicator must just work.
Each rank reports through its own file: mpiexec may interleave the ranks' stdout mid-line.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap

MPIEXEC = shutil.which("mpiexec", path=os.path.dirname(sys.executable)) or shutil.which("mpiexec")


def mpirun(n: int, code: str, out, timeout: float = 120) -> dict[int, object]:
    """Run ``code`` on ``n`` ranks; each rank calls ``report(value)``. Returns rank -> value."""
    assert MPIEXEC, "mpiexec not found: `pip install mpich` (the dev extra) provides one"
    prelude = textwrap.dedent(
        f"""
        import json
        from mpi4py import MPI
        def report(value):
            with open({str(out)!r} + f"/{{MPI.COMM_WORLD.rank}}.json", "w") as f:
                json.dump(value, f)
        """
    )
    result = subprocess.run(
        [MPIEXEC, "-n", str(n), sys.executable, "-c", prelude + textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert result.returncode == 0, result.stderr
    return {r: json.loads((out / f"{r}.json").read_text()) for r in range(n)}


def test_multi_rank_comm_is_refused_on_every_rank(tmp_path) -> None:
    got = mpirun(
        2,
        """
        import dataplane as dp
        comm = MPI.COMM_WORLD
        messages = []
        for url in ("mem://m", f"shm://m{comm.rank}"):
            try:
                dp.publish(url, comm=comm)
                messages.append("accepted")
            except dp.OptionError as exc:
                messages.append(str(exc))
        report(messages)
        """,
        tmp_path,
    )
    for messages in got.values():
        assert len(messages) == 2
        assert all("comm= with 2 ranks" in m for m in messages), messages


def test_single_rank_comm_works(tmp_path) -> None:
    got = mpirun(
        2,
        """
        import numpy as np, dataplane as dp
        rank = MPI.COMM_WORLD.rank
        url = f"mem://r{rank}"
        sub = dp.subscribe(url, timeout=10)
        with dp.publish(url, comm=MPI.COMM_SELF) as pub:
            pub.write({"x": np.full(3, rank)})
        report([s["x"].tolist() for s in sub])
        """,
        tmp_path,
    )
    assert got == {0: [[0, 0, 0]], 1: [[1, 1, 1]]}
