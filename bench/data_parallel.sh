#!/usr/bin/env bash
# Data-parallel throughput on this machine: the same global batch (grad_accum micro-batches of the small dense
# model, or the tiny V4 model) in one process and over mpirun -np 2 / 4, the cores shared equally; tokens/s
# (median after 3 warm-up steps) and the bytes each rank sends per step, beside the analytic figure:
# all-reduce payload = 4 bytes x parameters (fp32 gradients) + 32 bytes of loss sums (+ V4: 8 bytes per expert
# per MoE layer for the loads, 8 per MoE layer for each of the two maxima); the MPI scheme moves
# 2 (n - 1) / n of the payload in and out of each rank.
#   bench/data_parallel.sh [dense|v4] [STEPS]
set -euo pipefail
cd "$(dirname "$0")/.."
model=${1:-dense}
steps=${2:-12}
python=${TESSERA_PYTHON:-.venv/bin/python}
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_mpi_yield_when_idle=1 TESSERA_PYTHON=true
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
head -c 2000000 /usr/share/games/fortunes/* 2>/dev/null > "$out/text.txt" || true
[ -s "$out/text.txt" ] || { echo "needs Debian's fortunes (launch/setup.sh installs it)"; exit 1; }
recipe=recipes/models/dense-small.toml
[ "$model" = v4 ] && recipe=recipes/models/v4-tiny.toml
cores=$(nproc)
for np in 1 2 4; do
  threads=$(( cores / np )); [ $threads -ge 1 ] || threads=1
  sets=("data.train=[\"$out/text.txt\"]" training.steps=$steps training.batch_size=4 training.grad_accum=4
        training.seq_len=256 optimizer.lr=1e-3 eval.every=0 metrics.log_every=1 metrics.peak_flops=1e11)
  if [ $np -eq 1 ]; then
    OMP_NUM_THREADS=$threads OMP_WAIT_POLICY=passive build/bin/tessera train $recipe --run-dir "$out/run$np" \
      --set "${sets[@]}" >/dev/null 2>"$out/log$np"
  else
    mpirun --oversubscribe -np $np --bind-to none -x OMP_NUM_THREADS=$threads -x OMP_WAIT_POLICY=passive \
      build/bin/tessera train $recipe --run-dir "$out/run$np" --set "${sets[@]}" parallel.dp=$np \
      >/dev/null 2>"$out/log$np"
  fi
  params=$(grep -o '^model: [0-9]* parameters' "$out/log$np" | grep -o '[0-9]*')
  "$python" - "$out/run$np/metrics.jsonl" $np $threads "$params" "$model" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
np_, threads, params, model = int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
tps = statistics.median(r["tokens_per_s"] for r in rows[3:])
comm = rows[-1].get("comm_bytes", 0)
analytic = 4 * params + 32 if np_ > 1 else 0
print(json.dumps({"model": model, "ranks": np_, "threads_per_rank": threads, "tokens_per_s": round(tps),
                  "comm_payload_bytes_per_step": comm, "analytic_gradient_payload": analytic,
                  "wire_bytes_per_rank_per_step": round(comm * 2 * (np_ - 1) / np_)}))
PY
done
