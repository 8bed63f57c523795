# make run: set up, then serve the demo model (chat page + API on 127.0.0.1:8000).  make test: set up, check the
# import layers (lint-imports, contracts in pyproject.toml), then test.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
export OMP_WAIT_POLICY ?= PASSIVE

.PHONY: setup run test lint imports bench bench-deps clean

setup: $(STAMP)

# torch first, pinned: an unpinned resolve would pull a multi-GB CUDA build.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

# make run serves the bundled demo model (openr2/assets/openr2-demo); without it, an untrained placeholder.
BUNDLED := openr2/assets/openr2-demo
PLACEHOLDER := .cache/demo-untrained
DEMO := $(if $(wildcard $(BUNDLED)/config.json),$(BUNDLED),$(PLACEHOLDER))

$(PLACEHOLDER)/config.json: | $(STAMP)
	$(VENV)/bin/openr2 init-demo $(PLACEHOLDER)

run: setup $(if $(MODEL),,$(DEMO)/config.json)
	$(VENV)/bin/openr2 serve --model $(or $(MODEL),$(DEMO)) --served-model-name openr2-demo --host 127.0.0.1 --port 8000

test: imports
	$(PY) -m pytest -q

# the one-way layers and forbidden imports of [tool.importlinter] (function-level imports count)
imports: setup
	$(VENV)/bin/lint-imports

lint: imports
	$(VENV)/bin/ruff check openr2 tests bench

bench: setup
	$(PY) bench/forward.py

# llama-cpp-python (and its server, the gateway's llama.cpp upstream test) for the llama.cpp agreement tests and
# bench/gguf.py (those tests skip without it).
# It compiles llama.cpp from source (~10 min on 2 cores, once; pip's cache serves it after that) with the
# multimodal library and the tools turned off, as nothing here uses them. Its dependencies are light
# (numpy, jinja2, diskcache, typing-extensions); torch is not among them.
LLAMA_CPP_CMAKE_ARGS := -DLLAVA_BUILD=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=OFF

bench-deps: setup
	CMAKE_ARGS="$(LLAMA_CPP_CMAKE_ARGS)" CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) $(PY) -m pip install 'llama-cpp-python[server]==0.3.36'

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .import_linter_cache .grimp_cache
