"""The cache entry format, a pure core: what is written is what is mapped back, and no
damaged byte of the table or payload goes unnoticed."""

from __future__ import annotations

import os
import tempfile

import hypothesis.extra.numpy as hnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dataplane.cache import _entry as entry

DTYPES = st.sampled_from(["u1", "<i2", "<f4", "<f8", "<c16", ">i4", "?"]).map(np.dtype)
ENTRIES = st.dictionaries(
    st.text("abcxyz/0123456789_", min_size=1, max_size=8),
    hnp.arrays(DTYPES, hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=9))
    | hnp.arrays(DTYPES, st.tuples(st.integers(1, 300), st.integers(1, 40))),  # pages and more
    max_size=6,
)


def written(arrays: dict[str, np.ndarray], where: str) -> str:
    path = os.path.join(where, "entry")
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.posix_fallocate(fd, 0, entry.layout(arrays)[0])
        entry.write(fd, arrays)
    finally:
        os.close(fd)
    return path


def assert_same(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    assert list(got) == list(want)
    for name, a in want.items():
        b = got[name]
        assert b.dtype == a.dtype and b.shape == a.shape
        np.testing.assert_array_equal(b, a)
        assert b.ctypes.data % entry.ALIGN == 0, "arrays are 64-byte aligned"
        if a.nbytes >= entry.PAGE:
            assert b.ctypes.data % entry.PAGE == 0, "arrays of a page or more start on one"


@settings(max_examples=60, deadline=None)
@given(ENTRIES)
def test_an_entry_maps_back_as_written(arrays) -> None:
    with tempfile.TemporaryDirectory() as where:
        path = written(arrays, where)
        assert os.path.getsize(path) == entry.layout(arrays)[0]
        mapped = entry.Mapped(path)
        assert mapped.payload_matches()
        assert_same(mapped.arrays(), arrays)


@settings(max_examples=60, deadline=None)
@given(ENTRIES.filter(lambda a: any(v.nbytes for v in a.values())), st.data())
def test_any_flipped_byte_of_table_or_payload_is_caught(arrays, data) -> None:
    with tempfile.TemporaryDirectory() as where:
        path = written(arrays, where)
        tlen = entry.HEADER.unpack_from(open(path, "rb").read(entry.HEADER.size))[1]
        _, _, offsets = entry.layout(arrays)
        head = -(-(entry.HEADER.size + tlen) // entry.ALIGN) * entry.ALIGN
        # A byte of the table, or of an array's own bytes.
        spots = [entry.HEADER.size + i for i in range(tlen)]
        for a, o in zip(arrays.values(), offsets):
            spots += [head + o + i for i in range(a.nbytes)]
        at = data.draw(st.sampled_from(spots))
        raw = bytearray(open(path, "rb").read())
        raw[at] ^= 1 << data.draw(st.integers(0, 7))
        with open(path, "r+b") as f:
            f.write(raw)
        try:
            mapped = entry.Mapped(path)
        except entry.Damaged:
            return
        assert not mapped.payload_matches()


def test_entries_of_more_arrays_than_one_write_takes(tmp_path, monkeypatch) -> None:
    """Entries of whole steps hold an array per step and variable: past IOV_MAX buffers the
    write goes in several calls, and a short write is resumed where it stopped."""
    arrays = {f"{i}/u": np.full(i % 7 + 1, i, np.float32) for i in range(2600)}
    real = os.pwritev
    calls = []

    def short(fd: int, buffers, offset: int) -> int:
        calls.append(len(buffers))
        whole = b"".join(bytes(b) for b in buffers)
        return real(fd, [whole[: max(1, len(whole) // 3)]], offset)  # a third at most

    monkeypatch.setattr(os, "pwritev", short)
    path = written(arrays, str(tmp_path))
    monkeypatch.undo()
    assert max(calls) <= entry._IOV_MAX and len(calls) > 3
    mapped = entry.Mapped(path)
    assert mapped.payload_matches()
    assert_same(mapped.arrays(), arrays)


def test_a_write_that_makes_no_progress_raises(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(os, "pwritev", lambda fd, buffers, offset: 0)
    with pytest.raises(OSError, match="stopped at byte 0"):
        written({"x": np.ones(4)}, str(tmp_path))


def test_an_entry_is_one_sequential_write_from_its_start(tmp_path, monkeypatch) -> None:
    """Header, table and payload go in one write from offset 0, so the page cache holds the
    entry in the filesystem's largest folios (a payload written on its own at the table's
    offset left half of every 4 MiB entry in 4 KiB pages, each a page-table entry to map)."""
    arrays = {"x": np.arange(1 << 19, dtype=np.float64), "y": np.ones(3, np.int8)}
    real = os.pwritev
    seen = []

    def spy(fd: int, buffers, offset: int) -> int:
        seen.append((offset, sum(len(memoryview(b).cast("B")) for b in buffers)))
        return real(fd, buffers, offset)

    monkeypatch.setattr(os, "pwritev", spy)
    path = written(arrays, str(tmp_path))
    assert seen == [(0, os.path.getsize(path))]
