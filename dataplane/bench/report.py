"""The benchmark's report: a Markdown table and PNG plots from its figures."""

from __future__ import annotations

import os
from typing import Any

from ._common import fmt_size

__all__ = ["markdown", "plots"]


def _agg(rows: list[dict[str, Any]], phase: str) -> list[dict[str, Any]]:
    return [r for r in rows if r.get("phase") == phase and r.get("rank") is None]


def _f(x: float | None, digits: int = 2) -> str:
    if x is None:
        return "–"
    if abs(x) >= 1000:
        return f"{x:,.0f}"
    return f"{x:.{digits}f}"


def _table(header: list[str], body: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(row) + " |" for row in body]
    return out + [""]


def markdown(rows: list[dict[str, Any]], command: str = "") -> str:
    """The report as Markdown: limits, then each phase that ran."""
    if not rows:
        return "(no figures)\n"
    cfg = rows[0]["config"]
    ranks, nodes = rows[0]["ranks"], rows[0]["nodes"]
    out = ["# dataplane bench", ""]
    if command:
        out += [f"`{command}`", ""]
    out += [
        f"{ranks} rank{'s' * (ranks > 1)} on {nodes} node{'s' * (nodes > 1)}, data in "
        f"`{cfg['dir']}`; {cfg['samples']} samples of {fmt_size(cfg['sample_size'])} in "
        f"{cfg['steps']} steps ({fmt_size(cfg['samples'] * cfg['sample_size'])}); every ratio "
        f"is to a figure measured in the same run.",
        "",
    ]
    lim = _agg(rows, "limit")
    if lim:
        out += ["## Limits of this machine", ""]
        out += _table(
            ["limit", "value"],
            [
                [
                    r["what"],
                    f"{_f(r['samples_per_s'], 0)} samples/s ({_f(r['mb_per_s'], 0)} MB/s)"
                    if "samples_per_s" in r
                    else f"{_f(r['gbps'])} GB/s"
                    + (f" ({r['evicted']})" if r.get("evicted") else ""),
                ]
                for r in lim
            ],
        )
    wr = _agg(rows, "write")
    if wr:
        out += [
            "## Write (simulation side)",
            "",
            "Blocked: time in `write` per step, the simulation not computing. Synchronous: "
            "nothing between steps, GB/s from open to close. Asynchronous: the simulation "
            "computes between steps twice as long as a synchronous write of a step took. "
            "Baseline: plain h5py, a file per rank, a dataset per step. Ranks write: how "
            "the channel was written (`mpio`: every rank its hyperslab through MPI-IO; "
            "`aggregators=K`: K ranks write subfiles of the others' blocks; `own-chunks`: every "
            "rank its own chunks), as `dataplane inspect` reports it.",
            "",
        ]
        out += _table(
            [
                "transport",
                "publish",
                "ranks write",
                "compute ms/step",
                "blocked ms/step",
                "GB/s",
                "of seq write",
                "blocked vs h5py",
                "blocked vs sync",
            ],
            [
                [
                    r["transport"],
                    r["mode"],
                    r.get("written", ""),
                    _f(r.get("compute_ms_per_step")),
                    _f(r["blocked_ms_per_step"]),
                    _f(r["gbps"]),
                    _f(r["of_limit"]),
                    _f(r["vs_baseline_blocked"]),
                    _f(r.get("vs_sync_blocked"), 3),
                ]
                for r in wr
            ],
        )
    rd = _agg(rows, "read")
    if rd:
        au = cfg["compute_ms"] > 0
        compute = f", {cfg['compute_ms']:g} ms compute per batch" if au else ""
        out += [
            "## Read (training side)",
            "",
            f"Samples/s through a DataLoader, batch {cfg['batch_size']}, {cfg['workers']} "
            f"workers{compute}. Cold: pages evicted, cache empty; warm: page cache and cache "
            "full. Of limit: of the cold sequential read of the file or the DataLoader ceiling, "
            "whichever is lower (warm: the ceiling)."
            + (" AU: accelerator utilisation, the time the model would not wait." if au else ""),
            "",
        ]
        by = {(r["transport"], r["pattern"], r["reader"], r["cache"]): r for r in rd}
        header = ["transport", "pattern"]
        for state in ("cold", "warm"):
            header += [f"naive {state}", f"dataplane {state}", "x naive", "of limit"]
            if au:
                header += ["AU naive", "AU dataplane"]
        body = []
        for t, p in dict.fromkeys((r["transport"], r["pattern"]) for r in rd):
            cells = [t, p]
            for state in ("cold", "warm"):
                n, d = by.get((t, p, "naive", state)), by.get((t, p, "dataplane", state))
                cells += [
                    _f(n["samples_per_s"], 0) if n else "–",
                    _f(d["samples_per_s"], 0) if d else "–",
                    _f(d.get("vs_naive"), 1) if d else "–",
                    _f(d["of_limit"]) if d else "–",
                ]
                if au:
                    cells += [_f(n["au"]) if n else "–", _f(d["au"]) if d else "–"]
            body.append(cells)
        out += _table(header, body)
    nd = _agg(rows, "nodes")
    if nd:
        first = nd[0]
        out += [
            "## Cooperating node caches",
            "",
            f"{first['cache_nodes']} nodes, each node's cache {first['cache_share']:.0%} of the "
            f"dataset ({first['transport']}, block shuffle, {cfg['workers']} workers); fresh "
            "caches, epochs one after another. Alone: `NodeCache(path)` on every node; "
            "cooperating: `NodeCache(path, comm=comm)`, each shard read from the source by one "
            "node and sent to the others. Source: bytes read from the source over all nodes, "
            "over the dataset's size; later epochs: median samples/s of epochs 2 on.",
            "",
        ]
        out += _table(
            [
                "caches",
                "samples/s by epoch",
                "later epochs",
                "x alone",
                "source",
                "between nodes",
                "peers failed",
            ],
            [
                [
                    r["mode"],
                    " / ".join(_f(x, 0) for x in r["epochs_samples_per_s"]),
                    _f(r["samples_per_s"], 0),
                    _f(r.get("vs_alone")) if r.get("vs_alone") else "–",
                    f"{_f(r['source_over_dataset'])}x",
                    f"{r['peer_bytes'] / 1e6:.1f} MB",
                    f"{r['peer_failures']:.0f}",
                ]
                for r in nd
            ],
        )
    st = _agg(rows, "stream")
    if st:
        out += [
            "## Stream (coupled jobs)",
            "",
            "One writer process, one reader; throughput with queue_limit 4, latency (write to "
            "delivery) with queue_limit 1.",
            "",
        ]
        queue = {r["step_bytes"]: r["gbps"] for r in st if r["method"] == "mp.Queue"}
        out += _table(
            ["step size", "method", "GB/s", "of raw copy", "x mp.Queue", "median µs", "p99 µs"],
            [
                [
                    fmt_size(r["step_bytes"]),
                    r["method"],
                    _f(r["gbps"]),
                    _f(r["of_limit"]),
                    _f(r["gbps"] / queue[r["step_bytes"]], 1)
                    if queue.get(r["step_bytes"])
                    else "–",
                    _f(r["median_us"], 1),
                    _f(r["p99_us"], 1),
                ]
                for r in st
            ],
        )
    return "\n".join(out)


def plots(rows: list[dict[str, Any]], out_dir: str) -> list[str]:
    """PNG plots (read, write, stream); returns the paths written. Needs matplotlib."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    written = []

    def save(fig: Any, name: str) -> None:
        fig.tight_layout()
        written.append(os.path.join(out_dir, name))
        fig.savefig(written[-1], dpi=110)
        plt.close(fig)

    rd = _agg(rows, "read")
    if rd:
        groups = list(dict.fromkeys((r["transport"], r["pattern"]) for r in rd))
        by = {(r["transport"], r["pattern"], r["reader"], r["cache"]): r for r in rd}
        series = [(rd_, c) for rd_ in ("naive", "dataplane") for c in ("cold", "warm")]
        fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(groups) + 2), 4.5))
        x = np.arange(len(groups))
        w = 0.8 / len(series)
        colors = {"naive": ("#f4a582", "#ca0020"), "dataplane": ("#92c5de", "#0571b0")}
        for i, (reader, state) in enumerate(series):
            vals = [by.get((t, p, reader, state), {}).get("samples_per_s", 0) for t, p in groups]
            ax.bar(
                x + (i - len(series) / 2 + 0.5) * w,
                vals,
                w,
                label=f"{reader} {state}",
                color=colors[reader][state == "warm"],
            )
        ax.set_xticks(x, [f"{t}\n{p}" for t, p in groups], fontsize=8)
        ax.set_yscale("log")
        ax.set_ylabel("samples/s")
        ax.set_title("Read: throughput by transport and access pattern, cold and warm")
        ax.legend(fontsize=8)
        save(fig, "read.png")
    wr = _agg(rows, "write")
    if wr:
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
        labels = [f"{r['transport']}\n{r['mode']}" for r in wr]
        sync = [r for r in wr if r["gbps"] is not None]
        names = [
            r["transport"]
            + (f"\n{r['written']}" if r.get("written", "one process") != "one process" else "")
            for r in sync
        ]
        a1.bar(names, [r["gbps"] for r in sync], color="#0571b0")
        a1.set_ylabel("GB/s")
        a1.set_title("Synchronous write throughput")
        a2.bar(labels, [r["blocked_ms_per_step"] for r in wr], color="#ca0020")
        a2.set_ylabel("ms blocked per step")
        a2.set_title("Simulation blocked per step")
        for a in (a1, a2):
            a.tick_params(axis="x", labelsize=8)
        save(fig, "write.png")
    st = _agg(rows, "stream")
    if st:
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
        for method in dict.fromkeys(r["method"] for r in st):
            mine = sorted((r for r in st if r["method"] == method), key=lambda r: r["step_bytes"])
            sizes = [r["step_bytes"] for r in mine]
            a1.plot(sizes, [r["gbps"] for r in mine], "o-", label=method)
            a2.plot(sizes, [r["median_us"] for r in mine], "o-", label=method)
        for a, lab in ((a1, "GB/s"), (a2, "median latency (µs)")):
            a.set_xscale("log", base=2)
            a.set_yscale("log")
            a.set_xlabel("step size (bytes)")
            a.set_ylabel(lab)
            a.legend(fontsize=8)
        a1.set_title("Stream throughput")
        a2.set_title("Stream latency")
        save(fig, "stream.png")
    return written
