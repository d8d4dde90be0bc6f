#!/usr/bin/env bash
# Set up the environment and run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# The report's test renders report.html in a real headless browser (Debian's chromium).
# Installed here when this machine can (root with apt-get); otherwise that one test says
# it is skipped and why.
if ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -q chromium >/dev/null 2>&1 \
        || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q chromium >/dev/null 2>&1; } \
        || echo "note: could not install chromium; the headless-browser check of report.html will be skipped"
fi
exec .venv/bin/python -m pytest -q "$@"
