# `make demo` and `make test` each work from nothing: they create .venv when missing and install
# the project with all extras (torch pinned through constraints.txt).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test bench soak docs lint clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e '.[all,dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/dataplane demo

test: $(STAMP)
	$(VENV)/bin/ruff check dataplane tests bench examples
	$(VENV)/bin/ruff format --check dataplane tests bench examples
	$(VENV)/bin/mypy dataplane
	$(PY) -m pytest -q

bench: $(STAMP)
	$(VENV)/bin/dataplane bench all --dir $(or $(BENCH_DIR),/tmp) --out bench_results
	$(PY) bench/bench_shm.py
	$(PY) bench/bench_files.py
	$(PY) bench/bench_verify.py
	$(PY) bench/bench_mpi.py
	$(PY) bench/bench_loaders.py
	$(PY) bench/bench_cache.py
	$(PY) bench/bench_batches.py
	$(PY) bench/bench_many_files.py

# Not in CI: 10 minutes of streaming per transport, then 20 cached epochs (about 35 minutes).
soak: $(STAMP)
	$(PY) bench/soak.py --json soak.json

docs: $(STAMP)
	$(VENV)/bin/mkdocs build --strict

lint: $(STAMP)
	$(VENV)/bin/ruff check dataplane tests bench examples
	$(VENV)/bin/mypy dataplane

clean:
	rm -rf $(VENV) build site *.egg-info .pytest_cache
