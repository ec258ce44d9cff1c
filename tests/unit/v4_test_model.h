// The tiny DeepSeek-V4 configuration the model tests and the PyTorch oracle share: every layer type (window-only,
// CSA with the indexer selecting fewer entries than visible, HCA), hash and score-routed MoE with clamps that bind,
// mHC, MTP, YaRN on compressed layers, the indexer loss; and a way to move every parameter off its
// initialisation so that no term hides behind a zero or a one.
#pragma once
#include <cmath>
#include <nlohmann/json.hpp>
#include <string>

#include "core/rng.h"
#include "model/v4.h"
#include "tests/unit/test_util.h"

namespace tessera::testing {

inline ModelConfig tiny_v4_config() {
  ModelConfig c;
  c.arch = "deepseek_v4";
  c.vocab_size = 61;
  c.dim = 32;
  c.n_layers = 4;
  c.max_seq_len = 64;
  c.norm_eps = 1e-6;
  c.init_std = 0.2;
  c.head_dim = 16;
  c.rope_dim = 8;
  c.n_heads = 4;
  c.q_lora_rank = 24;
  c.o_groups = 2;
  c.o_lora_rank = 12;
  c.window = 6;
  c.compress_ratios = {0, 4, 8, 4, 0};
  c.csa_ratio = 4;
  c.yarn_factor = 4.0;
  c.yarn_original_len = 16;
  c.index_n_heads = 2;
  c.index_head_dim = 16;
  c.index_topk = 3;
  c.indexer_fp4 = false;
  c.kv_fp8 = false;
  c.indexer_loss_weight = 0.1;
  c.n_routed_experts = 6;
  c.n_shared_experts = 1;
  c.n_activated_experts = 2;
  c.moe_inter_dim = 20;
  c.n_hash_layers = 1;
  c.route_scale = 1.5;
  c.swiglu_limit = 0.5;  // small enough to bind on random weights
  c.balance_loss_weight = 0.01;
  c.hc_mult = 4;
  c.hc_sinkhorn_iters = 20;
  c.mtp_depth = 1;
  c.mtp_loss_weight = 0.3;
  return c;
}

// Every parameter and the balancing bias moved to random values of a sensible scale (norm weights around 1,
// gating factors around 0.5, biases, sinks and positional biases of order 0.5).
inline void randomize_v4(V4Model& model, uint64_t seed) {
  model.init(seed);
  for (Param* p : model.params()) {
    if (p->kind != ParamKind::vector) continue;
    const std::string& n = p->name;
    double mean = n.ends_with("norm") ? 1.0 : 0.0, std = n.ends_with("norm") ? 0.2 : 0.5;
    Tensor f = Tensor::empty(p->value.shape(), DType::f32);
    Rng{seed + 1, stream_id(n.c_str())}.fill_normal(f.data<float>(), f.numel(), mean, std);
    p->value.copy_from(f.to(p->value.dtype()));
  }
  for (Param* p : model.buffers()) {
    if (p->value.dtype() == DType::i32) continue;
    Tensor f = Tensor::empty(p->value.shape(), DType::f32);
    Rng{seed + 2, stream_id(p->name.c_str())}.fill_normal(f.data<float>(), f.numel(), 0.0, 0.3);
    p->value.copy_from(f.to(p->value.dtype()));
  }
}

// Every V4 field of a config, as the Python oracles read it (tests/reference/*.py: config_json / tessera_config.json).
inline std::string v4_config_json(const ModelConfig& c) {
  nlohmann::ordered_json j = {
      {"arch", c.arch}, {"vocab_size", c.vocab_size}, {"dim", c.dim}, {"n_layers", c.n_layers},
      {"max_seq_len", c.max_seq_len}, {"norm_eps", c.norm_eps}, {"rope_theta", c.rope_theta},
      {"head_dim", c.head_dim}, {"rope_dim", c.rope_dim}, {"n_heads", c.n_heads}, {"q_lora_rank", c.q_lora_rank},
      {"o_groups", c.o_groups}, {"o_lora_rank", c.o_lora_rank}, {"window", c.window},
      {"compress_ratios", c.compress_ratios}, {"csa_ratio", c.csa_ratio},
      {"compress_rope_theta", c.compress_rope_theta}, {"yarn_factor", c.yarn_factor},
      {"yarn_original_len", c.yarn_original_len}, {"yarn_beta_fast", c.yarn_beta_fast},
      {"yarn_beta_slow", c.yarn_beta_slow}, {"index_n_heads", c.index_n_heads},
      {"index_head_dim", c.index_head_dim}, {"index_topk", c.index_topk}, {"indexer_fp4", c.indexer_fp4},
      {"kv_fp8", c.kv_fp8}, {"indexer_loss_weight", c.indexer_loss_weight},
      {"n_routed_experts", c.n_routed_experts}, {"n_shared_experts", c.n_shared_experts},
      {"n_activated_experts", c.n_activated_experts}, {"moe_inter_dim", c.moe_inter_dim},
      {"n_hash_layers", c.n_hash_layers}, {"route_scale", c.route_scale}, {"score_func", c.score_func},
      {"swiglu_limit", c.swiglu_limit}, {"balance_loss_weight", c.balance_loss_weight}, {"hc_mult", c.hc_mult},
      {"hc_sinkhorn_iters", c.hc_sinkhorn_iters}, {"hc_eps", c.hc_eps}, {"mtp_depth", c.mtp_depth},
      {"mtp_loss_weight", c.mtp_loss_weight}};
  return j.dump(2);
}

// Two rows of 32 tokens: the first packs two documents (13 + 19 tokens), the second one; a few masked targets.
inline TokenBatch tiny_v4_batch(int64_t vocab, uint64_t seed) {
  const int64_t B = 2, T = 32;
  TokenBatch b = random_token_batch(B, T, vocab, seed);
  b.doc = Tensor::zeros({B, T}, DType::i32);
  for (int64_t t = 13; t < T; ++t) b.doc.data<int32_t>()[t] = 1;
  b.targets.data<int32_t>()[12] = -1;  // the last token of a document predicts nothing
  b.targets.data<int32_t>()[T + 5] = -1;
  return b;
}

}  // namespace tessera::testing
