// Shape, dtype and index checks for the V4 routing, token-movement and compressor ops, then dispatch to the
// backend (contracts: v4_ops.h). Index values are checked when the index tensor is on the host.
#include <string>

#include "ops/checks.h"
#include "ops/v4_ops.h"

namespace tessera::ops {
using namespace detail;
namespace {

void check_matrix(const char* op, const char* what, const Tensor& t) {
  TS_CHECK(t.ndim() == 2, op, ": ", what, " must be 2-D, got ", t.str());
}
int check_score_func(const char* op, ScoreFunc f) {
  int v = static_cast<int>(f);
  TS_CHECK(v >= 0 && v <= 2, op, ": unknown score function ", v);
  return v;
}

// gather_rows (gather) and scatter_add_rows: src and dst matrices of equal width; rows and scale (or undefined)
// have one entry per moved row, a dst row for gather, a src row for scatter, and rows index the other matrix.
void check_row_move(const char* op, bool gather, const Tensor& src, const Tensor& rows, const Tensor& scale,
                    const Tensor& dst) {
  check_float(op, src, {&scale, &dst});
  check_matrix(op, "src", src);
  check_matrix(op, "dst", dst);
  check_shape(op, "dst", dst, {dst.size(0), src.size(1)});
  int64_t moved = gather ? dst.size(0) : src.size(0), indexed = gather ? src.size(0) : dst.size(0);
  check_index(op, "rows", rows, {moved}, src, 0, indexed);
  if (scale.defined()) check_shape(op, "scale", scale, {moved});
}

}  // namespace

ScoreFunc score_func_from_name(const std::string& name) {
  if (name == "sqrtsoftplus") return ScoreFunc::sqrt_softplus;
  if (name == "sigmoid") return ScoreFunc::sigmoid;
  if (name == "softmax") return ScoreFunc::softmax;
  TS_FAIL("unknown router score function '", name, "' (expected sqrtsoftplus, sigmoid or softmax)");
}

void router_scores_forward(const Tensor& logits, ScoreFunc f, const Tensor& scores) {
  const char* op = "router_scores_forward";
  check_float(op, logits, {&scores});
  check_matrix(op, "logits", logits);
  check_shape(op, "scores", scores, logits.shape());
  v4(logits).router_scores_forward(logits, check_score_func(op, f), scores);
}

void router_scores_backward(const Tensor& logits, const Tensor& scores, const Tensor& dscores, ScoreFunc f,
                            const Tensor& dlogits) {
  const char* op = "router_scores_backward";
  check_float(op, logits, {&scores, &dscores, &dlogits});
  check_matrix(op, "logits", logits);
  check_shape(op, "scores", scores, logits.shape());
  check_shape(op, "dscores", dscores, logits.shape());
  check_shape(op, "dlogits", dlogits, logits.shape());
  v4(logits).router_scores_backward(logits, scores, dscores, check_score_func(op, f), dlogits);
}

void topk_indices(const Tensor& scores, const Tensor& bias, const Tensor& idx) {
  const char* op = "topk_indices";
  check_float(op, scores, {&bias});
  check_matrix(op, "scores", scores);
  if (bias.defined()) check_shape(op, "bias", bias, {scores.size(1)});
  TS_CHECK(idx.defined() && idx.dtype() == DType::i32 && idx.is_contiguous() && idx.ndim() == 2 &&
               idx.size(0) == scores.size(0) && idx.device() == scores.device(),
           op, ": idx must be a contiguous i32 (", scores.size(0), ", k) tensor, got ", desc(idx));
  v4(scores).topk_indices(scores, bias, idx);
}

void route_weights_forward(const Tensor& scores, const Tensor& idx, bool normalize, double route_scale,
                           const Tensor& weights) {
  const char* op = "route_weights_forward";
  check_float(op, scores, {&weights});
  check_matrix(op, "scores", scores);
  check_matrix(op, "weights", weights);
  check_shape(op, "weights", weights, {scores.size(0), weights.size(1)});
  check_index(op, "idx", idx, weights.shape(), scores, -1, scores.size(1));
  v4(scores).route_weights_forward(scores, idx, normalize, route_scale, weights);
}

void route_weights_backward(const Tensor& scores, const Tensor& idx, const Tensor& dweights, bool normalize,
                            double route_scale, const Tensor& dscores) {
  const char* op = "route_weights_backward";
  check_float(op, scores, {&dweights, &dscores});
  check_matrix(op, "scores", scores);
  check_matrix(op, "dweights", dweights);
  check_shape(op, "dweights", dweights, {scores.size(0), dweights.size(1)});
  check_shape(op, "dscores", dscores, scores.shape());
  check_index(op, "idx", idx, dweights.shape(), scores, -1, scores.size(1));
  v4(scores).route_weights_backward(scores, idx, dweights, normalize, route_scale, dscores);
}

double balance_loss(const Tensor& scores, const Tensor& idx, double alpha, double grad_scale, const Tensor& dscores) {
  const char* op = "balance_loss";
  check_float(op, scores, {&dscores});
  TS_CHECK(scores.ndim() == 3 && scores.size(1) > 0, op, ": scores must be (B, T, E) with T > 0, got ",
           scores.str());
  TS_CHECK(idx.defined() && idx.ndim() == 3 && idx.size(2) > 0, op, ": idx must be (B, T, k) with k > 0, got ",
           desc(idx));
  check_index(op, "idx", idx, {scores.size(0), scores.size(1), idx.size(2)}, scores, -1, scores.size(2));
  if (dscores.defined()) check_shape(op, "dscores", dscores, scores.shape());
  return v4(scores).balance_loss(scores, idx, alpha, grad_scale, dscores);
}

void gather_rows(const Tensor& src, const Tensor& rows, const Tensor& scale, const Tensor& dst) {
  check_row_move("gather_rows", true, src, rows, scale, dst);
  v4(src).gather_rows(src, rows, scale, dst);
}

void scatter_add_rows(const Tensor& src, const Tensor& rows, const Tensor& scale, const Tensor& dst) {
  check_row_move("scatter_add_rows", false, src, rows, scale, dst);
  v4(src).scatter_add_rows(src, rows, scale, dst);
}

void rows_dot(const Tensor& src, const Tensor& other, const Tensor& rows, const Tensor& out) {
  const char* op = "rows_dot";
  check_float(op, src, {&other, &out});
  check_matrix(op, "src", src);
  check_matrix(op, "other", other);
  check_shape(op, "other", other, {other.size(0), src.size(1)});
  check_shape(op, "out", out, {src.size(0)});
  check_index(op, "rows", rows, {src.size(0)}, src, 0, other.size(0));
  v4(src).rows_dot(src, other, rows, out);
}

// Shared by forward and backward (out is the forward's output or the backward's dout).
static void check_compress(const char* op, const Tensor& kv, const Tensor& score, const Tensor& ape,
                           const Tensor& block_start, const Tensor& prev_start, int64_t m, const Tensor& out) {
  check_float(op, kv, {&score, &ape, &out});
  TS_CHECK(kv.ndim() == 3, op, ": kv must be (B, T, S*c), got ", kv.str());
  TS_CHECK(out.defined() && out.ndim() == 3 && out.size(0) == kv.size(0) && out.size(2) > 0, op,
           ": the output must be (B, NB, c), got ", desc(out), " for kv ", kv.str());
  int64_t B = kv.size(0), T = kv.size(1), NB = out.size(1), c = out.size(2);
  TS_CHECK(kv.size(2) == c || kv.size(2) == 2 * c, op, ": kv's last dim ", kv.size(2), " must be c or 2c for c = ", c);
  int64_t S = kv.size(2) / c;
  TS_CHECK(m >= 1, op, ": block size m must be >= 1, got ", m);
  check_shape(op, "score", score, kv.shape());
  check_shape(op, "ape", ape, {m, S * c});
  // A block's tokens start..start+m-1 must lie inside the sequence.
  check_index(op, "block_start", block_start, {B, NB}, kv, -1, std::max<int64_t>(0, T - m + 1));
  if (S == 2) {
    check_index(op, "prev_start", prev_start, {B, NB}, kv, -1, std::max<int64_t>(0, T - m + 1));
  } else {
    // HCA (S = 1) has no previous block: a value other than -1 would be silently ignored, so reject it.
    check_index(op, "prev_start (must be -1 when S = 1)", prev_start, {B, NB}, kv, -1, 0);
  }
}

void compress_forward(const Tensor& kv, const Tensor& score, const Tensor& ape, const Tensor& block_start,
                      const Tensor& prev_start, int64_t m, const Tensor& out) {
  check_compress("compress_forward", kv, score, ape, block_start, prev_start, m, out);
  v4(kv).compress_forward(kv, score, ape, block_start, prev_start, m, out);
}

void compress_backward(const Tensor& kv, const Tensor& score, const Tensor& ape, const Tensor& block_start,
                       const Tensor& prev_start, int64_t m, const Tensor& dout, const Tensor& dkv,
                       const Tensor& dscore, const Tensor& dape) {
  const char* op = "compress_backward";
  check_compress(op, kv, score, ape, block_start, prev_start, m, dout);
  check_float(op, kv, {&dkv, &dscore, &dape});
  check_shape(op, "dkv", dkv, kv.shape());
  check_shape(op, "dscore", dscore, kv.shape());
  check_shape(op, "dape", dape, ape.shape());
  v4(kv).compress_backward(kv, score, ape, block_start, prev_start, m, dout, dkv, dscore, dape);
}

}  // namespace tessera::ops
