#!/usr/bin/env bash
# Tensor parallelism end to end on the tiny dense model, Muon + AdamW, 20 steps of 4 micro-batches: `mpirun -np N
# tessera train` with parallel.tp = 2 reproduces the single-process run on the same global batch within a relative
# 1e-4 (per-step losses, held-out losses, gradient norms and every tensor of the final checkpoint: weights, AdamW
# moments, Muon momenta): TP2, TP2 x PP2, DP2 x TP2 x PP2, and DP2 x TP2 with the optimizer state sharded
# (parallel.zero1). Row-parallel products are summed over the ranks in another order than one GEMM sums them, so
# the runs agree to rounding, not bitwise. A run stopped at step 10 under TP2 x PP2 resumes at one process, and the
# one-process checkpoint resumes at DP2 x TP2, each ending on the uninterrupted run. Then the recipe errors.
set -euo pipefail
source "$(dirname "$0")/common.sh"
require_h5py
mpi_env
RTOL=1e-4
layout_test_start dense-tiny

for layout in "2 1 2 1 false" "4 1 2 2 false" "8 2 2 2 false" "4 2 2 1 true"; do
  read -r np dp tp pp zero1 <<< "$layout"
  name="dp$dp-tp$tp-pp$pp-zero1-$zero1"
  train_in_layout "$name" $np "tensor parallel over 2 ranks: this rank holds 2 of the 4 attention heads, 96 of the 192 MLP hidden units" \
    parallel.dp=$dp parallel.tp=$tp parallel.pp=$pp parallel.zero1=$zero1
  same_metrics "$name" "$WORK/one" "$WORK/$name" $STEPS all_reduce loss val_loss grad_norm
  "$PY" "$CKPT_EQUAL" "$WORK/one/$FINAL" "$WORK/$name/$FINAL" --rtol $RTOL || check_failed "$name: final checkpoint differs"
done

resume_in_layout tp2pp2-to-1 "$WORK/model.toml" "$WORK/one/$FINAL" "4 parallel.dp=1 parallel.tp=2 parallel.pp=2" \
  "1 parallel.dp=1 parallel.tp=1 parallel.pp=1"
resume_in_layout 1-to-dp2tp2 "$WORK/model.toml" "$WORK/one/$FINAL" "1 parallel.dp=1" "4 parallel.dp=2 parallel.tp=2"

step "recipe errors"
expect_fail indivisible_kv_heads "model.toml: tensor parallelism: model.n_kv_heads (2) must be a multiple of parallel.tp (4)" -- \
  mpirun --oversubscribe -np 4 "$TESSERA" train "$WORK/model.toml" --set parallel.dp=1 parallel.tp=4 \
  job.run_dir="$WORK/tp4"
expect_fail tp_qat "parallel.tp = 2 does not work with training.qat yet" -- \
  mpirun --oversubscribe -np 2 "$TESSERA" train "$WORK/model.toml" --set parallel.dp=1 parallel.tp=2 \
  training.qat=fp8 job.run_dir="$WORK/tpqat"
finish
