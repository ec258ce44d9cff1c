#!/usr/bin/env bash
# Expert parallelism end to end on the tiny V4 model (8 routed experts), Muon + AdamW, 20 steps of 4 micro-batches:
# `mpirun -np N tessera train` with parallel.ep reproduces the single-process run on the same global batch bitwise
# (per-step losses, held-out losses, gradient norms, balance statistics, and the final checkpoint: weights, AdamW
# moments, Muon momenta, balancing biases): EP2 (2 ranks, 4 experts each), EP4 (4 ranks, 2 experts each) and
# dp=4 x ep=2 (two expert-data-parallel replicas of EP2), also with parallel.zero1 (the replicated parameters'
# optimizer state sharded over the 4 ranks, the experts' over the 2 ranks holding the same experts). Checkpoints
# hold the whole expert stacks, so a run stopped at step 10 resumes in another layout (EP2 -> one process, one
# process -> EP4, dp=4 x ep=2 with zero1 -> EP2), each ending bitwise on the uninterrupted run. Then in 12 steps:
# anticipatory routing (always, and on_spike with a forced rollback) under EP2 equals one process, routing state
# files included, and that state resumes at one process; so does quantisation-aware training. Then the recipe
# errors.
set -euo pipefail
source "$(dirname "$0")/common.sh"
require_h5py
mpi_env
layout_test_start v4-tiny
KEYS=(loss val_loss grad_norm mtp_loss balance_loss expert_load_max_over_mean)

for layout in "2 2 2 false" "4 4 4 false" "4 4 2 false" "4 4 2 true"; do
  read -r np dp ep zero1 <<< "$layout"
  name="dp$dp-ep$ep-zero1-$zero1"
  train_in_layout "$name" $np "expert parallel over $ep ranks: this rank holds $((8 / ep)) of the 8 routed experts" \
    parallel.dp=$dp parallel.ep=$ep parallel.zero1=$zero1
  same_metrics "$name" "$WORK/one" "$WORK/$name" $STEPS all_to_all "${KEYS[@]}"
  "$PY" "$CKPT_EQUAL" "$WORK/one/$FINAL" "$WORK/$name/$FINAL" || check_failed "$name: final checkpoint differs"
done

resume_in_layout ep2-to-1 "$WORK/model.toml" "$WORK/one/$FINAL" "2 parallel.dp=2 parallel.ep=2" "1 parallel.dp=1 parallel.ep=1"
resume_in_layout 1-to-ep4 "$WORK/model.toml" "$WORK/one/$FINAL" "1 parallel.dp=1 parallel.ep=1" "4 parallel.dp=4 parallel.ep=4"
resume_in_layout zero1-to-ep2 "$WORK/model.toml" "$WORK/one/$FINAL" "4 parallel.dp=4 parallel.ep=2 parallel.zero1=true" \
  "2 parallel.dp=2 parallel.ep=2"

# The rest in 12 steps (checkpoints every 6): the test runs on 2 cores.
STEPS=12
FINAL=checkpoints/step_$(printf %08d $STEPS).h5
SETS=(--set "training.steps=$STEPS" training.batch_size=2 training.grad_accum=4 checkpoint.every=6 eval.every=6
      eval.batches=2 optimizer.name=muon)

step "anticipatory routing (always, dt = 2) and a forced loss spike (on_spike) under EP2, against one process"
AR_SETS=(routing.anticipatory=always routing.dt=2)
SPIKE_SETS=(routing.anticipatory=on_spike routing.force_spike_at=7 routing.snapshot_every=2 routing.ar_steps=2)
for mode in ar spike; do
  if [[ $mode == ar ]]; then extra=("${AR_SETS[@]}"); else extra=("${SPIKE_SETS[@]}"); fi
  "$TESSERA" train "$WORK/model.toml" "${SETS[@]}" "${extra[@]}" job.run_dir="$WORK/$mode-one" \
    2> "$WORK/$mode-one.log" || { cat "$WORK/$mode-one.log" >&2; fail "$mode: the one-process run failed"; }
  mpirun --oversubscribe -np 2 "$TESSERA" train "$WORK/model.toml" "${SETS[@]}" "${extra[@]}" parallel.ep=2 \
    job.run_dir="$WORK/$mode-ep2" 2> "$WORK/$mode-ep2.log" || { cat "$WORK/$mode-ep2.log" >&2; fail "$mode: EP2 failed"; }
  same_metrics "$mode ep2" "$WORK/$mode-one" "$WORK/$mode-ep2" $STEPS all_to_all "${KEYS[@]}"
  "$PY" "$CKPT_EQUAL" "$WORK/$mode-one/$FINAL" "$WORK/$mode-ep2/$FINAL" || check_failed "$mode: final checkpoint differs"
  cmp -s "$WORK/$mode-one/${FINAL%.h5}.routing" "$WORK/$mode-ep2/${FINAL%.h5}.routing" \
    || check_failed "$mode: the routing state files differ"
done
grep -q "loss spike at step 7: .*rolling back to step" "$WORK/spike-ep2.log" || check_failed "spike: no rollback under EP2"
# The routing state written under EP2 (its parameter hash over the whole stacks) is used when resuming at one process.
mpirun --oversubscribe -np 2 "$TESSERA" train "$WORK/model.toml" "${SETS[@]}" "${AR_SETS[@]}" parallel.ep=2 \
  job.run_dir="$WORK/ar-resume" --stop-after 6 2> "$WORK/ar-resume-a.log" || fail "ar resume: first part failed"
"$TESSERA" train --resume "$WORK/ar-resume" --set parallel.dp=1 parallel.ep=1 2> "$WORK/ar-resume-b.log" \
  || { cat "$WORK/ar-resume-b.log" >&2; fail "ar resume: resumed part failed"; }
grep -q "anticipatory routing: state restored from .*step_00000006.routing" "$WORK/ar-resume-b.log" \
  || check_failed "ar resume: the EP2 routing state was not restored at one process"
"$PY" "$CKPT_EQUAL" "$WORK/ar-one/$FINAL" "$WORK/ar-resume/$FINAL" || check_failed "ar resume: final checkpoint differs"

step "quantisation-aware training (training.qat = fp4_fp8) under EP2 equals one process: blocks lie within an expert"
for n in 1 2; do
  mpirun --oversubscribe -np $n "$TESSERA" train "$WORK/model.toml" "${SETS[@]}" training.qat=fp4_fp8 parallel.dp=$n \
    parallel.ep=$n job.run_dir="$WORK/qat-$n" 2> "$WORK/qat-$n.log" || { cat "$WORK/qat-$n.log" >&2; fail "qat at $n failed"; }
done
"$PY" "$CKPT_EQUAL" "$WORK/qat-1/$FINAL" "$WORK/qat-2/$FINAL" || check_failed "qat: EP2 ends elsewhere than one process"

step "recipe errors"
TINY="$REPO/recipes/models/dense-tiny.toml" write_recipe "$WORK/dense.toml" "$WORK/corpus.txt" "$WORK/unused"
expect_fail dense_ep "parallel.ep = 2 does not work with model.arch = \"dense\" yet (it has no routed experts)" -- \
  mpirun --oversubscribe -np 2 "$TESSERA" train "$WORK/dense.toml" --set parallel.ep=2 job.run_dir="$WORK/dense"
expect_fail experts_divide "model.n_routed_experts (8) must be a multiple of parallel.ep (3)" -- \
  mpirun --oversubscribe -np 3 "$TESSERA" train "$WORK/model.toml" --set parallel.ep=3 training.grad_accum=3 \
  job.run_dir="$WORK/three"
finish
