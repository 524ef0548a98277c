"""``dataplane bench compare A B``: two runs' figures side by side.

Each folder is a ``dataplane bench --out`` folder (its ``bench.jsonl``). Cells are matched by
what they measured (phase, transport, pattern, reader, cache, mode, method, step size); for
each, the two medians, their ratio (above 1: B is better, whether the figure is a rate or a
time) and whether the difference exceeds the spread of the repeats (the two min-max ranges do
not overlap). Cells measured on a busy machine or cut at ``--max-seconds`` are marked, and
settings that differ between the runs are listed first: a ratio across different settings
compares the settings too.
"""

from __future__ import annotations

import json
import os
from typing import Any

from dataplane.errors import DataplaneError

from ._common import fmt_size

__all__ = ["cell_key", "compare", "load", "main_figure", "markdown"]

_IDENTITY = {
    "limit": ("what",),
    "write": ("transport", "mode", "written"),
    "read": ("transport", "pattern", "reader", "cache"),
    "nodes": ("transport", "mode"),
    "stream": ("method", "step_bytes"),
}
_IGNORED_SETTINGS = {"dir", "cache_dir"}


def load(folder: str) -> list[dict[str, Any]]:
    """The figures of one run (its aggregate rows: every rank together)."""
    path = os.path.join(folder, "bench.jsonl")
    try:
        with open(path) as f:
            rows = [json.loads(line) for line in f if line.strip()]
    except FileNotFoundError:
        raise DataplaneError(
            f"{folder} holds no bench.jsonl: give two folders that `dataplane bench --out` wrote"
        ) from None
    except json.JSONDecodeError as exc:
        raise DataplaneError(f"{path} is not a bench.jsonl ({exc})") from None
    return [r for r in rows if r.get("rank") is None and r.get("phase") in _IDENTITY]


def cell_key(row: dict[str, Any]) -> tuple[Any, ...]:
    return (row["phase"], *(row.get(k) for k in _IDENTITY[row["phase"]]))


def cell_label(row: dict[str, Any]) -> str:
    parts = [row["phase"]]
    for k in _IDENTITY[row["phase"]]:
        v = row.get(k)
        if v is not None:
            parts.append(fmt_size(v) if k == "step_bytes" else str(v))
    return " ".join(parts)


def main_figure(row: dict[str, Any]) -> tuple[str, str, bool]:
    """(field, unit, higher is better) of the figure a cell is judged by."""
    phase = row["phase"]
    if phase == "write":
        if row.get("gbps") is not None:
            return "gbps", "GB/s", True
        return "blocked_ms_per_step", "ms blocked/step", False
    if phase == "stream" or (phase == "limit" and "gbps" in row):
        return "gbps", "GB/s", True
    return "samples_per_s", "samples/s", True


def _range(row: dict[str, Any], field: str) -> tuple[float, float] | None:
    s = (row.get("spread") or {}).get(field)
    if s is None or row.get("repeats", 1) < 2:
        return None
    return float(s[0]), float(s[1])


def compare(a: list[dict[str, Any]], b: list[dict[str, Any]]) -> dict[str, Any]:
    """Matched cells of runs ``a`` and ``b``, cells only one has, and differing settings."""
    by_a = {cell_key(r): r for r in a}
    by_b = {cell_key(r): r for r in b}
    cells = []
    for key, ra in by_a.items():
        rb = by_b.get(key)
        if rb is None:
            continue
        field, unit, higher = main_figure(ra)
        va, vb = ra.get(field), rb.get(field)
        if va is None or vb is None:
            continue
        ratio = (vb / va if higher else va / vb) if va > 0 and vb > 0 else None
        sa, sb = _range(ra, field), _range(rb, field)
        beyond = None if sa is None or sb is None else (sa[1] < sb[0] or sb[1] < sa[0])
        cells.append(
            {
                "cell": cell_label(ra),
                "figure": field,
                "unit": unit,
                "higher_is_better": higher,
                "a": va,
                "b": vb,
                "a_range": sa,
                "b_range": sb,
                "ratio": ratio,
                "beyond_spread": beyond,
                "busy": [bool((r.get("load") or {}).get("busy")) for r in (ra, rb)],
                "cut": [r.get("complete") is False for r in (ra, rb)],
            }
        )
    ca = a[0]["config"] if a else {}
    cb = b[0]["config"] if b else {}
    settings = {
        k: (ca.get(k), cb.get(k))
        for k in sorted(set(ca) | set(cb))
        if k not in _IGNORED_SETTINGS and ca.get(k) != cb.get(k)
    }
    return {
        "cells": cells,
        "only_a": [cell_label(by_a[k]) for k in by_a if k not in by_b],
        "only_b": [cell_label(by_b[k]) for k in by_b if k not in by_a],
        "settings": settings,
        "smoke_test": [bool(a and a[0].get("smoke_test")), bool(b and b[0].get("smoke_test"))],
        "ranks": [a[0]["ranks"] if a else None, b[0]["ranks"] if b else None],
    }


def _num(x: float) -> str:
    return f"{x:,.0f}" if abs(x) >= 1000 else f"{x:.3g}"


def _cell(value: float, rng: tuple[float, float] | None, busy: bool, cut: bool) -> str:
    text = _num(value)
    if rng is not None:
        text += f" ({_num(rng[0])}–{_num(rng[1])})"
    return text + ("†" if busy else "") + ("*" if cut else "")


def markdown(result: dict[str, Any], name_a: str, name_b: str) -> str:
    out = ["# dataplane bench compare", "", f"A: `{name_a}`  ", f"B: `{name_b}`", ""]
    for side, quick in zip("AB", result["smoke_test"]):
        if quick:
            out += [f"**{side} is a smoke test (`--quick`): its figures mean nothing.**", ""]
    if result["settings"]:
        out += ["Settings that differ (the ratios compare them too):", ""]
        out += [f"- `{k}`: {va!r} in A, {vb!r} in B" for k, (va, vb) in result["settings"].items()]
        out.append("")
    out += [
        "Each figure: median (min–max of the repeats). B/A: above 1, B is better (a rate "
        "higher, a time lower). Beyond spread: the two ranges do not overlap; with one run "
        "on either side there is no spread to judge by (–).",
        "",
        "| cell | figure | A | B | B/A | beyond spread |",
        "|---|---|---|---|---|---|",
    ]
    for c in result["cells"]:
        beyond = {None: "–", True: "yes", False: "no"}[c["beyond_spread"]]
        ratio = "–" if c["ratio"] is None else f"{c['ratio']:.2f}"
        a = _cell(c["a"], c["a_range"], c["busy"][0], c["cut"][0])
        b = _cell(c["b"], c["b_range"], c["busy"][1], c["cut"][1])
        out.append(f"| {c['cell']} | {c['unit']} | {a} | {b} | {ratio} | {beyond} |")
    out.append("")
    if any(any(c["busy"]) for c in result["cells"]):
        out += ["† measured while other processes kept the machine busy.", ""]
    if any(any(c["cut"]) for c in result["cells"]):
        out += ["* epoch cut at `--max-seconds`: the rate of its first samples.", ""]
    for side, names in (("A", result["only_a"]), ("B", result["only_b"])):
        if names:
            out += [f"Only in {side}: " + ", ".join(names), ""]
    return "\n".join(out)
