// The generation engine (spec post-training §4): batched sampling with the model's KV cache (Model::new_cache /
// Model::decode), for rollouts and `tessera sample`.
#pragma once
#include <cstdint>
#include <vector>

#include "model/model.h"

namespace tessera {

struct GenerationRequest {
  std::vector<int32_t> prompt;       // at least one token
  int64_t max_new_tokens = 256;
  std::vector<int32_t> stop_tokens;  // a sampled stop token ends the row (and is kept in the output)
  double temperature = 1.0;          // 0: greedy (argmax, ties to the lowest id)
  double top_p = 1.0;                // 1: off
  int64_t top_k = 0;                 // 0: off
  uint64_t seed = 0;
};

enum class FinishReason { stop, length };
const char* finish_reason_name(FinishReason r);  // "stop", "length"

struct GenerationResult {
  std::vector<int32_t> tokens;  // the generated tokens, without the prompt
  // log p(token) under the sampling distribution before truncation: log_softmax(logits / temperature) (verl's
  // convention: the trainer recomputes exactly this from its logits; top-k / top-p are not applied). With
  // temperature 0 (greedy) the temperature-1 value.
  std::vector<double> logprobs;
  // log p(token) under the untempered model: log_softmax(logits).
  std::vector<double> model_logprobs;
  FinishReason finish = FinishReason::length;  // length: max_new_tokens reached, or the model's max_seq_len
};

struct GenerateOptions {
  int64_t max_batch = 0;  // requests decoded together (0: all); results do not depend on it
};

// Samples every request. Request r's draw for its n-th new token uses Philox(seed_r, stream "sample", n) on its own
// logits, so its output does not depend on the other requests in the batch (up to floating-point differences
// of batched GEMMs). Sequences are capped at the model's max_seq_len (finish "length"). Rows that finish stop
// attending (their later entries are padding) and the batch stops when every row is done.
std::vector<GenerationResult> generate(Model& model, const std::vector<GenerationRequest>& requests,
                                       const GenerateOptions& options = {});

// The per-token sampling rule on one row of logits (V), exposed for tests and tools: returns the token; logprob
// and model_logprob as in GenerationResult.
int32_t sample_logits(const float* logits, int64_t V, const GenerationRequest& req, int64_t n, double* logprob,
                      double* model_logprob);

}  // namespace tessera
