#include "cli/sample.h"

#include <algorithm>
#include <cmath>
#include <numeric>

#include "core/rng.h"

namespace tessera {

std::vector<int32_t> sample_tokens(Model& model, std::vector<int32_t> ids, const SamplingOptions& opt) {
  const int64_t V = model.config().vocab_size, ctx_max = model.config().max_seq_len;
  if (ids.empty()) TS_FAIL("sampling needs a prompt of at least one token");
  Rng rng{opt.seed, stream_id("sample")};
  std::vector<double> probs(V);
  std::vector<int32_t> order(V);
  for (int64_t n = 0; n < opt.max_new_tokens; ++n) {
    int64_t T = std::min<int64_t>(ids.size(), ctx_max);
    TokenBatch b;
    b.ids = Tensor::empty({1, T}, DType::i32);
    b.targets = Tensor::empty({1, T}, DType::i32);
    std::copy(ids.end() - T, ids.end(), b.ids.data<int32_t>());
    std::fill_n(b.targets.data<int32_t>(), T, -1);
    Tensor logits;
    model.forward(b, &logits);
    const float* last = logits.data<float>() + (T - 1) * V;
    int32_t next;
    if (opt.temperature <= 0) {
      next = int32_t(std::max_element(last, last + V) - last);
    } else {
      double m = *std::max_element(last, last + V), total = 0;
      for (int64_t v = 0; v < V; ++v) total += probs[v] = std::exp((last[v] - m) / opt.temperature);
      std::iota(order.begin(), order.end(), 0);
      std::stable_sort(order.begin(), order.end(), [&](int32_t a, int32_t c) { return probs[a] > probs[c]; });
      // Keep the top-k, then the smallest prefix whose mass reaches top_p.
      int64_t keep = opt.top_k > 0 ? std::min<int64_t>(opt.top_k, V) : V, cum_n = 0;
      double cum = 0;
      for (; cum_n < keep; ++cum_n) {
        cum += probs[order[cum_n]] / total;
        if (cum >= opt.top_p) {
          ++cum_n;
          break;
        }
      }
      keep = std::min(keep, cum_n);
      double kept_mass = 0;
      for (int64_t i = 0; i < keep; ++i) kept_mass += probs[order[i]];
      double u = rng.uniform(n) * kept_mass, acc = 0;
      next = order[keep - 1];
      for (int64_t i = 0; i < keep; ++i)
        if ((acc += probs[order[i]]) > u) {
          next = order[i];
          break;
        }
    }
    ids.push_back(next);
    if (next == opt.stop_token) break;
  }
  return ids;
}

}  // namespace tessera
