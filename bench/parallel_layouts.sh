#!/usr/bin/env bash
# Throughput and communication of parallel layouts on this machine: the same global batch (4 micro-batches of
# 4 x 256 tokens) in one process and in each layout given, the cores shared equally among the ranks. Per layout:
# tokens/s (median after 3 warm-up steps) and the bytes rank 0 hands to each kind of collective in one training
# step (metrics.jsonl `comm`, a step without held-out evaluation), beside the analytic figures (docs/parallelism.md):
#   all_reduce = 4 bytes x (rank 0's replicated parameters, its tensor-parallel shards) [over dp, when dp > 1]
#              + 4 bytes x (its expert parameters) [over the expert-data-parallel group, when it has 2+ ranks]
#              + 32 (loss sums) + V4: 8 per expert and 16 per MoE layer (loads, maxima), [once more over pp]
#              + tensor parallel, per micro-batch: tokens x dim x 4 bytes for the embedding (first stage), 4 per
#                layer (2 forward, 2 backward) and 1 for the head's backward (last stage), and 12 x tokens for the
#                vocab-parallel loss (max, sum of exponentials, target logit);
#                V4 (src/model/v4.h set_tensor_parallel), per micro-batch and block: forward 2 x tokens x dim
#                (attention, MoE) + CSA's indexer scores (B x T x blocks), backward tokens x (dim + k + head_dim +
#                q_lora_rank) (MoE input and gate weights, the shared kv head, the low-rank query) + a compressed
#                layer's blocks x head_dim; the embedding (and the MTP's rows), the heads' backward and the losses
#                as above, 8 bytes per MoE layer (SwiGLU maxima) per forward, forwards twice on a stage that
#                recomputes; the routed experts' gradients over the expert-data-parallel group (dp x tp / ep);
#   all_gather (dense, AdamW; the clipping norm's partial sums) = 8 x tp bytes per split matrix + with pp > 1,
#              8 x pp x (1 + the most parameters a stage holds) for the stages' per-parameter sums;
#   send, recv (pipeline, rank 0 = the first stage) = (2 vpp - 1) x micro-batches per rank x tokens x width x 4
#              bytes each way (interleaved: every chunk's output, every chunk's gradient but the first's),
#              width = dim (dense), hc_mult x dim + dim (V4: the mHC streams and the MTP's embedding rows);
#   all_to_all (expert parallel) = 4 exchanges per MoE layer and micro-batch (6 on a pipeline stage that recomputes
#              its forward before the backward: every stage but the last) of tokens / tp x k rows x dim x 4 bytes,
#              the share (ep-1)/ep of them leaving the rank if routing were uniform (measured: the router's).
#   bench/parallel_layouts.sh dense|v4 STEPS NP:DP:PP:EP[:TP[:VPP]] ...   e.g. bench/parallel_layouts.sh dense 12 2:2:1:1 2:1:1:1:2
set -euo pipefail
cd "$(dirname "$0")/.."
model=${1:?dense or v4}
steps=${2:-12}
shift 2
python=${TESSERA_PYTHON:-.venv/bin/python}
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_mpi_yield_when_idle=1 TESSERA_PYTHON=true
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
head -c 2000000 /usr/share/games/fortunes/* 2>/dev/null > "$out/text.txt" || true
[ -s "$out/text.txt" ] || { echo "needs Debian's fortunes (launch/setup.sh installs it)"; exit 1; }
recipe=recipes/models/dense-small.toml
[ "$model" = v4 ] && recipe=recipes/models/v4-tiny.toml
cores=$(nproc)
for layout in 1:1:1:1 "$@"; do
  IFS=: read -r np dp pp ep tp vpp <<< "$layout"
  tp=${tp:-1} vpp=${vpp:-1}
  threads=$(( cores / np )); [ $threads -ge 1 ] || threads=1
  sets=("data.train=[\"$out/text.txt\"]" training.steps=$steps training.batch_size=4 training.grad_accum=4
        training.seq_len=256 optimizer.lr=1e-3 eval.every=0 metrics.log_every=1 metrics.peak_flops=1e11
        parallel.dp=$dp parallel.pp=$pp parallel.ep=$ep parallel.tp=$tp parallel.vpp=$vpp)
  mpirun --oversubscribe -np "$np" --bind-to none -x OMP_NUM_THREADS=$threads -x OMP_WAIT_POLICY=passive \
    build/bin/tessera train $recipe --run-dir "$out/run-$np-$dp-$pp-$ep-$tp-$vpp" --set "${sets[@]}" >/dev/null 2>"$out/log" \
    || { tail -5 "$out/log" >&2; exit 1; }
  params=$(grep -o '^model: [0-9]* parameters' "$out/log" | grep -o '[0-9]*')
  stage0=$(grep -o 'stage 0 holds layers \[0, [0-9]*)' "$out/log" | grep -o '[0-9]*)' | tr -d ')' || true)
  vocab=$(grep -o 'of the [0-9]* vocabulary rows' "$out/log" | grep -o '[0-9]*' | head -1 || true)
  "$python" - "$out/run-$np-$dp-$pp-$ep-$tp-$vpp/metrics.jsonl" "$recipe" "$np" "$dp" "$pp" "$ep" "$threads" \
    "$params" "$tp" "${stage0:-0}" "$vpp" "${vocab:-0}" <<'PY'
import json, statistics, sys, tomllib
rows = [json.loads(l) for l in open(sys.argv[1])]
m = tomllib.load(open(sys.argv[2], "rb"))["model"]
np_, dp, pp, ep, threads, params, tp, layers, vpp, vocab = (int(x) for x in sys.argv[3:13])
layers = layers or m["n_layers"]  # rank 0's stage: its layers (all of them without pp)
tokens, micro = 4 * 256, 4 // dp  # per micro-batch; micro-batches per rank
dim, v4 = m["dim"], m["arch"] == "deepseek_v4"
mtp = m.get("mtp_depth", 0) if v4 else 0
n_moe = m["n_layers"] + mtp if v4 else 0  # every MoE layer (the per-layer statistics cover all of them)
stage_moe = layers + (mtp if pp == 1 else 0) if v4 else 0  # rank 0's MoE layers (the MTP block is on the last stage)
E = m.get("n_routed_experts", 0)
expert = stage_moe * 3 * E * m.get("moe_inter_dim", 0) * dim  # rank 0's routed-expert parameters (whole stacks)
replicated = params - expert  # `params` is rank 0's stage's count (experts counted whole)
stats = 32 + (8 * E * n_moe + 16 * n_moe if v4 else 0)  # loss sums, and V4's expert loads and per-layer maxima
reduce_ = stats + (stats if pp > 1 else 0)  # over dp, and over the pipeline
norms = (2 * layers + (1 if pp == 1 else 0)) * dim  # dense: rank 0's replicated norm weights; the rest split over tp
gather = 0
if v4 and tp > 1:  # rank 0's blocks (the MTP block too without pp; its ratio is compress_ratios' last entry)
    B, T, ratios, csa = 4, 256, m["compress_ratios"], m["csa_ratio"]
    hd, qr, k, cI, H, g = m["head_dim"], m["q_lora_rank"], m["n_activated_experts"], m["index_head_dim"], m["n_heads"], m["o_groups"]
    HI, ol, Fs, ilw = m["index_n_heads"], m["o_lora_rank"], m["n_shared_experts"] * m["moe_inter_dim"], m.get("indexer_loss_weight", 0.0)
    K = min(m["index_topk"], T // csa)
    blocks = list(range(layers)) + ([m["n_layers"]] if pp == 1 and mtp else [])
    fwd, bwd = tokens * dim * 4 * (2 if mtp else 1) + 8 * n_moe, 0
    split = vocab * dim * (2 if pp == 1 else 1)  # rank 0's split parameters (logical sizes): embedding, head
    for l in blocks:
        r = ratios[l]
        nb = T // r if r else 0  # blocks per row (one document per row here)
        fwd += 2 * tokens * dim * 4 + ((B * T * nb + (B * T * K if ilw > 0 else 0)) * 4 if r == csa else 0)
        bwd += tokens * (dim + k + hd + qr) * 4 + B * nb * hd * 4 + (B * nb * cI * 4 if r == csa and ilw > 0 else 0)
        split += H * hd * qr + H + ol * H * hd + dim * g * ol + 3 * Fs * dim + ((HI * cI * qr + HI * dim) if r == csa else 0)
    if pp == 1:
        fwd += 12 * tokens * (2 if mtp else 1)
        bwd += tokens * dim * 4 * (2 if mtp else 1)
    reduce_ += micro * ((2 if pp > 1 else 1) * fwd + bwd)
elif tp > 1:
    reduce_ += micro * (tokens * dim * 4 * (1 + 4 * layers + (1 if pp == 1 else 0)) + (12 * tokens if pp == 1 else 0))
    gather += 8 * tp * (7 * layers + 1 + (1 if pp == 1 else 0))
if pp > 1:  # dense, equal (virtual) stages of lv layers; per chunk the most a rank holds: + embedding or norm and head
    lv = m["n_layers"] // (pp * vpp)
    gather += sum(8 * pp * (1 + 9 * lv + (2 if c == vpp - 1 else 1 if c == 0 else 0)) for c in range(vpp))
if v4 and (ep > 1 or tp > 1):  # the routed experts' gradients over the expert-data-parallel group
    local = replicated - (split - split // tp if tp > 1 else 0)
    reduce_ += (4 * local if dp > 1 else 0) + (4 * expert // ep if dp * tp // ep > 1 else 0)
elif ep == 1:
    reduce_ += 4 * (norms + (params - norms) // tp) if dp > 1 else 0
if np_ == 1:
    reduce_ = 0
width = m.get("hc_mult", 1) * dim + (dim if mtp else 0) if v4 else dim  # what stages exchange per token
p2p = (2 * vpp - 1) * micro * tokens * width * 4 if pp > 1 else 0  # each chunk's output; gradients of all but v = 0
a2a = (4 + (2 if pp > 1 else 0)) * tokens // tp * m.get("n_activated_experts", 0) * (ep - 1) // ep * dim * 4 * stage_moe * micro if ep > 1 else 0
comm = rows[-2].get("comm", {})  # the last step also evaluates
got = lambda kind: comm.get(kind, [0, 0])[1]
print(json.dumps({"layout": f"dp={dp} tp={tp} pp={pp} ep={ep} vpp={vpp}", "ranks_x_threads": f"{np_}x{threads}",
                  "tokens_per_s": round(statistics.median(r["tokens_per_s"] for r in rows[3:])),
                  "all_reduce": [got("all_reduce"), reduce_], "send": [got("send"), p2p], "recv": [got("recv"), p2p],
                  "all_to_all": [got("all_to_all"), a2a], "all_gather": got("all_gather") if v4 else [got("all_gather"), gather],
                  "comm_bytes": rows[-2].get("comm_bytes", 0)}))
PY
done
