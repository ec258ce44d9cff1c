#!/usr/bin/env bash
# Pipeline parallelism end to end on the tiny dense model (2 layers), Muon + AdamW, 20 steps of 4 micro-batches:
# `mpirun -np N tessera train` with parallel.pp = 2 (1F1B) reproduces the single-process run on the same global
# batch bitwise (per-step losses, held-out losses, gradient norms and the final checkpoint: weights, AdamW moments,
# Muon momenta), alone (PP2, 4 micro-batches through 2 stages) and with data parallelism (dp=2 x pp=2, also with the
# optimizer state sharded over each stage's data-parallel ranks: parallel.zero1). A run
# stopped at step 10 under PP2 resumes at one process, and the one-process checkpoint resumes at dp=2 x pp=2, each
# ending bitwise on the uninterrupted run; so does quantisation-aware training. The interleaved schedule
# (parallel.vpp = 2, a 4-layer model in 4 virtual stages) equals one process bitwise alone and with dp = 2 and
# zero1, and its checkpoint resumes under plain 1F1B. Then the recipe errors.
set -euo pipefail
source "$(dirname "$0")/common.sh"
require_h5py
mpi_env
layout_test_start dense-tiny

for layout in "2 1 2 false" "4 2 2 false" "4 2 2 true"; do
  read -r np dp pp zero1 <<< "$layout"
  name="dp$dp-pp$pp-zero1-$zero1"
  train_in_layout "$name" $np "pipeline over $pp stages, 1F1B (balanced by FLOPs): stage 0 holds layers \[0, 1) and the embedding" \
    parallel.dp=$dp parallel.pp=$pp parallel.zero1=$zero1
  same_metrics "$name" "$WORK/one" "$WORK/$name" $STEPS send loss val_loss grad_norm
  "$PY" "$CKPT_EQUAL" "$WORK/one/$FINAL" "$WORK/$name/$FINAL" || check_failed "$name: final checkpoint differs"
done

resume_in_layout pp2-to-1 "$WORK/model.toml" "$WORK/one/$FINAL" "2 parallel.dp=1 parallel.pp=2" "1 parallel.dp=1 parallel.pp=1"
resume_in_layout 1-to-dp2pp2 "$WORK/model.toml" "$WORK/one/$FINAL" "1 parallel.dp=1 parallel.pp=1" \
  "4 parallel.dp=2 parallel.pp=2"

# Interleaved 1F1B (parallel.vpp = 2) needs 4 layers for 2 x 2 virtual stages: a 4-layer one-process run first.
SETS+=(model.n_layers=4)
step "a 4-layer model in one process, for the interleaved schedule"
"$TESSERA" train "$WORK/model.toml" "${SETS[@]}" job.run_dir="$WORK/one4" 2> "$WORK/one4.log" \
  || { cat "$WORK/one4.log" >&2; fail "the 4-layer single-process run failed"; }
for layout in "2 1 false" "4 2 true"; do
  read -r np dp zero1 <<< "$layout"
  name="vpp2-dp$dp-zero1-$zero1"
  train_in_layout "$name" $np "pipeline over 2 stages x 2 virtual stages, interleaved 1F1B (balanced by FLOPs): rank 0 holds layers \[0, 1) \[2, 3) and the embedding" \
    parallel.dp=$dp parallel.pp=2 parallel.vpp=2 parallel.zero1=$zero1
  same_metrics "$name" "$WORK/one4" "$WORK/$name" $STEPS send loss val_loss grad_norm
  "$PY" "$CKPT_EQUAL" "$WORK/one4/$FINAL" "$WORK/$name/$FINAL" || check_failed "$name: final checkpoint differs"
done
resume_in_layout vpp2-to-pp2 "$WORK/model.toml" "$WORK/one4/$FINAL" "2 parallel.dp=1 parallel.pp=2 parallel.vpp=2" \
  "2 parallel.dp=1 parallel.pp=2 parallel.vpp=1"
expect_fail vpp_micro_batches "training.grad_accum / parallel.dp (3 micro-batches per pipeline) must be a multiple of parallel.pp (2)" -- \
  mpirun --oversubscribe -np 2 "$TESSERA" train "$WORK/model.toml" "${SETS[@]}" parallel.dp=1 parallel.pp=2 \
  parallel.vpp=2 training.grad_accum=3 job.run_dir="$WORK/vpp3"
SETS=("${SETS[@]:0:${#SETS[@]}-1}")  # back to the 2-layer model

step "quantisation-aware training (training.qat = fp8) at pp=2 equals one process"
for n in 1 2; do
  mpirun --oversubscribe -np $n "$TESSERA" train "$WORK/model.toml" "${SETS[@]}" training.qat=fp8 parallel.dp=1 \
    parallel.pp=$n job.run_dir="$WORK/qat-$n" 2> "$WORK/qat-$n.log" || { cat "$WORK/qat-$n.log" >&2; fail "qat at $n failed"; }
done
"$PY" "$CKPT_EQUAL" "$WORK/qat-1/$FINAL" "$WORK/qat-2/$FINAL" || check_failed "qat: PP2 ends elsewhere than one process"

step "recipe errors"
expect_fail too_many_stages "parallel.pp (4) must not exceed model.n_layers (2)" -- \
  mpirun --oversubscribe -np 4 "$TESSERA" train "$WORK/model.toml" --set parallel.dp=1 parallel.pp=4 \
  job.run_dir="$WORK/pp4"
expect_fail pp_layers_sum "parallel.pp_layers has 2 stage(s) of 3 layers in all; it needs parallel.pp (2) entries summing to model.n_layers (2)" -- \
  mpirun --oversubscribe -np 2 "$TESSERA" train "$WORK/model.toml" --set parallel.dp=1 parallel.pp=2 \
  "parallel.pp_layers=[2, 1]" job.run_dir="$WORK/pplayers"
finish
