#!/usr/bin/env bash
# The test command: install the project with its test extras, lint, and run pytest (Triton kernels run in
# the interpreter when there is no GPU; see tests/conftest.py).
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q torch==2.13.0
python -m pip install -q -e ".[test]"
ruff check .
ruff format --check .
# one pytest worker per core (pytest-xdist; interpreter tests are CPU-bound), the slow tests stolen by idle workers;
# the 25 slowest listed (what to look at when CI nears its 20 minutes). One intra-op thread per worker (torch's
# OpenMP pool defaults to every core in every worker: 4 threads on 2 cores, oversubscribed; 4 concurrent runs of an
# FP8 interpreter test on the 2-core VM: 46 s -> 40 s); a caller's setting is kept
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
python -m pytest -q -n auto --dist worksteal --durations=25 "$@"
