"""Writer and subscriber programs that tests run as real subprocesses.

``python -m dataplane._testprocs publish URL --steps N [...]`` writes deterministic steps and
prints one JSON line per completed step; ``subscribe URL [...]`` prints one JSON line per
received step (index, attributes, a checksum per variable) and a final line saying how the
stream ended. Tests compare both sides by checksum. Kept free of pytest so that it runs
anywhere the package does.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import signal
import sys
import time
from typing import Any

import numpy as np

from dataplane.cli import parse_options


def make_step(index: int, size: int = 1000) -> dict[str, np.ndarray]:
    """The deterministic content of step ``index``: a float field, an int field, a scalar."""
    rng = np.random.default_rng(index)
    return {
        "u": rng.standard_normal(size),
        "k": (np.arange(size, dtype=np.int32) * (index + 1)).reshape(-1, 4 if size % 4 == 0 else 1),
        "t": np.float64(index * 0.5),
    }


def digest(arr: np.ndarray) -> str:
    """Checksum of an array's dtype, shape and bytes."""
    a = np.asarray(arr)
    h = hashlib.sha256(f"{a.dtype.str}{a.shape}".encode())
    h.update(a.tobytes(order="C"))
    return h.hexdigest()[:16]


def step_digests(step: Any) -> dict[str, str]:
    return {name: digest(step[name]) for name in sorted(step.keys())}


def rss_bytes(pid: int | str = "self") -> int:
    """Resident set size of a process and its children (a transport's helper processes), for
    tests that bound a writer's memory. Linux only; 0 for a process that is gone."""
    total = 0
    try:
        with open(f"/proc/{pid}/statm") as f:
            total = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                total += sum(rss_bytes(child) for child in f.read().split())
    except (FileNotFoundError, ProcessLookupError):
        pass
    return total


def process_state(pid: int) -> str:
    """The state letter of process ``pid`` (``"T"``: stopped), or "" if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return ""


def _emit(obj: dict) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def publish_main(args: argparse.Namespace) -> int:
    import dataplane as dp

    opts = parse_options(args.opt, "--opt")
    try:
        return _publish(args, opts)
    except dp.ChannelBusyError as exc:
        _emit({"busy": str(exc)})
        return 3


def _publish(args: argparse.Namespace, opts: dict[str, Any]) -> int:
    import dataplane as dp
    from dataplane.registry import resolve

    if args.stop_in_setup:
        # Stop (SIGSTOP) after claiming the channel, before setting up its files.
        cls = resolve(args.url)[1]
        real = cls.format_writer  # type: ignore[attr-defined]

        def stopped(self: Any, mode: str) -> Any:
            _emit({"setting_up": True})
            os.kill(os.getpid(), signal.SIGSTOP)
            return real(self, mode)

        cls.format_writer = stopped  # type: ignore[attr-defined]

    with dp.publish(
        args.url, policy=args.policy, queue_limit=args.queue_limit, mode=args.mode, **opts
    ) as pub:
        pub.attrs["writer_pid"] = os.getpid()
        if args.kill_before_first_step:
            os.kill(os.getpid(), signal.SIGKILL)
        _emit({"opened": True})
        for i in range(pub.next_index, pub.next_index + args.steps):
            data = make_step(i, args.size)
            if args.kill_in_step is not None and i == args.kill_in_step:
                # Die in the middle of writing step i: after the step began, before it ended.
                assert isinstance(pub, dp.Publisher)  # no comm= here
                writer = pub._writer
                specs = {k: dp.VarSpec(np.asarray(v).dtype, np.shape(v)) for k, v in data.items()}
                writer.begin_step(i, specs, {})
                writer.put("u", np.asarray(data["u"]))
                os.kill(os.getpid(), signal.SIGKILL)
            pub.write(data, attrs={"i": i} if args.tag is None else {"i": i, "tag": args.tag})
            digests = {k: digest(np.asarray(v)) for k, v in data.items()}
            _emit({"wrote": i, "digests": digests, "rss": rss_bytes()})
            if args.sleep:
                time.sleep(args.sleep)
        if args.hang:
            _emit({"hanging": True})
            time.sleep(3600)
        if args.close_after:
            # Stay open (the channel's writer) until the test says so.
            deadline = time.monotonic() + 300
            while not os.path.exists(args.close_after) and time.monotonic() < deadline:
                time.sleep(0.01)
    _emit({"closed": True})
    return 0


def subscribe_main(args: argparse.Namespace) -> int:
    import dataplane as dp

    opts = parse_options(args.opt, "--opt")
    try:
        with dp.subscribe(args.url, timeout=args.timeout, start=args.start, **opts) as sub:
            _emit({"subscribed": True})
            for step in sub:
                _emit({"index": step.index, "attrs": step.attrs, "digests": step_digests(step)})
                if args.sleep:
                    time.sleep(args.sleep)
                if args.exit_after is not None and step.index >= args.exit_after:
                    if args.kill:
                        os.kill(os.getpid(), signal.SIGKILL)
                    return 0
            _emit({"end": "closed", "stats": sub.stats.as_dict()})
    except dp.ChannelBroken as exc:
        _emit({"end": "broken", "error": str(exc)})
    except dp.StepTimeoutError as exc:
        _emit({"end": "timeout", "error": str(exc)})
    except dp.DataplaneError as exc:
        _emit({"end": "error", "error": f"{type(exc).__name__}: {exc}"})
    return 0


def serve_publisher(conn: Any, url: str, kwargs: dict[str, Any]) -> None:
    """Run a publisher for a test in another process, driven over ``conn`` (a Pipe end).

    Used for transports whose writer and readers cannot share a process (sst://). Exceptions
    travel back as (type name, message) and are raised again on the test's side.
    """
    import gc

    import dataplane as dp

    def fail(exc: BaseException) -> None:
        conn.send(("error", type(exc).__name__, str(exc)))

    try:
        pub = dp.publish(url, **kwargs)
    except Exception as exc:
        fail(exc)
        return
    conn.send(("ok", pub.next_index))
    while True:
        cmd, *args = conn.recv()
        try:
            if cmd == "write":
                result: Any = pub.write(*args)
            elif cmd == "attr":
                pub.attrs[args[0]] = args[1]
                result = None
            elif cmd == "next_index":
                result = pub.next_index
            elif cmd == "close":
                pub.close(failed=args[0])
                conn.send(("ok", None))
                return
            elif cmd == "abandon":  # drop it without close(), as a crashed or careless caller
                del pub
                gc.collect()
                conn.send(("ok", None))
                return
            else:
                raise ValueError(f"unknown command {cmd!r}")
        except Exception as exc:
            fail(exc)
            continue
        conn.send(("ok", result))


def verify_main(args: argparse.Namespace) -> int:
    """Read every step of stored data; print digests or the error. Run with a timeout."""
    import dataplane as dp

    opts = parse_options(args.opt, "--opt")
    out: dict[str, Any] = {"steps": {}}
    try:
        with dp.open(args.url, **opts) as arc:
            out["count"] = len(arc)
            for i in range(len(arc)):
                out["steps"][i] = step_digests(arc[i])
        out["error"] = None
    except dp.DataplaneError as exc:
        out["error"] = f"{type(exc).__name__}: {exc}"
    _emit(out)
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m dataplane._testprocs")
    sp = ap.add_subparsers(dest="cmd", required=True)
    p = sp.add_parser("publish")
    p.add_argument("url")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--size", type=int, default=1000)
    p.add_argument("--policy", default="block")
    p.add_argument("--queue-limit", type=int, default=4)
    p.add_argument("--sleep", type=float, default=0.0)
    p.add_argument("--hang", action="store_true", help="stay open after the last step")
    p.add_argument("--kill-in-step", type=int, help="SIGKILL itself in the middle of this step")
    p.add_argument("--kill-before-first-step", action="store_true", help="SIGKILL itself once open")
    p.add_argument("--close-after", help="close only once this file exists")
    p.add_argument("--stop-in-setup", action="store_true", help="SIGSTOP itself while setting up")
    p.add_argument("--mode", default="w")
    p.add_argument("--tag", help="put this in every step's attributes (who wrote it)")
    p.add_argument("--opt", action="append", default=[], help="transport option key=value")
    s = sp.add_parser("subscribe")
    s.add_argument("url")
    s.add_argument("--timeout", type=float, default=30.0)
    s.add_argument("--start", default="first")
    s.add_argument("--sleep", type=float, default=0.0)
    s.add_argument("--exit-after", type=int, help="leave after receiving this step index")
    s.add_argument("--kill", action="store_true", help="with --exit-after: SIGKILL instead")
    s.add_argument("--opt", action="append", default=[], help="transport option key=value")
    v = sp.add_parser("verify")
    v.add_argument("url")
    v.add_argument("--opt", action="append", default=[], help="transport option key=value")
    args = ap.parse_args(argv)
    run = {"publish": publish_main, "subscribe": subscribe_main, "verify": verify_main}
    return run[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
