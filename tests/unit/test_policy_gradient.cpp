// Model::forward_backward_logits, the path GRPO trains through: the gradient of a loss defined on the logits
// (here sum_i w_i log p(target_i), weights of both signs and some zero, rl::token_logprobs) against central
// finite differences of that loss through Model::forward, in fp64, for the dense and the tiny V4 model. For V4
// this also checks that no auxiliary loss (MTP, balance, indexer) leaks into the gradient.
#include <gtest/gtest.h>

#include <cmath>

#include "core/rng.h"
#include "model/dense.h"
#include "rl/grpo.h"
#include "tests/unit/v4_test_model.h"

using namespace tessera;
using namespace tessera::testing;

namespace {

double& at(Tensor& t, int64_t i) { return t.data<double>()[i]; }

// Per-position weights in [-1, 1], every fifth one 0.
Tensor weights_for(const TokenBatch& b, uint64_t seed) {
  const int64_t N = b.batch_size() * b.seq_len();
  Tensor w32 = Tensor::empty({N}, DType::f32);
  Rng{seed, stream_id("weights")}.fill_normal(w32.data<float>(), N, 0.0, 0.5);
  Tensor w = w32.to(DType::f64);
  for (int64_t i = 0; i < N; i += 5) w.data<double>()[i] = 0.0;
  return w;
}

double weighted_logprob(Model& m, const TokenBatch& b, const Tensor& w) {
  Tensor logits;
  m.forward(b, &logits);
  Tensor lp = rl::token_logprobs(logits, b.targets.reshape({logits.size(0)}));
  double s = 0;
  for (int64_t i = 0; i < lp.numel(); ++i) s += w.data<double>()[i] * lp.data<double>()[i];
  return s;
}

// Worst relative error over `samples` random elements of every parameter; fails on any parameter above tol.
void check_against_finite_differences(Model& model, const TokenBatch& batch, int samples, double eps, double tol) {
  const Tensor w = weights_for(batch, 4);
  const Tensor targets = batch.targets.reshape({batch.batch_size() * batch.seq_len()});
  model.zero_grad();
  model.forward_backward_logits(batch, [&](const Tensor& logits, const Tensor& dlogits) {
    rl::token_logprobs_backward(logits, targets, w, dlogits);
  });
  int checked = 0, nonzero = 0;
  for (Param* p : model.params()) {
    Rng rng{99, stream_id(p->name.c_str())};
    const int64_t n = p->value.numel();
    for (int s = 0; s < samples; ++s) {
      const int64_t i = int64_t(rng.below(s, n));
      const double saved = at(p->value, i);
      at(p->value, i) = saved + eps;
      const double up = weighted_logprob(model, batch, w);
      at(p->value, i) = saved - eps;
      const double down = weighted_logprob(model, batch, w);
      at(p->value, i) = saved;
      const double fd = (up - down) / (2 * eps), g = at(p->grad, i);
      const double err = std::abs(fd - g) / std::max(1e-6, std::abs(fd) + std::abs(g));
      if (std::abs(fd - g) > 1e-8 && err > tol) ADD_FAILURE() << p->name << " element " << i << ": analytic " << g
                                                              << ", finite difference " << fd;
      ++checked;
      nonzero += std::abs(g) > 1e-8;
    }
  }
  EXPECT_GT(checked, 50);
  EXPECT_GT(nonzero, checked / 2);  // the check is not passing on zeros
}

}  // namespace

TEST(PolicyGradient, DenseLogitsLossMatchesFiniteDifferences) {
  ModelConfig c;
  c.vocab_size = 11, c.dim = 8, c.n_layers = 2, c.n_heads = 4, c.n_kv_heads = 2, c.ffn_dim = 12, c.max_seq_len = 16;
  c.init_std = 0.3;
  DenseModel model(c, DType::f64);
  model.init(7);
  TokenBatch batch = random_token_batch(2, 6, 11, 3);
  batch.targets.data<int32_t>()[3] = -1;
  check_against_finite_differences(model, batch, 5, 1e-6, 1e-6);
}

TEST(PolicyGradient, V4LogitsLossMatchesFiniteDifferencesWithNoAuxiliaryGradient) {
  ModelConfig cfg = tiny_v4_config();  // MTP, balance and indexer losses all on: none may reach the gradient
  V4Model model(cfg, DType::f64);
  randomize_v4(model, 11);
  check_against_finite_differences(model, tiny_v4_batch(cfg.vocab_size, 5), 2, 1e-5, 1e-4);
}

// With weights -s on every target (the gradient of s * cross-entropy), the caller's loss is the model's own:
// forward_backward_logits gives forward_backward's gradients for the dense model.
TEST(PolicyGradient, DenseCrossEntropyThroughTheHookEqualsForwardBackward) {
  ModelConfig c;
  c.vocab_size = 13, c.dim = 8, c.n_layers = 2, c.n_heads = 2, c.n_kv_heads = 2, c.ffn_dim = 12, c.max_seq_len = 16;
  c.init_std = 0.3;
  DenseModel model(c, DType::f64);
  model.init(5);
  TokenBatch batch = random_token_batch(3, 7, 13, 9);
  const double s = 0.37;
  model.zero_grad();
  const double loss_a = model.forward_backward(batch, s);
  std::vector<Tensor> want;
  for (Param* p : model.params()) want.push_back(p->grad.clone());
  model.zero_grad();
  const Tensor targets = batch.targets.reshape({21});
  Tensor w = Tensor::empty({21}, DType::f64);
  for (int64_t i = 0; i < 21; ++i) w.data<double>()[i] = -s;
  const double loss_b = model.forward_backward_logits(batch, [&](const Tensor& logits, const Tensor& dlogits) {
    rl::token_logprobs_backward(logits, targets, w, dlogits);
  });
  EXPECT_DOUBLE_EQ(loss_a, loss_b);
  ParamList ps = model.params();
  for (size_t k = 0; k < ps.size(); ++k)
    for (int64_t i = 0; i < want[k].numel(); ++i)
      ASSERT_NEAR(at(ps[k]->grad, i), want[k].data<double>()[i], 1e-12 * (1 + std::abs(want[k].data<double>()[i])))
          << ps[k]->name << " element " << i;
}
