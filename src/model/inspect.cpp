// Parameter counts, FLOPs and KV-cache bytes per token from a ModelConfig alone (docs/model.md, "Inspect").
// V4 follows docs/model.md's parameter table row by row; V3.2 follows DeepSeek-V3.2-Exp's inference/model.py.
#include "model/inspect.h"

#include <algorithm>

#include "core/error.h"

namespace tessera {
namespace {

using f64 = double;

// Parameters and per-token multiply-accumulates of one part of the model. They differ where a matrix is
// applied more than once per token (MTP's h_proj, once per residual stream) or not at all (the embedding
// lookup).
struct Part {
  f64 params = 0, active = 0, macs = 0, attn_flops = 0, index_flops = 0;
  void matrix(f64 rows, f64 cols, f64 uses = 1) {  // a weight matrix applied `uses` times per token
    params += rows * cols;
    active += rows * cols;
    macs += uses * rows * cols;
  }
  void vector(f64 n) {  // norm weights, biases, sinks, positional biases: counted, not multiplied
    params += n;
    active += n;
  }
  void add(const Part& o) {
    params += o.params;
    active += o.active;
    macs += o.macs;
    attn_flops += o.attn_flops;
    index_flops += o.index_flops;
  }
};

// Keys of the token at position context-1, and compressed entries of a context-long sequence: block s is
// complete (visible) iff (s+1) m <= context.
f64 window_keys(const ModelConfig& c, int64_t context) {
  return f64(std::min(c.window, context));
}
f64 blocks(int64_t context, int64_t m) {
  return f64(context / m);
}

// ---------------------------------------------------------------- DeepSeek-V4
// One mHC site: fn (2n+n^2, n d), base (2n+n^2), scale (3).
void v4_hc_site(const ModelConfig& c, Part& p) {
  f64 n = f64(c.hc_mult), mix = 2 * n + n * n;
  p.matrix(mix, n * f64(c.dim));
  p.vector(mix);
  p.vector(3);
}

// One block (attention + MoE with their mHC sites) with compression ratio m (0 = window only).
Part v4_layer(const ModelConfig& c, int64_t m, int64_t context) {
  const f64 d = f64(c.dim), H = f64(c.n_heads), hd = f64(c.head_dim), dc = f64(c.q_lora_rank);
  const f64 g = f64(c.o_groups), dg = f64(c.o_lora_rank);
  Part p;
  v4_hc_site(c, p);  // hc_attn
  v4_hc_site(c, p);  // hc_ffn
  p.vector(2 * d);   // attn_norm, ffn_norm
  // attention
  p.matrix(dc, d);               // wq_a
  p.vector(dc);                  // q_norm
  p.matrix(H * hd, dc);          // wq_b
  p.matrix(hd, d);               // wkv
  p.vector(hd);                  // kv_norm
  p.vector(H);                   // sink
  p.matrix(g * dg, H * hd / g);  // wo_a: g maps of (d_g, H c / g)
  p.matrix(d, g * dg);           // wo_b
  f64 keys = window_keys(c, context);
  if (m > 0) {
    const bool csa = m == c.csa_ratio;
    const f64 S = csa ? 2 : 1, entries = blocks(context, m);
    p.matrix(S * hd, d);        // compressor.wkv
    p.matrix(S * hd, d);        // compressor.wgate
    p.vector(f64(m) * S * hd);  // compressor.ape
    p.vector(hd);               // compressor.norm
    if (csa) {
      const f64 HI = f64(c.index_n_heads), cI = f64(c.index_head_dim);
      p.matrix(HI * cI, dc);                  // indexer.wq_b
      p.matrix(HI, d);                        // indexer.weights_proj
      p.matrix(2 * cI, d);                    // indexer.compressor.wkv
      p.matrix(2 * cI, d);                    // indexer.compressor.wgate
      p.vector(f64(m) * 2 * cI);              // indexer.compressor.ape
      p.vector(cI);                           // indexer.compressor.norm
      p.index_flops = 2 * HI * cI * entries;  // sum_h w_h relu(q_h . k_s) over every visible entry
      keys += std::min(f64(c.index_topk), entries);
    } else {
      keys += entries;  // HCA: all visible entries
    }
  }
  p.attn_flops = 2 * 2 * H * hd * keys;  // q.k over c dims and p.v over c dims (K = V), per head
  // MoE: router and shared experts always, routed experts top-k of E
  const f64 E = f64(c.n_routed_experts), k = f64(c.n_activated_experts), F = f64(c.moe_inter_dim);
  p.matrix(E, d);                                // gate.weight (gate.bias and tid2eid are buffers)
  p.matrix(3 * f64(c.n_shared_experts) * F, d);  // shared w1, w3, w2
  p.params += E * 3 * F * d;                     // experts w1, w3, w2
  p.active += k * 3 * F * d;
  p.macs += k * 3 * F * d;
  return p;
}

// hc_head (fn (n, n d), base (n), scale (1)) and the final norm.
void v4_head(const ModelConfig& c, Part& p) {
  f64 n = f64(c.hc_mult), d = f64(c.dim);
  p.matrix(n, n * d);
  p.vector(n + 1);
  p.vector(d);
}

void v4_count(const ModelConfig& c, int64_t context, Part& main, Part& mtp) {
  const f64 d = f64(c.dim), V = f64(c.vocab_size), n = f64(c.hc_mult);
  main.params += V * d;  // tok_embeddings: a lookup (no MACs)
  main.active += V * d;
  for (int64_t l = 0; l < c.n_layers; ++l) main.add(v4_layer(c, c.layer_ratio(l), context));
  v4_head(c, main);
  main.matrix(V, d);  // output
  if (c.mtp_depth == 0) return;
  mtp.vector(2 * d);                 // e_norm, h_norm
  mtp.matrix(d, d);                  // e_proj: the embedding once, broadcast to the n streams
  mtp.matrix(d, d, n);               // h_proj: applied to each of the n streams
  mtp.add(v4_layer(c, 0, context));  // the block: window only
  v4_head(c, mtp);                   // mtp.hc_head, mtp.norm
  mtp.macs += V * d;                 // the shared output head, applied again
}

// ---------------------------------------------------------------- DeepSeek-V3.2 (MLA + DSA)
Part v32_layer(const ModelConfig& c, bool moe, int64_t context) {
  const f64 d = f64(c.dim), H = f64(c.n_heads), dq = f64(c.q_lora_rank), dkv = f64(c.kv_lora_rank);
  const f64 nope = f64(c.qk_nope_head_dim), rope = f64(c.qk_rope_head_dim), vd = f64(c.v_head_dim);
  const f64 HI = f64(c.index_n_heads), cI = f64(c.index_head_dim);
  Part p;
  p.vector(2 * d);                  // attn_norm, ffn_norm
  p.matrix(dq, d);                  // wq_a
  p.vector(dq);                     // q_norm
  p.matrix(H * (nope + rope), dq);  // wq_b
  p.matrix(dkv + rope, d);          // wkv_a
  p.vector(dkv);                    // kv_norm
  p.matrix(H * (nope + vd), dkv);   // wkv_b (absorbed into q and o in MQA mode: the same MACs)
  p.matrix(d, H * vd);              // wo
  p.matrix(HI * cI, dq);            // indexer.wq_b
  p.matrix(cI, d);                  // indexer.wk
  p.vector(2 * cI);                 // indexer.k_norm (LayerNorm: weight and bias)
  p.matrix(HI, d);                  // indexer.weights_proj
  // MQA mode (V3.2 implements DSA on it): each selected token's 576-wide latent+rope is the key and its
  // 512-wide latent the value, shared by all heads.
  f64 ctx = f64(context), keys = std::min(f64(c.index_topk), ctx);
  p.attn_flops = 2 * H * ((dkv + rope) + dkv) * keys;
  p.index_flops = 2 * HI * cI * ctx;  // the indexer scores every preceding token
  if (!moe) {
    p.matrix(3 * f64(c.ffn_dim), d);
  } else {
    const f64 E = f64(c.n_routed_experts), k = f64(c.n_activated_experts), F = f64(c.moe_inter_dim);
    p.matrix(E, d);  // gate.weight (e_score_correction_bias is a buffer)
    p.matrix(3 * f64(c.n_shared_experts) * F, d);
    p.params += E * 3 * F * d;
    p.active += k * 3 * F * d;
    p.macs += k * 3 * F * d;
  }
  return p;
}

void v32_count(const ModelConfig& c, int64_t context, Part& main, Part& mtp) {
  const f64 d = f64(c.dim), V = f64(c.vocab_size);
  main.params += V * d;  // embed
  main.active += V * d;
  for (int64_t l = 0; l < c.n_layers; ++l) main.add(v32_layer(c, l >= c.n_dense_layers, context));
  main.vector(d);     // norm
  main.matrix(V, d);  // head
  if (c.mtp_depth == 0) return;
  mtp.vector(2 * d);     // enorm, hnorm
  mtp.matrix(d, 2 * d);  // eh_proj on [enorm(e); hnorm(h)]
  mtp.add(v32_layer(c, true, context));
  mtp.vector(d);      // shared_head.norm
  mtp.macs += V * d;  // the shared head
}

// ---------------------------------------------------------------- dense (Llama layout, untied head)
void dense_count(const ModelConfig& c, int64_t context, Part& main) {
  const f64 C = f64(c.dim), V = f64(c.vocab_size), H = f64(c.n_heads), KH = f64(c.n_kv_heads);
  const f64 hd = f64(c.attn_head_dim()), F = f64(c.ffn_dim);
  main.params += V * C;
  main.active += V * C;
  for (int64_t l = 0; l < c.n_layers; ++l) {
    Part p;
    p.vector(2 * C);
    p.matrix(H * hd, C);                           // wq
    p.matrix(2 * KH * hd, C);                      // wk, wv
    p.matrix(C, H * hd);                           // wo
    p.matrix(3 * F, C);                            // w1, w2, w3
    p.attn_flops = 2 * 2 * H * hd * f64(context);  // no window: every key of the context
    main.add(p);
  }
  main.vector(C);
  main.matrix(V, C);
}

void count(const ModelConfig& c, int64_t context, Part& main, Part& mtp) {
  c.validate();
  if (context < 1) TS_FAIL("inspect: the context length must be >= 1, got ", context);
  if (c.is_v4())
    v4_count(c, context, main, mtp);
  else if (c.is_v32())
    v32_count(c, context, main, mtp);
  else
    dense_count(c, context, main);
}

FlopCounts to_flops(const Part& p) {
  return {2 * p.macs, p.attn_flops, p.index_flops};
}

}  // namespace

ParamCounts count_params(const ModelConfig& c) {
  Part main, mtp;
  count(c, 1, main, mtp);
  ParamCounts r;
  r.total = main.params + mtp.params;
  r.active = main.active + mtp.active;
  r.mtp = mtp.params;
  r.mtp_active = mtp.active;
  r.embedding = f64(c.vocab_size) * f64(c.dim);
  return r;
}

FlopCounts count_flops(const ModelConfig& c, int64_t context, bool include_mtp) {
  Part main, mtp;
  count(c, context, main, mtp);
  if (include_mtp) main.add(mtp);
  return to_flops(main);
}

double fp8_equivalent_flops(const ModelConfig& c, const FlopCounts& f) {
  if (c.is_v4()) return f.matmul + 2 * f.attention + 0.5 * f.indexer;
  if (c.is_v32()) return f.matmul + 2 * f.attention + f.indexer;
  return 2 * f.total();
}

double forward_flops_per_token(const ModelConfig& c, int64_t context) {
  return count_flops(c, context, true).total();
}

double attention_flops_per_token(const ModelConfig& c, int64_t context) {
  FlopCounts f = count_flops(c, context, true);
  return f.attention + f.indexer;
}

std::string kv_native_precision(const ModelConfig& c) {
  if (c.is_v4())
    return "v4-mixed: KV entries FP8 e4m3 on the non-RoPE dims + one ue8m0 scale byte per 64 of them + BF16 "
           "RoPE "
           "dims; indexer keys FP4 e2m1 + one ue8m0 scale byte per 32";
  if (c.is_v32())
    return "v32-mixed: MLA latent FP8 e4m3 + one fp32 scale per 128 + BF16 RoPE dims (656 bytes, FlashMLA); "
           "indexer keys FP8 + one fp32 scale per 128";
  return "bf16";
}

double kv_cache_bytes_per_token(const ModelConfig& c, int64_t context, double bytes_per_value) {
  c.validate();
  if (context < 1) TS_FAIL("inspect: the context length must be >= 1, got ", context);
  if (bytes_per_value < 0)
    TS_FAIL("inspect: bytes per KV value must be > 0 (or 0 for native), got ", bytes_per_value);
  const bool native = bytes_per_value == kNativeKvPrecision;
  auto ceil_div = [](int64_t a, int64_t b) { return f64((a + b - 1) / b); };
  const f64 T = f64(context);
  if (c.is_v4()) {
    const int64_t nope = c.head_dim - c.rope_dim;
    // One cached vector (a window token's kv, or a compressed entry): c values.
    const f64 entry =
        native ? f64(nope) + ceil_div(nope, 64) + 2.0 * f64(c.rope_dim) : bytes_per_value * f64(c.head_dim);
    const f64 ikey = native ? f64(c.index_head_dim) / 2 + ceil_div(c.index_head_dim, 32)
                            : bytes_per_value * f64(c.index_head_dim);
    f64 total = 0;
    for (int64_t l = 0; l < c.n_layers; ++l) {
      int64_t m = c.layer_ratio(l);
      total += window_keys(c, context) * entry;  // the last `window` tokens' kv
      if (m > 0) {
        total += blocks(context, m) * entry;
        if (m == c.csa_ratio) total += blocks(context, m) * ikey;
      }
    }
    return total / T;
  }
  if (c.is_v32()) {
    const f64 entry =
        native ? f64(c.kv_lora_rank) + 4 * ceil_div(c.kv_lora_rank, 128) + 2.0 * f64(c.qk_rope_head_dim)
               : bytes_per_value * f64(c.kv_lora_rank + c.qk_rope_head_dim);
    const f64 ikey = native ? f64(c.index_head_dim) + 4 * ceil_div(c.index_head_dim, 128)
                            : bytes_per_value * f64(c.index_head_dim);
    return f64(c.n_layers) * (entry + ikey);  // every token, every layer
  }
  const f64 b = native ? 2.0 : bytes_per_value;
  return f64(c.n_layers) * 2 * f64(c.n_kv_heads) * f64(c.attn_head_dim()) * b;  // K and V
}

}  // namespace tessera
