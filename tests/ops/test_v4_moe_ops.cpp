// The V4 routing, token-movement and compressor ops: backward vs central finite differences (fp64), fp32 vs
// fp64, forwards against naive formulas written out here, hand-worked values, and selection properties.
#include <gtest/gtest.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <numeric>

#include "op_harness.h"
#include "ops/ops.h"
#include "ops/v4_ops.h"

using namespace tessera;
using namespace tessera::testing;

namespace {

const double kInf = std::numeric_limits<double>::infinity();

Tensor empty_like(const Tensor& t) { return Tensor::empty(t.shape(), t.dtype()); }
Tensor values(const std::vector<double>& v, const Shape& shape, DType dtype = DType::f64) {
  Tensor t = Tensor::empty(shape, DType::f64);
  EXPECT_EQ(int64_t(v.size()), t.numel());
  std::copy(v.begin(), v.end(), t.data<double>());
  return dtype == DType::f64 ? t : t.to(dtype);
}
// Positive scores (as the router's score functions give), away from 0 so normalisers are well conditioned.
Tensor positive_tensor(const Shape& shape, uint64_t seed) {
  Tensor t = random_tensor(shape, seed);
  for (int64_t i = 0; i < t.numel(); ++i) t.data<double>()[i] = 0.2 + std::abs(t.data<double>()[i]);
  return t;
}
std::vector<int32_t> ints(const Tensor& t) { return {t.data<int32_t>(), t.data<int32_t>() + t.numel()}; }
bool bitwise_equal(const Tensor& a, const Tensor& b) {
  return a.nbytes() == b.nbytes() && std::memcmp(a.raw(), b.raw(), a.nbytes()) == 0;
}

// ---------------------------------------------------------------- router scores

OpCase router_case(ops::ScoreFunc f, double std, const std::string& name) {
  OpCase c;
  c.name = "router_scores " + name;
  c.inputs = {random_tensor({5, 6}, 21, std)};
  c.differentiable = {true};
  c.forward = [=](const Tensors& in) {
    Tensor s = empty_like(in[0]);
    ops::router_scores_forward(in[0], f, s);
    return Tensors{s};
  };
  c.backward = [=](const Tensors& in, const Tensors& out, const Tensors& d) {
    Tensor dl = like_zeros(in[0]);
    ops::router_scores_backward(in[0], out[0], d[0], f, dl);
    return Tensors{dl};
  };
  return c;
}

}  // namespace

TEST(V4MoeOps, RouterScores) {
  check_op(router_case(ops::ScoreFunc::sqrt_softplus, 2.0, "sqrtsoftplus"));
  check_op(router_case(ops::ScoreFunc::sigmoid, 2.0, "sigmoid"));
  check_op(router_case(ops::ScoreFunc::softmax, 2.0, "softmax"));
  check_op(router_case(ops::ScoreFunc::sqrt_softplus, 20.0, "sqrtsoftplus (large logits)"));
}

TEST(V4MoeOps, RouterScoresMatchFormulas) {
  Tensor x = random_tensor({3, 4}, 22, 2.0);
  Tensor s0 = empty_like(x), s1 = empty_like(x), s2 = empty_like(x);
  ops::router_scores_forward(x, ops::ScoreFunc::sqrt_softplus, s0);
  ops::router_scores_forward(x, ops::ScoreFunc::sigmoid, s1);
  ops::router_scores_forward(x, ops::ScoreFunc::softmax, s2);
  for (int i = 0; i < 3; ++i) {
    double z = 0;
    for (int j = 0; j < 4; ++j) z += std::exp(value_at(x, i * 4 + j));
    for (int j = 0; j < 4; ++j) {
      double v = value_at(x, i * 4 + j);
      EXPECT_NEAR(value_at(s0, i * 4 + j), std::sqrt(std::log(1 + std::exp(v))), 1e-12);
      EXPECT_NEAR(value_at(s1, i * 4 + j), 1 / (1 + std::exp(-v)), 1e-12);
      EXPECT_NEAR(value_at(s2, i * 4 + j), std::exp(v) / z, 1e-12);
    }
  }
}

TEST(V4MoeOps, SqrtSoftplusIsStableAtLargeLogits) {
  std::vector<double> xs = {-30, 30, -100, 100, -800, 800, 0};
  int64_t n = int64_t(xs.size());
  for (DType dt : {DType::f64, DType::f32}) {
    Tensor x = values(xs, {1, n}, dt), s = empty_like(x), g = values(std::vector<double>(n, 1.0), {1, n}, dt);
    Tensor d = empty_like(x);
    ops::router_scores_forward(x, ops::ScoreFunc::sqrt_softplus, s);
    ops::router_scores_backward(x, s, g, ops::ScoreFunc::sqrt_softplus, d);
    for (int64_t i = 0; i < n; ++i) {
      double v = xs[i], sv = value_at(s, i), dv = value_at(d, i);
      ASSERT_TRUE(std::isfinite(sv) && std::isfinite(dv)) << "x=" << v << " " << dtype_name(dt);
      // softplus(x) = x + log1p(e^-x) ~ x for x >> 0 and ~ e^x for x << 0 (relative error ~ e^-|x|).
      double want = v > 0 ? std::sqrt(v) : std::exp(v / 2);
      if (v != 0 && v > -700) {
        EXPECT_NEAR(sv, want, 1e-6 * want) << "x=" << v;
      }
      if (dt == DType::f64) {
        // Central difference of the op's own forward, relative step: accurate to ~1e-8 relative here.
        double h = 1e-3;
        Tensor xp = values({v + h}, {1, 1}), xm = values({v - h}, {1, 1}), sp = empty_like(xp), sm = empty_like(xm);
        ops::router_scores_forward(xp, ops::ScoreFunc::sqrt_softplus, sp);
        ops::router_scores_forward(xm, ops::ScoreFunc::sqrt_softplus, sm);
        double fd = (value_at(sp, 0) - value_at(sm, 0)) / (2 * h);
        EXPECT_NEAR(dv, fd, 1e-6 * std::abs(fd) + 1e-300) << "x=" << v;
      }
    }
  }
}

// ---------------------------------------------------------------- top-k selection

namespace {

std::vector<int32_t> topk(const Tensor& scores, const Tensor& bias, int64_t k) {
  Tensor idx = Tensor::empty({scores.size(0), k}, DType::i32);
  ops::topk_indices(scores, bias, idx);
  return ints(idx);
}

}  // namespace

TEST(V4MoeOps, TopkTiesGoToTheLowerIndex) {
  for (DType dt : {DType::f64, DType::f32}) {
    Tensor s = values({1, 3, 3, 2, 3}, {1, 5}, dt);
    EXPECT_EQ(topk(s, Tensor(), 2), (std::vector<int32_t>{1, 2}));
    EXPECT_EQ(topk(s, Tensor(), 4), (std::vector<int32_t>{1, 2, 4, 3}));
    // A bias that makes every key 3: index order.
    Tensor b = values({2, 0, 0, 1, 0}, {5}, dt);
    EXPECT_EQ(topk(s, b, 5), (std::vector<int32_t>{0, 1, 2, 3, 4}));
  }
}

TEST(V4MoeOps, TopkSkipsMinusInfinityAndFillsMinusOne) {
  Tensor s = values({-kInf, 0.5, -kInf, 0.1,  //
                     -kInf, -kInf, -kInf, -kInf,  //
                     -1e30, 2.0, -kInf, 7.0},
                    {3, 4});
  EXPECT_EQ(topk(s, Tensor(), 3), (std::vector<int32_t>{1, 3, -1, -1, -1, -1, 3, 1, 0}));
  // k larger than E.
  EXPECT_EQ(topk(s.slice(0, 1), Tensor(), 6), (std::vector<int32_t>{1, 3, -1, -1, -1, -1}));
}

TEST(V4MoeOps, TopkBiasChangesTheSelection) {
  Tensor s = values({0.5, 0.4, 0.3}, {1, 3});
  EXPECT_EQ(topk(s, Tensor(), 1), (std::vector<int32_t>{0}));
  EXPECT_EQ(topk(s, values({0, 0, 0.3}, {3}), 1), (std::vector<int32_t>{2}));
  EXPECT_EQ(topk(s, values({0, 0.15, 0.3}, {3}), 2), (std::vector<int32_t>{2, 1}));  // keys 0.5, 0.55, 0.6
}

TEST(V4MoeOps, TopkMatchesAFullSort) {
  const int64_t N = 20, E = 9, k = 4;
  Tensor s = random_tensor({N, E}, 23), b = random_tensor({E}, 24, 0.3);
  for (int64_t i = 0; i < N; ++i) s.data<double>()[i * E + (i % E)] = -kInf;  // one invisible entry per row
  std::vector<int32_t> got = topk(s, b, k);
  for (int64_t i = 0; i < N; ++i) {
    std::vector<int32_t> order(E);
    std::iota(order.begin(), order.end(), 0);
    auto key = [&](int32_t j) { return value_at(s, i * E + j) + value_at(b, j); };
    std::stable_sort(order.begin(), order.end(), [&](int32_t a, int32_t c) { return key(a) > key(c); });
    for (int64_t j = 0; j < k; ++j) EXPECT_EQ(got[i * k + j], order[j]) << "row " << i << " slot " << j;
  }
}

TEST(V4MoeOps, RouteWeightsDoNotDependOnTheBias) {
  const int64_t N = 40, E = 8, k = 3;
  for (DType dt : {DType::f64, DType::f32}) {
    Tensor s = positive_tensor({N, E}, 25).to(dt), b0 = Tensor::zeros({E}, dt), b1 = random_tensor({E}, 26, 0.5, dt);
    Tensor i0 = Tensor::empty({N, k}, DType::i32), i1 = Tensor::empty({N, k}, DType::i32);
    ops::topk_indices(s, b0, i0);
    ops::topk_indices(s, b1, i1);
    for (bool normalize : {false, true}) {
      Tensor w0 = Tensor::empty({N, k}, dt), w1 = Tensor::empty({N, k}, dt);
      ops::route_weights_forward(s, i0, normalize, 2.5, w0);
      ops::route_weights_forward(s, i1, normalize, 2.5, w1);
      int changed_rows = 0, compared = 0;
      for (int64_t i = 0; i < N; ++i) {
        std::vector<int32_t> a(i0.data<int32_t>() + i * k, i0.data<int32_t>() + (i + 1) * k);
        std::vector<int32_t> c(i1.data<int32_t>() + i * k, i1.data<int32_t>() + (i + 1) * k);
        std::vector<int32_t> sa = a, sc = c;
        std::sort(sa.begin(), sa.end());
        std::sort(sc.begin(), sc.end());
        bool same_set = sa == sc;
        changed_rows += !same_set;
        // Without normalisation every expert selected in both keeps its weight; with it, rows whose selected
        // set is unchanged (possibly reordered) keep every weight.
        if (!normalize || same_set)
          for (int64_t j = 0; j < k; ++j)
            for (int64_t l = 0; l < k; ++l)
              if (a[j] == c[l]) {
                EXPECT_NEAR(value_at(w0, i * k + j), value_at(w1, i * k + l), 1e-6 * value_at(w1, i * k + l))
                    << "row " << i << " expert " << a[j];
                ++compared;
              }
      }
      EXPECT_GT(changed_rows, 0) << "the bias should change some selections";
      EXPECT_GT(compared, 0);
    }
  }
}

// ---------------------------------------------------------------- route weights

namespace {

const std::vector<int32_t> kRouteIdx = {0, 3, -1, 1, 2, 4, -1, -1, -1, 4, 0, 2, 3, -1, 1, 2, 1, 0};

OpCase route_case(bool normalize) {
  OpCase c;
  c.name = std::string("route_weights normalize=") + (normalize ? "1" : "0");
  c.inputs = {positive_tensor({6, 5}, 27), ids_tensor(kRouteIdx, {6, 3})};
  c.differentiable = {true, false};
  c.forward = [=](const Tensors& in) {
    Tensor w = Tensor::empty({6, 3}, in[0].dtype());
    ops::route_weights_forward(in[0], in[1], normalize, 2.5, w);
    return Tensors{w};
  };
  c.backward = [=](const Tensors& in, const Tensors&, const Tensors& d) {
    Tensor ds = like_zeros(in[0]);
    ops::route_weights_backward(in[0], in[1], d[0], normalize, 2.5, ds);
    return Tensors{ds, Tensor()};
  };
  return c;
}

}  // namespace

TEST(V4MoeOps, RouteWeights) {
  check_op(route_case(true));
  check_op(route_case(false));
}

TEST(V4MoeOps, RouteWeightsMatchFormula) {
  OpCase c = route_case(true);
  Tensor w = c.forward(c.inputs)[0];
  const Tensor& s = c.inputs[0];
  for (int64_t i = 0; i < 6; ++i) {
    double sum = 0;
    for (int64_t j = 0; j < 3; ++j)
      if (kRouteIdx[i * 3 + j] >= 0) sum += value_at(s, i * 5 + kRouteIdx[i * 3 + j]);
    for (int64_t j = 0; j < 3; ++j) {
      int32_t e = kRouteIdx[i * 3 + j];
      EXPECT_NEAR(value_at(w, i * 3 + j), e < 0 ? 0.0 : 2.5 * value_at(s, i * 5 + e) / sum, 1e-14);
    }
  }
}

TEST(V4MoeOps, RouteWeightsBackwardAccumulates) {
  OpCase c = route_case(true);
  Tensor g = random_tensor({6, 3}, 28), once = like_zeros(c.inputs[0]), twice = random_tensor({6, 5}, 29);
  Tensor start = twice.clone();
  ops::route_weights_backward(c.inputs[0], c.inputs[1], g, true, 2.5, once);
  ops::route_weights_backward(c.inputs[0], c.inputs[1], g, true, 2.5, twice);
  for (int64_t i = 0; i < 30; ++i) EXPECT_NEAR(value_at(twice, i), value_at(start, i) + value_at(once, i), 1e-14);
  // Experts no slot selected (row 2 selects none) get nothing.
  for (int64_t e = 0; e < 5; ++e) EXPECT_EQ(value_at(once, 2 * 5 + e), 0.0);
}

TEST(V4MoeOps, RejectsBadIndices) {
  Tensor s = positive_tensor({2, 3}, 30), w = Tensor::empty({2, 2}, DType::f64);
  try {
    ops::route_weights_forward(s, ids_tensor({0, 1, 3, -1}, {2, 2}), true, 1.0, w);
    FAIL() << "expected an error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("idx value 3 at flat position 2"), std::string::npos) << e.what();
  }
  Tensor dst = Tensor::empty({2, 3}, DType::f64);
  EXPECT_THROW(ops::gather_rows(s, ids_tensor({0, -1}, {2}), Tensor(), dst), Error);
  EXPECT_THROW(ops::scatter_add_rows(s, ids_tensor({0, 2}, {2}), Tensor(), dst), Error);
  try {
    ops::score_func_from_name("relu");
    FAIL() << "expected an error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("'relu'"), std::string::npos) << e.what();
  }
  EXPECT_EQ(ops::score_func_from_name("sqrtsoftplus"), ops::ScoreFunc::sqrt_softplus);
  EXPECT_EQ(ops::score_func_from_name("sigmoid"), ops::ScoreFunc::sigmoid);
  EXPECT_EQ(ops::score_func_from_name("softmax"), ops::ScoreFunc::softmax);
}

// ---------------------------------------------------------------- balance loss

namespace {

// Sequence 0 has a repeated expert in one row and a -1 slot; sequence 1 never selects expert 3.
const std::vector<int32_t> kBalanceIdx = {0, 2, 1, 1, 3, -1, 2, 0, 1, 2, 0, 1};

OpCase balance_case() {
  OpCase c;
  c.name = "balance_loss";
  c.inputs = {positive_tensor({2, 3, 4}, 31), ids_tensor(kBalanceIdx, {2, 3, 2})};
  c.differentiable = {true, false};
  // Device-portable: the loss tensor is allocated on the default device and filled there; dL/dloss is read back.
  c.forward = [](const Tensors& in) {
    Tensor loss = Tensor::empty({1}, in[0].dtype());
    ops::fill(loss, ops::balance_loss(in[0], in[1], 0.3, 0.0, Tensor()));
    return Tensors{loss};
  };
  c.backward = [](const Tensors& in, const Tensors&, const Tensors& d) {
    Tensor ds = like_zeros(in[0]);
    double dloss = value_at(d[0].to_device(Device::cpu), 0);
    ops::balance_loss(in[0], in[1], 0.3, dloss, ds);  // grad_scale carries dL/dloss
    return Tensors{ds, Tensor()};
  };
  return c;
}

}  // namespace

TEST(V4MoeOps, BalanceLossGradient) { check_op(balance_case()); }

TEST(V4MoeOps, BalanceLossMatchesFormula) {
  OpCase c = balance_case();
  const Tensor& s = c.inputs[0];
  const int64_t B = 2, T = 3, E = 4, k = 2;
  double want = 0;
  for (int64_t b = 0; b < B; ++b)
    for (int64_t i = 0; i < E; ++i) {
      double count = 0, P = 0;
      for (int64_t t = 0; t < T; ++t) {
        const int32_t* row = &kBalanceIdx[(b * T + t) * k];
        count += (row[0] == i || row[1] == i) ? 1 : 0;
        double sum = 0;
        for (int64_t j = 0; j < E; ++j) sum += value_at(s, (b * T + t) * E + j);
        P += value_at(s, (b * T + t) * E + i) / sum / T;
      }
      want += 0.3 / B * (double(E) / (k * T) * count) * P;
    }
  EXPECT_NEAR(ops::balance_loss(s, c.inputs[1], 0.3, 1.0, Tensor()), want, 1e-14);
}

TEST(V4MoeOps, BalanceLossHandWorked) {
  // B=1, T=2, E=2, k=1, alpha=0.1. scores t0 = (1, 3), t1 = (2, 2); both tokens pick expert 1.
  // f = E/(kT) * counts = 1 * (0, 2) = (0, 2).  P = ((1/4 + 1/2)/2, (3/4 + 1/2)/2) = (0.375, 0.625).
  // loss = 0.1 * (0 * 0.375 + 2 * 0.625) = 0.125.
  // d/ds_{t,i} = alpha/(T S_t) (f_i - sum_j f_j s_{t,j}/S_t):  t0: S=4, sum = 2*0.75 = 1.5 -> (-0.01875, 0.00625);
  // t1: S=4, sum = 2*0.5 = 1 -> (-0.0125, 0.0125). With grad_scale 2 these double, added onto dscores = 1.
  Tensor s = values({1, 3, 2, 2}, {1, 2, 2}), idx = ids_tensor({1, 1}, {1, 2, 1});
  Tensor ds = values({1, 1, 1, 1}, {1, 2, 2});
  EXPECT_NEAR(ops::balance_loss(s, idx, 0.1, 2.0, ds), 0.125, 1e-15);
  std::vector<double> want = {1 - 0.0375, 1 + 0.0125, 1 - 0.025, 1 + 0.025};
  for (int i = 0; i < 4; ++i) EXPECT_NEAR(value_at(ds, i), want[i], 1e-15) << i;
  EXPECT_NEAR(ops::balance_loss(s.to(DType::f32), idx, 0.1, 1.0, Tensor()), 0.125, 1e-7);
}

// ---------------------------------------------------------------- token movement

namespace {

const std::vector<int32_t> kRows = {3, 0, 3, 1, 3, 4};  // row 3 repeated, row 2 never used

}  // namespace

TEST(V4MoeOps, GatherRows) {
  for (bool scaled : {true, false}) {
    OpCase c;
    c.name = std::string("gather_rows") + (scaled ? " scaled" : "");
    c.inputs = {random_tensor({5, 4}, 32), ids_tensor(kRows, {6}), scaled ? random_tensor({6}, 33) : Tensor()};
    c.differentiable = {true, false, scaled};
    c.forward = [](const Tensors& in) {
      Tensor dst = Tensor::empty({6, 4}, in[0].dtype());
      ops::gather_rows(in[0], in[1], in[2], dst);
      return Tensors{dst};
    };
    c.backward = [=](const Tensors& in, const Tensors&, const Tensors& d) {
      Tensor dsrc = like_zeros(in[0]), dscale;
      ops::scatter_add_rows(d[0], in[1], in[2], dsrc);
      if (scaled) {
        dscale = like_zeros(in[2]);
        ops::rows_dot(d[0], in[0], in[1], dscale);
      }
      return Tensors{dsrc, Tensor(), dscale};
    };
    check_op(c);
  }
}

TEST(V4MoeOps, ScatterAddRows) {
  for (bool scaled : {true, false}) {
    OpCase c;
    c.name = std::string("scatter_add_rows (repeated rows)") + (scaled ? " scaled" : "");
    c.inputs = {random_tensor({6, 4}, 34), ids_tensor(kRows, {6}), scaled ? random_tensor({6}, 35) : Tensor(),
                random_tensor({5, 4}, 36)};
    c.differentiable = {true, false, scaled, true};
    c.forward = [](const Tensors& in) {
      Tensor dst = in[3].clone();
      ops::scatter_add_rows(in[0], in[1], in[2], dst);
      return Tensors{dst};
    };
    c.backward = [=](const Tensors& in, const Tensors&, const Tensors& d) {
      Tensor dsrc = like_zeros(in[0]), dscale;
      ops::gather_rows(d[0], in[1], in[2], dsrc);
      if (scaled) {
        dscale = like_zeros(in[2]);
        ops::rows_dot(in[0], d[0], in[1], dscale);
      }
      return Tensors{dsrc, Tensor(), dscale, d[0].clone()};
    };
    check_op(c);
  }
}

TEST(V4MoeOps, RowsDot) {
  OpCase c;
  c.name = "rows_dot";
  c.inputs = {random_tensor({6, 4}, 37), random_tensor({5, 4}, 38), ids_tensor(kRows, {6})};
  c.differentiable = {true, true, false};
  c.forward = [](const Tensors& in) {
    Tensor out = Tensor::empty({6}, in[0].dtype());
    ops::rows_dot(in[0], in[1], in[2], out);
    return Tensors{out};
  };
  c.backward = [](const Tensors& in, const Tensors&, const Tensors& d) {
    Tensor dsrc = like_zeros(in[0]), dother = like_zeros(in[1]);
    ops::gather_rows(in[1], in[2], d[0], dsrc);
    ops::scatter_add_rows(in[0], in[2], d[0], dother);
    return Tensors{dsrc, dother, Tensor()};
  };
  check_op(c);
}

TEST(V4MoeOps, TokenMovementMatchesLoops) {
  Tensor src = random_tensor({6, 70}, 39), scale = random_tensor({6}, 40), dst = random_tensor({5, 70}, 41);
  Tensor rows = ids_tensor(kRows, {6}), before = dst.clone(), dot = Tensor::empty({6}, DType::f64);
  ops::scatter_add_rows(src, rows, scale, dst);
  for (int64_t n = 0; n < 5; ++n)
    for (int64_t j = 0; j < 70; ++j) {
      double want = value_at(before, n * 70 + j);
      for (int64_t i = 0; i < 6; ++i)
        if (kRows[i] == n) want += value_at(scale, i) * value_at(src, i * 70 + j);
      EXPECT_NEAR(value_at(dst, n * 70 + j), want, 1e-13);
    }
  Tensor g = Tensor::empty({6, 70}, DType::f64);
  ops::gather_rows(before, rows, scale, g);
  ops::rows_dot(src, before, rows, dot);
  for (int64_t i = 0; i < 6; ++i) {
    double d = 0;
    for (int64_t j = 0; j < 70; ++j) {
      EXPECT_EQ(value_at(g, i * 70 + j), value_at(scale, i) * value_at(before, kRows[i] * 70 + j));
      d += value_at(src, i * 70 + j) * value_at(before, kRows[i] * 70 + j);
    }
    EXPECT_NEAR(value_at(dot, i), d, 1e-13);
  }
}

// ---------------------------------------------------------------- compressor

namespace {

struct CompressSetup {
  std::string name;
  int64_t B, T, c, S, m;
  std::vector<int32_t> block_start, prev_start;
};

// S = 2, m = 3. Batch 0: a document of 7 tokens (blocks at 0, 3; token 6 dropped) then one of 5 (block at 7,
// its first, no previous; tokens 10, 11 dropped) and a padding block. Batch 1: one document, four chained blocks.
CompressSetup csa_setup() {
  return {"compress S=2 m=3 (documents, padding)", 2, 12, 3, 2, 3, {0, 3, 7, -1, 0, 3, 6, 9},
          {-1, 0, -1, -1, -1, 0, 3, 6}};
}
// S = 1: documents of 6 and 4 tokens (m = 4), and of 32 and 8 tokens (m = 16), each with a padding block.
CompressSetup hca_setup(int64_t m) {
  if (m == 4) return {"compress S=1 m=4", 1, 10, 3, 1, 4, {0, 6, -1}, {-1, -1, -1}};
  return {"compress S=1 m=16", 1, 40, 2, 1, 16, {0, 16, -1}, {-1, -1, -1}};
}

OpCase compress_case(const CompressSetup& st) {
  const int64_t B = st.B, T = st.T, c = st.c, W = st.S * st.c, m = st.m, NB = int64_t(st.block_start.size()) / B;
  OpCase oc;
  oc.name = st.name;
  oc.inputs = {random_tensor({B, T, W}, 42), random_tensor({B, T, W}, 43, 1.5), random_tensor({m, W}, 44, 0.5),
               ids_tensor(st.block_start, {B, NB}), ids_tensor(st.prev_start, {B, NB})};
  oc.differentiable = {true, true, true, false, false};
  oc.forward = [=](const Tensors& in) {
    Tensor out = Tensor::empty({B, NB, c}, in[0].dtype());
    ops::compress_forward(in[0], in[1], in[2], in[3], in[4], m, out);
    return Tensors{out};
  };
  oc.backward = [=](const Tensors& in, const Tensors&, const Tensors& d) {
    // dkv, dscore are assigned: start them from garbage. dape accumulates: start from zero.
    Tensor dkv = empty_like(in[0]), dz = empty_like(in[1]), da = like_zeros(in[2]);
    ops::fill(dkv, 123.0);
    ops::fill(dz, -7.0);
    ops::compress_backward(in[0], in[1], in[2], in[3], in[4], m, d[0], dkv, dz, da);
    return Tensors{dkv, dz, da, Tensor(), Tensor()};
  };
  return oc;
}

// The contract written out per (batch, block, channel).
Tensor naive_compress(const CompressSetup& st, const Tensor& kv, const Tensor& z, const Tensor& ape) {
  const int64_t T = st.T, c = st.c, W = st.S * st.c, m = st.m, NB = int64_t(st.block_start.size()) / st.B;
  Tensor out = Tensor::zeros({st.B, NB, c}, DType::f64);
  for (int64_t b = 0; b < st.B; ++b)
    for (int64_t n = 0; n < NB; ++n) {
      int64_t start = st.block_start[b * NB + n], prev = st.prev_start[b * NB + n];
      if (start < 0) continue;
      for (int64_t ch = 0; ch < c; ++ch) {
        std::vector<double> logit, val;
        int64_t own = st.S == 2 ? c + ch : ch;
        for (int64_t t = start; t < start + m; ++t) {
          logit.push_back(value_at(z, (b * T + t) * W + own) + value_at(ape, (t - start) * W + own));
          val.push_back(value_at(kv, (b * T + t) * W + own));
        }
        if (st.S == 2 && prev >= 0)
          for (int64_t t = prev; t < prev + m; ++t) {
            logit.push_back(value_at(z, (b * T + t) * W + ch) + value_at(ape, (t - prev) * W + ch));
            val.push_back(value_at(kv, (b * T + t) * W + ch));
          }
        double den = 0, num = 0;
        for (size_t r = 0; r < logit.size(); ++r) den += std::exp(logit[r]), num += std::exp(logit[r]) * val[r];
        out.data<double>()[(b * NB + n) * c + ch] = num / den;
      }
    }
  return out;
}

}  // namespace

TEST(V4MoeOps, Compress) {
  check_op(compress_case(csa_setup()));
  check_op(compress_case(hca_setup(4)));
  check_op(compress_case(hca_setup(16)));
}

TEST(V4MoeOps, CompressMatchesNaiveSoftmax) {
  for (const CompressSetup& st : {csa_setup(), hca_setup(4), hca_setup(16)}) {
    OpCase oc = compress_case(st);
    Tensor out = oc.forward(oc.inputs)[0];
    EXPECT_LE(max_rel_diff(out, naive_compress(st, oc.inputs[0], oc.inputs[1], oc.inputs[2])), 1e-14) << st.name;
  }
}

TEST(V4MoeOps, CompressGradientIsZeroOutsideBlocks) {
  OpCase oc = compress_case(csa_setup());
  Tensors out = oc.forward(oc.inputs);
  Tensors g = oc.backward(oc.inputs, out, {random_tensor(out[0].shape(), 45)});
  const int64_t T = 12, W = 6, c = 3;
  auto at = [&](const Tensor& t, int64_t b, int64_t tok, int64_t col) { return value_at(t, (b * T + tok) * W + col); };
  for (int64_t col = 0; col < W; ++col) {
    for (int64_t tok : {6, 10, 11}) EXPECT_EQ(at(g[0], 0, tok, col), 0.0) << "batch 0 token " << tok;
    for (int64_t tok : {6, 10, 11}) EXPECT_EQ(at(g[1], 0, tok, col), 0.0) << "batch 0 token " << tok;
  }
  // Series b (channels [0, c)) of tokens that are no block's previous block: zero.
  for (int64_t col = 0; col < c; ++col)
    for (int64_t tok : {3, 4, 5, 7, 8, 9}) EXPECT_EQ(at(g[0], 0, tok, col), 0.0) << "token " << tok;
  for (int64_t col = 0; col < c; ++col)
    for (int64_t tok : {9, 10, 11}) EXPECT_EQ(at(g[0], 1, tok, col), 0.0) << "token " << tok;
  EXPECT_NE(at(g[0], 1, 0, 0), 0.0);  // batch 1 token 0 is block 1's previous block
}

TEST(V4MoeOps, CompressHandWorked) {
  // c = 1, m = 2, S = 2: column 1 is series a (the block's own), column 0 series b (used by the next block).
  // Blocks start at 0 (no previous) and 2 (previous block at 0).
  //   block 0 logits: score[t,1] + ape[t,1] = (0.25 - 0.25, (ln3 - 0.5) + 0.5) = (0, ln 3)
  //            weights e^0 / (e^0 + e^ln3) = 1/4, 3/4; values kv[0,1], kv[1,1] = 2, 6 -> out = 0.5 + 4.5 = 5.
  //   block 1 logits: own (score[2,1] + ape[0,1], score[3,1] + ape[1,1]) = (0.25 - 0.25, (ln2 - 0.5) + 0.5)
  //            = (0, ln 2); previous (score[0,0] + ape[0,0], score[1,0] + ape[1,0]) = (0, 0).
  //            weights (1, 2, 1, 1) / 5 over values (kv[2,1], kv[3,1], kv[0,0], kv[1,0]) = (1, 2, 3, 10)
  //            -> out = (1 + 4 + 3 + 10) / 5 = 3.6. kv[2,0], kv[3,0] = 100 are used by no block.
  const double ln2 = std::log(2.0), ln3 = std::log(3.0);
  Tensor kv = values({3, 2, 10, 6, 100, 1, 100, 2}, {1, 4, 2});
  Tensor score = values({0, 0.25, 0, ln3 - 0.5, 0, 0.25, 0, ln2 - 0.5}, {1, 4, 2});
  Tensor ape = values({0, -0.25, 0, 0.5}, {2, 2});
  Tensor bs = ids_tensor({0, 2}, {1, 2}), ps = ids_tensor({-1, 0}, {1, 2});
  Tensor out = Tensor::empty({1, 2, 1}, DType::f64);
  ops::compress_forward(kv, score, ape, bs, ps, 2, out);
  EXPECT_NEAR(value_at(out, 0), 5.0, 1e-14);
  EXPECT_NEAR(value_at(out, 1), 3.6, 1e-14);
  // Backward with dout = (1, 1): dkv = p, dscore = p (v - out).
  //   token 0: col 1 (block 0, p 1/4), col 0 (block 1, p 1/5): dscore = 1/4 (2 - 5), 1/5 (3 - 3.6).
  //   token 1: col 0 (block 1, p 1/5): dscore = 1/5 (10 - 3.6) = 1.28.
  //   token 3: col 1 (block 1, p 2/5): dscore = 2/5 (2 - 3.6) = -0.64. Token 2, 3 col 0: nothing.
  Tensor dkv = empty_like(kv), dz = empty_like(kv), da = like_zeros(ape);
  ops::compress_backward(kv, score, ape, bs, ps, 2, values({1, 1}, {1, 2, 1}), dkv, dz, da);
  std::vector<double> want_dkv = {0.2, 0.25, 0.2, 0.75, 0, 0.2, 0, 0.4};
  std::vector<double> want_dz = {-0.12, -0.75, 1.28, 0.75, 0, -0.52, 0, -0.64};
  for (int i = 0; i < 8; ++i) {
    EXPECT_NEAR(value_at(dkv, i), want_dkv[i], 1e-14) << i;
    EXPECT_NEAR(value_at(dz, i), want_dz[i], 1e-14) << i;
  }
  // dape[r, col] sums dscore over the rows at offset r: ape[0,1] gets tokens 0 and 2, ape[1,1] tokens 1 and 3.
  std::vector<double> want_da = {-0.12, -0.75 - 0.52, 1.28, 0.75 - 0.64};
  for (int i = 0; i < 4; ++i) EXPECT_NEAR(value_at(da, i), want_da[i], 1e-14) << i;
}

TEST(V4MoeOps, ResultsDoNotDependOnThreadCount) {
  // Large enough for several channel blocks and column blocks.
  CompressSetup st{"", 2, 64, 40, 2, 4, {}, {}};
  for (int64_t b = 0; b < 2; ++b)
    for (int64_t n = 0; n < 16; ++n) {
      st.block_start.push_back(int32_t(4 * n));
      st.prev_start.push_back(n == 0 || n == 8 ? -1 : int32_t(4 * (n - 1)));
    }
  OpCase oc = compress_case(st);
  Tensor dout = random_tensor({2, 16, 40}, 46, 1.0, DType::f32);
  Tensors in = {oc.inputs[0].to(DType::f32), oc.inputs[1].to(DType::f32), oc.inputs[2].to(DType::f32)};
  Tensor src = random_tensor({300, 130}, 47, 1.0, DType::f32), scale = random_tensor({300}, 48, 1.0, DType::f32);
  std::vector<int32_t> rows(300);
  for (int i = 0; i < 300; ++i) rows[i] = (i * 7) % 13;
  Tensor rows_t = ids_tensor(rows, {300});
  auto run = [&](int threads) {
    omp_set_num_threads(threads);
    Tensor dkv = empty_like(in[0]), dz = empty_like(in[1]), da = like_zeros(in[2]);
    ops::compress_backward(in[0], in[1], in[2], oc.inputs[3], oc.inputs[4], 4, dout, dkv, dz, da);
    Tensor dst = Tensor::zeros({13, 130}, DType::f32);
    ops::scatter_add_rows(src, rows_t, scale, dst);
    return Tensors{dkv, dz, da, dst};
  };
  int saved = omp_get_max_threads();
  Tensors one = run(1), many = run(3);
  omp_set_num_threads(saved);
  for (size_t i = 0; i < one.size(); ++i) EXPECT_TRUE(bitwise_equal(one[i], many[i])) << "output " << i;
}
