"""Progress bars on stderr for ``dataplane convert``, ``bench`` and ``demo``: one look (tqdm),
shown on a terminal and quiet elsewhere unless asked for (``--progress``), so that logs and
pipes get no carriage-return noise."""

from __future__ import annotations

import os
import sys
from typing import Any, TextIO


def bar(
    desc: str,
    total: int | None = None,
    *,
    unit: str = " step",
    show: bool | None = None,
    stream: TextIO | None = None,
    **kwargs: Any,
) -> Any:
    """A ``tqdm`` bar. ``show``: None shows it only when ``stream`` (stderr) is a terminal,
    True always (a log file gets a line per refresh), False never."""
    from tqdm import tqdm

    out = stream if stream is not None else sys.stderr
    tty = _isatty(out)
    if show is None:
        show = tty
    if show and not tty:
        out = _Lines(out)
    # A terminal that reports no size (some ptys of batch systems) would get an empty bar.
    width = _columns(out) if tty else 0
    if width <= 0:
        kwargs.setdefault("nrows", 24)
    return tqdm(
        total=total,
        desc=desc,
        unit=unit,
        file=out,
        disable=not show,
        dynamic_ncols=width > 0,
        ncols=None if width > 0 else 100,
        # A log file is not redrawn in place: a line every few seconds instead of five a second.
        mininterval=0.2 if tty else 5.0,
        **kwargs,
    )


def add_arguments(parser: Any) -> None:
    """``--progress`` and ``--quiet``, the same on every command that shows progress."""
    parser.add_argument(
        "--progress",
        action="store_true",
        help="show progress on stderr even when it is not a terminal (a log file)",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress or notes on stderr")


def wanted(args: Any) -> bool | None:
    """What ``show`` is for these parsed arguments."""
    if getattr(args, "quiet", False):
        return False
    return True if getattr(args, "progress", False) else None


class _Lines:
    """A log file's view of a bar: each redraw as a line of its own, without the carriage
    returns and cursor moves that redraw it in place on a terminal."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream

    def write(self, text: str) -> None:
        for part in text.replace("\x1b[A", "").split("\r"):
            line = part.strip("\n")
            if line.strip():
                self.stream.write(line + "\n")

    def flush(self) -> None:
        self.stream.flush()


def _columns(stream: TextIO) -> int:
    try:
        return os.get_terminal_size(stream.fileno()).columns
    except (AttributeError, ValueError, OSError):  # not a file with a descriptor
        return 0


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # closed, or not a real file
        return False
