// On-policy distillation losses (rl/distill.h): the full-vocabulary reverse KL, forward KL and generalised
// JSD against hand-worked values (written out in the comments), their gradients against central finite
// differences in f64, weights and masking, invariance under splitting the batch with a global normaliser, the
// JSD's limits, why the full vocabulary matters (top-k truncation changes the gradient), and the
// sampled-token form.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <limits>
#include <numeric>
#include <random>

#include "core/error.h"
#include "rl/distill.h"
#include "rl/grpo.h"
#include "test_util.h"

using namespace tessera;
using namespace tessera::rl;
using tessera::testing::error_of;
using tessera::testing::tensor_of;
using tessera::testing::values_of;

namespace {

const double kInf = std::numeric_limits<double>::infinity();
const double kNaN = std::numeric_limits<double>::quiet_NaN();


bool has(const std::string& s, const std::string& part) {
  return s.find(part) != std::string::npos;
}

DistillConfig mode(DistillDivergence d, double beta = 0.5, double temperature = 1.0) {
  DistillConfig c;
  c.divergence = d;
  c.beta = beta;
  c.temperature = temperature;
  return c;
}
const DistillConfig kReverse = mode(DistillDivergence::reverse_kl);
const DistillConfig kForward = mode(DistillDivergence::forward_kl);

struct Out {
  double loss = 0;
  std::vector<double> grad;
  DistillMetrics metrics;
};

// distill_loss on (N, V) logits given as flat vectors.
Out run(const std::vector<double>& s, const std::vector<double>& t, const std::vector<double>& w, int64_t V,
        double normalizer, const DistillConfig& cfg, DType dt = DType::f64) {
  const int64_t N = int64_t(w.size());
  Tensor S = tensor_of(s, {N, V}, dt), T = tensor_of(t, {N, V}, dt), W = tensor_of(w, {N}, dt);
  Tensor G = Tensor::empty({N, V}, dt, Device::cpu);
  auto r = distill_loss(S, T, W, normalizer, cfg, G);
  return {r.loss, values_of(G), r.metrics};
}

std::vector<double> random_vec(size_t n, std::mt19937_64& rng, double scale) {
  std::normal_distribution<double> d(0.0, scale);
  std::vector<double> v(n);
  for (auto& x : v) x = d(rng);
  return v;
}

// ------------------------------------------------------------------------------------- hand-worked, V = 2

// Student logits (0, 0): p_s = (1/2, 1/2). Teacher logits (log 3, 0): p_t = (3/4, 1/4).
const std::vector<double> kS2 = {0.0, 0.0};
const std::vector<double> kT2 = {std::log(3.0), 0.0};

TEST(DistillLoss, ReverseKlHandWorkedV2) {
  // KL(p_s || p_t) = 1/2 log((1/2)/(3/4)) + 1/2 log((1/2)/(1/4)) = 1/2 log(2/3) + 1/2 log 2 = 1/2 log(4/3)
  //               = 0.1438410362...
  // r = log p_s - log p_t = (log(2/3), log 2); gradient p_s (r - KL):
  //   token 0: 1/2 (log(2/3) - 1/2 log(4/3)) = 1/4 (log(4/9) - log(4/3)) = 1/4 log(1/3) = -0.2746530722...
  //   token 1: 1/2 (log 2 - 1/2 log(4/3))    = 1/4 (log 4 - log(4/3))   = 1/4 log 3   = +0.2746530722...
  Out o = run(kS2, kT2, {1.0}, 2, 1.0, kReverse);
  EXPECT_NEAR(o.loss, 0.5 * std::log(4.0 / 3.0), 1e-15);
  EXPECT_NEAR(o.loss, 0.1438410362258904, 1e-15);
  EXPECT_NEAR(o.grad[0], -0.25 * std::log(3.0), 1e-15);
  EXPECT_NEAR(o.grad[1], 0.25 * std::log(3.0), 1e-15);
  EXPECT_EQ(o.metrics.tokens, 1);
  EXPECT_NEAR(o.metrics.divergence_sum, 0.5 * std::log(4.0 / 3.0), 1e-15);
  EXPECT_NEAR(o.metrics.divergence_max, 0.5 * std::log(4.0 / 3.0), 1e-15);
}

TEST(DistillLoss, ForwardKlHandWorkedV2) {
  // KL(p_t || p_s) = 3/4 log((3/4)/(1/2)) + 1/4 log((1/4)/(1/2)) = 3/4 log(3/2) - 1/4 log 2 = 0.1308120...
  // gradient p_s - p_t = (1/2 - 3/4, 1/2 - 1/4) = (-1/4, +1/4).
  Out o = run(kS2, kT2, {1.0}, 2, 1.0, kForward);
  EXPECT_NEAR(o.loss, 0.75 * std::log(1.5) - 0.25 * std::log(2.0), 1e-15);
  EXPECT_NEAR(o.loss, 0.130812035941137, 1e-14);
  EXPECT_NEAR(o.grad[0], -0.25, 1e-15);
  EXPECT_NEAR(o.grad[1], 0.25, 1e-15);
}

TEST(DistillLoss, JsdHandWorkedV2) {
  // beta = 1/2: M = 1/2 p_s + 1/2 p_t = (5/8, 3/8).
  //   KL(p_t || M) = 3/4 log((3/4)/(5/8)) + 1/4 log((1/4)/(3/8)) = 3/4 log(6/5) + 1/4 log(2/3)
  //   KL(p_s || M) = 1/2 log((1/2)/(5/8)) + 1/2 log((1/2)/(3/8)) = 1/2 log(4/5) + 1/2 log(4/3)
  //   J = 1/2 KL(p_t || M) + 1/2 KL(p_s || M) = 0.0338220...
  // g = (1 - beta)(log p_s - log M) = 1/2 (log(4/5), log(4/3)); sum p_s g = 1/4 log(16/15)
  //   token 0: 1/2 (1/2 log(4/5) - 1/4 log(16/15)) = 1/8 (log(16/25) - log(16/15)) = 1/8 log(3/5)
  //   token 1: 1/8 log(5/3) (a softmax gradient sums to 0)
  const double kt = 0.75 * std::log(6.0 / 5.0) + 0.25 * std::log(2.0 / 3.0);
  const double ks = 0.5 * std::log(4.0 / 5.0) + 0.5 * std::log(4.0 / 3.0);
  Out o = run(kS2, kT2, {1.0}, 2, 1.0, mode(DistillDivergence::jsd, 0.5));
  EXPECT_NEAR(o.loss, 0.5 * kt + 0.5 * ks, 1e-15);
  EXPECT_NEAR(o.loss, 0.0338221, 1e-7);
  EXPECT_NEAR(o.grad[0], 0.125 * std::log(0.6), 1e-15);
  EXPECT_NEAR(o.grad[1], 0.125 * std::log(5.0 / 3.0), 1e-15);
  // An asymmetric beta: 1/4. M = 3/4 (1/2, 1/2) + 1/4 (3/4, 1/4) = (9/16, 7/16).
  //   J = 1/4 [3/4 log((3/4)/(9/16)) + 1/4 log((1/4)/(7/16))] + 3/4 [1/2 log(8/9) + 1/2 log(8/7)]
  //     = 1/4 [3/4 log(4/3) + 1/4 log(4/7)] + 3/8 log(64/63)
  const double j =
      0.25 * (0.75 * std::log(4.0 / 3.0) + 0.25 * std::log(4.0 / 7.0)) + 0.375 * std::log(64.0 / 63.0);
  EXPECT_NEAR(run(kS2, kT2, {1.0}, 2, 1.0, mode(DistillDivergence::jsd, 0.25)).loss, j, 1e-15);
}

TEST(DistillLoss, HandWorkedV3) {
  // Student uniform (0, 0, 0): p_s = 1/3 each. Teacher (log 2, 0, 0): p_t = (1/2, 1/4, 1/4).
  //   reverse: 1/3 log((1/3)/(1/2)) + 2/3 log((1/3)/(1/4)) = 1/3 log(2/3) + 2/3 log(4/3) = 1/3 log(32/27)
  //   forward: 1/2 log((1/2)/(1/3)) + 2 * 1/4 log((1/4)/(1/3)) = 1/2 log(3/2) + 1/2 log(3/4) = 1/2 log(9/8)
  //   forward gradient p_s - p_t = (1/3 - 1/2, 1/3 - 1/4, 1/3 - 1/4) = (-1/6, 1/12, 1/12)
  const std::vector<double> s = {0, 0, 0}, t = {std::log(2.0), 0, 0};
  EXPECT_NEAR(run(s, t, {1.0}, 3, 1.0, kReverse).loss, std::log(32.0 / 27.0) / 3.0, 1e-15);
  Out f = run(s, t, {1.0}, 3, 1.0, kForward);
  EXPECT_NEAR(f.loss, 0.5 * std::log(9.0 / 8.0), 1e-15);
  EXPECT_NEAR(f.grad[0], -1.0 / 6.0, 1e-15);
  EXPECT_NEAR(f.grad[1], 1.0 / 12.0, 1e-15);
  EXPECT_NEAR(f.grad[2], 1.0 / 12.0, 1e-15);
  // Reverse gradient p_s (r - KL), r = (log(2/3), log(4/3), log(4/3)), KL = 1/3 log(32/27):
  //   token 0: 1/3 (log(2/3) - 1/3 log(32/27)) = 1/9 (log(8/27) - log(32/27)) = 1/9 log(1/4) = -2/9 log 2
  //   tokens 1, 2: 1/3 (log(4/3) - 1/3 log(32/27)) = 1/9 (log(64/27) - log(32/27)) = 1/9 log 2
  Out r = run(s, t, {1.0}, 3, 1.0, kReverse);
  EXPECT_NEAR(r.grad[0], -2.0 / 9.0 * std::log(2.0), 1e-15);
  EXPECT_NEAR(r.grad[1], std::log(2.0) / 9.0, 1e-15);
  EXPECT_NEAR(r.grad[2], std::log(2.0) / 9.0, 1e-15);
}

TEST(DistillLoss, TemperatureDividesBothLogitsAndTheGradient) {
  // At temperature 2, student (0, 0) and teacher (2 log 3, 0) are the V = 2 example's distributions again:
  // the same loss, and the gradient w.r.t. the raw logits is the example's times 1/2.
  const std::vector<double> t = {2.0 * std::log(3.0), 0.0};
  Out o = run(kS2, t, {1.0}, 2, 1.0, mode(DistillDivergence::reverse_kl, 0.5, 2.0));
  EXPECT_NEAR(o.loss, 0.5 * std::log(4.0 / 3.0), 1e-15);
  EXPECT_NEAR(o.grad[0], -0.125 * std::log(3.0), 1e-15);
  EXPECT_NEAR(o.grad[1], 0.125 * std::log(3.0), 1e-15);
  Out f = run(kS2, t, {1.0}, 2, 1.0, mode(DistillDivergence::forward_kl, 0.5, 2.0));
  EXPECT_NEAR(f.grad[0], -0.125, 1e-15);
}

TEST(DistillLoss, WeightsAndNormaliser) {
  // Rows: the V = 2 example with weight 2 (teacher A's domain), the same example with weight 0.5 (teacher B),
  // and a masked row (weight 0). Normaliser 3 (say, the global count of weighted rows).
  //   loss = (2 + 0.5) * 1/2 log(4/3) / 3; row gradients scale by w / 3; the masked row's is 0.
  std::vector<double> s, t;
  for (int r = 0; r < 3; ++r) {
    s.insert(s.end(), kS2.begin(), kS2.end());
    t.insert(t.end(), kT2.begin(), kT2.end());
  }
  Out o = run(s, t, {2.0, 0.5, 0.0}, 2, 3.0, kReverse);
  const double kl = 0.5 * std::log(4.0 / 3.0), g = 0.25 * std::log(3.0);
  EXPECT_NEAR(o.loss, 2.5 * kl / 3.0, 1e-15);
  EXPECT_NEAR(o.grad[0], -2.0 * g / 3.0, 1e-15);
  EXPECT_NEAR(o.grad[3], 0.5 * g / 3.0, 1e-15);
  EXPECT_EQ(o.grad[4], 0.0);
  EXPECT_EQ(o.grad[5], 0.0);
  // Metrics are per token, unweighted, over the weighted rows only.
  EXPECT_EQ(o.metrics.tokens, 2);
  EXPECT_NEAR(o.metrics.divergence_mean(), kl, 1e-15);
}

// ------------------------------------------------------------------------------------- identities

TEST(DistillLoss, IdenticalDistributionsGiveZero) {
  std::mt19937_64 rng(7);
  const int64_t N = 4, V = 9;
  auto s = random_vec(size_t(N * V), rng, 3.0);
  auto shifted = s;  // a per-row constant shift is the same distribution
  for (int64_t i = 0; i < N; ++i)
    for (int64_t j = 0; j < V; ++j) shifted[size_t(i * V + j)] += 1.5 * double(i) - 2.0;
  for (auto cfg :
       {kReverse, kForward, mode(DistillDivergence::jsd, 0.3), mode(DistillDivergence::jsd, 0.5, 0.7)}) {
    Out same = run(s, s, std::vector<double>(N, 1.0), V, double(N), cfg);
    EXPECT_NEAR(same.loss, 0.0, 1e-15) << distill_divergence_name(cfg.divergence);
    for (double g : same.grad) EXPECT_NEAR(g, 0.0, 1e-15);
    if (cfg.divergence != DistillDivergence::jsd) {  // exactly 0: log p_s - log p_t is exactly 0
      EXPECT_EQ(same.loss, 0.0);
      for (double g : same.grad) EXPECT_EQ(g, 0.0);
    }
    Out sh = run(s, shifted, std::vector<double>(N, 1.0), V, double(N), cfg);
    EXPECT_NEAR(sh.loss, 0.0, 1e-13);
    for (double g : sh.grad) EXPECT_NEAR(g, 0.0, 1e-13);
  }
}

TEST(DistillLoss, DivergencesArePositiveOtherwise) {
  std::mt19937_64 rng(8);
  const int64_t N = 6, V = 7;
  auto s = random_vec(size_t(N * V), rng, 2.0), t = random_vec(size_t(N * V), rng, 2.0);
  for (auto cfg : {kReverse, kForward, mode(DistillDivergence::jsd, 0.5)}) {
    Out o = run(s, t, std::vector<double>(N, 1.0), V, double(N), cfg);
    EXPECT_GT(o.metrics.divergence_max, 0.0);
    EXPECT_GT(o.loss, 0.0);
    // Each row's gradient sums to 0 (a softmax Jacobian annihilates constants).
    for (int64_t i = 0; i < N; ++i) {
      double sum = 0;
      for (int64_t j = 0; j < V; ++j) sum += o.grad[size_t(i * V + j)];
      EXPECT_NEAR(sum, 0.0, 1e-15);
    }
  }
}

// ------------------------------------------------------------------------------------- finite differences

TEST(DistillLoss, GradientMatchesFiniteDifferences) {
  const int64_t N = 5, V = 7;
  std::mt19937_64 rng(42);
  const std::vector<double> w = {1.0, 0.0, 2.5, 0.3, 1.0};  // per-teacher weights, one masked row
  const double normalizer = 4.0;                            // rows with a non-zero weight
  std::vector<DistillConfig> cfgs;
  for (double temp : {0.5, 1.0, 2.3}) {
    cfgs.push_back(mode(DistillDivergence::reverse_kl, 0.5, temp));
    cfgs.push_back(mode(DistillDivergence::forward_kl, 0.5, temp));
    for (double beta : {0.0, 0.1, 0.5, 0.9, 1.0}) cfgs.push_back(mode(DistillDivergence::jsd, beta, temp));
  }
  for (const auto& cfg : cfgs) {
    auto s = random_vec(size_t(N * V), rng, 2.0), t = random_vec(size_t(N * V), rng, 2.0);
    Out o = run(s, t, w, V, normalizer, cfg);
    const double h = 1e-5;
    double worst = 0;
    for (size_t k = 0; k < s.size(); ++k) {
      auto sp = s, sm = s;
      sp[k] += h;
      sm[k] -= h;
      const double fd =
          (run(sp, t, w, V, normalizer, cfg).loss - run(sm, t, w, V, normalizer, cfg).loss) / (2 * h);
      worst = std::max(worst, std::abs(fd - o.grad[k]));
      EXPECT_NEAR(o.grad[k], fd, 1e-8) << distill_divergence_name(cfg.divergence) << " beta " << cfg.beta
                                       << " T " << cfg.temperature << " at " << k;
    }
    // The gradient is not trivially small (the test would pass vacuously otherwise).
    double gmax = 0;
    for (double g : o.grad) gmax = std::max(gmax, std::abs(g));
    EXPECT_GT(gmax, 1e-3);
  }
}

TEST(DistillLoss, F32InputsAreComputedInF64) {
  // The V = 2 example with f32 logits: log 3 is rounded to f32 on input, everything else is f64, so the loss
  // is within f32 input rounding of the closed form and the gradient comes back as f32.
  Out o = run(kS2, kT2, {1.0}, 2, 1.0, kReverse, DType::f32);
  EXPECT_NEAR(o.loss, 0.5 * std::log(4.0 / 3.0), 1e-7);
  EXPECT_NEAR(o.grad[0], -0.25 * std::log(3.0), 1e-7);
  // A teacher in a different dtype than the student is fine (the gradient has the student's).
  Tensor S = tensor_of(kS2, {1, 2}, DType::f32), T = tensor_of(kT2, {1, 2}, DType::f64), W = tensor_of({1.0}, {1});
  Tensor G = Tensor::empty({1, 2}, DType::f32, Device::cpu);
  EXPECT_NEAR(distill_loss(S, T, W, 1.0, kReverse, G).loss, 0.5 * std::log(4.0 / 3.0), 1e-15);
}

// ------------------------------------------------------------------------------------- masking, splitting

TEST(DistillLoss, MaskedRowsAreSkippedEvenWithNaN) {
  std::mt19937_64 rng(3);
  const int64_t V = 5;
  auto s = random_vec(size_t(3 * V), rng, 1.0), t = random_vec(size_t(3 * V), rng, 1.0);
  for (auto cfg : {kReverse, kForward, mode(DistillDivergence::jsd, 0.4)}) {
    Out two = run(std::vector<double>(s.begin(), s.begin() + 2 * V),
                  std::vector<double>(t.begin(), t.begin() + 2 * V), {1.0, 1.0}, V, 2.0, cfg);
    auto s3 = s, t3 = t;
    for (int64_t j = 0; j < V; ++j) {
      s3[size_t(2 * V + j)] = j % 2 ? kNaN : kInf;
      t3[size_t(2 * V + j)] = j % 2 ? -kInf : kNaN;
    }
    Out three = run(s3, t3, {1.0, 1.0, 0.0}, V, 2.0, cfg);
    EXPECT_EQ(three.loss, two.loss);
    for (int64_t k = 0; k < 2 * V; ++k) EXPECT_EQ(three.grad[size_t(k)], two.grad[size_t(k)]);
    for (int64_t j = 0; j < V; ++j) EXPECT_EQ(three.grad[size_t(2 * V + j)], 0.0);
    EXPECT_EQ(three.metrics.tokens, 2);
    // Everything masked: no loss, zero gradient, and a zero normaliser is then allowed.
    Out none = run(s3, t3, {0.0, 0.0, 0.0}, V, 0.0, cfg);
    EXPECT_EQ(none.loss, 0.0);
    for (double g : none.grad) EXPECT_EQ(g, 0.0);
    EXPECT_EQ(none.metrics.tokens, 0);
    EXPECT_EQ(none.metrics.divergence_mean(), 0.0);
  }
  // A NaN in a weighted row is an error naming it.
  auto bad = s;
  bad[size_t(V + 2)] = kNaN;
  EXPECT_TRUE(has(error_of([&] { run(bad, t, {1.0, 1.0, 1.0}, V, 3.0, kReverse); }), "row 1, token 2"));
}

TEST(DistillLoss, SplittingTheBatchWithAGlobalNormaliserAddsUp) {
  std::mt19937_64 rng(11);
  const int64_t N = 7, V = 6, cut = 3;
  auto s = random_vec(size_t(N * V), rng, 2.0), t = random_vec(size_t(N * V), rng, 2.0);
  const std::vector<double> w = {1, 1, 0, 1, 0.5, 1, 0};
  const double normalizer = double(count_distill_tokens(tensor_of(w, {N})));
  EXPECT_EQ(normalizer, 5.0);
  for (auto cfg : {kReverse, kForward, mode(DistillDivergence::jsd, 0.5, 1.3)}) {
    Out whole = run(s, t, w, V, normalizer, cfg);
    Out a = run(std::vector<double>(s.begin(), s.begin() + cut * V),
                std::vector<double>(t.begin(), t.begin() + cut * V),
                std::vector<double>(w.begin(), w.begin() + cut), V, normalizer, cfg);
    Out b = run(std::vector<double>(s.begin() + cut * V, s.end()),
                std::vector<double>(t.begin() + cut * V, t.end()),
                std::vector<double>(w.begin() + cut, w.end()), V, normalizer, cfg);
    EXPECT_NEAR(a.loss + b.loss, whole.loss, 1e-15);
    for (int64_t k = 0; k < N * V; ++k)
      EXPECT_EQ(k < cut * V ? a.grad[size_t(k)] : b.grad[size_t(k - cut * V)], whole.grad[size_t(k)]);
    DistillMetrics m = a.metrics;
    m += b.metrics;
    EXPECT_EQ(m.tokens, whole.metrics.tokens);
    EXPECT_NEAR(m.divergence_sum, whole.metrics.divergence_sum, 1e-14);
    EXPECT_EQ(m.divergence_max, whole.metrics.divergence_max);
  }
  // Metrics: adding an empty part changes nothing, also when every divergence is negative-free but small.
  DistillMetrics m, empty;
  m.tokens = 2;
  m.divergence_sum = 0.3;
  m.divergence_max = 0.2;
  m += empty;
  EXPECT_EQ(m.divergence_max, 0.2);
  empty += m;
  EXPECT_EQ(empty.divergence_max, 0.2);
  EXPECT_EQ(empty.tokens, 2);
}

// ------------------------------------------------------------------------------------- numerics

TEST(DistillLoss, UnderflowingProbabilitiesGiveNoNaN) {
  // Student (0, -1000): p_s = (1, e^-1000) = (1, 0) in double; teacher (0, 0): p_t = (1/2, 1/2).
  //   reverse: 1 log(1 / (1/2)) + 0 = log 2; gradient p_s (r - KL) = (1 (log 2 - log 2), 0) = (0, 0)
  //   forward: 1/2 log((1/2)/1) + 1/2 log((1/2)/e^-1000) = 1/2 (-log 2) + 1/2 (1000 - log 2) = 500 - log 2;
  //            gradient p_s - p_t = (1/2, -1/2)
  //   jsd 1/2: M = (3/4, 1/4); KL(p_t || M) = 1/2 log(2/3) + 1/2 log 2 = 1/2 log(4/3); KL(p_s || M) =
  //   log(4/3);
  //            J = 1/4 log(4/3) + 1/2 log(4/3) = 3/4 log(4/3); gradient (0, 0) (p_s is one-hot in double)
  const std::vector<double> s = {0.0, -1000.0}, t = {0.0, 0.0};
  Out r = run(s, t, {1.0}, 2, 1.0, kReverse);
  EXPECT_NEAR(r.loss, std::log(2.0), 1e-15);
  EXPECT_EQ(r.grad[0], 0.0);
  EXPECT_EQ(r.grad[1], 0.0);
  Out f = run(s, t, {1.0}, 2, 1.0, kForward);
  EXPECT_NEAR(f.loss, 500.0 - std::log(2.0), 1e-12);
  EXPECT_EQ(f.grad[0], 0.5);
  EXPECT_EQ(f.grad[1], -0.5);
  Out j = run(s, t, {1.0}, 2, 1.0, mode(DistillDivergence::jsd, 0.5));
  EXPECT_NEAR(j.loss, 0.75 * std::log(4.0 / 3.0), 1e-15);
  EXPECT_NEAR(j.grad[0], 0.0, 1e-16);
  EXPECT_EQ(j.grad[1], 0.0);
  // Huge logits (max subtraction): 1e4 + the V = 2 example is the V = 2 example.
  Out big = run({1e4, 1e4}, {1e4 + std::log(3.0), 1e4}, {1.0}, 2, 1.0, kReverse);
  EXPECT_NEAR(big.loss, 0.5 * std::log(4.0 / 3.0), 1e-12);
}

TEST(DistillLoss, MinusInfinityLogitsAreImpossibleTokens) {
  // A padded vocabulary: token 2 is -inf in both. Student (0, 0, -inf), teacher (log 3, 0, -inf) is the V = 2
  // example with a third token that contributes nothing (and gets gradient 0).
  const std::vector<double> s = {0.0, 0.0, -kInf}, t = {std::log(3.0), 0.0, -kInf};
  for (auto cfg : {kReverse, kForward, mode(DistillDivergence::jsd, 0.5)}) {
    Out o3 = run(s, t, {1.0}, 3, 1.0, cfg);
    Out o2 = run(kS2, kT2, {1.0}, 2, 1.0, cfg);
    EXPECT_NEAR(o3.loss, o2.loss, 1e-15);
    EXPECT_NEAR(o3.grad[0], o2.grad[0], 1e-15);
    EXPECT_NEAR(o3.grad[1], o2.grad[1], 1e-15);
    EXPECT_EQ(o3.grad[2], 0.0);
  }
  // Infinite divergences are errors naming the row and token; the JSD stays finite.
  const std::vector<double> s2 = {0.0, 0.0}, t_inf = {0.0, -kInf};
  EXPECT_TRUE(has(error_of([&] { run(s2, t_inf, {1.0}, 2, 1.0, kReverse); }),
                  "reverse KL is infinite at row 0, token 1"));
  EXPECT_TRUE(has(error_of([&] { run(t_inf, s2, {1.0}, 2, 1.0, kForward); }),
                  "forward KL is infinite at row 0, token 1"));
  // J with p_s = (1/2, 1/2), p_t = (1, 0), beta 1/2: M = (3/4, 1/4);
  //   KL(p_t || M) = log(4/3); KL(p_s || M) = 1/2 log(2/3) + 1/2 log 2 = 1/2 log(4/3); J = 3/4 log(4/3).
  EXPECT_NEAR(run(s2, t_inf, {1.0}, 2, 1.0, mode(DistillDivergence::jsd, 0.5)).loss,
              0.75 * std::log(4.0 / 3.0), 1e-15);
  EXPECT_TRUE(has(error_of([&] { run({-kInf, -kInf}, s2, {1.0}, 2, 1.0, kReverse); }), "all -inf"));
  EXPECT_TRUE(has(error_of([&] {
                    run({kInf, 0.0}, s2, {1.0}, 2, 1.0, kReverse);
                  }),
                  "student logit at row 0"));
}

// ------------------------------------------------------------------------------------- the JSD's limits

TEST(DistillLoss, JsdSpecialCasesAndLimits) {
  std::mt19937_64 rng(5);
  const int64_t N = 3, V = 7;
  auto s = random_vec(size_t(N * V), rng, 1.5), t = random_vec(size_t(N * V), rng, 1.5);
  const std::vector<double> w(N, 1.0);
  Out fwd = run(s, t, w, V, 3.0, kForward), rev = run(s, t, w, V, 3.0, kReverse);
  // TRL's special cases: beta = 0 is forward KL and beta = 1 reverse KL, exactly.
  Out j0 = run(s, t, w, V, 3.0, mode(DistillDivergence::jsd, 0.0));
  Out j1 = run(s, t, w, V, 3.0, mode(DistillDivergence::jsd, 1.0));
  EXPECT_EQ(j0.loss, fwd.loss);
  EXPECT_EQ(j1.loss, rev.loss);
  EXPECT_EQ(j0.grad, fwd.grad);
  EXPECT_EQ(j1.grad, rev.grad);
  // Near the ends the generalised JSD approaches them up to the factor beta (resp. 1 - beta):
  //   J = beta KL(p_t || p_s) + O(beta^2) and J = (1 - beta) KL(p_s || p_t) + O((1 - beta)^2),
  // so J / beta -> forward KL and J / (1 - beta) -> reverse KL, loss and gradient alike, while J itself -> 0
  // (TRL's special cases are therefore a jump in scale at the ends, not a continuous extension).
  const double e = 1e-6;
  Out jl = run(s, t, w, V, 3.0, mode(DistillDivergence::jsd, e));
  Out jh = run(s, t, w, V, 3.0, mode(DistillDivergence::jsd, 1.0 - e));
  EXPECT_NEAR(jl.loss / e, fwd.loss, 1e-4 * fwd.loss);
  EXPECT_NEAR(jh.loss / e, rev.loss, 1e-4 * rev.loss);
  EXPECT_LT(jl.loss, 1e-5 * fwd.loss);
  for (size_t k = 0; k < s.size(); ++k) {
    EXPECT_NEAR(jl.grad[k] / e, fwd.grad[k], 1e-4);
    EXPECT_NEAR(jh.grad[k] / e, rev.grad[k], 1e-4);
  }
}

// ------------------------------------------------------------------------------------- full vocabulary

// Top-k truncated reverse KL (what the full-vocabulary loss is NOT): both distributions renormalised over the
// student's k most probable tokens of each row, weight 1, normaliser 1.
double topk_reverse_kl(const std::vector<double>& s, const std::vector<double>& t, int64_t V, int64_t k,
                       const std::vector<std::vector<int64_t>>& sets) {
  double loss = 0;
  const int64_t N = int64_t(s.size()) / V;
  for (int64_t i = 0; i < N; ++i) {
    const auto& set = sets[size_t(i)];
    double zs = 0, zt = 0;
    for (int64_t j : set) {
      zs += std::exp(s[size_t(i * V + j)]);
      zt += std::exp(t[size_t(i * V + j)]);
    }
    for (int64_t j : set) {
      const double ls = s[size_t(i * V + j)] - std::log(zs), lt = t[size_t(i * V + j)] - std::log(zt);
      loss += std::exp(ls) * (ls - lt);
    }
  }
  (void)k;
  return loss;
}

std::vector<std::vector<int64_t>> student_topk(const std::vector<double>& s, int64_t V, int64_t k) {
  std::vector<std::vector<int64_t>> sets;
  for (int64_t i = 0; i < int64_t(s.size()) / V; ++i) {
    std::vector<int64_t> idx(static_cast<size_t>(V));
    std::iota(idx.begin(), idx.end(), 0);
    std::sort(idx.begin(), idx.end(),
              [&](int64_t a, int64_t b) { return s[size_t(i * V + a)] > s[size_t(i * V + b)]; });
    idx.resize(size_t(k));
    sets.push_back(idx);
  }
  return sets;
}

TEST(DistillLoss, FullVocabularyIsNotTopKTruncated) {
  // Hand example, V = 3, k = 2: student p_s = (0.5, 0.3, 0.2), teacher p_t = (0.6, 0.36, 0.04): the same 5:3
  // ratio on the student's top-2 tokens, but the teacher puts far less mass on token 2.
  //   top-2 truncated: both renormalise to (5/8, 3/8): KL = 0 and gradient 0 -- the student is never told
  //   to move its 20% tail mass (verl PR 5041's failure: the tail is invisible to the truncated loss).
  //   full: 0.5 log(5/6) + 0.3 log(5/6) + 0.2 log 5 = 0.8 log(5/6) + 0.2 log 5 = 0.1760303...; the tail
  //   token's gradient p_s,2 (r_2 - KL) = 0.2 (log 5 - KL) > 0, so a descent step lowers its logit.
  const std::vector<double> s = {std::log(0.5), std::log(0.3), std::log(0.2)};
  const std::vector<double> t = {std::log(0.6), std::log(0.36), std::log(0.04)};
  const auto sets = student_topk(s, 3, 2);
  EXPECT_NEAR(topk_reverse_kl(s, t, 3, 2, sets), 0.0, 1e-15);
  Out full = run(s, t, {1.0}, 3, 1.0, kReverse);
  const double kl = 0.8 * std::log(5.0 / 6.0) + 0.2 * std::log(5.0);
  EXPECT_NEAR(full.loss, kl, 1e-15);
  EXPECT_NEAR(full.grad[2], 0.2 * (std::log(5.0) - kl), 1e-15);
  EXPECT_GT(full.grad[2], 0.1);
  // Random logits, V = 7, k = 3: the truncated loss's gradient (central differences; the top-k set does not
  // change under the small steps) differs from the full-vocabulary gradient, and is exactly 0 outside the set
  // where the full one is not.
  std::mt19937_64 rng(99);
  const int64_t N = 4, V = 7, k = 3;
  auto rs = random_vec(size_t(N * V), rng, 1.5), rt = random_vec(size_t(N * V), rng, 1.5);
  const auto rsets = student_topk(rs, V, k);
  Out rf = run(rs, rt, std::vector<double>(N, 1.0), V, 1.0, kReverse);
  double diff = 0, outside_full = 0, outside_trunc = 0;
  for (size_t q = 0; q < rs.size(); ++q) {
    auto sp = rs, sm = rs;
    sp[q] += 1e-6;
    sm[q] -= 1e-6;
    const double g = (topk_reverse_kl(sp, rt, V, k, rsets) - topk_reverse_kl(sm, rt, V, k, rsets)) / 2e-6;
    diff = std::max(diff, std::abs(g - rf.grad[q]));
    const auto& set = rsets[q / size_t(V)];
    if (std::find(set.begin(), set.end(), int64_t(q % size_t(V))) == set.end()) {
      outside_full = std::max(outside_full, std::abs(rf.grad[q]));
      outside_trunc = std::max(outside_trunc, std::abs(g));
    }
  }
  EXPECT_GT(diff, 1e-2);
  EXPECT_GT(outside_full, 1e-3);
  EXPECT_EQ(outside_trunc, 0.0);
}

// ------------------------------------------------------------------------------------- sampled-token form

TEST(SampledDistill, HandWorked) {
  // logp_s = log(1/2), logp_t = log(1/4): A = -(log(1/2) - log(1/4)) = -log 2. Weight 1, normaliser 2:
  //   loss = -w A logp_s / 2 = -(-log 2)(-log 2) / 2 = -(log 2)^2 / 2 = -0.2402265...
  //   dloss/dlogp_s = -w A / 2 = log 2 / 2 (descent lowers the token the student over-weights)
  // Second token: logp_s = log(1/8), logp_t = log(1/2): A = log 4, weight 0.5:
  //   loss += -0.5 log 4 log(1/8) / 2 = 0.5 * 2 log 2 * 3 log 2 / 2 = 1.5 (log 2)^2; grad = -0.5 log 4 / 2
  // Third token masked (NaN inputs).
  const double l2 = std::log(2.0);
  Tensor ls = tensor_of({std::log(0.5), std::log(0.125), kNaN}, {3});
  Tensor lt = tensor_of({std::log(0.25), std::log(0.5), kNaN}, {3});
  Tensor w = tensor_of({1.0, 0.5, 0.0}, {3});
  auto r = sampled_distill_loss(ls, lt, w, 2.0);
  EXPECT_NEAR(r.loss, -l2 * l2 / 2.0 + 1.5 * l2 * l2, 1e-15);
  auto g = values_of(r.dlogp);
  EXPECT_NEAR(g[0], l2 / 2.0, 1e-15);
  EXPECT_NEAR(g[1], -0.5 * l2, 1e-15);
  EXPECT_EQ(g[2], 0.0);
  // Metrics: the sampled log-ratios log 2 and -log 4.
  EXPECT_EQ(r.metrics.tokens, 2);
  EXPECT_NEAR(r.metrics.divergence_sum, l2 - 2 * l2, 1e-15);
  EXPECT_NEAR(r.metrics.divergence_max, l2, 1e-15);
  auto a = values_of(sampled_distill_advantages(ls, lt, w));
  EXPECT_NEAR(a[0], -l2, 1e-15);
  EXPECT_NEAR(a[1], 2 * l2, 1e-15);
  EXPECT_EQ(a[2], 0.0);
}

TEST(SampledDistill, ExpectationOverTheStudentIsTheReverseKlGradient) {
  // E_{x ~ p_s}[-A_x d log p_s(x)/dz] = sum_x p_s(x) (log p_s(x) - log p_t(x)) d log p_s(x)/dz
  //   = d KL(p_s || p_t)/dz (the extra term sum_x p_s d log p_s/dz = 0): the sampled-token form is an
  //   unbiased
  // but noisy estimate of the full-vocabulary reverse-KL gradient. Enumerate every x of a V = 7 row exactly.
  std::mt19937_64 rng(21);
  const int64_t V = 7;
  auto s = random_vec(size_t(V), rng, 1.5), t = random_vec(size_t(V), rng, 1.5);
  Out full = run(s, t, {1.0}, V, 1.0, kReverse);
  Tensor S = tensor_of(s, {1, V}), T = tensor_of(t, {1, V});
  std::vector<double> expect(size_t(V), 0.0);
  for (int32_t x = 0; x < V; ++x) {
    Tensor target = Tensor::empty({1}, DType::i32, Device::cpu);
    target.data<int32_t>()[0] = x;
    Tensor lps = token_logprobs(S, target), lpt = token_logprobs(T, target);
    auto r = sampled_distill_loss(lps, lpt, tensor_of({1.0}, {1}), 1.0);
    Tensor dl = Tensor::empty({1, V}, DType::f64, Device::cpu);
    token_logprobs_backward(S, target, r.dlogp, dl);
    const double px = std::exp(values_of(lps)[0]);
    for (int64_t j = 0; j < V; ++j) expect[size_t(j)] += px * dl.data<double>()[j];
  }
  for (int64_t j = 0; j < V; ++j) EXPECT_NEAR(expect[size_t(j)], full.grad[size_t(j)], 1e-14);
}

TEST(SampledDistill, SplittingAddsUpAndGradientMatchesFiniteDifferences) {
  std::mt19937_64 rng(4);
  const int64_t B = 3, T = 4;
  auto ls = random_vec(size_t(B * T), rng, 1.0), lt = random_vec(size_t(B * T), rng, 1.0);
  for (auto& x : ls) x = -std::abs(x);
  for (auto& x : lt) x = -std::abs(x);
  const std::vector<double> w = {1, 1, 1, 0, 1, 1, 0, 0, 2, 1, 1, 1};
  const double n = double(count_distill_tokens(tensor_of(w, {B, T})));
  EXPECT_EQ(n, 9.0);
  auto whole = sampled_distill_loss(tensor_of(ls, {B, T}), tensor_of(lt, {B, T}), tensor_of(w, {B, T}), n);
  auto a = sampled_distill_loss(tensor_of({ls.begin(), ls.begin() + T}, {1, T}),
                                tensor_of({lt.begin(), lt.begin() + T}, {1, T}),
                                tensor_of({w.begin(), w.begin() + T}, {1, T}), n);
  auto b = sampled_distill_loss(tensor_of({ls.begin() + T, ls.end()}, {B - 1, T}),
                                tensor_of({lt.begin() + T, lt.end()}, {B - 1, T}),
                                tensor_of({w.begin() + T, w.end()}, {B - 1, T}), n);
  EXPECT_NEAR(a.loss + b.loss, whole.loss, 1e-15);
  auto gw = values_of(whole.dlogp), ga = values_of(a.dlogp), gb = values_of(b.dlogp);
  for (int64_t k = 0; k < B * T; ++k) EXPECT_EQ(k < T ? ga[size_t(k)] : gb[size_t(k - T)], gw[size_t(k)]);
  DistillMetrics m = a.metrics;
  m += b.metrics;
  EXPECT_EQ(m.tokens, 9);
  EXPECT_EQ(m.divergence_max, whole.metrics.divergence_max);
  // The gradient holds A fixed (detached): d/dlogp_s of -w A logp_s / n with A frozen.
  for (size_t k = 0; k < ls.size(); ++k) {
    const double A = -(ls[k] - lt[k]);
    EXPECT_NEAR(gw[k], w[k] == 0 ? 0.0 : -w[k] * A / n, 1e-15);
  }
}

// ------------------------------------------------------------------------------------- errors

TEST(DistillLoss, Errors) {
  Tensor S = tensor_of({0, 0, 0}, {1, 3}), T2 = tensor_of({0, 0}, {1, 2}), T3 = tensor_of({0, 1, 2}, {1, 3}),
         W = tensor_of({1.0}, {1});
  Tensor G = Tensor::empty({1, 3}, DType::f64, Device::cpu);
  const std::string vocab = error_of([&] { distill_loss(S, T2, W, 1.0, kReverse, G); });
  EXPECT_TRUE(has(vocab, "teacher and student must share the vocabulary")) << vocab;
  EXPECT_TRUE(has(vocab, "tokenizer")) << vocab;
  EXPECT_TRUE(has(vocab, "teacher logits have V = 2, student logits V = 3")) << vocab;
  EXPECT_TRUE(
      has(error_of([&] { distill_loss(S, T3, W, 0.0, kReverse, G); }), "normalizer must be finite and > 0"));
  EXPECT_TRUE(has(error_of([&] { distill_loss(S, T3, tensor_of({-1.0}, {1}), 1.0, kReverse, G); }),
                  "weights must be finite"));
  EXPECT_TRUE(has(error_of([&] { distill_loss(S, T3, tensor_of({kNaN}, {1}), 1.0, kReverse, G); }),
                  "weights must be finite"));
  EXPECT_TRUE(has(error_of([&] {
                    distill_loss(S, T3, tensor_of({1.0, 1.0}, {2}), 1.0, kReverse, G);
                  }),
                  "weights must have 1"));
  EXPECT_TRUE(has(error_of([&] {
                    distill_loss(S, tensor_of({0, 0, 0, 0, 0, 0}, {2, 3}), W, 1.0, kReverse, G);
                  }),
                  "must have the student's 1 rows"));
  Tensor G2 = Tensor::empty({1, 3}, DType::f32, Device::cpu);
  EXPECT_TRUE(has(error_of([&] { distill_loss(S, T3, W, 1.0, kReverse, G2); }), "dstudent must be"));
  EXPECT_TRUE(has(error_of([&] { distill_loss(S, T3, W, 1.0, mode(DistillDivergence::jsd, 1.5), G); }),
                  "jsd beta must be in [0, 1]"));
  EXPECT_TRUE(
      has(error_of([&] { distill_loss(S, T3, W, 1.0, mode(DistillDivergence::reverse_kl, 0.5, 0.0), G); }),
          "temperature must be finite and > 0"));
  EXPECT_TRUE(has(error_of([&] { parse_distill_divergence("kl"); }), "known: reverse_kl, forward_kl, jsd"));
  EXPECT_EQ(parse_distill_divergence("jsd"), DistillDivergence::jsd);
  for (auto d : {DistillDivergence::reverse_kl, DistillDivergence::forward_kl, DistillDivergence::jsd})
    EXPECT_EQ(parse_distill_divergence(distill_divergence_name(d)), d);
  EXPECT_TRUE(has(error_of([&] {
                    sampled_distill_loss(tensor_of({-1.0}, {1}), tensor_of({-1.0, -2.0}, {2}), W, 1.0);
                  }),
                  "must have the same shape"));
  EXPECT_TRUE(has(error_of([&] { sampled_distill_loss(tensor_of({-1.0}, {1}), tensor_of({-kInf}, {1}), W, 1.0); }),
                  "teacher must be able to emit"));
}

}  // namespace
