#include "rl/generate.h"

#include <algorithm>
#include <cmath>
#include <numeric>

#include "core/error.h"
#include "core/rng.h"
#include "model/decode.h"

namespace tessera {

const char* finish_reason_name(FinishReason r) { return r == FinishReason::stop ? "stop" : "length"; }

int32_t sample_logits(const float* logits, int64_t V, const GenerationRequest& req, int64_t n, double* logprob,
                      double* model_logprob) {
  // log-sum-exp at temperature 1 and at the sampling temperature, in double.
  double mx = logits[0];
  int32_t argmax = 0;
  for (int64_t v = 1; v < V; ++v)
    if (logits[v] > mx) mx = logits[v], argmax = int32_t(v);
  double z1 = 0;
  for (int64_t v = 0; v < V; ++v) z1 += std::exp(double(logits[v]) - mx);
  const double lse1 = mx + std::log(z1);
  int32_t token = argmax;
  double lp;
  if (req.temperature <= 0) {
    lp = double(logits[token]) - lse1;
  } else {
    const double T = req.temperature;
    std::vector<double> probs(V);  // exp((l - max) / T), unnormalised
    double total = 0;
    for (int64_t v = 0; v < V; ++v) total += probs[v] = std::exp((double(logits[v]) - mx) / T);
    std::vector<int32_t> order(V);
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(), [&](int32_t a, int32_t c) { return probs[a] > probs[c]; });
    // Keep the top-k, then the smallest prefix whose mass reaches top_p.
    int64_t keep = req.top_k > 0 ? std::min<int64_t>(req.top_k, V) : V, cum_n = 0;
    double cum = 0;
    for (; cum_n < keep; ++cum_n) {
      cum += probs[order[cum_n]] / total;
      if (cum >= req.top_p) {
        ++cum_n;
        break;
      }
    }
    keep = std::max<int64_t>(1, std::min(keep, cum_n));
    double kept_mass = 0;
    for (int64_t i = 0; i < keep; ++i) kept_mass += probs[order[i]];
    double u = Rng{req.seed, stream_id("sample")}.uniform(uint64_t(n)) * kept_mass, acc = 0;
    token = order[keep - 1];
    for (int64_t i = 0; i < keep; ++i)
      if ((acc += probs[order[i]]) > u) {
        token = order[i];
        break;
      }
    lp = std::log(probs[token] / total);
  }
  if (logprob) *logprob = lp;
  if (model_logprob) *model_logprob = double(logits[token]) - lse1;
  return token;
}

static void generate_batch(Model& model, const std::vector<GenerationRequest>& reqs, size_t first, size_t count,
                           std::vector<GenerationResult>& out) {
  const int64_t V = model.config().vocab_size, max_len = model.config().max_seq_len, B = int64_t(count);
  int64_t prefill = 0, capacity = 0;
  for (size_t r = first; r < first + count; ++r) {
    const GenerationRequest& q = reqs[r];
    TS_CHECK(!q.prompt.empty(), "generate: request ", r, " has an empty prompt");
    TS_CHECK(int64_t(q.prompt.size()) < max_len, "generate: request ", r, "'s prompt of ", q.prompt.size(),
             " tokens leaves no room under model.max_seq_len ", max_len);
    TS_CHECK(q.max_new_tokens >= 0, "generate: request ", r, " has max_new_tokens < 0");
    prefill = std::max<int64_t>(prefill, q.prompt.size());
    capacity = std::max<int64_t>(capacity, std::min<int64_t>(q.prompt.size() + q.max_new_tokens, max_len));
  }
  std::unique_ptr<DecodeCache> cache = model.new_cache(B, capacity);
  std::vector<int64_t> len(B, 0);       // tokens fed per row
  std::vector<bool> active(B, false);
  std::vector<int32_t> last(B, -1);     // the token to feed next
  auto finish = [&](int64_t b, FinishReason why) {
    active[b] = false;
    out[first + b].finish = why;
  };
  // Samples row b's next token from its logits; updates its state.
  auto take = [&](int64_t b, const float* logits) {
    const GenerationRequest& q = reqs[first + b];
    GenerationResult& res = out[first + b];
    double lp, mlp;
    int32_t tok = sample_logits(logits, V, q, int64_t(res.tokens.size()), &lp, &mlp);
    res.tokens.push_back(tok);
    res.logprobs.push_back(lp);
    res.model_logprobs.push_back(mlp);
    last[b] = tok;
    if (std::find(q.stop_tokens.begin(), q.stop_tokens.end(), tok) != q.stop_tokens.end())
      finish(b, FinishReason::stop);
    else if (int64_t(res.tokens.size()) >= q.max_new_tokens || len[b] + 1 > capacity ||
             len[b] + 1 >= max_len)
      finish(b, FinishReason::length);
  };

  // Prefill: every prompt at once, padded with -1.
  Tensor ids = Tensor::empty({B, prefill}, DType::i32, Device::cpu);
  std::fill_n(ids.data<int32_t>(), B * prefill, -1);
  for (int64_t b = 0; b < B; ++b) {
    const std::vector<int32_t>& p = reqs[first + b].prompt;
    std::copy(p.begin(), p.end(), ids.data<int32_t>() + b * prefill);
    len[b] = int64_t(p.size());
    active[b] = reqs[first + b].max_new_tokens > 0;
    out[first + b].finish = FinishReason::length;
  }
  Tensor logits = Tensor::empty({B * prefill, V}, DType::f32, Device::cpu);
  model.decode(ids, *cache, logits);
  for (int64_t b = 0; b < B; ++b)
    if (active[b]) take(b, logits.data<float>() + (b * prefill + len[b] - 1) * V);

  // One token per step for the rows still going.
  Tensor step = Tensor::empty({B, 1}, DType::i32, Device::cpu);
  Tensor step_logits = Tensor::empty({B, V}, DType::f32, Device::cpu);
  while (std::find(active.begin(), active.end(), true) != active.end()) {
    for (int64_t b = 0; b < B; ++b) step.data<int32_t>()[b] = active[b] ? last[b] : -1;
    model.decode(step, *cache, step_logits);
    for (int64_t b = 0; b < B; ++b)
      if (active[b]) {
        ++len[b];
        take(b, step_logits.data<float>() + b * V);
      }
  }
}

std::vector<GenerationResult> generate(Model& model, const std::vector<GenerationRequest>& requests,
                                       const GenerateOptions& options) {
  std::vector<GenerationResult> out(requests.size());
  const size_t chunk = options.max_batch > 0 ? size_t(options.max_batch) : std::max<size_t>(1, requests.size());
  for (size_t first = 0; first < requests.size(); first += chunk)
    generate_batch(model, requests, first, std::min(chunk, requests.size() - first), out);
  return out;
}

}  // namespace tessera
