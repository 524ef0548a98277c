"""bp5:// passes the conformance suite; the bypass hooks read with plain adios2."""

from __future__ import annotations

import glob
import os

import numpy as np
import pytest
from adios2 import FileReader

import dataplane as dp
from dataplane.testing import conformance, read_events, run_proc
from dataplane.transports.bp5 import _BP5Stream


class TestBP5(conformance("bp5")):
    def make_url(self, tmp_path, name):
        return f"bp5://{tmp_path}/{name}.bp"

    @staticmethod
    def path(url: str) -> str:
        return url.split("://", 1)[1]

    def plain_read(self, url):
        with FileReader(self.path(url)) as f:
            n = f.num_steps()
            arrays = {}
            for name, desc in f.available_variables().items():
                if name.startswith("__dp"):
                    continue
                shape = [int(x) for x in desc["Shape"].split(",")] if desc["Shape"] else []
                flat = f.read(name, step_selection=[0, n])  # steps come back concatenated
                arrays[name] = np.asarray(flat).reshape([n, *shape])
            attrs = {}
            for name, desc in f.available_attributes().items():
                if name.startswith(("step/", "__dp")):
                    continue
                value = f.read_attribute(name)
                if isinstance(value, np.ndarray):
                    value = value.tolist()
                    if desc["Elements"] == "1":
                        value = value[0]
                attrs[name] = value
        return arrays, attrs

    def data_files(self, url):
        return sorted(glob.glob(os.path.join(self.path(url), "data.*")))

    def corruption_targets(self, url):
        # BP5 pads and aligns blocks, so find where step 1's "u" really lies in the data files.
        from dataplane._testprocs import make_step

        needle = np.asarray(make_step(1, 64)["u"]).tobytes()
        out = []
        for f in self.data_files(url):
            with open(f, "rb") as fh:
                at = fh.read().find(needle)
            if at >= 0:
                out.append((f, at, len(needle)))
        assert out, "step 1 of 'u' not found in the data files"
        return out


@pytest.mark.timeout(120)
def test_a_clean_close_is_end_of_stream_when_the_writer_exits_at_once(tmp_path, monkeypatch):
    """The subscriber reads the lease (writer open), then the writer closes and exits, then
    ADIOS2 reports the end of the stream: that is a clean end, not a dead writer."""
    url = f"bp5://{tmp_path}/run.bp"
    flag = tmp_path / "close"
    writer = run_proc("publish", url, "--steps", "3", "--close-after", str(flag))
    sub = dp.subscribe(url, timeout=60)
    try:
        assert [next(sub).index for _ in range(3)] == [0, 1, 2]
        real = _BP5Stream.advance

        def after_the_writer_is_gone(self, wait):
            flag.touch()
            writer.wait(60)  # closed (its lease says so) and exited
            return real(self, max(wait, 1.0))

        monkeypatch.setattr(_BP5Stream, "advance", after_the_writer_is_gone)
        assert sub.next() is None
        assert writer.returncode == 0
    finally:
        sub.close()
        read_events(writer, 30)


@pytest.fixture(scope="module")
def written_bp(tmp_path_factory):
    from dataplane._testprocs import make_step

    path = tmp_path_factory.mktemp("bp") / "run.bp"
    with dp.publish(f"bp5://{path}") as pub:
        pub.attrs["units"] = "K"
        for i in range(6):
            pub.write(make_step(i, 256), attrs={"i": i})
    return path


@pytest.mark.timeout(300)
@pytest.mark.parametrize("name", ["md.0", "mmd.0", "md.idx"])
def test_damaged_metadata_gives_an_error_not_a_crash(tmp_path, written_bp, name) -> None:
    """64 random bytes written into, or a cut of, a BP5 metadata file: ADIOS2 would crash the
    reading process (a segmentation fault in 10 of 20 trials); dataplane's readers get an
    IntegrityError, or the exact steps where the damage missed everything they read."""
    import shutil

    from dataplane._testprocs import digest, make_step

    want = {str(i): {k: digest(np.asarray(v)) for k, v in sorted(make_step(i, 256).items())}
            for i in range(6)}  # fmt: skip
    for seed in range(4):  # even: bytes written over, odd: cut
        rng = np.random.default_rng([seed, len(name)])
        copy = tmp_path / f"s{seed}.bp"
        shutil.copytree(written_bp, copy)
        shutil.copy(f"{written_bp}.lease", f"{copy}.lease")
        target = copy / name
        size = target.stat().st_size
        if seed % 2:
            os.truncate(target, int(rng.integers(0, size)))
        else:
            with open(target, "r+b") as f:
                f.seek(int(rng.integers(0, max(1, size - 64))))
                f.write(rng.integers(0, 256, 64, dtype=np.uint8).tobytes())
        for cmd in ("verify", "subscribe"):
            proc = run_proc(
                cmd, f"bp5://{copy}", *(["--timeout", "5"] if cmd == "subscribe" else [])
            )
            events = read_events(proc, 120)
            assert proc.wait(30) == 0, (seed, cmd, proc.returncode, events)
            if cmd == "verify":
                (got,) = events
                assert got["error"] is None or "IntegrityError" in got["error"], (seed, got)
                for i, d in got["steps"].items():
                    assert d == want[i], (seed, i)
            else:
                for e in events:
                    if "index" in e:
                        assert e["digests"] == want[str(e["index"])], (seed, e)
                end = events[-1]
                assert end["end"] == "closed" or "IntegrityError" in end["error"], (seed, end)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("left", ["mmd.0", "md.0", "md.idx", "all"])
def test_an_append_after_a_step_cut_short_continues_the_channel(tmp_path, written_bp, left):
    """A writer killed inside a step leaves part of its meta-metadata, metadata or index
    record after the last complete step. Readers get the complete steps; the next writer
    cuts what was left before it appends, and every step reads back exact (ADIOS2 appended
    after the leftover, and the file read "no known format for Metadata Block")."""
    import shutil
    import struct

    from dataplane._testprocs import digest, make_step

    copy = tmp_path / "c.bp"
    shutil.copytree(written_bp, copy)
    shutil.copy(f"{written_bp}.lease", f"{copy}.lease")
    before = {n: (copy / n).read_bytes() for n in ("mmd.0", "md.0", "md.idx")}
    id_len, info_len = struct.unpack_from("<2Q", before["mmd.0"])
    parts = {
        "mmd.0": before["mmd.0"][: (16 + id_len + info_len) // 2],  # a block begun
        "md.0": before["md.0"][:100],  # a step's metadata begun
        "md.idx": before["md.idx"][-57:-37],  # a step record begun (records are 57 bytes)
    }
    for name, part in parts.items():
        if left in (name, "all"):
            with open(copy / name, "ab") as f:
                f.write(part)
    url = f"bp5://{copy}"

    def want(n: int) -> dict[str, dict[str, str]]:
        return {
            str(i): {k: digest(np.asarray(v)) for k, v in sorted(make_step(i, 256).items())}
            for i in range(n)
        }

    (got,) = read_events(run_proc("verify", url), 120)
    assert got["error"] is None and got["steps"] == want(6), got
    with dp.publish(url, mode="a") as pub:
        assert pub.next_index == 6
        for i in (6, 7):
            pub.write(make_step(i, 256), attrs={"i": i})
    (got,) = read_events(run_proc("verify", url), 120)
    assert got["error"] is None and got["steps"] == want(8), got
    for name, data in before.items():  # the leftovers are gone, the steps before kept
        assert (copy / name).read_bytes().startswith(data[: 64 if name == "md.idx" else 0])


def test_reading_leaves_no_profile_files_in_tmp(tmp_path) -> None:
    """ADIOS2's BP5 reader writes `/tmp/<name>_<pid>_profiling.json` when it closes, whatever
    `Profile` says (180 of them per `make test`, one per process and file for a training run):
    dataplane's readers remove theirs, and keep it when `params={"Profile": "On"}` asks."""
    import subprocess
    import sys
    import uuid

    name = f"noprof{uuid.uuid4().hex[:8]}.bp"
    url = f"bp5://{tmp_path / name}"
    with dp.publish(url) as pub:
        for i in range(3):
            pub.write({"x": np.full(4, float(i))})

    def profiles() -> list[str]:
        return [f for f in os.listdir("/tmp") if f.startswith(f"{name}_") and "profiling" in f]

    # Each in a process of its own: ADIOS2 names the file by process.
    read = (
        "import json, sys, dataplane as dp\n"
        "url, params = sys.argv[1], json.loads(sys.argv[2])\n"
        "with dp.open(url, params=params) as arc:\n"
        "    assert [float(arc.read('x', step=i)[0]) for i in range(3)] == [0.0, 1.0, 2.0]\n"
        "with dp.subscribe(url, timeout=10, params=params) as sub:\n"
        "    assert [float(s['x'][0]) for s in sub] == [0.0, 1.0, 2.0]\n"
    )
    for params, kept in (("{}", 0), ('{"Profile": "On"}', 1)):
        done = subprocess.run(
            [sys.executable, "-c", read, url, params], capture_output=True, text=True, timeout=60
        )
        assert done.returncode == 0, done.stderr[-2000:]
        made = profiles()
        for f in made:
            os.remove(os.path.join("/tmp", f))
        assert len(made) == kept, (params, made)


def test_bp5_channels_leave_torch_unimported_and_adios2_whole(tmp_path) -> None:
    """A simulation rank that writes bp5:// (and a process that reads it) loads ADIOS2's
    bindings without the adios2 package, which imports torch and cupy when they are installed
    (1.2-1.5 s and hundreds of MiB a process); the user's own `import adios2` still works,
    torch support included, and reads what dataplane wrote."""
    import subprocess
    import sys

    code = (
        "import sys, numpy as np, dataplane as dp\n"
        "url = sys.argv[1]\n"
        "with dp.publish(url) as pub:\n"
        "    for i in range(3):\n"
        "        pub.write({'x': np.full(4, float(i))})\n"
        "with dp.subscribe(url, timeout=10) as sub:\n"
        "    assert [s['x'][0] for s in sub] == [0.0, 1.0, 2.0]\n"
        "assert 'torch' not in sys.modules and 'adios2' not in sys.modules, sorted(sys.modules)\n"
        "import adios2, torch\n"
        "assert adios2.engine.ADIOS2_HAS_TORCH\n"
        "assert adios2.bindings.Mode is sys.modules['adios2.bindings.adios2_bindings'].Mode\n"
        "with adios2.FileReader(url[len('bp5://'):]) as f:\n"
        "    got = f.read('x', step_selection=[2, 1]).tolist()\n"
        "    assert got == [2.0] * 4, got\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, f"bp5://{tmp_path / 'run.bp'}"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
