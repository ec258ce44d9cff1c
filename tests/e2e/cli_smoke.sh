#!/usr/bin/env bash
# Every command once on the tiny model: train, eval, sample, ckpt info, ckpt export, inspect; checks what
# they write and print (only the Python standard library is needed).
set -euo pipefail
source "$(dirname "$0")/common.sh"

make_corpus "$WORK/corpus.txt" 600
RUN="$WORK/run"
write_recipe "$WORK/r.toml" "$WORK/corpus.txt" "$RUN"

step "train: 10 steps"
TESSERA_PYTHON=$PY "$TESSERA" train "$WORK/r.toml" 2> "$WORK/train.log"
for f in metrics.jsonl recipe.toml checkpoints/step_00000005.h5 checkpoints/step_00000010.h5; do
  [[ -s $RUN/$f ]] || fail "train did not write $RUN/$f"
done
[[ $(ls "$RUN/checkpoints" | tr '\n' ' ') == "step_00000005.h5 step_00000010.h5 " ]] \
  || fail "checkpoints/ holds: $(ls "$RUN/checkpoints")"

if "$PY" -c "import matplotlib" 2> /dev/null; then
  [[ $(head -c 4 "$RUN/loss.png" | tail -c 3) == PNG ]] || fail "no loss.png in $RUN although $PY has matplotlib"
else
  echo "($PY has no matplotlib: loss.png not checked)"
fi

step "metrics.jsonl: one JSON object per step with the documented keys"
"$PY" - "$RUN/metrics.jsonl" <<'EOF'
import json, math, sys
rows = []
for n, line in enumerate(open(sys.argv[1]), 1):
    try:
        rows.append(json.loads(line))
    except ValueError as e:
        sys.exit(f"metrics.jsonl line {n} is not JSON ({e}): {line!r}")
assert [r["step"] for r in rows] == list(range(1, 11)), [r.get("step") for r in rows]
for r in rows:
    for key in ("step", "loss", "lr", "grad_norm", "tokens_per_s", "mfu"):
        assert key in r, f"step {r['step']}: no '{key}' in {r}"
        assert isinstance(r[key], (int, float)) and math.isfinite(r[key]), f"step {r['step']}: {key} = {r[key]}"
    assert r["loss"] > 0 and r["lr"] > 0 and r["grad_norm"] >= 0 and r["tokens_per_s"] > 0 and r["mfu"] > 0, r
assert [r["step"] for r in rows if "val_loss" in r] == [5, 10], "val_loss expected at steps 5 and 10 (eval.every = 5)"
assert rows[-1]["loss"] < rows[0]["loss"], f"loss did not fall: {rows[0]['loss']} -> {rows[-1]['loss']}"
print(f"{len(rows)} lines; loss {rows[0]['loss']} -> {rows[-1]['loss']}, val_loss {rows[-1]['val_loss']}")
EOF

step "recipe.toml: the effective recipe parses back, reproduces the run, and is a fixed point"
grep -q '^steps = 10$' "$RUN/recipe.toml" || fail "recipe.toml lacks 'steps = 10'"
grep -q '^dim = 64$' "$RUN/recipe.toml" || fail "recipe.toml lacks the inherited model ('dim = 64')"
"$TESSERA" train "$RUN/recipe.toml" --run-dir "$WORK/rerun" --stop-after 2 2> "$WORK/rerun.log" \
  || { cat "$WORK/rerun.log" >&2; fail "tessera train of the run's own recipe.toml failed"; }
cmp "$RUN/recipe.toml" "$WORK/rerun/recipe.toml" \
  || { diff "$RUN/recipe.toml" "$WORK/rerun/recipe.toml" >&2; fail "re-reading recipe.toml changed it"; }
diff <(head -n 2 "$RUN/metrics.jsonl" | grep -o '"loss": [^,]*') \
     <(grep -o '"loss": [^,]*' "$WORK/rerun/metrics.jsonl") \
  || fail "the effective recipe does not reproduce the losses of steps 1-2"

step "eval with its defaults (the trainer's held-out evaluation) gives the final val_loss"
"$TESSERA" eval "$RUN" > "$WORK/eval.out"
"$PY" - "$WORK/eval.out" "$RUN/metrics.jsonl" <<'EOF'
import json, math, sys
out = open(sys.argv[1]).read().splitlines()
assert len(out) == 1, f"eval printed {len(out)} lines: {out}"
e = json.loads(out[0])
assert e["step"] == 10 and e["split"] == "val" and math.isfinite(e["loss"]), e
val = [json.loads(l) for l in open(sys.argv[2])][-1]["val_loss"]
# metrics.jsonl keeps 6 significant digits and eval prints 6 decimals: allow exactly that rounding.
tol = 0.5 * 10 ** (math.floor(math.log10(abs(val))) - 5) + 0.5e-6 + 1e-12
assert abs(e["loss"] - val) <= tol, f"eval loss {e['loss']} vs final val_loss {val} (tolerance {tol:.2g})"
print(f"eval loss {e['loss']} == val_loss {val} (to {tol:.2g})")
EOF

step "eval with explicit --seq-len, --batch-size, --max-batches"
"$TESSERA" eval "$RUN" --seq-len 32 --batch-size 4 --max-batches 2 > "$WORK/eval_flags.out"
"$PY" -c '
import json, math, sys
out = open(sys.argv[1]).read().splitlines()
assert len(out) == 1, out
e = json.loads(out[0])
assert e["step"] == 10 and e["split"] == "val" and e["seq_len"] == 32 and math.isfinite(e["loss"]), e
print(e)' "$WORK/eval_flags.out"

step "eval on a given file"
"$TESSERA" eval "$RUN/checkpoints/step_00000005.h5" --data "$WORK/corpus.txt" --max-batches 2 > "$WORK/eval_data.out"
grep -q '"step": 5, "split": "all"' "$WORK/eval_data.out" || { cat "$WORK/eval_data.out" >&2; fail "eval --data"; }

step "sample: same seed, same text; another seed, other text"
"$TESSERA" sample "$RUN" --prompt "The " --max-new-tokens 20 --seed 1 > "$WORK/s1a.txt"
"$TESSERA" sample "$RUN" --prompt "The " --max-new-tokens 20 --seed 1 > "$WORK/s1b.txt"
"$TESSERA" sample "$RUN" --prompt "The " --max-new-tokens 20 --seed 2 > "$WORK/s2.txt"
cmp "$WORK/s1a.txt" "$WORK/s1b.txt" || fail "two samples with --seed 1 differ"
cmp -s "$WORK/s1a.txt" "$WORK/s2.txt" && fail "samples with --seed 1 and --seed 2 are identical"
[[ $(head -c 4 "$WORK/s1a.txt") == "The " ]] || fail "the sample does not start with the prompt"
[[ $(stat -c %s "$WORK/s1a.txt") -gt 5 ]] || fail "the sample generated nothing"

step "ckpt info"
"$TESSERA" ckpt info "$RUN" > "$WORK/info.out"
cat "$WORK/info.out"
grep -q '^step: 10$' "$WORK/info.out" || fail "ckpt info does not print 'step: 10'"
grep -q '^checkpoint: .*step_00000010.h5$' "$WORK/info.out" || fail "ckpt info does not name the latest checkpoint"
grep -q '^parameters: 133440$' "$WORK/info.out" || fail "ckpt info does not print 133440 parameters"

step "ckpt export --format hf"
"$TESSERA" ckpt export "$RUN" --format hf --out "$WORK/hf" > /dev/null
"$PY" - "$WORK/hf" <<'EOF'
import json, math, os, struct, sys
d = sys.argv[1]
cfg = json.load(open(os.path.join(d, "config.json")))
want = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "intermediate_size": 192, "vocab_size": 272}
for k, v in want.items():
    assert cfg.get(k) == v, f"config.json {k} = {cfg.get(k)}, expected {v}"
raw = open(os.path.join(d, "model.safetensors"), "rb").read()
n = struct.unpack("<Q", raw[:8])[0]
header = json.loads(raw[8:8 + n])
tensors = {k: v for k, v in header.items() if k != "__metadata__"}
elements = sum(math.prod(v["shape"]) for v in tensors.values())
end = max(v["data_offsets"][1] for v in tensors.values())
assert elements == 133440, f"safetensors holds {elements} elements, expected 133440"
assert len(raw) == 8 + n + end, f"safetensors size {len(raw)} != 8 + {n} + {end}"
print(f"{len(tensors)} tensors, {elements} elements")
EOF

step "inspect: total_params equals the hand count for dense-tiny"
val() { awk -F' *= *' -v k="$1" '$1 == k { print $2 }' "$TINY"; }
V=272 C=$(val dim) L=$(val n_layers) H=$(val n_heads) KH=$(val n_kv_heads) F=$(val ffn_dim)
HD=$((C / H))
want=$((V * C + L * (2 * C + C * H * HD + 2 * C * KH * HD + H * HD * C + 3 * C * F) + C + V * C))
"$TESSERA" inspect "$TINY" > "$WORK/inspect.out"
got=$("$PY" -c 'import json,sys; print(json.load(open(sys.argv[1]))["total_params"])' "$WORK/inspect.out")
[[ $got == "$want" ]] || fail "inspect total_params $got, expected $want (V=$V C=$C L=$L H=$H KH=$KH F=$F)"
echo "total_params $got"
finish
