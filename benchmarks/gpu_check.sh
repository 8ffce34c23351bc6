#!/usr/bin/env bash
# The GPU path in one prepared run (about 5-8 minutes on one GPU):
#   (a) training images/s and peak memory, fp32 vs bf16 autocast + channels_last, FPN-se_resnext50_32x4d
#       and Unet-resnet34 at 256x512 crops, batch 16 and 32 (benchmarks/bench_train.py), and the
#       full-size 256x1600 fine-tuning step's peak memory at batch 2-8 (severstal.yaml's finetune_batch_size);
#   (b) DataLoader images/s with 0/4/8 workers beside the GPU step rate (same script);
#   (c) a two-trial search on a synthetic 256x1600 set with --gpus-per-trial 0.5 (two trials share the GPU)
#       that completes, writes its pool and blends;
#   (d) predict on CUDA over the synthetic test images, images/s.
#
# Usage: benchmarks/gpu_check.sh [--dry-run]
#   --dry-run  (any machine, no GPU): checks the script's syntax and that every option each command
#              uses is one its CLI accepts (from the CLI's --help); runs nothing heavy.
# Env: PY (default .venv/bin/python), GPU_CHECK_DIR (default runs/gpu_check; emptied first).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
DIR=${GPU_CHECK_DIR:-runs/gpu_check}
DRY=0
[ "${1:-}" = "--dry-run" ] && DRY=1

# check CMD...: every --option of the command line appears in the CLI's --help
check() {
  local help
  help=$("$@" --help 2>&1) || { echo "FAIL: $* --help exited non-zero"; return 1; }
  for tok in "$@"; do
    case "$tok" in
      --*) grep -q -- "${tok%%=*}" <<<"$help" || { echo "FAIL: option $tok is not accepted by: $*"; return 1; } ;;
    esac
  done
  echo "ok: $*"
}

# step NAME CMD...: dry run checks it, a real run times it
step() {
  local name=$1; shift
  if [ "$DRY" = 1 ]; then check "$@"; return; fi
  echo; echo "== $name: $*"
  local t0=$SECONDS
  "$@"
  echo "== $name took $((SECONDS - t0)) s"
}

if [ "$DRY" = 0 ]; then
  "$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA GPU visible'; print('GPU:', torch.cuda.get_device_name(0), '| torch', torch.__version__)"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  rm -rf "$DIR"
fi

step "(a)+(b) training and loader rates, full-size fine-tune memory" \
  "$PY" benchmarks/bench_train.py --steps 10 --batch-sizes 16,32 --workers 0,4,8 --skip-oof --finetune-batch-sizes 2,3,4,8
step "synthetic 256x1600 set" \
  "$PY" -m steel_ray.synth "$DIR/data" --n-train 64 --n-test 32 --height 256 --width 1600 --seed 0
# the GPU machine has no internet: the space's ImageNet weights cannot be fetched there
mkdir -p "$DIR"
sed 's/^  encoder_weights: imagenet/  encoder_weights: null/' search_spaces/severstal.yaml >"$DIR/severstal_offline.yaml"
step "(c) two trials sharing the GPU" \
  "$PY" -m steel_ray.search --space "$DIR/severstal_offline.yaml" --data "$DIR/data" --out "$DIR/run" --folds 2 \
  --num-samples 2 --top 1 --smoke --gpus-per-trial 0.5 --cpus-per-trial 4 --max-concurrent 2
if [ "$DRY" = 0 ]; then
  "$PY" - "$DIR/run" <<'EOF'
import sys, pandas as pd
from steel_ray import oof
run = sys.argv[1]
r = pd.read_parquet(f"{run}/results.parquet")
print(r[["stage", "model_id", "fold", "status", "best_val_dice_pp", "gpu_ids", "wall_s"]].to_string(index=False))
print("pool:", oof.list_pool(run))
assert (r.status != "ERROR").all(), "a trial failed"
EOF
fi
step "(d) predict on CUDA" \
  "$PY" -m steel_ray.predict --run "$DIR/run" --images "$DIR/data/test_images" --out "$DIR/submission.csv" \
  --device cuda --batch-size 16
if [ "$DRY" = 0 ]; then
  n=$(ls "$DIR/data/test_images" | wc -l)
  t0=$(date +%s.%N)
  "$PY" -m steel_ray.predict --run "$DIR/run" --images "$DIR/data/test_images" --out "$DIR/submission2.csv" \
    --device cuda --batch-size 16 >/dev/null
  t1=$(date +%s.%N)
  "$PY" -c "print(f'predict: {$n} images in {$t1 - $t0:.1f} s (process start and model loading included): {$n / ($t1 - $t0):.1f} images/s')"
  "$PY" -m steel_ray.score --truth "$DIR/data/test_labels.csv" --pred "$DIR/submission.csv" --images "$DIR/data/test_images"
fi
echo; echo "gpu_check: done$([ "$DRY" = 1 ] && echo ' (dry run)')"
