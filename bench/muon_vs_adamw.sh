#!/usr/bin/env bash
# Muon against AdamW on the tiny dense and tiny V4 models (issue 5; docs/optimizer.md, "Muon against AdamW").
# For each model and optimizer: a small log-spaced learning-rate sweep at equal tokens per step; the best lr of
# each optimizer is the one with the lowest final val_loss; then bench/muon_vs_adamw.py reports the first step at
# which the best Muon run's val_loss reaches the best AdamW run's final val_loss (linear interpolation between
# evaluation points), as a fraction of AdamW's steps, and draws docs/img/muon-vs-adamw-<model>.png.
# Usage (from the repository root): bench/muon_vs_adamw.sh [runs-root]   (default runs/muon-vs-adamw)
# A run whose metrics.jsonl already reaches its last step is reused, so the script can be restarted.
set -euo pipefail
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-passive} OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
ROOT=${1:-runs/muon-vs-adamw}
BIN=${TESSERA:-build/bin/tessera}
PY=${PYTHON:-.venv/bin/python}
mkdir -p "$ROOT"

# model | recipe | steps | --set overrides (batch, seq, warmup, eval) | lr grid
DENSE_RECIPE=bench/muon_vs_adamw.dense-tiny.toml
DENSE_STEPS=200
DENSE_SET="training.batch_size=16 training.seq_len=64 lr_scheduler.warmup_steps=20 eval.every=10 eval.batches=16 checkpoint.every=0 metrics.log_every=100"
DENSE_LRS="1e-3 3e-3 1e-2 3e-2 1e-1"

V4_RECIPE=recipes/pretrain/shakespeare-v4-tiny.toml
V4_STEPS=80
V4_SET="training.batch_size=4 training.seq_len=64 lr_scheduler.warmup_steps=8 eval.every=8 eval.batches=16 checkpoint.every=0 metrics.log_every=40"
V4_LRS="1e-3 3e-3 1e-2 3e-2"

run_one() {  # model recipe steps "set" opt lr
  local model=$1 recipe=$2 steps=$3 set=$4 opt=$5 lr=$6
  local dir="$ROOT/$model-$opt-lr$lr"
  if [[ -f $dir/metrics.jsonl ]] && grep -q "\"step\": $steps," "$dir/metrics.jsonl"; then
    echo "reuse $dir"; return
  fi
  rm -rf "$dir"
  echo "$(date -u +%H:%M:%S) $BIN train $recipe --run-dir $dir --set training.steps=$steps $set optimizer.name=$opt optimizer.lr=$lr"
  # shellcheck disable=SC2086
  "$BIN" train "$recipe" --run-dir "$dir" --set training.steps=$steps $set optimizer.name=$opt optimizer.lr=$lr \
    > "$ROOT/$model-$opt-lr$lr.log" 2>&1 || echo "FAILED (see $ROOT/$model-$opt-lr$lr.log)"
}

ONLY=${ONLY:-"dense-tiny v4-tiny"}
for model in $ONLY; do
  case $model in
    dense-tiny) R=$DENSE_RECIPE S=$DENSE_STEPS SET=$DENSE_SET LRS=$DENSE_LRS ;;
    v4-tiny)    R=$V4_RECIPE    S=$V4_STEPS    SET=$V4_SET    LRS=$V4_LRS ;;
  esac
  for opt in adamw muon; do
    for lr in $LRS; do run_one "$model" "$R" "$S" "$SET" "$opt" "$lr"; done
  done
done
"$PY" bench/muon_vs_adamw.py "$ROOT" $ONLY
