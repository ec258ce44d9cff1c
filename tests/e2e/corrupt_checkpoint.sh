#!/usr/bin/env bash
# Checkpoints with damaged bytes inside a dataset's stored data: every command that reads the damaged tensor
# must fail with an error that names the file and says it is corrupted, never compute with the damaged values,
# and a failed --resume must leave the run directory as it was.
set -euo pipefail
source "$(dirname "$0")/common.sh"
require_h5py
FLIP="$(dirname "$0")/flip_bytes.py"

finished_run

step "flipped bytes in model/layers.0.ffn.w1: eval, sample, export"
C="$WORK/model_corrupt.h5"
cp "$CK" "$C"
"$PY" "$FLIP" "$C" model/layers.0.ffn.w1 0x5A
cmp -s "$C" "$CK" && fail "flip_bytes.py changed nothing"
expect_fail eval_corrupt "$C" "corrupt" -- "$TESSERA" eval "$C"
expect_fail sample_corrupt "$C" "corrupt" -- "$TESSERA" sample "$C" --max-new-tokens 4
expect_fail export_corrupt "$C" "corrupt" -- "$TESSERA" ckpt export "$C" --out "$WORK/export"
[[ ! -e $WORK/export/model.safetensors ]] || check_failed "export_corrupt: wrote model.safetensors anyway"

step "flipped bytes in a weight of the run's latest checkpoint: --resume"
cp -a "$WORK/R" "$WORK/R1"
"$PY" "$FLIP" "$WORK/R1/checkpoints/step_00000010.h5" model/output 0x5A
snapshot "$WORK/R1" > "$WORK/R1.before"
expect_fail resume_model_corrupt "step_00000010.h5" "corrupt" \
  -- "$TESSERA" train --resume "$WORK/R1" --set training.steps=12
expect_unchanged resume_model_corrupt "$WORK/R1" "$WORK/R1.before"

step "flipped bytes in an AdamW moment: --resume must notice (eval does not read the optimizer state)"
cp -a "$WORK/R" "$WORK/R2"
"$PY" "$FLIP" "$WORK/R2/checkpoints/step_00000010.h5" optim/adamw/m/layers.1.ffn.w2 0x5A
snapshot "$WORK/R2" > "$WORK/R2.before"
expect_fail resume_optim_corrupt "step_00000010.h5" "corrupt" \
  -- "$TESSERA" train --resume "$WORK/R2" --set training.steps=12
expect_unchanged resume_optim_corrupt "$WORK/R2" "$WORK/R2.before"

step "all-zero bytes of an AdamW moment set to 0xFF (NaN), which Fletcher-32 cannot see: --resume"
# The second moments of byte embeddings the corpus never uses stay exactly zero. Resuming with NaN there would
# go on silently (those rows get no gradient, so the loss stays finite) and leave NaN weights behind.
cp -a "$WORK/R" "$WORK/R3"
"$PY" "$FLIP" "$WORK/R3/checkpoints/step_00000010.h5" optim/adamw/v/tok_embeddings zero-row
snapshot "$WORK/R3" > "$WORK/R3.before"
expect_fail resume_optim_nan "step_00000010.h5" -- "$TESSERA" train --resume "$WORK/R3" --set training.steps=12
expect_unchanged resume_optim_nan "$WORK/R3" "$WORK/R3.before"
finish
