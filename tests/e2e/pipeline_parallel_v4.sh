#!/usr/bin/env bash
# Pipeline parallelism on the tiny V4 model (5 layers of every attention type, hash and score-routed MoE, mHC,
# MTP), Muon + AdamW, 20 steps of 4 micro-batches: `mpirun -np N tessera train` with parallel.pp = 2 reproduces the
# single-process run on the same global batch bitwise (per-step losses, MTP losses, held-out losses, gradient norms,
# expert loads and the final checkpoint: weights, balancing biases, AdamW moments, Muon momenta): PP2, dp=2 x pp=2,
# and pp=2 with expert parallelism (dp=2 x pp=2 x ep=2, zero1). The stages exchange the mHC streams and the MTP's
# embedding rows and recompute a forward whose backward comes later. A run stopped at step 10 under pp=2 x ep=2
# resumes at one process and at dp=4 x ep=4, each ending on the uninterrupted run. The balance loss is summed over the stages' layers (in
# another order than one process sums them), so it is compared within 1e-12.
set -euo pipefail
source "$(dirname "$0")/common.sh"
require_h5py
mpi_env
layout_test_start v4-tiny
KEYS=(loss val_loss grad_norm mtp_loss expert_load_max_over_mean swiglu_input_max_abs router_logit_max)

for layout in "2 1 2 1 false" "4 2 2 1 false" "4 2 2 2 true"; do
  read -r np dp pp ep zero1 <<< "$layout"
  name="dp$dp-pp$pp-ep$ep-zero1-$zero1"
  train_in_layout "$name" $np "pipeline over 2 stages, 1F1B (balanced by FLOPs): stage 0 holds layers \[0, 3) and the embedding" \
    parallel.dp=$dp parallel.pp=$pp parallel.ep=$ep parallel.zero1=$zero1
  same_metrics "$name" "$WORK/one" "$WORK/$name" $STEPS send "${KEYS[@]}"
  RTOL=1e-12 same_metrics "$name balance_loss" "$WORK/one" "$WORK/$name" $STEPS send balance_loss
  "$PY" "$CKPT_EQUAL" "$WORK/one/$FINAL" "$WORK/$name/$FINAL" || check_failed "$name: final checkpoint differs"
done

resume_in_layout pp2ep2-to-1 "$WORK/model.toml" "$WORK/one/$FINAL" "4 parallel.dp=2 parallel.pp=2 parallel.ep=2" \
  "1 parallel.dp=1 parallel.pp=1 parallel.ep=1"
resume_in_layout pp2ep2-to-dp4ep4 "$WORK/model.toml" "$WORK/one/$FINAL" "4 parallel.dp=2 parallel.pp=2 parallel.ep=2" \
  "4 parallel.dp=4 parallel.pp=1 parallel.ep=4"

step "recipe errors"
expect_fail v4_pp_anticipatory "parallel.pp = 2 does not work with routing.anticipatory = \"always\" yet" -- \
  mpirun --oversubscribe -np 2 "$TESSERA" train "$WORK/model.toml" --set parallel.dp=1 parallel.pp=2 \
  routing.anticipatory=always job.run_dir="$WORK/v4ar"
finish
