// What `tessera inspect` reports about a model recipe: parameter counts, FLOPs and KV-cache bytes per token.
// Pure arithmetic on the config (no tensors are allocated), so it works for V4-Pro's 1.6T parameters.
#pragma once
#include <cstdint>

#include "model/config.h"

namespace tessera {

struct ParamCounts {
  double total = 0;   // every parameter (MTP included)
  double active = 0;  // per token: routed experts counted top-k of n_routed only
};
ParamCounts count_params(const ModelConfig& c);

// Forward FLOPs per token (2 per multiply-accumulate) at context length `context`: the token at the end of a
// `context`-long sequence, matrices plus attention (scores and values over the keys it sees).
double forward_flops_per_token(const ModelConfig& c, int64_t context);
// Attention part only (scores and values, plus the indexer's scores for CSA), at the last token of `context`.
double attention_flops_per_token(const ModelConfig& c, int64_t context);
// KV-cache bytes per token of context, averaged over a `context`-long sequence, at `bytes_per_value`.
double kv_cache_bytes_per_token(const ModelConfig& c, int64_t context, double bytes_per_value);

}  // namespace tessera
