"""A 2-D heat equation split into row blocks over MPI ranks: the simulation of the examples.

Each rank owns ``rows`` consecutive rows of the ``n x n`` global grid plus one halo row on each
side, exchanged with its neighbours every iteration (fixed cold edges, a few hot spots that
move). At output time the simulation has the temperature ``u`` and its time derivative
``dudt = alpha * laplacian(u)``: the pair a surrogate learns (the PDE's operator).
Runs without MPI too (one rank).
"""

from __future__ import annotations

import numpy as np


class Heat:
    """Explicit Euler on this rank's rows; ``comm`` is an mpi4py communicator or None."""

    def __init__(self, n: int = 128, comm=None, alpha: float = 0.2, seed: int = 0) -> None:
        self.n, self.comm, self.alpha = n, comm, alpha
        self.rank = comm.Get_rank() if comm is not None else 0
        self.size = comm.Get_size() if comm is not None else 1
        per, extra = divmod(n, self.size)
        self.row0 = self.rank * per + min(self.rank, extra)
        self.rows = per + (1 if self.rank < extra else 0)
        self.u = np.zeros((self.rows + 2, n), np.float32)  # with the two halo rows
        self.rng = np.random.default_rng(seed)  # the same on every rank: same hot spots
        self.time = 0.0
        self.iteration = 0

    @property
    def block(self) -> np.ndarray:
        """This rank's rows of the temperature (a view)."""
        return self.u[1:-1]

    def _halo(self) -> None:
        up = self.rank - 1 if self.rank > 0 else None
        down = self.rank + 1 if self.rank < self.size - 1 else None
        if self.comm is not None and self.size > 1:
            from mpi4py import MPI

            null = MPI.PROC_NULL
            self.comm.Sendrecv(
                self.u[1],
                up if up is not None else null,
                recvbuf=self.u[-1],
                source=down if down is not None else null,
            )
            self.comm.Sendrecv(
                self.u[-2],
                down if down is not None else null,
                recvbuf=self.u[0],
                source=up if up is not None else null,
            )
        if up is None:
            self.u[0] = 0.0
        if down is None:
            self.u[-1] = 0.0

    def laplacian(self) -> np.ndarray:
        u = self.u
        lap = u[:-2] + u[2:] - 4 * u[1:-1]
        lap[:, 1:] += u[1:-1, :-1]
        lap[:, :-1] += u[1:-1, 1:]
        return lap

    def heat_spots(self, count: int = 3) -> None:
        """Add heat at a few random places of the global grid (each rank its part)."""
        for y, x in self.rng.integers(2, self.n - 2, (count, 2)):
            if self.row0 <= y < self.row0 + self.rows:
                self.u[1 + y - self.row0, x - 2 : x + 3] += 5.0

    def advance(self, iterations: int = 1, dt: float = 1.0) -> None:
        for _ in range(iterations):
            self._halo()
            self.u[1:-1] += dt * self.alpha * self.laplacian()
            self.iteration += 1
            self.time += dt
            if self.iteration % 25 == 1:
                self.heat_spots()

    def dudt(self) -> np.ndarray:
        """The time derivative of this rank's rows now (needs fresh halos)."""
        self._halo()
        return self.alpha * self.laplacian()
