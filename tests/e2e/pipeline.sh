#!/usr/bin/env bash
# `tessera pipeline` end to end: a six-stage pipeline (arithmetic conversations, their chat dataset, a 10-step tiny
# pretraining, a 10-step SFT from it, held-out prompts, the SFT model's reward on them by `tessera eval-rewards`
# into a file). The first run runs every stage; the second does nothing and says so;
# changing the SFT stage's `set` reruns SFT only; changing the pretraining recipe reruns pretraining and SFT (a dry
# run says so first and touches nothing); a failing stage (a bad recipe, a failing command) stops the pipeline
# with the stage's name and a non-zero exit, and the SFT run finished before is still there, unchanged.
set -euo pipefail
source "$(dirname "$0")/common.sh"
export OMP_WAIT_POLICY=passive

cd "$WORK"  # the pipeline's paths are relative to where tessera runs
make_corpus corpus.txt 400
write_recipe pre.toml corpus.txt runs/P
cat > sft.toml <<EOT
inherit = "$TINY"
stage = "sft"

[job]
name = "sft"
run_dir = "runs/S"
seed = 2

[init]
checkpoint = "runs/P"

[data]
dataset = "data/sft.h5"

[training]
steps = 10
batch_size = 8
seq_len = 64

[optimizer]
lr = 3e-3

[eval]
every = 10
batches = 2

[checkpoint]
every = 10

[metrics]
peak_flops = 1e11
EOT

# write_pipeline FILE SFT_SET SFT_RECIPE
write_pipeline() {
  cat > "$1" <<EOT
name = "e2e"

[[stage]]
name = "chat"
command = ["data", "prompts", "--task", "arithmetic", "--n", "300", "--seed", "3", "--chat", "--out", "data/chat.jsonl"]
outputs = ["data/chat.jsonl"]

[[stage]]
name = "sft-data"
command = ["data", "prepare", "data/chat.jsonl", "--format", "chat", "--val-fraction", "0.1", "--out", "data/sft.h5"]
outputs = ["data/sft.h5"]

[[stage]]
name = "pretrain"
recipe = "pre.toml"
after = []

[[stage]]
name = "sft"
recipe = "$3"
set = [$2]
after = ["sft-data", "pretrain"]

[[stage]]
name = "eval-prompts"
after = []
command = ["data", "prompts", "--task", "arithmetic", "--difficulty", "1", "--n", "16", "--seed", "9", "--out", "data/eval.jsonl"]
outputs = ["data/eval.jsonl"]

[[stage]]
name = "sft-eval"
after = ["sft", "eval-prompts"]
command = ["eval-rewards", "runs/S", "--prompts", "data/eval.jsonl", "--reward", "arithmetic", "--reward", "format:0.1",
           "--temperature", "1", "--samples", "2", "--max-new-tokens", "8"]
stdout = "runs/eval/sft.json"
EOT
}

# run_pipeline NAME ARGS...: runs `tessera pipeline ARGS`, output in NAME.log; fails the script if it fails.
run_pipeline() {
  local name=$1
  shift
  "$TESSERA" pipeline "$@" > "$name.log" 2>&1 || { cat "$name.log" >&2; fail "$name: tessera pipeline $* failed"; }
  grep -E '^(stage|pipeline) ' "$name.log" | sed 's/^/  | /'
}
expect_line() {  # expect_line CASE LOG LINE_REGEX
  grep -qE "$3" "$2" || check_failed "$1: '$3' not in $2"
}
expect_no_line() {
  if grep -qE "$3" "$2"; then check_failed "$1: '$3' should not be in $2"; fi
}

write_pipeline pipe.toml "" sft.toml
step "first run: every stage runs"
run_pipeline first pipe.toml
for s in chat sft-data pretrain sft eval-prompts sft-eval; do expect_line first first.log "^stage $s: running"; done
[[ -f runs/S/checkpoints/step_00000010.h5 ]] || fail "no SFT checkpoint after the first run"
[[ -f runs/pipelines/e2e/sft.stamp ]] || fail "no stamp for the SFT stage"
cat runs/eval/sft.json
grep -q '"responses": 32, ' runs/eval/sft.json || check_failed "eval-rewards (stdout of a command stage): no 32 responses"
grep -q '"terms": {"arithmetic": [0-9.]*, "format": [0-9.]*}' runs/eval/sft.json \
  || check_failed "eval-rewards: no per-term means"

step "second run: nothing to do"
snapshot runs > before_runs.sha
snapshot data > before_data.sha
run_pipeline second pipe.toml
for s in chat sft-data pretrain sft eval-prompts sft-eval; do expect_line second second.log "^stage $s: up to date"; done
expect_line second second.log "^pipeline e2e: nothing to do"
expect_no_line second second.log "running"
expect_unchanged second_run_changed_no_run runs before_runs.sha
expect_unchanged second_run_changed_no_data data before_data.sha

step "SFT's set changes: SFT reruns, nothing else"
sha_pre=$(sha256sum runs/P/checkpoints/step_00000010.h5)
sha_sft=$(sha256sum runs/S/checkpoints/step_00000010.h5)
write_pipeline pipe.toml '"optimizer.lr=1e-3"' sft.toml
run_pipeline set_changed pipe.toml
for s in chat sft-data pretrain; do expect_line set_changed set_changed.log "^stage $s: up to date"; done
expect_line set_changed set_changed.log "^stage sft: running \(its recipe changed\)"
expect_line set_changed set_changed.log "^stage sft-eval: running \(after sft, which ran\)"
expect_line set_changed set_changed.log "^stage eval-prompts: up to date"
[[ $(sha256sum runs/P/checkpoints/step_00000010.h5) == "$sha_pre" ]] || check_failed "pretraining checkpoint changed"
[[ $(sha256sum runs/S/checkpoints/step_00000010.h5) != "$sha_sft" ]] || check_failed "SFT did not rerun with lr 1e-3"
[[ ! -e runs/S.previous ]] || check_failed "the earlier SFT run was not cleaned up"

step "the pretraining recipe changes: a dry run says what would run, then pretraining and SFT rerun"
echo "# a change" >> pre.toml
snapshot runs > before_dry.sha
run_pipeline dry pipe.toml --dry-run
expect_line dry dry.log "^stage pretrain: would run \(its recipe changed\)"
expect_line dry dry.log "^stage sft: would run \(after pretrain, which would run\)"
expect_line dry dry.log "^stage chat: up to date"
expect_unchanged dry_run_changed_nothing runs before_dry.sha
run_pipeline pre_changed pipe.toml
expect_line pre_changed pre_changed.log "^stage pretrain: running"
expect_line pre_changed pre_changed.log "^stage sft: running \(after pretrain, which ran\)"
expect_line pre_changed pre_changed.log "^stage sft-data: up to date"
run_pipeline again pipe.toml
expect_line again again.log "^pipeline e2e: nothing to do"

step "--from reruns a stage and what depends on it"
run_pipeline from pipe.toml --from sft-data
expect_line from from.log "^stage sft-data: running \(--from\)"
expect_line from from.log "^stage sft: running \(after sft-data, which ran\)"
expect_line from from.log "^stage pretrain: up to date"

step "eval-rewards errors"
expect_fail unknown_reward "reward 'nope': unknown; known: arithmetic, countdown, format, gsm8k" -- \
  "$TESSERA" eval-rewards runs/S --prompts data/eval.jsonl --reward nope
printf '{"task": "arithmetic", "question": "What is 1 + 1?", "answer": "2"}\n{"question": 5}\n' > bad.jsonl
expect_fail bad_prompts "bad.jsonl:2" -- "$TESSERA" eval-rewards runs/S --prompts bad.jsonl --reward arithmetic
expect_fail bad_weight "reward 'format:x': the weight" -- "$TESSERA" eval-rewards runs/S --prompts data/eval.jsonl --reward format:x

step "failing stages stop the pipeline; the finished runs stay"
snapshot runs/S > before_fail.sha
printf 'inherit = "sft.toml"\n[training]\nstpes = 3\n' > bad.toml
write_pipeline bad.toml.pipe.toml "" bad.toml
expect_fail bad_recipe "stage sft failed" "unknown key 'training.stpes'" -- "$TESSERA" pipeline bad.toml.pipe.toml
expect_unchanged failed_stage_kept_the_earlier_run runs/S before_fail.sha
sed 's/"--task", "arithmetic"/"--task", "nope"/' pipe.toml > badcmd.toml
expect_fail bad_command "stage chat failed" "exited with status" -- "$TESSERA" pipeline badcmd.toml
printf '[[stage]]\nname = "a"\nrecipe = "pre.toml"\nrecipes = 1\n' > typo.toml
expect_fail unknown_key "typo.toml:4" "unknown key 'stage.recipes'" -- "$TESSERA" pipeline typo.toml
printf '[[stage]]\nname = "a"\nrecipe = "pre.toml"\nafter = ["b"]\n[[stage]]\nname = "b"\nrecipe = "pre.toml"\n' > cycle.toml
expect_fail cycle "cycle" -- "$TESSERA" pipeline cycle.toml
finish
