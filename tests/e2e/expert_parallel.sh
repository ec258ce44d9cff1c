#!/usr/bin/env bash
# Expert parallelism end to end on the tiny V4 model (8 routed experts), Muon + AdamW, 20 steps of 4 micro-batches:
# `mpirun -np N tessera train` with parallel.ep reproduces the single-process run on the same global batch bitwise
# (per-step losses, held-out losses, gradient norms, balance statistics, and the final checkpoint: weights, AdamW
# moments, Muon momenta, balancing biases): EP2 (2 ranks, 4 experts each), EP4 (4 ranks, 2 experts each) and
# dp=4 x ep=2 (two expert-data-parallel replicas of EP2). Checkpoints hold the whole expert stacks, so a run
# stopped at step 10 under EP2 resumes at one process and at dp=4 x ep=2, and the one-process checkpoint resumes
# under EP4, each ending bitwise on the uninterrupted run. Anticipatory routing (always, and on_spike with a forced
# rollback) under EP2 equals one process, routing state files included, and that state resumes at one process.
# Then the recipe errors.
set -euo pipefail
source "$(dirname "$0")/common.sh"
require_h5py
export OMP_WAIT_POLICY=passive OMP_NUM_THREADS=1
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_mpi_yield_when_idle=1
CKPT_EQUAL="$(dirname "$0")/ckpt_equal.py"
STEPS=20
FINAL=checkpoints/step_$(printf %08d $STEPS).h5
make_corpus "$WORK/corpus.txt" 400
TINY="$REPO/recipes/models/v4-tiny.toml"
write_recipe "$WORK/v4.toml" "$WORK/corpus.txt" "$WORK/unused"
SETS=(--set "training.steps=$STEPS" training.batch_size=2 training.grad_accum=4 checkpoint.every=10 eval.every=10
      eval.batches=2 optimizer.name=muon)

compare_metrics() {  # NAME SINGLE_DIR PARALLEL_DIR
  "$PY" - "$2/metrics.jsonl" "$3/metrics.jsonl" $STEPS <<'PYEOF' || check_failed "$1: metrics differ"
import json, sys
a = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
b = [json.loads(l) for l in open(sys.argv[2]) if l.strip()]
steps = int(sys.argv[3])
errors = []
# Steps 1..STEPS, or (a rollback) the same replayed sequence in both, ending at STEPS.
if [r["step"] for r in a] != [r["step"] for r in b] or a[-1]["step"] != steps or len(a) < steps:
    errors.append(f"steps differ: {[r['step'] for r in a]} vs {[r['step'] for r in b]}")
for ra, rb in zip(a, b):
    for key in ("loss", "val_loss", "grad_norm", "mtp_loss", "balance_loss", "expert_load_max_over_mean"):
        if key in ra and ra[key] != rb.get(key):
            errors.append(f"step {ra['step']}: {key} {ra[key]} (one process) vs {rb.get(key)} (expert parallel)")
    if rb.get("comm", {}).get("all_to_all", [0, 0])[0] <= 0:
        errors.append(f"step {rb['step']}: no all_to_all in the expert-parallel run's metrics")
for e in errors[:10]:
    print("FAIL:", e)
print(f"{len(a)} steps: loss {a[0]['loss']:.4f} -> {a[-1]['loss']:.4f}, every logged value identical: {not errors}; "
      f"{b[-1].get('comm_bytes', 0)} bytes per step per rank, all_to_all {b[-1].get('comm', {}).get('all_to_all')}")
sys.exit(1 if errors else 0)
PYEOF
}

step "$STEPS steps of 4 micro-batches in one process"
"$TESSERA" train "$WORK/v4.toml" "${SETS[@]}" job.run_dir="$WORK/one" 2> "$WORK/one.log" \
  || { cat "$WORK/one.log" >&2; fail "the single-process run failed"; }

for layout in "2 2 2" "4 4 4" "4 4 2"; do
  read -r np dp ep <<< "$layout"
  name="dp$dp-ep$ep"
  step "the same global batch over mpirun -np $np, parallel.dp = $dp, parallel.ep = $ep"
  mpirun --oversubscribe -np $np "$TESSERA" train "$WORK/v4.toml" "${SETS[@]}" job.run_dir="$WORK/$name" \
    parallel.dp=$dp parallel.ep=$ep 2> "$WORK/$name.log" || { cat "$WORK/$name.log" >&2; fail "$name failed"; }
  grep -q "expert parallel over $ep ranks: this rank holds $((8 / ep)) of the 8 routed experts" "$WORK/$name.log" \
    || check_failed "$name: no expert-parallel log line"
  compare_metrics "$name" "$WORK/one" "$WORK/$name"
  "$PY" "$CKPT_EQUAL" "$WORK/one/$FINAL" "$WORK/$name/$FINAL" || check_failed "$name: final checkpoint differs"
done

# resume_case NAME FROM_NP FROM_DP FROM_EP TO_NP TO_DP TO_EP: stop at step 10 in one layout, resume in another.
resume_case() {
  local name=$1 fnp=$2 fdp=$3 fep=$4 tnp=$5 tdp=$6 tep=$7
  step "a run stopped at step 10 at dp=$fdp ep=$fep resumes at dp=$tdp ep=$tep"
  mpirun --oversubscribe -np "$fnp" "$TESSERA" train "$WORK/v4.toml" "${SETS[@]}" job.run_dir="$WORK/$name" \
    parallel.dp="$fdp" parallel.ep="$fep" --stop-after 10 2> "$WORK/$name-a.log" \
    || { cat "$WORK/$name-a.log" >&2; fail "$name: first part failed"; }
  mpirun --oversubscribe -np "$tnp" "$TESSERA" train --resume "$WORK/$name" --set parallel.dp="$tdp" \
    parallel.ep="$tep" 2> "$WORK/$name-b.log" || { cat "$WORK/$name-b.log" >&2; fail "$name: resumed part failed"; }
  grep -q "resuming from .*step_00000010.h5 at step 10" "$WORK/$name-b.log" \
    || { cat "$WORK/$name-b.log" >&2; check_failed "$name: did not resume from step 10"; return; }
  "$PY" "$CKPT_EQUAL" "$WORK/one/$FINAL" "$WORK/$name/$FINAL" \
    || check_failed "$name: final checkpoint differs from the uninterrupted one-process run"
}
resume_case ep2-to-1 2 2 2 1 1 1
resume_case ep2-to-dp4ep2 2 2 2 4 4 2
resume_case 1-to-ep4 1 1 1 4 4 4

step "anticipatory routing (always, dt = 2) and a forced loss spike (on_spike) under EP2, against one process"
AR_SETS=(routing.anticipatory=always routing.dt=2)
SPIKE_SETS=(routing.anticipatory=on_spike routing.force_spike_at=7 routing.snapshot_every=2 routing.ar_steps=2)
for mode in ar spike; do
  if [[ $mode == ar ]]; then extra=("${AR_SETS[@]}"); else extra=("${SPIKE_SETS[@]}"); fi
  "$TESSERA" train "$WORK/v4.toml" "${SETS[@]}" "${extra[@]}" job.run_dir="$WORK/$mode-one" \
    2> "$WORK/$mode-one.log" || { cat "$WORK/$mode-one.log" >&2; fail "$mode: the one-process run failed"; }
  mpirun --oversubscribe -np 2 "$TESSERA" train "$WORK/v4.toml" "${SETS[@]}" "${extra[@]}" parallel.ep=2 \
    job.run_dir="$WORK/$mode-ep2" 2> "$WORK/$mode-ep2.log" || { cat "$WORK/$mode-ep2.log" >&2; fail "$mode: EP2 failed"; }
  compare_metrics "$mode ep2" "$WORK/$mode-one" "$WORK/$mode-ep2"
  "$PY" "$CKPT_EQUAL" "$WORK/$mode-one/$FINAL" "$WORK/$mode-ep2/$FINAL" || check_failed "$mode: final checkpoint differs"
  cmp -s "$WORK/$mode-one/${FINAL%.h5}.routing" "$WORK/$mode-ep2/${FINAL%.h5}.routing" \
    || check_failed "$mode: the routing state files differ"
done
grep -q "loss spike at step 7: .*rolling back to step" "$WORK/spike-ep2.log" || check_failed "spike: no rollback under EP2"
# The routing state written under EP2 (its parameter hash over the whole stacks) is used when resuming at one process.
mpirun --oversubscribe -np 2 "$TESSERA" train "$WORK/v4.toml" "${SETS[@]}" "${AR_SETS[@]}" parallel.ep=2 \
  job.run_dir="$WORK/ar-resume" --stop-after 10 2> "$WORK/ar-resume-a.log" || fail "ar resume: first part failed"
"$TESSERA" train --resume "$WORK/ar-resume" --set parallel.dp=1 parallel.ep=1 2> "$WORK/ar-resume-b.log" \
  || { cat "$WORK/ar-resume-b.log" >&2; fail "ar resume: resumed part failed"; }
grep -q "anticipatory routing: state restored from .*step_00000010.routing" "$WORK/ar-resume-b.log" \
  || check_failed "ar resume: the EP2 routing state was not restored at one process"
"$PY" "$CKPT_EQUAL" "$WORK/ar-one/$FINAL" "$WORK/ar-resume/$FINAL" || check_failed "ar resume: final checkpoint differs"

step "recipe errors"
TINY="$REPO/recipes/models/dense-tiny.toml" write_recipe "$WORK/dense.toml" "$WORK/corpus.txt" "$WORK/unused"
expect_fail dense_ep "parallel.ep = 2 does not work with model.arch = \"dense\" yet (it has no routed experts)" -- \
  mpirun --oversubscribe -np 2 "$TESSERA" train "$WORK/dense.toml" --set parallel.ep=2 job.run_dir="$WORK/dense"
expect_fail zero1_ep "parallel.ep = 2 does not work with parallel.zero1 yet" -- \
  mpirun --oversubscribe -np 2 "$TESSERA" train "$WORK/v4.toml" --set parallel.ep=2 parallel.zero1=true \
  job.run_dir="$WORK/z"
expect_fail experts_divide "model.n_routed_experts (8) must be a multiple of parallel.ep (3)" -- \
  mpirun --oversubscribe -np 3 "$TESSERA" train "$WORK/v4.toml" --set parallel.ep=3 training.grad_accum=3 \
  job.run_dir="$WORK/three"
finish
