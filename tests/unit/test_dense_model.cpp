// The dense model's backward against central finite differences of its forward, in fp64, for a sample of
// elements of every parameter; and document masking as a property of the whole model.
#include <gtest/gtest.h>

#include <cmath>

#include "test_util.h"
#include "model/dense.h"

using namespace tessera;

namespace {

ModelConfig tiny_config() { return tessera::testing::dense_test_config(11, 8, 2, 12, 16); }

TokenBatch random_batch(int64_t B, int64_t T, int64_t V, uint64_t seed, bool docs) {
  TokenBatch b = tessera::testing::random_token_batch(B, T, V, seed);
  b.targets.data<int32_t>()[3] = -1;  // one position without a loss
  if (docs) {
    b.doc = Tensor::empty({B, T}, DType::i32);
    for (int64_t i = 0; i < B * T; ++i) b.doc.data<int32_t>()[i] = int32_t((i % T) >= T / 2);
  }
  return b;
}

}  // namespace

TEST(DenseModel, GradientsMatchFiniteDifferences) {
  DenseModel model(tiny_config(), DType::f64);
  model.init(7);
  TokenBatch batch = random_batch(2, 6, 11, 3, true);
  const double loss_scale = 0.5;
  model.zero_grad();
  model.forward_backward(batch, loss_scale);
  const double eps = 1e-6;
  int checked = 0;
  for (Param* p : model.params()) {
    int64_t n = p->value.numel(), stride = std::max<int64_t>(1, n / 7);
    for (int64_t i = 0; i < n; i += stride) {
      double* v = p->value.data<double>() + i;
      double v0 = *v;
      *v = v0 + eps;
      double lp = model.forward(batch);
      *v = v0 - eps;
      double lm = model.forward(batch);
      *v = v0;
      double numeric = loss_scale * (lp - lm) / (2 * eps), analytic = p->grad.data<double>()[i];
      EXPECT_NEAR(analytic, numeric, 1e-6 * std::max(1.0, std::abs(numeric)))
          << p->name << " element " << i;
      ++checked;
    }
  }
  EXPECT_GT(checked, 100);
}

TEST(DenseModel, GradientsAccumulateAcrossMicroBatches) {
  DenseModel model(tiny_config(), DType::f64);
  model.init(1);
  TokenBatch a = random_batch(1, 6, 11, 5, false), b = random_batch(1, 6, 11, 6, false);
  // Both rows in one batch vs two micro-batches: the same gradients.
  TokenBatch both;
  both.ids = Tensor::empty({2, 6}, DType::i32);
  both.targets = Tensor::empty({2, 6}, DType::i32);
  both.ids.slice(0, 1).copy_from(a.ids);
  both.ids.slice(1, 1).copy_from(b.ids);
  both.targets.slice(0, 1).copy_from(a.targets);
  both.targets.slice(1, 1).copy_from(b.targets);
  model.zero_grad();
  model.forward_backward(both, 0.1);
  std::vector<Tensor> whole;
  for (Param* p : model.params()) whole.push_back(p->grad.clone());
  model.zero_grad();
  model.forward_backward(a, 0.1);
  model.forward_backward(b, 0.1);
  auto ps = model.params();
  for (size_t k = 0; k < ps.size(); ++k)
    for (int64_t i = 0; i < whole[k].numel(); ++i)
      ASSERT_NEAR(ps[k]->grad.data<double>()[i], whole[k].data<double>()[i], 1e-12) << ps[k]->name;
}

TEST(DenseModel, NoAttentionAcrossDocumentsOrIntoTheFuture) {
  DenseModel model(tiny_config(), DType::f32);
  model.init(2);
  TokenBatch batch = random_batch(1, 8, 11, 9, true);  // documents [0, 4) and [4, 8)
  Tensor before, after;
  model.forward(batch, &before);
  // Change a token of the second document: the first document's logits are bitwise unchanged.
  batch.ids.data<int32_t>()[5] = (batch.ids.data<int32_t>()[5] + 1) % 11;
  model.forward(batch, &after);
  const int64_t V = 11;
  for (int64_t i = 0; i < 4 * V; ++i) ASSERT_EQ(before.data<float>()[i], after.data<float>()[i]) << i;
  // Positions 5.. of the second document did change (the check above can fail).
  bool changed = false;
  for (int64_t i = 5 * V; i < 8 * V; ++i) changed |= before.data<float>()[i] != after.data<float>()[i];
  EXPECT_TRUE(changed);
  // A change at position 6 leaves position 5 unchanged (causality).
  model.forward(batch, &before);
  batch.ids.data<int32_t>()[6] = (batch.ids.data<int32_t>()[6] + 1) % 11;
  model.forward(batch, &after);
  for (int64_t i = 0; i < 6 * V; ++i) ASSERT_EQ(before.data<float>()[i], after.data<float>()[i]) << i;
}
