#!/usr/bin/env bash
# Expert-parallel throughput on this machine: the tiny V4 model (8 routed experts, 6 MoE layers with the MTP
# block), the same global batch (4 micro-batches of 4 x 256 tokens) in one process, at dp=2 without EP, and at
# dp=2 x ep=2, dp=4 x ep=4 and dp=4 x ep=2, the cores shared equally. Per layout: tokens/s (median after 3
# warm-up steps) and the bytes each rank hands to collectives per step (metrics.jsonl `comm`), beside the analytic
# figures: all-reduce payload = 4 bytes x (replicated parameters) + 4 bytes x (this rank's expert parameters, over
# the expert-data-parallel group when it has more than one rank) + 32 bytes of loss sums + 8 per expert per MoE
# layer (loads) + 16 per MoE layer (maxima); all_to_all = per MoE layer and micro-batch 4 exchanges (rows, outputs,
# their gradients) of N k rows x dim x 4 bytes, the share (ep-1)/ep of them leaving the rank when routing is
# uniform (the measured figure depends on the router).
#   bench/expert_parallel.sh [STEPS]
set -euo pipefail
cd "$(dirname "$0")/.."
steps=${1:-12}
python=${TESSERA_PYTHON:-.venv/bin/python}
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_mpi_yield_when_idle=1 TESSERA_PYTHON=true
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
head -c 2000000 /usr/share/games/fortunes/* 2>/dev/null > "$out/text.txt" || true
[ -s "$out/text.txt" ] || { echo "needs Debian's fortunes (launch/setup.sh installs it)"; exit 1; }
recipe=recipes/models/v4-tiny.toml
cores=$(nproc)
for layout in "1 1 1" "2 2 1" "2 2 2" "4 4 4" "4 4 2"; do
  read -r np dp ep <<< "$layout"
  threads=$(( cores / np )); [ $threads -ge 1 ] || threads=1
  sets=("data.train=[\"$out/text.txt\"]" training.steps=$steps training.batch_size=4 training.grad_accum=4
        training.seq_len=256 optimizer.lr=1e-3 eval.every=0 metrics.log_every=1 metrics.peak_flops=1e11
        parallel.dp=$dp parallel.ep=$ep)
  mpirun --oversubscribe -np $np --bind-to none -x OMP_NUM_THREADS=$threads -x OMP_WAIT_POLICY=passive \
    build/bin/tessera train $recipe --run-dir "$out/run$np-$ep" --set "${sets[@]}" >/dev/null 2>"$out/log"
  params=$(grep -o '^model: [0-9]* parameters' "$out/log" | grep -o '[0-9]*')
  "$python" - "$out/run$np-$ep/metrics.jsonl" $np $dp $ep $threads "$params" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
np_, dp, ep, threads, params = (int(x) for x in sys.argv[2:7])
E, layers, dim, F, k, N, micro = 8, 6, 128, 128, 2, 4 * 256, 4  # recipes/models/v4-tiny.toml, the batch above
expert = layers * 3 * E * F * dim
tps = statistics.median(r["tokens_per_s"] for r in rows[3:])
comm = rows[-1].get("comm", {})
if dp == 1:
    reduce_ = 0
else:
    reduce_ = 4 * (params - expert) + 32 + 8 * E * layers + 16 * layers
    reduce_ += 4 * expert // ep if (ep == 1 or dp // ep > 1) else 0
a2a = 4 * N * k * (ep - 1) // ep * dim * 4 * layers * (micro // dp) if ep > 1 else 0
print(json.dumps({"ranks": np_, "dp": dp, "ep": ep, "threads_per_rank": threads, "tokens_per_s": round(tps),
                  "all_reduce_bytes": comm.get("all_reduce", [0, 0])[1], "all_reduce_analytic": reduce_,
                  "all_to_all_bytes": comm.get("all_to_all", [0, 0])[1], "all_to_all_uniform_routing": a2a,
                  "all_gather_bytes": comm.get("all_gather", [0, 0])[1],
                  "comm_bytes": rows[-1].get("comm_bytes", 0)}))
PY
done
