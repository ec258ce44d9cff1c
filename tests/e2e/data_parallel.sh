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
export OMP_WAIT_POLICY=passive OMP_NUM_THREADS=1
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_mpi_yield_when_idle=1
MPIRUN=(mpirun --oversubscribe -np 2)
CKPT_EQUAL="$(dirname "$0")/ckpt_equal.py"
STEPS=20
make_corpus "$WORK/corpus.txt" 400

compare_runs() {  # NAME SINGLE_DIR PARALLEL_DIR
  local name=$1 a=$2 b=$3
  "$PY" - "$a/metrics.jsonl" "$b/metrics.jsonl" $STEPS <<'PYEOF' || check_failed "$name: metrics differ"
import json, sys
a = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
b = [json.loads(l) for l in open(sys.argv[2]) if l.strip()]
steps = int(sys.argv[3])
errors = []
if [r["step"] for r in a] != list(range(1, steps + 1)) or [r["step"] for r in b] != list(range(1, steps + 1)):
    errors.append("steps missing")
for ra, rb in zip(a, b):
    for key in ("loss", "val_loss", "grad_norm", "mtp_loss", "balance_loss", "expert_load_max_over_mean"):
        if key in ra and ra[key] != rb.get(key):
            errors.append(f"step {ra['step']}: {key} {ra[key]} (one process) vs {rb.get(key)} (data parallel)")
    if "comm_bytes" not in rb or rb["comm_bytes"] <= 0:
        errors.append(f"step {rb['step']}: no comm_bytes in the data-parallel run's metrics")
if a[-1]["loss"] >= a[0]["loss"]:
    errors.append(f"loss did not fall: {a[0]['loss']} -> {a[-1]['loss']}")
for e in errors[:10]:
    print("FAIL:", e)
print(f"{len(a)} steps: loss {a[0]['loss']:.4f} -> {a[-1]['loss']:.4f}, every logged value identical: {not errors}; "
      f"the data-parallel run communicates {b[-1].get('comm_bytes', 0)} bytes per step per rank")
sys.exit(1 if errors else 0)
PYEOF
  local final=checkpoints/step_$(printf %08d $STEPS).h5
  "$PY" "$CKPT_EQUAL" "$a/$final" "$b/$final" || check_failed "$name: final checkpoints differ"
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
      grep -q "optimizer state sharded over the $n data-parallel ranks" "$WORK/$model-dp$n.log" \
        || check_failed "$model: no sharded-optimizer log line"
    fi
    compare_runs "$model dp=$n zero1=$zero1" "$WORK/$model-1" "$WORK/$model-dp$n"
  done
done

step "dense: a run stopped at step 10 under dp=2 resumes at dp=4 (sharded optimizer) and at one process, bitwise"
TINY="$REPO/recipes/models/dense-tiny.toml"
SETS=(--set "training.steps=$STEPS" training.batch_size=2 training.grad_accum=4 checkpoint.every=10 eval.every=10
      eval.batches=2 optimizer.name=muon)
for to in 4 1; do
  mpirun --oversubscribe -np 2 "$TESSERA" train "$WORK/dense.toml" "${SETS[@]}" job.run_dir="$WORK/resume$to" \
    parallel.dp=2 --stop-after 10 2> "$WORK/resume$to-a.log" || { cat "$WORK/resume$to-a.log" >&2; fail "dp=2 part failed"; }
  if [[ $to == 1 ]]; then
    "$TESSERA" train --resume "$WORK/resume$to" --set parallel.dp=1 2> "$WORK/resume$to-b.log" || true
  else
    mpirun --oversubscribe -np $to "$TESSERA" train --resume "$WORK/resume$to" --set parallel.dp=$to parallel.zero1=true \
      2> "$WORK/resume$to-b.log" || true
  fi
  grep -q "resuming from .*step_00000010.h5 at step 10" "$WORK/resume$to-b.log" \
    || { cat "$WORK/resume$to-b.log" >&2; check_failed "resume at dp=$to: did not resume from step 10"; continue; }
  final=checkpoints/step_$(printf %08d $STEPS).h5
  "$PY" "$CKPT_EQUAL" "$WORK/dense-1/$final" "$WORK/resume$to/$final" \
    || check_failed "resume at dp=$to: final checkpoint differs from the uninterrupted one-process run"
done

step "recipe errors under mpirun"
expect_fail odd_accum "rank" "training.grad_accum (3) must be a multiple of parallel.dp (2)" -- \
  "${MPIRUN[@]}" "$TESSERA" train "$WORK/dense.toml" --set training.grad_accum=3 job.run_dir="$WORK/odd"
expect_fail wrong_world "parallel config" "does not equal the world size 2" -- \
  "${MPIRUN[@]}" "$TESSERA" train "$WORK/dense.toml" --set parallel.dp=4 job.run_dir="$WORK/world"
finish
