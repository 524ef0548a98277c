"""The core: errors, model checks, URL parsing, the registry and what the API adds on top."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest

import dataplane as dp
from dataplane import registry
from dataplane.model import Block, ChannelURL, Selection, VarSpec, as_array, check_attrs, check_name
from dataplane.testing import Consumer, assert_same_array


# -- errors ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "error, builtin",
    [
        (dp.UnknownSchemeError, ValueError),
        (dp.VariableNotFoundError, KeyError),
        (dp.SchemaError, ValueError),
        (dp.StepTimeoutError, TimeoutError),
        (dp.ChannelBroken, ConnectionError),
        (dp.ReadOnlyError, PermissionError),
        (dp.UnknownOptionError, TypeError),
        (dp.OptionError, ValueError),
        (dp.MissingDependencyError, ImportError),
        (dp.ChannelBusyError, FileExistsError),
    ],
)
def test_errors_are_also_the_matching_builtin(error, builtin) -> None:
    assert issubclass(error, dp.DataplaneError) and issubclass(error, builtin)


def test_variable_not_found_message_is_not_quoted() -> None:
    assert str(dp.VariableNotFoundError("variable 'u' is missing")) == "variable 'u' is missing"


# -- model ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["u", "U_2", "a.b-c", "0x", "x" * 128])
def test_safe_names(name: str) -> None:
    assert check_name(name) == name


def test_selection_checks() -> None:
    assert Selection.of((4, 5)).slices == (slice(0, 4), slice(0, 5))
    assert Selection.of((4, 5), start=(1, 2)).count == (3, 3)
    assert Selection.of((4, 5), count=(2, 2)).start == (0, 0)
    assert Selection.of((), None, None).slices == ()
    assert Selection.of((10,), start=np.int64(3), count=2).count == (2,)
    for start, count in [((0,), None), ((-1, 0), (1, 1)), ((0, 0), (5, 1)), ((0, 0), (1, -1))]:
        with pytest.raises(dp.SchemaError):
            Selection.of((4, 5), start, count)
    with pytest.raises(dp.SchemaError, match="integers"):
        Selection.of((4,), start=(1.5,))


def test_block_checks() -> None:
    arr, start, shape = Block(np.zeros((2, 3)), (2, 0), (4, 3)).checked("x")
    assert (start, shape) == ((2, 0), (4, 3))
    with pytest.raises(dp.SchemaError, match="does not fit"):
        Block(np.zeros((2, 3)), (3, 0), (4, 3)).checked("x")
    with pytest.raises(dp.SchemaError, match="2-d"):
        Block(np.zeros((2, 3)), (0,), (4,)).checked("x")


def test_partial_block_needs_comm() -> None:
    with dp.publish("mem://blocks") as pub:
        pub.write({"x": Block(np.ones((2, 2)), (0, 0), (2, 2))})  # a whole block is fine
        with pytest.raises(dp.SchemaError, match="comm="):
            pub.write({"x": Block(np.ones((2, 2)), (0, 0), (4, 2))})


def test_arrays_from_foreign_devices_are_refused_with_advice() -> None:
    # No GPU here: a stand-in with torch's module name and a CUDA device (no real part can run).
    class FakeCudaTensor:
        __module__ = "torch"
        device = type("Device", (), {"type": "cuda"})()

    with pytest.raises(dp.SchemaError, match=r"tensor.cpu\(\)"):
        as_array(FakeCudaTensor(), "u")


def test_bfloat16_tensors_are_refused_with_advice() -> None:
    torch = pytest.importorskip("torch")
    with pytest.raises(dp.SchemaError, match="float"):
        as_array(torch.zeros(3, dtype=torch.bfloat16), "u")


def test_attribute_normalisation() -> None:
    assert check_attrs({"a": np.int64(3), "b": np.array([1.5, 2.5]), "c": (1, 2)}) == {
        "a": 3,
        "b": [1.5, 2.5],
        "c": [1, 2],
    }
    with pytest.raises(dp.SchemaError, match="mapping"):
        check_attrs([("a", 1)])  # type: ignore[arg-type]


def test_varspec_json_round_trip() -> None:
    spec = VarSpec(np.dtype("complex64"), (3, 0, 2))
    assert VarSpec.from_json(spec.to_json()) == spec
    assert (spec.size, spec.nbytes, spec.ndim) == (0, 0, 3)


@pytest.mark.parametrize(
    "url, scheme, protocol, path, query",
    [
        ("shm://run1", "shm", None, "run1", {}),
        ("bp5:///abs/run.bp?Threads=2", "bp5", None, "/abs/run.bp", {"Threads": "2"}),
        (
            "zarr+s3://bucket/key?anon=true&x=",
            "zarr",
            "s3",
            "bucket/key",
            {"anon": "true", "x": ""},
        ),
    ],
)
def test_url_parsing(url, scheme, protocol, path, query) -> None:
    parsed = ChannelURL.parse(url)
    assert (parsed.scheme, parsed.protocol, parsed.path, parsed.query) == (
        scheme,
        protocol,
        path,
        query,
    )


@pytest.mark.parametrize("url", ["shm:/x", "SHM://x", "shm://", "1x://a", "shm://a?x=1&x=2", 5])
def test_bad_urls(url) -> None:
    with pytest.raises(dp.OptionError):
        ChannelURL.parse(url)


def test_protocol_part_only_where_taken() -> None:
    with pytest.raises(dp.UnknownSchemeError, match=r"\+protocol"):
        dp.publish("shm+s3://x")


# -- registry -------------------------------------------------------------------------------------
def test_register_refuses_silent_replacement() -> None:
    from dataplane.transports.mem import MemTransport

    class Other(MemTransport):
        scheme = "mem2"

    try:
        dp.register_transport("mem2", Other)
        dp.register_transport("mem2", Other)  # the same target again is harmless
        with pytest.raises(dp.DataplaneError, match="already registered"):
            dp.register_transport("mem2", "somewhere.else:Transport")
        with pytest.raises(dp.DataplaneError, match="already registered"):
            dp.register_transport("mem", Other)
        dp.register_transport("mem2", "dataplane.transports.mem:MemTransport", replace=True)
        assert registry.get_transport("mem2") is MemTransport
        assert "mem2" in dp.known_schemes()
    finally:
        registry.unregister_transport("mem2")
    assert "mem2" not in dp.known_schemes()


def test_bad_registrations() -> None:
    with pytest.raises(dp.DataplaneError, match="not valid"):
        dp.register_transport("Bad+Scheme", "x:y")
    with pytest.raises(dp.DataplaneError, match="module:Class"):
        dp.register_transport("nocolon", "just.a.module")
    try:
        dp.register_transport("notatransport", "dataplane.model:VarSpec")
        with pytest.raises(dp.DataplaneError, match="not a dataplane"):
            dp.publish("notatransport://x")
    finally:
        registry.unregister_transport("notatransport")


def test_missing_dependency_gives_the_install_hint() -> None:
    try:
        dp.register_transport("needsx", "no_such_module_xyz:T", hint="pip install 'dataplane[x]'")
        with pytest.raises(
            dp.MissingDependencyError, match=r"pip install 'dataplane\[x\]'"
        ) as info:
            dp.subscribe("needsx://a")
        assert isinstance(info.value, ImportError)
    finally:
        registry.unregister_transport("needsx")


def _make_plugin(root, dist: str, scheme: str, target: str) -> None:
    info = root / f"{dist}-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(f"[dataplane.transports]\n{scheme} = {target}\n")


def _run(code: str, path, **env) -> subprocess.CompletedProcess:
    environ = {**os.environ, "PYTHONPATH": str(path), **env}
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        env=environ,
        timeout=60,
    )


def test_third_party_transport_registers_by_entry_point(tmp_path) -> None:
    (tmp_path / "plugmod.py").write_text(
        "from dataplane.transports.mem import MemTransport\n"
        "class PlugTransport(MemTransport):\n    scheme = 'plug'\n"
    )
    _make_plugin(tmp_path, "plugdist", "plug", "plugmod:PlugTransport")
    result = _run(
        """
        import threading, numpy as np, dataplane as dp
        assert "plug" in dp.known_schemes()
        sub = dp.subscribe("plug://c", timeout=10)
        with dp.publish("plug://c") as pub:
            pub.write({"x": np.arange(3)})
        print(type(sub.transport).__name__, [s["x"].tolist() for s in sub])
        """,
        tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "PlugTransport [[0, 1, 2]]"


def test_entry_point_claiming_a_taken_scheme_is_refused(tmp_path) -> None:
    _make_plugin(tmp_path, "rogue", "mem", "rogue:Transport")
    result = _run(
        """
        import dataplane as dp
        try:
            dp.publish("mem://x")
        except dp.DataplaneError as exc:
            print("refused:", exc)
        """,
        tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert "refused: scheme 'mem' is claimed twice" in result.stdout
    assert "rogue" in result.stdout


# -- import weight and layering -----------------------------------------------------------------
def test_import_dataplane_leaves_heavy_libraries_out() -> None:
    heavy = ["adios2", "h5py", "zarr", "torch", "mpi4py", "fsspec"]
    result = _run(
        f"""
        import sys, dataplane
        print([m for m in {heavy!r} if m in sys.modules])
        """,
        ".",
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_public_names() -> None:
    for name in ["publish", "subscribe", "open", "Block", "Step", "VarSpec", "ChannelBroken"]:
        assert name in dp.__all__ and hasattr(dp, name)
    assert dp.__all__ == sorted(dp.__all__)


# -- what the API adds ----------------------------------------------------------------------------
def test_asynchronous_publish_copies_then_writes_in_the_background() -> None:
    sub = dp.subscribe("mem://async1", timeout=20)
    c = Consumer(sub)
    c.start()
    u = np.zeros(1000)
    with dp.publish("mem://async1", asynchronous=True, queue_limit=2, rendezvous=1) as pub:
        for i in range(20):
            u[:] = i
            pub.write({"u": u}, attrs={"i": i})
            u[:] = -1  # the simulation reuses its buffer at once; the staged copy is safe
        pub.flush()
    c.finish(20)
    sub.close()
    assert c.indices == list(range(20))
    for i, attrs, arrays in c.steps:
        assert attrs == {"i": i}
        assert_same_array(arrays["u"], np.full(1000, float(i)))


def test_asynchronous_publish_reraises_background_errors() -> None:
    # A subscriber that never reads and a short block_timeout make the background write fail.
    sub = dp.subscribe("mem://async2")
    pub = dp.publish("mem://async2", asynchronous=True, queue_limit=1, block_timeout=0.2)
    with pytest.raises(dp.StepTimeoutError) as info:
        for _ in range(50):
            pub.write({"x": np.zeros(10)})
            time.sleep(0.02)
        pub.close()
    assert any("asynchronous publish of step" in n for n in getattr(info.value, "__notes__", []))
    with pytest.raises(dp.DataplaneError):
        pub.write({"x": np.zeros(10)})
    pub.close()
    sub.close()


def test_publisher_and_subscriber_refuse_use_after_close() -> None:
    pub = dp.publish("mem://closed1")
    sub = dp.subscribe("mem://closed1")
    pub.close()
    pub.close()  # idempotent
    with pytest.raises(dp.DataplaneError, match="closed"):
        pub.write({"x": np.zeros(1)})
    sub.close()
    with pytest.raises(dp.DataplaneError, match="closed"):
        sub.next()


def test_streams_have_no_random_access() -> None:
    with pytest.raises(dp.DataplaneError, match="subscribe"):
        dp.open("shm://nothing")


def test_subscriber_threads_do_not_share_steps() -> None:
    """Two subscribers in two threads of one process each see the whole stream."""
    subs = [dp.subscribe("mem://threads", timeout=20) for _ in range(2)]
    consumers = [Consumer(s) for s in subs]
    for c in consumers:
        c.start()
    with dp.publish("mem://threads", rendezvous=2) as pub:
        for i in range(50):
            pub.write({"x": np.full(3, i)})
    for c in consumers:
        c.finish(20)
        c.sub.close()
        assert c.indices == list(range(50))
    assert threading.active_count() >= 1


def _sleep_forever() -> None:
    time.sleep(3600)


@pytest.mark.timeout(60)
def test_sigterm_handler_is_the_publishing_process_only(tmp_path) -> None:
    """publish() makes SIGTERM end its process's channels cleanly; children forked later
    (DataLoader workers) still die of SIGTERM as before, and a program's own handler wins."""
    import multiprocessing
    import signal

    before = signal.getsignal(signal.SIGTERM)
    try:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        with dp.publish(f"mem://sigterm-{os.getpid()}"):
            assert signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL
        for _ in range(20):  # terminate() at once after start(): the signal is never lost
            child = multiprocessing.get_context("fork").Process(target=_sleep_forever)
            child.start()
            child.terminate()
            child.join(30)
            if child.exitcode is None:
                child.kill()
                child.join()
            assert child.exitcode == -signal.SIGTERM

        def own(signum, frame) -> None:
            pass

        signal.signal(signal.SIGTERM, own)
        with dp.publish(f"mem://sigterm2-{os.getpid()}"):
            pass
        assert signal.getsignal(signal.SIGTERM) is own
    finally:
        signal.signal(signal.SIGTERM, before)


def test_typed_options_in_the_url_take_their_declared_types(tmp_path) -> None:
    """``?compression=gzip`` failed with "not a valid int": an option typed ``str | int`` takes
    text and numbers alike, ``Any`` takes numbers as numbers, a plain ``int`` only numbers."""
    import h5py

    data = np.arange(4096, dtype=np.float64).reshape(64, 64)
    for i, query in enumerate(["compression=gzip&compression_opts=4", "compression=4"]):
        with dp.publish(f"h5://{tmp_path}/c{i}.h5?{query}") as pub:
            pub.write({"x": data})
        with h5py.File(tmp_path / f"c{i}.h5", "r") as f:
            assert (f["x"].compression, f["x"].compression_opts) == ("gzip", 4)
        with dp.open(f"h5://{tmp_path}/c{i}.h5") as arc:
            assert_same_array(arc[0]["x"], data)
    with pytest.raises(dp.OptionError, match=r"threads='many' in the URL is not a valid int"):
        dp.publish(f"sst://{tmp_path}/s?threads=many")


def test_publish_and_subscribe_options_work_in_the_url_as_keywords(tmp_path) -> None:
    url = f"h5://{tmp_path}/run.h5"
    with dp.publish(f"{url}?asynchronous=yes&queue_limit=2") as pub:
        assert pub._async is not None  # asynchronous, from the URL
        pub.write({"a": np.arange(3), "b": np.ones(2)})
    with dp.publish(f"{url}?mode=a") as pub:  # appends after step 0
        assert pub.write({"a": np.arange(3) + 1, "b": np.zeros(2)}) == 1
    with dp.subscribe(f"{url}?vars=a&timeout=5") as sub:
        assert sub.timeout == 5.0
        steps = [(s.index, sorted(s.vars), s["a"].tolist()) for s in sub]
    assert steps == [(0, ["a"], [0, 1, 2]), (1, ["a"], [1, 2, 3])]
    with pytest.raises(dp.OptionError, match="queue_limit must be between"):
        dp.publish(f"shm://q-{os.getpid()}?queue_limit=5000")
    with pytest.raises(dp.OptionError, match="given both in the URL"):
        dp.publish(f"{url}?queue_limit=2", queue_limit=3)
    with pytest.raises(dp.OptionError, match="queue_limit='two' in the URL is not a valid int"):
        dp.publish(f"{url}?queue_limit=two")
    with pytest.raises(dp.OptionError, match="start must be"):
        dp.subscribe(f"{url}?start=middle")


@pytest.mark.timeout(60)
def test_steps_that_repeat_a_layout_and_steps_that_change_it_read_back_as_written() -> None:
    """A step laid out as the last one skips the checks it already passed; every other step
    (new names, order, shapes, byte order, tensors, blocks, a masked array) is checked in
    full, and a dtype change is refused as before."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(3)
    x = rng.random((4, 3))
    steps = [
        {"x": x, "t": np.float64(1.0)},
        {"x": x + 1, "t": np.float64(2.0)},  # repeats the layout
        {"x": rng.random((2, 3)), "t": np.float64(3.0)},  # another shape
        {"t": np.float64(4.0), "x": x},  # another order
        {"x": (x + 2).astype(">f8"), "t": np.float64(5.0)},  # byte-swapped: converted
        {"x": torch.from_numpy(x + 3), "t": np.float64(6.0)},  # a tensor
        {"x": Block(x + 4, (0, 0), (4, 3)), "t": np.float64(7.0)},
        {"x": x + 5, "t": np.float64(8.0), "y": np.arange(3)},  # one more variable
        {"x": x + 6, "t": np.float64(9.0), "y": np.arange(3) + 1},
    ]
    sub = dp.subscribe("mem://repeats", timeout=20)
    with dp.publish("mem://repeats", queue_limit=len(steps) + 1) as pub:
        for step in steps:
            pub.write(step)
        with pytest.raises(dp.SchemaError, match="dtype"):
            pub.write({"x": x.astype(np.float32), "t": np.float64(0.0), "y": np.arange(3)})
        with pytest.raises(dp.SchemaError, match="masked"):
            pub.write({"x": np.ma.masked_array(x), "t": np.float64(0.0), "y": np.arange(3)})
        with pytest.raises(dp.SchemaError, match="dtype"):
            pub.write({"x": x, "t": np.float32(0.0), "y": np.arange(3)})
    n = 0
    for step, want in zip(sub, steps):
        n += 1
        for name, value in want.items():
            if isinstance(value, Block):
                value = value.data
            expect = np.asarray(value.numpy() if hasattr(value, "numpy") else value)
            np.testing.assert_array_equal(step[name], expect.astype(expect.dtype.newbyteorder("=")))
            assert step[name].dtype == expect.dtype.newbyteorder("=")
    assert n == len(steps) and sub.next() is None
    sub.close()
