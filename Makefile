# Two commands do everything on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DEMO_DIR ?= demo_work
# The slowest tests listed at the end: the suite must stay under 10 minutes on 2 cores.
PYTEST_ARGS ?= --durations=12
# Two test processes (pytest-xdist), each test file on one of them (module fixtures built
# once): most tests wait on TensorFlow start-up or subprocesses, so two share two cores well.
# Files are handed out in collection order, the longest first (tests/conftest.py), not
# xdist's order by number of tests.
TEST_WORKERS ?= -n 2 --dist loadfile --no-loadscope-reorder

.PHONY: install test lint demo bench clean

install: $(VENV)/.installed

# uv installs the same packages as pip, from its cache in ~35 s where pip takes ~90 s (TensorFlow
# alone unpacks to over 1 GB; uv links it from the cache); pip is the fallback where uv fails.
# Compiled to bytecode at install, as pip does: where PYTHONDONTWRITEBYTECODE is set nothing else
# would, and every start of TensorFlow would compile it again (20 s instead of 9 here).
$(VENV)/.installed: pyproject.toml setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet uv && $(PY) -m uv pip install --quiet --compile-bytecode \
		--python $(PY) -e ".[test,cluster]" || $(PY) -m pip install --quiet -e ".[test,cluster]"
	touch $@

test: install
	$(PY) -m ruff check kdsb tests benchmarks scripts
	$(PY) -m pytest $(TEST_WORKERS) $(PYTEST_ARGS)

lint: install
	$(PY) -m ruff check kdsb tests benchmarks scripts

demo: install
	$(VENV)/bin/kdsb demo $(DEMO_DIR)

bench: install
	$(PY) benchmarks/preprocess.py
	$(PY) benchmarks/train_gmcae.py
	$(PY) benchmarks/patch_pipeline.py

clean:
	rm -rf $(VENV) $(DEMO_DIR) .pytest_cache .ruff_cache *.egg-info
