#include "model/config.h"

#include "core/error.h"
#include "model/inspect.h"

namespace tessera {

static void require_positive(const char* key, int64_t v) {
  if (v <= 0) TS_FAIL("model.", key, " must be positive, got ", v);
}

// The MoE expert counts, alike in V4 and V3.2 (their positivity is checked by the caller).
static void check_expert_counts(const ModelConfig& c) {
  if (c.n_activated_experts > c.n_routed_experts)
    TS_FAIL("model.n_activated_experts (", c.n_activated_experts, ") exceeds model.n_routed_experts (",
            c.n_routed_experts, ")");
  if (c.n_shared_experts < 0) TS_FAIL("model.n_shared_experts must be >= 0, got ", c.n_shared_experts);
}

static void validate_v4(const ModelConfig& c) {
  require_positive("head_dim", c.head_dim);
  require_positive("q_lora_rank", c.q_lora_rank);
  require_positive("o_groups", c.o_groups);
  require_positive("o_lora_rank", c.o_lora_rank);
  require_positive("window", c.window);
  require_positive("n_routed_experts", c.n_routed_experts);
  require_positive("n_activated_experts", c.n_activated_experts);
  require_positive("moe_inter_dim", c.moe_inter_dim);
  require_positive("hc_mult", c.hc_mult);
  require_positive("hc_sinkhorn_iters", c.hc_sinkhorn_iters);
  if (c.rope_dim <= 0 || c.rope_dim % 2 != 0 || c.rope_dim > c.head_dim)
    TS_FAIL("model.rope_dim (", c.rope_dim, ") must be even, positive and at most model.head_dim (", c.head_dim, ")");
  if (c.n_heads * c.head_dim % c.o_groups != 0)
    TS_FAIL("model.n_heads * model.head_dim (", c.n_heads * c.head_dim, ") must be divisible by model.o_groups (",
            c.o_groups, ")");
  check_expert_counts(c);
  if (c.n_hash_layers < 0 || c.n_hash_layers > c.n_layers)
    TS_FAIL("model.n_hash_layers (", c.n_hash_layers, ") must lie in [0, model.n_layers = ", c.n_layers, "]");
  if (c.score_func != "sqrtsoftplus" && c.score_func != "sigmoid" && c.score_func != "softmax")
    TS_FAIL("model.score_func: unknown '", c.score_func, "' (sqrtsoftplus, sigmoid, softmax)");
  if (c.mtp_depth != 0 && c.mtp_depth != 1) TS_FAIL("model.mtp_depth must be 0 or 1, got ", c.mtp_depth);
  int64_t n = static_cast<int64_t>(c.compress_ratios.size());
  if (n != c.n_layers && n != c.n_layers + 1)
    TS_FAIL("model.compress_ratios has ", n, " entries; expected model.n_layers (", c.n_layers,
            ") or one more for the MTP block");
  for (int64_t i = 0; i < n; ++i)
    if (c.compress_ratios[i] < 0) TS_FAIL("model.compress_ratios[", i, "] must be >= 0, got ", c.compress_ratios[i]);
  if (n == c.n_layers + 1 && c.compress_ratios.back() != 0)
    TS_FAIL("model.compress_ratios: the MTP entry (the last) must be 0 (window only), got ", c.compress_ratios.back());
  bool any_csa = false;
  for (int64_t i = 0; i < c.n_layers; ++i) any_csa |= c.layer_is_csa(i);
  if (any_csa) {
    require_positive("index_n_heads", c.index_n_heads);
    require_positive("index_topk", c.index_topk);
    if (c.index_head_dim <= 0 || (c.index_head_dim & (c.index_head_dim - 1)) != 0 || c.index_head_dim < c.rope_dim)
      TS_FAIL("model.index_head_dim (", c.index_head_dim,
              ") must be a power of two (Walsh-Hadamard rotation) and at least model.rope_dim (", c.rope_dim, ")");
  }
  if (c.yarn_factor < 1.0) TS_FAIL("model.yarn_factor must be >= 1 (1 = no YaRN), got ", c.yarn_factor);
}

// DeepSeek-V3.2 (inspect only): MLA attention with the DSA lightning indexer, dense then MoE layers.
static void validate_v32(const ModelConfig& c) {
  require_positive("q_lora_rank", c.q_lora_rank);
  require_positive("kv_lora_rank", c.kv_lora_rank);
  require_positive("qk_nope_head_dim", c.qk_nope_head_dim);
  require_positive("qk_rope_head_dim", c.qk_rope_head_dim);
  require_positive("v_head_dim", c.v_head_dim);
  require_positive("index_n_heads", c.index_n_heads);
  require_positive("index_head_dim", c.index_head_dim);
  require_positive("index_topk", c.index_topk);
  require_positive("n_routed_experts", c.n_routed_experts);
  require_positive("n_activated_experts", c.n_activated_experts);
  require_positive("moe_inter_dim", c.moe_inter_dim);
  require_positive("ffn_dim", c.ffn_dim);
  check_expert_counts(c);
  if (c.n_dense_layers < 0 || c.n_dense_layers > c.n_layers)
    TS_FAIL("model.n_dense_layers (", c.n_dense_layers, ") must lie in [0, model.n_layers = ", c.n_layers, "]");
  if (c.mtp_depth != 0 && c.mtp_depth != 1) TS_FAIL("model.mtp_depth must be 0 or 1, got ", c.mtp_depth);
}

void ModelConfig::validate() const {
  if (arch != "dense" && arch != "deepseek_v4" && arch != "deepseek_v32")
    TS_FAIL("model.arch: unknown architecture '", arch,
            "' (this build supports: dense, deepseek_v4, deepseek_v32 (inspect only))");
  if (is_v4()) return validate_v4(*this);
  if (is_v32()) return validate_v32(*this);
  if (dim % n_heads != 0) TS_FAIL("model.dim (", dim, ") must be divisible by model.n_heads (", n_heads, ")");
  if (n_heads % n_kv_heads != 0)
    TS_FAIL("model.n_heads (", n_heads, ") must be a multiple of model.n_kv_heads (", n_kv_heads, ")");
  if (attn_head_dim() % 2 != 0) TS_FAIL("model.dim / model.n_heads must be even for RoPE, got ", attn_head_dim());
}

double ModelConfig::train_flops_per_token(int64_t seq_len) const {
  if (is_v4() || is_v32()) return 3.0 * forward_flops_per_token(*this, seq_len);
  double hd = double(attn_head_dim());
  double per_layer = dim * (n_heads * hd) * 2 + dim * (n_kv_heads * hd) * 2 + 3.0 * dim * ffn_dim;
  double matmul_params = n_layers * per_layer + double(dim) * vocab_size;
  return 6.0 * matmul_params + 12.0 * n_layers * dim * double(seq_len);
}

}  // namespace tessera
