#include "model/config.h"

#include "core/error.h"

namespace tessera {

void ModelConfig::validate() const {
  if (arch != "dense") TS_FAIL("model.arch: unknown architecture '", arch, "' (this build supports: dense)");
  if (dim % n_heads != 0) TS_FAIL("model.dim (", dim, ") must be divisible by model.n_heads (", n_heads, ")");
  if (n_heads % n_kv_heads != 0)
    TS_FAIL("model.n_heads (", n_heads, ") must be a multiple of model.n_kv_heads (", n_kv_heads, ")");
  if (head_dim() % 2 != 0) TS_FAIL("model.dim / model.n_heads must be even for RoPE, got ", head_dim());
}

double ModelConfig::train_flops_per_token(int64_t seq_len) const {
  double hd = double(head_dim());
  double per_layer = dim * (n_heads * hd) * 2 + dim * (n_kv_heads * hd) * 2 + 3.0 * dim * ffn_dim;
  double matmul_params = n_layers * per_layer + double(dim) * vocab_size;
  return 6.0 * matmul_params + 12.0 * n_layers * dim * double(seq_len);
}

}  // namespace tessera
