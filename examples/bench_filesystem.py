"""Use 4: benchmark a (parallel) filesystem for both sides of a coupled workflow.

Runs ``dataplane bench`` with ``--ranks`` MPI ranks on ``--dir`` (where the simulation would
write: Lustre, GPFS, a burst buffer; any directory works), then renders its report: the
Markdown table on stdout and ``report.html`` (the tables and the plots in one page) next to
``bench.jsonl`` in ``--out``.

    python examples/bench_filesystem.py --dir /lustre/$USER/dpbench --ranks 4
    python examples/bench_filesystem.py --dir /tmp/dpbench --ranks 2 --quick
"""

from __future__ import annotations

import argparse
import base64
import html
import json
import os
import shutil
import subprocess
import sys


def mpiexec() -> str:
    found = shutil.which("mpiexec", path=os.path.dirname(sys.executable)) or shutil.which("mpiexec")
    if not found:
        raise SystemExit("mpiexec not found: install an MPI (or `pip install mpich`)")
    return found


def render(out: str) -> str:
    """One HTML page: the Markdown report's headings, text and tables, then the plots."""
    lines = open(os.path.join(out, "bench.md")).read().splitlines()
    body, table = [], []

    def flush() -> None:
        if table:
            rows = [r.strip("|").split("|") for r in table if not set(r) <= set("|-: ")]
            head, *rest = rows
            body.append("<table><tr>" + "".join(f"<th>{html.escape(c.strip())}</th>" for c in head))
            for r in rest:
                body.append("<tr>" + "".join(f"<td>{html.escape(c.strip())}</td>" for c in r))
            body.append("</table>")
            table.clear()

    for line in lines:
        if line.startswith("|"):
            table.append(line)
            continue
        flush()
        if line.startswith("#"):
            level = len(line) - len(line.lstrip("#"))
            body.append(f"<h{level}>{html.escape(line.lstrip('# '))}</h{level}>")
        elif line.strip():
            body.append(f"<p>{html.escape(line)}</p>")
    flush()
    for name in ("write", "read", "stream"):
        png = os.path.join(out, f"{name}.png")
        if os.path.exists(png):
            data = base64.b64encode(open(png, "rb").read()).decode()
            body.append(f'<h2>{name}</h2><img src="data:image/png;base64,{data}">')
    page = os.path.join(out, "report.html")
    style = "body{font-family:sans-serif;max-width:70em}td,th{padding:2px 8px;text-align:right}"
    with open(page, "w") as f:
        f.write(f"<!doctype html><meta charset=utf-8><style>{style}</style>" + "\n".join(body))
    return page


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", required=True, help="the filesystem to measure (a directory)")
    ap.add_argument("--ranks", type=int, default=2, help="MPI ranks (default 2)")
    ap.add_argument("--phase", default="all", choices=("write", "read", "stream", "all"))
    ap.add_argument("--out", default="bench_results", help="where the report goes")
    ap.add_argument("--quick", action="store_true", help="tiny sizes, about a minute")
    ap.add_argument("extra", nargs="*", help="more `dataplane bench` options, after --")
    args = ap.parse_args()
    cmd = [mpiexec(), "-n", str(args.ranks), sys.executable, "-m", "dataplane.cli", "bench"]
    cmd += [args.phase, "--dir", args.dir, "--out", args.out, *args.extra]
    if args.quick:
        cmd.append("--quick")
    print("$ " + " ".join(cmd), flush=True)
    done = subprocess.run(cmd, stdout=subprocess.DEVNULL)  # progress goes to stderr
    if done.returncode:
        return done.returncode
    rows = [json.loads(line) for line in open(os.path.join(args.out, "bench.jsonl"))]
    print(open(os.path.join(args.out, "bench.md")).read())
    per_rank = sum(r["rank"] is not None for r in rows)
    print(f"{len(rows)} figures ({per_rank} per rank) in {args.out}/bench.jsonl")
    print(f"report: {render(args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
