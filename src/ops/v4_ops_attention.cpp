// Shape, dtype and index checks for the V4 sparse attention and lightning indexer ops, then dispatch to the
// backend (contracts: v4_ops.h). Index values are checked when the index tensor is on the host.
#include <cmath>

#include "ops/checks.h"
#include "ops/v4_ops.h"

namespace tessera::ops {
using namespace detail;
namespace {

// The sparse attention's inputs, shared by forward and backward; out is out or dout, lse (B,T,H).
void check_sparse(const char* op, const Tensor& q, const Tensor& kv, const Tensor& ckv, const Tensor& cidx,
                  const Tensor& sink, const Tensor& doc, int64_t window, const Tensor& out, const Tensor& lse) {
  check_float(op, q, {&kv, &ckv, &sink, &out, &lse});
  TS_CHECK(q.ndim() == 4, op, ": q must be (B, T, H, D), got ", q.str());
  int64_t B = q.size(0), T = q.size(1), H = q.size(2), D = q.size(3);
  TS_CHECK(window >= 1, op, ": window must be >= 1, got ", window);
  check_shape(op, "kv", kv, {B, T, D});
  check_shape(op, "sink", sink, {H});
  check_shape(op, "out", out, q.shape());
  check_shape(op, "lse", lse, {B, T, H});
  if (doc.defined()) check_i32(op, "doc", doc, {B, T}, q);
  if (cidx.defined()) {
    TS_CHECK(ckv.defined() && ckv.ndim() == 3, op, ": ckv must be (B, NB, D) when cidx is defined, got ", desc(ckv));
    check_shape(op, "ckv", ckv, {B, ckv.size(1), D});
    TS_CHECK(cidx.ndim() == 3, op, ": cidx must be (B, T, K), got ", cidx.str());
    check_index(op, "cidx", cidx, {B, T, cidx.size(2)}, q, -1, ckv.size(1));
  } else if (ckv.defined()) {
    TS_CHECK(ckv.ndim() == 3, op, ": ckv must be (B, NB, D), got ", ckv.str());
    check_shape(op, "ckv", ckv, {B, ckv.size(1), D});
  }
}

}  // namespace

void sparse_attention_forward(const Tensor& q, const Tensor& kv, const Tensor& ckv, const Tensor& cidx,
                              const Tensor& sink, const Tensor& doc, int64_t window, double scale, const Tensor& out,
                              const Tensor& lse) {
  check_sparse("sparse_attention_forward", q, kv, ckv, cidx, sink, doc, window, out, lse);
  v4(q).sparse_attention_forward(q, kv, ckv, cidx, sink, doc, window, scale, out, lse);
}

void sparse_attention_backward(const Tensor& q, const Tensor& kv, const Tensor& ckv, const Tensor& cidx,
                               const Tensor& sink, const Tensor& doc, int64_t window, double scale,
                               const Tensor& out, const Tensor& lse, const Tensor& dout, const Tensor& dq,
                               const Tensor& dkv, const Tensor& dckv, const Tensor& dsink) {
  const char* op = "sparse_attention_backward";
  check_sparse(op, q, kv, ckv, cidx, sink, doc, window, out, lse);
  check_float(op, q, {&dout, &dq, &dkv, &dckv, &dsink});
  check_shape(op, "dout", dout, q.shape());
  check_shape(op, "dq", dq, q.shape());
  check_shape(op, "dkv", dkv, kv.shape());
  check_shape(op, "dsink", dsink, sink.shape());
  if (cidx.defined()) check_shape(op, "dckv (required when cidx is defined)", dckv, ckv.shape());
  else if (dckv.defined()) check_shape(op, "dckv", dckv, ckv.defined() ? ckv.shape() : dckv.shape());
  v4(q).sparse_attention_backward(q, kv, ckv, cidx, sink, doc, window, scale, out, lse, dout, dq, dkv, dckv, dsink);
}

void sparse_attention_cprob(const Tensor& q, const Tensor& ckv, const Tensor& cidx, const Tensor& lse, double scale,
                            const Tensor& cprob) {
  const char* op = "sparse_attention_cprob";
  check_float(op, q, {&ckv, &lse, &cprob});
  TS_CHECK(q.ndim() == 4, op, ": q must be (B, T, H, D), got ", q.str());
  int64_t B = q.size(0), T = q.size(1), H = q.size(2), D = q.size(3);
  TS_CHECK(ckv.defined() && ckv.ndim() == 3, op, ": ckv must be (B, NB, D), got ", desc(ckv));
  check_shape(op, "ckv", ckv, {B, ckv.size(1), D});
  TS_CHECK(cidx.defined() && cidx.ndim() == 3, op, ": cidx must be (B, T, K), got ", desc(cidx));
  check_index(op, "cidx", cidx, {B, T, cidx.size(2)}, q, -1, ckv.size(1));
  check_shape(op, "lse", lse, {B, T, H});
  check_shape(op, "cprob", cprob, cidx.shape());
  v4(q).sparse_attention_cprob(q, ckv, cidx, lse, scale, cprob);
}

// The indexer's inputs, shared by forward and backward; scores is scores or dscores.
static void check_indexer(const char* op, const Tensor& qi, const Tensor& ki, const Tensor& w,
                          const Tensor& vis_begin, const Tensor& vis_end, const Tensor& scores) {
  check_float(op, qi, {&ki, &w, &scores});
  TS_CHECK(qi.ndim() == 4, op, ": qi must be (B, T, HI, DI), got ", qi.str());
  int64_t B = qi.size(0), T = qi.size(1), HI = qi.size(2), DI = qi.size(3);
  TS_CHECK(ki.defined() && ki.ndim() == 3, op, ": ki must be (B, NB, DI), got ", desc(ki));
  int64_t NB = ki.size(1);
  check_shape(op, "ki", ki, {B, NB, DI});
  check_shape(op, "w", w, {B, T, HI});
  check_index(op, "vis_begin", vis_begin, {B, T}, qi, 0, NB + 1);
  check_index(op, "vis_end", vis_end, {B, T}, qi, 0, NB + 1);
  if (vis_begin.device() == Device::cpu) {
    const int32_t *b = vis_begin.data<int32_t>(), *e = vis_end.data<int32_t>();
    for (int64_t i = 0; i < B * T; ++i)
      if (b[i] > e[i])
        TS_FAIL(op, ": visible range [", b[i], ", ", e[i], ") at flat position ", i, " ends before it begins");
  }
  check_shape(op, "scores", scores, {B, T, NB});
}

void indexer_scores_forward(const Tensor& qi, const Tensor& ki, const Tensor& w, const Tensor& vis_begin,
                            const Tensor& vis_end, const Tensor& scores) {
  check_indexer("indexer_scores_forward", qi, ki, w, vis_begin, vis_end, scores);
  v4(qi).indexer_scores_forward(qi, ki, w, vis_begin, vis_end, scores);
}

void indexer_scores_backward(const Tensor& qi, const Tensor& ki, const Tensor& w, const Tensor& vis_begin,
                             const Tensor& vis_end, const Tensor& dscores, const Tensor& dqi, const Tensor& dki,
                             const Tensor& dw) {
  const char* op = "indexer_scores_backward";
  check_indexer(op, qi, ki, w, vis_begin, vis_end, dscores);
  check_float(op, qi, {&dqi, &dki, &dw});
  check_shape(op, "dqi", dqi, qi.shape());
  check_shape(op, "dki", dki, ki.shape());
  check_shape(op, "dw", dw, w.shape());
  v4(qi).indexer_scores_backward(qi, ki, w, vis_begin, vis_end, dscores, dqi, dki, dw);
}

// Rows are all leading dims (R, S) or any (..., S) alike; the target must be zero where a score is not finite.
double indexer_kl(const Tensor& scores, const Tensor& target, double grad_scale, const Tensor& dscores) {
  const char* op = "indexer_kl";
  check_float(op, scores, {&target, &dscores});
  TS_CHECK(scores.ndim() >= 1, op, ": scores must be (R, S), got ", scores.str());
  check_shape(op, "target", target, scores.shape());
  if (dscores.defined()) check_shape(op, "dscores", dscores, scores.shape());
  if (scores.device() == Device::cpu) {
    for (int64_t i = 0; i < scores.numel(); ++i) {
      double z = scores.dtype() == DType::f32 ? scores.data<float>()[i] : scores.data<double>()[i];
      double t = target.dtype() == DType::f32 ? target.data<float>()[i] : target.data<double>()[i];
      if (t != 0 && !std::isfinite(z))
        TS_FAIL(op, ": target ", t, " at flat position ", i, " is non-zero where the score is ", z);
    }
  }
  return v4(scores).indexer_kl(scores, target, grad_scale, dscores);
}

}  // namespace tessera::ops
