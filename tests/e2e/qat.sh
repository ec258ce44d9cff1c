#!/usr/bin/env bash
# Quantisation-aware training end to end on the tiny V4 model (recipes/models/v4-tiny.toml; docs/post-training.md
# "Quantisation-aware training"): a short fp32 pretraining on arithmetic conversations, SFT with training.qat =
# "fp4_fp8", then GRPO with training.qat = "fp4_fp8". Checked: the stages log the quantised weight counts; in GRPO
# the trainer's log-probabilities equal the sampler's (mismatch within 1e-5 of 1: both at the quantised weights) and
# the single update per step sees exactly the rollout policy (ratio 1: the update ran at the quantised weights too);
# the checkpoints hold fp32 master weights that differ from their quantised values (`tessera ckpt quantize`), while
# the unquantised tensors are equal; the quantised checkpoint's routed experts lie on the FP4 grid (power-of-two
# scale per 1 x 32 block) and its other matrices on the FP8 e4m3 grid (per 128 x 128 tile); quantising it again
# changes nothing; `tessera eval` reads it; a bad mode is an error.
set -euo pipefail
source "$(dirname "$0")/common.sh"
require_h5py
export OMP_WAIT_POLICY=passive
V4TINY="$REPO/recipes/models/v4-tiny.toml"

step "arithmetic conversations and prompts; a 4-step fp32 pretraining of the tiny V4 model"
arithmetic_chat_data 600
"$TESSERA" data prompts --task arithmetic --difficulty 1 --n 100 --seed 2 --out "$WORK/train.jsonl" > /dev/null
"$TESSERA" data prompts --task arithmetic --difficulty 1 --n 4 --seed 3 --out "$WORK/eval.jsonl" > /dev/null
cat > "$WORK/pre.toml" <<EOT
inherit = "$V4TINY"
[job]
run_dir = "$WORK/P"
[data]
dataset = "$WORK/chat.h5"
[training]
steps = 4
batch_size = 8
seq_len = 64
[optimizer]
lr = 3e-3
[eval]
every = 4
batches = 1
EOT
"$TESSERA" train "$WORK/pre.toml" 2> "$WORK/P.log" || { cat "$WORK/P.log" >&2; fail "pretraining failed"; }

step "SFT, training.qat = fp4_fp8, 3 steps"
cat > "$WORK/sft.toml" <<EOT
inherit = "$V4TINY"
stage = "sft"
[job]
run_dir = "$WORK/S"
seed = 2
[init]
checkpoint = "$WORK/P"
[data]
dataset = "$WORK/chat.h5"
[training]
steps = 3
batch_size = 8
seq_len = 64
qat = "fp4_fp8"
[optimizer]
lr = 3e-3
[eval]
every = 3
batches = 1
EOT
"$TESSERA" train "$WORK/sft.toml" 2> "$WORK/S.log" || { cat "$WORK/S.log" >&2; fail "SFT with QAT failed"; }
# v4-tiny: 5 layers + the MTP block, each with routed experts w1, w2, w3.
grep -q 'quantisation-aware training (training.qat = "fp4_fp8"): 18 routed-expert weights in FP4' "$WORK/S.log" \
  || { grep quantisation "$WORK/S.log" >&2; check_failed "SFT: the QAT log line (18 FP4 expert weights)"; }
grep -q '^qat = "fp4_fp8"' "$WORK/S/recipe.toml" || check_failed "SFT: training.qat missing from the effective recipe"

step "GRPO, training.qat = fp4_fp8, 2 steps: sampler = trainer at the quantised weights"
cat > "$WORK/grpo.toml" <<EOT
inherit = "$V4TINY"
stage = "grpo"
[job]
run_dir = "$WORK/G"
seed = 5
[init]
checkpoint = "$WORK/S"
[prompts]
train = "$WORK/train.jsonl"
eval = "$WORK/eval.jsonl"
[rewards]
terms = ["arithmetic", "format:0.1"]
[training]
steps = 2
qat = "fp4_fp8"
[grpo]
prompts_per_step = 2
group_size = 4
micro_batch_rows = 8
kl_coef = 0.01
[sampling]
max_new_tokens = 6
[optimizer]
lr = 3e-3
[eval]
every = 2
[checkpoint]
every = 2
EOT
"$TESSERA" train "$WORK/grpo.toml" 2> "$WORK/G.log" || { cat "$WORK/G.log" >&2; fail "GRPO with QAT failed"; }
grep -q "quantisation-aware training" "$WORK/G.log" || check_failed "GRPO: no QAT log line"
"$PY" - "$WORK/G/metrics.jsonl" <<'PYEOF' || check_failed "GRPO with QAT: mismatch / ratio"
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if '"kind"' not in l]
assert len(rows) == 2, rows
for r in rows:
    assert abs(r["logprob_mismatch"] - 1.0) < 1e-5 and r["logprob_mismatch_max"] < 1.0001, r
    assert r["ratio_mean"] == 1.0, r["ratio_mean"]  # one update per step, at the rollout's (quantised) weights
print("mismatch", [r["logprob_mismatch"] for r in rows], "ratio", [r["ratio_mean"] for r in rows])
PYEOF

step "checkpoints hold fp32 masters; ckpt quantize writes the quantised values"
"$TESSERA" ckpt quantize "$WORK/G" --mode fp4_fp8 --out "$WORK/GQ.h5" > "$WORK/GQ.json" \
  || fail "ckpt quantize failed"
cat "$WORK/GQ.json"
"$TESSERA" ckpt quantize "$WORK/GQ.h5" --mode fp4_fp8 --out "$WORK/GQQ.h5" > /dev/null || fail "ckpt quantize (again) failed"
"$PY" - "$WORK/G/checkpoints/step_00000002.h5" "$WORK/GQ.h5" "$WORK/GQQ.h5" <<'PYEOF' \
  || check_failed "masters / quantised values"
import sys, h5py, numpy as np
g, q, qq = (h5py.File(p, "r")["model"] for p in sys.argv[1:4])
E2M1 = np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6])
def on_fp4_grid(w):  # [E, out, in]: a power-of-two scale per 1 x 32 block of each row
    b = w.reshape(-1, w.shape[-1] // 32, 32).astype(np.float64)
    amax = np.abs(b).max(-1, keepdims=True)
    k = np.where(amax > 0, np.ceil(np.log2(np.where(amax > 0, amax, 1) / 6)), 0)
    return np.isin(np.abs(b) / 2.0 ** k, E2M1).all()
def on_fp8_grid(w):  # every value c 2^K with c an e4m3 value and K its 128 x 128 tile's scale
    m = w.reshape(-1, w.shape[-2], w.shape[-1]).astype(np.float64)
    for s in m:
        for i in range(0, s.shape[0], 128):
            for j in range(0, s.shape[1], 128):
                t = s[i:i + 128, j:j + 128]
                amax = np.abs(t).max()
                if amax == 0: continue
                K = np.ceil(np.log2(amax / 448))
                x = np.abs(t) / 2.0 ** K
                e = np.floor(np.log2(np.where(x > 0, x, 1)))
                step = 2.0 ** (np.maximum(e, -6) - 3)  # 3 mantissa bits; subnormals below 2^-6
                if not (np.all(x <= 448) and np.all(np.mod(x, step) == 0)): return False
    return True
fp4 = fp8 = same = 0
for n in g:
    a, b, c = g[n][()], q[n][()], qq[n][()]
    assert a.dtype == b.dtype and (a.dtype == np.float32 or a.dtype.kind == "i"), (n, a.dtype, b.dtype)
    assert np.array_equal(b, c), f"{n}: quantising the quantised checkpoint changed it"
    if np.array_equal(a, b):
        same += 1
        assert ".experts." not in n and not n.endswith(("attn.wq_a", "attn.wkv", "shared.w1")), f"{n} unquantised"
        continue
    if ".experts." in n:
        assert on_fp4_grid(b), f"{n}: not on the FP4 grid"
        assert not on_fp4_grid(a), f"{n}: the checkpoint holds quantised values, not the fp32 master"
        fp4 += 1
    else:
        assert on_fp8_grid(b), f"{n}: not on the FP8 grid"
        assert not on_fp8_grid(a), f"{n}: the checkpoint holds quantised values, not the fp32 master"
        fp8 += 1
assert fp4 == 18 and fp8 > 0 and same > 0, (fp4, fp8, same)
print(f"{fp4} FP4 expert tensors, {fp8} FP8 matrices differ from the fp32 masters; {same} tensors unquantised")
PYEOF

step "eval of the SFT checkpoint and of its quantised form"
"$TESSERA" ckpt quantize "$WORK/S" --mode fp4_fp8 --out "$WORK/SQ.h5" > /dev/null || fail "ckpt quantize (SFT) failed"
"$TESSERA" eval "$WORK/S" > "$WORK/S.eval" || fail "eval of the SFT run failed"
"$TESSERA" eval "$WORK/SQ.h5" > "$WORK/SQ.eval" || fail "eval of the quantised SFT checkpoint failed"
"$PY" - "$WORK/S.eval" "$WORK/SQ.eval" <<'PYEOF' || check_failed "eval of the quantised checkpoint"
import json, math, sys
a, b = (json.load(open(p)) for p in sys.argv[1:3])
assert math.isfinite(a["loss"]) and math.isfinite(b["loss"]) and a["loss"] != b["loss"], (a, b)
print(f"held-out loss: fp32 masters {a['loss']:.4f}, quantised {b['loss']:.4f}")
PYEOF

step "errors: a bad training.qat, a bad --mode"
if "$TESSERA" train "$WORK/sft.toml" --set training.qat=fp4 job.run_dir="$WORK/X" 2> "$WORK/X.log"; then
  check_failed "training.qat = fp4 was accepted"
fi
grep -q "training.qat" "$WORK/X.log" || { cat "$WORK/X.log" >&2; check_failed "the error does not name training.qat"; }
if "$TESSERA" ckpt quantize "$WORK/S" --mode int8 --out "$WORK/Y.h5" 2> "$WORK/Y.log"; then
  check_failed "--mode int8 was accepted"
fi

finish
