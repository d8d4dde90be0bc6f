#!/usr/bin/env bash
# Set up the environment and run contrastkit's main job on its bundled defaults:
# fine-tune all-MiniLM-L6-v2 on the bundled SciFact and report test nDCG@10 before and
# after (with a paired bootstrap interval) and STS-B as a forgetting guard.
# Results go to a fresh folder under runs/ (pass --output DIR, or any `contrastkit train` flag).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/contrastkit train "$@"
