"""The ``dataplane`` command."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import dataplane as dp
from dataplane import _progress
from dataplane.registry import resolve

__all__ = ["main"]


def parse_options(pairs: Iterable[str] | None, flag: str) -> dict[str, Any]:
    """``key=value`` pairs; values are JSON where they parse (numbers, dicts), else strings."""
    out: dict[str, Any] = {}
    for pair in pairs or ():
        key, sep, text = pair.partition("=")
        if not sep or not key:
            raise dp.OptionError(f"{flag} takes key=value, got {pair!r}")
        try:
            out[key] = json.loads(text)
        except ValueError:
            out[key] = text
    return out


def _shapes(steps: list[tuple[int, tuple[int, ...]]]) -> str:
    """``10*{4, 5}`` when every step agrees, else runs such as ``0-3:{4} 4:{5}``."""
    if not steps:
        return ""
    runs: list[list[Any]] = []
    for index, shape in steps:
        if runs and runs[-1][2] == shape and runs[-1][1] == index - 1:
            runs[-1][1] = index
        else:
            runs.append([index, index, shape])

    def fmt(shape: tuple[int, ...]) -> str:
        return "{" + ", ".join(map(str, shape)) + "}" if shape else "scalar"

    if len(runs) == 1 and runs[0][0] == steps[0][0]:
        return f"{len(steps)}*{fmt(runs[0][2])}"
    return " ".join(f"{a}:{fmt(s)}" if a == b else f"{a}-{b}:{fmt(s)}" for a, b, s in runs)


def _describe(steps: Iterable[dp.Step], limit: int | None) -> dict[str, Any]:
    variables: dict[str, dict[str, Any]] = {}
    step_attrs: dict[int, dict[str, Any]] = {}
    count = 0
    for step in steps:
        count += 1
        if step.attrs:
            step_attrs[step.index] = dict(step.attrs)
        for name, spec in step.vars.items():
            v = variables.setdefault(name, {"dtype": spec.dtype.name, "steps": []})
            v["steps"].append((step.index, tuple(spec.shape)))
        if limit is not None and count >= limit:
            break
    return {"steps": count, "variables": variables, "step_attrs": step_attrs}


def _inspect(args: argparse.Namespace) -> int:
    opts = parse_options(args.opt, "--opt")
    random_access = resolve(args.url)[1].supports_random_access
    if random_access:
        with dp.open(args.url, **opts) as archive:
            info = _describe(archive, args.steps)
            info["stored_steps"] = len(archive)
            info["written_by"] = archive.written_by
            channel_attrs = archive.attrs
    else:
        # A stream keeps nothing: show what arrives within the timeout.
        with dp.subscribe(args.url, timeout=args.timeout, **opts) as sub:
            try:
                info = _describe(sub, args.steps or 10)
            except dp.StepTimeoutError:
                info = {"steps": sub.stats.steps, "variables": {}, "step_attrs": {}}
            channel_attrs = sub.attrs
    info["url"] = args.url
    info["attrs"] = channel_attrs
    if args.json:
        for v in info["variables"].values():
            v["shapes"] = {str(i): list(s) for i, s in v.pop("steps")}
        json.dump(info, sys.stdout, indent=2, default=str)
        print()
        return 0
    stored = info.get("stored_steps")
    shown = (
        info["steps"]
        if stored is None or stored == info["steps"]
        else f"{info['steps']} of {stored}"
    )
    print(f"{args.url}  ({shown} steps)")
    wb = info.get("written_by")
    if wb:
        files = wb.get("files", [])
        print(
            f"written by {wb.get('ranks')} MPI ranks ({wb.get('method')}, "
            f"{wb.get('aggregators')} writing): {len(files)} file{'s' * (len(files) != 1)}"
        )
    if info["attrs"]:
        print("channel attributes:")
        for key, value in info["attrs"].items():
            print(f"  {key} = {value!r}")
    if info["variables"]:
        print("variables:")
        width = max(len(n) for n in info["variables"])
        for name, v in info["variables"].items():
            print(f"  {v['dtype']:<10} {name:<{width}}  {_shapes(v['steps'])}")
    if info["step_attrs"] and args.attrs:
        print("step attributes:")
        for index, attrs in info["step_attrs"].items():
            print(f"  step {index}: {attrs}")
    elif info["step_attrs"]:
        print(f"({len(info['step_attrs'])} steps carry attributes: --attrs shows them)")
    return 0


def _convert(args: argparse.Namespace) -> int:
    src_opts = parse_options(args.src_opt, "--src-opt")
    dst_opts = parse_options(args.dst_opt, "--dst-opt")
    total = None
    if resolve(args.src)[1].supports_random_access:
        try:
            with dp.open(args.src, **src_opts) as archive:
                total = len(archive)
        except dp.DataplaneError:
            total = None  # not written yet: subscribe below waits for it or says why
    wanted = None if args.vars is None else [v for v in args.vars.split(",") if v]
    renamed: dict[str, str] = {}
    steps = nbytes = 0
    t0 = time.monotonic()
    with (
        dp.subscribe(args.src, vars=wanted, timeout=args.timeout, **src_opts) as sub,
        _progress.bar("convert", total, show=_progress.wanted(args)) as progress,
    ):
        pub = dp.publish(args.dst, mode=args.mode, **dst_opts)
        try:
            attrs: dict[str, Any] | None = None
            for step in sub:
                current = sub.attrs
                if current != attrs:
                    attrs = current
                    pub.attrs.clear()
                    pub.attrs.update(current)
                data = {}
                for name in step.vars:
                    # Group paths (HDF5, Zarr, ADIOS2) are not channel variable names.
                    new = renamed.setdefault(name, name.replace("/", "."))
                    data[new] = step[name]
                    nbytes += data[new].nbytes
                pub.write(data, attrs=step.attrs)
                steps += 1
                rate = nbytes / max(time.monotonic() - t0, 1e-9)
                progress.set_postfix_str(
                    f"{nbytes / 2**20:,.1f} MiB, {rate / 2**20:,.1f} MiB/s", refresh=False
                )
                progress.update()
                if args.steps is not None and steps >= args.steps:
                    break
        except KeyboardInterrupt:
            pub.close()  # keep what was recorded: every written step is complete
            progress.close()
            print(f"dataplane: interrupted after {steps} steps", file=sys.stderr)
            return 130
        except BaseException:
            pub.close(failed=True)
            raise
        pub.close()
    for old, new in renamed.items():
        if old != new and not args.quiet:
            print(f"dataplane: variable {old!r} written as {new!r}", file=sys.stderr)
    return 0


def _demo(args: argparse.Namespace) -> int:
    from dataplane.demo import run_demo

    run_demo(
        args.steps,
        args.size,
        args.every,
        args.out,
        policy=args.policy,
        url=args.url,
        progress=_progress.wanted(args),
    )
    return 0


def _cache(args: argparse.Namespace) -> int:
    from dataplane.cache import cache_stats, clear_cache

    if args.action == "clear":
        clear_cache(args.path)
        print(f"cleared {args.path}")
        return 0
    stats = cache_stats(args.path)
    if args.json:
        print(json.dumps(stats))
        return 0
    lookups = stats["hits"] + stats["misses"]
    rows = [
        ("entries", f"{stats['entries']} ({stats['bytes'] / 1e6:.1f} MB)"),
        ("hits", f"{stats['hits']:.0f} of {lookups:.0f} lookups"),
        (
            "misses",
            f"{stats['misses']:.0f} ({stats['bytes_from_source'] / 1e6:.1f} MB from the source)",
        ),
        ("served from cache", f"{stats['bytes_from_cache'] / 1e6:.1f} MB of entries"),
        (
            "from peers",
            f"{stats['bytes_from_peers'] / 1e6:.1f} MB in {stats['peer_hits']:.0f} entries from "
            f"other nodes ({stats['peer_absent']:.0f} not held there, "
            f"{stats['peer_failures']:.0f} peers failed: read from the source)",
        ),
        ("evictions", f"{stats['evictions']:.0f} (and {stats['bypassed']:.0f} not kept)"),
        ("fetch wait", f"{stats['fetch_wait_s']:.2f} s waiting for other processes' fetches"),
        ("degraded", f"{stats['degraded']:.0f} writes failed (read from the source instead)"),
        ("corrupt", f"{stats['corrupt']:.0f} entries failed their checksum (fetched again)"),
    ]
    for k, v in rows:
        print(f"{k:<18} {v}")
    return 0


def _bench(args: argparse.Namespace) -> int:
    from dataplane.bench import PHASES, Config, World, run, save
    from dataplane.bench._common import parse_size

    if args.phase == "compare":
        return _bench_compare(args)
    if args.folders:
        raise dp.OptionError(
            f"unexpected {' '.join(args.folders)!r}: only `dataplane bench compare A B` takes "
            "folders"
        )
    if not args.dir:
        raise dp.OptionError(
            "--dir is required: the directory the benchmark writes into (your filesystem)"
        )

    quick = {
        "samples": 1024,
        "sample_size": "16KiB",
        "steps": 8,
        "max_seconds": 1.0,
        "stream_sizes": "64KiB",
        "stream_seconds": 0.2,
    }
    full = {
        "samples": 16384,
        "sample_size": "64KiB",
        "steps": 64,
        "max_seconds": 10.0,
        "stream_sizes": "4KiB,1MiB,64MiB",
        "stream_seconds": 2.0,
    }
    given = {k: getattr(args, k) for k in full if getattr(args, k) is not None}
    opts = {**(quick if args.quick else full), **given}
    config = Config(
        dir=args.dir,
        transports=tuple(t.strip() for t in args.transports.split(",") if t.strip()),
        sample_size=parse_size(opts["sample_size"]),
        samples=int(opts["samples"]),
        steps=int(opts["steps"]),
        workers=args.workers,
        compute_ms=args.compute_ms,
        batch_size=args.batch_size,
        max_seconds=float(opts["max_seconds"]),
        stream_sizes=tuple(parse_size(s) for s in str(opts["stream_sizes"]).split(",")),
        stream_seconds=float(opts["stream_seconds"]),
        block=args.block,
        evict=args.evict,
        cache_dir=args.cache_dir,
        quick=args.quick,
        nodes=args.nodes,
        repeats=args.repeats if args.repeats is not None else (1 if args.quick else 3),
    )
    phases = PHASES if args.phase == "all" else (args.phase,)
    world = World()
    rows = run(config, phases, world, progress=_progress.wanted(args))
    if world.rank == 0:
        command = "dataplane " + " ".join(args.argv)
        if world.size > 1:
            command = f"mpiexec -n {world.size} {command}"
        out = save(rows, str(args.out), command)
        print(out["text"])
        print(
            f"figures: {out['jsonl']}; table: {out['markdown']}; plots: "
            f"{', '.join(out['plots']) or 'none'}"
        )
    return 0


def _bench_compare(args: argparse.Namespace) -> int:
    from dataplane.bench import compare

    if len(args.folders) != 2:
        raise dp.OptionError(
            f"`dataplane bench compare` takes two --out folders, A and B; got {len(args.folders)}"
        )
    a, b = args.folders
    result = compare.compare(compare.load(a), compare.load(b))
    if not result["cells"]:
        raise dp.DataplaneError(
            f"{a} and {b} have no figure in common (different phases or transports?)"
        )
    if args.json:
        print(json.dumps(result))
    else:
        print(compare.markdown(result, a, b))
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="dataplane", description="Move data between HPC simulations and AI training."
    )
    ap.add_argument("--version", action="version", version=f"dataplane {dp.__version__}")
    sub = ap.add_subparsers(dest="cmd", required=True)
    demo = sub.add_parser(
        "demo",
        help="simulation-to-training demo over shared memory",
        description="A Gray-Scott simulation publishes to shm:// while a separate process "
        "trains a small CNN online to predict its next step.",
    )
    demo.add_argument("--steps", type=int, default=250, help="steps to publish (default 250)")
    demo.add_argument("--size", type=int, default=128, help="grid is SIZE x SIZE (default 128)")
    demo.add_argument("--every", type=int, default=4, help="iterations per published step")
    demo.add_argument("--policy", choices=("block", "drop-oldest"), default="block")
    _progress.add_arguments(demo)
    demo.add_argument("--url", help="channel (default: a fresh shm://demo-...)")
    demo.add_argument(
        "--out",
        type=Path,
        default=Path("demo_out"),
        help="where loss.png and summary.json go (default demo_out/)",
    )
    demo.set_defaults(func=_demo)

    insp = sub.add_parser(
        "inspect",
        help="steps, variables and attributes of a channel (like bpls / h5ls)",
        description="Show the steps, variables (dtype, shape per step) and attributes of a "
        "channel: stored steps of a file, or the steps a stream delivers within --timeout.",
    )
    insp.add_argument("url")
    insp.add_argument("--steps", type=int, help="look at the first STEPS steps only")
    insp.add_argument("--attrs", action="store_true", help="print the attributes of every step")
    insp.add_argument("--json", action="store_true", help="machine-readable output")
    insp.add_argument(
        "--timeout", type=float, default=10.0, help="streams: seconds to wait per step (10)"
    )
    insp.add_argument(
        "--opt", action="append", metavar="KEY=VALUE", help="transport option (repeatable)"
    )
    insp.set_defaults(func=_inspect)

    conv = sub.add_parser(
        "convert",
        help="stream any channel into any other, step by step",
        description="Copy every step of SRC into DST, with channel and step attributes: record "
        "a live sst:// or shm:// stream into a file, or turn a bp5:// run into zarr:// for "
        "sharing. Variable names with '/' (HDF5, Zarr or ADIOS2 groups) are written with '.'.",
        epilog="examples:  dataplane convert bp5://run.bp zarr://run.zarr "
        "--dst-opt compressors=zstd\n"
        "           dataplane convert sst://sim h5://sim.h5 --dst-opt compression=gzip",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    conv.add_argument("src")
    conv.add_argument("dst")
    conv.add_argument("--vars", help="comma-separated variables to copy (default: all)")
    conv.add_argument("--steps", type=int, help="stop after STEPS steps")
    conv.add_argument("--mode", choices=("w", "a"), default="w", help="w: new, a: append")
    conv.add_argument(
        "--timeout",
        type=float,
        default=None,
        help="seconds to wait for each step of a live source (default: until it ends)",
    )
    conv.add_argument(
        "--src-opt", action="append", metavar="KEY=VALUE", help="option for SRC (repeatable)"
    )
    conv.add_argument(
        "--dst-opt",
        action="append",
        metavar="KEY=VALUE",
        help="option for DST, e.g. compression=gzip (h5), compressors=zstd (zarr), "
        "operator=blosc (bp5)",
    )
    _progress.add_arguments(conv)
    conv.set_defaults(func=_convert)

    cache = sub.add_parser(
        "cache",
        help="figures of a node-local cache directory, or empty it",
        description="stats: entries, bytes and the counters of every process that used the "
        "cache (hits, misses, bytes from the source, evictions, fetch waits). clear: remove "
        "every entry.",
    )
    cache.add_argument("action", choices=("stats", "clear"))
    cache.add_argument("path")
    cache.add_argument("--json", action="store_true", help="machine-readable output")
    cache.set_defaults(func=_cache)

    bench = sub.add_parser(
        "bench",
        help="measure writes, shuffled reads and streams on a filesystem",
        description="Measure both sides of a coupled workflow on --dir: the simulation's "
        "writes (each file transport, synchronous and asynchronous publish, against plain "
        "h5py), the training side's epochs (sequential, shuffled, block-shuffled; cold and "
        "warm; a naive per-sample Dataset against dataplane's cache and prefetch) and streams "
        "(shm://, sst:// against multiprocessing.Queue), each next to the machine's limits "
        "measured in the same run. Run under mpiexec -n R to use R ranks. Writes bench.jsonl "
        "(one figure per line), bench.md and PNG plots into --out.",
        epilog="examples:  dataplane bench all --dir /lustre/$USER/bench\n"
        "           mpiexec -n 4 dataplane bench read --dir /gpfs/scratch/bench --workers 4 "
        "--compute-ms 20\n"
        "           dataplane bench all --dir /tmp --quick\n"
        "           dataplane bench compare results-before results-after",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    bench.add_argument("phase", choices=("write", "read", "stream", "all", "compare"))
    bench.add_argument(
        "folders", nargs="*", help="compare: two --out folders of earlier runs, A then B"
    )
    bench.add_argument("--dir", help="where data goes (your parallel filesystem; required)")
    bench.add_argument(
        "--repeats",
        type=int,
        help="runs of every cell, interleaved; the report gives median and min-max "
        "(default 3; 1 with --quick)",
    )
    bench.add_argument(
        "--transports", default="bp5,h5,zarr,shm,sst", help="default: bp5,h5,zarr,shm,sst"
    )
    bench.add_argument("--sample-size", help="bytes per sample, e.g. 64KiB (default 64KiB)")
    bench.add_argument("--samples", type=int, help="samples in all (default 16384)")
    bench.add_argument("--steps", type=int, help="steps the samples are written in (default 64)")
    bench.add_argument("--workers", type=int, default=2, help="DataLoader workers (default 2)")
    bench.add_argument(
        "--compute-ms",
        type=float,
        default=0.0,
        help="model time per batch; gives the accelerator-utilisation figure (default 0)",
    )
    bench.add_argument("--batch-size", type=int, default=32, help="default 32")
    bench.add_argument("--block", type=int, default=16, help="shards per shuffle window (16)")
    bench.add_argument(
        "--max-seconds", type=float, help="time slow epochs over at most this long (default 10)"
    )
    bench.add_argument("--stream-sizes", help="step sizes (default 4KiB,1MiB,64MiB)")
    bench.add_argument("--stream-seconds", type=float, help="length of each stream run (default 2)")
    bench.add_argument(
        "--evict",
        choices=("auto", "drop_caches", "fadvise"),
        default="auto",
        help="how cold reads are made cold (auto: drop_caches when permitted, else fadvise)",
    )
    bench.add_argument("--cache-dir", help="node-local cache location (default: the temp dir)")
    bench.add_argument(
        "--nodes",
        type=int,
        help="read: also compare cooperating node caches with caches alone, the ranks split "
        "in order into N nodes with a cache each (to try it on one machine; default: the "
        "machines the ranks run on, when there are several)",
    )
    bench.add_argument("--out", type=Path, default=Path("results"), help="default results/")
    bench.add_argument(
        "--quick",
        action="store_true",
        help="a smoke test: tiny sizes, one run, under a minute (the figures mean nothing)",
    )
    bench.add_argument("--json", action="store_true", help="compare: machine-readable output")
    _progress.add_arguments(bench)
    bench.set_defaults(func=_bench)
    args = ap.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    for name in ("steps", "size", "every"):
        value = getattr(args, name, None)
        if value is not None and value < 1:
            ap.error(f"--{name} must be at least 1")
    try:
        return args.func(args)
    except BrokenPipeError:  # `dataplane inspect ... | head`
        sys.stderr.close()
        return 0
    except dp.DataplaneError as exc:
        print(f"dataplane: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
