#!/usr/bin/env bash
# The GPU check of issue 16 (bench/gpu.py says what it measures). On a lent GPU machine:
#   bash bench/gpu.sh            # installs the project if needed, then runs the check (under 8 minutes)
#   bash bench/gpu.sh --dry      # the same script on the CPU with a tiny model (the test suite runs this)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
if [ ! -x "$PY" ]; then
  python3 -m venv .venv && .venv/bin/pip install -q torch==2.13.0 && .venv/bin/pip install -q -e .
  PY=.venv/bin/python
fi
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}
exec "$PY" bench/gpu.py "$@"
