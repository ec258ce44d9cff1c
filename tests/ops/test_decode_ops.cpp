// The decoding ops (forward only): attention of new queries against a KV cache, against a naive reference and
// against the training attention.
#include <gtest/gtest.h>

#include <cmath>

#include "op_harness.h"
#include "ops/ops.h"

using namespace tessera;
using namespace tessera::testing;

TEST(DecodeOps, AttentionDecodeMatchesNaiveReference) {
  const int64_t B = 2, t = 3, H = 4, KH = 2, D = 5, L = 9;
  Tensor q = random_tensor({B, t, H, D}, 1), k = random_tensor({B, L, KH, D}, 2), v = random_tensor({B, L, KH, D}, 3);
  // Row 0: queries at 2, 3, 4; row 1: at 6, 7, and a padding query.
  Tensor pos = ids_tensor({2, 3, 4, 6, 7, -1}, {B, t});
  Tensor out = random_tensor({B, t, H, D}, 4);  // overwritten, padding included
  const double scale = 0.37;
  ops::attention_decode(q, k, v, pos, scale, out);
  auto at = [](const Tensor& x, int64_t b, int64_t s, int64_t h, int64_t d) {
    return value_at(x, ((b * x.size(1) + s) * x.size(2) + h) * x.size(3) + d);
  };
  for (int64_t b = 0; b < B; ++b)
    for (int64_t i = 0; i < t; ++i)
      for (int64_t h = 0; h < H; ++h) {
        const int64_t p = int64_t(value_at(pos, b * t + i));
        std::vector<double> w(L, 0.0);
        double total = 0;
        for (int64_t j = 0; j <= p; ++j) {
          double s = 0;
          for (int64_t d = 0; d < D; ++d) s += at(q, b, i, h, d) * at(k, b, j, h / (H / KH), d);
          total += (w[j] = std::exp(scale * s));
        }
        for (int64_t d = 0; d < D; ++d) {
          double o = 0;
          for (int64_t j = 0; j <= p; ++j) o += w[j] / total * at(v, b, j, h / (H / KH), d);
          EXPECT_NEAR(at(out, b, i, h, d), o, 1e-12) << "b=" << b << " i=" << i << " h=" << h;
        }
      }
}

TEST(DecodeOps, AttentionDecodeOfEveryPositionIsCausalAttention) {
  const int64_t B = 2, T = 6, H = 2, KH = 1, D = 4;
  for (DType dt : {DType::f64, DType::f32}) {
    Tensor q = random_tensor({B, T, H, D}, 5, 1.0, dt), k = random_tensor({B, T, KH, D}, 6, 1.0, dt),
           v = random_tensor({B, T, KH, D}, 7, 1.0, dt);
    Tensor ref = Tensor::empty({B, T, H, D}, dt), lse = Tensor::empty({B, H, T}, dt);
    ops::attention_forward(q, k, v, Tensor(), 0.5, ref, lse);
    std::vector<int32_t> p;
    for (int64_t b = 0; b < B; ++b)
      for (int64_t i = 0; i < T; ++i) p.push_back(int32_t(i));
    Tensor out = Tensor::empty({B, T, H, D}, dt);
    ops::attention_decode(q, k, v, ids_tensor(p, {B, T}), 0.5, out);
    EXPECT_LT(max_rel_diff(out, ref), dt == DType::f64 ? 1e-12 : 1e-5);
  }
}

TEST(DecodeOps, AttentionDecodeRejectsPositionsBeyondTheCache) {
  Tensor q = random_tensor({1, 1, 1, 2}, 1), k = random_tensor({1, 3, 1, 2}, 2), v = random_tensor({1, 3, 1, 2}, 3);
  Tensor out = like_zeros(q);
  EXPECT_THROW(ops::attention_decode(q, k, v, ids_tensor({3}, {1, 1}), 1.0, out), std::exception);
}
