#!/usr/bin/env bash
# Damaged or mismatched checkpoints and run directories: the commands must exit non-zero with a clear message
# naming the file (or the differing model field), and must leave the run directory exactly as it was.
set -euo pipefail
source "$(dirname "$0")/common.sh"

finished_run
snapshot "$WORK/R" > "$WORK/R.before"
size=$(stat -c %s "$CK")

for cut in half header; do
  step "truncated checkpoint ($cut)"
  T="$WORK/trunc_$cut.h5"
  cp "$CK" "$T"
  if [[ $cut == half ]]; then truncate -s $((size / 2)) "$T"; else truncate -s 1000 "$T"; fi
  expect_fail "eval_trunc_$cut" "$T" -- "$TESSERA" eval "$T"
  expect_fail "info_trunc_$cut" "$T" -- "$TESSERA" ckpt info "$T"
  expect_fail "sample_trunc_$cut" "$T" -- "$TESSERA" sample "$T" --max-new-tokens 4
  expect_fail "export_trunc_$cut" "$T" -- "$TESSERA" ckpt export "$T" --out "$WORK/export_$cut"
done

step "a file that is not HDF5 at all"
cp "$WORK/corpus.txt" "$WORK/text.h5"
expect_fail eval_not_hdf5 "$WORK/text.h5" "HDF5" -- "$TESSERA" eval "$WORK/text.h5"
expect_fail info_not_hdf5 "$WORK/text.h5" "HDF5" -- "$TESSERA" ckpt info "$WORK/text.h5"

step "a missing checkpoint and a run directory without checkpoints"
expect_fail eval_missing "$WORK/nothing.h5" "not found" -- "$TESSERA" eval "$WORK/nothing.h5"
mkdir -p "$WORK/empty_run"
expect_fail eval_empty_run "$WORK/empty_run" "no checkpoints" -- "$TESSERA" eval "$WORK/empty_run"

step "--resume with a recipe whose model shape differs from the checkpoint's"
expect_fail resume_dim "$CK" "model.dim" "64" "32" -- "$TESSERA" train --resume "$WORK/R" --set model.dim=32
expect_unchanged resume_dim "$WORK/R" "$WORK/R.before"
expect_fail resume_layers "model.n_layers" "model.ffn_dim" \
  -- "$TESSERA" train --resume "$WORK/R" --set model.n_layers=3 model.ffn_dim=128
expect_unchanged resume_layers "$WORK/R" "$WORK/R.before"

step "a new run into a run directory that already holds checkpoints"
expect_fail new_into_existing "$WORK/R" "already holds checkpoints" -- "$TESSERA" train "$WORK/r.toml"
expect_unchanged new_into_existing "$WORK/R" "$WORK/R.before"
expect_fail new_into_existing_flag "$WORK/R" "already holds checkpoints" \
  -- "$TESSERA" train "$WORK/r.toml" --run-dir "$WORK/R" --set training.steps=12
expect_unchanged new_into_existing_flag "$WORK/R" "$WORK/R.before"

step "--resume R --run-dir ELSEWHERE: refused, or continues R's checkpoint there; never a fresh run"
rc=0
"$TESSERA" train --resume "$WORK/R" --run-dir "$WORK/fork" --set training.steps=12 \
  > "$WORK/fork.out" 2> "$WORK/fork.err" || rc=$?
if [[ $rc -eq 0 ]] && grep -q '"step": 1,' "$WORK/fork/metrics.jsonl" 2> /dev/null; then
  check_failed "resume_run_dir: 'train --resume R --run-dir X' exited 0 but trained X from step 1 instead of" \
               "continuing R (or refusing); its log: $(tr '\n' ' ' < "$WORK/fork.err" | head -c 400)"
else
  echo "ok: resume_run_dir (exit $rc)"
fi
expect_unchanged resume_run_dir "$WORK/R" "$WORK/R.before"

step "--resume of a run whose latest checkpoint is truncated"
cp -a "$WORK/R" "$WORK/R2"
truncate -s $((size / 2)) "$WORK/R2/checkpoints/step_00000010.h5"
snapshot "$WORK/R2" > "$WORK/R2.before"
expect_fail resume_trunc "step_00000010.h5" -- "$TESSERA" train --resume "$WORK/R2" --set training.steps=12
expect_unchanged resume_trunc "$WORK/R2" "$WORK/R2.before"

step "the undamaged run still evaluates"
"$TESSERA" eval "$WORK/R" > "$WORK/eval.out"
grep -q '"step": 10' "$WORK/eval.out" || { cat "$WORK/eval.out" >&2; fail "eval of R does not report step 10"; }
expect_unchanged final "$WORK/R" "$WORK/R.before"
finish
