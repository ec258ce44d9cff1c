// Text generation from a checkpoint with the generation engine (rl/generate.h: KV-cached decoding).
#pragma once
#include <cstdint>
#include <vector>

#include "model/model.h"

namespace tessera {

struct SamplingOptions {
  int64_t max_new_tokens = 200;
  double temperature = 0.8;  // 0: greedy
  int64_t top_k = 0;         // 0: off
  double top_p = 1.0;        // 1: off
  uint64_t seed = 0;
  int32_t stop_token = -1;
};

// Appends sampled tokens to `ids`; each draw uses Philox(seed, index of the new token), so a run is reproducible.
// The model sees the prompt's last max_seq_len - 1 tokens; generation stops when the sequence reaches
// max_seq_len (no sliding context: the cache holds every token).
std::vector<int32_t> sample_tokens(Model& model, std::vector<int32_t> ids, const SamplingOptions& opt);

}  // namespace tessera
