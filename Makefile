# `make demo` and `make test` each work from nothing: they create .venv when missing and install
# the project with all extras (torch pinned through constraints.txt).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test test-mpio bench soak docs lint clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e '.[all,dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/dataplane demo

# The modules users import from: typed strictly (the package ships py.typed).
PUBLIC := dataplane/__init__.py dataplane/api.py dataplane/errors.py dataplane/model.py \
	dataplane/publisher.py dataplane/subscriber.py dataplane/loaders/__init__.py \
	dataplane/loaders/sample.py dataplane/loaders/sampler.py dataplane/loaders/stream.py \
	dataplane/loaders/batches.py dataplane/cache/__init__.py dataplane/cache/store.py \
	dataplane/cache/peers.py dataplane/cache/policy.py dataplane/cache/prefetch.py

test: $(STAMP)
	$(VENV)/bin/ruff check dataplane tests bench examples
	$(VENV)/bin/ruff format --check dataplane tests bench examples
	$(VENV)/bin/mypy dataplane
	$(VENV)/bin/mypy --strict --follow-imports=silent $(PUBLIC)
	$(PY) -m pytest -q

# Native MPI-IO: a second virtualenv whose mpi4py and h5py are built against Debian's MPICH
# and MPI-enabled HDF5 (the PyPI wheels are serial), and the tests that need it. Needs root
# for apt-get the first time; the builds take about ten minutes on two cores.
MPIO_VENV ?= .venv-mpio
HDF5_MPICH ?= /usr/lib/x86_64-linux-gnu/hdf5/mpich
MPIO_STAMP := $(MPIO_VENV)/.installed

$(MPIO_STAMP): pyproject.toml
	test -d $(HDF5_MPICH) && command -v mpicc >/dev/null || \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libhdf5-mpich-dev mpich)
	test -x $(MPIO_VENV)/bin/python || $(PYTHON) -m venv $(MPIO_VENV)
	$(MPIO_VENV)/bin/pip install --quiet --upgrade pip "setuptools>=77" wheel numpy cython pkgconfig
	CC=mpicc $(MPIO_VENV)/bin/pip install --quiet --no-binary=mpi4py mpi4py
	CC=mpicc HDF5_MPI=ON HDF5_DIR=$(HDF5_MPICH) \
		$(MPIO_VENV)/bin/pip install --quiet --no-binary=h5py --no-build-isolation h5py
	$(MPIO_VENV)/bin/pip install --quiet -e . pytest pytest-timeout
	touch $(MPIO_STAMP)

test-mpio: $(MPIO_STAMP)
	$(MPIO_VENV)/bin/python -c "import h5py, sys; sys.exit(0 if h5py.get_config().mpi else 'h5py without MPI')"
	$(MPIO_VENV)/bin/python -m pytest -q tests/test_mpio.py

# dataplane bench (the user-facing report), the pytest-benchmark suite (saved under
# .benchmarks/ for --benchmark-compare; see docs/benchmarking.md) and the system benchmarks.
bench: $(STAMP)
	$(VENV)/bin/dataplane bench all --dir $(or $(BENCH_DIR),/tmp) --out bench_results
	$(PY) -m pytest bench --benchmark-only --benchmark-autosave \
		--benchmark-json bench_results/pytest-benchmark.json $(if $(BENCH_DIR),--bench-dir $(BENCH_DIR))
	$(PY) bench/bench_mpi.py
	$(PY) bench/bench_cache.py
	$(PY) bench/bench_many_files.py
	$(VENV)/bin/mpiexec -n 4 $(PY) bench/bench_coop.py

# Not in CI: 10 minutes of streaming per transport, then 20 cached epochs (about 35 minutes).
soak: $(STAMP)
	$(PY) bench/soak.py --json soak.json

docs: $(STAMP)
	$(VENV)/bin/mkdocs build --strict

lint: $(STAMP)
	$(VENV)/bin/ruff check dataplane tests bench examples
	$(VENV)/bin/mypy dataplane
	$(VENV)/bin/mypy --strict --follow-imports=silent $(PUBLIC)

clean:
	rm -rf $(VENV) build site *.egg-info .pytest_cache
