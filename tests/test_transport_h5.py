"""h5:// passes the conformance suite; the bypass hooks read with plain h5py."""

from __future__ import annotations

import os
import threading

import h5py
import numpy as np
import pytest

import dataplane as dp
from dataplane.testing import conformance


class TestH5(conformance("h5")):
    def make_url(self, tmp_path, name):
        return f"h5://{tmp_path}/{name}.h5"

    @staticmethod
    def path(url: str) -> str:
        return url.split("://", 1)[1]

    def plain_read(self, url):
        with h5py.File(self.path(url), "r") as f:
            arrays = {k: f[k][()] for k in f if not k.startswith("__")}
            attrs = {}
            for k, v in f.attrs.items():
                if isinstance(v, np.ndarray):
                    v = [x.decode() if isinstance(x, bytes) else x for x in v.tolist()]
                attrs[k] = v
        return arrays, attrs

    def data_files(self, url):
        return [self.path(url)]

    def corruption_targets(self, url):
        out = []
        with h5py.File(self.path(url), "r") as f:
            d = f["u"]
            used = d.shape[0] * d.dtype.itemsize * int(np.prod(d.shape[1:]))
            for i in range(d.id.get_num_chunks()):
                info = d.id.get_chunk_info(i)  # small steps share a chunk: only the rows written
                out.append((self.path(url), info.byte_offset, min(info.size, used)))
        return out


@pytest.mark.timeout(120)
@pytest.mark.parametrize("opts", [{}, {"compression": "gzip"}], ids=["raw", "gzip"])
def test_threads_reading_one_file_through_separate_handles_get_the_right_rows(
    tmp_path, opts
) -> None:
    # HDF5 keeps one open file per process: a SWMR refresh through one handle while another
    # handle reads made that read return rows of another step (16 steps share a chunk here).
    # Raw chunks are read by byte offset; gzip ones through HDF5, one shared handle per file.
    url = f"h5://{tmp_path}/run.h5"
    with dp.publish(url, **opts) as pub:
        for s in range(40):
            pub.write({"x": np.full((64, 256), s, np.float32)})
    wrong: list = []

    def reader(seed: int, reads: int = 300) -> None:
        with dp.open(url, verify=False) as arc:  # partial reads are never verified anyway
            rng = np.random.default_rng(seed)
            for _ in range(reads):
                i = int(rng.integers(40))
                row = arc.read("x", i, start=(int(rng.integers(64)), 0), count=(1, 256))
                if row[0, 0] != i:
                    wrong.append((i, float(row[0, 0])))

    threads = [threading.Thread(target=reader, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert wrong == []
    # Threads that open a handle, read a few rows and close it, over and over: a refresh while
    # another handle held the dataset open returned rows of the first chunk (about 1 read in
    # 2,000 here before handles shared their dataset objects), and so did a handle opened
    # while the last one was being closed (under load: 6 to 44 wrong reads of 4,800).
    for round_ in range(200):
        threads = [threading.Thread(target=reader, args=(round_ * 8 + k, 6)) for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    assert wrong == []
    a, b = dp.open(url), dp.open(url)  # and handles used by turns
    assert [float((a if k % 2 else b).read("x", k)[0, 0]) for k in range(40)] == list(range(40))


@pytest.mark.timeout(300)
def test_a_dead_writers_file_cut_short_gives_an_error_not_a_hang(tmp_path) -> None:
    """As the conformance suite's random cuts, for a file whose writer died (its lease still
    says open): the superblock cannot be trusted to say where the file ends, so HDF5's SWMR
    read retries are what must stop."""
    import json
    import shutil
    import subprocess
    import sys

    from dataplane._testprocs import make_step, step_digests
    from dataplane.testing import read_events, run_proc

    src = tmp_path / "run.h5"
    with dp.publish(f"h5://{src}") as pub:
        for i in range(4):
            pub.write(make_step(i, 20000))
    with dp.open(f"h5://{src}") as arc:
        want = {str(i): step_digests(arc[i]) for i in range(4)}
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], text=True,
                          capture_output=True, check=True)  # fmt: skip
    lease = json.loads((tmp_path / "run.h5.lease").read_text())
    lease.update(state="open", pid=int(dead.stdout), start=0)
    for seed in range(6):
        copy = tmp_path / f"c{seed}.h5"
        shutil.copy(src, copy)
        (tmp_path / f"c{seed}.h5.lease").write_text(json.dumps(lease))
        rng = np.random.default_rng(seed)
        os.truncate(copy, int(rng.integers(0, os.path.getsize(copy))))
        proc = run_proc("verify", f"h5://{copy}")
        (got,) = read_events(proc, 60)
        assert got["error"] is None or "IntegrityError" in got["error"], got
        for i, d in got["steps"].items():
            assert d == want[i]


HOLD = {
    "plain h5py": "import h5py; f = h5py.File(PATH, 'r')",
    "h5py SWMR": "import h5py; f = h5py.File(PATH, 'r', swmr=True)",
    "dataplane": "import dataplane as dp; a = dp.open('h5://' + PATH); a[0]['x']",
}


@pytest.mark.timeout(120)
@pytest.mark.parametrize("reader", list(HOLD))
def test_a_writer_refused_because_a_reader_holds_the_file_leaves_it_whole(tmp_path, reader):
    """HDF5 locks a file its readers hold open: a new writer (mode "w") or an appending one
    is refused with ChannelBusyError, and the file is left byte for byte as it was (h5py's
    mode "w" used to truncate it to 0 bytes before HDF5 refused)."""
    import hashlib
    import subprocess
    import sys

    path = tmp_path / "run.h5"
    url = f"h5://{path}"
    with dp.publish(url) as pub:
        for s in range(3):
            pub.write({"x": np.full(1000, s, np.float64)})
    before = hashlib.sha256(path.read_bytes()).hexdigest()
    code = f"PATH = {str(path)!r}\n{HOLD[reader]}\nprint('open', flush=True)\n"
    code += "import time; time.sleep(60)"
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "open"
        for mode in ("w", "a"):
            with pytest.raises(dp.ChannelBusyError, match="open in another process"):
                dp.publish(url, mode=mode)
            assert hashlib.sha256(path.read_bytes()).hexdigest() == before
    finally:
        holder.kill()
        holder.wait()
    with dp.open(url) as arc:
        assert [float(arc.read("x", s)[0]) for s in range(3)] == [0.0, 1.0, 2.0]
    with dp.publish(url, mode="a") as pub:  # and once the reader is gone, writing works
        assert pub.write({"x": np.full(1000, 3.0)}) == 3


@pytest.mark.timeout(60)
def test_a_file_left_open_by_a_crashed_plain_writer_is_an_integrity_error(tmp_path) -> None:
    """A program writing without SWMR (no lease) killed: its superblock still says "open for
    writing". While such a writer lives (it holds HDF5's lock) the file is refused as being
    written; once it is gone, it is reported as possibly incomplete, not as being written."""
    import subprocess
    import sys

    path = tmp_path / "plain.h5"
    code = (
        "import h5py, numpy as np, sys, time\n"
        f"f = h5py.File({str(path)!r}, 'w', libver='latest')\n"
        "f['x'] = np.arange(10.0); f.flush()\n"
        "print('open', flush=True); time.sleep(60)\n"
    )
    writer = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert writer.stdout.readline().strip() == "open"
        with pytest.raises(dp.DataplaneError, match="open for writing without SWMR"):
            dp.open(f"h5://{path}")
    finally:
        writer.kill()
        writer.wait()
    with pytest.raises(dp.IntegrityError, match="left open for writing.*gone"):
        dp.open(f"h5://{path}")


@pytest.mark.timeout(60)
def test_a_plain_h5py_handle_in_the_process_is_named_not_taken_for_damage(tmp_path):
    """HDF5 opens a file once per process: a plain ``h5py.File`` the program holds keeps a SWMR
    open out. That was reported as IntegrityError ("cannot read the file"), as if damaged."""
    import h5py

    url = f"h5://{tmp_path}/run.h5"
    with dp.publish(url) as pub:
        pub.write({"x": np.arange(6.0)})
    with h5py.File(tmp_path / "run.h5", "r"):
        with pytest.raises(dp.DataplaneError, match="open in this process without SWMR") as info:
            dp.open(url)
        assert not isinstance(info.value, dp.IntegrityError)
    with dp.open(url) as arc:  # once that handle is closed, it reads as written
        assert arc[0]["x"].tolist() == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("at_once", [(4096, 1 << 20), (3, 1 << 20), (4096, 200)])
def test_step_records_read_at_once_or_one_by_one_give_each_step_its_own(
    tmp_path, monkeypatch, at_once
) -> None:
    """A reader takes the metadata records of every committed step in one read while they are
    few and small, else one by one; either way each step gets its own attributes, checksums
    and values, also for steps committed after the first read."""
    import dataplane.transports.hdf5 as h5

    monkeypatch.setattr(h5, "_METAS_AT_ONCE", at_once[0])
    monkeypatch.setattr(h5, "_META_BYTES_AT_ONCE", at_once[1])
    url = f"h5://{tmp_path}/run.h5"

    def write(pub, i):
        pub.write({"u": np.full((3, 2), i, np.float32)}, attrs={"t": float(i), "tag": "s" * i})

    with dp.publish(url) as pub, dp.subscribe(url, timeout=30) as sub:
        for i in range(6):
            write(pub, i)
        for i in range(6):
            step = sub.next()
            assert (step.index, step.attrs) == (i, {"t": float(i), "tag": "s" * i})
            np.testing.assert_array_equal(step["u"], np.full((3, 2), i, np.float32))
        for i in range(6, 9):  # committed after the reader took the first records
            write(pub, i)
            step = sub.next()
            assert (step.index, step.attrs["t"]) == (i, float(i))
            np.testing.assert_array_equal(step["u"], np.full((3, 2), i, np.float32))
    with dp.open(url) as arc:
        assert len(arc) == 9
        for i in (8, 0, 4):
            assert arc[i].attrs["tag"] == "s" * i
            np.testing.assert_array_equal(arc[i]["u"], np.full((3, 2), i, np.float32))


def test_a_finished_file_read_holds_only_its_variables_open(tmp_path) -> None:
    """Each dataset a process holds open makes every HDF5 close in it slower (a dataset of
    many files keeps 64 open): a file whose writer is done holds only the datasets of its
    variables, its own records read when needed. Steps, values and attributes as written."""
    url = f"h5://{tmp_path}/done.h5"
    with dp.publish(url) as pub:
        for s in range(5):
            pub.write({"u": np.full((3, 2), s, np.float32), "v": np.arange(4) + s})
            pub.attrs["last"] = s
    arc = dp.open(url)
    try:
        assert len(arc) == 5
        for s in range(5):
            np.testing.assert_array_equal(arc[s]["u"], np.full((3, 2), s, np.float32))
            assert arc.version(s) is not None
        assert arc.attrs["last"] == 4
        from dataplane.transports._h5handles import _Shared

        (shared,) = [sh for sh in _Shared._open.values() if sh.path.endswith("done.h5")]
        fid = shared.file().id
        names = sorted(
            h5py.h5i.get_name(d).decode() for d in h5py.h5f.get_obj_ids(fid, h5py.h5f.OBJ_DATASET)
        )
        assert names == ["/u", "/v"], names
    finally:
        arc.close()


def test_records_read_one_by_one_do_not_reopen_their_datasets(tmp_path, monkeypatch) -> None:
    """A file of many steps reads each step's record alone; those reads keep the record
    datasets open (opening two datasets per step took 6,000 steps from 1.3 to 2.6-2.9 s)."""
    from dataplane.transports import hdf5

    monkeypatch.setattr(hdf5, "_METAS_AT_ONCE", 4)
    url = f"h5://{tmp_path}/long.h5"
    with dp.publish(url) as pub:
        for s in range(40):
            pub.write({"u": np.full(3, s, np.int64)})
    real = h5py.h5d.open
    opened: list[bytes] = []

    def counting(loc, name, *args, **kw):
        opened.append(name)
        return real(loc, name, *args, **kw)

    monkeypatch.setattr(h5py.h5d, "open", counting)
    with dp.open(url) as arc:
        for s in range(len(arc)):
            np.testing.assert_array_equal(arc[s]["u"], np.full(3, s, np.int64))
    assert len(opened) < 10, opened


@pytest.fixture(scope="module")
def located_file(tmp_path_factory):
    """Steps of several checksum blocks (16 rows each), rows of several blocks (``wide``),
    steps that share chunks (``small``), and a gzip copy."""
    root = tmp_path_factory.mktemp("located")
    rng = np.random.default_rng(5)
    steps = [rng.standard_normal((37, 64, 16)).astype(np.float32) for _ in range(6)]
    wide = [rng.standard_normal((3, 40, 1024)).astype(np.float32) for _ in range(6)]
    small = [np.full((4, 2), s, np.int16) for s in range(6)]
    for name, opts in (("raw", {}), ("gzip", {"compression": "gzip"})):
        with dp.publish(f"h5://{root}/{name}.h5", **opts) as pub:
            for s in range(6):
                pub.write({"u": steps[s], "wide": wide[s], "small": small[s]})
    return root, steps, wide, small


def test_located_bytes_read_back_what_the_archive_reads(located_file) -> None:
    from dataplane import api

    root, steps, wide, small = located_file
    with dp.open(f"h5://{root}/gzip.h5") as arc:
        assert arc.locate(0) is None, "filtered chunks are not raw bytes"
    with dp.open(f"h5://{root}/raw.h5") as arc:
        fd = os.open(f"{root}/raw.h5", os.O_RDONLY)
        try:
            for s in range(6):
                found = arc.locate(s)
                assert set(found) == {"u", "wide", "small"}
                assert found["u"].stored is not None
                for first, rows in ((0, 37), (5, 1), (3, 30), (36, 1), (0, 0)):
                    got = api.read_located("h5", fd, found["u"], first, rows)
                    np.testing.assert_array_equal(got, steps[s][first : first + rows])
                    out = np.full((rows, 64, 16), -1, np.float32)
                    assert api.read_located("h5", fd, found["u"], first, rows, out) is out
                    np.testing.assert_array_equal(out, steps[s][first : first + rows])
                np.testing.assert_array_equal(
                    api.read_located("h5", fd, found["small"], 1, 2), small[s][1:3]
                )
                for first, rows in ((0, 3), (1, 1), (2, 1)):
                    out = np.empty((rows, 40, 1024), np.float32)
                    assert api.read_located("h5", fd, found["wide"], first, rows, out) is out
                    np.testing.assert_array_equal(out, wide[s][first : first + rows])
        finally:
            os.close(fd)


def test_located_bytes_that_do_not_match_are_not_vouched_for(located_file, tmp_path) -> None:
    """A flipped byte, or a file that ends early, gives None (the caller reads through the
    archive, which raises), never other values."""
    import shutil

    from dataplane import api

    root, steps, _, _ = located_file
    path = str(tmp_path / "copy.h5")
    shutil.copy(f"{root}/raw.h5", path)
    with dp.open(f"h5://{path}") as arc:
        found = arc.locate(2)["u"]
    with open(path, "r+b") as f:
        f.seek(found.offset + 20 * 64 * 16 * 4 + 3)  # in row 20, the second block
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0x10]))
    fd = os.open(path, os.O_RDONLY)
    try:
        assert api.read_located("h5", fd, found, 30, 1) is None  # a row of the same block
        np.testing.assert_array_equal(api.read_located("h5", fd, found, 0, 16), steps[2][:16])
        unverified = found._replace(stored=None)
        assert not np.array_equal(api.read_located("h5", fd, unverified, 20, 1), steps[2][20:21])
        os.truncate(path, found.offset + 100)
        assert api.read_located("h5", fd, found, 0, 37) is None
        assert api.read_located("h5", fd, unverified, 0, 37) is None
    finally:
        os.close(fd)
    with pytest.raises(dp.IntegrityError):
        with dp.open(f"h5://{path}") as arc:
            arc.read("u", 2)
