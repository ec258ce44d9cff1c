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

// ------------------------------------------------------------------------------------------------ anticipatory routing
// The override API, the look-ahead cache the trainer drives (docs/model.md "Anticipatory routing"), the spike
// instrumentation and the loss-spike detector.
namespace {

// Copies every parameter and buffer value of `from` into `to` (same config and dtype).
void copy_state(V4Model& from, V4Model& to) {
  ParamList a = from.saved_tensors(), b = to.saved_tensors();
  ASSERT_EQ(a.size(), b.size());
  for (size_t i = 0; i < a.size(); ++i) b[i]->value.copy_from(a[i]->value);
}

bool same_bits(const Tensor& a, const Tensor& b) {
  return a.dtype() == b.dtype() && a.shape() == b.shape() && std::memcmp(a.raw(), b.raw(), a.nbytes()) == 0;
}

double grad_sum_squares(V4Model& m) {
  double s = 0;
  for (Param* p : m.params()) s += ops::sum_squares(p->grad);
  return s;
}

}  // namespace

// The trainer's sequence with dt = 1 (src/cli/pretrain.cpp): at step s the cached indices are applied; after the
// backward and before the update, the no-grad look-ahead on batch s + 1 fills the cache. The indices applied at
// step s must be those a separate model holding the step s-1 parameters and buffers selects on batch s, and (with
// a learning rate high enough to move the routing) differ from what the step-s parameters select.
TEST(AnticipatoryRouting, AppliedIndicesComeFromThePreviousStepsParameters) {
  ModelConfig cfg = tiny_v4_config();
  V4Model model(cfg, DType::f32);
  randomize_v4(model, 21);
  const int64_t steps = 4;
  std::vector<TokenBatch> batches;
  for (int64_t s = 0; s <= steps; ++s) batches.push_back(tiny_v4_batch(cfg.vocab_size, 40 + s));
  RoutingCache cache;
  std::unique_ptr<V4Model> prev;  // a copy of the parameters and buffers of the previous step, before its update
  int64_t differing = 0, checked = 0;
  for (int64_t s = 0; s < steps; ++s) {
    model.zero_grad();
    EXPECT_EQ(cache.apply(model, s, 0), s > 0) << "step " << s;  // no cache at the first dt steps
    EXPECT_EQ(model.has_routing_override(), s > 0);
    model.forward_backward(batches[s], 1.0 / double(batches[s].count_targets()));
    model.clear_routing_override();
    std::vector<Tensor> applied = model.routing_indices();
    ASSERT_EQ(int64_t(applied.size()), model.n_score_routed_layers());
    ASSERT_EQ(int64_t(applied.size()), cfg.n_layers - cfg.n_hash_layers + 1);  // the MTP block included
    if (s > 0) {
      prev->forward(batches[s]);
      std::vector<Tensor> want = prev->routing_indices();
      V4Model now(cfg, DType::f32);
      copy_state(model, now);
      now.forward(batches[s]);
      std::vector<Tensor> own = now.routing_indices();
      for (size_t l = 0; l < applied.size(); ++l) {
        EXPECT_TRUE(same_bits(applied[l], want[l])) << "step " << s << ", score-routed layer " << l;
        const int64_t N = own[l].size(0), k = own[l].size(1);
        for (int64_t i = 0; i < N; ++i) {
          differing += std::memcmp(applied[l].data<int32_t>() + i * k, own[l].data<int32_t>() + i * k,
                                   k * sizeof(int32_t)) != 0;
          ++checked;
        }
      }
    }
    // Look-ahead after the backward, before the update: it must leave gradients and expert loads alone.
    prev = std::make_unique<V4Model>(cfg, DType::f32);
    copy_state(model, *prev);
    const double g_before = grad_sum_squares(model);
    const auto load_before = model.expert_load();
    cache.precompute(model, s + 1, {batches[s + 1]});
    EXPECT_EQ(grad_sum_squares(model), g_before);
    EXPECT_EQ(model.expert_load(), load_before);
    EXPECT_FALSE(model.has_routing_override());
    // A plain SGD update with a high learning rate, then the balancing-bias rule.
    for (Param* p : model.params()) ops::axpy(-0.5, p->grad, p->value);
    model.update_routing_bias(0.05);
    cache.drop_through(s);
    EXPECT_FALSE(cache.has(s));
    EXPECT_TRUE(cache.has(s + 1));
  }
  EXPECT_GT(differing, 0) << "the routing never changed between steps; the test needs a larger update";
  EXPECT_LT(differing, checked);
  std::printf("tokens x layers whose routing differs from the current parameters' own: %lld of %lld\n",
              (long long)differing, (long long)checked);
}

// Under an override that differs from the model's own choice, the gate weights still come from the current scores
// at the supplied indices: every score-routed router gets a gradient, and the loads count the applied indices.
TEST(AnticipatoryRouting, RouterGetsGradientUnderOverride) {
  ModelConfig cfg = tiny_v4_config();
  V4Model model(cfg, DType::f32), other(cfg, DType::f32);
  randomize_v4(model, 22);
  randomize_v4(other, 23);
  TokenBatch batch = tiny_v4_batch(cfg.vocab_size, 9);
  other.forward(batch);
  std::vector<Tensor> idx = other.routing_indices();
  model.forward(batch);
  std::vector<Tensor> own = model.routing_indices();
  bool any_diff = false;
  for (size_t l = 0; l < idx.size(); ++l) any_diff |= !same_bits(idx[l], own[l]);
  ASSERT_TRUE(any_diff);
  model.reset_expert_load();
  model.set_routing_override(idx);
  model.zero_grad();
  double loss = model.forward_backward(batch, 1.0 / double(batch.count_targets()));
  EXPECT_TRUE(std::isfinite(loss));
  std::vector<Tensor> applied = model.routing_indices();
  for (size_t l = 0; l < idx.size(); ++l) EXPECT_TRUE(same_bits(applied[l], idx[l])) << l;
  int64_t routed = 0;
  for (Param* p : model.params()) {
    if (!p->name.ends_with("ffn.gate.weight")) continue;
    if (!p->name.starts_with("mtp.") && std::stoll(p->name.substr(7)) < cfg.n_hash_layers) continue;  // hash
    EXPECT_GT(ops::sum_squares(p->grad), 0.0) << p->name;
    ++routed;
  }
  EXPECT_EQ(routed, model.n_score_routed_layers());
  // Loads of the score-routed layers (main layers from n_hash_layers on, then the MTP block) = the override's counts.
  const auto& load = model.expert_load();
  for (size_t l = 0; l < idx.size(); ++l) {
    std::vector<int64_t> want(cfg.n_routed_experts, 0);
    for (int64_t i = 0; i < idx[l].numel(); ++i) ++want[idx[l].data<int32_t>()[i]];
    EXPECT_EQ(load[cfg.n_hash_layers + l], want) << "score-routed layer " << l;
  }
  // Malformed overrides are errors.
  EXPECT_THROW(model.set_routing_override({}), Error);
  model.clear_routing_override();
  EXPECT_FALSE(model.has_routing_override());
}

// Overriding with the model's own TopK(scores + bias) indices is the normal path, bitwise: loss, objective and
// every gradient.
TEST(AnticipatoryRouting, OwnIndicesAsOverrideAreBitwiseTheNormalPath) {
  ModelConfig cfg = tiny_v4_config();
  V4Model model(cfg, DType::f32);
  randomize_v4(model, 24);
  TokenBatch batch = tiny_v4_batch(cfg.vocab_size, 10);
  const double scale = 1.0 / double(batch.count_targets());
  model.zero_grad();
  const double l1 = model.forward_backward(batch, scale);
  const V4Model::Stats s1 = model.last_stats();
  std::vector<Tensor> g1;
  for (Param* p : model.params()) g1.push_back(p->grad.clone());
  std::vector<Tensor> idx = model.routing_indices();
  model.zero_grad();
  model.set_routing_override(idx);
  const double l2 = model.forward_backward(batch, scale);
  model.clear_routing_override();
  const V4Model::Stats& s2 = model.last_stats();
  EXPECT_EQ(std::memcmp(&l1, &l2, sizeof l1), 0);
  EXPECT_EQ(std::memcmp(&s1.objective, &s2.objective, sizeof(double)), 0);
  EXPECT_EQ(std::memcmp(&s1.balance_loss, &s2.balance_loss, sizeof(double)), 0);
  ParamList ps = model.params();
  for (size_t i = 0; i < ps.size(); ++i) EXPECT_TRUE(same_bits(ps[i]->grad, g1[i])) << ps[i]->name;
}

// The spike instrumentation: one entry per MoE layer (hash layers and the MTP block included); the SwiGLU inputs are
// measured before the clamp (the tiny config's limit 0.5 binds).
TEST(AnticipatoryRouting, SpikeStatsArePerMoELayerAndBeforeTheClamp) {
  ModelConfig cfg = tiny_v4_config();
  V4Model model(cfg, DType::f32);
  randomize_v4(model, 25);
  model.forward(tiny_v4_batch(cfg.vocab_size, 11));
  const V4Model::Stats& s = model.last_stats();
  ASSERT_EQ(int64_t(s.swiglu_input_max_abs.size()), cfg.n_layers + 1);
  ASSERT_EQ(int64_t(s.router_logit_max.size()), cfg.n_layers + 1);
  for (size_t l = 0; l < s.swiglu_input_max_abs.size(); ++l) {
    EXPECT_GT(s.swiglu_input_max_abs[l], cfg.swiglu_limit) << l;
    EXPECT_TRUE(std::isfinite(s.router_logit_max[l])) << l;
  }
  // Scaling a router scales its largest (positive) logit.
  Param* gate = nullptr;
  for (Param* p : model.params())
    if (p->name == "layers.1.ffn.gate.weight") gate = p;
  ASSERT_NE(gate, nullptr);
  const double before = s.router_logit_max[1];
  ASSERT_GT(before, 0.0);
  ops::scale(gate->value, 2.0);
  model.forward(tiny_v4_batch(cfg.vocab_size, 11));
  EXPECT_NEAR(model.last_stats().router_logit_max[1], 2.0 * before, 1e-5 * before);
}

TEST(LossSpikeDetector, HandMadeSequences) {
  LossSpikeDetector d;
  d.window = 5, d.k = 3.0, d.mad_floor = 0.01;
  // Until the window is full nothing is a spike, however large.
  for (double x : {3.0, 3.1, 2.9, 3.05}) {
    EXPECT_FALSE(d.check(100.0).spike);
    d.push(x);
  }
  EXPECT_FALSE(d.check(100.0).spike);
  d.push(2.95);  // window 3.0 3.1 2.9 3.05 2.95: median 3.0, |x - median| 0 .1 .1 .05 .05: MAD 0.05
  LossSpikeDetector::Check c = d.check(3.2);
  EXPECT_TRUE(c.spike);
  EXPECT_DOUBLE_EQ(c.median, 3.0);
  EXPECT_NEAR(c.mad, 0.05, 1e-12);
  EXPECT_NEAR(c.threshold, 3.15, 1e-12);
  EXPECT_FALSE(d.check(3.14).spike);
  EXPECT_FALSE(d.check(2.0).spike);  // a sudden drop is not a spike
  // The window slides: five pushes of 4.0 replace everything (median 4, MAD 0 -> the floor: threshold 4.03).
  for (int i = 0; i < 5; ++i) d.push(4.0);
  EXPECT_EQ(d.history.size(), 5u);
  c = d.check(4.02);
  EXPECT_FALSE(c.spike);
  EXPECT_DOUBLE_EQ(c.mad, 0.0);
  EXPECT_NEAR(c.threshold, 4.03, 1e-12);
  EXPECT_TRUE(d.check(4.04).spike);
  // A non-finite loss is always a spike and never enters the window.
  EXPECT_TRUE(d.check(NAN).spike);
  EXPECT_TRUE(d.check(INFINITY).spike);
  d.push(NAN);
  EXPECT_EQ(d.history.size(), 5u);
  d.clear();
  EXPECT_FALSE(d.check(100.0).spike);
  // A steadily falling loss with noise never triggers (the trend itself widens the MAD); a jump of 1 does.
  LossSpikeDetector f;
  f.window = 8, f.k = 6.0, f.mad_floor = 0.01;
  int spikes = 0;
  for (int i = 0; i < 60; ++i) {
    double loss = 5.0 - 0.03 * i + (i % 3 == 0 ? 0.02 : -0.01);
    if (i == 40) loss += 1.0;
    bool s = f.check(loss).spike;
    spikes += s;
    EXPECT_EQ(s, i == 40) << "step " << i << " loss " << loss;
    f.push(loss);
  }
  EXPECT_EQ(spikes, 1);
}
