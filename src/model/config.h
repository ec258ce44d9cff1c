// Model hyper-parameters, as read from `[model]` in a recipe (see recipes/models/).
// arch "dense" is the Llama layout; arch "deepseek_v4" is the V4 design of ../shared/spec/deepseek-v4.md and
// uses the V4 fields below (the dense-only fields n_kv_heads and ffn_dim are then unused).
#pragma once
#include <cstdint>
#include <string>
#include <vector>

namespace tessera {

struct ModelConfig {
  std::string arch = "dense";
  int64_t vocab_size = 256;
  int64_t dim = 256;
  int64_t n_layers = 4;
  int64_t n_heads = 4;
  int64_t n_kv_heads = 4;  // dense: grouped-query attention when < n_heads
  int64_t ffn_dim = 768;   // dense: SwiGLU hidden size
  int64_t max_seq_len = 256;
  double rope_theta = 10000.0;  // dense layers; V4: window-only layers
  double norm_eps = 1e-5;
  double init_std = 0.02;

  // ---- deepseek_v4 (spec sections 1-9) ----
  int64_t head_dim = 512;       // c: one head's width for queries and the shared key/value
  int64_t rope_dim = 64;        // RoPE on the last rope_dim dims of each head (interleaved pairs)
  int64_t q_lora_rank = 1024;   // d_c: the low-rank query latent
  int64_t o_groups = 8;         // g: grouped output projection
  int64_t o_lora_rank = 1024;   // d_g: per-group output rank
  int64_t window = 128;         // n_win: sliding window, the current token included
  // One entry per layer (plus, optionally, one for the MTP block, which must be 0): 0 = window only,
  // csa_ratio = CSA (overlapping compressor + lightning indexer), any other m' > 0 = HCA.
  std::vector<int64_t> compress_ratios;
  int64_t csa_ratio = 4;             // m
  double compress_rope_theta = 160000.0;  // RoPE base of layers with a compressor
  double yarn_factor = 1.0;          // > 1 applies YaRN to compressed layers (V4: 16)
  int64_t yarn_original_len = 65536;
  double yarn_beta_fast = 32.0;
  double yarn_beta_slow = 1.0;
  int64_t index_n_heads = 64;        // n_h^I
  int64_t index_head_dim = 128;      // c^I
  int64_t index_topk = 512;          // compressed entries kept per query in CSA layers
  bool indexer_fp4 = true;           // simulate FP4 on indexer queries and keys
  bool kv_fp8 = false;               // simulate FP8 (e4m3, block 64) on the non-RoPE dims of KV entries
  double indexer_loss_weight = 0.0;  // > 0: V3.2-style KL of the indexer to the main attention (detached input)
  // MoE
  int64_t n_routed_experts = 256;
  int64_t n_shared_experts = 1;
  int64_t n_activated_experts = 6;   // top-k
  int64_t moe_inter_dim = 2048;      // each expert's SwiGLU hidden size (the shared expert's is n_shared x this)
  int64_t n_hash_layers = 3;         // the first layers route by the fixed token-id table tid2eid
  double route_scale = 1.5;
  std::string score_func = "sqrtsoftplus";  // or "sigmoid", "softmax"
  double swiglu_limit = 10.0;        // 0 = no clamp (the ablation baseline)
  double balance_loss_weight = 1e-4; // alpha of the sequence-wise balance loss
  double bias_update_speed = 1e-3;   // gamma of the aux-loss-free balancing bias (applied by the trainer)
  // mHC
  int64_t hc_mult = 4;               // n residual streams
  int64_t hc_sinkhorn_iters = 20;
  double hc_eps = 1e-6;
  // MTP
  int64_t mtp_depth = 1;             // 0 or 1
  double mtp_loss_weight = 0.3;

  // ---- deepseek_v32: DeepSeek-V3.2's MLA + DSA layout, for `tessera inspect` only (the baseline of V4's
  // efficiency claims; no model is built for it). Shared with V4: n_heads, q_lora_rank, index_n_heads,
  // index_head_dim, index_topk (DSA selects among tokens), the MoE fields, mtp_depth; ffn_dim is the
  // SwiGLU hidden size of the first n_dense_layers (dense) layers.
  int64_t kv_lora_rank = 512;       // the MLA latent (the KV cache entry, with the rope part)
  int64_t qk_nope_head_dim = 128;
  int64_t qk_rope_head_dim = 64;
  int64_t v_head_dim = 128;
  int64_t n_dense_layers = 3;

  bool is_v4() const { return arch == "deepseek_v4"; }
  bool is_v32() const { return arch == "deepseek_v32"; }
  // Dense: dim / n_heads. V4: head_dim.
  int64_t attn_head_dim() const { return is_v4() ? head_dim : dim / n_heads; }
  int64_t layer_ratio(int64_t layer) const { return compress_ratios.empty() ? 0 : compress_ratios[layer]; }
  bool layer_is_csa(int64_t layer) const { return layer_ratio(layer) == csa_ratio; }
  bool has_csa_layers() const {  // a main layer with the lightning indexer
    for (int64_t l = 0; l < n_layers; ++l)
      if (layer_ratio(l) > 0 && layer_is_csa(l)) return true;
    return false;
  }
  bool layer_is_hash(int64_t layer) const { return layer < n_hash_layers; }
  // Throws tessera::Error naming the offending field.
  void validate() const;
  // Training FLOPs per token (forward + backward) at sequence length T: 6 per weight multiply-accumulate of
  // every (active) matrix, embedding lookup excluded, plus the attention scores and values.
  double train_flops_per_token(int64_t seq_len) const;
};

}  // namespace tessera
