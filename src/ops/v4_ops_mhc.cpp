// Shape checks for the V4 mHC, Hadamard and quantisation-simulation ops, then dispatch to the backend.
#include <cmath>

#include "ops/checks.h"
#include "ops/v4_ops.h"

namespace tessera::ops {
using namespace detail;
namespace {

// n of the gate layout, and whether it is a block's (scale (3), M = 2n + n^2) or the head's (scale (1), M = n).
struct Gates {
  int64_t N, M, n;
  bool block;
};
Gates check_gates(const char* op, const Tensor& mix, const Tensor& scale, const Tensor& base, int64_t iters) {
  TS_CHECK(mix.ndim() == 2, op, ": mix must be (N, M), got ", mix.str());
  TS_CHECK(scale.defined() && (scale.shape() == Shape{1} || scale.shape() == Shape{3}), op,
           ": scale must be (3) for a block or (1) for the head, got ", desc(scale));
  Gates g{mix.size(0), mix.size(1), mix.size(1), scale.numel() == 3};
  if (g.block) {
    g.n = std::llround(std::sqrt(double(g.M + 1))) - 1;
    TS_CHECK(g.n >= 1 && 2 * g.n + g.n * g.n == g.M, op, ": a block's mix needs M = 2n + n*n columns, got ",
             mix.str());
    TS_CHECK(iters >= 1, op, ": Sinkhorn iterations must be >= 1, got ", iters);
  }
  TS_CHECK(g.M >= 1, op, ": empty gate layout ", mix.str());
  check_shape(op, "base", base, {g.M});
  return g;
}

// The gate outputs pre (N, n), post (N, n) and comb (N, n, n), or with `grads` their gradients dpre, dpost and
// dcomb, which may be undefined (zero). The head (scale (1)) has pre only.
void check_gate_outputs(const char* op, const Gates& g, bool grads, const Tensor& pre, const Tensor& post,
                        const Tensor& comb) {
  auto check = grads ? check_shape_if_defined : check_shape;
  check(op, grads ? "dpre" : "pre", pre, {g.N, g.n});
  if (g.block) {
    check(op, grads ? "dpost" : "post", post, {g.N, g.n});
    check(op, grads ? "dcomb" : "comb", comb, {g.N, g.n, g.n});
  } else {
    TS_CHECK(!post.defined() && !comb.defined(), op, ": the head (scale (1)) has no post or comb ",
             grads ? "gradients" : "outputs");
  }
}

// hc_collapse's inputs, shared by forward and backward: x (N, n, d), w (N, n) and y, the output or its gradient,
// (N, d).
void check_collapse(const char* op, const Tensor& x, const Tensor& w, const char* y_name, const Tensor& y) {
  check_float(op, x, {&w, &y});
  TS_CHECK(x.ndim() == 3, op, ": x must be (N, n, d), got ", x.str());
  check_shape(op, "w", w, {x.size(0), x.size(1)});
  check_shape(op, y_name, y, {x.size(0), x.size(2)});
}

// hc_expand's inputs, shared by forward and backward: x (N, n, d), f (N, d), post (N, n), comb (N, n, n) and
// out, the output or its gradient, (N, n, d).
void check_expand(const char* op, const Tensor& x, const Tensor& f, const Tensor& post, const Tensor& comb,
                  const char* out_name, const Tensor& out) {
  check_float(op, x, {&f, &post, &comb, &out});
  TS_CHECK(x.ndim() == 3, op, ": x must be (N, n, d), got ", x.str());
  int64_t N = x.size(0), n = x.size(1), d = x.size(2);
  check_shape(op, "f", f, {N, d});
  check_shape(op, "post", post, {N, n});
  check_shape(op, "comb", comb, {N, n, n});
  check_shape(op, out_name, out, {N, n, d});
}

void check_block_size(const char* op, int64_t block) { TS_CHECK(block >= 1, op, ": block must be >= 1, got ", block); }

void check_same_shape(const char* op, const Tensor& x, const Tensor& out) {
  check_float(op, x, {&out});
  TS_CHECK(x.ndim() >= 1 && x.size(-1) >= 1, op, ": the last dim must be non-empty, got ", x.str());
  check_shape(op, "out", out, x.shape());
}

}  // namespace

void hc_gates_forward(const Tensor& mix, const Tensor& scale, const Tensor& base, int64_t iters, double eps,
                      const Tensor& pre, const Tensor& post, const Tensor& comb) {
  const char* op = "hc_gates_forward";
  check_float(op, mix, {&scale, &base, &pre, &post, &comb});
  Gates g = check_gates(op, mix, scale, base, iters);
  check_gate_outputs(op, g, false, pre, post, comb);
  v4(mix).hc_gates_forward(mix, scale, base, iters, eps, pre, post, comb);
}

void hc_gates_backward(const Tensor& mix, const Tensor& scale, const Tensor& base, int64_t iters, double eps,
                       const Tensor& dpre, const Tensor& dpost, const Tensor& dcomb, const Tensor& dmix,
                       const Tensor& dscale, const Tensor& dbase) {
  // Undefined dpre / dpost / dcomb count as zero; undefined dscale / dbase are not accumulated.
  const char* op = "hc_gates_backward";
  check_float(op, mix, {&scale, &base, &dpre, &dpost, &dcomb, &dmix, &dscale, &dbase});
  Gates g = check_gates(op, mix, scale, base, iters);
  check_gate_outputs(op, g, true, dpre, dpost, dcomb);
  check_shape(op, "dmix", dmix, mix.shape());
  check_shape_if_defined(op, "dscale", dscale, scale.shape());
  check_shape_if_defined(op, "dbase", dbase, base.shape());
  v4(mix).hc_gates_backward(mix, scale, base, iters, eps, dpre, dpost, dcomb, dmix, dscale, dbase);
}

void hc_collapse_forward(const Tensor& x, const Tensor& w, const Tensor& y) {
  check_collapse("hc_collapse_forward", x, w, "y", y);
  v4(x).hc_collapse_forward(x, w, y);
}

void hc_collapse_backward(const Tensor& x, const Tensor& w, const Tensor& dy, const Tensor& dx, const Tensor& dw) {
  // An undefined dx or dw is not computed.
  const char* op = "hc_collapse_backward";
  check_collapse(op, x, w, "dy", dy);
  check_float(op, x, {&dx, &dw});
  check_shape_if_defined(op, "dx", dx, x.shape());
  check_shape_if_defined(op, "dw", dw, w.shape());
  v4(x).hc_collapse_backward(x, w, dy, dx, dw);
}

void hc_expand_forward(const Tensor& x, const Tensor& f, const Tensor& post, const Tensor& comb, const Tensor& out) {
  const char* op = "hc_expand_forward";
  check_expand(op, x, f, post, comb, "out", out);
  // Every out[k] reads every x[j]: in place would read overwritten streams.
  TS_CHECK(out.raw() != x.raw(), op, ": out may not alias x");
  v4(x).hc_expand_forward(x, f, post, comb, out);
}

void hc_expand_backward(const Tensor& x, const Tensor& f, const Tensor& post, const Tensor& comb, const Tensor& dout,
                        const Tensor& dx, const Tensor& df, const Tensor& dpost, const Tensor& dcomb) {
  // An undefined dx, df, dpost or dcomb is not computed.
  const char* op = "hc_expand_backward";
  check_expand(op, x, f, post, comb, "dout", dout);
  check_float(op, x, {&dx, &df, &dpost, &dcomb});
  check_shape_if_defined(op, "dx", dx, x.shape());
  check_shape_if_defined(op, "df", df, f.shape());
  check_shape_if_defined(op, "dpost", dpost, post.shape());
  check_shape_if_defined(op, "dcomb", dcomb, comb.shape());
  TS_CHECK(!dx.defined() || dx.raw() != dout.raw(), op, ": dx may not alias dout");
  v4(x).hc_expand_backward(x, f, post, comb, dout, dx, df, dpost, dcomb);
}

void hadamard(const Tensor& x, const Tensor& out) {
  const char* op = "hadamard";
  check_same_shape(op, x, out);
  int64_t D = x.size(-1);
  TS_CHECK((D & (D - 1)) == 0, op, ": the last dim must be a power of two, got ", x.str());
  v4(x).hadamard(x, out);
}

void fake_quant_fp4(const Tensor& x, int64_t block, const Tensor& out) {
  const char* op = "fake_quant_fp4";
  check_same_shape(op, x, out);
  check_block_size(op, block);
  v4(x).fake_quant_fp4(x, block, out);
}

void fake_quant_fp8(const Tensor& x, int64_t block, int64_t dims, const Tensor& out) {
  const char* op = "fake_quant_fp8";
  check_same_shape(op, x, out);
  check_block_size(op, block);
  TS_CHECK(dims >= -1, op, ": dims must be -1 (all) or >= 0, got ", dims);
  v4(x).fake_quant_fp8(x, block, dims, out);
}

}  // namespace tessera::ops
