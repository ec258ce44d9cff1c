// Every op: backward vs central finite differences (fp64), fp32 vs fp64, and the forward of the fused ops
// against a naive formula written out independently here.
#include <cmath>

#include "backend/backend.h"
#include "op_harness.h"
#include "ops/ops.h"

using namespace tessera;
using namespace tessera::testing;

namespace {

Tensor empty_like(const Tensor& t) { return Tensor::empty(t.shape(), t.dtype()); }

OpCase gemm_case(bool ta, bool tb, bool batched, bool broadcast_b) {
  int64_t m = 5, k = 4, n = 3, bs = batched ? 2 : 1;
  auto dims = [&](int64_t r, int64_t c, int64_t b) { return batched ? Shape{b, r, c} : Shape{r, c}; };
  OpCase c;
  c.name = std::string("gemm ta=") + (ta ? "1" : "0") + " tb=" + (tb ? "1" : "0") + (batched ? " batched" : "") +
           (broadcast_b ? " broadcast-B" : "");
  c.inputs = {random_tensor(ta ? dims(k, m, bs) : dims(m, k, bs), 1),
              random_tensor(tb ? dims(n, k, broadcast_b ? 1 : bs) : dims(k, n, broadcast_b ? 1 : bs), 2),
              random_tensor(dims(m, n, bs), 3)};
  c.differentiable = {true, true, true};
  // out = 0.5 * op(A) op(B) + 2 * C0 (beta path exercised).
  c.forward = [=](const Tensors& in) {
    Tensor out = in[2].clone();
    ops::gemm(in[0], ta, in[1], tb, out, 0.5, 2.0);
    return Tensors{out};
  };
  c.backward = [=](const Tensors& in, const Tensors&, const Tensors& d) {
    Tensor da = like_zeros(in[0]), db = like_zeros(in[1]), dc = d[0].clone();
    ops::scale(dc, 2.0);
    // dA = 0.5 dOut op(B)^T (transposed back if A was transposed); dB likewise.
    if (!ta) ops::gemm(d[0], false, in[1], !tb, da, 0.5, 0.0);
    else ops::gemm(in[1], tb, d[0], true, da, 0.5, 0.0);
    if (broadcast_b) {
      // Sum the per-batch contributions into the single broadcast B.
      for (int64_t b = 0; b < bs; ++b) {
        Tensor ab = in[0].slice(b, 1), db_b = like_zeros(in[1]), d_b = d[0].slice(b, 1);
        if (!tb) ops::gemm(ab, !ta, d_b, false, db_b, 0.5, 0.0);
        else ops::gemm(d_b, true, ab, ta, db_b, 0.5, 0.0);
        ops::axpy(1.0, db_b, db);
      }
    } else if (!tb) ops::gemm(in[0], !ta, d[0], false, db, 0.5, 0.0);
    else ops::gemm(d[0], true, in[0], ta, db, 0.5, 0.0);
    return Tensors{da, db, dc};
  };
  return c;
}

}  // namespace

TEST(Ops, Gemm) {
  for (bool ta : {false, true})
    for (bool tb : {false, true}) {
      check_op(gemm_case(ta, tb, false, false));
      check_op(gemm_case(ta, tb, true, false));
      check_op(gemm_case(ta, tb, true, true));
    }
}

TEST(Ops, Linear) {
  OpCase c;
  c.name = "linear";
  c.inputs = {random_tensor({6, 5}, 1), random_tensor({4, 5}, 2)};
  c.differentiable = {true, true};
  c.forward = [](const Tensors& in) {
    Tensor y = Tensor::empty({6, 4}, in[0].dtype());
    ops::linear_forward(in[0], in[1], y);
    return Tensors{y};
  };
  c.backward = [](const Tensors& in, const Tensors&, const Tensors& d) {
    Tensor dx = like_zeros(in[0]), dw = like_zeros(in[1]);
    ops::linear_backward(in[0], in[1], d[0], dx, dw);
    return Tensors{dx, dw};
  };
  check_op(c);
}

TEST(Ops, Embedding) {
  OpCase c;
  c.name = "embedding (repeated ids)";
  c.inputs = {ids_tensor({3, 0, 3, 6, 1, 3}, {6}), random_tensor({7, 5}, 4)};
  c.differentiable = {false, true};
  c.forward = [](const Tensors& in) {
    Tensor out = Tensor::empty({6, 5}, in[1].dtype());
    ops::embedding_forward(in[0], in[1], out);
    return Tensors{out};
  };
  c.backward = [](const Tensors& in, const Tensors&, const Tensors& d) {
    Tensor dw = like_zeros(in[1]);
    ops::embedding_backward(in[0], d[0], dw);
    return Tensors{Tensor(), dw};
  };
  check_op(c);
}

TEST(Ops, EmbeddingRejectsOutOfVocabularyIds) {
  Tensor table = random_tensor({4, 3}, 1, 1.0, DType::f32), out = Tensor::empty({2, 3}, DType::f32);
  try {
    ops::embedding_forward(ids_tensor({1, 4}, {2}), table, out);
    FAIL() << "expected an error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("token id 4 at position 1"), std::string::npos) << e.what();
  }
}

static OpCase rmsnorm_case(bool with_weight) {
  OpCase c;
  c.name = with_weight ? "rmsnorm" : "rmsnorm (weightless)";
  c.inputs = {random_tensor({5, 8}, 5), with_weight ? random_tensor({8}, 6) : Tensor()};
  c.differentiable = {true, with_weight};
  c.n_loss_outputs = 1;
  c.forward = [](const Tensors& in) {
    Tensor out = empty_like(in[0]), rstd = Tensor::empty({5}, in[0].dtype());
    ops::rmsnorm_forward(in[0], in[1], 1e-5, out, rstd);
    return Tensors{out, rstd};
  };
  c.backward = [](const Tensors& in, const Tensors& out, const Tensors& d) {
    Tensor dx = like_zeros(in[0]), dw = in[1].defined() ? like_zeros(in[1]) : Tensor();
    ops::rmsnorm_backward(in[0], in[1], out[1], d[0], dx, dw);
    return Tensors{dx, dw};
  };
  return c;
}

TEST(Ops, RmsNorm) {
  check_op(rmsnorm_case(true));
  check_op(rmsnorm_case(false));
}

TEST(Ops, RmsNormMatchesFormula) {
  Tensor x = random_tensor({3, 6}, 7), w = random_tensor({6}, 8), out = empty_like(x), rstd = Tensor::empty({3}, DType::f64);
  ops::rmsnorm_forward(x, w, 1e-5, out, rstd);
  for (int i = 0; i < 3; ++i) {
    double ms = 0;
    for (int j = 0; j < 6; ++j) ms += std::pow(value_at(x, i * 6 + j), 2) / 6;
    for (int j = 0; j < 6; ++j)
      EXPECT_NEAR(value_at(out, i * 6 + j), value_at(x, i * 6 + j) / std::sqrt(ms + 1e-5) * value_at(w, j), 1e-12);
  }
}

static OpCase rope_case(bool interleaved, int64_t rotary_dim) {
  OpCase c;
  c.name = std::string("rope ") + (interleaved ? "interleaved" : "half-split") + " rotary_dim=" +
           std::to_string(rotary_dim);
  c.inputs = {random_tensor({2, 3, 2, 8}, 9), ids_tensor({0, 1, 2, 5, 9, 40}, {6})};
  c.differentiable = {true, false};
  c.forward = [=](const Tensors& in) {
    Tensor out = empty_like(in[0]);
    ops::rope_forward(in[0], in[1], 10000.0, rotary_dim, interleaved, out);
    return Tensors{out};
  };
  c.backward = [=](const Tensors& in, const Tensors&, const Tensors& d) {
    Tensor dx = like_zeros(in[0]);
    ops::rope_backward(d[0], in[1], 10000.0, rotary_dim, interleaved, dx);
    return Tensors{dx, Tensor()};
  };
  return c;
}

TEST(Ops, Rope) {
  for (bool inter : {false, true})
    for (int64_t r : {8, 4}) check_op(rope_case(inter, r));
}

TEST(Ops, RopeMatchesRotationFormula) {
  // Head dim 4, half-split: pairs (0, 2) and (1, 3) with frequencies theta^0 and theta^(-1/2).
  Tensor x = random_tensor({1, 1, 1, 4}, 10), pos = ids_tensor({7}, {1}), out = empty_like(x);
  ops::rope_forward(x, pos, 100.0, 4, false, out);
  for (int i = 0; i < 2; ++i) {
    double ang = 7.0 * std::pow(100.0, -2.0 * i / 4.0), a = value_at(x, i), b = value_at(x, i + 2);
    EXPECT_NEAR(value_at(out, i), a * std::cos(ang) - b * std::sin(ang), 1e-6);
    EXPECT_NEAR(value_at(out, i + 2), b * std::cos(ang) + a * std::sin(ang), 1e-6);
  }
}

TEST(Ops, SwiGLU) {
  OpCase c;
  c.name = "swiglu";
  c.inputs = {random_tensor({4, 6}, 11, 2.0), random_tensor({4, 6}, 12)};
  c.differentiable = {true, true};
  c.forward = [](const Tensors& in) {
    Tensor out = empty_like(in[0]);
    ops::swiglu_forward(in[0], in[1], out);
    return Tensors{out};
  };
  c.backward = [](const Tensors& in, const Tensors&, const Tensors& d) {
    Tensor dg = like_zeros(in[0]), du = like_zeros(in[1]);
    ops::swiglu_backward(in[0], in[1], d[0], dg, du);
    return Tensors{dg, du};
  };
  check_op(c);
}

TEST(Ops, Softmax) {
  OpCase c;
  c.name = "softmax";
  c.inputs = {random_tensor({4, 7}, 13, 3.0)};
  c.differentiable = {true};
  c.forward = [](const Tensors& in) {
    Tensor out = empty_like(in[0]);
    ops::softmax_forward(in[0], out);
    return Tensors{out};
  };
  c.backward = [](const Tensors& in, const Tensors& out, const Tensors& d) {
    Tensor dx = like_zeros(in[0]);
    ops::softmax_backward(out[0], d[0], dx);
    return Tensors{dx};
  };
  check_op(c);
}

static OpCase attention_case(int64_t H, int64_t KH, bool with_docs) {
  const int64_t B = 2, T = 7, D = 4;
  OpCase c;
  c.name = "attention H=" + std::to_string(H) + " KH=" + std::to_string(KH) + (with_docs ? " documents" : "");
  c.inputs = {random_tensor({B, T, H, D}, 14), random_tensor({B, T, KH, D}, 15), random_tensor({B, T, KH, D}, 16),
              with_docs ? ids_tensor({0, 0, 0, 1, 1, 2, 2, 5, 5, 5, 5, 6, 7, 7}, {B, T}) : Tensor()};
  c.differentiable = {true, true, true, false};
  double scale = 1.0 / std::sqrt(double(D));
  c.forward = [=](const Tensors& in) {
    Tensor out = empty_like(in[0]), lse = Tensor::empty({B, H, T}, in[0].dtype());
    ops::attention_forward(in[0], in[1], in[2], in[3], scale, out, lse);
    return Tensors{out, lse};
  };
  c.backward = [=](const Tensors& in, const Tensors& out, const Tensors& d) {
    Tensor dq = like_zeros(in[0]), dk = like_zeros(in[1]), dv = like_zeros(in[2]);
    ops::attention_backward(in[0], in[1], in[2], in[3], scale, out[0], out[1], d[0], dq, dk, dv);
    return Tensors{dq, dk, dv, Tensor()};
  };
  return c;
}

TEST(Ops, Attention) {
  check_op(attention_case(2, 2, false));
  check_op(attention_case(4, 2, false));
  check_op(attention_case(4, 1, true));
}

TEST(Ops, AttentionMatchesNaiveMaskedSoftmax) {
  const int64_t B = 2, T = 7, H = 4, KH = 2, D = 4;
  OpCase c = attention_case(H, KH, true);
  Tensors out = c.forward(c.inputs);
  const Tensor &q = c.inputs[0], &k = c.inputs[1], &v = c.inputs[2], &doc = c.inputs[3];
  auto at = [](const Tensor& t, int64_t b, int64_t s, int64_t h, int64_t d) {
    return value_at(t, ((b * t.size(1) + s) * t.size(2) + h) * t.size(3) + d);
  };
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < H; ++h)
      for (int64_t i = 0; i < T; ++i) {
        // Visible keys: j <= i in the same document.
        std::vector<double> w(T, 0.0);
        double total = 0;
        for (int64_t j = 0; j <= i; ++j) {
          if (value_at(doc, b * T + j) != value_at(doc, b * T + i)) continue;
          double s = 0;
          for (int64_t d = 0; d < D; ++d) s += at(q, b, i, h, d) * at(k, b, j, h / (H / KH), d);
          total += (w[j] = std::exp(s / std::sqrt(double(D))));
        }
        for (int64_t d = 0; d < D; ++d) {
          double o = 0;
          for (int64_t j = 0; j < T; ++j) o += w[j] / total * at(v, b, j, h / (H / KH), d);
          EXPECT_NEAR(at(out[0], b, i, h, d), o, 1e-12) << "b=" << b << " h=" << h << " i=" << i;
        }
        EXPECT_NEAR(value_at(out[1], (b * H + h) * T + i), std::log(total), 1e-12);
      }
}

static OpCase cross_entropy_case() {
  OpCase c;
  c.name = "cross_entropy (one ignored target, loss_scale 0.25)";
  c.inputs = {random_tensor({5, 6}, 17, 2.0), ids_tensor({2, 0, -1, 5, 5}, {5})};
  c.differentiable = {true, false};
  c.forward = [](const Tensors& in) {
    Tensor losses = Tensor::empty({5}, in[0].dtype());
    ops::cross_entropy(in[0], in[1], losses, 0.25, Tensor());
    return Tensors{losses};
  };
  c.backward = [](const Tensors& in, const Tensors&, const Tensors& d) {
    // The fused backward gives d(0.25 * sum losses)/dlogits; scale by dloss_i / 0.25 row-wise to match sum d_i*loss_i.
    Tensor losses = Tensor::empty({5}, in[0].dtype()), dl = like_zeros(in[0]);
    ops::cross_entropy(in[0], in[1], losses, 0.25, dl);
    Tensor d_host = d[0].to_device(Device::cpu);  // the row weights, read on the host
    for (int64_t i = 0; i < 5; ++i) ops::scale(dl.slice(i, 1), value_at(d_host, i) / 0.25);
    return Tensors{dl, Tensor()};
  };
  return c;
}

TEST(Ops, CrossEntropy) { check_op(cross_entropy_case()); }

TEST(Ops, CrossEntropyMatchesLogSoftmax) {
  OpCase c = cross_entropy_case();
  Tensor losses = c.forward(c.inputs)[0];
  const Tensor& x = c.inputs[0];
  int32_t targets[5] = {2, 0, -1, 5, 5};
  for (int i = 0; i < 5; ++i) {
    double z = 0;
    for (int j = 0; j < 6; ++j) z += std::exp(value_at(x, i * 6 + j));
    double want = targets[i] < 0 ? 0.0 : std::log(z) - value_at(x, i * 6 + targets[i]);
    EXPECT_NEAR(value_at(losses, i), want, 1e-12);
  }
}

TEST(Ops, AdamWMatchesHandWorkedSteps) {
  // Two steps of AdamW (lr 0.1, betas 0.9/0.999, eps 1e-8, wd 0.01) on p = 1 with gradients 0.5, then -0.2.
  Tensor p = Tensor::empty({1}, DType::f64), g = Tensor::empty({1}, DType::f64);
  Tensor m = Tensor::zeros({1}, DType::f64), v = Tensor::zeros({1}, DType::f64);
  p.data<double>()[0] = 1.0;
  double pw = 1.0, mw = 0, vw = 0;
  double grads[2] = {0.5, -0.2};
  for (int t = 1; t <= 2; ++t) {
    g.data<double>()[0] = grads[t - 1];
    ops::adamw_update(p, g, m, v, 0.1, 0.9, 0.999, 1e-8, 0.01, t);
    mw = 0.9 * mw + 0.1 * grads[t - 1];
    vw = 0.999 * vw + 0.001 * grads[t - 1] * grads[t - 1];
    double mhat = mw / (1 - std::pow(0.9, t)), vhat = vw / (1 - std::pow(0.999, t));
    pw = pw * (1 - 0.1 * 0.01) - 0.1 * mhat / (std::sqrt(vhat) + 1e-8);
    EXPECT_NEAR(p.data<double>()[0], pw, 1e-12) << "step " << t;
  }
}

TEST(Ops, SumSquaresIsExact) {
  Tensor x = random_tensor({10000}, 19);
  double want = 0;
  for (int64_t i = 0; i < x.numel(); ++i) want += value_at(x, i) * value_at(x, i);
  EXPECT_NEAR(ops::sum_squares(x), want, 1e-9 * want);
}

// The ops outside check_op's forward/backward pattern (optimizer update, reductions, in-place elementwise),
// on the CUDA backend against the CPU. Skips without a GPU.
TEST(Ops, CudaUpdateAndReductionsMatchCpu) {
  if (!device_available(Device::cuda)) GTEST_SKIP() << "no CUDA device: CUDA parity of the in-place ops not run";
  auto on_gpu = [](const Tensor& t) { return t.to_device(Device::cuda); };
  for (DType dt : {DType::f32, DType::f64}) {
    SCOPED_TRACE(dtype_name(dt));
    Tensor p = random_tensor({33, 17}, 40, 1.0, dt), g = random_tensor({33, 17}, 41, 1.0, dt);
    Tensor m = random_tensor({33, 17}, 42, 0.1, dt), v = random_tensor({33, 17}, 43, 0.1, dt);
    ops::scale(v, 0.0);
    ops::axpy(1.0, m, v);
    ops::gemm(m, false, m, true, Tensor::empty({33, 33}, dt), 1.0, 0.0);  // warm both backends' paths
    Tensor pg = on_gpu(p), gg = on_gpu(g), mg = on_gpu(m), vg = on_gpu(v);
    for (int64_t step = 1; step <= 3; ++step) {
      ops::adamw_update(p, g, m, v, 0.01, 0.9, 0.95, 1e-8, 0.1, step);
      ops::adamw_update(pg, gg, mg, vg, 0.01, 0.9, 0.95, 1e-8, 0.1, step);
    }
    const double tol = dt == DType::f32 ? 1e-6 : 1e-14;
    EXPECT_LE(max_rel_diff(pg.to_device(Device::cpu), p), tol) << "adamw param";
    EXPECT_LE(max_rel_diff(mg.to_device(Device::cpu), m), tol) << "adamw m";
    EXPECT_LE(max_rel_diff(vg.to_device(Device::cpu), v), tol) << "adamw v";
    EXPECT_NEAR(ops::sum_squares(gg), ops::sum_squares(g), tol * ops::sum_squares(g)) << "sum_squares";
    ops::axpy(-0.5, gg, pg);
    ops::axpy(-0.5, g, p);
    ops::scale(pg, 3.0);
    ops::scale(p, 3.0);
    EXPECT_LE(max_rel_diff(pg.to_device(Device::cpu), p), tol) << "axpy + scale";
    ops::fill(pg, 2.5);
    EXPECT_EQ(value_at(pg.to_device(Device::cpu), 100), 2.5) << "fill";
    Tensor x = random_tensor({3, 5, 4}, 44, 1.0, dt), out = Tensor::empty({5, 3, 4}, dt);
    Tensor outg = Tensor::empty({5, 3, 4}, dt, Device::cuda);
    ops::transpose01(x, out);
    ops::transpose01(on_gpu(x), outg);
    EXPECT_EQ(max_rel_diff(outg.to_device(Device::cpu), out), 0.0) << "transpose01";
  }
}
