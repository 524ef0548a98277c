"""The benchmark's report: a Markdown table and PNG plots from its figures."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from ._common import fmt_size

__all__ = ["SMOKE", "markdown", "plot_data", "plots"]


def _agg(rows: list[dict[str, Any]], phase: str) -> list[dict[str, Any]]:
    return [r for r in rows if r.get("phase") == phase and r.get("rank") is None]


def _f(x: float | None, digits: int = 2) -> str:
    if x is None:
        return "–"
    if abs(x) >= 1000:
        return f"{x:,.0f}"
    return f"{x:.{digits}f}"


SMOKE = (
    "**Smoke test (`--quick`): tiny sizes; these figures say that every part runs, not how fast.**"
)


def _table(header: list[str], body: list[list[str]], quick: bool = False) -> list[str]:
    out = [SMOKE, ""] if quick else []
    out += ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(row) + " |" for row in body]
    return out + [""]


def _v(row: dict[str, Any] | None, key: str, digits: int = 2) -> str:
    """A figure as the report shows it: the median, with the min–max of the repeats when
    there were several, † when the machine was busy, * when an epoch was cut."""
    if row is None or row.get(key) is None:
        return "–"
    text = _f(row[key], digits)
    rng = (row.get("spread") or {}).get(key)
    if rng is not None and row.get("repeats", 1) > 1:
        text += f" ({_f(rng[0], digits)}–{_f(rng[1], digits)})"
    if (row.get("load") or {}).get("busy"):
        text += "†"
    if row.get("complete") is False:
        text += "*"
    return text


def _notes(rows: list[dict[str, Any]], what: Any) -> list[str]:
    """Footnotes of a table: the busy cells' load, the cut epochs' samples."""
    out = []
    busy = [r["load"] for r in rows if (r.get("load") or {}).get("busy")]
    if busy:

        def worst(key: str) -> float:
            return max((x.get(key) or 0.0) for x in busy)

        seen = [f"other processes up to {worst('other_cores'):.2f} of {busy[0]['cpus']} cores"]
        if worst("steal_cores") > 0.01:
            seen.append(f"the hypervisor up to {worst('steal_cores'):.2f} cores")
        if worst("loadavg"):
            seen.append(f"load average up to {worst('loadavg'):.1f}")
        out.append(
            "† measured on a busy machine ("
            + ", ".join(seen)
            + "): repeat it on a quiet machine before relying on it."
        )
    cut = [r for r in rows if r.get("complete") is False]
    if cut:
        parts = [
            f"{what(r)}: {r['samples']:,} of {r['of_samples']:,} samples"
            if r.get("of_samples")
            else what(r)
            for r in cut
        ]
        out.append(
            "* epoch cut at `--max-seconds`: the rate of its first samples only ("
            + "; ".join(parts)
            + ")."
        )
    return [n for note in out for n in (note, "")]


def markdown(rows: list[dict[str, Any]], command: str = "") -> str:
    """The report as Markdown: limits, then each phase that ran."""
    if not rows:
        return "(no figures)\n"
    cfg = rows[0]["config"]
    quick = bool(rows[0].get("smoke_test"))
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
    if rows[0].get("smoke_test"):
        out += [SMOKE, ""]
    reps = cfg.get("repeats", 1)
    if reps > 1:
        out += [
            f"Each figure is the median of {reps} runs (of an even number, the slower of the "
            "middle two), the cells measured in turn in each repeat so that drift hits all "
            "alike; in brackets the min–max of the runs. Limits are the best of their runs.",
            "",
        ]
    loads = [r["load"] for r in rows if r.get("load")]
    known = [x["other_cores"] for x in loads if x.get("other_cores") is not None]
    stolen = [x["steal_cores"] for x in loads if x.get("steal_cores") is not None]
    if known:
        out += [
            f"Other processes kept up to {max(known):.2f} of {loads[0]['cpus']} cores busy "
            f"during a cell (median {sorted(known)[len(known) // 2]:.2f})"
            + (
                f", the hypervisor took up to {max(stolen):.2f}"
                if stolen and max(stolen) > 0.01
                else ""
            )
            + "; "
            + (
                f"{sum(x['busy'] for x in loads)} figures were measured on a busy machine (†)."
                if any(x["busy"] for x in loads)
                else "no cell was measured on a busy machine."
            ),
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
            quick,
        )
        out += _notes(lim, lambda r: r["what"])
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
                    _v(r, "blocked_ms_per_step"),
                    _v(r, "gbps"),
                    _f(r["of_limit"]),
                    _f(r["vs_baseline_blocked"]),
                    _f(r.get("vs_sync_blocked"), 3),
                ]
                for r in wr
            ],
            quick,
        )
        out += _notes(wr, lambda r: f"{r['transport']} {r['mode']}")
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
                    _v(n, "samples_per_s", 0),
                    _v(d, "samples_per_s", 0),
                    _f(d.get("vs_naive"), 1) if d else "–",
                    _f(d["of_limit"]) if d else "–",
                ]
                if au:
                    cells += [_f(n["au"]) if n else "–", _f(d["au"]) if d else "–"]
            body.append(cells)
        out += _table(header, body, quick)
        out += _notes(rd, lambda r: f"{r['transport']} {r['pattern']} {r['reader']} {r['cache']}")
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
                    _v(r, "samples_per_s", 0),
                    _f(r.get("vs_alone")) if r.get("vs_alone") else "–",
                    f"{_f(r['source_over_dataset'])}x",
                    f"{r['peer_bytes'] / 1e6:.1f} MB",
                    f"{r['peer_failures']:.0f}",
                ]
                for r in nd
            ],
            quick,
        )
        out += _notes(nd, lambda r: f"caches {r['mode']}")
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
                    _v(r, "gbps"),
                    _f(r["of_limit"]),
                    _f(r["gbps"] / queue[r["step_bytes"]], 1)
                    if queue.get(r["step_bytes"])
                    else "–",
                    _v(r, "median_us", 1),
                    _f(r["p99_us"], 1),
                ]
                for r in st
            ],
            quick,
        )
        out += _notes(st, lambda r: f"{r['method']} {fmt_size(r['step_bytes'])}")
    if ranks > 1:
        out += _ranks(rows, quick)
    return "\n".join(out)


def _ranks(rows: list[dict[str, Any]], quick: bool) -> list[str]:
    """Every figure's spread across ranks: a synchronous training step waits for the slowest."""
    body = []
    for r in rows:
        sp = r.get("rank_spread")
        if r.get("rank") is not None or not sp:
            continue
        phase = r["phase"]
        if phase == "read":
            what, unit, low = (
                f"{r['transport']} {r['pattern']} {r['reader']} {r['cache']}",
                "samples/s",
                True,
            )
        elif phase == "write":
            what, unit, low = (
                f"{r['transport']} {r['mode']} {r.get('written', '')}",
                "ms blocked/step",
                False,
            )
        else:
            what, unit, low = f"{r['method']} {fmt_size(r['step_bytes'])}", "GB/s", True
        slowest = sp["min"] if low else sp["max"]
        fastest = sp["max"] if low else sp["min"]
        ratio = slowest / sp["median"] if low else sp["median"] / max(slowest, 1e-12)
        body.append([phase, what, unit, _f(slowest), _f(sp["median"]), _f(fastest), _f(ratio)])
    if not body:
        return []
    return [
        "## Across ranks",
        "",
        "Each rank's own figure (of the median run): the slowest, median and fastest rank. A "
        "synchronous training step waits for the slowest; slowest/median below 1 is time the "
        "other ranks wait.",
        "",
        *_table(
            [
                "phase",
                "cell",
                "figure",
                "slowest rank",
                "median rank",
                "fastest rank",
                "slowest/median",
            ],
            body,
            quick,
        ),
    ]


def plot_data(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """What the plots draw: per plot its series (medians, and the min–max of the repeats)
    and the limit lines of this machine that bound them."""
    if not rows:
        return {}
    cfg = rows[0]["config"]
    limit = {r["what"]: r for r in _agg(rows, "limit")}
    per_sample = 1e9 / cfg["sample_size"]

    def gbps(what: str) -> float | None:
        return limit[what]["gbps"] if what in limit else None

    out: dict[str, Any] = {
        "title_suffix": " (smoke test: --quick)" if rows[0].get("smoke_test") else ""
    }
    rd = _agg(rows, "read")
    if rd:
        groups = list(dict.fromkeys((r["transport"], r["pattern"]) for r in rd))
        by = {(r["transport"], r["pattern"], r["reader"], r["cache"]): r for r in rd}
        series = []
        for reader in ("naive", "dataplane"):
            for state in ("cold", "warm"):
                cells = [by.get((t, p, reader, state)) for t, p in groups]
                series.append(_series(f"{reader} {state}", cells, "samples_per_s"))
        lines = [
            ("DataLoader ceiling", limit.get("DataLoader ceiling", {}).get("samples_per_s")),
            ("sequential read, cold", (gbps("sequential read cold") or 0) * per_sample),
            ("memcpy", (gbps("memcpy") or 0) * per_sample),
        ]
        out["read"] = {
            "groups": [f"{t}\n{p}" for t, p in groups],
            "series": series,
            "unit": "samples/s",
            "limits": [{"label": k, "value": v} for k, v in lines if v],
        }
    wr = _agg(rows, "write")
    if wr:
        sync = [r for r in wr if r["gbps"] is not None]
        out["write"] = {
            "sync": _series(
                "GB/s",
                sync,
                "gbps",
                names=[
                    r["transport"]
                    + (
                        f"\n{r['written']}"
                        if r.get("written", "one process") != "one process"
                        else ""
                    )
                    for r in sync
                ],
            ),
            "blocked": _series(
                "ms blocked per step",
                wr,
                "blocked_ms_per_step",
                names=[f"{r['transport']}\n{r['mode']}" for r in wr],
            ),
            "limits": [
                {"label": k, "value": v}
                for k, v in (
                    ("sequential write", gbps("sequential write")),
                    ("memcpy", gbps("memcpy")),
                )
                if v
            ],
        }
    st = _agg(rows, "stream")
    if st:
        methods = {}
        for method in dict.fromkeys(r["method"] for r in st):
            mine = sorted((r for r in st if r["method"] == method), key=lambda r: r["step_bytes"])
            methods[method] = {
                "sizes": [r["step_bytes"] for r in mine],
                "gbps": _series(method, mine, "gbps"),
                "median_us": [r["median_us"] for r in mine],
            }
        out["stream"] = {
            "methods": methods,
            "limits": [{"label": "memcpy", "value": v} for v in (gbps("memcpy"),) if v],
        }
    return out


def _series(
    label: str,
    cells: Sequence[dict[str, Any] | None],
    key: str,
    names: list[str] | None = None,
) -> dict[str, Any]:
    values, low, high = [], [], []
    for r in cells:
        v = r.get(key) if r else None
        rng = (r.get("spread") or {}).get(key) if r else None
        values.append(v or 0.0)
        low.append(rng[0] if rng else (v or 0.0))
        high.append(rng[1] if rng else (v or 0.0))
    out: dict[str, Any] = {"label": label, "values": values, "min": low, "max": high}
    if names is not None:
        out["names"] = names
    return out


def plots(rows: list[dict[str, Any]], out_dir: str) -> list[str]:
    """PNG plots (read, write, stream), with the limits of this machine as lines and the
    spread of the repeats as error bars; returns the paths written. Needs matplotlib."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    written = []
    data = plot_data(rows)
    suffix = data.get("title_suffix", "")
    styles = ["--", ":", "-."]

    def save(fig: Any, name: str) -> None:
        fig.tight_layout()
        written.append(os.path.join(out_dir, name))
        fig.savefig(written[-1], dpi=110)
        plt.close(fig)

    def limit_lines(ax: Any, limits: list[dict[str, Any]]) -> None:
        for i, lim in enumerate(limits):
            ax.axhline(
                lim["value"],
                color="0.35",
                linestyle=styles[i % len(styles)],
                linewidth=1,
                label=f"limit: {lim['label']}",
            )

    def errors(s: dict[str, Any]) -> Any:
        v = np.asarray(s["values"])
        return np.vstack([v - np.asarray(s["min"]), np.asarray(s["max"]) - v])

    if "read" in data:
        rd = data["read"]
        fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(rd["groups"]) + 2), 4.5))
        x = np.arange(len(rd["groups"]))
        w = 0.8 / len(rd["series"])
        colors = ["#f4a582", "#ca0020", "#92c5de", "#0571b0"]
        for i, s in enumerate(rd["series"]):
            ax.bar(
                x + (i - len(rd["series"]) / 2 + 0.5) * w,
                s["values"],
                w,
                yerr=errors(s),
                label=s["label"],
                color=colors[i % len(colors)],
            )
        limit_lines(ax, rd["limits"])
        ax.set_xticks(x, rd["groups"], fontsize=8)
        ax.set_yscale("log")
        ax.set_ylabel("samples/s")
        ax.set_title("Read: throughput by transport and access pattern, cold and warm" + suffix)
        ax.legend(fontsize=7)
        save(fig, "read.png")
    if "write" in data:
        wd = data["write"]
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
        a1.bar(wd["sync"]["names"], wd["sync"]["values"], yerr=errors(wd["sync"]), color="#0571b0")
        limit_lines(a1, wd["limits"])
        a1.set_ylabel("GB/s")
        a1.set_title("Synchronous write throughput" + suffix)
        if wd["limits"]:
            a1.legend(fontsize=7)
        b = wd["blocked"]
        a2.bar(b["names"], b["values"], yerr=errors(b), color="#ca0020")
        a2.set_ylabel("ms blocked per step")
        a2.set_title("Simulation blocked per step" + suffix)
        for a in (a1, a2):
            a.tick_params(axis="x", labelsize=8)
        save(fig, "write.png")
    if "stream" in data:
        sd = data["stream"]
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
        for method, m in sd["methods"].items():
            a1.errorbar(
                m["sizes"], m["gbps"]["values"], yerr=errors(m["gbps"]), fmt="o-", label=method
            )
            a2.plot(m["sizes"], m["median_us"], "o-", label=method)
        limit_lines(a1, sd["limits"])
        for a, lab in ((a1, "GB/s"), (a2, "median latency (µs)")):
            a.set_xscale("log", base=2)
            a.set_yscale("log")
            a.set_xlabel("step size (bytes)")
            a.set_ylabel(lab)
            a.legend(fontsize=7)
        a1.set_title("Stream throughput" + suffix)
        a2.set_title("Stream latency" + suffix)
        save(fig, "stream.png")
    return written
