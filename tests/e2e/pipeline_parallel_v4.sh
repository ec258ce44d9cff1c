#!/usr/bin/env bash
# Pipeline parallelism on the tiny V4 model (5 layers of every attention type, hash and score-routed MoE, mHC,
# MTP), Muon + AdamW, 20 steps of 4 micro-batches: `mpirun -np N tessera train` with parallel.pp = 2 reproduces the
# single-process run on the same global batch bitwise (per-step losses, MTP losses, held-out losses, gradient norms,
# expert loads and the final checkpoint: weights, balancing biases, AdamW moments, Muon momenta): PP2, dp=2 x pp=2,
# and pp=2 with expert parallelism (dp=2 x pp=2 x ep=2, zero1). The stages exchange the mHC streams and the MTP's
# embedding rows and recompute a forward whose backward comes later. A run stopped at step 10 under pp=2 x ep=2
# resumes at one process and ends on the uninterrupted run. The balance loss is summed over the stages' layers (in
# another order than one process sums them), so it is compared within 1e-12.
set -euo pipefail
source "$(dirname "$0")/common.sh"
require_h5py
mpi_env
STEPS=20
FINAL=checkpoints/step_$(printf %08d $STEPS).h5
make_corpus "$WORK/corpus.txt" 400
TINY="$REPO/recipes/models/v4-tiny.toml"
write_recipe "$WORK/v4.toml" "$WORK/corpus.txt" "$WORK/unused"
SETS=(--set "training.steps=$STEPS" training.batch_size=2 training.grad_accum=4 checkpoint.every=10 eval.every=10
      eval.batches=2 optimizer.name=muon)
KEYS=(loss val_loss grad_norm mtp_loss expert_load_max_over_mean swiglu_input_max_abs router_logit_max)

step "$STEPS steps of 4 micro-batches in one process"
"$TESSERA" train "$WORK/v4.toml" "${SETS[@]}" job.run_dir="$WORK/one" 2> "$WORK/one.log" \
  || { cat "$WORK/one.log" >&2; fail "the single-process run failed"; }

for layout in "2 1 2 1 false" "4 2 2 1 false" "4 2 2 2 true"; do
  read -r np dp pp ep zero1 <<< "$layout"
  name="dp$dp-pp$pp-ep$ep-zero1-$zero1"
  step "the same global batch over mpirun -np $np: parallel.dp = $dp, pp = $pp, ep = $ep, zero1 = $zero1"
  mpirun --oversubscribe -np $np "$TESSERA" train "$WORK/v4.toml" "${SETS[@]}" job.run_dir="$WORK/$name" \
    parallel.dp=$dp parallel.pp=$pp parallel.ep=$ep parallel.zero1=$zero1 2> "$WORK/$name.log" \
    || { cat "$WORK/$name.log" >&2; fail "$name failed"; }
  grep -q "pipeline over 2 stages, 1F1B (balanced by FLOPs): stage 0 holds layers \[0, 3) and the embedding" \
    "$WORK/$name.log" || { grep pipeline "$WORK/$name.log" >&2; check_failed "$name: no pipeline log line"; }
  same_metrics "$name" "$WORK/one" "$WORK/$name" $STEPS send "${KEYS[@]}"
  RTOL=1e-12 same_metrics "$name balance_loss" "$WORK/one" "$WORK/$name" $STEPS send balance_loss
  "$PY" "$CKPT_EQUAL" "$WORK/one/$FINAL" "$WORK/$name/$FINAL" || check_failed "$name: final checkpoint differs"
done

resume_in_layout pp2ep2-to-1 "$WORK/v4.toml" "$WORK/one/$FINAL" "4 parallel.dp=2 parallel.pp=2 parallel.ep=2" \
  "1 parallel.dp=1 parallel.pp=1 parallel.ep=1"

step "recipe errors"
expect_fail v4_pp_anticipatory "parallel.pp = 2 does not work with routing.anticipatory = \"always\" yet" -- \
  mpirun --oversubscribe -np 2 "$TESSERA" train "$WORK/v4.toml" --set parallel.dp=1 parallel.pp=2 \
  routing.anticipatory=always job.run_dir="$WORK/v4ar"
finish
