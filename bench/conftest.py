"""The pytest-benchmark suite: each group holds dataplane and the plain-library baseline of the
same work, timed in one run, and every benchmark checks the values it read or wrote.

    pytest bench/ --benchmark-only                          # the figures (a few minutes)
    pytest bench/ --benchmark-only --quick                  # tiny sizes, one round (make test)
    pytest bench/ --benchmark-only --benchmark-autosave     # save a baseline in .benchmarks/
    pytest bench/ --benchmark-only --benchmark-compare --benchmark-compare-fail=median:25%

The ``bench_*.py`` scripts beside this suite are system benchmarks (mpiexec, cold storage, new
processes) and keep their own reports; ``dataplane bench`` is the user-facing report.
"""

from __future__ import annotations

import dataclasses
import shutil
import tempfile
from collections.abc import Callable, Iterator
from typing import Any

import pytest


@dataclasses.dataclass(frozen=True)
class Sizes:
    """What each benchmark moves: full figures, or ``--quick``'s tiny ones."""

    quick: bool
    write_steps: int = 8
    write_mib: int = 64
    read_steps: int = 8
    read_mib: int = 16
    read_reads: int = 2000
    stream_sizes: tuple[int, ...] = (4096, 1 << 20, 64 << 20)
    stream_bytes: int = 256 << 20  # a round: at least 16 steps, at most 4096
    epoch_samples: int = 8192
    epoch_kib: tuple[int, ...] = (64, 4)
    epoch_workers: tuple[int, ...] = (0, 2)


FULL = Sizes(quick=False)
QUICK = Sizes(
    quick=True,
    write_steps=2,
    write_mib=1,
    read_steps=2,
    read_mib=1,
    read_reads=64,
    stream_sizes=(65536,),
    stream_bytes=1 << 20,
    epoch_samples=512,
    epoch_kib=(4,),
    epoch_workers=(0, 2),
)


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("dataplane benchmarks")
    group.addoption(
        "--quick",
        action="store_true",
        help="tiny sizes and one round, no warm-up: checks that every benchmark runs and "
        "moves the right values (what make test runs); the times mean little",
    )
    group.addoption(
        "--bench-dir",
        default=None,
        help="where the benchmarks write their files (default: a temporary directory); "
        "point it at the filesystem you want measured",
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    limit = 300 if config.getoption("--quick") else 3600
    for item in items:
        item.add_marker(pytest.mark.timeout(limit))


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Sizes that depend on ``--quick`` are parameters: ``kib`` and ``workers`` of the epoch
    benchmarks, ``size`` of the stream benchmarks."""
    sizes = QUICK if metafunc.config.getoption("--quick") else FULL
    if "epoch_kib" in metafunc.fixturenames:
        metafunc.parametrize("epoch_kib", sizes.epoch_kib, ids=lambda k: f"{k}KiB", scope="module")
    if "workers" in metafunc.fixturenames:
        metafunc.parametrize("workers", sizes.epoch_workers, ids=lambda w: f"workers={w}")
    if "step_size" in metafunc.fixturenames:
        metafunc.parametrize("step_size", sizes.stream_sizes, ids=_size_id)


def _size_id(n: int) -> str:
    for unit, shift in (("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift and n % (1 << shift) == 0:
            return f"{n >> shift}{unit}"
    return f"{n}B"


@pytest.fixture(scope="session")
def sizes(pytestconfig: pytest.Config) -> Sizes:
    return QUICK if pytestconfig.getoption("--quick") else FULL


@pytest.fixture(scope="session")
def bench_dir(pytestconfig: pytest.Config) -> Iterator[str]:
    path = tempfile.mkdtemp(prefix="dp-bench-", dir=pytestconfig.getoption("--bench-dir"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def measure(benchmark: Any, sizes: Sizes, pytestconfig: pytest.Config) -> Callable[..., Any]:
    """``measure(fn, group=..., ours=..., nbytes=..., setup=..., teardown=...)`` times ``fn``
    with ``benchmark.pedantic``: one untimed warm-up round, then ``--benchmark-min-rounds``
    rounds (one round and no warm-up with ``--quick``). It records whether ``fn`` is dataplane
    or a baseline and the bytes (and samples) a round moves, so the JSON carries GB/s beside
    the times; returns the last round's result."""

    def run(
        fn: Callable[..., Any],
        *,
        group: str,
        ours: bool,
        nbytes: int,
        samples: int | None = None,
        setup: Callable[[], Any] | None = None,
        teardown: Callable[..., Any] | None = None,
    ) -> Any:
        benchmark.group = group
        benchmark.extra_info["side"] = "dataplane" if ours else "baseline"
        benchmark.extra_info["bytes"] = nbytes
        if samples is not None:
            benchmark.extra_info["samples"] = samples
        rounds = 1 if sizes.quick else max(1, pytestconfig.getoption("benchmark_min_rounds"))
        result = benchmark.pedantic(
            fn,
            setup=setup,
            teardown=teardown,
            rounds=rounds,
            warmup_rounds=0 if sizes.quick else 1,
        )
        stats = getattr(benchmark, "stats", None)
        if stats is not None:  # None under --benchmark-disable
            median = stats.stats.median
            benchmark.extra_info["GB/s"] = nbytes / median / 1e9
            if samples is not None:
                benchmark.extra_info["samples/s"] = samples / median
        return result

    return run
