#include "cli/model_recipe.h"

#include "core/error.h"

namespace tessera {
namespace {

constexpr int64_t kMaxDim = int64_t(1) << 20;

// DeepSeek-V4 (../shared/spec/deepseek-v4.md §1-9; docs/model.md). Defaults are ModelConfig's (mostly Flash).
void read_v4(Recipe& r, ModelConfig& m) {
  m.head_dim = r.get_int("model.head_dim", m.head_dim, 1, kMaxDim);
  m.rope_dim = r.get_int("model.rope_dim", m.rope_dim, 2, kMaxDim);
  m.q_lora_rank = r.get_int("model.q_lora_rank", m.q_lora_rank, 1, kMaxDim);
  m.o_groups = r.get_int("model.o_groups", m.o_groups, 1, 4096);
  m.o_lora_rank = r.get_int("model.o_lora_rank", m.o_lora_rank, 1, kMaxDim);
  m.window = r.get_int("model.window", m.window, 1, int64_t(1) << 24);
  m.compress_ratios = r.require_int_list("model.compress_ratios", 0, int64_t(1) << 24);
  m.csa_ratio = r.get_int("model.csa_ratio", m.csa_ratio, 1, int64_t(1) << 24);
  m.compress_rope_theta = r.get_double("model.compress_rope_theta", m.compress_rope_theta, 1.0);
  m.yarn_factor = r.get_double("model.yarn_factor", m.yarn_factor, 1.0, 1e6);
  m.yarn_original_len = r.get_int("model.yarn_original_len", m.yarn_original_len, 1, int64_t(1) << 24);
  m.yarn_beta_fast = r.get_double("model.yarn_beta_fast", m.yarn_beta_fast, 0.0, 1e6);
  m.yarn_beta_slow = r.get_double("model.yarn_beta_slow", m.yarn_beta_slow, 0.0, 1e6);
  m.index_n_heads = r.get_int("model.index_n_heads", m.index_n_heads, 1, 4096);
  m.index_head_dim = r.get_int("model.index_head_dim", m.index_head_dim, 1, kMaxDim);
  m.index_topk = r.get_int("model.index_topk", m.index_topk, 1, int64_t(1) << 24);
  m.indexer_fp4 = r.get_bool("model.indexer_fp4", m.indexer_fp4);
  m.kv_fp8 = r.get_bool("model.kv_fp8", m.kv_fp8);
  m.indexer_loss_weight = r.get_double("model.indexer_loss_weight", m.indexer_loss_weight, 0.0, 1e6);
  m.n_routed_experts = r.get_int("model.n_routed_experts", m.n_routed_experts, 1, 1 << 16);
  m.n_shared_experts = r.get_int("model.n_shared_experts", m.n_shared_experts, 0, 64);
  m.n_activated_experts = r.get_int("model.n_activated_experts", m.n_activated_experts, 1, 1 << 16);
  m.moe_inter_dim = r.get_int("model.moe_inter_dim", m.moe_inter_dim, 1, 1 << 24);
  m.n_hash_layers = r.get_int("model.n_hash_layers", m.n_hash_layers, 0, 4096);
  m.route_scale = r.get_double("model.route_scale", m.route_scale, 0.0, 1e6);
  m.score_func = r.get_string("model.score_func", m.score_func, {"sqrtsoftplus", "sigmoid", "softmax"});
  m.swiglu_limit = r.get_double("model.swiglu_limit", m.swiglu_limit, 0.0);
  m.balance_loss_weight = r.get_double("model.balance_loss_weight", m.balance_loss_weight, 0.0, 1e6);
  m.bias_update_speed = r.get_double("model.bias_update_speed", m.bias_update_speed, 0.0, 1e6);
  m.hc_mult = r.get_int("model.hc_mult", m.hc_mult, 1, 64);
  m.hc_sinkhorn_iters = r.get_int("model.hc_sinkhorn_iters", m.hc_sinkhorn_iters, 1, 1000);
  m.hc_eps = r.get_double("model.hc_eps", m.hc_eps, 0.0, 1.0);
  m.mtp_depth = r.get_int("model.mtp_depth", m.mtp_depth, 0, 1);
  m.mtp_loss_weight = r.get_double("model.mtp_loss_weight", m.mtp_loss_weight, 0.0, 1e6);
}

// DeepSeek-V3.2 (inspect only). Defaults are V3.2's where ModelConfig's are V4's.
void read_v32(Recipe& r, ModelConfig& m) {
  m.ffn_dim = r.require_int("model.ffn_dim", 1, 1 << 24);  // the dense layers' SwiGLU
  m.n_dense_layers = r.get_int("model.n_dense_layers", m.n_dense_layers, 0, 4096);
  m.q_lora_rank = r.get_int("model.q_lora_rank", 1536, 1, kMaxDim);
  m.kv_lora_rank = r.get_int("model.kv_lora_rank", m.kv_lora_rank, 1, kMaxDim);
  m.qk_nope_head_dim = r.get_int("model.qk_nope_head_dim", m.qk_nope_head_dim, 1, kMaxDim);
  m.qk_rope_head_dim = r.get_int("model.qk_rope_head_dim", m.qk_rope_head_dim, 1, kMaxDim);
  m.v_head_dim = r.get_int("model.v_head_dim", m.v_head_dim, 1, kMaxDim);
  m.index_n_heads = r.get_int("model.index_n_heads", m.index_n_heads, 1, 4096);
  m.index_head_dim = r.get_int("model.index_head_dim", m.index_head_dim, 1, kMaxDim);
  m.index_topk = r.get_int("model.index_topk", 2048, 1, int64_t(1) << 24);
  m.n_routed_experts = r.get_int("model.n_routed_experts", m.n_routed_experts, 1, 1 << 16);
  m.n_shared_experts = r.get_int("model.n_shared_experts", m.n_shared_experts, 0, 64);
  m.n_activated_experts = r.get_int("model.n_activated_experts", 8, 1, 1 << 16);
  m.moe_inter_dim = r.get_int("model.moe_inter_dim", m.moe_inter_dim, 1, 1 << 24);
  m.route_scale = r.get_double("model.route_scale", 2.5, 0.0, 1e6);
  m.score_func = r.get_string("model.score_func", "sigmoid", {"sigmoid", "softmax"});
  m.yarn_factor = r.get_double("model.yarn_factor", m.yarn_factor, 1.0, 1e6);
  m.yarn_original_len = r.get_int("model.yarn_original_len", m.yarn_original_len, 1, int64_t(1) << 24);
  m.yarn_beta_fast = r.get_double("model.yarn_beta_fast", m.yarn_beta_fast, 0.0, 1e6);
  m.yarn_beta_slow = r.get_double("model.yarn_beta_slow", m.yarn_beta_slow, 0.0, 1e6);
  m.mtp_depth = r.get_int("model.mtp_depth", m.mtp_depth, 0, 1);
}

}  // namespace

ModelConfig model_config_from_recipe(Recipe& r, int64_t tokenizer_vocab) {
  ModelConfig m;
  m.arch = r.get_string("model.arch", m.arch, {"dense", "deepseek_v4", "deepseek_v32"});
  m.vocab_size = r.get_int("model.vocab_size", tokenizer_vocab, 1, int64_t(1) << 31);
  if (m.vocab_size < tokenizer_vocab)
    TS_FAIL(r.path(), ": model.vocab_size ", m.vocab_size, " is smaller than the tokenizer's ",
            tokenizer_vocab);
  m.dim = r.require_int("model.dim", 1, kMaxDim);
  m.n_layers = r.require_int("model.n_layers", 0, 4096);
  m.n_heads = r.require_int("model.n_heads", 1, 4096);
  if (m.arch == "dense") {
    m.n_kv_heads = r.get_int("model.n_kv_heads", m.n_heads, 1, 4096);
    m.ffn_dim = r.require_int("model.ffn_dim", 1, 1 << 24);
  } else if (m.is_v4()) {
    read_v4(r, m);
  } else {
    read_v32(r, m);
  }
  m.max_seq_len = r.get_int("model.max_seq_len", m.max_seq_len, 1, 1 << 24);
  m.rope_theta = r.get_double("model.rope_theta", m.rope_theta, 1.0);
  m.norm_eps = r.get_double("model.norm_eps", m.norm_eps, 0.0, 1.0);
  m.init_std = r.get_double("model.init_std", m.init_std, 0.0, 10.0);
  try {
    m.validate();
  } catch (const Error& e) {
    TS_FAIL(r.path(), ": ", e.what());
  }
  return m;
}

}  // namespace tessera
