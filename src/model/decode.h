// Cached decoding (forward only): the cache base every architecture derives from, and the host bookkeeping of one
// Model::decode call shared by the architectures (src/model/dense_decode.cpp, src/model/v4_decode.cpp).
#pragma once
#include <cstdint>
#include <vector>

#include "core/tensor.h"

namespace tessera {

struct DecodeCache {
  virtual ~DecodeCache() = default;
  int64_t batch = 0, capacity = 0;
  std::vector<int64_t> len;  // tokens cached per row
};

// One decode call's new tokens: row b has n_new[b] tokens (the leading non-negative entries of its ids), token i
// of row b sits at position pos[b*t + i] = len[b] + i (-1 for padding).
struct DecodePlan {
  int64_t B = 0, t = 0;
  std::vector<int64_t> n_new;
  std::vector<int32_t> pos;   // (B*t)
  Tensor ids;                 // (B*t) i32 host, padding replaced by token 0
  Tensor q_pos;               // (B, t) i32 host: pos
  Tensor rope_pos;            // (B*t) i32 host: pos, 0 for padding
};
// Validates ids (B, t) i32 host against the cache (batch, capacity, vocab) and plans the call.
DecodePlan plan_decode(const Tensor& ids, const DecodeCache& cache, int64_t vocab_size);

}  // namespace tessera
