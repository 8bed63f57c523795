# make run: set up, then serve (for now: describe) the bundled model.  make test: set up, then run the tests.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
export OMP_WAIT_POLICY ?= PASSIVE

.PHONY: setup run test lint bench clean

setup: $(STAMP)

# torch first, pinned: an unpinned resolve would pull a multi-GB CUDA build.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

run: setup
	$(VENV)/bin/openr2 info $(or $(MODEL),deepseek-v3)

test: setup
	$(PY) -m pytest -q

lint: setup
	$(VENV)/bin/ruff check openr2 tests bench

bench: setup
	$(PY) bench/forward.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
