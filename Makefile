# make run: set up, then serve the demo model (chat page + API on 127.0.0.1:8000).  make test: set up, then test.
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

# Until the trained demo model is bundled (openr2/assets/openr2-demo), `make run` serves an untrained placeholder.
BUNDLED := openr2/assets/openr2-demo
PLACEHOLDER := .cache/demo-untrained
DEMO := $(if $(wildcard $(BUNDLED)/config.json),$(BUNDLED),$(PLACEHOLDER))

$(PLACEHOLDER)/config.json: | $(STAMP)
	$(VENV)/bin/openr2 init-demo $(PLACEHOLDER)

run: setup $(if $(MODEL),,$(DEMO)/config.json)
	$(VENV)/bin/openr2 serve --model $(or $(MODEL),$(DEMO)) --served-model-name openr2-demo --host 127.0.0.1 --port 8000

test: setup
	$(PY) -m pytest -q

lint: setup
	$(VENV)/bin/ruff check openr2 tests bench

bench: setup
	$(PY) bench/forward.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
