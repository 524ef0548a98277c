"""Property tests over what users pass in: every accepted array round-trips bit-exactly, every
rejection is a dataplane exception with a message, and no size, however large or negative,
makes dataplane allocate before it refuses."""

from __future__ import annotations

import re
import uuid

import hypothesis.extra.numpy as hnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import dataplane as dp
from dataplane.cache import NodeCache, parse_size
from dataplane.model import DTYPES

pytestmark = pytest.mark.timeout(300)
SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
NAME_RULE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]{0,127}")


def arrays() -> st.SearchStrategy[np.ndarray]:
    """Any supported dtype (both byte orders), 0-3 dims with zero-length ones, and the views
    simulations hand over: transposed, strided, reversed."""
    dtypes = st.sampled_from(sorted(DTYPES, key=str)).flatmap(
        lambda d: st.sampled_from([d, d.newbyteorder()]) if d.itemsize > 1 else st.just(d)
    )
    base = hnp.arrays(dtypes, hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=5))
    view = st.sampled_from(["as is", "T", "step", "reverse", "fortran"])

    def shape(a: np.ndarray, how: str) -> np.ndarray:
        if a.ndim == 0 or how == "as is":
            return a
        return {
            "T": a.T,
            "step": a[::2],
            "reverse": a[::-1],
            "fortran": np.asfortranarray(a),
        }[how]

    return st.tuples(base, view).map(lambda t: shape(*t))


def same_bits(got: np.ndarray, want: np.ndarray) -> bool:
    want = np.array(want, dtype=want.dtype.newbyteorder("="), order="C")
    return got.dtype == want.dtype and got.shape == want.shape and got.tobytes() == want.tobytes()


@SETTINGS
@given(arrays())
def test_every_accepted_array_round_trips_bit_exactly(a: np.ndarray) -> None:
    url = f"mem://bad-{uuid.uuid4().hex}"
    sub = dp.subscribe(url, timeout=10)
    with dp.publish(url) as pub:
        pub.write({"a": a})
    step = next(iter(sub))
    assert same_bits(np.asarray(step["a"]), a)
    sub.close()


@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
@given(arrays())
def test_files_round_trip_what_they_accept(tmp_path_factory, a: np.ndarray) -> None:
    where = tmp_path_factory.mktemp("rt")
    for url in (f"h5://{where}/a.h5", f"zarr://{where}/a.zarr", f"bp5://{where}/a.bp"):
        with dp.publish(url) as pub:
            pub.write({"a": a})
        with dp.open(url) as arc:
            assert same_bits(np.asarray(arc.read("a", step=0)), a), url


@pytest.mark.parametrize("scheme", ["h5", "zarr", "bp5"])
def test_signed_zeros_round_trip_in_files(tmp_path, scheme) -> None:
    """Zarr skipped chunks equal to its fill value by ==, so a complex -0.0 came back +0.0
    (an IntegrityError, found by the property test above)."""
    arrays = [
        np.array([complex(-0.0, 0.0)]),
        np.array(complex(0.0, -0.0)),
        np.full((3, 4), complex(-0.0, -0.0), np.complex64),
        np.array([-0.0, 0.0], np.float16),
    ]
    for k, a in enumerate(arrays):
        url = f"{scheme}://{tmp_path}/z{k}.{scheme}"
        with dp.publish(url) as pub:
            pub.write({"a": a})
        with dp.open(url) as arc:
            assert same_bits(np.asarray(arc.read("a", step=0)), a), (url, a)


@SETTINGS
@given(st.text(min_size=0, max_size=140))
def test_names_are_accepted_exactly_by_the_rule_or_refused_with_a_reason(name: str) -> None:
    url = f"mem://names-{uuid.uuid4().hex}"
    with dp.publish(url) as pub:
        ok = (
            NAME_RULE.fullmatch(name) is not None
            and not name.startswith("__")
            and not name.lower().endswith(".json")
        )
        if ok:
            pub.write({name: np.zeros(1)})
        else:
            with pytest.raises(dp.SchemaError, match="not safe|names are strings"):
                pub.write({name: np.zeros(1)})


@SETTINGS
@given(
    st.lists(st.integers(-(10**18), 10**18), min_size=0, max_size=3),
    st.lists(st.integers(-(10**18), 10**18), min_size=0, max_size=3),
)
def test_selections_read_the_slice_or_are_refused(start: list[int], count: list[int]) -> None:
    data = np.arange(24.0).reshape(4, 6)
    url = f"mem://sel-{uuid.uuid4().hex}"
    sub = dp.subscribe(url, timeout=10)
    with dp.publish(url) as pub:
        pub.write({"u": data})
    step = next(iter(sub))
    valid = (
        len(start) == len(count) == 2
        and all(0 <= s and 0 <= c for s, c in zip(start, count))
        and all(s + c <= n for s, c, n in zip(start, count, data.shape))
    )
    if valid:
        got = step.read("u", start=start, count=count)
        want = data[start[0] : start[0] + count[0], start[1] : start[1] + count[1]]
        assert same_bits(np.asarray(got), want)
    else:  # huge counts are refused before anything is allocated
        with pytest.raises(dp.DataplaneError) as info:
            step.read("u", start=start, count=count)
        assert str(info.value)
    sub.close()


@SETTINGS
@given(
    st.one_of(st.integers(-5, 10_000), st.floats(allow_nan=True), st.text(max_size=5), st.none()),
    st.one_of(st.sampled_from(["block", "drop-oldest"]), st.text(max_size=12)),
)
def test_options_are_checked(queue_limit: object, policy: str) -> None:
    url = f"mem://opt-{uuid.uuid4().hex}"
    good = (
        isinstance(queue_limit, int)
        and not isinstance(queue_limit, bool)
        and 1 <= queue_limit <= 4096
        and policy in ("block", "drop-oldest")
    )
    if good:
        dp.publish(url, queue_limit=queue_limit, policy=policy).close()
    else:
        with pytest.raises(dp.OptionError) as info:
            dp.publish(url, queue_limit=queue_limit, policy=policy)  # type: ignore[arg-type]
        assert str(info.value)


@SETTINGS
@given(st.one_of(st.integers(-(10**20), 10**20), st.text(max_size=12), st.floats()))
def test_sizes_parse_or_are_refused(size: object) -> None:
    try:
        n = parse_size(size)
    except dp.OptionError as exc:
        assert str(exc)
    else:
        assert isinstance(n, int) and n > 0


@pytest.mark.parametrize("size", ["1.2.3GB", "1..5G", "nan", "inf", "-1GB", "", "GB", 0, -5, True])
def test_sizes_that_are_not_sizes_are_refused(size: object) -> None:
    with pytest.raises(dp.OptionError, match="size|capacity"):
        parse_size(size)
    with pytest.raises(dp.OptionError):
        NodeCache("/nonexistent-never-made", capacity=size)


BAD_SECONDS = [-1, -0.5, float("nan"), float("inf"), "soon", True]


@pytest.mark.parametrize("seconds", BAD_SECONDS, ids=str)
def test_times_that_are_not_times_are_refused(tmp_path, seconds: object) -> None:
    """Every option that is a number of seconds: finite and not negative (NaN made waits
    end at once or never; an infinite heartbeat made a live writer look dead)."""
    with pytest.raises(dp.OptionError, match="timeout"):
        dp.subscribe(f"mem://t-{uuid.uuid4().hex}", timeout=seconds)
    for scheme in ("h5", "bp5", "zarr"):
        with pytest.raises(dp.OptionError, match="heartbeat"):
            dp.publish(f"{scheme}://{tmp_path}/x.{scheme}", heartbeat=seconds)
    with pytest.raises(dp.OptionError, match="heartbeat"):
        dp.publish(f"h5://{tmp_path}/x.h5?heartbeat={seconds}")
    for url in (f"mem://t-{uuid.uuid4().hex}", f"shm://t-{uuid.uuid4().hex}?dir={tmp_path}"):
        with pytest.raises(dp.OptionError, match="rendezvous_timeout"):
            dp.publish(url, rendezvous_timeout=seconds)
        with pytest.raises(dp.OptionError, match="block_timeout"):
            dp.publish(url, block_timeout=seconds)
    with pytest.raises(dp.OptionError, match="rendezvous_timeout"):
        dp.publish(f"sst://{tmp_path}/s", rendezvous_timeout=seconds)
    with pytest.raises(dp.OptionError, match="lock_timeout"):
        NodeCache(tmp_path / "cache", lock_timeout=seconds)
    assert not list(tmp_path.glob("x.*")), "nothing was created"
