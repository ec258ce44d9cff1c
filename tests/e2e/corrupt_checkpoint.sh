#!/usr/bin/env bash
# Checkpoints with flipped bytes inside a dataset's stored data: every command that reads the damaged tensor
# must fail with an error that names the file and says it is corrupted, never compute with the damaged values.
set -euo pipefail
source "$(dirname "$0")/common.sh"
require_h5py

make_corpus "$WORK/corpus.txt" 400
write_recipe "$WORK/r.toml" "$WORK/corpus.txt" "$WORK/R"
step "a finished run R"
"$TESSERA" train "$WORK/r.toml" 2> "$WORK/R.log"
CK="$WORK/R/checkpoints/step_00000010.h5"
[[ -f $CK ]] || fail "R: no final checkpoint"

# flip FILE DATASET: inverts 8 bytes in the middle of DATASET's stored data (first chunk when chunked).
flip() {
  "$PY" - "$1" "$2" <<'EOF'
import sys, h5py
path, name = sys.argv[1], sys.argv[2]
with h5py.File(path, "r") as f:
    ds = f[name]
    if ds.chunks is not None:
        info = ds.id.get_chunk_info(0)
        start, size = info.byte_offset, info.size
    else:
        start, size = ds.id.get_offset(), ds.id.get_storage_size()
    assert start is not None and size >= 16, (name, start, size)
    off = start + size // 2
with open(path, "r+b") as fh:
    fh.seek(off)
    old = fh.read(8)
    fh.seek(off)
    fh.write(bytes(b ^ 0xFF for b in old))
print(f"flipped 8 bytes of {name} at file offset {off} (data at {start}, {size} bytes)")
EOF
}

step "flipped bytes in model/layers.0.ffn.w1"
C="$WORK/model_corrupt.h5"
cp "$CK" "$C"
flip "$C" model/layers.0.ffn.w1
cmp -s "$C" "$CK" && fail "flip changed nothing"
expect_fail eval_corrupt "$C" "corrupt" -- "$TESSERA" eval "$C"
expect_fail sample_corrupt "$C" "corrupt" -- "$TESSERA" sample "$C" --max-new-tokens 4
expect_fail export_corrupt "$C" "corrupt" -- "$TESSERA" ckpt export "$C" --out "$WORK/export"
[[ ! -e $WORK/export/model.safetensors ]] || fail "export of a corrupted checkpoint wrote model.safetensors"

step "flipped bytes in the largest weight of the run's latest checkpoint: --resume"
cp -a "$WORK/R" "$WORK/R1"
flip "$WORK/R1/checkpoints/step_00000010.h5" model/output
snapshot "$WORK/R1" > "$WORK/R1.before"
expect_fail resume_model_corrupt "step_00000010.h5" "corrupt" \
  -- "$TESSERA" train --resume "$WORK/R1" --set training.steps=12
expect_unchanged resume_model_corrupt "$WORK/R1" "$WORK/R1.before"

step "flipped bytes in an AdamW moment: --resume must notice (eval does not read the optimizer state)"
cp -a "$WORK/R" "$WORK/R2"
flip "$WORK/R2/checkpoints/step_00000010.h5" optim/adamw/v/tok_embeddings
snapshot "$WORK/R2" > "$WORK/R2.before"
expect_fail resume_optim_corrupt "step_00000010.h5" "corrupt" \
  -- "$TESSERA" train --resume "$WORK/R2" --set training.steps=12
expect_unchanged resume_optim_corrupt "$WORK/R2" "$WORK/R2.before"
echo PASS
