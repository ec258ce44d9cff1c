// The whole tiny V4 model: gradients of the objective against central finite differences in fp64, causality and
// document isolation (bitwise), fp32 against fp64, and the balancing-bias rule. The PyTorch oracle
// (tests/reference/check_v4.py) checks the same model against an independent formulation.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>

#include "ops/ops.h"
#include "tests/unit/v4_test_model.h"

using namespace tessera;
using namespace tessera::testing;

namespace {

double objective(V4Model& m, const TokenBatch& b) {
  m.forward(b);
  return m.last_stats().objective;
}

double& at(Tensor& t, int64_t i) { return t.data<double>()[i]; }

}  // namespace

TEST(V4Model, GradientsMatchFiniteDifferences) {
  ModelConfig cfg = tiny_v4_config();
  // The indexer loss reads detached inputs, so its gradient is by design not the derivative of J; the PyTorch
  // oracle checks it. Everything else is the derivative of J.
  cfg.indexer_loss_weight = 0.0;
  V4Model model(cfg, DType::f64);
  randomize_v4(model, 11);
  TokenBatch batch = tiny_v4_batch(cfg.vocab_size, 5);
  model.zero_grad();
  model.forward_backward(batch, 1.0 / double(batch.count_targets()));
  const double eps = 1e-5;
  int checked = 0, failures = 0;
  for (Param* p : model.params()) {
    Rng rng{99, stream_id(p->name.c_str())};
    const int64_t n = p->value.numel();
    double worst = 0;
    for (int s = 0; s < 2; ++s) {
      int64_t i = int64_t(rng.below(s, n));
      double saved = at(p->value, i);
      at(p->value, i) = saved + eps;
      double up = objective(model, batch);
      at(p->value, i) = saved - eps;
      double down = objective(model, batch);
      at(p->value, i) = saved;
      double fd = (up - down) / (2 * eps), g = at(p->grad, i);
      double err = std::abs(fd - g) / std::max(1e-6, std::abs(fd) + std::abs(g));
      worst = std::max(worst, std::abs(fd - g) > 1e-8 ? err : 0.0);
      ++checked;
    }
    if (worst > 1e-4) {
      ++failures;
      ADD_FAILURE() << p->name << ": relative error " << worst;
    }
  }
  EXPECT_GT(checked, 100);
  EXPECT_EQ(failures, 0);
}

// Changing a token changes nothing before it, nor anything in another document: bitwise.
TEST(V4Model, FutureTokensAndOtherDocumentsLeaveOutputsBitwiseUnchanged) {
  ModelConfig cfg = tiny_v4_config();
  cfg.indexer_fp4 = true;  // the quantisation simulation must respect causality too
  cfg.kv_fp8 = true;
  // Every token uses every expert, so the expert GEMMs see the same row counts whatever the tokens route to:
  // BLAS may sum a row differently when a matrix's row count changes, which is not a causality leak.
  cfg.n_routed_experts = cfg.n_activated_experts = 2;
  V4Model model(cfg, DType::f32);
  randomize_v4(model, 12);
  TokenBatch batch = tiny_v4_batch(cfg.vocab_size, 6);
  const int64_t T = batch.seq_len(), V = cfg.vocab_size;
  Tensor base;
  model.forward(batch, &base);
  for (int64_t t0 : {5, 12, 20, 31}) {
    TokenBatch b = batch;
    b.ids = batch.ids.clone();
    b.ids.data<int32_t>()[t0] = (b.ids.data<int32_t>()[t0] + 7) % int32_t(V);  // row 0
    Tensor logits;
    model.forward(b, &logits);
    // Row 0: document 0 is tokens 0..12, document 1 is 13..31.
    for (int64_t t = 0; t < T; ++t) {
      bool may_change = t >= t0 && (t0 < 13 ? t < 13 : true);
      bool same = std::memcmp(logits.data<float>() + t * V, base.data<float>() + t * V, V * sizeof(float)) == 0;
      if (!may_change) {
        EXPECT_TRUE(same) << "token " << t0 << " changed the logits at " << t;
      }
      if (t == t0) {
        EXPECT_FALSE(same) << "token " << t0 << " did not change its own logits";
      }
    }
    // Row 1 is another sequence.
    EXPECT_EQ(std::memcmp(logits.data<float>() + T * V, base.data<float>() + T * V, T * V * sizeof(float)), 0);
  }
}

TEST(V4Model, Fp32MatchesFp64) {
  ModelConfig cfg = tiny_v4_config();
  V4Model m64(cfg, DType::f64), m32(cfg, DType::f32);
  randomize_v4(m64, 13);
  randomize_v4(m32, 13);
  TokenBatch batch = tiny_v4_batch(cfg.vocab_size, 7);
  const double scale = 1.0 / double(batch.count_targets());
  m64.zero_grad();
  m32.zero_grad();
  double l64 = m64.forward_backward(batch, scale), l32 = m32.forward_backward(batch, scale);
  EXPECT_NEAR(l32 / l64, 1.0, 1e-5);
  ParamList p64 = m64.params(), p32 = m32.params();
  for (size_t i = 0; i < p64.size(); ++i) {
    Tensor g32 = p32[i]->grad.to(DType::f64);
    double scale_max = 1e-30, diff = 0;
    for (int64_t j = 0; j < g32.numel(); ++j) {
      scale_max = std::max(scale_max, std::abs(at(p64[i]->grad, j)));
      diff = std::max(diff, std::abs(at(g32, j) - at(p64[i]->grad, j)));
    }
    if (scale_max > 1e-12) {
      EXPECT_LT(diff / scale_max, 1e-3) << p64[i]->name;
    }
  }
}

TEST(V4Model, BalancingBiasMovesTowardsUnderloadedExperts) {
  ModelConfig cfg = tiny_v4_config();
  V4Model model(cfg, DType::f32);
  model.init(1);
  TokenBatch batch = tiny_v4_batch(cfg.vocab_size, 8);
  model.forward(batch);
  auto load = model.expert_load();  // copy
  std::vector<Tensor> before;
  for (Param* p : model.buffers())
    if (p->name.ends_with("gate.bias")) before.push_back(p->value.clone());
  model.update_routing_bias(0.001);
  size_t layer = 0, k = 0;
  const int64_t total_per_layer = batch.batch_size() * batch.seq_len() * cfg.n_activated_experts;
  for (Param* p : model.buffers()) {
    if (!p->name.ends_with("gate.bias")) continue;
    // Hash layers keep their (unused) bias; the MTP block's loads are the last entry.
    size_t l = p->name.starts_with("mtp.") ? load.size() - 1 : layer++;
    int64_t sum = 0;
    for (int64_t v : load[l]) sum += v;
    EXPECT_EQ(sum, total_per_layer) << p->name;
    bool hash = !p->name.starts_with("mtp.") && int64_t(l) < cfg.n_hash_layers;
    double mean = double(sum) / cfg.n_routed_experts;
    for (int64_t e = 0; e < cfg.n_routed_experts; ++e) {
      double want = hash ? 0.0 : load[l][e] < mean ? 0.001 : load[l][e] > mean ? -0.001 : 0.0;
      EXPECT_FLOAT_EQ(p->value.data<float>()[e] - before[k].data<float>()[e], float(want)) << p->name << " " << e;
    }
    ++k;
  }
  for (const auto& l : model.expert_load())
    for (int64_t v : l) EXPECT_EQ(v, 0);  // reset after the update
}
