#include "cli/sample.h"

#include <algorithm>

#include "rl/generate.h"

namespace tessera {

std::vector<int32_t> sample_tokens(Model& model, std::vector<int32_t> ids, const SamplingOptions& opt) {
  if (ids.empty()) TS_FAIL("sampling needs a prompt of at least one token");
  const int64_t ctx_max = model.config().max_seq_len;
  GenerationRequest req;
  // The model sees at most max_seq_len tokens: the prompt's last ones, leaving room for at least one new token.
  const int64_t keep = std::min<int64_t>(ids.size(), ctx_max - 1);
  req.prompt.assign(ids.end() - keep, ids.end());
  req.max_new_tokens = opt.max_new_tokens;
  req.temperature = opt.temperature;
  req.top_k = opt.top_k;
  req.top_p = opt.top_p;
  req.seed = opt.seed;
  if (opt.stop_token >= 0) req.stop_tokens = {opt.stop_token};
  GenerationResult r = generate(model, {req}).at(0);
  ids.insert(ids.end(), r.tokens.begin(), r.tokens.end());
  return ids;
}

}  // namespace tessera
