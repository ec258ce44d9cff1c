#!/usr/bin/env bash
# Data parallelism end to end: `mpirun -np N tessera train` with parallel.dp = N reproduces the single-process run
# on the same global batch (DESIGN.md's invariant) bitwise: per-step losses, held-out losses and the final
# checkpoint (weights, AdamW moments, Muon momenta, V4 balancing biases), for the dense and the tiny V4 model with
# Muon + AdamW, 20 steps of 4 micro-batches (parallel/data_parallel.h: micro-batch gradients are summed as a
# pairwise tree, in one process and over the ranks alike). DP2 for both models, DP4 for the dense one, with and
# without the sharded optimizer (parallel.zero1: ZeRO-1 by whole parameters, distributed Muon). Then the
# recipe errors: micro-batches that do not split over the ranks, and a layout that does not match the world size.
set -euo pipefail
source "$(dirname "$0")/common.sh"
require_h5py
mpi_env
MPIRUN=(mpirun --oversubscribe -np 2)
STEPS=20
make_corpus "$WORK/corpus.txt" 400

compare_runs() {  # NAME SINGLE_DIR PARALLEL_DIR
  same_metrics "$1" "$2" "$3" $STEPS all_reduce loss val_loss grad_norm mtp_loss balance_loss expert_load_max_over_mean
  local final=checkpoints/step_$(printf %08d $STEPS).h5
  "$PY" "$CKPT_EQUAL" "$2/$final" "$3/$final" || check_failed "$1: final checkpoints differ"
}

for model in dense v4; do
  TINY="$REPO/recipes/models/$([[ $model == dense ]] && echo dense-tiny || echo v4-tiny).toml"
  write_recipe "$WORK/$model.toml" "$WORK/corpus.txt" "$WORK/unused"
  SETS=(--set "training.steps=$STEPS" training.batch_size=2 training.grad_accum=4 checkpoint.every=$STEPS
        eval.every=10 eval.batches=2 optimizer.name=muon)
  step "$model: $STEPS steps of 4 micro-batches in one process"
  "$TESSERA" train "$WORK/$model.toml" "${SETS[@]}" job.run_dir="$WORK/$model-1" 2> "$WORK/$model-1.log" \
    || { cat "$WORK/$model-1.log" >&2; fail "$model: the single-process run failed"; }
  # dense: DP2, and DP4 with the optimizer state sharded (parallel.zero1); V4: DP2 sharded (4 V4 ranks are slow on
  # 2 cores).
  for layout in "2 false" "4 true"; do
    read -r n zero1 <<< "$layout"
    [[ $model == v4 ]] && { [[ $n == 4 ]] && continue; zero1=true; }
    step "$model: the same global batch over mpirun -np $n, parallel.dp = $n, parallel.zero1 = $zero1"
    mpirun --oversubscribe -np $n "$TESSERA" train "$WORK/$model.toml" "${SETS[@]}" job.run_dir="$WORK/$model-dp$n" \
      parallel.dp=$n parallel.zero1=$zero1 2> "$WORK/$model-dp$n.log" \
      || { cat "$WORK/$model-dp$n.log" >&2; fail "$model: the dp=$n run failed"; }
    grep -q "data parallel over $n ranks" "$WORK/$model-dp$n.log" || check_failed "$model: no data-parallel log line"
    if [[ $zero1 == true ]]; then
      grep -q "optimizer state sharded (parallel.zero1) over the $n data-parallel ranks" "$WORK/$model-dp$n.log" \
        || check_failed "$model: no sharded-optimizer log line"
    fi
    compare_runs "$model dp=$n zero1=$zero1" "$WORK/$model-1" "$WORK/$model-dp$n"
  done
done

step "dense: a run stopped at step 10 under dp=2 resumes at dp=4 (sharded optimizer) and at one process, bitwise"
TINY="$REPO/recipes/models/dense-tiny.toml"
SETS=(--set "training.steps=$STEPS" training.batch_size=2 training.grad_accum=4 checkpoint.every=10 eval.every=10
      eval.batches=2 optimizer.name=muon)
FINAL="$WORK/dense-1/checkpoints/step_$(printf %08d $STEPS).h5"
resume_in_layout resume4 "$WORK/dense.toml" "$FINAL" "2 parallel.dp=2" "4 parallel.dp=4 parallel.zero1=true"
resume_in_layout resume1 "$WORK/dense.toml" "$FINAL" "2 parallel.dp=2" "1 parallel.dp=1"

step "recipe errors under mpirun"
expect_fail odd_accum "rank" "training.grad_accum (3) must be a multiple of parallel.dp (2)" -- \
  "${MPIRUN[@]}" "$TESSERA" train "$WORK/dense.toml" --set training.grad_accum=3 job.run_dir="$WORK/odd"
expect_fail wrong_world "parallel config" "does not equal the world size 2" -- \
  "${MPIRUN[@]}" "$TESSERA" train "$WORK/dense.toml" --set parallel.dp=4 job.run_dir="$WORK/world"
finish
