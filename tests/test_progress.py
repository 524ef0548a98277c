"""The progress bars of the commands: shown on a terminal, quiet in a pipe or log unless asked,
and then one line per redraw (no carriage returns or cursor moves in a log file)."""

from __future__ import annotations

import argparse
import io

from dataplane import _progress


def test_a_bar_is_quiet_off_a_terminal_unless_asked() -> None:
    out = io.StringIO()
    with _progress.bar("convert", 3, stream=out) as bar:
        bar.update(3)
    assert out.getvalue() == ""
    with _progress.bar("convert", 3, stream=out, show=False) as bar:
        bar.update(3)
    assert out.getvalue() == ""


def test_a_bar_asked_for_in_a_log_writes_whole_lines() -> None:
    out = io.StringIO()
    with _progress.bar("convert", 3, stream=out, show=True) as bar:
        for _ in range(3):
            bar.set_description_str("step")
            bar.update()
    with _progress.bar("second", stream=out, show=True, position=1) as bar:
        bar.update(5)
    text = out.getvalue()
    assert "\r" not in text and "\x1b" not in text
    lines = text.splitlines()
    assert all(line.strip() for line in lines)
    assert any(line.startswith("step: 100%") and "3/3" in line for line in lines), lines
    assert lines[-1].startswith("second: 5 step"), lines


def test_the_flags_say_what_a_bar_does() -> None:
    ap = argparse.ArgumentParser()
    _progress.add_arguments(ap)
    assert _progress.wanted(ap.parse_args([])) is None
    assert _progress.wanted(ap.parse_args(["--progress"])) is True
    assert _progress.wanted(ap.parse_args(["--quiet"])) is False
    assert _progress.wanted(ap.parse_args(["--quiet", "--progress"])) is False
