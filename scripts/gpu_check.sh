#!/usr/bin/env bash
# One prepared GPU check (about 5-8 minutes on one GPU), for a machine lent with CUDA.
# Uses that machine's own python3 (torch with CUDA, transformers, sentence-transformers,
# pytest and hypothesis preinstalled; no registry reachable), installs contrastkit
# without dependencies, then:
#   1. the test suite with CUDA tests enabled (tests/test_cuda.py: every objective on CUDA
#      vs a float64 CPU reference in float64 / float32 / bfloat16, the tile chooser's CUDA
#      path, bf16 encoding), plus the rest of the suite;
#   2. contrastkit bench loss --device cuda at 4,096 / 65,536 / 262,144 against the naive
#      formula (which runs out of memory at the largest sizes: reported, not an error).
# Results go to $OUT (the device tool's output folder) or results/gpu_check/.
#   run:  bash scripts/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-results/gpu_check}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
{ date; nvidia-smi; "$PY" -c "import torch; print(torch.__version__, torch.cuda.get_device_name(0))"; } > "$OUT/env.txt" 2>&1
"$PY" -m pip install --no-deps --no-build-isolation -e . > "$OUT/install.log" 2>&1 || echo "install failed (see install.log)"
echo "== CUDA tests" | tee "$OUT/summary.txt"
timeout 150 "$PY" -m pytest -q -p no:cacheprovider tests/test_cuda.py > "$OUT/pytest_cuda.txt" 2>&1
echo "exit $? : $(tail -1 "$OUT/pytest_cuda.txt")" | tee -a "$OUT/summary.txt"
echo "== whole suite" | tee -a "$OUT/summary.txt"
timeout 150 "$PY" -m pytest -q -p no:cacheprovider -x --ignore=tests/test_cuda.py --ignore=tests/test_bench_train.py \
    tests > "$OUT/pytest_all.txt" 2>&1
echo "exit $? : $(tail -1 "$OUT/pytest_all.txt")" | tee -a "$OUT/summary.txt"
echo "== bench loss on CUDA" | tee -a "$OUT/summary.txt"
timeout 150 "$PY" -m contrastkit bench loss --device cuda --sizes 4096 65536 262144 --objective info_nce \
    --json "$OUT/bench_loss_cuda.json" > "$OUT/bench_loss_cuda.txt" 2>&1
echo "exit $?" | tee -a "$OUT/summary.txt"
tail -30 "$OUT/bench_loss_cuda.txt" | tee -a "$OUT/summary.txt"
