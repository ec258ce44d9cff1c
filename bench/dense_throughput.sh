#!/usr/bin/env bash
# Training throughput of the same dense model in Tessera and in PyTorch (Hugging Face LlamaForCausalLM,
# eager and torch.compile), same threads, same batch, measured in one run.
#   bench/dense_throughput.sh [STEPS] [THREADS]
set -euo pipefail
cd "$(dirname "$0")/.."
steps=${1:-20}
threads=${2:-$(nproc)}
python=${TESSERA_PYTHON:-.venv/bin/python}
# Model: recipes/models/dense-small.toml (dim 256, 4 layers, 4 heads, ffn 768, byte vocabulary 272).
dim=256 layers=4 heads=4 ffn=768 vocab=272 seq=256 batch=16
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
head -c 2000000 /usr/share/games/fortunes/* 2>/dev/null > "$out/text.txt" || true
[ -s "$out/text.txt" ] || { echo "needs Debian's fortunes (launch/setup.sh installs it)"; exit 1; }

export OMP_NUM_THREADS=$threads
build/bin/tessera train recipes/models/dense-small.toml --run-dir "$out/run" \
  --set "data.train=[\"$out/text.txt\"]" training.steps=$((steps + 3)) training.batch_size=$batch \
  training.seq_len=$seq optimizer.lr=1e-3 eval.every=0 metrics.log_every=1 >/dev/null 2>"$out/tessera.log"
tessera_tps=$("$python" - "$out/run/metrics.jsonl" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
print(f"{statistics.median(r['tokens_per_s'] for r in rows[3:]):.0f}")  # steps after 3 of warm-up
PY
)
peak=$(grep -o 'MFU against [0-9.]* GFLOP/s' "$out/tessera.log" | grep -o '[0-9.]*' | head -1)
echo "{\"impl\": \"tessera\", \"tokens_per_s\": $tessera_tps, \"threads\": $threads, \"gemm_peak_gflops\": $peak}"
"$python" bench/torch_dense.py --dim $dim --n-layers $layers --n-heads $heads --ffn-dim $ffn --vocab-size $vocab \
  --seq-len $seq --batch-size $batch --steps "$steps" --threads "$threads" --mode both --lr 1e-3
