# The two commands of the README: `make bench` (the main job) and `make test`.
# Each creates .venv when it is missing and installs the project with its test, Ray, suites,
# TorchRL and train extras.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: bench test test-loaded lint install clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# torch first, pinned: on these machines this finds the local CPU build, and the
	# project's range (torch>=2.3) is then already satisfied, so no CUDA wheels are pulled.
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test,ray,suites,torchrl,train]'
	# robosuite's numba kernels compile on first use (~9 s): once here, into their cache.
	$(PY) -c "import envs.robosuite as r; r.warm_up()" > /dev/null 2>&1
	touch $(STAMP)

install: $(STAMP)

bench: $(STAMP)
	$(PY) bench.py $(ARGS)

# Two test processes: one test alone leaves part of a 2-core machine idle (waits on workers,
# on Ray, on timeouts). The Ray tests stay in one of them, which starts the loopback cluster.
test: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m pytest -q -n 2 --dist loadgroup --durations=10 $(ARGS)

# The suite three times while two busy loops hog both cores (what a shared CI machine does).
test-loaded: $(STAMP)
	$(PY) tests/under_load.py --hogs 2 --runs 3 -- $(PY) -m pytest -q -n 2 --dist loadgroup $(ARGS)

lint: $(STAMP)
	$(PY) -m ruff check .

clean:
	rm -rf $(VENV) bench_results .pytest_cache .ruff_cache
