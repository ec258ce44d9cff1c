// The generation engine and the models' cached decoding: incremental decoding gives the logits of a full forward
// pass (dense and V4, prefills of different lengths per row, padding, token by token); sampling is greedy at
// temperature 0 and with top-k 1, reproducible per seed, independent of the batch's other requests; stop tokens
// and lengths end rows; log-probabilities are those of the full forward's logits.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>

#include "model/decode.h"
#include "model/dense.h"
#include "rl/generate.h"
#include "tests/unit/test_util.h"
#include "tests/unit/v4_test_model.h"

using namespace tessera;

namespace {

ModelConfig dense_config() { return tessera::testing::dense_test_config(37, 16, 2, 24, 48); }

std::vector<int32_t> random_ids(int64_t n, int64_t V, uint64_t seed) {
  std::vector<int32_t> ids(n);
  Rng rng{seed, stream_id("test-generate")};
  for (int64_t i = 0; i < n; ++i) ids[i] = int32_t(rng.below(i, V));
  return ids;
}

// Logits (rows, S, V) of a full forward pass over equal-length sequences.
std::vector<float> full_logits(Model& m, const std::vector<std::vector<int32_t>>& seqs) {
  const int64_t B = seqs.size(), S = seqs[0].size();
  TokenBatch b;
  b.ids = Tensor::empty({B, S}, DType::i32);
  b.targets = Tensor::empty({B, S}, DType::i32);
  for (int64_t r = 0; r < B; ++r) std::copy(seqs[r].begin(), seqs[r].end(), b.ids.data<int32_t>() + r * S);
  // Next-token targets (the V4 objective wants some); they do not change the logits.
  for (int64_t r = 0; r < B; ++r)
    for (int64_t i = 0; i < S; ++i) b.targets.data<int32_t>()[r * S + i] = i + 1 < S ? seqs[r][i + 1] : -1;
  Tensor logits;
  m.forward(b, &logits);
  Tensor f = logits.device() == Device::cpu ? logits : logits.to_device(Device::cpu);
  if (f.dtype() != DType::f32) f = f.to(DType::f32);
  return std::vector<float>(f.data<float>(), f.data<float>() + f.numel());
}

// Decodes every row of `seqs` in chunks: row r first gets prefill[r] tokens (all rows in one call, padded), then
// each call feeds `chunk(step, r)` tokens of row r (0 = padding for that row), until every row is consumed.
// Returns the largest |logit - full forward logit| over every fed position.
double incremental_vs_full(Model& m, const std::vector<std::vector<int32_t>>& seqs, const std::vector<int64_t>& prefill,
                           const std::function<int64_t(int64_t, int64_t)>& chunk) {
  const int64_t B = seqs.size(), S = seqs[0].size(), V = m.config().vocab_size;
  std::vector<float> ref = full_logits(m, seqs);
  std::unique_ptr<DecodeCache> cache = m.new_cache(B, S);
  std::vector<int64_t> done(B, 0);
  double worst = 0;
  int64_t checked = 0;
  for (int64_t step = 0;; ++step) {
    std::vector<int64_t> n(B);
    int64_t t = 0;
    for (int64_t r = 0; r < B; ++r) {
      n[r] = std::min<int64_t>(step == 0 ? prefill[r] : chunk(step, r), S - done[r]);
      t = std::max(t, n[r]);
    }
    if (t == 0) {
      bool all = true;
      for (int64_t r = 0; r < B; ++r) all = all && done[r] == S;
      if (all) break;
      continue;
    }
    Tensor ids = Tensor::empty({B, t}, DType::i32);
    std::fill_n(ids.data<int32_t>(), B * t, -1);
    for (int64_t r = 0; r < B; ++r)
      for (int64_t i = 0; i < n[r]; ++i) ids.data<int32_t>()[r * t + i] = seqs[r][done[r] + i];
    Tensor logits = Tensor::empty({B * t, V}, DType::f32);
    m.decode(ids, *cache, logits);
    for (int64_t r = 0; r < B; ++r) {
      for (int64_t i = 0; i < n[r]; ++i)
        for (int64_t v = 0; v < V; ++v) {
          double d = std::abs(double(logits.data<float>()[(r * t + i) * V + v]) - ref[(r * S + done[r] + i) * V + v]);
          worst = std::max(worst, d);
          ++checked;
        }
      done[r] += n[r];
      EXPECT_EQ(cache->len[r], done[r]);
    }
    if (step > 4 * S) break;
  }
  EXPECT_EQ(checked, B * S * V);
  return worst;
}

std::vector<int32_t> full_sequence(const GenerationRequest& q, const GenerationResult& r) {
  std::vector<int32_t> s = q.prompt;
  s.insert(s.end(), r.tokens.begin(), r.tokens.end());
  return s;
}

// Checks a generated row against a full forward pass over prompt + tokens: the log-probabilities (tempered and
// untempered) of every token, and for greedy rows that every token is the argmax.
void check_against_forward(Model& m, const GenerationRequest& q, const GenerationResult& r) {
  const int64_t V = m.config().vocab_size, P = q.prompt.size();
  ASSERT_FALSE(r.tokens.empty());
  std::vector<float> ref = full_logits(m, {full_sequence(q, r)});
  for (size_t n = 0; n < r.tokens.size(); ++n) {
    const float* l = ref.data() + (P - 1 + n) * V;
    double mx = *std::max_element(l, l + V), z1 = 0, zt = 0;
    const double T = q.temperature > 0 ? q.temperature : 1.0;
    for (int64_t v = 0; v < V; ++v) {
      z1 += std::exp(l[v] - mx);
      zt += std::exp((l[v] - mx) / T);
    }
    const int32_t tok = r.tokens[n];
    EXPECT_NEAR(r.model_logprobs[n], l[tok] - mx - std::log(z1), 1e-4) << "token " << n;
    EXPECT_NEAR(r.logprobs[n], (l[tok] - mx) / T - std::log(zt), 1e-4) << "token " << n;
    if (q.temperature <= 0) {
      EXPECT_EQ(tok, int32_t(std::max_element(l, l + V) - l)) << "token " << n;
    }
  }
}

}  // namespace

// ------------------------------------------------------------------------------------------- cached decoding

TEST(DenseDecode, IncrementalLogitsMatchFullForward) {
  DenseModel m(dense_config());
  m.init(3);
  const int64_t S = 20, V = m.config().vocab_size;
  std::vector<std::vector<int32_t>> seqs{random_ids(S, V, 1), random_ids(S, V, 2), random_ids(S, V, 3)};
  // Prefills of 5, 1 and 9 tokens, then token by token, with row 1 skipping every third step and row 2 taking two
  // tokens at a time on even steps.
  double worst = incremental_vs_full(m, seqs, {5, 1, 9}, [](int64_t step, int64_t r) -> int64_t {
    if (r == 1) return step % 3 == 0 ? 0 : 1;
    if (r == 2) return step % 2 == 0 ? 2 : 1;
    return 1;
  });
  EXPECT_LE(worst, 1e-5);
}

TEST(DenseDecode, RejectsOverflowAndForeignCaches) {
  DenseModel m(dense_config());
  m.init(3);
  auto cache = m.new_cache(1, 4);
  Tensor ids = Tensor::empty({1, 5}, DType::i32);
  std::fill_n(ids.data<int32_t>(), 5, 1);
  Tensor logits = Tensor::empty({5, m.config().vocab_size}, DType::f32);
  auto error = [&] { return tessera::testing::error_of([&] { m.decode(ids, *cache, logits); }); };
  EXPECT_NE(error().find("capacity"), std::string::npos);
  ids.data<int32_t>()[1] = -1;  // a token after padding
  EXPECT_NE(error().find("after padding"), std::string::npos);
}

// ------------------------------------------------------------------------------------------- generation engine

TEST(Generate, GreedyIsArgmaxOfTheFullForward) {
  DenseModel m(dense_config());
  m.init(5);
  std::vector<GenerationRequest> reqs(3);
  for (int i = 0; i < 3; ++i) {
    reqs[i].prompt = random_ids(2 + 5 * i, m.config().vocab_size, 10 + i);
    reqs[i].max_new_tokens = 12;
    reqs[i].temperature = 0;
  }
  std::vector<GenerationResult> out = generate(m, reqs);
  for (int i = 0; i < 3; ++i) {
    EXPECT_EQ(out[i].tokens.size(), 12u);
    EXPECT_EQ(out[i].finish, FinishReason::length);
    check_against_forward(m, reqs[i], out[i]);
  }
}

TEST(Generate, LogProbsAreThoseOfTheFullForward) {
  DenseModel m(dense_config());
  m.init(6);
  std::vector<GenerationRequest> reqs(2);
  reqs[0].prompt = random_ids(4, m.config().vocab_size, 20);
  reqs[0].temperature = 0.7, reqs[0].top_p = 0.9, reqs[0].top_k = 5, reqs[0].seed = 1;
  reqs[1].prompt = random_ids(9, m.config().vocab_size, 21);
  reqs[1].temperature = 1.0, reqs[1].seed = 2;
  for (auto& q : reqs) q.max_new_tokens = 15;
  std::vector<GenerationResult> out = generate(m, reqs);
  for (int i = 0; i < 2; ++i) check_against_forward(m, reqs[i], out[i]);
}

TEST(Generate, FixedSeedReproducesAndSeedsDiffer) {
  DenseModel m(dense_config());
  m.init(7);
  GenerationRequest q;
  q.prompt = random_ids(6, m.config().vocab_size, 30);
  q.max_new_tokens = 20, q.temperature = 1.5, q.seed = 11;
  GenerationResult a = generate(m, {q})[0], b = generate(m, {q})[0];
  EXPECT_EQ(a.tokens, b.tokens);
  EXPECT_EQ(a.logprobs, b.logprobs);
  q.seed = 12;
  GenerationResult c = generate(m, {q})[0];
  EXPECT_NE(a.tokens, c.tokens);
}

TEST(Generate, RequestIsIndependentOfTheBatch) {
  DenseModel m(dense_config());
  m.init(8);
  const int64_t V = m.config().vocab_size;
  GenerationRequest a;
  a.prompt = random_ids(5, V, 40);
  a.max_new_tokens = 16, a.temperature = 1.2, a.top_p = 0.95, a.seed = 3;
  GenerationRequest other1 = a, other2 = a;
  other1.prompt = random_ids(11, V, 41), other1.seed = 4, other1.max_new_tokens = 3;
  other2.prompt = random_ids(2, V, 42), other2.seed = 3, other2.temperature = 0;
  GenerationResult alone = generate(m, {a})[0];
  for (const auto& batch : {std::vector<GenerationRequest>{other1, a, other2}, {a, other2}, {other2, other1, a}}) {
    std::vector<GenerationResult> out = generate(m, batch);
    const GenerationResult& r = *std::find_if(out.begin(), out.end(), [&](const GenerationResult& x) {
      return &x - out.data() == std::find_if(batch.begin(), batch.end(), [&](const GenerationRequest& q) {
               return q.prompt == a.prompt;
             }) - batch.begin();
    });
    EXPECT_EQ(r.tokens, alone.tokens);
    ASSERT_EQ(r.logprobs.size(), alone.logprobs.size());
    for (size_t n = 0; n < r.logprobs.size(); ++n) EXPECT_NEAR(r.logprobs[n], alone.logprobs[n], 1e-5);
  }
  // Decoding the requests one at a time gives the same as all together.
  std::vector<GenerationRequest> all{other1, a, other2};
  std::vector<GenerationResult> together = generate(m, all), single = generate(m, all, {.max_batch = 1});
  for (int i = 0; i < 3; ++i) EXPECT_EQ(together[i].tokens, single[i].tokens);
}

TEST(Generate, TopKOneIsGreedy) {
  DenseModel m(dense_config());
  m.init(9);
  GenerationRequest g;
  g.prompt = random_ids(7, m.config().vocab_size, 50);
  g.max_new_tokens = 14, g.temperature = 0;
  GenerationRequest k1 = g;
  k1.temperature = 1.3, k1.top_k = 1, k1.seed = 99;
  EXPECT_EQ(generate(m, {g})[0].tokens, generate(m, {k1})[0].tokens);
}

TEST(Generate, StopTokensAndLengthsEndRows) {
  DenseModel m(dense_config());
  m.init(10);
  const int64_t V = m.config().vocab_size;
  GenerationRequest g;
  g.prompt = random_ids(3, V, 60);
  g.max_new_tokens = 12, g.temperature = 0;
  std::vector<int32_t> free_run = generate(m, {g})[0].tokens;
  // The first token (after the first) not seen before ends the row when it is a stop token.
  size_t j = 1;
  while (j < free_run.size() && std::count(free_run.begin(), free_run.begin() + j, free_run[j])) ++j;
  ASSERT_LT(j, free_run.size());
  GenerationRequest s = g;
  s.stop_tokens = {free_run[j], int32_t(V + 5)};
  GenerationRequest longp = g;  // a prompt close to max_seq_len: cut at max_seq_len
  longp.prompt = random_ids(m.config().max_seq_len - 4, V, 61);
  longp.max_new_tokens = 20;
  std::vector<GenerationResult> out = generate(m, {s, g, longp});
  EXPECT_EQ(out[0].finish, FinishReason::stop);
  EXPECT_EQ(out[0].tokens, std::vector<int32_t>(free_run.begin(), free_run.begin() + j + 1));
  EXPECT_EQ(out[1].finish, FinishReason::length);
  EXPECT_EQ(out[1].tokens, free_run);
  EXPECT_EQ(out[2].finish, FinishReason::length);
  EXPECT_EQ(out[2].tokens.size(), 4u);
  EXPECT_EQ(out[2].logprobs.size(), 4u);
  GenerationRequest none = g;
  none.max_new_tokens = 0;
  EXPECT_TRUE(generate(m, {none})[0].tokens.empty());
}

// ------------------------------------------------------------------------------------------- V4

namespace {

// The tiny V4 model with every parameter moved off its initialisation: window 6, CSA (m = 4, the indexer keeping
// 3 of up to 7 visible entries) and HCA (m' = 8) layers; sequences of 30 tokens cross several blocks of each and
// exceed the window.
std::unique_ptr<V4Model> tiny_v4(uint64_t seed, bool quantised = false) {
  ModelConfig c = tessera::testing::tiny_v4_config();
  c.kv_fp8 = c.indexer_fp4 = quantised;
  auto m = std::make_unique<V4Model>(c, DType::f32);
  tessera::testing::randomize_v4(*m, seed);
  return m;
}

}  // namespace

TEST(V4Decode, IncrementalLogitsMatchFullForward) {
  auto m = tiny_v4(21);
  const int64_t S = 30, V = m->config().vocab_size;
  std::vector<std::vector<int32_t>> seqs{random_ids(S, V, 71), random_ids(S, V, 72), random_ids(S, V, 73)};
  // Prefills of 5, 1 and 13 tokens (13 completes blocks of both ratios and one CSA overlap), then token by token,
  // row 1 skipping every third step and row 2 taking three tokens at a time on even steps.
  double worst = incremental_vs_full(*m, seqs, {5, 1, 13}, [](int64_t step, int64_t r) -> int64_t {
    if (r == 1) return step % 3 == 0 ? 0 : 1;
    if (r == 2) return step % 2 == 0 ? 3 : 1;
    return 1;
  });
  EXPECT_LE(worst, 1e-5);
  // A whole-sequence prefill, and pure token-by-token decoding.
  EXPECT_LE(incremental_vs_full(*m, seqs, {S, S, S}, [](int64_t, int64_t) -> int64_t { return 1; }), 1e-5);
  EXPECT_LE(incremental_vs_full(*m, seqs, {1, 1, 1}, [](int64_t, int64_t) -> int64_t { return 1; }), 1e-5);
}

TEST(V4Decode, IncrementalLogitsMatchFullForwardWithQuantisedCaches) {
  // FP8 KV entries and FP4 indexer queries / keys, quantised per entry as in the forward.
  auto m = tiny_v4(23, true);
  const int64_t S = 30, V = m->config().vocab_size;
  std::vector<std::vector<int32_t>> seqs{random_ids(S, V, 74), random_ids(S, V, 75)};
  auto chunk = [](int64_t step, int64_t r) -> int64_t { return r == 0 || step % 2; };
  EXPECT_LE(incremental_vs_full(*m, seqs, {7, 2}, chunk), 1e-5);
}

TEST(V4Decode, GenerationMatchesFullForwardAndIsBatchIndependent) {
  auto m = tiny_v4(22);
  const int64_t V = m->config().vocab_size;
  std::vector<GenerationRequest> reqs(3);
  for (int i = 0; i < 3; ++i) {
    reqs[i].prompt = random_ids(3 + 7 * i, V, 80 + i);
    reqs[i].max_new_tokens = 18;
    reqs[i].temperature = i == 0 ? 0.0 : 0.9;
    reqs[i].top_p = 0.95;
    reqs[i].seed = 5 + i;
  }
  std::vector<GenerationResult> out = generate(*m, reqs);
  for (int i = 0; i < 3; ++i) check_against_forward(*m, reqs[i], out[i]);
  for (int i = 0; i < 3; ++i) {
    GenerationResult alone = generate(*m, {reqs[i]})[0];
    EXPECT_EQ(alone.tokens, out[i].tokens) << "request " << i;
  }
}
