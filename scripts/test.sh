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
# the 25 slowest listed (what to look at when CI nears its 20 minutes)
python -m pytest -q -n auto --dist worksteal --durations=25 "$@"
