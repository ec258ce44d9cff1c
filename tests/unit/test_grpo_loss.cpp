// GRPO math (rl/grpo.h): advantages, the clipped policy loss with KL and its gradient w.r.t. logp, against
// hand-worked numbers (written out in the comments), central finite differences in f64, and the invariance of
// loss and gradient under micro-batch and data-parallel splitting with global normalisation.
#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <random>

#include "core/error.h"
#include "ops/ops.h"
#include "rl/grpo.h"
#include "test_util.h"

using namespace tessera;
using namespace tessera::rl;
using tessera::testing::error_of;
using tessera::testing::tensor_of;
using tessera::testing::values_of;

namespace {


bool has(const std::string& s, const std::string& part) { return s.find(part) != std::string::npos; }

// One token per row: inputs for the single-token hand-worked cases (logp_old = 0, logp = log(rho)).
PolicyLossInputs one_token_rows(const std::vector<double>& rho, const std::vector<double>& adv) {
  const int64_t B = int64_t(rho.size());
  std::vector<double> lp(rho.size()), lo(rho.size(), 0.0), m(rho.size(), 1.0);
  for (size_t i = 0; i < rho.size(); ++i) lp[i] = std::log(rho[i]);
  PolicyLossInputs in;
  in.logp = tensor_of(lp, {B, 1});
  in.logp_old = tensor_of(lo, {B, 1});
  in.advantages = tensor_of(adv, {B});
  in.mask = tensor_of(m, {B, 1});
  return in;
}

// ----------------------------------------------------------------------------------------------- advantages

TEST(Advantages, GroupNormUsesTheSampleStd) {
  // Group 0: r = {1, 0, 0, 1}: mean 0.5, deviations +-0.5, sum of squares 1, sample variance 1/3,
  // std = sqrt(1/3) = 0.57735..., A = +-0.5 / (0.57735 + 1e-6) ~ +-0.866024 (population std 0.5 would give +-1).
  // Group 1: all 0.3: zero std, A = 0 exactly.
  auto a = compute_advantages({1, 0, 0, 1, 0.3, 0.3, 0.3, 0.3}, 4, AdvantageEstimator::group_norm, 1e-6);
  const double e = 0.5 / (std::sqrt(1.0 / 3.0) + 1e-6);
  ASSERT_EQ(a.values.size(), 8u);
  EXPECT_NEAR(a.values[0], e, 1e-15);
  EXPECT_NEAR(a.values[1], -e, 1e-15);
  EXPECT_NEAR(a.values[2], -e, 1e-15);
  EXPECT_NEAR(a.values[3], e, 1e-15);
  EXPECT_NEAR(a.values[0], 0.8660237, 1e-6);
  for (int i = 4; i < 8; ++i) EXPECT_EQ(a.values[size_t(i)], 0.0);
  EXPECT_EQ(a.groups, 2);
  EXPECT_EQ(a.zero_std_groups, 1);
  EXPECT_EQ(a.frac_reward_zero_std(), 0.5);

  // {3, 1, 2}: mean 2, squares 1 + 1 + 0 = 2, sample variance 2 / 2 = 1, std 1: A = {1, -1, 0} / (1 + eps).
  auto b = compute_advantages({3, 1, 2}, 3, AdvantageEstimator::group_norm, 1e-6);
  EXPECT_NEAR(b.values[0], 1.0 / (1.0 + 1e-6), 1e-15);
  EXPECT_NEAR(b.values[1], -1.0 / (1.0 + 1e-6), 1e-15);
  EXPECT_EQ(b.values[2], 0.0);
  EXPECT_EQ(b.zero_std_groups, 0);
  EXPECT_EQ(b.frac_reward_zero_std(), 0.0);
}

TEST(Advantages, DrGrpoAndRloo) {
  // Dr. GRPO, {3, 1, 2}: r - mean = {1, -1, 0}; {1, 0, 0, 1}: {0.5, -0.5, -0.5, 0.5}.
  auto d = compute_advantages({3, 1, 2, 5, 5, 5}, 3, AdvantageEstimator::dr_grpo);
  EXPECT_EQ(d.values, (std::vector<double>{1, -1, 0, 0, 0, 0}));
  EXPECT_EQ(d.zero_std_groups, 1);
  auto d2 = compute_advantages({1, 0, 0, 1}, 4, AdvantageEstimator::dr_grpo);
  EXPECT_EQ(d2.values, (std::vector<double>{0.5, -0.5, -0.5, 0.5}));
  // RLOO, {3, 1, 2}: 3 - (1 + 2) / 2 = 1.5; 1 - (3 + 2) / 2 = -1.5; 2 - (3 + 1) / 2 = 0.
  auto r = compute_advantages({3, 1, 2}, 3, AdvantageEstimator::rloo);
  EXPECT_EQ(r.values, (std::vector<double>{1.5, -1.5, 0}));
  // {1, 0, 0, 0}: 1 - 0 = 1; 0 - 1/3 = -1/3 (three times).
  auto r2 = compute_advantages({1, 0, 0, 0, 7, 7, 7, 7}, 4, AdvantageEstimator::rloo);
  EXPECT_EQ(r2.values[0], 1.0);
  EXPECT_NEAR(r2.values[1], -1.0 / 3.0, 1e-16);
  EXPECT_EQ(r2.values[4], 0.0);
  EXPECT_EQ(r2.zero_std_groups, 1);
}

TEST(Advantages, Errors) {
  EXPECT_TRUE(has(error_of([] { compute_advantages({1, 2}, 1, AdvantageEstimator::group_norm); }), "group size"));
  EXPECT_TRUE(has(error_of([] { compute_advantages({1, 2, 3}, 2, AdvantageEstimator::dr_grpo); }), "groups of 2"));
  EXPECT_TRUE(has(error_of([] { compute_advantages({1, NAN}, 2, AdvantageEstimator::rloo); }), "not finite"));
  EXPECT_EQ(error_of([] { parse_advantage_estimator("grpo"); }),
            "advantage estimator 'grpo': unknown; known: dr_grpo, group_norm, rloo");
  EXPECT_EQ(parse_advantage_estimator("rloo"), AdvantageEstimator::rloo);
}

// ------------------------------------------------------------------------------------------- clipping

TEST(PolicyLoss, ClipsBothSides) {
  // eps_low = eps_high = 0.2, token-mean over 5 tokens, dl/dlogp = -A rho on the unclipped branch:
  //   rho 1.5, A +1: 1.5 > 1.2, clipped high: l = -1.2, g = 0
  //   rho 0.5, A +1: not clipped (A > 0 only clips above): l = -0.5, g = -0.5
  //   rho 0.5, A -1: 0.5 < 0.8, clipped low: l = +0.8, g = 0
  //   rho 1.5, A -1: not clipped (A < 0 only clips below): l = +1.5, g = +1.5
  //   rho 1,   A +2: l = -2, g = -2
  // loss = (-1.2 - 0.5 + 0.8 + 1.5 - 2) / 5 = -1.4 / 5 = -0.28; g / 5 = {0, -0.1, 0, 0.3, -0.4}.
  auto in = one_token_rows({1.5, 0.5, 0.5, 1.5, 1.0}, {1, 1, -1, -1, 2});
  PolicyLossConfig cfg;
  auto r = policy_loss(in, cfg, count_loss_tokens(in.mask));
  EXPECT_NEAR(r.loss, -0.28, 1e-15);
  auto g = values_of(r.dlogp);
  const double want[] = {0, -0.1, 0, 0.3, -0.4};
  for (int i = 0; i < 5; ++i) EXPECT_NEAR(g[size_t(i)], want[i], 1e-15) << i;
  EXPECT_EQ(r.stats.tokens, 5);
  EXPECT_EQ(r.stats.clipped_high, 1);
  EXPECT_EQ(r.stats.clipped_low, 1);
  EXPECT_EQ(r.stats.dual_clipped, 0);
  EXPECT_DOUBLE_EQ(r.stats.clip_frac_low(), 0.2);
  EXPECT_DOUBLE_EQ(r.stats.clip_frac_high(), 0.2);
  EXPECT_NEAR(r.stats.ratio_mean(), 1.0, 1e-15);  // (1.5 + 0.5 + 0.5 + 1.5 + 1) / 5
  EXPECT_NEAR(r.stats.pg_loss, -0.28, 1e-15);
  EXPECT_EQ(r.stats.kl_loss, 0.0);
}

TEST(PolicyLoss, ClipHigherIsAsymmetric) {
  // rho 1.25, A +1: with eps_high 0.2 clipped at 1.2 (l = -1.2, g = 0); with DAPO's 0.28 not (l = -1.25,
  // g = -1.25). rho 0.75, A -1: eps_low 0.2 clips it (0.75 < 0.8: l = 0.8, g = 0) in both configurations.
  auto in = one_token_rows({1.25, 0.75}, {1, -1});
  PolicyLossConfig cfg;
  auto a = policy_loss(in, cfg, count_loss_tokens(in.mask));
  EXPECT_NEAR(a.loss, (-1.2 + 0.8) / 2, 1e-15);
  EXPECT_EQ(values_of(a.dlogp), (std::vector<double>{0, 0}));
  cfg.eps_high = 0.28;
  auto b = policy_loss(in, cfg, count_loss_tokens(in.mask));
  EXPECT_NEAR(b.loss, (-1.25 + 0.8) / 2, 1e-15);
  EXPECT_NEAR(values_of(b.dlogp)[0], -1.25 / 2, 1e-15);
  EXPECT_EQ(values_of(b.dlogp)[1], 0.0);
  EXPECT_EQ(b.stats.clipped_high, 0);
  EXPECT_EQ(b.stats.clipped_low, 1);
}

TEST(PolicyLoss, DualClip) {
  // c = 3: rho 4, A -1: l = min(max(4, 1.2), 3) = 3, g = 0 (dual clip active);
  //        rho 2, A -1: l = 2 < 3, g = 2;  rho 4, A +1: the ordinary upper clip, l = -1.2, g = 0.
  // token-mean: loss = (3 + 2 - 1.2) / 3 = 3.8 / 3; g = {0, 2/3, 0}.
  auto in = one_token_rows({4, 2, 4}, {-1, -1, 1});
  PolicyLossConfig cfg;
  cfg.dual_clip_c = 3;
  auto r = policy_loss(in, cfg, count_loss_tokens(in.mask));
  EXPECT_NEAR(r.loss, 3.8 / 3, 1e-15);
  auto g = values_of(r.dlogp);
  EXPECT_EQ(g[0], 0.0);
  EXPECT_NEAR(g[1], 2.0 / 3, 1e-15);
  EXPECT_EQ(g[2], 0.0);
  EXPECT_EQ(r.stats.dual_clipped, 1);
  EXPECT_EQ(r.stats.clipped_high, 1);
  // Off (the default): rho 4, A -1 gives l = 4, g = 4: loss = (4 + 2 - 1.2) / 3 = 4.8 / 3.
  cfg.dual_clip_c = 0;
  auto off = policy_loss(in, cfg, count_loss_tokens(in.mask));
  EXPECT_NEAR(off.loss, 4.8 / 3, 1e-15);
  EXPECT_NEAR(values_of(off.dlogp)[0], 4.0 / 3, 1e-15);
  EXPECT_EQ(off.stats.dual_clipped, 0);
  cfg.dual_clip_c = 1.0;
  EXPECT_TRUE(has(error_of([&] { policy_loss(in, cfg, count_loss_tokens(in.mask)); }), "dual_clip_c"));
}

// ---------------------------------------------------------------------------------------- masks and rows

TEST(PolicyLoss, MaskedTokensAndFullyMaskedRows) {
  // Row 0: tokens {rho 1, masked (NaN inputs), rho 1}, A = 1: l = -1, -1. Row 1: fully masked, all NaN.
  // token-mean over 2 tokens: loss -1, g = {-0.5, 0, -0.5}; row 1 is no sequence and gets g = 0.
  const double nan = std::numeric_limits<double>::quiet_NaN();
  PolicyLossInputs in;
  in.logp = tensor_of({-1, nan, -2, nan, nan, nan}, {2, 3});
  in.logp_old = tensor_of({-1, nan, -2, nan, nan, nan}, {2, 3});
  in.logp_ref = tensor_of({-1, nan, -2, nan, nan, nan}, {2, 3});
  in.advantages = tensor_of({1, nan}, {2});
  in.mask = tensor_of({1, 0, 1, 0, 0, 0}, {2, 3});
  const LossCounts c = count_loss_tokens(in.mask);
  EXPECT_EQ(c.tokens, 2);
  EXPECT_EQ(c.seqs, 1);
  for (auto agg : {LossAggregation::token_mean, LossAggregation::seq_mean_token_mean,
                   LossAggregation::seq_mean_token_sum_norm}) {
    PolicyLossConfig cfg;
    cfg.aggregation = agg;
    cfg.norm_constant = 2;  // sum-norm: -2 / (1 seq * 2) = -1 too
    cfg.beta = 0.1;         // k3 at logp == logp_ref is 0
    auto r = policy_loss(in, cfg, c);
    EXPECT_EQ(r.loss, -1.0) << loss_aggregation_name(agg);
    EXPECT_EQ(values_of(r.dlogp), (std::vector<double>{-0.5, 0, -0.5, 0, 0, 0})) << loss_aggregation_name(agg);
    EXPECT_EQ(r.stats.tokens, 2);
  }
  // A batch of fully masked rows only: loss 0, gradient 0, no division by zero (global counts all 0).
  PolicyLossInputs empty = in;
  empty.mask = tensor_of({0, 0, 0, 0, 0, 0}, {2, 3});
  for (auto agg : {LossAggregation::token_mean, LossAggregation::seq_mean_token_mean}) {
    PolicyLossConfig cfg;
    cfg.aggregation = agg;
    auto r = policy_loss(empty, cfg, count_loss_tokens(empty.mask));
    EXPECT_EQ(r.loss, 0.0);
    EXPECT_EQ(values_of(r.dlogp), std::vector<double>(6, 0.0));
    EXPECT_EQ(r.stats.ratio_mean(), 0.0);
    EXPECT_EQ(r.stats.clip_frac(), 0.0);
  }
  // Mask values other than 0 / 1 are refused.
  PolicyLossInputs bad = in;
  bad.mask = tensor_of({1, 0.5, 1, 0, 0, 0}, {2, 3});
  EXPECT_TRUE(has(error_of([&] { policy_loss(bad, PolicyLossConfig{}, LossCounts{3, 1}); }), "0 or 1"));
  // Global counts smaller than this part's are refused (a caller passing local counts of another part).
  EXPECT_TRUE(has(error_of([&] { policy_loss(in, PolicyLossConfig{}, LossCounts{1, 1}); }), "global counts"));
}

// ----------------------------------------------------------------------------------------- aggregation

TEST(PolicyLoss, EachAggregationMode) {
  // Row 0: 3 tokens, A = +1; row 1: 1 token (2 masked), A = -2; rho = 1 everywhere, so l = -A:
  // row 0: -1, -1, -1 (sum -3); row 1: +2 (sum 2). dl/dlogp = -A.
  //   token-mean:              (-3 + 2) / 4 tokens = -0.25;     g: row 0 -1/4, row 1 2/4
  //   seq-mean-token-mean:     (-3/3 + 2/1) / 2 seqs = 0.5;     g: row 0 -1/(3*2) = -1/6, row 1 2/(1*2) = 1
  //   seq-mean-token-sum-norm: (-3 + 2) / (2 seqs * C = 4) = -1/8; g: row 0 -1/8, row 1 2/8
  PolicyLossInputs in;
  in.logp = tensor_of({-1, -2, -3, -0.5, 0, 0}, {2, 3});
  in.logp_old = tensor_of({-1, -2, -3, -0.5, 0, 0}, {2, 3});
  in.advantages = tensor_of({1, -2}, {2});
  in.mask = tensor_of({1, 1, 1, 1, 0, 0}, {2, 3});
  const LossCounts c = count_loss_tokens(in.mask);
  PolicyLossConfig cfg;
  cfg.aggregation = LossAggregation::token_mean;
  auto a = policy_loss(in, cfg, c);
  EXPECT_EQ(a.loss, -0.25);
  EXPECT_EQ(values_of(a.dlogp), (std::vector<double>{-0.25, -0.25, -0.25, 0.5, 0, 0}));
  cfg.aggregation = LossAggregation::seq_mean_token_mean;
  auto b = policy_loss(in, cfg, c);
  EXPECT_NEAR(b.loss, 0.5, 1e-15);
  auto gb = values_of(b.dlogp);
  for (int i = 0; i < 3; ++i) EXPECT_NEAR(gb[size_t(i)], -1.0 / 6, 1e-16);
  EXPECT_EQ(gb[3], 1.0);
  cfg.aggregation = LossAggregation::seq_mean_token_sum_norm;
  cfg.norm_constant = 4;
  auto s = policy_loss(in, cfg, c);
  EXPECT_EQ(s.loss, -0.125);
  EXPECT_EQ(values_of(s.dlogp), (std::vector<double>{-0.125, -0.125, -0.125, 0.25, 0, 0}));
  cfg.norm_constant = 0;
  EXPECT_TRUE(has(error_of([&] { policy_loss(in, cfg, c); }), "norm_constant"));
  EXPECT_EQ(parse_loss_aggregation("seq-mean-token-sum-norm"), LossAggregation::seq_mean_token_sum_norm);
  EXPECT_EQ(error_of([] { parse_loss_aggregation("token_mean"); }),
            "loss aggregation 'token_mean': unknown; known: seq-mean-token-mean, seq-mean-token-sum-norm, token-mean");
}

// ----------------------------------------------------------------------------------------- KL estimators

// One token, A = 0 (no policy-gradient term), beta = 1: the loss is the estimator and dlogp its derivative.
PolicyLossResult kl_only(KlEstimator k, double logp, double logp_ref, double logp_old, double beta = 1.0) {
  PolicyLossInputs in;
  in.logp = tensor_of({logp}, {1, 1});
  in.logp_old = tensor_of({logp_old}, {1, 1});
  in.logp_ref = tensor_of({logp_ref}, {1, 1});
  in.advantages = tensor_of({0}, {1});
  in.mask = tensor_of({1}, {1, 1});
  PolicyLossConfig cfg;
  cfg.kl = k;
  cfg.beta = beta;
  return policy_loss(in, cfg, LossCounts{1, 1});
}

TEST(PolicyLoss, KlEstimatorsHandWorked) {
  // d = logp - logp_ref = -1 - (-1.5) = 0.5.
  //   k1 = 0.5, dk/dlogp = 1
  //   k2 = 0.5^2 / 2 = 0.125, dk/dlogp = 0.5
  //   k3 = exp(-0.5) + 0.5 - 1 = 0.60653065971263342 - 0.5 = 0.10653065971263342, dk/dlogp = 1 - exp(-0.5)
  //      = 0.39346934028736658
  //   k3_ratio with logp_old = logp - ln 2 (rho = 2, detached): 2 k3 = 0.21306131942526684, dk = 0.78693868057473316
  auto k1 = kl_only(KlEstimator::k1, -1, -1.5, -1);
  EXPECT_EQ(k1.loss, 0.5);
  EXPECT_EQ(values_of(k1.dlogp)[0], 1.0);
  auto k2 = kl_only(KlEstimator::k2, -1, -1.5, -1);
  EXPECT_EQ(k2.loss, 0.125);
  EXPECT_EQ(values_of(k2.dlogp)[0], 0.5);
  auto k3 = kl_only(KlEstimator::k3, -1, -1.5, -1);
  EXPECT_NEAR(k3.loss, 0.10653065971263342, 1e-16);
  EXPECT_NEAR(values_of(k3.dlogp)[0], 0.39346934028736658, 1e-16);
  EXPECT_NEAR(k3.stats.kl_mean(), 0.10653065971263342, 1e-16);
  auto k3r = kl_only(KlEstimator::k3_ratio, -1, -1.5, -1 - std::log(2.0));
  EXPECT_NEAR(k3r.loss, 0.21306131942526684, 1e-15);
  EXPECT_NEAR(values_of(k3r.dlogp)[0], 0.78693868057473316, 1e-15);
  EXPECT_NEAR(k3r.stats.ratio_mean(), 2.0, 1e-15);
  // beta scales the loss and gradient, not the reported KL: beta 0.5 on k2 -> loss 0.0625, g 0.25, kl_loss 0.125.
  auto half = kl_only(KlEstimator::k2, -1, -1.5, -1, 0.5);
  EXPECT_EQ(half.loss, 0.0625);
  EXPECT_EQ(values_of(half.dlogp)[0], 0.25);
  EXPECT_EQ(half.stats.kl_loss, 0.125);
  // k3 for negative d = -2: exp(2) - 2 - 1 = 4.3890560989306504, dk = 1 - exp(2) = -6.3890560989306504.
  auto neg = kl_only(KlEstimator::k3, -2, 0, -2);
  EXPECT_NEAR(neg.loss, 4.3890560989306504, 1e-14);
  EXPECT_NEAR(values_of(neg.dlogp)[0], -6.3890560989306504, 1e-14);
  // k3 clamp at 10: d = -5 gives exp(5) - 6 = 142.41 -> 10 with no gradient; d = 30 gives 29 + e^-20 -> 10.
  auto big = kl_only(KlEstimator::k3, -5, 0, -5);
  EXPECT_EQ(big.loss, 10.0);
  EXPECT_EQ(values_of(big.dlogp)[0], 0.0);
  auto far = kl_only(KlEstimator::k3, 0, -30, 0);
  EXPECT_EQ(far.loss, 10.0);
  EXPECT_EQ(values_of(far.dlogp)[0], 0.0);
  // beta > 0 without a reference is an error; beta = 0 without one is fine.
  PolicyLossInputs in = one_token_rows({1}, {1});
  PolicyLossConfig cfg;
  cfg.beta = 0.1;
  EXPECT_TRUE(has(error_of([&] { policy_loss(in, cfg, LossCounts{1, 1}); }), "logp_ref"));
  EXPECT_EQ(error_of([] { parse_kl_estimator("k4"); }), "KL estimator 'k4': unknown; known: k1, k2, k3, k3_ratio");
}

// ------------------------------------------------------------------------------------ finite differences

struct Batch {
  int64_t B, T;
  std::vector<double> lp, lo, lr, adv, m;
  PolicyLossInputs inputs(const std::vector<double>& logp, const std::vector<double>& logp_old) const {
    PolicyLossInputs in;
    in.logp = tensor_of(logp, {B, T});
    in.logp_old = tensor_of(logp_old, {B, T});
    in.logp_ref = tensor_of(lr, {B, T});
    in.advantages = tensor_of(adv, {B});
    in.mask = tensor_of(m, {B, T});
    return in;
  }
  PolicyLossInputs inputs() const { return inputs(lp, lo); }
  // Rows `rows` only (in that order): a micro-batch or a rank's shard.
  PolicyLossInputs rows(const std::vector<int64_t>& rows) const {
    Batch s{int64_t(rows.size()), T, {}, {}, {}, {}, {}};
    for (int64_t b : rows) {
      for (int64_t t = 0; t < T; ++t) {
        const size_t i = size_t(b * T + t);
        s.lp.push_back(lp[i]), s.lo.push_back(lo[i]), s.lr.push_back(lr[i]), s.m.push_back(m[i]);
      }
      s.adv.push_back(adv[size_t(b)]);
    }
    return s.inputs();
  }
};

// Random logp within +-0.45 of logp_old (both clip sides are hit with eps 0.2), a random reference, random
// lengths (row 1 fully masked), advantages of both signs.
Batch random_batch(int64_t B, int64_t T, uint64_t seed) {
  std::mt19937_64 g(seed);
  std::uniform_real_distribution<double> u(0.0, 1.0);
  Batch x{B, T, {}, {}, {}, {}, {}};
  for (int64_t b = 0; b < B; ++b) {
    const int64_t len = b == 1 ? 0 : 1 + int64_t(u(g) * double(T));
    x.adv.push_back(u(g) * 4 - 2);
    for (int64_t t = 0; t < T; ++t) {
      const double old = -0.2 - 3 * u(g);
      x.lo.push_back(old);
      x.lp.push_back(old + 0.9 * u(g) - 0.45);
      x.lr.push_back(old + 1.2 * u(g) - 0.6);
      x.m.push_back(t < len ? 1.0 : 0.0);
    }
  }
  return x;
}

std::vector<PolicyLossConfig> all_configs() {
  std::vector<PolicyLossConfig> out;
  for (auto agg : {LossAggregation::token_mean, LossAggregation::seq_mean_token_mean,
                   LossAggregation::seq_mean_token_sum_norm})
    for (auto kl : {KlEstimator::k1, KlEstimator::k2, KlEstimator::k3, KlEstimator::k3_ratio}) {
      PolicyLossConfig c;
      c.aggregation = agg;
      c.kl = kl;
      c.beta = 0.3;
      c.eps_high = 0.28;
      c.dual_clip_c = 1.3;  // low enough for the random ratios (up to e^0.45 = 1.57) to hit it
      c.norm_constant = 7;
      out.push_back(c);
    }
  return out;
}

TEST(PolicyLoss, GradientMatchesFiniteDifferences) {
  const Batch x = random_batch(4, 6, 11);
  const LossCounts c = count_loss_tokens(x.inputs().mask);
  const double h = 1e-6;
  for (const PolicyLossConfig& cfg : all_configs()) {
    const std::string what = std::string(loss_aggregation_name(cfg.aggregation)) + " " + kl_estimator_name(cfg.kl);
    auto r = policy_loss(x.inputs(), cfg, c);
    EXPECT_GT(r.stats.clipped_low + r.stats.clipped_high, 0) << what;
    EXPECT_GT(r.stats.dual_clipped, 0) << what;
    const auto g = values_of(r.dlogp);
    for (size_t i = 0; i < g.size(); ++i) {
      if (x.m[i] == 0.0) {
        EXPECT_EQ(g[i], 0.0);
        continue;
      }
      auto lp = x.lp, lo = x.lo;
      double fd;
      if (cfg.kl != KlEstimator::k3_ratio) {
        lp[i] = x.lp[i] + h;
        const double up = policy_loss(x.inputs(lp, lo), cfg, c).loss;
        lp[i] = x.lp[i] - h;
        const double dn = policy_loss(x.inputs(lp, lo), cfg, c).loss;
        fd = (up - dn) / (2 * h);
      } else {
        // rho is detached in k3_ratio, so its gradient is not the total derivative. Moving logp and logp_old
        // together holds rho (and with it the whole clipped term) fixed: that finite difference is the KL part
        // with rho frozen; the clipped term's gradient comes from the same config with beta = 0.
        lp[i] = x.lp[i] + h, lo[i] = x.lo[i] + h;
        const double up = policy_loss(x.inputs(lp, lo), cfg, c).loss;
        lp[i] = x.lp[i] - h, lo[i] = x.lo[i] - h;
        const double dn = policy_loss(x.inputs(lp, lo), cfg, c).loss;
        PolicyLossConfig pg = cfg;
        pg.beta = 0;
        fd = (up - dn) / (2 * h) + values_of(policy_loss(x.inputs(), pg, c).dlogp)[i];
      }
      EXPECT_NEAR(g[i], fd, 1e-8 * std::max(1.0, std::abs(fd))) << what << " token " << i;
    }
  }
}

// ------------------------------------------------------------------------------- splitting invariance

TEST(PolicyLoss, MicroBatchesAndRanksSumToTheWholeBatch) {
  const Batch x = random_batch(8, 6, 5);
  const LossCounts global = count_loss_tokens(x.inputs().mask);
  for (const PolicyLossConfig& cfg : all_configs()) {
    const std::string what = std::string(loss_aggregation_name(cfg.aggregation)) + " " + kl_estimator_name(cfg.kl);
    auto whole = policy_loss(x.inputs(), cfg, global);
    const auto gw = values_of(whole.dlogp);
    // Two micro-batches (rows 0-3, 4-7) and two "ranks" (even rows, odd rows), each with the global counts.
    for (const auto& split : {std::vector<std::vector<int64_t>>{{0, 1, 2, 3}, {4, 5, 6, 7}},
                              std::vector<std::vector<int64_t>>{{0, 2, 4, 6}, {1, 3, 5, 7}}}) {
      double loss = 0;
      PolicyLossStats st;
      LossCounts counted;
      for (const auto& rows : split) {
        auto part_in = x.rows(rows);
        counted += count_loss_tokens(part_in.mask);
        auto part = policy_loss(part_in, cfg, global);
        loss += part.loss;
        st += part.stats;
        const auto gp = values_of(part.dlogp);
        for (size_t k = 0; k < rows.size(); ++k)
          for (int64_t t = 0; t < x.T; ++t)  // bitwise: the same arithmetic per token
            EXPECT_EQ(gp[k * size_t(x.T) + size_t(t)], gw[size_t(rows[k] * x.T + t)]) << what;
      }
      EXPECT_EQ(counted.tokens, global.tokens);
      EXPECT_EQ(counted.seqs, global.seqs);
      EXPECT_NEAR(loss, whole.loss, 1e-15) << what;
      EXPECT_EQ(st.tokens, whole.stats.tokens);
      EXPECT_EQ(st.clipped_low, whole.stats.clipped_low);
      EXPECT_EQ(st.clipped_high, whole.stats.clipped_high);
      EXPECT_EQ(st.dual_clipped, whole.stats.dual_clipped);
      EXPECT_NEAR(st.ratio_sum, whole.stats.ratio_sum, 1e-13);
      EXPECT_NEAR(st.kl_sum, whole.stats.kl_sum, 1e-13);
      // The test can fail: normalising each part by its own counts gives a different loss.
      double local = 0;
      for (const auto& rows : split) {
        auto part_in = x.rows(rows);
        local += policy_loss(part_in, cfg, count_loss_tokens(part_in.mask)).loss;
      }
      EXPECT_GT(std::abs(local - whole.loss), 1e-6) << what;
    }
  }
}

// ------------------------------------------------------------------------------ on-policy: ratio exactly 1

TEST(PolicyLoss, RatioIsExactlyOneOnPolicy) {
  Batch x = random_batch(6, 9, 3);
  x.lo = x.lp;  // learning rate 0: the trainer recomputes exactly what the sampler saw
  for (DType dt : {DType::f64, DType::f32}) {
    PolicyLossInputs in = x.inputs();
    in.logp = in.logp.to(dt);
    in.logp_old = in.logp_old.to(dt);
    PolicyLossConfig cfg;
    cfg.dual_clip_c = 3;
    auto r = policy_loss(in, cfg, count_loss_tokens(in.mask));
    EXPECT_GT(r.stats.tokens, 0);
    EXPECT_EQ(r.stats.ratio_sum, double(r.stats.tokens));  // every rho == exp(0) == 1 exactly
    EXPECT_EQ(r.stats.ratio_mean(), 1.0);
    EXPECT_EQ(r.stats.clip_frac(), 0.0);
    EXPECT_EQ(r.stats.clipped_low + r.stats.clipped_high + r.stats.dual_clipped, 0);
    EXPECT_EQ(r.dlogp.dtype(), dt);
    // On-policy token-mean: loss = -sum_t A / tokens and dlogp = -A / tokens.
    double want = 0;
    for (int64_t b = 0; b < x.B; ++b)
      for (int64_t t = 0; t < x.T; ++t) want -= x.m[size_t(b * x.T + t)] * x.adv[size_t(b)];
    EXPECT_NEAR(r.loss, want / double(r.stats.tokens), 1e-14);
  }
}

TEST(PolicyLoss, F32InputsMatchF64) {
  const Batch x = random_batch(4, 5, 9);
  PolicyLossInputs in64 = x.inputs(), in32 = x.inputs();
  for (Tensor* t : {&in32.logp, &in32.logp_old, &in32.logp_ref, &in32.advantages, &in32.mask}) *t = t->to(DType::f32);
  PolicyLossConfig cfg = all_configs()[2];
  auto a = policy_loss(in64, cfg, count_loss_tokens(in64.mask));
  auto b = policy_loss(in32, cfg, count_loss_tokens(in32.mask));
  EXPECT_EQ(b.dlogp.dtype(), DType::f32);
  EXPECT_NEAR(a.loss, b.loss, 1e-5);
  auto ga = values_of(a.dlogp), gb = values_of(b.dlogp);
  for (size_t i = 0; i < ga.size(); ++i) EXPECT_NEAR(ga[i], gb[i], 1e-5);
}

// ------------------------------------------------------------------------------------ logits <-> logp

TEST(TokenLogprobs, BackwardMatchesFiniteDifferencesAndCrossEntropy) {
  const int64_t N = 4, V = 7;
  std::mt19937_64 g(2);
  std::normal_distribution<double> nd(0.0, 2.0);
  std::vector<double> x(size_t(N * V));
  for (double& v : x) v = nd(g);
  Tensor logits = tensor_of(x, {N, V});
  Tensor targets = Tensor::empty({N}, DType::i32, Device::cpu);
  const int32_t tg[] = {3, -1, 0, 6};
  for (int64_t i = 0; i < N; ++i) targets.data<int32_t>()[i] = tg[i];
  // logp = -cross_entropy (and 0 on the ignored row).
  Tensor lp = token_logprobs(logits, targets);
  Tensor ce = Tensor::empty({N}, DType::f64, Device::cpu);
  ops::cross_entropy(logits, targets, ce, 1.0, Tensor());
  for (int64_t i = 0; i < N; ++i) EXPECT_NEAR(values_of(lp)[size_t(i)], -values_of(ce)[size_t(i)], 1e-14);
  EXPECT_EQ(values_of(lp)[1], 0.0);

  // d(sum_i w_i logp_i)/dlogits against central differences.
  const std::vector<double> w = {0.7, 5.0, -1.3, 0.2};
  Tensor dl = Tensor::empty({N, V}, DType::f64, Device::cpu);
  token_logprobs_backward(logits, targets, tensor_of(w, {N}), dl);
  auto objective = [&](const std::vector<double>& xs) {
    auto l = values_of(token_logprobs(tensor_of(xs, {N, V}), targets));
    double s = 0;
    for (int64_t i = 0; i < N; ++i) s += w[size_t(i)] * l[size_t(i)];
    return s;
  };
  const auto d = values_of(dl);
  for (size_t k = 0; k < x.size(); ++k) {
    auto xp = x, xm = x;
    xp[k] += 1e-6, xm[k] -= 1e-6;
    const double fd = (objective(xp) - objective(xm)) / 2e-6;
    EXPECT_NEAR(d[k], fd, 1e-8) << k;
  }
  for (int64_t j = 0; j < V; ++j) EXPECT_EQ(d[size_t(V + j)], 0.0);  // ignored row

  // A constant dlogp = -s is cross_entropy's backward with loss_scale s: s * (softmax - onehot).
  Tensor dce = Tensor::empty({N, V}, DType::f64, Device::cpu);
  ops::cross_entropy(logits, targets, ce, 0.25, dce);
  token_logprobs_backward(logits, targets, tensor_of(std::vector<double>(size_t(N), -0.25), {N}), dl);
  const auto a = values_of(dl), b = values_of(dce);
  for (size_t k = 0; k < a.size(); ++k) EXPECT_NEAR(a[k], b[k], 1e-15) << k;
}

// ------------------------------------------------------------------------------------------- options

TEST(GrpoOptions, OverlongPenalty) {
  // max_len 20, buffer 4, factor 1: expected = 16. len <= 16: 0; 18: -(18 - 16) / 4 = -0.5; 20: -1.
  EXPECT_EQ(overlong_penalty(10, 20, 4, 1.0), 0.0);
  EXPECT_EQ(overlong_penalty(16, 20, 4, 1.0), 0.0);
  EXPECT_EQ(overlong_penalty(17, 20, 4, 1.0), -0.25);
  EXPECT_EQ(overlong_penalty(18, 20, 4, 1.0), -0.5);
  EXPECT_EQ(overlong_penalty(20, 20, 4, 1.0), -1.0);
  EXPECT_EQ(overlong_penalty(20, 20, 4, 0.5), -0.5);
  EXPECT_TRUE(has(error_of([] { overlong_penalty(5, 20, 0, 1.0); }), "buffer"));
  EXPECT_TRUE(has(error_of([] { overlong_penalty(5, 20, 21, 1.0); }), "buffer"));
}

TEST(GrpoOptions, TruncationAndOffPolicyMasks) {
  Tensor mask = tensor_of({1, 1, 0, 1, 1, 1, 1, 0, 0, 0, 0, 0}, {4, 3});
  Tensor t = mask_truncated(mask, {0, 1, 0, 0});
  EXPECT_EQ(values_of(t), (std::vector<double>{1, 1, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0}));
  EXPECT_EQ(values_of(mask)[3], 1.0);  // the input is not modified
  EXPECT_EQ(count_loss_tokens(t).seqs, 2);

  // delta 0.2; mean over unmasked tokens of logp_old - logp:
  //   row 0: A -1, drift {0.2, 0.4} -> 0.3 > 0.2: dropped (the masked token's drift 100 is ignored)
  //   row 1: A +1, drift 0.3: kept (only negative samples are masked)
  //   row 2: A -1, drift 0.1: kept
  //   row 3: A -1, fully masked: kept
  Tensor lp = tensor_of({-1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1}, {4, 3});
  Tensor lo = tensor_of({-0.8, -0.6, 99, -0.7, -0.7, -0.7, -0.9, -1, -1, 5, 5, 5}, {4, 3});
  auto keep = offpolicy_sequence_keep(lp, lo, mask, {-1, 1, -1, -1}, 0.2);
  EXPECT_EQ(keep, (std::vector<uint8_t>{0, 1, 1, 1}));
  EXPECT_EQ(values_of(mask_rows(mask, keep)), (std::vector<double>{0, 0, 0, 1, 1, 1, 1, 0, 0, 0, 0, 0}));
  // delta 0.35: row 0 (0.3) is kept too.
  EXPECT_EQ(offpolicy_sequence_keep(lp, lo, mask, {-1, 1, -1, -1}, 0.35), (std::vector<uint8_t>{1, 1, 1, 1}));
}

}  // namespace
