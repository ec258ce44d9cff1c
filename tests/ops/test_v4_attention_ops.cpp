// The V4 sparse attention and lightning indexer ops: backward vs central finite differences (fp64), fp32 vs fp64,
// forwards against formulas written out independently here (and against the dense attention op), hand-worked
// values, bitwise visibility properties and thread-count independence.
#include <gtest/gtest.h>
#include <omp.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <random>
#include <utility>
#include <vector>

#include "op_harness.h"
#include "ops/ops.h"
#include "ops/v4_ops.h"

using namespace tessera;
using namespace tessera::testing;

namespace {

constexpr double kNegInf = -std::numeric_limits<double>::infinity();

Tensor empty_like(const Tensor& t) { return Tensor::empty(t.shape(), t.dtype()); }
Tensor zeros_like_or_none(const Tensor& t) { return t.defined() ? like_zeros(t) : Tensor(); }

bool bitwise_equal(const Tensor& a, const Tensor& b, int64_t begin, int64_t count) {
  size_t es = dtype_size(a.dtype());
  return std::memcmp(static_cast<char*>(a.raw()) + begin * es, static_cast<char*>(b.raw()) + begin * es,
                     count * es) == 0;
}

void set_at(const Tensor& t, int64_t i, double v) {
  if (t.dtype() == DType::f32) t.data<float>()[i] = float(v);
  else t.data<double>()[i] = v;
}

// (B,T,K) compressed indices: each slot -1 with probability `unused`, else uniform in [0, NB) (repeats allowed).
Tensor random_cidx(int64_t B, int64_t T, int64_t K, int64_t NB, uint64_t seed, double unused = 0.3) {
  std::mt19937_64 gen(seed);
  std::uniform_real_distribution<double> u(0, 1);
  std::vector<int32_t> v(B * T * K);
  for (auto& x : v) x = u(gen) < unused ? -1 : int32_t(gen() % NB);
  return ids_tensor(v, {B, T, K});
}

// (B,T) document ids: runs of `len` tokens, shifted by b so the runs differ between rows.
Tensor doc_ids(int64_t B, int64_t T, int64_t len) {
  std::vector<int32_t> v(B * T);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t t = 0; t < T; ++t) v[b * T + t] = int32_t(10 * b + (t + b) / len);
  return ids_tensor(v, {B, T});
}

// ------------------------------------------------------------------------------------------------ sparse attention

struct SparseSetup {
  int64_t B = 2, T = 7, H = 3, D = 4, window = 16, K = 0, NB = 0, doc_len = 0;
  double sink_std = 1.0;
  uint64_t seed = 1;
};

// Inputs {q, kv, ckv, cidx, sink, doc}.
Tensors sparse_inputs(const SparseSetup& s) {
  return {random_tensor({s.B, s.T, s.H, s.D}, s.seed),
          random_tensor({s.B, s.T, s.D}, s.seed + 1),
          s.K > 0 ? random_tensor({s.B, s.NB, s.D}, s.seed + 2) : Tensor(),
          s.K > 0 ? random_cidx(s.B, s.T, s.K, s.NB, s.seed + 3) : Tensor(),
          random_tensor({s.H}, s.seed + 4, s.sink_std),
          s.doc_len > 0 ? doc_ids(s.B, s.T, s.doc_len) : Tensor()};
}

Tensors sparse_forward(const Tensors& in, int64_t window, double scale) {
  const Tensor& q = in[0];
  Tensor out = empty_like(q), lse = Tensor::empty({q.size(0), q.size(1), q.size(2)}, q.dtype());
  ops::sparse_attention_forward(in[0], in[1], in[2], in[3], in[4], in[5], window, scale, out, lse);
  return {out, lse};
}

// Gradients {dq, dkv, dckv, -, dsink, -}.
Tensors sparse_backward(const Tensors& in, const Tensors& out, const Tensor& dout, int64_t window, double scale) {
  Tensor dq = like_zeros(in[0]), dkv = like_zeros(in[1]), dckv = zeros_like_or_none(in[2]), dsink = like_zeros(in[4]);
  ops::sparse_attention_backward(in[0], in[1], in[2], in[3], in[4], in[5], window, scale, out[0], out[1], dout, dq,
                                 dkv, dckv, dsink);
  return {dq, dkv, dckv, Tensor(), dsink, Tensor()};
}

OpCase sparse_case(const std::string& name, const SparseSetup& s) {
  OpCase c;
  c.name = "sparse_attention " + name;
  c.inputs = sparse_inputs(s);
  c.differentiable = {true, true, s.K > 0, false, true, false};
  c.n_loss_outputs = 1;  // lse is saved state
  double scale = 1.0 / std::sqrt(double(s.D));
  int64_t window = s.window;
  c.forward = [=](const Tensors& in) { return sparse_forward(in, window, scale); };
  c.backward = [=](const Tensors& in, const Tensors& out, const Tensors& d) {
    return sparse_backward(in, out, d[0], window, scale);
  };
  return c;
}

// Naive sparse attention of query (b, t, h), from the definitions: the window keys j in [t - window + 1, t] of t's
// document, the compressed slots in order, and the sink in the denominator. Returns the probabilities too.
struct NaiveRow {
  std::vector<double> out, p_window, p_slot;  // p_slot per cidx slot (0 for -1)
  double lse = 0, p_sink = 0;
};
NaiveRow naive_sparse(const Tensors& in, int64_t window, double scale, int64_t b, int64_t t, int64_t h) {
  const Tensor &q = in[0], &kv = in[1], &ckv = in[2], &cidx = in[3], &sink = in[4], &doc = in[5];
  int64_t T = q.size(1), H = q.size(2), D = q.size(3), K = cidx.defined() ? cidx.size(2) : 0;
  int64_t NB = ckv.defined() ? ckv.size(1) : 0;
  auto qd = [&](int64_t d) { return value_at(q, ((b * T + t) * H + h) * D + d); };
  auto dot_kv = [&](int64_t j) {
    double s = 0;
    for (int64_t d = 0; d < D; ++d) s += qd(d) * value_at(kv, (b * T + j) * D + d);
    return scale * s;
  };
  auto dot_c = [&](int64_t c) {
    double s = 0;
    for (int64_t d = 0; d < D; ++d) s += qd(d) * value_at(ckv, (b * NB + c) * D + d);
    return scale * s;
  };
  std::vector<int64_t> win;
  for (int64_t j = std::max<int64_t>(0, t - window + 1); j <= t; ++j)
    if (!doc.defined() || value_at(doc, b * T + j) == value_at(doc, b * T + t)) win.push_back(j);
  double z = std::exp(value_at(sink, h));
  NaiveRow r;
  r.p_window.assign(T, 0.0);
  r.p_slot.assign(K, 0.0);
  for (int64_t j : win) z += std::exp(dot_kv(j));
  for (int64_t k = 0; k < K; ++k) {
    int32_t c = int32_t(value_at(cidx, (b * T + t) * K + k));
    if (c >= 0) z += std::exp(dot_c(c));
  }
  r.lse = std::log(z);
  r.p_sink = std::exp(value_at(sink, h)) / z;
  r.out.assign(D, 0.0);
  for (int64_t j : win) {
    r.p_window[j] = std::exp(dot_kv(j)) / z;
    for (int64_t d = 0; d < D; ++d) r.out[d] += r.p_window[j] * value_at(kv, (b * T + j) * D + d);
  }
  for (int64_t k = 0; k < K; ++k) {
    int32_t c = int32_t(value_at(cidx, (b * T + t) * K + k));
    if (c < 0) continue;
    r.p_slot[k] = std::exp(dot_c(c)) / z;
    for (int64_t d = 0; d < D; ++d) r.out[d] += r.p_slot[k] * value_at(ckv, (b * NB + c) * D + d);
  }
  return r;
}

}  // namespace

TEST(SparseAttention, GradWindowOnly) {
  check_op(sparse_case("window >= T, no compressed entries", {}));
}

TEST(SparseAttention, GradWindowSmallerThanT) {
  SparseSetup s;
  s.window = 3;
  check_op(sparse_case("window 3 < T", s));
}

TEST(SparseAttention, GradCompressedWithUnusedSlots) {
  SparseSetup s;
  s.window = 3, s.K = 4, s.NB = 5;
  check_op(sparse_case("window 3, K 4 with -1 slots and repeats", s));
}

TEST(SparseAttention, GradDocuments) {
  SparseSetup s;
  s.T = 9, s.window = 4, s.K = 3, s.NB = 4, s.doc_len = 3, s.sink_std = 2.0;
  check_op(sparse_case("documents, window 4, compressed, larger sinks", s));
}

TEST(SparseAttention, GradManyChunksAndColumnBlocks) {
  // 2 x 140 queries: 18 blocks of 16, two backward chunks of 16 blocks (the first spanning the batch rows);
  // windows reach into the previous block; D = 40 spans a full and a partial column block.
  SparseSetup s;
  s.B = 2, s.T = 140, s.H = 2, s.D = 40, s.window = 6, s.K = 5, s.NB = 10, s.doc_len = 50;
  check_op(sparse_case("T 140, D 40, documents, compressed", s));
}

TEST(SparseAttention, ForwardMatchesNaiveFormula) {
  SparseSetup s;
  s.T = 9, s.window = 4, s.K = 3, s.NB = 4, s.doc_len = 4;
  Tensors in = sparse_inputs(s);
  double scale = 0.37;
  Tensors out = sparse_forward(in, s.window, scale);
  for (int64_t b = 0; b < s.B; ++b)
    for (int64_t t = 0; t < s.T; ++t)
      for (int64_t h = 0; h < s.H; ++h) {
        NaiveRow r = naive_sparse(in, s.window, scale, b, t, h);
        int64_t row = (b * s.T + t) * s.H + h;
        EXPECT_NEAR(value_at(out[1], row), r.lse, 1e-12) << "b=" << b << " t=" << t << " h=" << h;
        for (int64_t d = 0; d < s.D; ++d)
          EXPECT_NEAR(value_at(out[0], row * s.D + d), r.out[d], 1e-12) << "b=" << b << " t=" << t << " h=" << h;
      }
}

// With one kv head used as both k and v, window >= T, no compressed entries and a sink whose exp underflows to 0,
// the sparse op is the dense causal (document-masked) attention.
TEST(SparseAttention, MatchesDenseAttention) {
  for (bool docs : {false, true})
    for (int64_t window : {int64_t(9), int64_t(1000)}) {
      SparseSetup s;
      s.B = 2, s.T = 9, s.H = 4, s.D = 6, s.window = window, s.doc_len = docs ? 4 : 0;
      Tensors in = sparse_inputs(s);
      ops::fill(in[4], -1e30);
      double scale = 1.0 / std::sqrt(6.0);
      Tensors sp = sparse_forward(in, window, scale);
      Tensor kv4 = in[1].reshape({s.B, s.T, 1, s.D});
      Tensor out = empty_like(in[0]), lse = Tensor::empty({s.B, s.H, s.T}, DType::f64);
      ops::attention_forward(in[0], kv4, kv4, in[5], scale, out, lse);
      EXPECT_LE(max_rel_diff(sp[0], out), 1e-12) << "docs=" << docs << " window=" << window;
      for (int64_t b = 0; b < s.B; ++b)
        for (int64_t t = 0; t < s.T; ++t)
          for (int64_t h = 0; h < s.H; ++h)
            EXPECT_NEAR(value_at(sp[1], (b * s.T + t) * s.H + h), value_at(lse, (b * s.H + h) * s.T + t), 1e-12);
    }
}

// The same reduction for the gradients: dkv = dk + dv of the dense op (k = v = kv), dsink = 0. The second shape
// has windows so long (T x D > 2^20) that the backward takes fewer query blocks per chunk.
TEST(SparseAttention, BackwardMatchesDenseAttention) {
  struct Shape4 { int64_t B, T, H, D; };
  for (Shape4 sh : {Shape4{2, 37, 3, 8}, Shape4{1, 256, 1, 4100}}) {
    SparseSetup s;
    s.B = sh.B, s.T = sh.T, s.H = sh.H, s.D = sh.D, s.window = sh.T, s.doc_len = 11;
    Tensors in = sparse_inputs(s);
    ops::fill(in[4], -1e30);
    double scale = 1.0 / std::sqrt(double(s.D));
    Tensors sp = sparse_forward(in, s.window, scale);
    Tensor dout = random_tensor(in[0].shape(), 9);
    Tensors g = sparse_backward(in, sp, dout, s.window, scale);
    Tensor kv4 = in[1].reshape({s.B, s.T, 1, s.D});
    Tensor out = empty_like(in[0]), lse = Tensor::empty({s.B, s.H, s.T}, DType::f64);
    ops::attention_forward(in[0], kv4, kv4, in[5], scale, out, lse);
    Tensor dq = like_zeros(in[0]), dk = like_zeros(kv4), dv = like_zeros(kv4);
    ops::attention_backward(in[0], kv4, kv4, in[5], scale, out, lse, dout, dq, dk, dv);
    ops::axpy(1.0, dv, dk);
    EXPECT_LE(max_rel_diff(sp[0], out), 1e-12) << "T=" << s.T;
    EXPECT_LE(max_rel_diff(g[0], dq), 1e-12) << "T=" << s.T;
    EXPECT_LE(max_rel_diff(g[1], dk.reshape(in[1].shape())), 1e-12) << "T=" << s.T;
    for (int64_t h = 0; h < s.H; ++h) EXPECT_EQ(value_at(g[4], h), 0.0);
  }
}

// T = 2, H = 1, D = 1, scale 1, sink 0, q = (1, 1), kv = (ln 2, ln 3), one compressed entry ln 4 seen by t = 1.
// Softmax weights e^{q k}: t = 0 sees {2 (value ln 2), sink 1}: out = 2 ln 2 / 3, lse = ln 3.
// t = 1 sees {2 (ln 2), 3 (ln 3), 4 (ln 4), sink 1}: out = (2 ln 2 + 3 ln 3 + 4 ln 4) / 10, lse = ln 10; the
// entry's probability is 0.4. With dout = (0, 1): D_1 = out_1, so dsink = -p_sink D_1 = -0.1 out_1.
TEST(SparseAttention, HandComputedTwoTokens) {
  const double l2 = std::log(2.0), l3 = std::log(3.0), l4 = std::log(4.0);
  Tensor q = Tensor::empty({1, 2, 1, 1}, DType::f64), kv = Tensor::empty({1, 2, 1}, DType::f64);
  Tensor ckv = Tensor::empty({1, 1, 1}, DType::f64), sink = Tensor::zeros({1}, DType::f64);
  Tensor cidx = ids_tensor({-1, 0}, {1, 2, 1});
  ops::fill(q, 1.0);
  kv.data<double>()[0] = l2, kv.data<double>()[1] = l3, ckv.data<double>()[0] = l4;
  Tensor out = Tensor::empty({1, 2, 1, 1}, DType::f64), lse = Tensor::empty({1, 2, 1}, DType::f64);
  ops::sparse_attention_forward(q, kv, ckv, cidx, sink, Tensor(), 2, 1.0, out, lse);
  double out1 = (2 * l2 + 3 * l3 + 4 * l4) / 10;
  EXPECT_NEAR(value_at(out, 0), 2 * l2 / 3, 1e-14);
  EXPECT_NEAR(value_at(out, 1), out1, 1e-14);
  EXPECT_NEAR(value_at(lse, 0), l3, 1e-14);
  EXPECT_NEAR(value_at(lse, 1), std::log(10.0), 1e-14);
  Tensor cprob = Tensor::empty({1, 2, 1}, DType::f64);
  ops::sparse_attention_cprob(q, ckv, cidx, lse, 1.0, cprob);
  EXPECT_EQ(value_at(cprob, 0), 0.0);
  EXPECT_NEAR(value_at(cprob, 1), 0.4, 1e-14);
  Tensor dout = Tensor::zeros({1, 2, 1, 1}, DType::f64);
  dout.data<double>()[1] = 1.0;
  Tensor dq = like_zeros(q), dkv = like_zeros(kv), dckv = like_zeros(ckv), dsink = like_zeros(sink);
  ops::sparse_attention_backward(q, kv, ckv, cidx, sink, Tensor(), 2, 1.0, out, lse, dout, dq, dkv, dckv, dsink);
  EXPECT_NEAR(value_at(dsink, 0), -0.1 * out1, 1e-14);
  // The entry's value gradient is p = 0.4; its key gradient p (v - D) q = 0.4 (ln 4 - out_1).
  EXPECT_NEAR(value_at(dckv, 0), 0.4 + 0.4 * (l4 - out1), 1e-14);
}

TEST(SparseAttention, CprobMatchesProbabilitiesAndSumsToHeads) {
  SparseSetup s;
  s.T = 9, s.window = 3, s.K = 4, s.NB = 5, s.doc_len = 4;
  Tensors in = sparse_inputs(s);
  double scale = 0.5;
  Tensors out = sparse_forward(in, s.window, scale);
  Tensor cprob = Tensor::empty({s.B, s.T, s.K}, DType::f64);
  ops::sparse_attention_cprob(in[0], in[2], in[3], out[1], scale, cprob);
  for (int64_t b = 0; b < s.B; ++b)
    for (int64_t t = 0; t < s.T; ++t) {
      std::vector<double> want(s.K, 0.0);
      double total = 0;
      for (int64_t h = 0; h < s.H; ++h) {
        NaiveRow r = naive_sparse(in, s.window, scale, b, t, h);
        for (int64_t k = 0; k < s.K; ++k) want[k] += r.p_slot[k];
        // The window and sink probabilities from the saved lse, independently of the kernel's own sums.
        double L = value_at(out[1], (b * s.T + t) * s.H + h);
        total += std::exp(value_at(in[4], h) - L);
        for (int64_t j = 0; j < s.T; ++j)
          if (r.p_window[j] > 0) {
            double z = 0;
            for (int64_t d = 0; d < s.D; ++d)
              z += value_at(in[0], ((b * s.T + t) * s.H + h) * s.D + d) * value_at(in[1], (b * s.T + j) * s.D + d);
            total += std::exp(scale * z - L);
          }
      }
      for (int64_t k = 0; k < s.K; ++k) {
        double c = value_at(cprob, (b * s.T + t) * s.K + k);
        EXPECT_NEAR(c, want[k], 1e-12) << "b=" << b << " t=" << t << " slot " << k;
        if (value_at(in[3], (b * s.T + t) * s.K + k) < 0) {
          EXPECT_EQ(c, 0.0);
        }
        total += c;
      }
      EXPECT_NEAR(total, double(s.H), 1e-12) << "b=" << b << " t=" << t;
    }
}

// Perturbing a future token's kv changes no earlier output; perturbing a token (q and kv) of another document
// changes no output of the other documents; perturbing a compressed entry no query selects changes nothing. Bitwise.
TEST(SparseAttention, VisibilityIsBitwise) {
  for (DType dt : {DType::f64, DType::f32}) {
    SparseSetup s;
    s.B = 2, s.T = 12, s.H = 2, s.D = 8, s.window = 5, s.K = 3, s.NB = 6;
    Tensors base = sparse_inputs(s);
    // Compressed entries 2 and 5 are never selected.
    int32_t* ci = base[3].data<int32_t>();
    for (int64_t i = 0; i < base[3].numel(); ++i)
      if (ci[i] == 2 || ci[i] == 5) ci[i] = (ci[i] == 2) ? 1 : -1;
    for (Tensor& t : base)
      if (t.defined() && t.dtype() == DType::f64) t = t.to(dt);
    const int64_t HD = s.H * s.D;
    auto run = [&](const Tensors& in) { return sparse_forward(in, s.window, 0.3); };
    Tensors ref = run(base);

    for (int64_t tp : {int64_t(1), int64_t(6), int64_t(11)}) {
      Tensors in = base;
      in[1] = base[1].clone();
      for (int64_t d = 0; d < s.D; ++d) set_at(in[1], (1 * s.T + tp) * s.D + d, 3.0 + d);
      Tensors o = run(in);
      EXPECT_TRUE(bitwise_equal(o[0], ref[0], 0, (s.T + tp) * HD)) << "future kv " << tp << " changed earlier outputs";
      EXPECT_TRUE(bitwise_equal(o[1], ref[1], 0, (s.T + tp) * s.H));
      EXPECT_FALSE(bitwise_equal(o[0], ref[0], (s.T + tp) * HD, HD)) << "the perturbation must be seen at t = " << tp;
    }

    Tensors in = base;
    in[2] = base[2].clone();
    for (int64_t b = 0; b < s.B; ++b)
      for (int64_t c : {2, 5})
        for (int64_t d = 0; d < s.D; ++d) set_at(in[2], (b * s.NB + c) * s.D + d, 5.0);
    Tensors o = run(in);
    EXPECT_TRUE(bitwise_equal(o[0], ref[0], 0, o[0].numel())) << "an unselected compressed entry changed outputs";
    EXPECT_TRUE(bitwise_equal(o[1], ref[1], 0, o[1].numel()));

    // Documents [0, 4), [4, 9), [9, 12) in both rows, window only: perturb token 5 (q and kv) of row 0.
    Tensors dn = base;
    dn[2] = Tensor(), dn[3] = Tensor();
    std::vector<int32_t> docs;
    for (int64_t b = 0; b < s.B; ++b)
      for (int64_t t = 0; t < s.T; ++t) docs.push_back(t < 4 ? 0 : t < 9 ? 1 : 2);
    dn[5] = ids_tensor(docs, {s.B, s.T});
    Tensors dref = run(dn);
    Tensors pert = dn;
    pert[0] = dn[0].clone(), pert[1] = dn[1].clone();
    for (int64_t d = 0; d < s.D; ++d) set_at(pert[1], 5 * s.D + d, -2.0 - d);
    for (int64_t i = 0; i < HD; ++i) set_at(pert[0], 5 * HD + i, 1.5);
    Tensors dp = run(pert);
    EXPECT_TRUE(bitwise_equal(dp[0], dref[0], 0, 4 * HD)) << "document 0 saw document 1";
    EXPECT_TRUE(bitwise_equal(dp[0], dref[0], 9 * HD, (s.T + s.T - 9) * HD)) << "document 2 or row 1 saw document 1";
    EXPECT_TRUE(bitwise_equal(dp[1], dref[1], 9 * s.H, (2 * s.T - 9) * s.H));
    EXPECT_FALSE(bitwise_equal(dp[0], dref[0], 6 * HD, HD));
  }
}

TEST(SparseAttention, BackwardAssignsActivationsAndAccumulatesSink) {
  SparseSetup s;
  s.window = 3, s.K = 2, s.NB = 3;
  Tensors in = sparse_inputs(s);
  Tensors out = sparse_forward(in, s.window, 0.5);
  Tensor dout = random_tensor(in[0].shape(), 77);
  Tensors fresh = sparse_backward(in, out, dout, s.window, 0.5);
  Tensor dq = empty_like(in[0]), dkv = empty_like(in[1]), dckv = empty_like(in[2]), dsink = empty_like(in[4]);
  ops::fill(dq, 7.0), ops::fill(dkv, -3.0), ops::fill(dckv, 11.0), ops::fill(dsink, 1.0);
  ops::sparse_attention_backward(in[0], in[1], in[2], in[3], in[4], in[5], s.window, 0.5, out[0], out[1], dout, dq,
                                 dkv, dckv, dsink);
  EXPECT_TRUE(bitwise_equal(dq, fresh[0], 0, dq.numel()));
  EXPECT_TRUE(bitwise_equal(dkv, fresh[1], 0, dkv.numel()));
  EXPECT_TRUE(bitwise_equal(dckv, fresh[2], 0, dckv.numel()));
  for (int64_t h = 0; h < s.H; ++h) EXPECT_NEAR(value_at(dsink, h), 1.0 + value_at(fresh[4], h), 1e-14);
}

TEST(SparseAttention, RejectsBadInputs) {
  SparseSetup s;
  s.K = 2, s.NB = 3;
  Tensors in = sparse_inputs(s);
  in[3].data<int32_t>()[5] = 3;
  try {
    sparse_forward(in, 4, 0.5);
    FAIL() << "expected an error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("cidx value 3 at flat position 5"), std::string::npos) << e.what();
  }
  in[3].data<int32_t>()[5] = -2;
  EXPECT_THROW(sparse_forward(in, 4, 0.5), Error);
  in[3].data<int32_t>()[5] = -1;
  EXPECT_NO_THROW(sparse_forward(in, 4, 0.5));
  EXPECT_THROW(sparse_forward(in, 0, 0.5), Error);
  Tensors no_ckv = in;
  no_ckv[2] = Tensor();
  EXPECT_THROW(sparse_forward(no_ckv, 4, 0.5), Error);
}

// ------------------------------------------------------------------------------------------------ indexer

namespace {

struct IndexerSetup {
  int64_t B = 2, T = 9, HI = 3, DI = 5, NB = 5;
  uint64_t seed = 21;
};

// Inputs {qi, ki, w, vis_begin, vis_end}: query t sees [e - w, e) with e = (t+1) NB / T, w = max(3, NB / 2),
// clipped at 0 (t = 3 of row 1: nothing).
Tensors indexer_inputs(const IndexerSetup& s) {
  std::vector<int32_t> vb, ve;
  for (int64_t b = 0; b < s.B; ++b)
    for (int64_t t = 0; t < s.T; ++t) {
      int64_t e = (t + 1) * s.NB / s.T, bg = std::max<int64_t>(0, e - std::max<int64_t>(3, s.NB / 2));
      if (b == 1 && t == 3) bg = e;
      vb.push_back(int32_t(bg)), ve.push_back(int32_t(e));
    }
  return {random_tensor({s.B, s.T, s.HI, s.DI}, s.seed), random_tensor({s.B, s.NB, s.DI}, s.seed + 1),
          random_tensor({s.B, s.T, s.HI}, s.seed + 2), ids_tensor(vb, {s.B, s.T}), ids_tensor(ve, {s.B, s.T})};
}

Tensor indexer_forward(const Tensors& in) {
  Tensor sc = Tensor::empty({in[0].size(0), in[0].size(1), in[1].size(1)}, in[0].dtype());
  ops::indexer_scores_forward(in[0], in[1], in[2], in[3], in[4], sc);
  return sc;
}

// The smallest |qi_h . ki_s| over visible pairs: finite differences need the relu away from its kink.
double min_abs_visible_dot(const Tensors& in) {
  const Tensor &qi = in[0], &ki = in[1];
  int64_t B = qi.size(0), T = qi.size(1), HI = qi.size(2), DI = qi.size(3), NB = ki.size(1);
  double m = 1e300;
  for (int64_t b = 0; b < B; ++b)
    for (int64_t t = 0; t < T; ++t)
      for (int64_t s = int64_t(value_at(in[3], b * T + t)); s < value_at(in[4], b * T + t); ++s)
        for (int64_t h = 0; h < HI; ++h) {
          double z = 0;
          for (int64_t d = 0; d < DI; ++d)
            z += value_at(qi, ((b * T + t) * HI + h) * DI + d) * value_at(ki, (b * NB + s) * DI + d);
          m = std::min(m, std::abs(z));
        }
  return m;
}

OpCase indexer_case(const std::string& name, const IndexerSetup& s) {
  OpCase c;
  c.name = "indexer_scores " + name;
  c.inputs = indexer_inputs(s);
  c.differentiable = {true, true, true, false, false};
  // -inf entries (those outside the visible ranges) become 0 so the harness's projected loss stays finite; their
  // dscores must be ignored. The visible runs (flat offset, length) come from the host index tensors, so the
  // forward only copies device memory (it runs on the GPU too): zeros, then each visible run copied over.
  std::vector<std::pair<int64_t, int64_t>> runs;
  const int64_t NB = s.NB;
  for (int64_t r = 0; r < s.B * s.T; ++r) {
    int64_t b0 = int64_t(value_at(c.inputs[3], r)), e0 = int64_t(value_at(c.inputs[4], r));
    if (e0 > b0) runs.emplace_back(r * NB + b0, e0 - b0);
  }
  c.forward = [runs](const Tensors& in) {
    Tensor sc = indexer_forward(in);
    Tensor flat = sc.reshape({sc.numel()}), res = Tensor::zeros({sc.numel()}, sc.dtype(), sc.device());
    for (const auto& [off, len] : runs) res.slice(off, len).copy_from(flat.slice(off, len));
    return Tensors{res.reshape(sc.shape())};
  };
  c.backward = [](const Tensors& in, const Tensors&, const Tensors& d) {
    Tensor dqi = like_zeros(in[0]), dki = like_zeros(in[1]), dw = like_zeros(in[2]);
    ops::indexer_scores_backward(in[0], in[1], in[2], in[3], in[4], d[0], dqi, dki, dw);
    return Tensors{dqi, dki, dw, Tensor(), Tensor()};
  };
  return c;
}

}  // namespace

TEST(IndexerScores, Grad) {
  OpCase c = indexer_case("small", {});
  ASSERT_GT(min_abs_visible_dot(c.inputs), 1e-3);
  check_op(c);
}

TEST(IndexerScores, GradManyChunksAndKeyBlocks) {
  // 70 query rows per batch row cross the 64-row chunk; NB = 70 spans two 64-key blocks.
  IndexerSetup s;
  s.T = 70, s.NB = 70, s.HI = 2, s.DI = 3, s.seed = 31;
  OpCase c = indexer_case("T 70, NB 70", s);
  ASSERT_GT(min_abs_visible_dot(c.inputs), 1e-4);
  check_op(c);
}

TEST(IndexerScores, MatchesFormula) {
  IndexerSetup s;
  Tensors in = indexer_inputs(s);
  Tensor sc = indexer_forward(in);
  for (int64_t b = 0; b < s.B; ++b)
    for (int64_t t = 0; t < s.T; ++t)
      for (int64_t n = 0; n < s.NB; ++n) {
        double got = value_at(sc, (b * s.T + t) * s.NB + n);
        if (n < value_at(in[3], b * s.T + t) || n >= value_at(in[4], b * s.T + t)) {
          EXPECT_EQ(got, kNegInf) << "b=" << b << " t=" << t << " n=" << n;
          continue;
        }
        double want = 0;
        for (int64_t h = 0; h < s.HI; ++h) {
          double z = 0;
          for (int64_t d = 0; d < s.DI; ++d)
            z += value_at(in[0], ((b * s.T + t) * s.HI + h) * s.DI + d) * value_at(in[1], (b * s.NB + n) * s.DI + d);
          want += value_at(in[2], (b * s.T + t) * s.HI + h) * std::max(z, 0.0);
        }
        EXPECT_NEAR(got, want, 1e-12) << "b=" << b << " t=" << t << " n=" << n;
      }
}

TEST(IndexerScores, InvisibleKeysAreBitwiseIgnored) {
  for (DType dt : {DType::f64, DType::f32}) {
    IndexerSetup s;
    Tensors in = indexer_inputs(s);
    for (int k = 0; k < 3; ++k) in[k] = in[k].to(dt);
    Tensor ref = indexer_forward(in);
    int changed = 0;
    for (int64_t n = 0; n < s.NB; ++n) {
      Tensors p = in;
      p[1] = in[1].clone();
      for (int64_t d = 0; d < s.DI; ++d) set_at(p[1], (0 * s.NB + n) * s.DI + d, 4.0 + d);
      Tensor sc = indexer_forward(p);
      for (int64_t t = 0; t < s.T; ++t) {
        bool visible = n >= value_at(in[3], t) && n < value_at(in[4], t);
        if (!visible) {
          EXPECT_TRUE(bitwise_equal(sc, ref, t * s.NB, s.NB)) << "key " << n << " changed query " << t;
        } else {
          changed += !bitwise_equal(sc, ref, t * s.NB, s.NB);
        }
      }
      EXPECT_TRUE(bitwise_equal(sc, ref, s.T * s.NB, s.T * s.NB)) << "row 0's key changed row 1";
    }
    EXPECT_GT(changed, 0) << "the perturbations must be seen by the queries that see them";
  }
}

TEST(IndexerScores, RejectsBadRanges) {
  Tensors in = indexer_inputs({});
  in[3].data<int32_t>()[4] = in[4].data<int32_t>()[4] + 1;
  EXPECT_THROW(indexer_forward(in), Error);
  in = indexer_inputs({});
  in[4].data<int32_t>()[2] = 6;  // > NB
  EXPECT_THROW(indexer_forward(in), Error);
}

// ------------------------------------------------------------------------------------------------ indexer KL

namespace {

// Rows: a regular one, one with -inf scores (target 0 there), an all-zero target, one with 0 log 0 entries.
Tensors kl_inputs() {
  Tensor z = random_tensor({4, 6}, 41, 1.5), t = random_tensor({4, 6}, 42);
  for (int64_t i = 0; i < t.numel(); ++i) t.data<double>()[i] = std::abs(t.data<double>()[i]);
  z.data<double>()[6 + 1] = kNegInf, t.data<double>()[6 + 1] = 0;
  z.data<double>()[6 + 4] = kNegInf, t.data<double>()[6 + 4] = 0;
  for (int64_t s = 0; s < 6; ++s) t.data<double>()[12 + s] = 0;
  t.data<double>()[18 + 0] = 0, t.data<double>()[18 + 3] = 0;
  return {z, t};
}

}  // namespace

TEST(IndexerKl, Grad) {
  OpCase c;
  c.name = "indexer_kl";
  c.inputs = kl_inputs();
  c.differentiable = {true, false};
  // Device-portable: the loss is written with fill, dout read from a host copy.
  c.forward = [](const Tensors& in) {
    Tensor l = Tensor::empty({1}, in[0].dtype());
    ops::fill(l, ops::indexer_kl(in[0], in[1], 1.0, Tensor()));
    return Tensors{l};
  };
  c.backward = [](const Tensors& in, const Tensors&, const Tensors& d) {
    Tensor dz = empty_like(in[0]);
    ops::indexer_kl(in[0], in[1], value_at(d[0].to_device(Device::cpu), 0), dz);
    return Tensors{dz, Tensor()};
  };
  check_op(c);
}

TEST(IndexerKl, HandWorked) {
  // Row 0: z = (0, ln 3, -inf), target (2, 2, 0): p = (1/2, 1/2, 0), q = (1/4, 3/4, 0),
  //        KL = 1/2 ln 2 + 1/2 ln(2/3) = 1/2 ln(4/3); gradient grad_scale (q - p) = gs (-1/4, 1/4, 0).
  // Row 1: all-zero target: 0, no gradient.
  // Row 2: z = (1, 2, 3), target (0, 0, 5): p = (0, 0, 1), KL = -ln q_3 = ln(e + e^2 + e^3) - 3.
  Tensor z = Tensor::empty({3, 3}, DType::f64), t = Tensor::zeros({3, 3}, DType::f64);
  double zs[9] = {0, std::log(3.0), kNegInf, 0.3, -1, 2, 1, 2, 3};
  std::copy(zs, zs + 9, z.data<double>());
  t.data<double>()[0] = 2, t.data<double>()[1] = 2, t.data<double>()[8] = 5;
  Tensor dz = empty_like(z);
  double kl = ops::indexer_kl(z, t, 2.0, dz);
  double e = std::exp(1.0);
  EXPECT_NEAR(kl, 0.5 * std::log(4.0 / 3.0) + std::log(e + e * e + e * e * e) - 3, 1e-14);
  double want[6] = {-0.5, 0.5, 0, 0, 0, 0};
  for (int i = 0; i < 6; ++i) EXPECT_NEAR(value_at(dz, i), want[i], 1e-14) << i;
  double sum = e + e * e + e * e * e;
  EXPECT_NEAR(value_at(dz, 8), 2.0 * (e * e * e / sum - 1), 1e-14);
  EXPECT_NEAR(value_at(dz, 6), 2.0 * e / sum, 1e-14);
}

TEST(IndexerKl, RejectsTargetOnMaskedScore) {
  Tensors in = kl_inputs();
  in[1].data<double>()[7] = 0.5;
  EXPECT_THROW(ops::indexer_kl(in[0], in[1], 1.0, Tensor()), Error);
}

// ------------------------------------------------------------------------------------------------ determinism

TEST(V4Attention, BackwardIndependentOfThreadCount) {
  SparseSetup s;
  s.B = 2, s.T = 300, s.H = 3, s.D = 70, s.window = 20, s.K = 6, s.NB = 20, s.doc_len = 70;
  Tensors sin = sparse_inputs(s);
  for (Tensor& t : sin)
    if (t.defined() && t.dtype() == DType::f64) t = t.to(DType::f32);
  Tensors sout = sparse_forward(sin, s.window, 0.2);
  Tensor sd = random_tensor(sin[0].shape(), 5, 1.0, DType::f32);
  IndexerSetup is;
  is.T = 150, is.NB = 140, is.seed = 3;
  Tensors iin = indexer_inputs(is);
  for (int k = 0; k < 3; ++k) iin[k] = iin[k].to(DType::f32);
  Tensor id = random_tensor({is.B, is.T, is.NB}, 6, 1.0, DType::f32);
  auto run = [&]() {
    Tensors g = sparse_backward(sin, sout, sd, s.window, 0.2);
    Tensor dqi = like_zeros(iin[0]), dki = like_zeros(iin[1]), dw = like_zeros(iin[2]);
    ops::indexer_scores_backward(iin[0], iin[1], iin[2], iin[3], iin[4], id, dqi, dki, dw);
    return Tensors{g[0], g[1], g[2], g[4], dqi, dki, dw};
  };
  int saved = omp_get_max_threads();
  omp_set_num_threads(1);
  Tensors one = run();
  for (int n : {2, 3, 5}) {
    omp_set_num_threads(n);
    Tensors many = run();
    for (size_t k = 0; k < one.size(); ++k)
      EXPECT_TRUE(bitwise_equal(many[k], one[k], 0, one[k].numel())) << "gradient " << k << " with " << n << " threads";
  }
  omp_set_num_threads(saved);
}

