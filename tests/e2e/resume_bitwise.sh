#!/usr/bin/env bash
# A run killed with SIGKILL after a checkpoint and resumed with `tessera train --resume` must continue exactly
# as the uninterrupted run: same loss and val_loss at every step, steps 1..N once each, and a final checkpoint
# whose weights and AdamW moments are bitwise identical.
set -euo pipefail
source "$(dirname "$0")/common.sh"
require_h5py
CKPT_EQUAL="$(dirname "$0")/ckpt_equal.py"

STEPS=20
make_corpus "$WORK/corpus.txt" 600
write_recipe "$WORK/recipe.toml" "$WORK/corpus.txt" "$WORK/unused"
# batch_size 64 makes a step slow enough (tens of ms or more) to kill the run between checkpoints.
SETS=(--set "training.steps=$STEPS" training.batch_size=64 checkpoint.every=4 eval.every=5 eval.batches=2)

latest_step() {  # latest_step RUN_DIR: the step of the newest checkpoint file, or 0
  local f
  f=$(ls "$1"/checkpoints/step_*.h5 2>/dev/null | sort | tail -n 1 || true)
  if [[ -z $f ]]; then echo 0; else f=${f##*/step_}; echo $((10#${f%.h5})); fi
}

step "A: $STEPS steps uninterrupted"
"$TESSERA" train "$WORK/recipe.toml" "${SETS[@]}" job.run_dir="$WORK/A" 2> "$WORK/A.log"
[[ -f $WORK/A/checkpoints/step_$(printf %08d $STEPS).h5 ]] || fail "A: no final checkpoint"

metrics_lines() { if [[ -f $1/metrics.jsonl ]]; then wc -l < "$1/metrics.jsonl"; else echo 0; fi; }

# Killed after step 10 is logged: then metrics.jsonl runs ahead of the latest checkpoint (step 8), and the
# resume must drop those lines and write them again.
step "B: same recipe, killed with SIGKILL after step 10 (checkpoints at 4 and 8 exist, the next is at 12)"
"$TESSERA" train "$WORK/recipe.toml" "${SETS[@]}" job.run_dir="$WORK/B" 2> "$WORK/B1.log" &
pid=$!
deadline=$((SECONDS + 120))
while [[ $(latest_step "$WORK/B") -lt 8 || $(metrics_lines "$WORK/B") -lt 10 ]]; do
  if ! kill -0 $pid 2>/dev/null; then break; fi
  [[ $SECONDS -lt $deadline ]] || { kill -9 $pid; fail "B: no checkpoint of step >= 8 after 120 s"; }
  sleep 0.01
done
kill -9 $pid 2>/dev/null || true
rc=0
wait $pid || rc=$?
killed_at=$(latest_step "$WORK/B")
if [[ $rc -ne 137 ]]; then
  fail "B: the run ended with exit status $rc before it could be killed (latest checkpoint: step $killed_at);" \
       "make the run slower (training.batch_size) so that the kill lands between step 8 and step $STEPS"
fi
[[ $killed_at -ge 8 && $killed_at -lt $STEPS ]] || fail "B: killed with latest checkpoint at step $killed_at"
lines_before=$(metrics_lines "$WORK/B")
echo "B killed: latest checkpoint step $killed_at, metrics.jsonl has $lines_before lines; leftovers:" \
     "$(ls "$WORK/B/checkpoints" | tr '\n' ' ')"
[[ $lines_before -gt $killed_at ]] \
  || echo "note: the kill came right after a checkpoint, so no metrics lines had to be dropped this time"

head -n "$killed_at" "$WORK/B/metrics.jsonl" > "$WORK/B.kept"

step "B: tessera train --resume"
"$TESSERA" train --resume "$WORK/B" 2> "$WORK/B2.log"
# The lines up to the checkpoint stay as they were, timings included (a run restarted from scratch would
# rewrite them with other timings), and the lines after it were dropped and written again.
cmp <(head -n "$killed_at" "$WORK/B/metrics.jsonl") "$WORK/B.kept" \
  || fail "B: the resume rewrote metrics.jsonl lines of steps <= $killed_at (did it restart from scratch?)"
grep -q "resuming from .*step_$(printf %08d "$killed_at").h5 at step $killed_at" "$WORK/B2.log" \
  || { cat "$WORK/B2.log" >&2; fail "B: the resume log does not say it resumed from step $killed_at"; }

step "compare metrics.jsonl of A and B"
"$PY" - "$WORK/A/metrics.jsonl" "$WORK/B/metrics.jsonl" $STEPS <<'EOF'
import json, math, sys
a_path, b_path, steps = sys.argv[1], sys.argv[2], int(sys.argv[3])
def load(path):
    # parse_float=str keeps each number exactly as written, so the comparison below is a string compare.
    return [json.loads(l, parse_float=str) for l in open(path) if l.strip()]
a, b = load(a_path), load(b_path)
errors = []
for name, rows in (("A", a), ("B", b)):
    got = [r["step"] for r in rows]
    if got != list(range(1, steps + 1)):
        errors.append(f"{name}: steps are {got}, expected 1..{steps} once each")
for ra, rb in zip(a, b):
    for key in ("loss", "val_loss", "lr", "grad_norm", "tokens"):
        if ra.get(key) != rb.get(key):
            errors.append(f"step {ra['step']}: {key} A={ra.get(key)} B={rb.get(key)}")
    if not math.isfinite(float(ra["loss"])):
        errors.append(f"step {ra['step']}: loss {ra['loss']}")
val_steps = [r["step"] for r in a if "val_loss" in r]
if val_steps != [5, 10, 15, 20]:
    errors.append(f"A: val_loss at steps {val_steps}, expected [5, 10, 15, 20]")
for e in errors:
    print("FAIL:", e)
print(f"compared {len(a)} and {len(b)} metrics lines")
sys.exit(1 if errors else 0)
EOF

step "compare the final checkpoints bitwise"
final=checkpoints/step_$(printf %08d $STEPS).h5
"$PY" "$CKPT_EQUAL" "$WORK/A/$final" "$WORK/B/$final" || fail "final checkpoints of A and B differ"

step "the checks can fail: another checkpoint and another seed differ"
if "$PY" "$CKPT_EQUAL" "$WORK/A/checkpoints/step_00000016.h5" "$WORK/A/$final" > "$WORK/selfcheck.out"; then
  fail "ckpt_equal.py found the step-16 and step-$STEPS checkpoints identical"
fi
"$TESSERA" train "$WORK/recipe.toml" "${SETS[@]}" job.run_dir="$WORK/S" job.seed=2 --stop-after 1 2> "$WORK/S.log"
loss_a=$("$PY" -c 'import json,sys; print(json.loads(open(sys.argv[1]).readline())["loss"])' "$WORK/A/metrics.jsonl")
loss_s=$("$PY" -c 'import json,sys; print(json.loads(open(sys.argv[1]).readline())["loss"])' "$WORK/S/metrics.jsonl")
[[ $loss_a != "$loss_s" ]] || fail "job.seed=2 gives the same step-1 loss as job.seed=1 ($loss_a)"
echo "step-1 loss: seed 1 $loss_a, seed 2 $loss_s"
finish
