// What `tessera inspect` reports about a model recipe: parameter counts, FLOPs and KV-cache bytes per token.
// Pure arithmetic on the config (no tensors are allocated), so it works for V4-Pro's 1.6T parameters.
// Architectures: dense, deepseek_v4 (docs/model.md's parameter table) and deepseek_v32 (the V3.2 baseline of
// V4's efficiency claims). The counting rules and assumptions are in docs/model.md, "Inspect".
#pragma once
#include <cstdint>
#include <string>

#include "model/config.h"

namespace tessera {

// Trainable parameters only: the buffers gate.bias (balancing bias) and gate.tid2eid (hash table) are not
// counted. The MTP block shares the main model's embedding and output head, so they are counted once.
struct ParamCounts {
  double total = 0;       // every trainable parameter (MTP included)
  double active = 0;      // per token: routed experts counted top-k of n_routed
  double mtp = 0;         // the MTP block's share of total
  double mtp_active = 0;  // the MTP block's share of active
  double embedding = 0;   // tok_embeddings: a row lookup, not a multiply
  // DeepSeek's convention for the figures it publishes (V3: 671B / 37B; V4: 284B / 13B, 1.6T / 49B): the main
  // model without the MTP block, and active without the embedding lookup.
  double published_total() const { return total - mtp; }
  double published_active() const { return active - mtp_active - embedding; }
};
ParamCounts count_params(const ModelConfig& c);

// Forward FLOPs of one token at the end of a `context`-long sequence, 2 per multiply-accumulate.
struct FlopCounts {
  double matmul = 0;     // every active weight matrix (mHC mixes, compressors, router, output head)
  double attention = 0;  // scores and values over the keys the query sees (window + compressed entries)
  double indexer = 0;    // lightning-indexer scores of every visible entry (V4 CSA layers; V3.2's DSA)
  double total() const { return matmul + attention + indexer; }
};
// include_mtp: add the MTP block (it runs in training; inference comparisons leave it out).
FlopCounts count_flops(const ModelConfig& c, int64_t context, bool include_mtp);
// FLOPs in FP8 equivalents (the unit of V4's published "27% of single-token FLOPs"): each part weighted by
// the cost of its precision in the released inference path relative to FP8: weight GEMMs FP8 (x1), attention
// BF16 (x2), the indexer FP4 in V4 (x0.5) and FP8 in V3.2 (x1); a dense model is BF16 throughout (x2).
double fp8_equivalent_flops(const ModelConfig& c, const FlopCounts& f);

// count_flops(c, context, true).total(): what a training forward computes per token (the MFU numerator / 3).
double forward_flops_per_token(const ModelConfig& c, int64_t context);
// Attention part only (scores and values, plus the indexer's scores for CSA), MTP block included.
double attention_flops_per_token(const ModelConfig& c, int64_t context);

// KV-cache bytes per token of context: the main model's cache for a `context`-long sequence divided by
// `context` (the MTP block, used only for speculative decoding, is left out). `bytes_per_value` > 0 stores
// every cached value at that width; kNativeKvPrecision (0) uses the architecture's released format,
// kv_native_precision() says which.
constexpr double kNativeKvPrecision = 0;
double kv_cache_bytes_per_token(const ModelConfig& c, int64_t context, double bytes_per_value);
std::string kv_native_precision(const ModelConfig& c);

}  // namespace tessera
