#!/usr/bin/env bash
# The hybrid optimizer (optimizer.name = "muon", docs/optimizer.md) end to end on the dense tiny model: the
# start-of-run log lists the groups (every matrix on Muon; embedding, head and norms on AdamW), a run stopped
# after a checkpoint and resumed with `tessera train --resume` matches the uninterrupted run bitwise (metrics,
# weights, AdamW moments and Muon momenta), and resuming with another optimizer.name or other groups is refused.
set -euo pipefail
source "$(dirname "$0")/common.sh"
require_h5py
# Newton-Schulz runs hundreds of tiny OpenMP regions per step; with libgomp's default spinning a Muon step took
# 50x longer on a loaded 2-core machine. Results do not depend on the wait policy.
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-passive}
CKPT_EQUAL="$(dirname "$0")/ckpt_equal.py"

STEPS=8
make_corpus "$WORK/corpus.txt" 400
write_recipe "$WORK/recipe.toml" "$WORK/corpus.txt" "$WORK/unused"
COMMON=("training.steps=$STEPS" checkpoint.every=4 eval.every=4 eval.batches=2)
SETS=(--set "${COMMON[@]}" optimizer.name=muon)

step "A: $STEPS steps uninterrupted with optimizer.name = \"muon\""
"$TESSERA" train "$WORK/recipe.toml" "${SETS[@]}" job.run_dir="$WORK/A" 2> "$WORK/A.log"
[[ -f $WORK/A/checkpoints/step_$(printf %08d $STEPS).h5 ]] || fail "A: no final checkpoint"
grep -q '^name = "muon"' "$WORK/A/recipe.toml" || fail "A: the effective recipe lacks optimizer name = \"muon\""

step "the start-of-run log lists the groups"
# The dense model's 7 matrices per layer on Muon; the embedding, the norms and the head on AdamW.
muon_line=$(grep '^muon: ' "$WORK/A.log" || true)
adamw_line=$(grep '^adamw: ' "$WORK/A.log" || true)
grep -qF 'optimizer groups (muon):' "$WORK/A.log" || check_failed "log: no 'optimizer groups (muon):' line"
[[ $muon_line == "muon: 14 tensors, "* ]] || check_failed "log: muon group is '$muon_line', expected 14 tensors"
[[ $adamw_line == "adamw: 7 tensors, "* ]] || check_failed "log: adamw group is '$adamw_line', expected 7 tensors"
for i in 0 1; do
  for w in attn.wq attn.wk attn.wv attn.wo ffn.w1 ffn.w2 ffn.w3; do
    [[ "$muon_line" == *"layers.$i.$w"[,\)]* ]] || check_failed "log: layers.$i.$w is not in the muon group"
    [[ "$adamw_line" != *"layers.$i.$w"* ]] || check_failed "log: layers.$i.$w is in the adamw group"
  done
done
for n in tok_embeddings layers.0.attn_norm layers.1.ffn_norm norm output; do
  [[ "$adamw_line" == *"($n,"* || "$adamw_line" == *" $n,"* || "$adamw_line" == *" $n)"* ]] \
    || check_failed "log: $n is not in the adamw group"
done
# Every parameter once, and the two counts add up to the model's.
"$PY" - "$WORK/A.log" <<'EOF' || check_failed "log: the groups do not partition the parameters"
import re, sys
log = open(sys.argv[1]).read()
groups = {}
for rule in ("muon", "adamw"):
    m = re.search(rf"^{rule}: (\d+) tensors, (\d+) parameters \((.*)\)$", log, re.M)
    groups[rule] = (int(m.group(1)), int(m.group(2)), m.group(3).split(", "))
total = int(re.search(r"^model: (\d+) parameters", log, re.M).group(1))
names = groups["muon"][2] + groups["adamw"][2]
ok = len(names) == len(set(names)) == groups["muon"][0] + groups["adamw"][0] and \
     groups["muon"][1] + groups["adamw"][1] == total
print(f"muon {groups['muon'][:2]}, adamw {groups['adamw'][:2]}, model {total}: {'ok' if ok else 'MISMATCH'}")
sys.exit(0 if ok else 1)
EOF

step "B: same recipe, stopped after 6 steps (checkpoint at 4), then tessera train --resume"
"$TESSERA" train "$WORK/recipe.toml" "${SETS[@]}" job.run_dir="$WORK/B" --stop-after 6 2> "$WORK/B1.log"
[[ -f $WORK/B/checkpoints/step_00000004.h5 && ! -f $WORK/B/checkpoints/step_00000008.h5 ]] \
  || fail "B: expected a checkpoint at step 4 and none at 8: $(ls "$WORK/B/checkpoints" | tr '\n' ' ')"
"$PY" - "$WORK/B/checkpoints/step_00000004.h5" <<'EOF' || fail "B: the step-4 checkpoint lacks the hybrid's state"
import sys, h5py
with h5py.File(sys.argv[1], "r") as f:
    name = f.attrs["optim.name"]
    name = name.decode() if isinstance(name, bytes) else name
    keys = []
    f.visit(lambda k: keys.append(k) if isinstance(f[k], h5py.Dataset) and k.startswith("optim/") else None)
    muon = [k for k in keys if k.startswith("optim/muon/m/")]
    adamw = [k for k in keys if k.startswith("optim/adamw/m/")]
    print(f"optim.name {name}: {len(muon)} muon momenta, {len(adamw)} adamw first moments")
    ok = name == "muon" and len(muon) == 14 and len(adamw) == 7 and "optim/muon/m/layers.0.attn.wq" in keys \
        and "optim/adamw/v/tok_embeddings" in keys and "optim/adamw/m/layers.0.attn.wq" not in keys
    sys.exit(0 if ok else 1)
EOF
"$TESSERA" train --resume "$WORK/B" 2> "$WORK/B2.log"
grep -q "resuming from .*step_00000004.h5 at step 4" "$WORK/B2.log" \
  || { cat "$WORK/B2.log" >&2; fail "B: the resume log does not say it resumed from step 4"; }
grep -qF 'optimizer groups (muon):' "$WORK/B2.log" || check_failed "B: the resumed run does not print the groups"

step "compare metrics.jsonl of A and B"
"$PY" - "$WORK/A/metrics.jsonl" "$WORK/B/metrics.jsonl" $STEPS <<'EOF' || check_failed "metrics of A and B differ"
import json, math, sys
a_path, b_path, steps = sys.argv[1], sys.argv[2], int(sys.argv[3])
load = lambda p: [json.loads(l, parse_float=str) for l in open(p) if l.strip()]
a, b = load(a_path), load(b_path)
errors = []
for name, rows in (("A", a), ("B", b)):
    if [r["step"] for r in rows] != list(range(1, steps + 1)):
        errors.append(f"{name}: steps are {[r['step'] for r in rows]}, expected 1..{steps} once each")
for ra, rb in zip(a, b):
    for key in ("loss", "val_loss", "lr", "grad_norm", "tokens"):
        if ra.get(key) != rb.get(key):
            errors.append(f"step {ra['step']}: {key} A={ra.get(key)} B={rb.get(key)}")
    if not math.isfinite(float(ra["loss"])):
        errors.append(f"step {ra['step']}: loss {ra['loss']}")
if float(a[-1]["loss"]) >= float(a[0]["loss"]):
    errors.append(f"A: loss did not fall ({a[0]['loss']} -> {a[-1]['loss']})")
for e in errors:
    print("FAIL:", e)
print(f"compared {len(a)} and {len(b)} metrics lines; loss {a[0]['loss']} -> {a[-1]['loss']}")
sys.exit(1 if errors else 0)
EOF

step "compare the final checkpoints bitwise (weights, AdamW moments, Muon momenta)"
final=checkpoints/step_$(printf %08d $STEPS).h5
"$PY" "$CKPT_EQUAL" "$WORK/A/$final" "$WORK/B/$final" || check_failed "final checkpoints of A and B differ"

step "W: the same recipe with optimizer.name = \"adamw\", 4 steps: another step-2 loss"
"$TESSERA" train "$WORK/recipe.toml" --set "${COMMON[@]}" job.run_dir="$WORK/W" --stop-after 4 2> "$WORK/W.log"
grep -q '^muon: 0 tensors, 0 parameters$' "$WORK/W.log" || check_failed "W: adamw run lists a muon group"
loss_of() { "$PY" -c 'import json,sys; print(json.loads(open(sys.argv[1]).readlines()[1])["loss"])' "$1"; }
[[ $(loss_of "$WORK/A/metrics.jsonl") != "$(loss_of "$WORK/W/metrics.jsonl")" ]] \
  || check_failed "optimizer.name = adamw gives the same step-2 loss as muon"

step "resuming with another optimizer.name or other groups is refused"
expect_fail resume_as_adamw 'optimizer.name = "muon"' 'asks for "adamw"' -- \
  "$TESSERA" train --resume "$WORK/B" --set optimizer.name=adamw
expect_fail resume_w_as_muon 'optimizer.name = "adamw"' 'asks for "muon"' -- \
  "$TESSERA" train --resume "$WORK/W" --set optimizer.name=muon
expect_fail resume_moved_groups 'optim/adamw/m/layers.0.ffn.w2' 'optimizer.adamw_params' -- \
  "$TESSERA" train --resume "$WORK/B" --set 'optimizer.adamw_params=["ffn.w2"]'
finish
