// The V4 mHC, Hadamard and quantisation-simulation ops: backward vs fp64 finite differences and fp32 vs fp64
// (check_op), and forward properties against values computed independently here: closed forms worked by hand,
// an explicitly built Sylvester matrix, and nearest-value searches over every code of e2m1 and e4m3.
#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <string>
#include <vector>

#include "backend/backend.h"
#include "op_harness.h"
#include "ops/v4_ops.h"

using namespace tessera;
using namespace tessera::testing;

namespace {

constexpr double kEps = 1e-6;

Tensor from_values(const std::vector<double>& v, const Shape& shape, DType dtype = DType::f64) {
  Tensor t = Tensor::empty(shape, DType::f64);
  EXPECT_EQ(int64_t(v.size()), t.numel());
  std::copy(v.begin(), v.end(), t.data<double>());
  return dtype == DType::f64 ? t : t.to(dtype);
}

std::vector<double> values(const Tensor& t) {
  std::vector<double> v(t.numel());
  for (int64_t i = 0; i < t.numel(); ++i) v[i] = value_at(t, i);
  return v;
}

std::string dtype_label(DType dt) { return dt == DType::f32 ? "f32" : "f64"; }

// ---------------------------------------------------------------- hc_gates

OpCase gates_case(int64_t n, bool block, int64_t iters) {
  int64_t N = 3, M = block ? 2 * n + n * n : n;
  OpCase c;
  c.name = std::string(block ? "hc_gates block" : "hc_gates head") + " n=" + std::to_string(n) +
           " iters=" + std::to_string(iters);
  c.inputs = {random_tensor({N, M}, 11), block ? from_values({0.7, -0.9, 1.3}, {3}) : from_values({0.8}, {1}),
              random_tensor({M}, 13, 0.5)};
  c.differentiable = {true, true, true};
  c.n_loss_outputs = block ? 3 : 1;
  c.forward = [=](const Tensors& in) {
    DType dt = in[0].dtype();
    Tensor pre = Tensor::empty({N, n}, dt);
    Tensor post = block ? Tensor::empty({N, n}, dt) : Tensor(), comb = block ? Tensor::empty({N, n, n}, dt) : Tensor();
    ops::hc_gates_forward(in[0], in[1], in[2], iters, kEps, pre, post, comb);
    return block ? Tensors{pre, post, comb} : Tensors{pre};
  };
  c.backward = [=](const Tensors& in, const Tensors&, const Tensors& d) {
    Tensor dmix = like_zeros(in[0]), dscale = like_zeros(in[1]), dbase = like_zeros(in[2]);
    ops::hc_gates_backward(in[0], in[1], in[2], iters, kEps, d[0], block ? d[1] : Tensor(), block ? d[2] : Tensor(),
                           dmix, dscale, dbase);
    return Tensors{dmix, dscale, dbase};
  };
  return c;
}

TEST(V4MhcOps, HcGatesGradient) {
  check_op(gates_case(4, true, 20));
  check_op(gates_case(4, true, 3));
  check_op(gates_case(4, true, 1));
  check_op(gates_case(4, false, 20));
}

TEST(V4MhcOps, HcGatesParameterGradientsAccumulate) {
  Tensor mix = random_tensor({5, 24}, 21), scale = from_values({0.5, 1.0, 1.5}, {3}), base = random_tensor({24}, 22);
  Tensor dpre = random_tensor({5, 4}, 23), dpost = random_tensor({5, 4}, 24), dcomb = random_tensor({5, 4, 4}, 25);
  Tensor dmix = like_zeros(mix), dscale = like_zeros(scale), dbase = like_zeros(base);
  ops::hc_gates_backward(mix, scale, base, 20, kEps, dpre, dpost, dcomb, dmix, dscale, dbase);
  Tensor dscale1 = dscale.clone(), dbase1 = dbase.clone(), dmix1 = dmix.clone();
  ops::hc_gates_backward(mix, scale, base, 20, kEps, dpre, dpost, dcomb, dmix, dscale, dbase);
  for (int64_t i = 0; i < 3; ++i) EXPECT_DOUBLE_EQ(value_at(dscale, i), 2 * value_at(dscale1, i));
  for (int64_t i = 0; i < 24; ++i) EXPECT_DOUBLE_EQ(value_at(dbase, i), 2 * value_at(dbase1, i));
  EXPECT_EQ(values(dmix), values(dmix1)) << "dmix is assigned, not accumulated";
}

class HcGatesTyped : public ::testing::TestWithParam<DType> {};

TEST_P(HcGatesTyped, CombIsDoublyStochasticAndGatesInRange) {
  DType dt = GetParam();
  const int64_t N = 32, n = 4, M = 24;
  // Logits of std ~1. Sinkhorn converges at a rate set by the matrix: with logit std 1.4 about 8% of random
  // 4x4 cases still have a row off by more than 1e-5 after 20 rounds (checked in Python), so the spread is kept ~1.
  Tensor mix = random_tensor({N, M}, 31, 1.0, dt), scale = from_values({1.0, 1.0, 1.0}, {3}, dt),
         base = random_tensor({M}, 32, 0.1, dt);
  Tensor pre = Tensor::empty({N, n}, dt), post = Tensor::empty({N, n}, dt), comb = Tensor::empty({N, n, n}, dt);
  ops::hc_gates_forward(mix, scale, base, 20, kEps, pre, post, comb);
  // fp32 stores the fp64 result rounded; rounding is monotone, so the bound is the rounded 1 + eps.
  double pre_max = dt == DType::f32 ? double(float(1 + kEps)) : 1 + kEps;
  for (int64_t i = 0; i < N; ++i) {
    for (int64_t j = 0; j < n; ++j) {
      double p = value_at(pre, i * n + j), q = value_at(post, i * n + j);
      EXPECT_GT(p, 0.0);
      EXPECT_LE(p, pre_max);
      EXPECT_GT(q, 0.0);
      EXPECT_LT(q, 2.0);
    }
    for (int64_t a = 0; a < n; ++a) {
      double row = 0, col = 0;
      for (int64_t b = 0; b < n; ++b) {
        EXPECT_GT(value_at(comb, (i * n + a) * n + b), 0.0);
        row += value_at(comb, (i * n + a) * n + b);
        col += value_at(comb, (i * n + b) * n + a);
      }
      EXPECT_NEAR(row, 1.0, 1e-5) << "token " << i << " row " << a;
      EXPECT_NEAR(col, 1.0, 1e-5) << "token " << i << " column " << a;
    }
  }
}

// n = 2 (M = 8: pre0 pre1 post0 post1 R00 R01 R10 R11) with R = [[ln 3, 0], [0, 0]], so the row softmax is
// [[3/4, 1/4], [1/2, 1/2]]. With eps = 0: one iteration (column step only) gives [[3/5, 1/3], [2/5, 2/3]]; a
// second round (rows: sums 14/15 and 16/15, then columns: sums 57/56 and 55/56) gives [[12/19, 4/11], [7/19, 7/11]].
TEST_P(HcGatesTyped, HandWorkedSinkhorn) {
  DType dt = GetParam();
  double tol = dt == DType::f32 ? 1e-6 : 1e-14, ln3 = std::log(3.0);
  Tensor mix = from_values({0, 0, 0, 0, ln3, 0, 0, 0}, {1, 8}, dt), scale = from_values({1, 1, 1}, {3}, dt);
  Tensor base = from_values({ln3, 0, -ln3, 0, 0, 0, 0, 0}, {8}, dt);
  auto run = [&](int64_t iters, double eps) {
    Tensor pre = Tensor::empty({1, 2}, dt), post = Tensor::empty({1, 2}, dt), comb = Tensor::empty({1, 2, 2}, dt);
    ops::hc_gates_forward(mix, scale, base, iters, eps, pre, post, comb);
    EXPECT_NEAR(value_at(pre, 0), 0.75 + eps, tol);  // sigmoid(ln 3) = 3/4
    EXPECT_NEAR(value_at(pre, 1), 0.5 + eps, tol);
    EXPECT_NEAR(value_at(post, 0), 0.5, tol);  // 2 sigmoid(-ln 3) = 2/4
    EXPECT_NEAR(value_at(post, 1), 1.0, tol);
    return values(comb);
  };
  auto expect_comb = [&](const std::vector<double>& got, const std::vector<double>& want, const char* what) {
    for (int q = 0; q < 4; ++q) EXPECT_NEAR(got[q], want[q], tol) << what << " element " << q;
  };
  expect_comb(run(1, 0.0), {3.0 / 5, 1.0 / 3, 2.0 / 5, 2.0 / 3}, "iters=1 eps=0");
  expect_comb(run(2, 0.0), {12.0 / 19, 4.0 / 11, 7.0 / 19, 7.0 / 11}, "iters=2 eps=0");

  // eps = 0.01 (large enough that a misplaced eps shows), step by step: C = softmax + e, then columns, rows, columns.
  double e = 0.01, a = 0.75 + e, b = 0.25 + e, c = 0.5 + e, d = 0.5 + e;
  double c0 = a + c + e, c1 = b + d + e;
  a /= c0, c /= c0, b /= c1, d /= c1;
  expect_comb(run(1, e), {a, b, c, d}, "iters=1 eps=0.01");
  double r0 = a + b + e, r1 = c + d + e;
  a /= r0, b /= r0, c /= r1, d /= r1;
  c0 = a + c + e, c1 = b + d + e;
  a /= c0, c /= c0, b /= c1, d /= c1;
  expect_comb(run(2, e), {a, b, c, d}, "iters=2 eps=0.01");
}

INSTANTIATE_TEST_SUITE_P(Dtypes, HcGatesTyped, ::testing::Values(DType::f32, DType::f64),
                         [](const auto& info) { return dtype_label(info.param); });

TEST(V4MhcOps, HcGatesRejectsBadLayouts) {
  Tensor pre = Tensor::empty({2, 4}, DType::f64), post = Tensor::empty({2, 4}, DType::f64);
  Tensor comb = Tensor::empty({2, 4, 4}, DType::f64), scale = from_values({1, 1, 1}, {3});
  Tensor mix = random_tensor({2, 23}, 1), base = random_tensor({23}, 2);
  try {
    ops::hc_gates_forward(mix, scale, base, 20, kEps, pre, post, comb);
    FAIL() << "expected an error";
  } catch (const Error& err) {
    EXPECT_NE(std::string(err.what()).find("M = 2n + n*n"), std::string::npos) << err.what();
  }
  Tensor mix24 = random_tensor({2, 24}, 1), base24 = random_tensor({24}, 2);
  EXPECT_THROW(ops::hc_gates_forward(mix24, scale, base24, 0, kEps, pre, post, comb), Error);  // iters 0
  EXPECT_THROW(ops::hc_gates_forward(mix24, from_values({1}, {1}), base24, 20, kEps, pre, post, comb), Error);
}

// ---------------------------------------------------------------- hc_collapse, hc_expand

TEST(V4MhcOps, HcCollapseGradient) {
  OpCase c;
  c.name = "hc_collapse";
  c.inputs = {random_tensor({3, 4, 5}, 41), random_tensor({3, 4}, 42)};
  c.differentiable = {true, true};
  c.forward = [](const Tensors& in) {
    Tensor y = Tensor::empty({3, 5}, in[0].dtype());
    ops::hc_collapse_forward(in[0], in[1], y);
    return Tensors{y};
  };
  c.backward = [](const Tensors& in, const Tensors&, const Tensors& d) {
    Tensor dx = like_zeros(in[0]), dw = like_zeros(in[1]);
    ops::hc_collapse_backward(in[0], in[1], d[0], dx, dw);
    return Tensors{dx, dw};
  };
  check_op(c);
}

TEST(V4MhcOps, HcExpandGradient) {
  OpCase c;
  c.name = "hc_expand";
  c.inputs = {random_tensor({3, 4, 5}, 51), random_tensor({3, 5}, 52), random_tensor({3, 4}, 53),
              random_tensor({3, 4, 4}, 54)};
  c.differentiable = {true, true, true, true};
  c.forward = [](const Tensors& in) {
    Tensor out = Tensor::empty({3, 4, 5}, in[0].dtype());
    ops::hc_expand_forward(in[0], in[1], in[2], in[3], out);
    return Tensors{out};
  };
  c.backward = [](const Tensors& in, const Tensors&, const Tensors& d) {
    Tensor dx = like_zeros(in[0]), df = like_zeros(in[1]), dpost = like_zeros(in[2]), dcomb = like_zeros(in[3]);
    ops::hc_expand_backward(in[0], in[1], in[2], in[3], d[0], dx, df, dpost, dcomb);
    return Tensors{dx, df, dpost, dcomb};
  };
  check_op(c);
}

TEST(V4MhcOps, HcCollapseAndExpandMatchFormulas) {
  const int64_t N = 2, n = 3, d = 4;
  Tensor x = random_tensor({N, n, d}, 61), w = random_tensor({N, n}, 62), f = random_tensor({N, d}, 63),
         post = random_tensor({N, n}, 64), comb = random_tensor({N, n, n}, 65);
  Tensor y = Tensor::empty({N, d}, DType::f64), out = Tensor::empty({N, n, d}, DType::f64);
  ops::hc_collapse_forward(x, w, y);
  ops::hc_expand_forward(x, f, post, comb, out);
  auto X = [&](int64_t i, int64_t j, int64_t c) { return value_at(x, (i * n + j) * d + c); };
  for (int64_t i = 0; i < N; ++i)
    for (int64_t c = 0; c < d; ++c) {
      double want = 0;
      for (int64_t j = 0; j < n; ++j) want += value_at(w, i * n + j) * X(i, j, c);
      EXPECT_NEAR(value_at(y, i * d + c), want, 1e-13);
      for (int64_t k = 0; k < n; ++k) {
        double o = value_at(post, i * n + k) * value_at(f, i * d + c);
        for (int64_t j = 0; j < n; ++j) o += value_at(comb, (i * n + j) * n + k) * X(i, j, c);
        EXPECT_NEAR(value_at(out, (i * n + k) * d + c), o, 1e-13);
      }
    }
}

// ---------------------------------------------------------------- hadamard

// Sylvester's construction: H_1 = [1], H_2m = [[H_m, H_m], [H_m, -H_m]].
std::vector<double> sylvester(int64_t D) {
  std::vector<double> H{1.0};
  for (int64_t m = 1; m < D; m *= 2) {
    std::vector<double> next(4 * m * m);
    for (int64_t i = 0; i < m; ++i)
      for (int64_t j = 0; j < m; ++j) {
        double h = H[i * m + j];
        next[i * 2 * m + j] = h;
        next[i * 2 * m + j + m] = h;
        next[(i + m) * 2 * m + j] = h;
        next[(i + m) * 2 * m + j + m] = -h;
      }
    H = std::move(next);
  }
  return H;
}

class HadamardTyped : public ::testing::TestWithParam<DType> {};

TEST_P(HadamardTyped, MatchesSylvesterMatrixAndIsItsOwnInverse) {
  DType dt = GetParam();
  double tol = dt == DType::f32 ? 1e-5 : 1e-13;
  for (int64_t D : {8, 128}) {
    SCOPED_TRACE("D = " + std::to_string(D));
    const int64_t rows = 3;
    Tensor x = random_tensor({rows, D}, 71, 1.0, dt), out = Tensor::empty({rows, D}, dt);
    ops::hadamard(x, out);
    std::vector<double> H = sylvester(D);
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t k = 0; k < D; ++k) {
        double want = 0;
        for (int64_t c = 0; c < D; ++c) want += value_at(x, r * D + c) * H[c * D + k];
        EXPECT_NEAR(value_at(out, r * D + k), want / std::sqrt(double(D)), tol) << "row " << r << " col " << k;
      }
    Tensor back = out.clone();
    ops::hadamard(back, back);  // in place
    EXPECT_LE(max_rel_diff(back, x), tol);
  }
}

INSTANTIATE_TEST_SUITE_P(Dtypes, HadamardTyped, ::testing::Values(DType::f32, DType::f64),
                         [](const auto& info) { return dtype_label(info.param); });

TEST(V4MhcOps, HadamardGradient) {
  OpCase c;
  c.name = "hadamard";
  c.inputs = {random_tensor({2, 3, 16}, 81)};
  c.differentiable = {true};
  c.forward = [](const Tensors& in) {
    Tensor out = Tensor::empty(in[0].shape(), in[0].dtype());
    ops::hadamard(in[0], out);
    return Tensors{out};
  };
  c.backward = [](const Tensors& in, const Tensors&, const Tensors& d) {
    Tensor dx = like_zeros(in[0]);
    ops::hadamard(d[0], dx);  // symmetric and orthonormal: the backward is the same transform
    return Tensors{dx};
  };
  check_op(c);
}

TEST(V4MhcOps, HadamardRejectsNonPowerOfTwo) {
  Tensor x = random_tensor({2, 6}, 1);
  EXPECT_THROW(ops::hadamard(x, x), Error);
}

// ---------------------------------------------------------------- FP4 / FP8 references

const double kE2m1[8] = {0, 0.5, 1, 1.5, 2, 3, 4, 6};

// The e4m3fn value of an 8-bit code (sign, 4 exponent bits with bias 7, 3 mantissa bits); NaN for S.1111.111.
double e4m3_decode(int code) {
  int e = (code >> 3) & 15, m = code & 7;
  if (e == 15 && m == 7) return std::numeric_limits<double>::quiet_NaN();
  double v = e == 0 ? std::ldexp(m / 8.0, -6) : std::ldexp(1 + m / 8.0, e - 7);
  return (code & 128) ? -v : v;
}

// Nearest value over a format's non-negative codes by exhaustive search; at equal distance the even code wins.
double nearest_code(double v, const std::vector<double>& codes) {
  double a = std::abs(v);
  size_t best = 0;
  for (size_t c = 1; c < codes.size(); ++c) {
    double dc = std::abs(a - codes[c]), db = std::abs(a - codes[best]);
    if (dc < db || (dc == db && c % 2 == 0)) best = c;
  }
  return std::copysign(codes[best], v);
}
const std::vector<double>& e2m1_codes() {
  static const std::vector<double> c(kE2m1, kE2m1 + 8);
  return c;
}
const std::vector<double>& e4m3_codes() {  // codes 0..126: every finite non-negative value, ascending
  static const std::vector<double> c = [] {
    std::vector<double> v;
    for (int code = 0; code < 127; ++code) v.push_back(e4m3_decode(code));
    return v;
  }();
  return c;
}

// The smallest power of two s with qmax * s >= amax (1 for 0), by doubling and halving.
double ref_scale(double amax, double qmax) {
  if (amax == 0) return 1;
  double s = 1;
  while (qmax * s < amax) s *= 2;
  while (qmax * s / 2 >= amax) s /= 2;
  return s;
}

// Fake quantisation of the first `dims` entries of each row of a (rows, D) array, blocks of `block`.
std::vector<double> ref_quant(const std::vector<double>& x, int64_t D, int64_t block, int64_t dims, double qmax,
                              const std::vector<double>& codes) {
  std::vector<double> out = x;
  int64_t qd = (dims < 0 || dims > D) ? D : dims;
  for (size_t r = 0; r < x.size() / D; ++r)
    for (int64_t b0 = 0; b0 < qd; b0 += block) {
      int64_t b1 = std::min(qd, b0 + block);
      double amax = 0;
      for (int64_t i = b0; i < b1; ++i) amax = std::max(amax, std::abs(x[r * D + i]));
      double s = ref_scale(amax, qmax);
      for (int64_t i = b0; i < b1; ++i) {
        EXPECT_LE(std::abs(x[r * D + i]) / s, qmax) << "a scaled value beyond the format's max";
        out[r * D + i] = nearest_code(x[r * D + i] / s, codes) * s;
      }
    }
  return out;
}

// Random rows whose blocks span many magnitudes (so scales vary from block to block).
std::vector<double> varied_values(int64_t rows, int64_t D, int64_t block, uint64_t seed) {
  std::vector<double> v = values(random_tensor({rows, D}, seed));
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < D; ++c) v[r * D + c] *= std::ldexp(1.3, int((r * 7 + c / block * 5) % 31) - 15);
  return v;
}

Tensor fp4(const Tensor& x, int64_t block) {
  Tensor out = Tensor::empty(x.shape(), x.dtype());
  ops::fake_quant_fp4(x, block, out);
  return out;
}
Tensor fp8(const Tensor& x, int64_t block, int64_t dims = -1) {
  Tensor out = Tensor::empty(x.shape(), x.dtype());
  ops::fake_quant_fp8(x, block, dims, out);
  return out;
}

std::vector<double> signed_e2m1(double limit = 6) {  // every e2m1 value with |v| <= limit, both signs, one 0
  std::vector<double> v{0.0};
  for (int c = 1; c < 8; ++c)
    if (kE2m1[c] <= limit) v.insert(v.end(), {kE2m1[c], -kE2m1[c]});
  return v;
}

class QuantTyped : public ::testing::TestWithParam<DType> {};

// ---------------------------------------------------------------- FP4

TEST_P(QuantTyped, Fp4GridTimesPowerOfTwoRoundTrips) {
  DType dt = GetParam();
  for (int s = -20; s <= 20; ++s) {
    std::vector<double> v = signed_e2m1();
    for (double& x : v) x = std::ldexp(x, s);
    Tensor alone = from_values(v, {1, int64_t(v.size())}, dt);  // block 1: each value sets its own scale
    EXPECT_EQ(values(fp4(alone, 1)), v) << "scale 2^" << s;
    v.resize(32, 0.0);  // block 32 holding 6 * 2^s: scale 2^s
    Tensor together = from_values(v, {1, 32}, dt);
    EXPECT_EQ(values(fp4(together, 32)), v) << "scale 2^" << s;
  }
}

TEST_P(QuantTyped, Fp4MidpointsRoundToEven) {
  DType dt = GetParam();
  // The block holds 6, so its scale is 1; then each midpoint between neighbours, and just either side of it.
  std::vector<double> x{6}, want{6};
  const double mids[7] = {0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5}, even[7] = {0, 1, 1, 2, 2, 4, 4};
  for (int i = 0; i < 7; ++i)
    for (double sign : {1.0, -1.0}) {
      x.push_back(sign * mids[i]);
      want.push_back(sign * even[i]);
      x.push_back(sign * mids[i] * (1 + 1e-6));
      want.push_back(sign * kE2m1[i + 1]);
      x.push_back(sign * mids[i] * (1 - 1e-6));
      want.push_back(sign * kE2m1[i]);
    }
  Tensor t = from_values(x, {1, int64_t(x.size())}, dt);
  EXPECT_EQ(values(fp4(t, int64_t(x.size()))), want);
}

TEST_P(QuantTyped, Fp4HandWorkedBlocks) {
  DType dt = GetParam();
  // Block 4. [0.3 -1.1 2.9 7]: amax 7, 7/6 -> scale 2; /2 = [.15 -.55 1.45 3.5] -> [0 -.5 1.5 4] (3.5 is a tie:
  // 4 has the even code) -> [0 -1 3 8]. [0 0 0 0]: scale 1. [.1 .2 -.05 .09]: amax .2, .2/6 = 1/30 -> scale 1/16;
  // *16 = [1.6 3.2 -.8 1.44] -> [1.5 3 -1 1.5] -> /16.
  Tensor x = from_values({0.3, -1.1, 2.9, 7, 0, 0, 0, 0, 0.1, 0.2, -0.05, 0.09}, {1, 12}, dt);
  std::vector<double> want{0, -1, 3, 8, 0, 0, 0, 0, 1.5 / 16, 3.0 / 16, -1.0 / 16, 1.5 / 16};
  EXPECT_EQ(values(fp4(x, 4)), want);
  // A row of 6 in blocks of 4: the last block is the 2 left over. [3 1 .5 12]: scale 2 -> [1.5 .5 .25 6] ->
  // [1.5 .5 0 6] (.25 ties to 0). [.7 -.35]: .7/6 -> scale 1/8; *8 = [5.6 -2.8] -> [6 -3].
  Tensor y = from_values({3, 1, 0.5, 12, 0.7, -0.35}, {1, 6}, dt);
  EXPECT_EQ(values(fp4(y, 4)), (std::vector<double>{3, 1, 0, 12, 0.75, -0.375}));
}

TEST_P(QuantTyped, Fp4MatchesNearestGridSearch) {
  DType dt = GetParam();
  const int64_t rows = 4, D = 96, block = 32;
  std::vector<double> x = varied_values(rows, D, block, 91);
  Tensor t = from_values(x, {rows, D}, dt);
  x = values(t);  // the values as stored in dt
  std::vector<double> want = ref_quant(x, D, block, -1, 6.0, e2m1_codes()), got = values(fp4(t, block));
  EXPECT_EQ(got, want);
  for (int64_t b = 0; b < rows * D / block; ++b) {  // the amax element lands on at most 6 * scale
    double amax = 0, qmax = 0;
    for (int64_t i = b * block; i < (b + 1) * block; ++i) {
      amax = std::max(amax, std::abs(x[i]));
      qmax = std::max(qmax, std::abs(got[i]));
    }
    EXPECT_LE(qmax, 6 * ref_scale(amax, 6.0)) << "block " << b;
  }
  Tensor in_place = t.clone();
  ops::fake_quant_fp4(in_place, block, in_place);
  EXPECT_EQ(values(in_place), got);
}

// ---------------------------------------------------------------- FP8

TEST_P(QuantTyped, Fp8EveryCodeRoundTrips) {
  DType dt = GetParam();
  for (int s = -20; s <= 20; ++s) {
    std::vector<double> v;
    for (int code = 0; code < 256; ++code)
      if (!std::isnan(e4m3_decode(code))) v.push_back(std::ldexp(e4m3_decode(code), s));
    ASSERT_EQ(v.size(), 254u);
    Tensor t = from_values(v, {1, 254}, dt);  // holds 448 * 2^s: scale 2^s
    EXPECT_EQ(values(fp8(t, 254)), v) << "scale 2^" << s;
  }
}

TEST_P(QuantTyped, Fp8MidpointsRoundToEven) {
  DType dt = GetParam();
  const std::vector<double>& codes = e4m3_codes();
  std::vector<double> x{448}, want{448};  // scale 1
  for (size_t c = 0; c + 1 < codes.size(); ++c) {
    double mid = (codes[c] + codes[c + 1]) / 2, even = codes[c % 2 == 0 ? c : c + 1];
    x.insert(x.end(), {mid, -mid});
    want.insert(want.end(), {even, -even});
  }
  Tensor t = from_values(x, {1, int64_t(x.size())}, dt);
  EXPECT_EQ(values(fp8(t, int64_t(x.size()))), want);
}

TEST_P(QuantTyped, Fp8ScaleRulesOutSaturation) {
  DType dt = GetParam();
  // 480 would round past 448 (to 512, not a finite e4m3 value) at scale 1; the scale 2 makes it 240, exact.
  // Just above 448 the scale doubles too: 448.5 / 2 = 224.25 -> 224 (step 16 in [128, 256)). 0.01 / 2 is a
  // subnormal: 0.005 / 2^-9 = 2.56 -> 3, so 3 * 2^-9 * 2.
  Tensor x = from_values({480, 1, -3, 0.01, 448.5, 1, -3, 0.01}, {2, 4}, dt);
  EXPECT_EQ(values(fp8(x, 4)), (std::vector<double>{480, 1, -3, 0.01171875, 448, 1, -3, 0.01171875}));
  // Random blocks over many magnitudes: equal to the nearest-code search, never beyond 448 * scale.
  const int64_t rows = 3, D = 256, block = 64;
  std::vector<double> v = varied_values(rows, D, block, 92);
  Tensor t = from_values(v, {rows, D}, dt);
  v = values(t);
  std::vector<double> got = values(fp8(t, block));
  EXPECT_EQ(got, ref_quant(v, D, block, -1, 448.0, e4m3_codes()));
  for (double g : got) EXPECT_TRUE(std::isfinite(g));
}

TEST_P(QuantTyped, Fp8DimsLeavesTheTailUntouched) {
  DType dt = GetParam();
  const int64_t rows = 2, D = 512, block = 64;
  std::vector<double> v = varied_values(rows, D, block, 93);
  Tensor t = from_values(v, {rows, D}, dt);
  v = values(t);
  std::vector<double> got = values(fp8(t, block, 448));
  EXPECT_EQ(got, ref_quant(v, D, block, 448, 448.0, e4m3_codes()));
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 448; c < D; ++c) EXPECT_EQ(got[r * D + c], v[r * D + c]) << "row " << r << " col " << c;
  EXPECT_NE(got, v);  // the head really was quantised
  std::vector<double> all = ref_quant(v, D, block, -1, 448.0, e4m3_codes());
  EXPECT_EQ(values(fp8(t, block, -1)), all);
  EXPECT_EQ(values(fp8(t, block, 1000)), all);
  EXPECT_EQ(values(fp8(t, block, 0)), v);
  // A partial last block (100 = 64 + 36) is its own block.
  Tensor p = from_values(std::vector<double>(v.begin(), v.begin() + 200), {2, 100}, dt);
  EXPECT_EQ(values(fp8(p, block)), ref_quant(values(p), 100, block, -1, 448.0, e4m3_codes()));
  Tensor in_place = t.clone();
  ops::fake_quant_fp8(in_place, block, 448, in_place);
  EXPECT_EQ(values(in_place), got);
}

TEST_P(QuantTyped, NonFiniteInputPoisonsOnlyItsBlock) {
  DType dt = GetParam();
  double inf = std::numeric_limits<double>::infinity();
  Tensor x = from_values({1, inf, 2, 3, 0.5, 1, 1.5, 6}, {1, 8}, dt);
  for (const std::vector<double>& got : {values(fp4(x, 4)), values(fp8(x, 4))}) {
    for (int i = 0; i < 4; ++i) EXPECT_TRUE(std::isnan(got[i])) << "element " << i;
    EXPECT_EQ(std::vector<double>(got.begin() + 4, got.end()), (std::vector<double>{0.5, 1, 1.5, 6}));
  }
}

// FP4 -> FP8 is lossless (spec §9 QAT) when the block-32 FP4 scales inside a 128 block are within 2^14 of the
// largest. k = 14: a sub-block at the largest FP4 scale 2^0 dequantises to an amax of 3, 4 or 6, so the FP8 scale
// is 2^ceil(log2(amax / 448)) = 2^-7 or 2^-6 (for 4 and 6), and the largest value becomes at most 6 * 2^6 = 384 <= 448.
// e2m1 values have 2 significant bits (e4m3 keeps 4), so only the bottom of the range matters: the smallest FP4
// step 0.5 * 2^-r must be a multiple of e4m3's smallest subnormal 2^-9 at the FP8 scale, 2^-9 * 2^-6 = 2^-15,
// i.e. r <= 14. At r = 15, 0.5 * 2^-15 / 2^-6 = 2^-10 is a tie between 0 and 2^-9, which goes to 0.
TEST_P(QuantTyped, Fp4ValuesAreExactInFp8WhenScaleRatiosAreAtMost2Pow14) {
  DType dt = GetParam();
  // Sub-block 0 at scale 2^0 with amax `top`; sub-blocks 1..3 at 2^-r, 2^-(r/2), 2^-(r - r/2), each holding every
  // e2m1 value; the whole 128 block shifted by 2^t, as the FP8 scale is a power of two too.
  auto build = [](double top, int r, int t) {
    std::vector<double> v;
    const int shifts[4] = {0, r, r / 2, r - r / 2};
    for (int b = 0; b < 4; ++b) {
      std::vector<double> sub = signed_e2m1(b == 0 ? top : 6);
      sub.resize(32, 0.0);
      for (double& x : sub) x = std::ldexp(x, t - shifts[b]);
      v.insert(v.end(), sub.begin(), sub.end());
    }
    return v;
  };
  const int k = 14;
  for (double top : {3.0, 4.0, 6.0})
    for (int r = 0; r <= k; ++r)
      for (int t : {-8, 0, 8}) {
        std::vector<double> v = build(top, r, t);
        Tensor x = from_values(v, {1, 128}, dt);
        ASSERT_EQ(values(fp4(x, 32)), v) << "not FP4 dequantised values: top " << top << " r " << r;
        EXPECT_EQ(values(fp8(x, 128)), v) << "top " << top << " ratio 2^" << r << " shift 2^" << t;
      }
  // k is tight: one more binade and the smallest FP4 step is lost.
  std::vector<double> v = build(6.0, k + 1, 0);
  Tensor x = from_values(v, {1, 128}, dt);
  ASSERT_EQ(values(fp4(x, 32)), v);
  EXPECT_NE(values(fp8(x, 128)), v);
}

INSTANTIATE_TEST_SUITE_P(Dtypes, QuantTyped, ::testing::Values(DType::f32, DType::f64),
                         [](const auto& info) { return dtype_label(info.param); });

// ---------------------------------------------------------------- CUDA against CPU beyond check_op's small cases
// (skipped without a GPU): the quantisation simulations bit for bit, the Hadamard transform (shared-memory and
// global-scratch paths, in place), and the gates, collapse and expand at sizes past one thread block.

Tensor on_gpu(const Tensor& t) { return t.defined() ? t.to_device(Device::cuda) : t; }
Tensor on_cpu(const Tensor& t) { return t.to_device(Device::cpu); }

TEST(V4MhcOps, CudaMatchesCpu) {
  if (!device_available(Device::cuda)) GTEST_SKIP() << "no CUDA device";
  for (DType dt : {DType::f32, DType::f64}) {
    SCOPED_TRACE(dtype_label(dt));
    double tol = dt == DType::f32 ? 1e-6 : 1e-12;
    // Quantisation: exact equality, full and partial blocks, dims, in place.
    Tensor x = from_values(varied_values(6, 512, 32, 95), {6, 512}, dt), xg = on_gpu(x);
    for (int64_t block : {32, 7, 128}) {
      Tensor og = Tensor::empty(x.shape(), dt, Device::cuda);
      ops::fake_quant_fp4(xg, block, og);
      EXPECT_EQ(values(on_cpu(og)), values(fp4(x, block))) << "fp4 block " << block;
      for (int64_t dims : {int64_t(-1), int64_t(448), int64_t(0)}) {
        ops::fake_quant_fp8(xg, block, dims, og);
        EXPECT_EQ(values(on_cpu(og)), values(fp8(x, block, dims))) << "fp8 block " << block << " dims " << dims;
      }
    }
    Tensor yg = on_gpu(x);
    ops::fake_quant_fp8(yg, 64, 448, yg);
    EXPECT_EQ(values(on_cpu(yg)), values(fp8(x, 64, 448))) << "fp8 in place";
    // Hadamard.
    for (int64_t D : {int64_t(1), int64_t(512), int64_t(8192)}) {
      Tensor h = random_tensor({3, D}, 96, 1.0, dt), want = Tensor::empty({3, D}, dt);
      ops::hadamard(h, want);
      Tensor hg = on_gpu(h);
      ops::hadamard(hg, hg);
      EXPECT_LE(max_rel_diff(on_cpu(hg), want), tol) << "hadamard D " << D;
    }
    // Gates, n = 3, 4, 8 (block) and the head, with every gradient and accumulation into nonzero dscale / dbase.
    for (int64_t n : {3, 4, 8, 0}) {
      bool block = n > 0;
      int64_t N = 300, nn = block ? n : 4, M = block ? 2 * n + n * n : nn;
      SCOPED_TRACE("gates n " + std::to_string(n));
      Tensor mix = random_tensor({N, M}, 97, 1.0, dt), base = random_tensor({M}, 98, 0.3, dt);
      Tensor scale = block ? from_values({0.7, -0.9, 1.3}, {3}, dt) : from_values({0.8}, {1}, dt);
      Tensor dpre = random_tensor({N, nn}, 99, 1.0, dt);
      Tensor dpost = block ? random_tensor({N, nn}, 100, 1.0, dt) : Tensor();
      Tensor dcomb = block ? random_tensor({N, nn, nn}, 101, 1.0, dt) : Tensor();
      Tensor pre = Tensor::empty({N, nn}, dt), post = block ? Tensor::empty({N, nn}, dt) : Tensor();
      Tensor comb = block ? Tensor::empty({N, nn, nn}, dt) : Tensor();
      Tensor dmix = Tensor::empty({N, M}, dt), dscale = random_tensor(scale.shape(), 102, 1.0, dt),
             dbase = random_tensor({M}, 103, 1.0, dt);
      Tensor gpre = on_gpu(pre), gpost = on_gpu(post), gcomb = on_gpu(comb), gdmix = on_gpu(dmix),
             gdscale = on_gpu(dscale), gdbase = on_gpu(dbase);
      ops::hc_gates_forward(mix, scale, base, 20, kEps, pre, post, comb);
      ops::hc_gates_backward(mix, scale, base, 20, kEps, dpre, dpost, dcomb, dmix, dscale, dbase);
      ops::hc_gates_forward(on_gpu(mix), on_gpu(scale), on_gpu(base), 20, kEps, gpre, gpost, gcomb);
      ops::hc_gates_backward(on_gpu(mix), on_gpu(scale), on_gpu(base), 20, kEps, on_gpu(dpre), on_gpu(dpost),
                             on_gpu(dcomb), gdmix, gdscale, gdbase);
      EXPECT_LE(max_rel_diff(on_cpu(gpre), pre), tol);
      if (block) {
        EXPECT_LE(max_rel_diff(on_cpu(gpost), post), tol);
        EXPECT_LE(max_rel_diff(on_cpu(gcomb), comb), tol);
      }
      EXPECT_LE(max_rel_diff(on_cpu(gdmix), dmix), tol);
      EXPECT_LE(max_rel_diff(on_cpu(gdscale), dscale), tol);
      EXPECT_LE(max_rel_diff(on_cpu(gdbase), dbase), tol);
    }
    // Collapse and expand with d past one block.
    const int64_t N = 5, n = 4, d = 1000;
    Tensor cx = random_tensor({N, n, d}, 104, 1.0, dt), w = random_tensor({N, n}, 105, 1.0, dt),
           f = random_tensor({N, d}, 106, 1.0, dt), post = random_tensor({N, n}, 107, 1.0, dt),
           comb = random_tensor({N, n, n}, 108, 1.0, dt), dy = random_tensor({N, d}, 109, 1.0, dt),
           dout = random_tensor({N, n, d}, 110, 1.0, dt);
    std::vector<Tensor> cpu_t = {Tensor::empty({N, d}, dt),    Tensor::empty({N, n, d}, dt), Tensor::empty({N, n}, dt),
                                 Tensor::empty({N, n, d}, dt), Tensor::empty({N, n, d}, dt), Tensor::empty({N, d}, dt),
                                 Tensor::empty({N, n}, dt),    Tensor::empty({N, n, n}, dt)};
    std::vector<Tensor> gpu_t;
    for (const Tensor& t : cpu_t) gpu_t.push_back(on_gpu(t));
    auto run = [&](const std::vector<Tensor>& o, auto to) {
      ops::hc_collapse_forward(to(cx), to(w), o[0]);
      ops::hc_collapse_backward(to(cx), to(w), to(dy), o[1], o[2]);
      ops::hc_expand_forward(to(cx), to(f), to(post), to(comb), o[3]);
      ops::hc_expand_backward(to(cx), to(f), to(post), to(comb), to(dout), o[4], o[5], o[6], o[7]);
    };
    run(cpu_t, [](const Tensor& t) { return t; });
    run(gpu_t, [](const Tensor& t) { return on_gpu(t); });
    for (size_t k = 0; k < cpu_t.size(); ++k) EXPECT_LE(max_rel_diff(on_cpu(gpu_t[k]), cpu_t[k]), tol) << "output " << k;
  }
}

}  // namespace
