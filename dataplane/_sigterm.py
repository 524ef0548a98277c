"""SIGTERM, a scheduler ending the job, ends open channels cleanly (``Terminated``)."""

from __future__ import annotations

import os
import signal
import threading
from typing import Any

from dataplane.errors import Terminated

_FORK_HOOK: list[bool] = []  # the at-fork hook below is registered once per process


def _on_sigterm(signum: int, frame: Any) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM kills at once
    raise Terminated(signum)


def end_cleanly_on_sigterm() -> None:
    """Make SIGTERM end open channels cleanly (:class:`Terminated`) where it would otherwise
    kill the process without a word: only from the main thread, never over a handler the
    program installed itself."""
    if threading.current_thread() is not threading.main_thread():
        return
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        if not _FORK_HOOK:
            os.register_at_fork(
                before=_block_sigterm, after_in_parent=_unblock_sigterm, after_in_child=_child
            )
            _FORK_HOOK.append(True)
        signal.signal(signal.SIGTERM, _on_sigterm)


# NOTE: a forked child (a DataLoader worker) gets SIGTERM's default action back. SIGTERM is
# blocked across the fork: CPython drops a signal that reaches a Python handler in the child
# before its after-fork reset, so a terminate() right after start() would be lost.
def _block_sigterm() -> None:
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})


def _unblock_sigterm() -> None:
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})


def _child() -> None:
    if signal.getsignal(signal.SIGTERM) is _on_sigterm:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    _unblock_sigterm()
