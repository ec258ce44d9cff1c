// Model hyper-parameters, as read from `[model]` in a recipe (see recipes/models/).
#pragma once
#include <cstdint>
#include <string>

namespace tessera {

struct ModelConfig {
  std::string arch = "dense";  // the Llama layout
  int64_t vocab_size = 256;
  int64_t dim = 256;
  int64_t n_layers = 4;
  int64_t n_heads = 4;
  int64_t n_kv_heads = 4;  // grouped-query attention when < n_heads
  int64_t ffn_dim = 768;   // SwiGLU hidden size
  int64_t max_seq_len = 256;
  double rope_theta = 10000.0;
  double norm_eps = 1e-5;
  double init_std = 0.02;

  int64_t head_dim() const { return dim / n_heads; }
  // Throws tessera::Error naming the offending field.
  void validate() const;
  // Training FLOPs per token (forward + backward) at sequence length T: 6 per weight multiply-accumulate of
  // every matrix (embedding lookup excluded) plus 12 * layers * dim * T for attention scores and values.
  double train_flops_per_token(int64_t seq_len) const;
};

}  // namespace tessera
