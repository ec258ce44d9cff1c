#!/usr/bin/env bash
# Anticipatory routing in the trainer (docs/model.md "Anticipatory routing") on a shrunk recipes/models/v4-tiny.toml:
#   always    every step routes with indices looked ahead one step earlier (routing_lag 0 at step 1, then 1), and the
#             spike instrumentation keys are in every line;
#   resume    a run stopped after a checkpoint and resumed continues bitwise like the uninterrupted one (the
#             look-ahead cache comes back from step_N.routing); without that file it does not; the same with
#             dt = 2 and two micro-batches per step;
#   on_spike  a spike forced at step 5 rolls back to the snapshot of step 2, replays steps 3-5 with anticipatory
#             routing (step 3 bitwise as the first time: same parameters, lag 0) and returns to normal routing.
set -euo pipefail
source "$(dirname "$0")/common.sh"
require_h5py
CKPT_EQUAL="$(dirname "$0")/ckpt_equal.py"
# The runs are many tiny ops: with OpenMP's default spinning, two threads on two cores that other jobs also use
# can be 50x slower than one. Sleeping waits change no result (nor does the thread count).
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-passive}

make_corpus "$WORK/corpus.txt" 300
cat > "$WORK/r.toml" <<EOF
inherit = "$REPO/recipes/models/v4-tiny.toml"

[model]  # v4-tiny, shrunk: window, CSA (4) and HCA (16) layers, then the MTP block; layer 0 hash-routed
dim = 32
n_layers = 3
compress_ratios = [0, 4, 16, 0]
n_heads = 2
head_dim = 16
rope_dim = 8
q_lora_rank = 16
o_lora_rank = 16
index_n_heads = 2
index_head_dim = 16
moe_inter_dim = 32
window = 16

[job]
name = "e2e-ar"
seed = 1

[data]
train = ["$WORK/corpus.txt"]

[training]
steps = 6
batch_size = 2
seq_len = 32

[optimizer]
lr = 1e-2

[eval]
every = 3
batches = 1

[checkpoint]
every = 3
keep = 0

[metrics]
peak_flops = 1e11
EOF

step "A: routing.anticipatory = always, 6 steps"
"$TESSERA" train "$WORK/r.toml" --set routing.anticipatory=always job.run_dir="$WORK/A" 2> "$WORK/A.log" \
  || { cat "$WORK/A.log" >&2; fail "A failed"; }
grep -q "anticipatory routing on from step 1 (dt = 1)" "$WORK/A.log" || fail "A: the log does not announce the mode"
for f in step_00000003.h5 step_00000003.routing step_00000006.h5 step_00000006.routing; do
  [[ -s $WORK/A/checkpoints/$f ]] || fail "A: no checkpoints/$f"
done
"$PY" - "$WORK/A/metrics.jsonl" <<'EOF' || check_failed "A: metrics keys"
import json, math, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
assert [r["step"] for r in rows] == list(range(1, 7)), [r["step"] for r in rows]
for r in rows:
    assert r["anticipatory_routing"] is True and r["spike"] is False, r
    assert r["routing_lag"] == (0 if r["step"] == 1 else 1), r
    assert "rollback_to" not in r, r
    for key in ("swiglu_input_max_abs", "router_logit_max", "expert_load_max_over_mean"):
        v = r[key]
        assert isinstance(v, list) and len(v) == 4 and all(math.isfinite(x) for x in v), (key, v)  # 3 layers + MTP
    assert all(x > 0 for x in r["swiglu_input_max_abs"]), r
print("A: every line has anticipatory_routing, routing_lag 0 then 1, spike, and 4-entry instrumentation lists")
EOF

step "B: the same run stopped after step 3, then resumed: bitwise as A"
"$TESSERA" train "$WORK/r.toml" --set routing.anticipatory=always job.run_dir="$WORK/B" --stop-after 3 2> "$WORK/B1.log"
cp -r "$WORK/B" "$WORK/C"  # for the control below
"$TESSERA" train --resume "$WORK/B" 2> "$WORK/B2.log" || { cat "$WORK/B2.log" >&2; fail "B: resume failed"; }
grep -q "anticipatory routing: state restored from .*step_00000003.routing (1 cached step(s))" "$WORK/B2.log" \
  || { cat "$WORK/B2.log" >&2; fail "B: the resume did not restore the look-ahead cache"; }
compare_metrics() {  # compare_metrics A B KEYS...: equal values (as written) at every step
  "$PY" - "$@" <<'EOF'
import json, sys
a, b, keys = sys.argv[1], sys.argv[2], sys.argv[3:]
ra = [json.loads(l, parse_float=str) for l in open(a)]
rb = [json.loads(l, parse_float=str) for l in open(b)]
diff = [f"step {x['step']}: {k} {x.get(k)} vs {y.get(k)}" for x, y in zip(ra, rb) for k in keys if x.get(k) != y.get(k)]
if len(ra) != len(rb):
    diff.append(f"{len(ra)} vs {len(rb)} lines")
print("\n".join(diff) if diff else f"{len(ra)} lines equal in {', '.join(keys)}")
sys.exit(1 if diff else 0)
EOF
}
compare_metrics "$WORK/A/metrics.jsonl" "$WORK/B/metrics.jsonl" loss grad_norm val_loss routing_lag \
  swiglu_input_max_abs router_logit_max expert_load_max_over_mean || check_failed "B: metrics differ from A"
"$PY" "$CKPT_EQUAL" "$WORK/A/checkpoints/step_00000006.h5" "$WORK/B/checkpoints/step_00000006.h5" \
  || check_failed "B: the final checkpoint differs from A's"
cmp "$WORK/A/checkpoints/step_00000006.routing" "$WORK/B/checkpoints/step_00000006.routing" \
  || check_failed "B: the final routing state differs from A's"

step "C (control): resumed without step_00000003.routing, step 4 routes with the current parameters and differs"
rm "$WORK/C/checkpoints/step_00000003.routing"
"$TESSERA" train --resume "$WORK/C" --stop-after 1 2> "$WORK/C.log" || { cat "$WORK/C.log" >&2; fail "C failed"; }
grep -q "anticipatory routing: no .*step_00000003.routing; the first 1 step(s) route with the current parameters" \
  "$WORK/C.log" || { cat "$WORK/C.log" >&2; check_failed "C: the log does not say the cache is missing"; }
"$PY" - "$WORK/A/metrics.jsonl" "$WORK/C/metrics.jsonl" <<'EOF' || check_failed "C: control"
import json, sys
a = {r["step"]: r for r in map(json.loads, open(sys.argv[1]))}
c = [json.loads(l) for l in open(sys.argv[2])]
assert [r["step"] for r in c] == [1, 2, 3, 4], [r["step"] for r in c]
assert c[3]["routing_lag"] == 0 and a[4]["routing_lag"] == 1, (c[3], a[4])
assert c[3]["loss"] != a[4]["loss"], "the look-ahead cache made no difference at step 4"
print(f"step 4 loss: with the cache {a[4]['loss']}, without {c[3]['loss']}")
EOF

step "E: dt = 2 with grad_accum = 2 (a queue of two steps, one cache per micro-batch): lags and resume"
E_SETS=(routing.anticipatory=always routing.dt=2 training.grad_accum=2 training.batch_size=1)
"$TESSERA" train "$WORK/r.toml" --set "${E_SETS[@]}" job.run_dir="$WORK/E" 2> "$WORK/E.log" \
  || { cat "$WORK/E.log" >&2; fail "E failed"; }
"$TESSERA" train "$WORK/r.toml" --set "${E_SETS[@]}" job.run_dir="$WORK/F" --stop-after 3 2> "$WORK/F1.log"
"$TESSERA" train --resume "$WORK/F" 2> "$WORK/F2.log" || { cat "$WORK/F2.log" >&2; fail "F: resume failed"; }
grep -q "state restored from .*step_00000003.routing (2 cached step(s))" "$WORK/F2.log" \
  || { cat "$WORK/F2.log" >&2; check_failed "F: the resume did not restore two cached steps"; }
"$PY" -c 'import json, sys; lags = [json.loads(l)["routing_lag"] for l in open(sys.argv[1])]; assert lags == [0, 0, 2, 2, 2, 2], lags' \
  "$WORK/E/metrics.jsonl" || check_failed "E: routing_lag is not 0, 0, then 2"
compare_metrics "$WORK/E/metrics.jsonl" "$WORK/F/metrics.jsonl" loss grad_norm val_loss routing_lag \
  || check_failed "F: metrics differ from E"
"$PY" "$CKPT_EQUAL" "$WORK/E/checkpoints/step_00000006.h5" "$WORK/F/checkpoints/step_00000006.h5" \
  || check_failed "F: the final checkpoint differs from E's"

step "D: routing.anticipatory = on_spike, a spike forced at step 5 (snapshots every 2 steps)"
"$TESSERA" train "$WORK/r.toml" --set routing.anticipatory=on_spike routing.force_spike_at=5 \
  routing.snapshot_every=2 routing.ar_steps=2 job.run_dir="$WORK/D" 2> "$WORK/D.log" \
  || { cat "$WORK/D.log" >&2; fail "D failed"; }
grep -q "loss spike at step 5: .*(routing.force_spike_at); rolling back to step 2 (3 step(s) lost)" "$WORK/D.log" \
  || { cat "$WORK/D.log" >&2; check_failed "D: the log does not report the rollback"; }
grep -q "anticipatory routing on from step 3" "$WORK/D.log" || check_failed "D: no 'on' line in the log"
grep -q "anticipatory routing off from step 6" "$WORK/D.log" || check_failed "D: no 'off' line in the log"
"$PY" - "$WORK/D/metrics.jsonl" <<'EOF' || check_failed "D: metrics"
import json, sys
rows = [json.loads(l, parse_float=str) for l in open(sys.argv[1])]
steps = [r["step"] for r in rows]
assert steps == [1, 2, 3, 4, 5, 3, 4, 5, 6], steps
spike = rows[4]
assert spike["spike"] is True and spike["rollback_to"] == 2 and "val_loss" not in spike, spike
assert [r["spike"] for r in rows] == [False] * 4 + [True] + [False] * 4
assert sum("rollback_to" in r for r in rows) == 1
assert [r["anticipatory_routing"] for r in rows] == [False] * 5 + [True] * 3 + [False], rows
assert [r.get("routing_lag") for r in rows[5:8]] == [0, 1, 1], rows[5:8]
# Step 3 is replayed from the restored snapshot with lag-0 (= normal) routing: bitwise the first run of step 3.
assert rows[5]["loss"] == rows[2]["loss"] and rows[5]["grad_norm"] == rows[2]["grad_norm"], (rows[2], rows[5])
print("D: steps", steps, "; step-3 loss", rows[2]["loss"], "replayed bitwise")
EOF
[[ -f $WORK/D/checkpoints/step_00000006.h5 ]] || check_failed "D: no final checkpoint"

finish
