#!/usr/bin/env bash
# Pipeline parallelism end to end on the tiny dense model (2 layers), Muon + AdamW, 20 steps of 4 micro-batches:
# `mpirun -np N tessera train` with parallel.pp = 2 (1F1B) reproduces the single-process run on the same global
# batch bitwise (per-step losses, held-out losses, gradient norms and the final checkpoint: weights, AdamW moments,
# Muon momenta), alone (PP2, 4 micro-batches through 2 stages) and with data parallelism (dp=2 x pp=2, also with the
# optimizer state sharded over each stage's data-parallel ranks: parallel.zero1). A run
# stopped at step 10 under PP2 resumes at one process, and the one-process checkpoint resumes at dp=2 x pp=2, each
# ending bitwise on the uninterrupted run. Then the recipe errors.
set -euo pipefail
source "$(dirname "$0")/common.sh"
require_h5py
export OMP_WAIT_POLICY=passive OMP_NUM_THREADS=1
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_mpi_yield_when_idle=1
CKPT_EQUAL="$(dirname "$0")/ckpt_equal.py"
STEPS=20
FINAL=checkpoints/step_$(printf %08d $STEPS).h5
make_corpus "$WORK/corpus.txt" 400
TINY="$REPO/recipes/models/dense-tiny.toml"
write_recipe "$WORK/dense.toml" "$WORK/corpus.txt" "$WORK/unused"
SETS=(--set "training.steps=$STEPS" training.batch_size=2 training.grad_accum=4 checkpoint.every=10 eval.every=10
      eval.batches=2 optimizer.name=muon)

compare_metrics() {  # NAME SINGLE_DIR PARALLEL_DIR
  "$PY" - "$2/metrics.jsonl" "$3/metrics.jsonl" $STEPS <<'PYEOF' || check_failed "$1: metrics differ"
import json, sys
a = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
b = [json.loads(l) for l in open(sys.argv[2]) if l.strip()]
steps = int(sys.argv[3])
errors = []
if [r["step"] for r in a] != list(range(1, steps + 1)) or [r["step"] for r in b] != list(range(1, steps + 1)):
    errors.append("steps missing")
for ra, rb in zip(a, b):
    for key in ("loss", "val_loss", "grad_norm"):
        if key in ra and ra[key] != rb.get(key):
            errors.append(f"step {ra['step']}: {key} {ra[key]} (one process) vs {rb.get(key)} (pipeline)")
    if rb.get("comm", {}).get("send", [0, 0])[0] <= 0:
        errors.append(f"step {rb['step']}: no send in the pipeline run's metrics")
if a[-1]["loss"] >= a[0]["loss"]:
    errors.append(f"loss did not fall: {a[0]['loss']} -> {a[-1]['loss']}")
for e in errors[:10]:
    print("FAIL:", e)
print(f"{len(a)} steps: loss {a[0]['loss']:.4f} -> {a[-1]['loss']:.4f}, every logged value identical: {not errors}; "
      f"{b[-1].get('comm_bytes', 0)} bytes per step on rank 0: {b[-1].get('comm')}")
sys.exit(1 if errors else 0)
PYEOF
}

step "$STEPS steps of 4 micro-batches in one process"
"$TESSERA" train "$WORK/dense.toml" "${SETS[@]}" job.run_dir="$WORK/one" 2> "$WORK/one.log" \
  || { cat "$WORK/one.log" >&2; fail "the single-process run failed"; }

for layout in "2 1 2 false" "4 2 2 false" "4 2 2 true"; do
  read -r np dp pp zero1 <<< "$layout"
  name="dp$dp-pp$pp-zero1-$zero1"
  step "the same global batch over mpirun -np $np, parallel.dp = $dp, parallel.pp = $pp, parallel.zero1 = $zero1"
  mpirun --oversubscribe -np $np "$TESSERA" train "$WORK/dense.toml" "${SETS[@]}" job.run_dir="$WORK/$name" \
    parallel.dp=$dp parallel.pp=$pp parallel.zero1=$zero1 2> "$WORK/$name.log" \
    || { cat "$WORK/$name.log" >&2; fail "$name failed"; }
  grep -q "pipeline over $pp stages, 1F1B: stage 0 holds layers \[0, 1) and the embedding" "$WORK/$name.log" \
    || check_failed "$name: no pipeline log line"
  compare_metrics "$name" "$WORK/one" "$WORK/$name"
  "$PY" "$CKPT_EQUAL" "$WORK/one/$FINAL" "$WORK/$name/$FINAL" || check_failed "$name: final checkpoint differs"
done

# resume_case NAME FROM_NP FROM_DP FROM_PP TO_NP TO_DP TO_PP: stop at step 10 in one layout, resume in another.
resume_case() {
  local name=$1 fnp=$2 fdp=$3 fpp=$4 tnp=$5 tdp=$6 tpp=$7
  step "a run stopped at step 10 at dp=$fdp pp=$fpp resumes at dp=$tdp pp=$tpp"
  mpirun --oversubscribe -np "$fnp" "$TESSERA" train "$WORK/dense.toml" "${SETS[@]}" job.run_dir="$WORK/$name" \
    parallel.dp="$fdp" parallel.pp="$fpp" --stop-after 10 2> "$WORK/$name-a.log" \
    || { cat "$WORK/$name-a.log" >&2; fail "$name: first part failed"; }
  mpirun --oversubscribe -np "$tnp" "$TESSERA" train --resume "$WORK/$name" --set parallel.dp="$tdp" \
    parallel.pp="$tpp" 2> "$WORK/$name-b.log" || { cat "$WORK/$name-b.log" >&2; fail "$name: resumed part failed"; }
  grep -q "resuming from .*step_00000010.h5 at step 10" "$WORK/$name-b.log" \
    || { cat "$WORK/$name-b.log" >&2; check_failed "$name: did not resume from step 10"; return; }
  "$PY" "$CKPT_EQUAL" "$WORK/one/$FINAL" "$WORK/$name/$FINAL" \
    || check_failed "$name: final checkpoint differs from the uninterrupted one-process run"
}
resume_case pp2-to-1 2 1 2 1 1 1
resume_case 1-to-dp2pp2 1 1 1 4 2 2

step "recipe errors"
expect_fail too_many_stages "parallel.pp (4) must not exceed model.n_layers (2)" -- \
  mpirun --oversubscribe -np 4 "$TESSERA" train "$WORK/dense.toml" --set parallel.dp=1 parallel.pp=4 \
  job.run_dir="$WORK/pp4"
TINY="$REPO/recipes/models/v4-tiny.toml" write_recipe "$WORK/v4.toml" "$WORK/corpus.txt" "$WORK/unused"
expect_fail v4_pp "parallel.pp = 2 does not work with model.arch = \"deepseek_v4\" yet" -- \
  mpirun --oversubscribe -np 2 "$TESSERA" train "$WORK/v4.toml" --set parallel.dp=1 parallel.pp=2 \
  job.run_dir="$WORK/v4pp"
finish
