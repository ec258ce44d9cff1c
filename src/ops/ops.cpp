#include "ops/ops.h"

#include <cmath>
#include <cstring>

#include "ops/checks.h"

namespace tessera::ops {
using namespace detail;

void gemm(const Tensor& a, bool ta, const Tensor& b, bool tb, const Tensor& c, double alpha, double beta) {
  check_float("gemm", c, {&a, &b});
  TS_CHECK(a.ndim() == c.ndim() && b.ndim() == c.ndim() && (c.ndim() == 2 || c.ndim() == 3),
           "gemm: ranks ", a.str(), " ", b.str(), " ", c.str());
  int64_t m = ta ? a.size(-1) : a.size(-2), ka = ta ? a.size(-2) : a.size(-1);
  int64_t kb = tb ? b.size(-1) : b.size(-2), n = tb ? b.size(-2) : b.size(-1);
  TS_CHECK(ka == kb && m == c.size(-2) && n == c.size(-1), "gemm: ", a.str(), (ta ? "^T" : ""), " @ ", b.str(),
           (tb ? "^T" : ""), " -> ", c.str());
  if (c.ndim() == 3)
    TS_CHECK((a.size(0) == c.size(0) || a.size(0) == 1) && (b.size(0) == c.size(0) || b.size(0) == 1),
             "gemm: batch sizes ", a.str(), " ", b.str(), " ", c.str());
  be(c).gemm(a, ta, b, tb, c, alpha, beta);
}

void linear_forward(const Tensor& x, const Tensor& w, const Tensor& y) { gemm(x, false, w, true, y); }

void linear_backward(const Tensor& x, const Tensor& w, const Tensor& dy, const Tensor& dx, const Tensor& dw) {
  if (dx.defined()) gemm(dy, false, w, false, dx);
  if (dw.defined()) gemm(dy, true, x, false, dw, 1.0, 1.0);
}

void transpose01(const Tensor& x, const Tensor& out) {
  check_float("transpose01", x, {&out});
  TS_CHECK(x.ndim() == 3, "transpose01: x must be 3-D, got ", x.str());
  check_shape("transpose01", "out", out, {x.size(1), x.size(0), x.size(2)});
  be(x).transpose01(x, out);
}

void fill(const Tensor& x, double value) {
  check_float("fill", x, {});
  be(x).fill(x, value);
}
void zero(const Tensor& x) { fill(x, 0.0); }

void axpy(double alpha, const Tensor& x, const Tensor& y) {
  check_float("axpy", y, {&x});
  TS_CHECK(x.numel() == y.numel(), "axpy: ", x.str(), " into ", y.str());
  be(y).axpy(alpha, x, y);
}

void scale(const Tensor& x, double alpha) {
  check_float("scale", x, {});
  be(x).scale(x, alpha);
}

void copy(const Tensor& src, const Tensor& dst) {
  TS_CHECK(src.numel() == dst.numel() && src.dtype() == dst.dtype() && src.is_contiguous() && dst.is_contiguous(),
           "copy: ", src.str(), " -> ", dst.str());
  dst.copy_from(src.reshape(dst.shape()));  // any devices
}

double sum_squares(const Tensor& x) {
  check_float("sum_squares", x, {});
  return be(x).sum_squares(x);
}

void embedding_forward(const Tensor& ids, const Tensor& table, const Tensor& out) {
  check_float("embedding_forward", table, {&out});
  check_ids("embedding_forward", ids, out.size(0));
  check_shape("embedding_forward", "out", out, {ids.numel(), table.size(1)});
  if (ids.device() == Device::cpu) {
    const int32_t* p = ids.data<int32_t>();
    for (int64_t i = 0; i < ids.numel(); ++i)
      if (p[i] < 0 || p[i] >= table.size(0))
        TS_FAIL("token id ", p[i], " at position ", i, " is outside the vocabulary [0, ", table.size(0), ")");
  }
  be(table).embedding_forward(ids, table, out);
}

void embedding_backward(const Tensor& ids, const Tensor& dout, const Tensor& dtable) {
  check_float("embedding_backward", dtable, {&dout});
  check_ids("embedding_backward", ids, dout.size(0));
  check_shape("embedding_backward", "dout", dout, {ids.numel(), dtable.size(1)});
  be(dtable).embedding_backward(ids, dout, dtable);
}

void rmsnorm_forward(const Tensor& x, const Tensor& weight, double eps, const Tensor& out, const Tensor& rstd) {
  check_float("rmsnorm_forward", x, {&weight, &out, &rstd});
  TS_CHECK(x.ndim() == 2, "rmsnorm_forward: x must be (N, C), got ", x.str());
  if (weight.defined()) check_shape("rmsnorm_forward", "weight", weight, {x.size(1)});
  check_shape("rmsnorm_forward", "out", out, x.shape());
  check_shape("rmsnorm_forward", "rstd", rstd, {x.size(0)});
  be(x).rmsnorm_forward(x, weight, eps, out, rstd);
}

void rmsnorm_backward(const Tensor& x, const Tensor& weight, const Tensor& rstd, const Tensor& dout,
                      const Tensor& dx, const Tensor& dweight) {
  check_float("rmsnorm_backward", x, {&weight, &rstd, &dout, &dx, &dweight});
  check_shape("rmsnorm_backward", "dout", dout, x.shape());
  check_shape("rmsnorm_backward", "dx", dx, x.shape());
  if (dweight.defined()) check_shape("rmsnorm_backward", "dweight", dweight, {x.size(1)});
  be(x).rmsnorm_backward(x, weight, rstd, dout, dx, dweight);
}

static void check_rope(const Tensor& x, const Tensor& positions, int64_t rotary_dim, const Tensor& out) {
  check_float("rope", x, {&out});
  TS_CHECK(x.ndim() == 4, "rope: x must be (B, T, H, D), got ", x.str());
  check_shape("rope", "out", out, x.shape());
  check_ids("rope", positions, x.size(0) * x.size(1));
  TS_CHECK(rotary_dim > 0 && rotary_dim % 2 == 0 && rotary_dim <= x.size(3), "rope: rotary_dim ", rotary_dim,
           " must be even and at most the head dim ", x.size(3));
}

Tensor rope_inv_freq(double theta, int64_t rotary_dim) {
  Tensor f = Tensor::empty({rotary_dim / 2}, DType::f64);
  for (int64_t i = 0; i < rotary_dim / 2; ++i) f.data<double>()[i] = std::pow(theta, -2.0 * double(i) / double(rotary_dim));
  return f;
}

static void check_freqs(const Tensor& inv_freq) {
  TS_CHECK(inv_freq.dtype() == DType::f64 && inv_freq.ndim() == 1 && inv_freq.is_contiguous() &&
               inv_freq.device() == Device::cpu,
           "rope: inv_freq must be a host f64 vector, got ", inv_freq.str());
}

void rope_forward(const Tensor& x, const Tensor& positions, const Tensor& inv_freq, bool interleaved,
                  const Tensor& out) {
  check_freqs(inv_freq);
  check_rope(x, positions, 2 * inv_freq.numel(), out);
  be(x).rope(x, positions, inv_freq, interleaved, false, out);
}

void rope_backward(const Tensor& dout, const Tensor& positions, const Tensor& inv_freq, bool interleaved,
                   const Tensor& dx) {
  check_freqs(inv_freq);
  check_rope(dout, positions, 2 * inv_freq.numel(), dx);
  be(dout).rope(dout, positions, inv_freq, interleaved, true, dx);
}

void rope_forward(const Tensor& x, const Tensor& positions, double theta, int64_t rotary_dim, bool interleaved,
                  const Tensor& out) {
  rope_forward(x, positions, rope_inv_freq(theta, rotary_dim), interleaved, out);
}

void rope_backward(const Tensor& dout, const Tensor& positions, double theta, int64_t rotary_dim, bool interleaved,
                   const Tensor& dx) {
  rope_backward(dout, positions, rope_inv_freq(theta, rotary_dim), interleaved, dx);
}

void swiglu_forward(const Tensor& gate, const Tensor& up, const Tensor& out, double limit) {
  TS_CHECK(limit >= 0, "swiglu_forward: limit must be >= 0 (0 = no clamp), got ", limit);
  check_float("swiglu_forward", gate, {&up, &out});
  check_shape("swiglu_forward", "up", up, gate.shape());
  check_shape("swiglu_forward", "out", out, gate.shape());
  be(gate).swiglu_forward(gate, up, limit, out);
}

void swiglu_backward(const Tensor& gate, const Tensor& up, const Tensor& dout, const Tensor& dgate,
                     const Tensor& dup, double limit) {
  check_float("swiglu_backward", gate, {&up, &dout, &dgate, &dup});
  for (const Tensor* t : {&up, &dout, &dgate, &dup}) check_shape("swiglu_backward", "operand", *t, gate.shape());
  be(gate).swiglu_backward(gate, up, limit, dout, dgate, dup);
}

void softmax_forward(const Tensor& x, const Tensor& out) {
  check_float("softmax_forward", x, {&out});
  TS_CHECK(x.ndim() == 2, "softmax_forward: x must be (N, C), got ", x.str());
  check_shape("softmax_forward", "out", out, x.shape());
  be(x).softmax_forward(x, out);
}

void softmax_backward(const Tensor& y, const Tensor& dy, const Tensor& dx) {
  check_float("softmax_backward", y, {&dy, &dx});
  check_shape("softmax_backward", "dy", dy, y.shape());
  check_shape("softmax_backward", "dx", dx, y.shape());
  be(y).softmax_backward(y, dy, dx);
}

static void check_attention(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& doc, const Tensor& out,
                            const Tensor& lse) {
  check_float("attention", q, {&k, &v, &out, &lse});
  TS_CHECK(q.ndim() == 4 && k.ndim() == 4, "attention: q, k, v must be (B, T, H, D), got ", q.str(), " ", k.str());
  int64_t B = q.size(0), T = q.size(1), H = q.size(2), D = q.size(3), KH = k.size(2);
  TS_CHECK(KH > 0 && H % KH == 0, "attention: ", H, " query heads do not group over ", KH, " kv heads");
  check_shape("attention", "k", k, {B, T, KH, D});
  check_shape("attention", "v", v, {B, T, KH, D});
  check_shape("attention", "out", out, q.shape());
  check_shape("attention", "lse", lse, {B, H, T});
  if (doc.defined())
    TS_CHECK(doc.dtype() == DType::i32 && doc.shape() == Shape({B, T}), "attention: doc must be i32 (B, T), got ",
             doc.str());
}

void attention_forward(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& doc, double scale,
                       const Tensor& out, const Tensor& lse) {
  check_attention(q, k, v, doc, out, lse);
  be(q).attention_forward(q, k, v, doc, scale, out, lse);
}

void attention_decode(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& q_pos, double scale,
                      const Tensor& out) {
  check_float("attention_decode", q, {&k, &v, &out});
  TS_CHECK(q.ndim() == 4 && k.ndim() == 4, "attention_decode: q (B, t, H, D), k (B, L, KH, D), got ", q.str(), " ",
           k.str());
  int64_t B = q.size(0), t = q.size(1), H = q.size(2), D = q.size(3), L = k.size(1), KH = k.size(2);
  TS_CHECK(KH > 0 && H % KH == 0, "attention_decode: ", H, " query heads do not group over ", KH, " kv heads");
  check_shape("attention_decode", "k", k, {B, L, KH, D});
  check_shape("attention_decode", "v", v, {B, L, KH, D});
  check_shape("attention_decode", "out", out, q.shape());
  TS_CHECK(q_pos.dtype() == DType::i32 && q_pos.shape() == Shape({B, t}) && q_pos.device() == q.device(),
           "attention_decode: q_pos must be i32 (B, t) on q's device, got ", q_pos.str());
  be(q).attention_decode(q, k, v, q_pos, scale, out);
}

void attention_backward(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& doc, double scale,
                        const Tensor& out, const Tensor& lse, const Tensor& dout, const Tensor& dq,
                        const Tensor& dk, const Tensor& dv) {
  check_attention(q, k, v, doc, out, lse);
  check_float("attention_backward", q, {&dout, &dq, &dk, &dv});
  check_shape("attention_backward", "dout", dout, q.shape());
  check_shape("attention_backward", "dq", dq, q.shape());
  check_shape("attention_backward", "dk", dk, k.shape());
  check_shape("attention_backward", "dv", dv, v.shape());
  be(q).attention_backward(q, k, v, doc, scale, out, lse, dout, dq, dk, dv);
}

void cross_entropy(const Tensor& logits, const Tensor& targets, const Tensor& losses, double loss_scale,
                   const Tensor& dlogits) {
  check_float("cross_entropy", logits, {&losses, &dlogits});
  TS_CHECK(logits.ndim() == 2, "cross_entropy: logits must be (N, V), got ", logits.str());
  check_ids("cross_entropy", targets, logits.size(0));
  check_shape("cross_entropy", "losses", losses, {logits.size(0)});
  if (dlogits.defined()) check_shape("cross_entropy", "dlogits", dlogits, logits.shape());
  if (targets.device() == Device::cpu) {
    const int32_t* t = targets.data<int32_t>();
    for (int64_t i = 0; i < targets.numel(); ++i)
      if (t[i] >= logits.size(1))
        TS_FAIL("target id ", t[i], " at position ", i, " is outside the vocabulary [0, ", logits.size(1), ")");
  }
  be(logits).cross_entropy(logits, targets, losses, loss_scale, dlogits);
}

void adamw_update(const Tensor& param, const Tensor& grad, const Tensor& m, const Tensor& v, double lr, double beta1,
                  double beta2, double eps, double weight_decay, int64_t step) {
  check_float("adamw_update", param, {&grad, &m, &v});
  for (const Tensor* t : {&grad, &m, &v}) check_shape("adamw_update", "state", *t, param.shape());
  TS_CHECK(step >= 1, "adamw_update: step counts from 1");
  double bc1 = 1.0 - std::pow(beta1, double(step)), bc2 = 1.0 - std::pow(beta2, double(step));
  be(param).adamw_update(param, grad, m, v, lr, beta1, beta2, eps, weight_decay, bc1, bc2);
}

}  // namespace tessera::ops
