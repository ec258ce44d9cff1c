#!/usr/bin/env bash
# The OPD stage (stage = "opd") end to end on tiny models: a student and two teachers (one per domain, one of
# them a different size) pretrained on arithmetic conversations. Checked: with the student as its own teacher
# the full-vocabulary reverse KL is exactly 0 and the weights do not move; towards real teachers the divergence
# falls; per-domain rewards and held-out rewards are logged; mpirun -np 2 gives bitwise the one-process
# checkpoint; the sampled-token form runs; a per-domain response budget caps sampling and evaluation; a teacher with another vocabulary, a domain without a teacher and an
# unknown divergence are clear errors.
set -euo pipefail
source "$(dirname "$0")/common.sh"
require_h5py
export OMP_WAIT_POLICY=passive
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_mpi_yield_when_idle=1

step "data and three short pretrainings: student S (20 steps), teachers A (60 steps) and B (dim 32, 60 steps)"
arithmetic_chat_data 2000
"$TESSERA" data prompts --task arithmetic --difficulty 1 --n 200 --seed 2 --out "$WORK/add.jsonl" > /dev/null
"$TESSERA" data prompts --task arithmetic --difficulty 2 --n 200 --seed 3 --out "$WORK/two.jsonl" > /dev/null
"$TESSERA" data prompts --task arithmetic --difficulty 1 --n 8 --seed 4 --out "$WORK/eval.jsonl" > /dev/null
cat > "$WORK/pre.toml" <<EOT
inherit = "$TINY"
[data]
dataset = "$WORK/chat.h5"
[training]
steps = 60
batch_size = 16
seq_len = 64
[optimizer]
lr = 3e-3
[eval]
every = 60
batches = 1
EOT
"$TESSERA" train "$WORK/pre.toml" --set training.steps=20 job.run_dir="$WORK/S" 2> "$WORK/S.log" || { cat "$WORK/S.log" >&2; fail "S"; }
"$TESSERA" train "$WORK/pre.toml" --set job.run_dir="$WORK/A" 2> "$WORK/A.log" || { cat "$WORK/A.log" >&2; fail "A"; }
"$TESSERA" train "$WORK/pre.toml" --set job.run_dir="$WORK/B" model.dim=32 2> "$WORK/B.log" || { cat "$WORK/B.log" >&2; fail "B"; }

cat > "$WORK/opd.toml" <<EOT
inherit = "$TINY"
stage = "opd"
domains = ["arith", "two"]
[job]
seed = 3
[init]
checkpoint = "$WORK/S"
[domain.arith]
prompts = "$WORK/add.jsonl"
eval = "$WORK/eval.jsonl"
rewards = ["arithmetic"]
teacher = "$WORK/A"
[domain.two]
prompts = "$WORK/two.jsonl"
rewards = ["arithmetic", "format:0.1"]
teacher = "$WORK/B"
weight = 0.5
[training]
steps = 12
[grpo]
prompts_per_step = 8
group_size = 2
micro_batch_rows = 4
mini_batches = 2
[sampling]
max_new_tokens = 6
[optimizer]
lr = 3e-3
weight_decay = 0.0
[eval]
every = 6
[checkpoint]
every = 6
EOT

step "the student as its own teacher: divergence exactly 0, weights unchanged"
"$TESSERA" train "$WORK/opd.toml" --set training.steps=2 domain.arith.teacher="$WORK/S" domain.two.teacher="$WORK/S" \
  job.run_dir="$WORK/Z" 2> "$WORK/Z.log" || { cat "$WORK/Z.log" >&2; fail "OPD with the student as teacher failed"; }
"$PY" - "$WORK/Z/metrics.jsonl" "$WORK/S/checkpoints/step_00000020.h5" "$WORK/Z/checkpoints/step_00000002.h5" <<'PYEOF' \
  || check_failed "self-distillation is not a no-op"
import json, sys, h5py, numpy as np
rows = [json.loads(l) for l in open(sys.argv[1]) if '"kind"' not in l]
assert all(r["distill_divergence"] == 0 and r["loss"] == 0 and r["grad_norm"] == 0 for r in rows), rows
a, b = h5py.File(sys.argv[2]), h5py.File(sys.argv[3])
assert all(np.array_equal(a["model"][n][()], b["model"][n][()]) for n in a["model"])
print("divergence 0, gradient 0, weights unchanged")
PYEOF

step "towards teachers A and B: the divergence falls; per-domain and held-out rewards logged"
"$TESSERA" train "$WORK/opd.toml" --set job.run_dir="$WORK/O" 2> "$WORK/O.log" || { cat "$WORK/O.log" >&2; fail "OPD failed"; }
grep -q "teacher of domain two: .*/B/" "$WORK/O.log" || check_failed "the log does not name the teachers"
"$PY" - "$WORK/O/metrics.jsonl" <<'PYEOF' || check_failed "OPD metrics"
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
train = [r for r in rows if r.get("kind") is None]
first = train[0]["distill_divergence"]
last = sum(r["distill_divergence"] for r in train[-3:]) / 3
print(f"divergence: step 1 {first:.4f}, mean of the last 3 {last:.4f}")
assert last < 0.7 * first, (first, last)
for key in ("reward/arith", "reward/two", "reward/arith/arithmetic", "reward/two/format", "logprob_mismatch"):
    assert key in train[0], key
assert rows[0].get("kind") == "eval" and "eval_reward/arith" in rows[0], rows[0]
assert abs(train[0]["logprob_mismatch"] - 1) < 1e-5
PYEOF

step "mpirun -np 2, parallel.dp = 2: bitwise the one-process checkpoint"
mpirun --oversubscribe -np 2 "$TESSERA" train "$WORK/opd.toml" --set parallel.dp=2 job.run_dir="$WORK/D" \
  > "$WORK/D.log" 2>&1 || { cat "$WORK/D.log" >&2; fail "OPD under mpirun failed"; }
"$PY" "$REPO/tests/e2e/ckpt_equal.py" "$WORK/O/checkpoints/step_00000012.h5" "$WORK/D/checkpoints/step_00000012.h5" \
  || check_failed "dp=2 differs from one process"

step "sampled-token form, with a response budget of 2 tokens per prompt set (domain.NAME.max_new_tokens)"
"$TESSERA" train "$WORK/opd.toml" --set opd.form=sampled_token training.steps=2 domain.arith.max_new_tokens=2 \
  domain.two.max_new_tokens=2 job.run_dir="$WORK/T" 2> "$WORK/T.log" \
  || { cat "$WORK/T.log" >&2; check_failed "sampled-token OPD failed"; }
"$PY" - "$WORK/T/metrics.jsonl" <<'PYEOF' || check_failed "per-domain response budget not applied"
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if '"kind"' not in l]
assert all(r["response_length_max"] <= 2 and r["frac_truncated"] > 0.5 for r in rows), rows
assert all(r["eval_response_length_mean"] <= 2 for r in rows if "eval_response_length_mean" in r), rows
PYEOF

step "errors"
"$TESSERA" train "$WORK/pre.toml" --set training.steps=1 model.vocab_size=300 job.run_dir="$WORK/W" 2> /dev/null
expect_error vocab "teacher '.*W/checkpoints/step_00000001.h5' has a vocabulary of 300 tokens, the student 2.*share the tokenizer" \
  train "$WORK/opd.toml" --set domain.two.teacher="$WORK/W" job.run_dir="$WORK/E1"
expect_error teacher "domain 'two' needs domain.two.teacher" \
  train "$WORK/opd.toml" --set domain.two.teacher="" job.run_dir="$WORK/E2"
expect_error divergence "key 'opd.divergence'.*reverse_kl" \
  train "$WORK/opd.toml" --set opd.divergence=kl job.run_dir="$WORK/E3"
finish
