#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment in .venv and install
# contrastkit with its test and benchmark extras. Needs only python3 (>= 3.10).
# torch is installed first and pinned, so that the range in pyproject.toml is
# already met and pip does not fetch another build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
    .venv/bin/python -m pip install --quiet "torch==2.13.0"
fi
.venv/bin/python -m pip install --quiet -e ".[dev]"
