#!/usr/bin/env bash
# Runs the whole pytest suite inside .venv. GLUE files are read from $GLUE_DIR (default ../shared/data/glue).
set -euo pipefail
cd "$(dirname "$0")/.."
export GLUE_DIR="${GLUE_DIR:-$(cd .. && pwd)/shared/data/glue}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
exec .venv/bin/python -m pytest -n "${PYTEST_WORKERS:-2}" --dist loadfile -ra "$@" tests
