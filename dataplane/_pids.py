"""Whether a process runs: what the transports' leases and the node cache's sweeps both ask."""

from __future__ import annotations

import os

__all__ = ["process_identity"]


def process_identity(pid: int) -> int | None:
    """Start time of process ``pid`` (clock ticks since boot), or None if it is gone.

    Comparing start times makes a recycled pid count as a different process. A zombie (dead,
    not yet reaped by its parent) counts as gone.
    """
    if pid <= 0:
        return None
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return None
    except OSError:
        data = b""
    if data:
        fields = data[data.rindex(b")") + 2 :].split()
        if fields[0] in (b"Z", b"X"):
            return None
        return int(fields[19])
    # No procfs: fall back to signal 0 (cannot tell recycled pids apart).
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass
    return 0
