#!/usr/bin/env bash
# Set up the environment and run contrastkit's main job on its bundled defaults.
# Until the text pipeline lands, the main job is the loss-engine benchmark.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/contrastkit bench loss "$@"
