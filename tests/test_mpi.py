"""Real MPI processes (the mpich wheel's mpiexec in the virtualenv).

Parallel publishing is not implemented yet; until it is, a communicator of more than one rank
must be refused with a clear error on every rank, and a one-rank communicator must just work.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap

MPIEXEC = shutil.which("mpiexec", path=os.path.dirname(sys.executable)) or shutil.which("mpiexec")


def mpirun(n: int, code: str, timeout: float = 120) -> subprocess.CompletedProcess:
    assert MPIEXEC, "mpiexec not found: `pip install mpich` (the dev extra) provides one"
    return subprocess.run(
        [MPIEXEC, "-n", str(n), sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_multi_rank_comm_is_refused_on_every_rank() -> None:
    result = mpirun(
        2,
        """
        from mpi4py import MPI
        import dataplane as dp
        comm = MPI.COMM_WORLD
        for url in ("mem://m", f"shm://m{comm.rank}"):
            try:
                dp.publish(url, comm=comm)
            except dp.OptionError as exc:
                assert "2 ranks" in str(exc), exc
                print("refused", comm.rank, flush=True)
        """,
    )
    assert result.returncode == 0, result.stderr
    assert sorted(result.stdout.split("\n")) == sorted(
        ["refused 0", "refused 0", "refused 1", "refused 1", ""]
    )


def test_single_rank_comm_works() -> None:
    result = mpirun(
        2,
        """
        from mpi4py import MPI
        import numpy as np, dataplane as dp
        rank = MPI.COMM_WORLD.rank
        url = f"mem://r{rank}"
        sub = dp.subscribe(url, timeout=10)
        with dp.publish(url, comm=MPI.COMM_SELF) as pub:
            pub.write({"x": np.full(3, rank)})
        print(rank, [s["x"].tolist() for s in sub], flush=True)
        """,
    )
    assert result.returncode == 0, result.stderr
    assert sorted(result.stdout.split("\n")) == ["", "0 [[0, 0, 0]]", "1 [[1, 1, 1]]"]
