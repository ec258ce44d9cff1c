// Quantisation-aware training (model/qat.h): which weights are quantised and how (by kind and name, tiny dense and
// tiny V4 models); hand-worked FP8 128 x 128 and FP4 1 x 32 values inside the scope; ineligible weights untouched;
// master values restored bitwise; idempotence; and the straight-through gradient: the gradient with the scope
// equals the gradient of a model whose weights were set to the quantised values, and differs from the fp32 one.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <map>

#include "model/dense.h"
#include "model/qat.h"
#include "model/v4.h"
#include "ops/quant.h"
#include "test_util.h"
#include "v4_test_model.h"

using namespace tessera;
using namespace tessera::qat;

namespace {

ModelConfig tiny_dense_config() { return tessera::testing::dense_test_config(11, 8, 2, 12, 16); }

std::vector<float> values_of(const Tensor& t) {
  return std::vector<float>(t.data<float>(), t.data<float>() + t.numel());
}

bool bitwise_equal(const Tensor& a, const std::vector<float>& b) {
  return a.numel() == int64_t(b.size()) && std::memcmp(a.data<float>(), b.data(), b.size() * sizeof(float)) == 0;
}

// The quantised values of a master tensor, slice by slice (3-D: one matrix per leading index), via ops/quant.h.
std::vector<float> expected_quantized(const std::vector<float>& master, const Shape& shape, Format f) {
  const int64_t G = shape.size() == 3 ? shape[0] : 1, rows = shape[shape.size() - 2], cols = shape.back();
  std::vector<float> out(master.size());
  for (int64_t g = 0; g < G; ++g) {
    std::vector<double> x(master.begin() + g * rows * cols, master.begin() + (g + 1) * rows * cols);
    std::vector<double> y;
    if (f == Format::fp8) y = quant::dequantize(quant::quantize_fp8(x, rows, cols, 128, 128));
    else y = quant::dequantize(quant::fp4_to_fp8(quant::quantize_fp4(x, rows, cols, 32), 128, 128));
    for (size_t i = 0; i < y.size(); ++i) out[size_t(g * rows * cols) + i] = float(y[i]);
  }
  return out;
}

std::map<std::string, Format> formats(Model& m, Mode mode) {
  std::map<std::string, Format> out;
  for (Param* p : m.params()) out[p->name] = weight_format(*p, mode);
  return out;
}

}  // namespace

TEST(Qat, ParseMode) {
  EXPECT_EQ(parse_mode("off"), Mode::off);
  EXPECT_EQ(parse_mode("fp8"), Mode::fp8);
  EXPECT_EQ(parse_mode("fp4_fp8"), Mode::fp4_fp8);
  EXPECT_NE(tessera::testing::error_of([] { parse_mode("fp4"); }).find("fp4_fp8"), std::string::npos);
}

TEST(Qat, DenseRuleEveryHiddenMatrixFp8) {
  DenseModel model(tiny_dense_config());
  for (Mode mode : {Mode::fp8, Mode::fp4_fp8}) {
    int fp8 = 0;
    for (const auto& [name, f] : formats(model, mode)) {
      const bool hidden = name.find(".attn.w") != std::string::npos || name.find(".ffn.w") != std::string::npos;
      EXPECT_EQ(f, hidden ? Format::fp8 : Format::none) << name;
      fp8 += f == Format::fp8;
    }
    EXPECT_EQ(fp8, 2 * 7);  // wq wk wv wo w1 w2 w3 per layer; no experts, so fp4_fp8 = fp8
  }
  for (const auto& [name, f] : formats(model, Mode::off)) EXPECT_EQ(f, Format::none) << name;
}

TEST(Qat, V4RuleByKindAndName) {
  V4Model model(tessera::testing::tiny_v4_config());
  const auto f48 = formats(model, Mode::fp4_fp8), f8 = formats(model, Mode::fp8);
  int n_fp4 = 0, n_fp8 = 0;
  for (Param* p : model.params()) {
    const std::string& n = p->name;
    const Format f = f48.at(n);
    n_fp4 += f == Format::fp4, n_fp8 += f == Format::fp8;
    if (p->kind != ParamKind::matrix) {
      EXPECT_EQ(f, Format::none) << n << " (" << param_kind_name(p->kind) << ")";
    } else if (n.find("hc_") != std::string::npos || n.ends_with("ffn.gate.weight")) {
      EXPECT_EQ(f, Format::none) << n;  // mHC mixing matrices, the router
      EXPECT_EQ(f8.at(n), Format::none) << n;
    } else if (n.find(".ffn.experts.w") != std::string::npos) {
      EXPECT_EQ(f, Format::fp4) << n;
      EXPECT_EQ(f8.at(n), Format::fp8) << n;  // "fp8": the experts too
    } else {
      EXPECT_EQ(f, Format::fp8) << n;
      EXPECT_EQ(f8.at(n), Format::fp8) << n;
    }
  }
  // Named examples of each class.
  EXPECT_EQ(f48.at("tok_embeddings"), Format::none);
  EXPECT_EQ(f48.at("output"), Format::none);
  EXPECT_EQ(f48.at("layers.0.attn_norm"), Format::none);
  EXPECT_EQ(f48.at("layers.0.hc_attn.fn"), Format::none);
  EXPECT_EQ(f48.at("layers.0.hc_attn.base"), Format::none);
  EXPECT_EQ(f48.at("hc_head.fn"), Format::none);
  EXPECT_EQ(f48.at("layers.1.ffn.gate.weight"), Format::none);
  EXPECT_EQ(f48.at("layers.1.ffn.experts.w1"), Format::fp4);
  EXPECT_EQ(f48.at("layers.1.ffn.experts.w2"), Format::fp4);
  EXPECT_EQ(f48.at("layers.1.ffn.shared.w2"), Format::fp8);
  EXPECT_EQ(f48.at("layers.0.attn.wq_a"), Format::fp8);
  EXPECT_EQ(f48.at("layers.0.attn.wo_a"), Format::fp8);  // [groups, rank, in]: one matrix per group
  EXPECT_EQ(f48.at("layers.1.attn.compressor.wkv"), Format::fp8);
  EXPECT_EQ(f48.at("layers.1.attn.indexer.wq_b"), Format::fp8);
  EXPECT_EQ(f48.at("mtp.e_proj"), Format::fp8);
  const ModelConfig c = tessera::testing::tiny_v4_config();
  EXPECT_EQ(n_fp4, 3 * (c.n_layers + c.mtp_depth));  // w1, w2, w3 of every MoE (main layers and the MTP block)
  EXPECT_GT(n_fp8, 0);
}

// FP8: a 130 x 260 matrix (2 x 3 tiles, partial ones at the edges) whose tiles have hand-picked scales.
TEST(Qat, Fp8HandPickedBlocks) {
  Param p = make_param("layers.0.attn.wq", ParamKind::matrix, {130, 260}, DType::f32);
  float* w = p.value.data<float>();
  auto at = [&](int64_t r, int64_t c) -> float& { return w[r * 260 + c]; };
  // Tile (0, 0): amax 448 2^-10 -> scale 2^-10. 0.01 = 10.24 2^-10 -> e4m3 10 (spacing 1 in [8, 16)).
  at(0, 0) = 0.4375f, at(5, 7) = 0.01f;
  // Tile (0, 1): amax 1 -> scale 2^-8 (448 2^-9 = 0.875 < 1 <= 1.75). 0.3 = 76.8 2^-8 -> 80 (spacing 8 in
  // [64, 128)); 0.001 = 0.256 2^-8 -> 0.25 2^-8 (spacing 2^-5 in [0.25, 0.5)).
  at(1, 128) = 1.0f, at(2, 130) = 0.3f, at(3, 131) = 0.001f;
  // Tile (1, 2) (rows 128-129, cols 256-259): amax 3 -> scale 2^-7 (448 2^-8 = 1.75 < 3 <= 3.5); 0.1 = 12.8 2^-7
  // -> 13 (spacing 1 in [8, 16)); -2.9 = -371.2 2^-7 -> -384 (spacing 32 in [256, 448]).
  at(128, 256) = 3.0f, at(129, 259) = 0.1f, at(128, 257) = -2.9f;
  const std::vector<float> master = values_of(p.value);
  {
    FakeQuantWeights scope({&p}, Mode::fp4_fp8);
    EXPECT_TRUE(scope.active());
    EXPECT_EQ(scope.stats().fp8_tensors, 1);
    EXPECT_EQ(at(0, 0), 0.4375f);
    EXPECT_EQ(at(5, 7), std::ldexp(10.0f, -10));
    EXPECT_EQ(at(1, 128), 1.0f);
    EXPECT_EQ(at(2, 130), std::ldexp(80.0f, -8));
    EXPECT_EQ(at(3, 131), std::ldexp(0.25f, -8));
    EXPECT_EQ(at(128, 256), 3.0f);
    EXPECT_EQ(at(129, 259), std::ldexp(13.0f, -7));
    EXPECT_EQ(at(128, 257), std::ldexp(-384.0f, -7));
    EXPECT_EQ(at(100, 100), 0.0f);
    EXPECT_TRUE(bitwise_equal(p.value, expected_quantized(master, p.value.shape(), Format::fp8)));
  }
  EXPECT_TRUE(bitwise_equal(p.value, master));
}

// FP4: a routed expert's [E = 2, 4, 64] weight, 1 x 32 blocks along the input dimension, each expert's own
// matrix; the FP8 requantisation is exact here (spread <= 14), so the values are the FP4 ones.
TEST(Qat, Fp4HandPickedBlocks) {
  Param p = make_param("layers.1.ffn.experts.w1", ParamKind::matrix, {2, 4, 64}, DType::f32);
  float* w = p.value.data<float>();
  auto at = [&](int64_t e, int64_t r, int64_t c) -> float& { return w[(e * 4 + r) * 64 + c]; };
  // Expert 0, row 0, block 0: amax 0.75 = 6 2^-3 -> scale 2^-3: 0.3 = 2.4 2^-3 -> 2 (0.25); 0.1 = 0.8 2^-3 -> 1
  // (0.125); 0.05 = 0.4 2^-3 -> 0.5 (0.0625).
  at(0, 0, 0) = 0.75f, at(0, 0, 5) = 0.3f, at(0, 0, 6) = 0.1f, at(0, 0, 7) = 0.05f;
  // Expert 0, row 0, block 1: amax 3 -> scale 2^-1 (6 2^-2 = 1.5 < 3 <= 3): 1.3 = 2.6 2^-1 -> 3 (1.5); -0.2 =
  // -0.4 2^-1 -> -0.5 (-0.25); 2.5 = 5 2^-1 -> 4 (2; the tie 5 between 4 and 6 goes to the even code, 4).
  at(0, 0, 32) = 3.0f, at(0, 0, 40) = 1.3f, at(0, 0, 41) = -0.2f, at(0, 0, 42) = 2.5f;
  // Expert 1, row 3, block 0: amax 0.01 -> scale 2^-9 (6 2^-10 < 0.01 <= 6 2^-9 = 0.0117): 0.01 = 5.12 2^-9 -> 6.
  at(1, 3, 3) = 0.01f;
  const std::vector<float> master = values_of(p.value);
  {
    FakeQuantWeights scope({&p}, Mode::fp4_fp8);
    EXPECT_EQ(scope.stats().fp4_tensors, 1);
    EXPECT_EQ(scope.stats().lossy_fp4_matrices, 0);
    EXPECT_EQ(at(0, 0, 0), 0.75f);
    EXPECT_EQ(at(0, 0, 5), 0.25f);
    EXPECT_EQ(at(0, 0, 6), 0.125f);
    EXPECT_EQ(at(0, 0, 7), 0.0625f);
    EXPECT_EQ(at(0, 0, 32), 3.0f);
    EXPECT_EQ(at(0, 0, 40), 1.5f);
    EXPECT_EQ(at(0, 0, 41), -0.25f);
    EXPECT_EQ(at(0, 0, 42), 2.0f);
    EXPECT_EQ(at(1, 3, 3), std::ldexp(6.0f, -9));
    // The plain FP4 round trip (ops/quant.h), since the requantisation is exact.
    std::vector<double> x(master.begin(), master.end());
    const std::vector<double> fp4 = quant::dequantize(quant::quantize_fp4(x, 8, 64, 32));
    for (size_t i = 0; i < fp4.size(); ++i) ASSERT_EQ(p.value.data<float>()[i], float(fp4[i])) << i;
  }
  EXPECT_TRUE(bitwise_equal(p.value, master));
  // Under "fp8" the same expert weight is FP8: 1.3 in a tile of amax 3 (scale 2^-7) -> 166.4 -> 160 (spacing 16
  // in [128, 256)).
  FakeQuantWeights scope8({&p}, Mode::fp8);
  EXPECT_EQ(scope8.stats().fp8_tensors, 1);
  EXPECT_EQ(at(0, 0, 40), std::ldexp(160.0f, -7));
}

// Beyond the spec's lossless range the FP4 -> FP8 requantisation rounds, and the scope keeps that rounding (as
// V4's FP8 GEMM sees it); it is counted.
TEST(Qat, Fp4ToFp8RoundingIsKeptAndCounted) {
  Param p = make_param("layers.0.ffn.experts.w2", ParamKind::matrix, {1, 1, 64}, DType::f32);
  float* w = p.value.data<float>();
  w[0] = 6.0f * 1024.0f;                    // block 0 scale 2^10
  w[32] = float(std::ldexp(0.5, -6));      // block 1 scale 2^-7: spread 17 > 14
  FakeQuantWeights scope({&p}, Mode::fp4_fp8);
  EXPECT_EQ(scope.stats().lossy_fp4_matrices, 1);
  EXPECT_EQ(w[0], 6.0f * 1024.0f);
  // The tile's scale is 2^4 (448 2^4 >= 6144): 2^-7 is 2^-11 there, below half the smallest e4m3 subnormal 2^-9.
  EXPECT_EQ(w[32], 0.0f);
}

// Every eligible weight of a randomised tiny V4 model holds quantise-dequantise of its master inside the scope,
// every other parameter and buffer is bitwise untouched, and everything is bitwise the master after it.
TEST(Qat, V4ScopeQuantizesEligibleRestoresAll) {
  V4Model model(tessera::testing::tiny_v4_config());
  tessera::testing::randomize_v4(model, 3);
  std::vector<std::vector<float>> before;
  ParamList saved = model.saved_tensors();
  for (Param* p : saved) before.push_back(p->value.dtype() == DType::f32 ? values_of(p->value) : std::vector<float>());
  {
    FakeQuantWeights scope(model.params(), Mode::fp4_fp8);
    int changed = 0;
    for (size_t i = 0; i < saved.size(); ++i) {
      Param* p = saved[i];
      if (p->value.dtype() != DType::f32) continue;
      const Format f = weight_format(*p, Mode::fp4_fp8);
      bool is_param = false;
      for (Param* q : model.params()) is_param |= q == p;
      if (f == Format::none || !is_param) {
        EXPECT_TRUE(bitwise_equal(p->value, before[i])) << p->name;
      } else {
        EXPECT_TRUE(bitwise_equal(p->value, expected_quantized(before[i], p->value.shape(), f))) << p->name;
        changed += !bitwise_equal(p->value, before[i]);
      }
    }
    EXPECT_EQ(changed, scope.stats().fp4_tensors + scope.stats().fp8_tensors);
    EXPECT_EQ(scope.stats().lossy_fp4_matrices, 0);
    scope.restore();
    scope.restore();  // idempotent
    EXPECT_FALSE(scope.active());
  }
  for (size_t i = 0; i < saved.size(); ++i)
    if (saved[i]->value.dtype() == DType::f32) {
      EXPECT_TRUE(bitwise_equal(saved[i]->value, before[i])) << saved[i]->name;
    }
}

TEST(Qat, OffIsANoOp) {
  DenseModel model(tiny_dense_config());
  model.init(1);
  std::vector<std::vector<float>> before;
  for (Param* p : model.params()) before.push_back(values_of(p->value));
  FakeQuantWeights scope(model.params(), Mode::off);
  EXPECT_FALSE(scope.active());
  for (size_t i = 0; i < before.size(); ++i) EXPECT_TRUE(bitwise_equal(model.params()[i]->value, before[i]));
}

// Quantising quantised weights changes nothing, for both formats.
TEST(Qat, QuantizeIsIdempotent) {
  for (Mode mode : {Mode::fp8, Mode::fp4_fp8}) {
    V4Model model(tessera::testing::tiny_v4_config());
    tessera::testing::randomize_v4(model, 5);
    const Stats first = quantize_in_place(model.params(), mode);
    EXPECT_GT(first.fp8_tensors, 0);
    EXPECT_EQ(first.fp4_tensors > 0, mode == Mode::fp4_fp8);
    std::vector<std::vector<float>> once;
    for (Param* p : model.params()) once.push_back(values_of(p->value));
    quantize_in_place(model.params(), mode);
    for (size_t i = 0; i < once.size(); ++i)
      EXPECT_TRUE(bitwise_equal(model.params()[i]->value, once[i])) << model.params()[i]->name << " " << mode_name(mode);
    FakeQuantWeights scope(model.params(), mode);
    for (size_t i = 0; i < once.size(); ++i) EXPECT_TRUE(bitwise_equal(model.params()[i]->value, once[i]));
  }
}

namespace {

// Gradients of `model` on `batch` (zeroed first), as float vectors per parameter.
std::vector<std::vector<float>> gradients(Model& model, const TokenBatch& batch) {
  model.zero_grad();
  model.forward_backward(batch, 0.5);
  std::vector<std::vector<float>> g;
  for (Param* p : model.params()) g.push_back(values_of(p->grad));
  return g;
}

// The straight-through estimator on one architecture: (a) the gradient inside the scope equals, bitwise, the
// gradient of a second model whose weights were quantised by hand; (b) it differs from the fp32 gradient; (c) the
// scope's model holds its masters again afterwards, and an SGD step on them moves the masters by the quantised
// gradient.
void check_ste(Model& a, Model& b, const TokenBatch& batch, Mode mode) {
  std::vector<std::vector<float>> masters;
  for (Param* p : a.params()) masters.push_back(values_of(p->value));
  const auto g_fp32 = gradients(a, batch);
  std::vector<std::vector<float>> g_ste;
  {
    FakeQuantWeights scope(a.params(), mode);
    g_ste = gradients(a, batch);
  }
  for (size_t i = 0; i < masters.size(); ++i) ASSERT_TRUE(bitwise_equal(a.params()[i]->value, masters[i]));
  quantize_in_place(b.params(), mode);
  const auto g_hand = gradients(b, batch);
  double max_diff = 0;
  for (size_t i = 0; i < g_ste.size(); ++i) {
    EXPECT_EQ(g_ste[i], g_hand[i]) << a.params()[i]->name;
    for (size_t j = 0; j < g_ste[i].size(); ++j) max_diff = std::max(max_diff, double(std::abs(g_ste[i][j] - g_fp32[i][j])));
  }
  EXPECT_GT(max_diff, 1e-4) << "the quantised gradient should differ from the fp32 one";
  // The optimizer's view: after the scope the update applies to the masters.
  const float lr = 0.1f;
  {
    FakeQuantWeights scope(a.params(), mode);
    a.zero_grad();
    a.forward_backward(batch, 0.5);
  }
  for (size_t i = 0; i < masters.size(); ++i) {
    Param* p = a.params()[i];
    ASSERT_TRUE(bitwise_equal(p->value, masters[i])) << p->name;  // the masters ...
    ASSERT_TRUE(bitwise_equal(p->grad, g_ste[i])) << p->name;     // ... and the quantised weights' gradient
    for (int64_t j = 0; j < p->value.numel(); ++j) p->value.data<float>()[j] -= lr * p->grad.data<float>()[j];
    for (int64_t j = 0; j < p->value.numel(); ++j)
      ASSERT_NEAR(p->value.data<float>()[j], masters[i][size_t(j)] - lr * g_ste[i][size_t(j)], 1e-6) << p->name;
  }
}

}  // namespace

TEST(Qat, StraightThroughGradientDense) {
  DenseModel a(tiny_dense_config()), b(tiny_dense_config());
  a.init(7), b.init(7);
  const TokenBatch batch = tessera::testing::random_token_batch(2, 6, 11, 3);
  check_ste(a, b, batch, Mode::fp8);
}

TEST(Qat, StraightThroughGradientV4) {
  const ModelConfig c = tessera::testing::tiny_v4_config();
  V4Model a(c), b(c);
  tessera::testing::randomize_v4(a, 11);
  tessera::testing::randomize_v4(b, 11);
  const TokenBatch batch = tessera::testing::tiny_v4_batch(c.vocab_size, 4);
  check_ste(a, b, batch, Mode::fp4_fp8);
}
