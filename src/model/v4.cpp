#include "model/v4.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <numbers>

#include "core/rng.h"
#include "model/vocab_parallel.h"
#include "parallel/communicator.h"
#include "ops/ops.h"
#include "ops/v4_ops.h"

namespace tessera {
namespace {

using std::string;

// dx += dy @ w; dw += dy^T x (either may be undefined): a linear layer whose input feeds several branches.
void linear_backward_acc(const Tensor& x, const Tensor& w, const Tensor& dy, const Tensor& dx, const Tensor& dw) {
  if (dx.defined()) ops::gemm(dy, false, w, false, dx, 1.0, 1.0);
  if (dw.defined()) ops::gemm(dy, true, x, false, dw, 1.0, 1.0);
}

Tensor linear(const Tensor& x, const Param& w) {
  Tensor y = Tensor::empty({x.size(0), w.value.size(0)}, x.dtype());
  ops::linear_forward(x, w.value, y);
  return y;
}

// A tensor's contents on the host: itself when it is there, else a copy (one device-to-host transfer).
Tensor on_host(const Tensor& t) { return !t.defined() || t.device() == Device::cpu ? t : t.to_device(Device::cpu); }
// A (host-built) tensor on `device`: itself when it is there, else a copy.
Tensor on_device(const Tensor& t, Device device) {
  return !t.defined() || t.device() == device ? t : t.to_device(device);
}

double sum_of(const Tensor& device_t) {
  const Tensor t = on_host(device_t);
  double s = 0;  // in order: deterministic
  for (int64_t i = 0; i < t.numel(); ++i) s += t.dtype() == DType::f32 ? t.data<float>()[i] : t.data<double>()[i];
  return s;
}

// max_i t_i (or max_i |t_i|) over a float tensor: a host loop (after one copy to the host for a device tensor),
// for the spike instrumentation. -inf when empty.
double max_of(const Tensor& device_t, bool abs) {
  const Tensor t = on_host(device_t);
  double m = -std::numeric_limits<double>::infinity();
  const int64_t n = t.numel();
  auto scan = [&](const auto* p) {
    for (int64_t i = 0; i < n; ++i) m = std::max(m, abs ? std::abs(double(p[i])) : double(p[i]));
  };
  if (t.dtype() == DType::f32) scan(t.data<float>());
  else scan(t.data<double>());
  return m;
}

// Sums t over the tensor-parallel group in place (nothing without one): a part each rank computed from its heads,
// hidden units or tokens becomes the whole, the same on every rank.
void sum_over(Communicator* tp, const Tensor& t) {
  if (tp && t.defined()) tp->all_reduce(t);
}

// Constant tensors of the batch: n ones per token, and the (n, n) zero and identity mixing matrices.
struct Constants {
  Tensor ones, zeros_nn, eye_nn, zeros_nd;
};

// Everything a forward pass shares across layers.
struct Context {
  Device device = Device::cpu;  // the model's
  TokenBatch batch;       // on the model's device
  TokenBatch host_batch;  // the same on the host, for the index bookkeeping
  int64_t B = 0, T = 0, N = 0;
  Tensor positions;  // (N) i32
  std::vector<BlockLayout> layouts;       // by ratio (found by m), on the model's device
  std::vector<BlockLayout> host_layouts;  // the same on the host
  std::vector<Tensor> all_visible;        // per layout: HCA's (B, T, max_visible) indices, built on first use
  Constants k;
  bool backward = false;
  // Tensor parallelism (V4Model::set_tensor_parallel): the group, and the tokens [tok_begin, tok_end) whose rows
  // this rank's routed experts compute (all N without it).
  Communicator* tp = nullptr;
  int64_t tok_begin = 0, tok_end = -1;  // -1: all N
  double loss_scale = 0;   // forward_backward's scale
  double aux_scale = 0;    // gradient multiplier of the per-batch auxiliary losses: loss_scale * N_tgt
  double indexer_kl_sum = 0, balance_loss = 0;

  const BlockLayout& layout(int64_t m) const { return layouts[layout_index(m)]; }
  const BlockLayout& host_layout(int64_t m) const { return host_layouts[layout_index(m)]; }
  size_t layout_index(int64_t m) const {
    for (size_t i = 0; i < layouts.size(); ++i)
      if (layouts[i].m == m) return i;
    TS_FAIL("no block layout for ratio ", m);
  }
};

// ------------------------------------------------------------------------------------------------ mHC site
struct HyperConn {
  Param fn, base, scale;
  int64_t n = 0, iters = 0;
  double eps = 0, norm_eps = 0;
  // Forward state.
  Tensor X, rstd, xn, mix, pre, post, comb, f;
  Tensor dX;  // the residual path's part of dX, from expand's backward

  HyperConn() = default;
  HyperConn(const string& p, int64_t n_, int64_t d, const ModelConfig& c, DType dt, bool head)
      : n(n_), iters(c.hc_sinkhorn_iters), eps(c.hc_eps), norm_eps(c.norm_eps) {
    int64_t M = head ? n : 2 * n + n * n;
    fn = make_param(p + "fn", ParamKind::matrix, {M, n * d}, dt);
    base = make_param(p + "base", ParamKind::vector, {M}, dt);
    scale = make_param(p + "scale", ParamKind::vector, {head ? 1 : 3}, dt);
  }
  bool is_head() const { return fn.value.size(0) == n; }

  // y (N, d) = sum_j pre_j X_j, with the gates from the folded-RMS projection of vec(X).
  Tensor collapse(const Tensor& X_) {
    X = X_;
    const int64_t N = X.size(0), d = X.size(2);
    Tensor flat = X.reshape({N, n * d});
    xn = Tensor::empty(flat.shape(), X.dtype());
    rstd = Tensor::empty({N}, X.dtype());
    ops::rmsnorm_forward(flat, Tensor(), norm_eps, xn, rstd);
    mix = linear(xn, fn);
    pre = Tensor::empty({N, n}, X.dtype());
    if (!is_head()) {
      post = Tensor::empty({N, n}, X.dtype());
      comb = Tensor::empty({N, n, n}, X.dtype());
    }
    ops::hc_gates_forward(mix, scale.value, base.value, iters, eps, pre, post, comb);
    Tensor y = Tensor::empty({N, d}, X.dtype());
    ops::hc_collapse_forward(X, pre, y);
    return y;
  }
  // X'_k = post_k f + sum_j comb_jk X_j.
  Tensor expand(const Tensor& f_) {
    f = f_;
    Tensor out = Tensor::empty(X.shape(), X.dtype());
    ops::hc_expand_forward(X, f, post, comb, out);
    return out;
  }
  // Returns df; keeps the residual path's dX.
  Tensor backward_expand(const Tensor& dout) {
    dX = Tensor::empty(X.shape(), X.dtype());
    Tensor df = Tensor::empty(f.shape(), f.dtype());
    dpost_ = Tensor::empty(post.shape(), post.dtype());
    dcomb_ = Tensor::empty(comb.shape(), comb.dtype());
    ops::hc_expand_backward(X, f, post, comb, dout, dX, df, dpost_, dcomb_);
    return df;
  }
  // Given dy, returns the total dX (adding the residual path's part when expand ran).
  Tensor backward_collapse(const Tensor& dy) {
    const int64_t N = X.size(0), d = X.size(2);
    Tensor dXc = Tensor::empty(X.shape(), X.dtype()), dpre = Tensor::empty(pre.shape(), pre.dtype());
    ops::hc_collapse_backward(X, pre, dy, dXc, dpre);
    Tensor dmix = Tensor::empty(mix.shape(), mix.dtype());
    ops::hc_gates_backward(mix, scale.value, base.value, iters, eps, dpre, dpost_, dcomb_, dmix, scale.grad,
                           base.grad);
    Tensor dxn = Tensor::empty(xn.shape(), xn.dtype());
    ops::linear_backward(xn, fn.value, dmix, dxn, fn.grad);
    Tensor dflat = Tensor::empty({N, n * d}, X.dtype());
    ops::rmsnorm_backward(X.reshape({N, n * d}), Tensor(), rstd, dxn, dflat, Tensor());
    ops::axpy(1.0, dXc, dflat.reshape(X.shape()));
    if (dX.defined()) ops::axpy(1.0, dX, dflat.reshape(X.shape()));
    dX = Tensor();
    return dflat.reshape(X.shape());
  }
  ParamList params() { return {&fn, &base, &scale}; }

 private:
  Tensor dpost_, dcomb_;
};

// ------------------------------------------------------------------------------------------------ Compressor
struct Compressor {
  Param wkv, wgate, ape, norm;
  int64_t m = 0, S = 0, c = 0;
  Tensor kvp, score, blocks, rstd, normed;  // forward state

  Compressor() = default;
  Compressor(const string& p, int64_t m_, bool overlap, int64_t c_, int64_t d, DType dt) : m(m_), S(overlap ? 2 : 1), c(c_) {
    wkv = make_param(p + "wkv", ParamKind::matrix, {S * c, d}, dt);
    wgate = make_param(p + "wgate", ParamKind::matrix, {S * c, d}, dt);
    ape = make_param(p + "ape", ParamKind::vector, {m, S * c}, dt);
    norm = make_param(p + "norm", ParamKind::vector, {c}, dt);
  }
  // (B, NB, c): the normalised compressed entries (RoPE is applied by the caller).
  Tensor forward(const Tensor& h, const BlockLayout& L, int64_t B, int64_t T, double eps) {
    kvp = linear(h, wkv).reshape({B, T, S * c});
    score = linear(h, wgate).reshape({B, T, S * c});
    blocks = Tensor::empty({B, L.NB, c}, h.dtype());
    ops::compress_forward(kvp, score, ape.value, L.block_start, S == 2 ? L.prev_start : L.no_prev, m, blocks);
    normed = Tensor::empty({B * L.NB, c}, h.dtype());
    rstd = Tensor::empty({B * L.NB}, h.dtype());
    ops::rmsnorm_forward(blocks.reshape({B * L.NB, c}), norm.value, eps, normed, rstd);
    return normed.reshape({B, L.NB, c});
  }
  // dnormed (B, NB, c) -> parameter grads, and dh += (if defined).
  void backward(const Tensor& h, const BlockLayout& L, const Tensor& dnormed, const Tensor& dh) {
    const int64_t B = blocks.size(0), T = kvp.size(1), N = B * T;
    Tensor dblocks = Tensor::empty(blocks.shape(), blocks.dtype());
    ops::rmsnorm_backward(blocks.reshape({B * L.NB, c}), norm.value, rstd, dnormed.reshape({B * L.NB, c}),
                          dblocks.reshape({B * L.NB, c}), norm.grad);
    Tensor dkv = Tensor::empty(kvp.shape(), kvp.dtype()), dscore = Tensor::empty(score.shape(), score.dtype());
    ops::compress_backward(kvp, score, ape.value, L.block_start, S == 2 ? L.prev_start : L.no_prev, m, dblocks, dkv,
                           dscore, ape.grad);
    linear_backward_acc(h, wkv.value, dkv.reshape({N, S * c}), dh, wkv.grad);
    linear_backward_acc(h, wgate.value, dscore.reshape({N, S * c}), dh, wgate.grad);
  }
  ParamList params() { return {&wkv, &wgate, &ape, &norm}; }
};

// ------------------------------------------------------------------------------------------------ Attention
struct Attention {
  Param wq_a, q_norm, wq_b, wkv, kv_norm, sink, wo_a, wo_b;
  std::optional<Compressor> comp;
  // Lightning indexer (CSA layers).
  Param iwq_b, iweights;
  std::optional<Compressor> icomp;
  int64_t ratio = 0;
  bool csa = false;
  Tensor inv_freq;
  const ModelConfig* cfg = nullptr;

  // Forward state.
  Tensor h, cqa, cq, rstd_cq, qraw, rstd_q, q, kvraw, rstd_kv, kv, ckv, cidx, out, lse, og_t, z;
  Tensor qi, ki, iw, iscores;

  Attention() = default;
  Attention(const string& p, int64_t ratio_, const ModelConfig& c, DType dt) : ratio(ratio_), cfg(&c) {
    const int64_t d = c.dim, H = c.n_heads, hd = c.head_dim, g = c.o_groups;
    csa = ratio > 0 && ratio == c.csa_ratio;
    wq_a = make_param(p + "wq_a", ParamKind::matrix, {c.q_lora_rank, d}, dt);
    q_norm = make_param(p + "q_norm", ParamKind::vector, {c.q_lora_rank}, dt);
    wq_b = make_param(p + "wq_b", ParamKind::matrix, {H * hd, c.q_lora_rank}, dt);
    wkv = make_param(p + "wkv", ParamKind::matrix, {hd, d}, dt);
    kv_norm = make_param(p + "kv_norm", ParamKind::vector, {hd}, dt);
    sink = make_param(p + "sink", ParamKind::vector, {H}, dt);
    wo_a = make_param(p + "wo_a", ParamKind::matrix, {g, c.o_lora_rank, H * hd / g}, dt);
    wo_b = make_param(p + "wo_b", ParamKind::matrix, {d, g * c.o_lora_rank}, dt);
    if (ratio > 0) comp.emplace(p + "compressor.", ratio, csa, hd, d, dt);
    if (csa) {
      iwq_b = make_param(p + "indexer.wq_b", ParamKind::matrix, {c.index_n_heads * c.index_head_dim, c.q_lora_rank}, dt);
      iweights = make_param(p + "indexer.weights_proj", ParamKind::matrix, {c.index_n_heads, d}, dt);
      icomp.emplace(p + "indexer.compressor.", ratio, true, c.index_head_dim, d, dt);
    }
    inv_freq = v4_inv_freq(c, ratio > 0);
  }

  ParamList params() {
    ParamList ps{&wq_a, &q_norm, &wq_b, &wkv, &kv_norm, &sink, &wo_a, &wo_b};
    if (comp)
      for (Param* p : comp->params()) ps.push_back(p);
    if (csa) {
      ps.push_back(&iwq_b);
      ps.push_back(&iweights);
      for (Param* p : icomp->params()) ps.push_back(p);
    }
    return ps;
  }

  // Rotates x (B, T', heads, D)'s last rope dims in place at `positions`.
  void rope(const Tensor& x, const Tensor& positions, bool inverse) const {
    if (inverse) ops::rope_backward(x, positions, inv_freq, true, x);
    else ops::rope_forward(x, positions, inv_freq, true, x);
  }

  // The heads and output groups this rank holds: all of them, or its part under tensor parallelism.
  int64_t local_heads() const { return wq_b.value.size(0) / cfg->head_dim; }
  int64_t local_groups() const { return wo_a.value.size(0); }

  Tensor forward(Context& ctx, const Tensor& h_) {
    h = h_;
    const ModelConfig& c = *cfg;
    const int64_t B = ctx.B, T = ctx.T, N = ctx.N, H = local_heads(), hd = c.head_dim, g = local_groups();
    const DType dt = h.dtype();
    // Low-rank query with a weighted norm on the latent and a weightless norm per head.
    cqa = linear(h, wq_a);
    cq = Tensor::empty(cqa.shape(), dt);
    rstd_cq = Tensor::empty({N}, dt);
    ops::rmsnorm_forward(cqa, q_norm.value, c.norm_eps, cq, rstd_cq);
    qraw = linear(cq, wq_b);  // (N, H*hd)
    q = Tensor::empty({B, T, H, hd}, dt);
    rstd_q = Tensor::empty({N * H}, dt);
    ops::rmsnorm_forward(qraw.reshape({N * H, hd}), Tensor(), c.norm_eps, q.reshape({N * H, hd}), rstd_q);
    rope(q, ctx.positions, false);
    // The shared key/value head.
    kvraw = linear(h, wkv);
    kv = Tensor::empty({B, T, 1, hd}, dt);
    rstd_kv = Tensor::empty({N}, dt);
    ops::rmsnorm_forward(kvraw, kv_norm.value, c.norm_eps, kv.reshape({N, hd}), rstd_kv);
    rope(kv, ctx.positions, false);
    if (c.kv_fp8) ops::fake_quant_fp8(kv.reshape({N, hd}), 64, hd - c.rope_dim, kv.reshape({N, hd}));
    // Compressed entries and which of them each query attends.
    cidx = Tensor();
    cidx_host = Tensor();
    ckv = Tensor();
    if (comp) {
      const BlockLayout& L = ctx.layout(ratio);
      ckv = comp->forward(h, L, B, T, c.norm_eps);
      rope(ckv.reshape({B, L.NB, 1, hd}), L.positions, false);
      if (c.kv_fp8) ops::fake_quant_fp8(ckv.reshape({B * L.NB, hd}), 64, hd - c.rope_dim, ckv.reshape({B * L.NB, hd}));
      if (csa) select_by_indexer(ctx, L);
      else cidx = all_visible(ctx, L);
    }
    out = Tensor::empty({B, T, H, hd}, dt);
    lse = Tensor::empty({B, T, H}, dt);
    if (!cidx.defined()) ckv = Tensor();  // no query sees a completed block
    ops::sparse_attention_forward(q, kv.reshape({B, T, hd}), ckv, cidx, sink.value, ctx.batch.doc, c.window,
                                  1.0 / std::sqrt(double(hd)), out, lse);
    if (csa && c.indexer_loss_weight > 0) indexer_loss(ctx);
    // Output: inverse RoPE (position-relative), grouped low-rank projection.
    Tensor o = out.clone();
    rope(o, ctx.positions, true);
    og_t = Tensor::empty({g, N, H * hd / g}, dt);
    ops::transpose01(o.reshape({N, g, H * hd / g}), og_t);
    Tensor z_t = Tensor::empty({g, N, c.o_lora_rank}, dt);
    ops::gemm(og_t, false, wo_a.value, true, z_t);
    z = Tensor::empty({N, g, c.o_lora_rank}, dt);
    ops::transpose01(z_t, z);
    z = z.reshape({N, g * c.o_lora_rank});
    Tensor y = linear(z, wo_b);
    sum_over(ctx.tp, y);  // row-parallel wo_b: each rank's groups' part
    return y;
  }

  // HCA: every visible compressed entry, in order. cidx undefined when no query sees any. Built on the host from
  // the host layout, copied to the device once per batch and layout (shared by the layers of that ratio).
  Tensor all_visible(Context& ctx, const BlockLayout& L) const {
    if (L.max_visible == 0) return Tensor();
    const size_t li = ctx.layout_index(L.m);
    if (ctx.all_visible.size() <= li) ctx.all_visible.resize(ctx.layouts.size());
    if (ctx.all_visible[li].defined()) return ctx.all_visible[li];
    const BlockLayout& HL = ctx.host_layouts[li];
    Tensor idx = Tensor::empty({ctx.B, ctx.T, L.max_visible}, DType::i32, Device::cpu);
    const int32_t *vb = HL.vis_begin.data<int32_t>(), *ve = HL.vis_end.data<int32_t>();
    int32_t* p = idx.data<int32_t>();
    for (int64_t i = 0; i < ctx.N; ++i)
      for (int64_t j = 0; j < L.max_visible; ++j) p[i * L.max_visible + j] = vb[i] + j < ve[i] ? vb[i] + j : -1;
    ctx.all_visible[li] = on_device(idx, ctx.device);
    return ctx.all_visible[li];
  }

  // CSA: the lightning indexer's top-k of the visible entries.
  void select_by_indexer(Context& ctx, const BlockLayout& L) {
    const ModelConfig& c = *cfg;
    const int64_t B = ctx.B, T = ctx.T, N = ctx.N, HI = iweights.value.size(0), cI = c.index_head_dim;
    const DType dt = h.dtype();
    qi = linear(cq, iwq_b).reshape({B, T, HI, cI});
    rope(qi, ctx.positions, false);
    ops::hadamard(qi, qi);
    if (c.indexer_fp4) ops::fake_quant_fp4(qi, 32, qi);
    ki = icomp->forward(h, L, B, T, c.norm_eps);  // (B, NB, cI)
    rope(ki.reshape({B, L.NB, 1, cI}), L.positions, false);
    ops::hadamard(ki, ki);
    if (c.indexer_fp4) ops::fake_quant_fp4(ki, 32, ki);
    iw = linear(h, iweights);
    ops::scale(iw, 1.0 / std::sqrt(double(cI) * double(c.index_n_heads)));
    iscores = Tensor::empty({B, T, L.NB}, dt);
    ops::indexer_scores_forward(qi, ki, iw.reshape({B, T, HI}), L.vis_begin, L.vis_end, iscores);
    sum_over(ctx.tp, iscores);  // a sum over the indexer heads, split over tensor parallelism
    int64_t K = std::min(c.index_topk, L.max_visible);
    if (K == 0) return;
    cidx = Tensor::empty({B, T, K}, DType::i32);
    ops::topk_indices(iscores.reshape({N, L.NB}), Tensor(), cidx.reshape({N, K}));
  }

  // The V3.2-style indexer loss over the selected entries (docs/model.md "Objective"). Host-side gather of the
  // selected scores (index bookkeeping on host copies of cidx, the scores and cprob; the results go back to the
  // model's device).
  Tensor sel_scores, sel_target;
  Tensor cidx_host;  // cidx on the host, kept for indexer_backward's scatter
  void indexer_loss(Context& ctx) {
    if (!cidx.defined()) return;
    const int64_t N = ctx.N, K = cidx.size(2), NB = iscores.size(2);
    const DType dt = h.dtype();
    Tensor cprob = Tensor::empty({ctx.B, ctx.T, K}, dt);
    ops::sparse_attention_cprob(q, ckv, cidx, lse, 1.0 / std::sqrt(double(cfg->head_dim)), cprob);
    sum_over(ctx.tp, cprob);  // a sum over the heads
    sel_scores = Tensor::empty({N, K}, DType::f64, Device::cpu);
    sel_target = on_host(cprob).reshape({N, K}).to(DType::f64);
    Tensor is64 = on_host(iscores).to(DType::f64);
    cidx_host = on_host(cidx);
    const int32_t* ci = cidx_host.data<int32_t>();
    for (int64_t i = 0; i < N * K; ++i)
      sel_scores.data<double>()[i] =
          ci[i] >= 0 ? is64.data<double>()[(i / K) * NB + ci[i]] : -std::numeric_limits<double>::infinity();
    sel_scores = on_device(sel_scores.to(dt), ctx.device);
    sel_target = on_device(sel_target.to(dt), ctx.device);
    ctx.indexer_kl_sum += ops::indexer_kl(sel_scores, sel_target, 1.0, Tensor());
  }

  void indexer_backward(Context& ctx, const BlockLayout& L) {
    const ModelConfig& c = *cfg;
    const int64_t B = ctx.B, T = ctx.T, N = ctx.N, K = cidx.size(2), NB = L.NB, HI = iweights.value.size(0);
    const int64_t cI = c.index_head_dim;
    Tensor dsel = Tensor::empty(sel_scores.shape(), sel_scores.dtype());
    ops::indexer_kl(sel_scores, sel_target, ctx.loss_scale * c.indexer_loss_weight, dsel);
    Tensor dscores = Tensor::zeros({B, T, NB}, DType::f64, Device::cpu);
    Tensor dsel64 = on_host(dsel).to(DType::f64);
    if (!cidx_host.defined()) cidx_host = on_host(cidx);
    const int32_t* ci = cidx_host.data<int32_t>();
    for (int64_t i = 0; i < N * K; ++i)
      if (ci[i] >= 0) dscores.data<double>()[(i / K) * NB + ci[i]] += dsel64.data<double>()[i];
    dscores = on_device(dscores.to(h.dtype()), ctx.device);
    Tensor dqi = Tensor::empty(qi.shape(), qi.dtype()), dki = Tensor::empty(ki.shape(), ki.dtype());
    Tensor dw = Tensor::empty({B, T, HI}, h.dtype());
    ops::indexer_scores_backward(qi, ki, iw.reshape({B, T, HI}), L.vis_begin, L.vis_end, dscores, dqi, dki, dw);
    sum_over(ctx.tp, dki);  // each rank's indexer heads' part
    // The FP4 simulation passes the gradient straight through; the Hadamard rotation is its own transpose.
    ops::hadamard(dqi, dqi);
    rope(dqi, ctx.positions, true);
    ops::gemm(dqi.reshape({N, HI * cI}), true, cq, false, iwq_b.grad, 1.0, 1.0);  // cq detached
    ops::hadamard(dki, dki);
    rope(dki.reshape({B, NB, 1, cI}), L.positions, true);
    icomp->backward(h, L, dki, Tensor());  // h detached
    ops::scale(dw, 1.0 / std::sqrt(double(cI) * double(c.index_n_heads)));
    ops::gemm(dw.reshape({N, HI}), true, h, false, iweights.grad, 1.0, 1.0);
  }

  // dy (N, d) -> dh (N, d), parameter grads.
  Tensor backward(Context& ctx, const Tensor& dy) {
    const ModelConfig& c = *cfg;
    const int64_t B = ctx.B, T = ctx.T, N = ctx.N, H = local_heads(), hd = c.head_dim, g = local_groups();
    const DType dt = h.dtype();
    Tensor dz = Tensor::empty(z.shape(), dt);
    ops::linear_backward(z, wo_b.value, dy, dz, wo_b.grad);
    Tensor dz_t = Tensor::empty({g, N, c.o_lora_rank}, dt);
    ops::transpose01(dz.reshape({N, g, c.o_lora_rank}), dz_t);
    Tensor dog_t = Tensor::empty(og_t.shape(), dt);
    ops::gemm(dz_t, false, wo_a.value, false, dog_t);
    ops::gemm(dz_t, true, og_t, false, wo_a.grad, 1.0, 1.0);
    Tensor dout = Tensor::empty({B, T, H, hd}, dt);
    ops::transpose01(dog_t, dout.reshape({N, g, H * hd / g}));
    rope(dout, ctx.positions, false);  // the transpose of the inverse rotation
    Tensor dq = Tensor::empty(q.shape(), dt), dkv = Tensor::empty({B, T, hd}, dt);
    Tensor dckv = ckv.defined() ? Tensor::empty(ckv.shape(), dt) : Tensor();
    ops::sparse_attention_backward(q, kv.reshape({B, T, hd}), ckv, cidx, sink.value, ctx.batch.doc, c.window,
                                   1.0 / std::sqrt(double(hd)), out, lse, dout, dq, dkv, dckv, sink.grad);
    // The shared key/value head and the compressed entries serve every head: sum the heads' parts over tensor
    // parallelism, after which everything below is the same on every rank.
    sum_over(ctx.tp, dkv);
    sum_over(ctx.tp, dckv);
    Tensor dh = Tensor::zeros({N, c.dim}, dt);
    if (comp) {
      const BlockLayout& L = ctx.layout(ratio);
      if (csa && c.indexer_loss_weight > 0 && cidx.defined() && ctx.backward) indexer_backward(ctx, L);
      if (cidx.defined()) {
        rope(dckv.reshape({B, L.NB, 1, hd}), L.positions, true);
        comp->backward(h, L, dckv, dh);
      }
    }
    // Key/value head (the FP8 simulation passes the gradient straight through).
    rope(dkv.reshape({B, T, 1, hd}), ctx.positions, true);
    Tensor dkvraw = Tensor::empty(kvraw.shape(), dt);
    ops::rmsnorm_backward(kvraw, kv_norm.value, rstd_kv, dkv.reshape({N, hd}), dkvraw, kv_norm.grad);
    linear_backward_acc(h, wkv.value, dkvraw, dh, wkv.grad);
    // Query.
    rope(dq, ctx.positions, true);
    Tensor dqraw = Tensor::empty(qraw.shape(), dt);
    ops::rmsnorm_backward(qraw.reshape({N * H, hd}), Tensor(), rstd_q, dq.reshape({N * H, hd}),
                          dqraw.reshape({N * H, hd}), Tensor());
    Tensor dcq = Tensor::empty(cq.shape(), dt);
    ops::linear_backward(cq, wq_b.value, dqraw, dcq, wq_b.grad);
    sum_over(ctx.tp, dcq);  // column-parallel wq_b: each rank's heads' part
    Tensor dcqa = Tensor::empty(cqa.shape(), dt);
    ops::rmsnorm_backward(cqa, q_norm.value, rstd_cq, dcq, dcqa, q_norm.grad);
    linear_backward_acc(h, wq_a.value, dcqa, dh, wq_a.grad);
    return dh;
  }
};

// ------------------------------------------------------------------------------------------------ MoE
struct MoE {
  Param gate, bias, tid2eid;  // bias, tid2eid: buffers
  Param w1, w2, w3, sw1, sw2, sw3;
  bool hash = false;
  const ModelConfig* cfg = nullptr;
  ops::ScoreFunc score_func = ops::ScoreFunc::sqrt_softplus;

  Tensor h, logits, scores, idx, weights, rows, slots, wflat, xe, ye;
  Tensor idx_host;  // idx on the host (the same tensor on a CPU model): the dispatch and routing_indices read it
  Tensor dscores;  // (N, E): the balance loss's gradient, from the forward when training
  std::vector<int64_t> offsets;  // per expert, into the dispatched rows; E + 1 entries
  // Expert parallelism (V4Model::set_expert_parallel): this rank holds experts [first_expert, first_expert +
  // n_local) of the stack; the rows of its experts arrive from every rank of the ep group, each source's rows
  // computed apart (its own GEMMs, its own gradient slot in src_w*) so that every number is what one process
  // computes for that source's micro-batch.
  Communicator* ep = nullptr;
  int64_t first_expert = 0, n_local = 0;
  Tensor src_w1, src_w2, src_w3;  // (ep size, n_local, ...): the weight gradients by source rank
  std::vector<int64_t> send_counts, recv_counts;  // rows to / from each ep rank
  Tensor xr, yr;  // the rows this rank's experts compute: xe itself without expert parallelism
  // One GEMM chain: local expert j on rows [start, start + n) of xr, from source rank src.
  struct Chunk {
    int64_t j = 0, src = 0, start = 0, n = 0;
    Tensor g, u, s;  // SwiGLU inputs and output
  };
  std::vector<Chunk> chunks;
  Tensor sg, su, ss;               // shared expert
  Tensor override_idx;             // (N, k) i32 used instead of TopK(scores + bias) when defined (score-routed)
  double preact_max_abs = 0, logit_max = 0;  // spike instrumentation of the last forward

  MoE() = default;
  MoE(const string& p, bool hash_, const ModelConfig& c, DType dt) : hash(hash_), cfg(&c) {
    const int64_t d = c.dim, E = c.n_routed_experts, F = c.moe_inter_dim, Fs = c.n_shared_experts * F;
    score_func = ops::score_func_from_name(c.score_func);
    gate = make_param(p + "gate.weight", ParamKind::matrix, {E, d}, dt);
    bias = make_param(p + "gate.bias", ParamKind::vector, {E}, dt);
    bias.grad = Tensor();
    if (hash) {
      tid2eid = make_param(p + "gate.tid2eid", ParamKind::vector, {1}, dt);
      tid2eid.value = Tensor::zeros({c.vocab_size, c.n_activated_experts}, DType::i32);
      tid2eid.grad = Tensor();
    }
    w1 = make_param(p + "experts.w1", ParamKind::matrix, {E, F, d}, dt);
    w2 = make_param(p + "experts.w2", ParamKind::matrix, {E, d, F}, dt);
    w3 = make_param(p + "experts.w3", ParamKind::matrix, {E, F, d}, dt);
    w1.routed_expert = w2.routed_expert = w3.routed_expert = true;
    n_local = E;
    if (Fs > 0) {
      sw1 = make_param(p + "shared.w1", ParamKind::matrix, {Fs, d}, dt);
      sw2 = make_param(p + "shared.w2", ParamKind::matrix, {d, Fs}, dt);
      sw3 = make_param(p + "shared.w3", ParamKind::matrix, {Fs, d}, dt);
    }
  }
  bool has_shared() const { return sw1.value.defined(); }
  // Keeps experts [rank * E / P, (rank + 1) * E / P) of the stacks, P = the group's size (values to be set by init
  // or a checkpoint).
  void shard_experts(Communicator& group) {
    const int64_t E = cfg->n_routed_experts, P = group.size();
    ep = &group;
    n_local = E / P;
    first_expert = group.rank() * n_local;
    for (Param* w : {&w1, &w2, &w3}) {
      split_param(*w, 0, group);
      Shape shape = w->value.shape();
      shape.insert(shape.begin(), P);
      by_source(w) = Tensor::zeros(shape, w->value.dtype());
    }
  }
  // The weight gradients by source rank, folded by V4Model::finish_gradients (undefined without expert parallelism).
  Tensor& by_source(const Param* w) { return w == &w1 ? src_w1 : w == &w2 ? src_w2 : src_w3; }
  ParamList params() {
    ParamList ps{&gate, &w1, &w2, &w3};
    if (has_shared())
      for (Param* p : {&sw1, &sw2, &sw3}) ps.push_back(p);
    return ps;
  }
  ParamList buffers() {
    ParamList ps{&bias};
    if (hash) ps.push_back(&tid2eid);
    return ps;
  }

  Tensor forward(Context& ctx, const Tensor& h_, std::vector<int64_t>& load) {
    h = h_;
    const ModelConfig& c = *cfg;
    const int64_t N = ctx.N, E = c.n_routed_experts, k = c.n_activated_experts, d = c.dim;
    const DType dt = h.dtype();
    logits = linear(h, gate);
    scores = Tensor::empty({N, E}, dt);
    ops::router_scores_forward(logits, score_func, scores);
    // The expert indices, on the host (hash table lookups and overrides are built there and copied to the device
    // once; TopK runs on the device and its indices come back once: the dispatch below needs them on the host).
    const Shape idx_shape{N, k};
    if (hash) {
      const int32_t* ids = ctx.host_batch.ids.data<int32_t>();
      const Tensor table_host = on_host(tid2eid.value);
      const int32_t* table = table_host.data<int32_t>();
      idx_host = Tensor::empty(idx_shape, DType::i32, Device::cpu);
      const int64_t V = tid2eid.value.size(0);
      for (int64_t i = 0; i < N; ++i) {
        TS_CHECK(ids[i] >= 0 && ids[i] < V, "token id ", ids[i], " at position ", i, " is outside the vocabulary [0, ",
                 V, ")");
        std::copy(table + ids[i] * k, table + (ids[i] + 1) * k, idx_host.data<int32_t>() + i * k);
      }
      idx = on_device(idx_host, ctx.device);
    } else if (override_idx.defined()) {
      TS_CHECK(override_idx.dtype() == DType::i32 && override_idx.shape() == idx_shape,
               "routing override for ", gate.name, ": expected i32", shape_str(idx_shape), ", got ",
               override_idx.str());
      const Tensor o_host = on_host(override_idx);
      const int32_t* o = o_host.data<int32_t>();
      for (int64_t i = 0; i < N * k; ++i)
        TS_CHECK(o[i] >= -1 && o[i] < E, "routing override for ", gate.name, ": expert ", o[i], " out of range");
      idx_host = Tensor::empty(idx_shape, DType::i32, Device::cpu);
      idx_host.copy_from(o_host);
      idx = on_device(idx_host, ctx.device);
    } else {
      idx = Tensor::empty(idx_shape, DType::i32);
      ops::topk_indices(scores, bias.value, idx);
      idx_host = on_host(idx);
    }
    logit_max = max_of(logits, false);
    preact_max_abs = 0;
    weights = Tensor::empty({N, k}, dt);
    ops::route_weights_forward(scores, idx, score_func != ops::ScoreFunc::softmax, c.route_scale, weights);
    // The balance loss, and when training its gradient (kept for the backward: one pass computes both).
    dscores = ctx.backward ? Tensor::zeros(scores.shape(), dt) : Tensor();
    if (!hash)
      ctx.balance_loss += ops::balance_loss(scores.reshape({ctx.B, ctx.T, E}), idx.reshape({ctx.B, ctx.T, k}),
                                            c.balance_loss_weight, ctx.aux_scale,
                                            ctx.backward ? dscores.reshape({ctx.B, ctx.T, E}) : Tensor());
    // Dispatch: tokens grouped by expert, in token order within an expert (host-side bookkeeping; the row lists
    // go to the device once). Under tensor parallelism the tokens are routed on every rank alike, and each rank's
    // experts compute the rows of its slice [tok_begin, tok_end) of them.
    const int32_t* ix = idx_host.data<int32_t>();
    for (int64_t i = 0; i < N * k; ++i)
      if (ix[i] >= 0) ++load[ix[i]];
    const int64_t slot_begin = ctx.tok_begin * k, slot_end = (ctx.tok_end < 0 ? N : ctx.tok_end) * k;
    offsets.assign(E + 1, 0);
    for (int64_t i = slot_begin; i < slot_end; ++i)
      if (ix[i] >= 0) ++offsets[ix[i] + 1];
    for (int64_t e = 0; e < E; ++e) offsets[e + 1] += offsets[e];
    const int64_t M = offsets[E];
    rows = Tensor::empty({M}, DType::i32, Device::cpu);
    slots = Tensor::empty({M}, DType::i32, Device::cpu);
    std::vector<int64_t> fill(offsets.begin(), offsets.end() - 1);
    for (int64_t i = slot_begin; i < slot_end; ++i)
      if (ix[i] >= 0) {
        int64_t at = fill[ix[i]]++;
        rows.data<int32_t>()[at] = int32_t(i / k);
        slots.data<int32_t>()[at] = int32_t(i);
      }
    rows = on_device(rows, ctx.device);
    slots = on_device(slots, ctx.device);
    wflat = Tensor::empty({M, 1}, dt);
    ops::gather_rows(weights.reshape({N * k, 1}), slots, Tensor(), wflat);
    xe = Tensor::empty({M, d}, dt);
    ops::gather_rows(h, rows, Tensor(), xe);
    ye = Tensor::empty({M, d}, dt);
    // The SwiGLU inputs: on the host one tensor each, max |x| read from each as it is made; on a device views of
    // one buffer, whose max |x| is read after the layer with one copy to the host.
    const int64_t F = c.moe_inter_dim, Fs = has_shared() ? sw1.value.size(0) : 0;
    const bool on_cpu = ctx.device == Device::cpu;
    const int64_t preact_n = ep ? 0 : 2 * M * F + 2 * N * Fs;  // EP: one tensor each (the rows are known later)
    Tensor preact = on_cpu || preact_n == 0 ? Tensor() : Tensor::empty({preact_n}, dt);
    int64_t preact_at = 0;
    auto preact_tensor = [&](int64_t r, int64_t cols) {
      if (!preact.defined()) return Tensor::empty({r, cols}, dt);
      Tensor t = preact.slice(preact_at, r * cols).reshape({r, cols});
      preact_at += r * cols;
      return t;
    };
    // The rows this rank's experts compute: its own (xe), or under expert parallelism what each ep rank sends.
    const int64_t P = ep ? ep->size() : 1;
    std::vector<int64_t> counts(size_t(P * E));  // rows per (source rank, expert)
    for (int64_t e = 0; e < E; ++e) counts[e] = offsets[e + 1] - offsets[e];
    if (ep) {
      Tensor mine = Tensor::empty({E}, DType::i64, Device::cpu), all = Tensor::empty({P * E}, DType::i64, Device::cpu);
      std::copy(counts.begin(), counts.begin() + E, mine.data<int64_t>());
      ep->all_gather(mine, all);
      std::copy(all.data<int64_t>(), all.data<int64_t>() + P * E, counts.begin());
      send_counts.assign(P, 0);
      recv_counts.assign(P, 0);
      for (int64_t q = 0; q < P; ++q) {
        send_counts[q] = offsets[(q + 1) * n_local] - offsets[q * n_local];  // my rows for rank q's experts
        for (int64_t j = 0; j < n_local; ++j) recv_counts[q] += counts[q * E + first_expert + j];  // and its for mine
      }
      int64_t R = 0;
      for (int64_t n : recv_counts) R += n;
      xr = Tensor::empty({R, d}, dt);
      ep->all_to_all_v(xe, send_counts, xr, recv_counts);
      yr = Tensor::empty({R, d}, dt);
    } else {
      xr = xe;
      yr = ye;
    }
    chunks.clear();
    int64_t at = 0;
    for (int64_t src = 0; src < P; ++src)
      for (int64_t j = 0; j < n_local; ++j) {
        const int64_t n = counts[src * E + first_expert + j];
        if (n > 0) chunks.push_back(Chunk{j, src, at, n, {}, {}, {}});
        at += n;
      }
    for (Chunk& ch : chunks) {
      Tensor x = xr.slice(ch.start, ch.n);
      ch.g = preact_tensor(ch.n, F);
      ch.u = preact_tensor(ch.n, F);
      ch.s = Tensor::empty({ch.n, F}, dt);
      ops::linear_forward(x, w1.value.slice(ch.j, 1).reshape({F, d}), ch.g);
      ops::linear_forward(x, w3.value.slice(ch.j, 1).reshape({F, d}), ch.u);
      if (!preact.defined()) preact_max_abs = std::max({preact_max_abs, max_of(ch.g, true), max_of(ch.u, true)});
      ops::swiglu_forward(ch.g, ch.u, ch.s, c.swiglu_limit);
      ops::linear_forward(ch.s, w2.value.slice(ch.j, 1).reshape({d, F}), yr.slice(ch.start, ch.n));
    }
    if (ep) ep->all_to_all_v(yr, recv_counts, ye, send_counts);
    Tensor y = Tensor::zeros({N, d}, dt);
    if (has_shared()) {
      sg = preact_tensor(N, Fs);
      su = preact_tensor(N, Fs);
      ops::linear_forward(h, sw1.value, sg);
      ops::linear_forward(h, sw3.value, su);
      if (!preact.defined()) preact_max_abs = std::max({preact_max_abs, max_of(sg, true), max_of(su, true)});
      ss = Tensor::empty(sg.shape(), dt);
      ops::swiglu_forward(sg, su, ss, c.swiglu_limit);
      ops::linear_forward(ss, sw2.value, y);
    }
    ops::scatter_add_rows(ye, rows, wflat.reshape({M}), y);
    // Tensor parallelism: the shared expert's hidden units and the routed rows of each rank's tokens.
    sum_over(ctx.tp, y);
    if (preact.defined()) preact_max_abs = std::max(preact_max_abs, max_of(preact, true));
    return y;
  }

  Tensor backward(Context& ctx, const Tensor& dy) {
    const ModelConfig& c = *cfg;
    const int64_t N = ctx.N, E = c.n_routed_experts, k = c.n_activated_experts, d = c.dim, F = c.moe_inter_dim;
    const int64_t M = offsets[E];
    const DType dt = h.dtype();
    Tensor dh = Tensor::zeros({N, d}, dt);
    if (has_shared()) {
      Tensor ds = Tensor::empty(ss.shape(), dt), dg = Tensor::empty(sg.shape(), dt), du = Tensor::empty(su.shape(), dt);
      ops::linear_backward(ss, sw2.value, dy, ds, sw2.grad);
      ops::swiglu_backward(sg, su, ds, dg, du, c.swiglu_limit);
      linear_backward_acc(h, sw1.value, dg, dh, sw1.grad);
      linear_backward_acc(h, sw3.value, du, dh, sw3.grad);
    }
    // Routed experts: d ye_i = w_i dy[row_i]; d w_i = ye_i . dy[row_i].
    Tensor dye = Tensor::empty({M, d}, dt), dwflat = Tensor::empty({M}, dt);
    ops::gather_rows(dy, rows, wflat.reshape({M}), dye);
    ops::rows_dot(ye, dy, rows, dwflat);
    Tensor dweights = Tensor::zeros({N * k, 1}, dt);
    ops::scatter_add_rows(dwflat.reshape({M, 1}), slots, Tensor(), dweights);
    // The experts' backward on the rows they computed (under expert parallelism: dye goes to the experts' ranks,
    // and each source's weight gradient to its own slot).
    Tensor dyr = dye, dxr;
    if (ep) {
      dyr = Tensor::empty(xr.shape(), dt);
      ep->all_to_all_v(dye, send_counts, dyr, recv_counts);
    }
    dxr = Tensor::empty(xr.shape(), dt);
    for (const Chunk& ch : chunks) {
      Tensor x = xr.slice(ch.start, ch.n), dx = dxr.slice(ch.start, ch.n), dyo = dyr.slice(ch.start, ch.n);
      Tensor ds = Tensor::empty({ch.n, F}, dt), dg = Tensor::empty({ch.n, F}, dt), du = Tensor::empty({ch.n, F}, dt);
      auto grad = [&](const Param& w, const Tensor& by_source, const Shape& shape) {
        return (ep ? by_source.slice(ch.src, 1).reshape(w.grad.shape()) : w.grad).slice(ch.j, 1).reshape(shape);
      };
      ops::linear_backward(ch.s, w2.value.slice(ch.j, 1).reshape({d, F}), dyo, ds, grad(w2, src_w2, {d, F}));
      ops::swiglu_backward(ch.g, ch.u, ds, dg, du, c.swiglu_limit);
      ops::linear_backward(x, w1.value.slice(ch.j, 1).reshape({F, d}), dg, dx, grad(w1, src_w1, {F, d}));
      linear_backward_acc(x, w3.value.slice(ch.j, 1).reshape({F, d}), du, dx, grad(w3, src_w3, {F, d}));
    }
    Tensor dxe = dxr;
    if (ep) {
      dxe = Tensor::empty({M, d}, dt);
      ep->all_to_all_v(dxr, recv_counts, dxe, send_counts);
    }
    ops::scatter_add_rows(dxe, rows, Tensor(), dh);
    // Tensor parallelism: each rank's tokens' gate-weight gradients and its part of dh (shared hidden units, its
    // tokens' routed rows); the router's backward below then runs alike on every rank.
    sum_over(ctx.tp, dweights);
    sum_over(ctx.tp, dh);
    // Router: gate weights, added to the balance loss's gradient from the forward.
    ops::route_weights_backward(scores, idx, dweights.reshape({N, k}), score_func != ops::ScoreFunc::softmax,
                                c.route_scale, dscores);
    Tensor dlogits = Tensor::empty(logits.shape(), dt);
    ops::router_scores_backward(logits, scores, dscores, score_func, dlogits);
    linear_backward_acc(h, gate.value, dlogits, dh, gate.grad);
    return dh;
  }
};

// ------------------------------------------------------------------------------------------------ Block
struct Block {
  HyperConn hc_attn, hc_ffn;
  Param attn_norm, ffn_norm;
  Attention attn;
  MoE ffn;
  double eps = 0;
  Tensor ya, ha, rstd_a, yb, hb, rstd_b;

  Block(const string& p, int64_t ratio, bool hash, const ModelConfig& c, DType dt)
      : hc_attn(p + "hc_attn.", c.hc_mult, c.dim, c, dt, false),
        hc_ffn(p + "hc_ffn.", c.hc_mult, c.dim, c, dt, false),
        attn(p + "attn.", ratio, c, dt),
        ffn(p + "ffn.", hash, c, dt),
        eps(c.norm_eps) {
    attn_norm = make_param(p + "attn_norm", ParamKind::vector, {c.dim}, dt);
    ffn_norm = make_param(p + "ffn_norm", ParamKind::vector, {c.dim}, dt);
  }
  ParamList params() {
    ParamList ps;
    for (Param* p : hc_attn.params()) ps.push_back(p);
    for (Param* p : hc_ffn.params()) ps.push_back(p);
    ps.push_back(&attn_norm);
    ps.push_back(&ffn_norm);
    for (Param* p : attn.params()) ps.push_back(p);
    for (Param* p : ffn.params()) ps.push_back(p);
    return ps;
  }

  static Tensor norm(const Tensor& y, const Param& w, double eps, Tensor& rstd) {
    Tensor out = Tensor::empty(y.shape(), y.dtype());
    rstd = Tensor::empty({y.size(0)}, y.dtype());
    ops::rmsnorm_forward(y, w.value, eps, out, rstd);
    return out;
  }

  Tensor forward(Context& ctx, const Tensor& X, std::vector<int64_t>& load) {
    ya = hc_attn.collapse(X);
    ha = norm(ya, attn_norm, eps, rstd_a);
    Tensor Xm = hc_attn.expand(attn.forward(ctx, ha));
    yb = hc_ffn.collapse(Xm);
    hb = norm(yb, ffn_norm, eps, rstd_b);
    return hc_ffn.expand(ffn.forward(ctx, hb, load));
  }

  Tensor backward(Context& ctx, const Tensor& dX) {
    Tensor df = hc_ffn.backward_expand(dX);
    Tensor dhb = ffn.backward(ctx, df);
    Tensor dyb = Tensor::empty(yb.shape(), yb.dtype());
    ops::rmsnorm_backward(yb, ffn_norm.value, rstd_b, dhb, dyb, ffn_norm.grad);
    Tensor dXm = hc_ffn.backward_collapse(dyb);
    Tensor dfa = hc_attn.backward_expand(dXm);
    Tensor dha = attn.backward(ctx, dfa);
    Tensor dya = Tensor::empty(ya.shape(), ya.dtype());
    ops::rmsnorm_backward(ya, attn_norm.value, rstd_a, dha, dya, attn_norm.grad);
    return hc_attn.backward_collapse(dya);
  }
};

// ------------------------------------------------------------------------------------------------ Head
// hc_head -> RMSNorm -> the (shared) output projection.
struct Head {
  HyperConn hc;
  Param norm;
  double eps = 0;
  Tensor y, hn, rstd;

  Head(const string& p, const ModelConfig& c, DType dt) : hc(p + "hc_head.", c.hc_mult, c.dim, c, dt, true), eps(c.norm_eps) {
    norm = make_param(p + "norm", ParamKind::vector, {c.dim}, dt);
  }
  ParamList params() {
    ParamList ps = hc.params();
    ps.push_back(&norm);
    return ps;
  }
  Tensor forward(const Tensor& X, const Param& output) {
    y = hc.collapse(X);
    hn = Block::norm(y, norm, eps, rstd);
    return linear(hn, output);
  }
  // dlogits -> dX (the output head's weight gradient accumulates). Under tensor parallelism dlogits and the head
  // are this rank's vocabulary columns and rows, and the parts of dhn are summed over `tp`.
  Tensor backward(const Tensor& dlogits, Param& output, Communicator* tp) {
    Tensor dhn = Tensor::empty(hn.shape(), hn.dtype());
    ops::linear_backward(hn, output.value, dlogits, dhn, output.grad);
    sum_over(tp, dhn);
    Tensor dy = Tensor::empty(y.shape(), y.dtype());
    ops::rmsnorm_backward(y, norm.value, rstd, dhn, dy, norm.grad);
    return hc.backward_collapse(dy);
  }
};

}  // namespace

// ------------------------------------------------------------------------------------------------ layouts
BlockLayout make_block_layout(const Tensor& device_doc, int64_t B, int64_t T, int64_t m) {
  const Tensor doc = on_host(device_doc);
  const Device cpu = Device::cpu;  // host tensors, whatever the default device
  BlockLayout L;
  L.m = m;
  std::vector<std::vector<int32_t>> starts(B), prevs(B);
  L.vis_begin = Tensor::empty({B, T}, DType::i32, cpu);
  L.vis_end = Tensor::empty({B, T}, DType::i32, cpu);
  for (int64_t b = 0; b < B; ++b) {
    const int32_t* dp = doc.defined() ? doc.data<int32_t>() + b * T : nullptr;
    int64_t t0 = 0;
    while (t0 < T) {
      int64_t t1 = t0 + 1;
      while (t1 < T && (!dp || dp[t1] == dp[t0])) ++t1;
      // Document [t0, t1): blocks t0 + m i, and each query's visible range.
      const int32_t first = int32_t(starts[b].size());
      for (int64_t s = t0; s + m <= t1; s += m) {
        prevs[b].push_back(s > t0 ? int32_t(s - m) : -1);
        starts[b].push_back(int32_t(s));
      }
      for (int64_t t = t0; t < t1; ++t) {
        L.vis_begin.data<int32_t>()[b * T + t] = first;
        int32_t completed = int32_t((t - t0 + 1) / m);  // blocks whose last token is <= t
        L.vis_end.data<int32_t>()[b * T + t] = first + completed;
        L.max_visible = std::max<int64_t>(L.max_visible, completed);
      }
      t0 = t1;
    }
  }
  for (auto& s : starts) L.NB = std::max<int64_t>(L.NB, int64_t(s.size()));
  L.NB = std::max<int64_t>(L.NB, 1);
  L.block_start = Tensor::empty({B, L.NB}, DType::i32, cpu);
  L.prev_start = Tensor::empty({B, L.NB}, DType::i32, cpu);
  L.positions = Tensor::empty({B * L.NB}, DType::i32, cpu);
  L.no_prev = Tensor::empty({B, L.NB}, DType::i32, cpu);
  std::fill(L.no_prev.data<int32_t>(), L.no_prev.data<int32_t>() + B * L.NB, -1);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t s = 0; s < L.NB; ++s) {
      bool real = s < int64_t(starts[b].size());
      L.block_start.data<int32_t>()[b * L.NB + s] = real ? starts[b][s] : -1;
      L.prev_start.data<int32_t>()[b * L.NB + s] = real ? prevs[b][s] : -1;
      L.positions.data<int32_t>()[b * L.NB + s] = real ? starts[b][s] : 0;
    }
  return L;
}

Tensor v4_inv_freq(const ModelConfig& c, bool compressed) {
  DeviceScope host(Device::cpu);  // the rope ops take their frequencies on the host
  const double theta = compressed ? c.compress_rope_theta : c.rope_theta;
  const int64_t r = c.rope_dim, half = r / 2;
  Tensor f = ops::rope_inv_freq(theta, r);
  if (!compressed || c.yarn_factor <= 1.0) return f;
  // YaRN: interpolate the low frequencies by the factor, keep the high ones, ramp linearly between the
  // correction range given by beta_fast and beta_slow rotations over the original length.
  auto correction_dim = [&](double rotations) {
    return r * std::log(double(c.yarn_original_len) / (rotations * 2 * std::numbers::pi)) / (2 * std::log(theta));
  };
  double low = std::max(0.0, std::floor(correction_dim(c.yarn_beta_fast)));
  double high = std::min(double(r - 1), std::ceil(correction_dim(c.yarn_beta_slow)));
  if (low == high) high += 0.001;
  for (int64_t i = 0; i < half; ++i) {
    double ramp = std::clamp((double(i) - low) / (high - low), 0.0, 1.0);
    double extrapolation = 1.0 - ramp;  // 1 keeps the original frequency
    double& v = f.data<double>()[i];
    v = v / c.yarn_factor * (1.0 - extrapolation) + v * extrapolation;
  }
  return f;
}

// ------------------------------------------------------------------------------------------------ the model
struct V4Model::Impl {
  Param tok_embeddings, output;
  std::vector<Block> layers;
  std::optional<Head> head;
  // MTP
  Param e_norm, h_norm, e_proj, h_proj;
  std::optional<Block> mtp_block;
  std::optional<Head> mtp_head;

  // Forward state.
  Context ctx;
  Tensor X0, emb, logits, losses, X_final;
  std::vector<Tensor> X_in;  // each layer's input
  Tensor mtp_ids, mtp_targets, e_raw, e_rstd, e_n, xs_rstd, xs, Xm, mtp_logits, mtp_losses, mtp_dlogits;
  int64_t mtp_target_count = 0;
  Tensor dlogits;     // the main head's, kept from the forward for the backward
  bool ran = false;  // a forward has run (routing_indices is defined)
  // Pipeline stage: the layers [first, end) held, and whether this is the first / last stage (the whole model: 0,
  // n_layers, true, true).
  int64_t first = 0, end = 0;
  bool first_stage = true, last_stage = true;

  // Every MoE layer this stage holds (the MTP block last), and the score-routed ones.
  std::vector<MoE*> moes() {
    std::vector<MoE*> out;
    for (int64_t l = first; l < end; ++l) out.push_back(&layers[l].ffn);
    if (mtp_block && last_stage) out.push_back(&mtp_block->ffn);
    return out;
  }
  std::vector<MoE*> routed() {
    std::vector<MoE*> out;
    for (MoE* f : moes())
      if (!f->hash) out.push_back(f);
    return out;
  }
};

V4Model::V4Model(const ModelConfig& cfg, DType dtype, Device device)
    : cfg_(cfg), dtype_(dtype), device_(device), impl_(std::make_unique<Impl>()) {
  cfg_.validate();
  DeviceScope on_model_device(device_);  // every parameter and buffer below is allocated on the model's device
  TS_CHECK(cfg_.is_v4(), "V4Model needs model.arch = \"deepseek_v4\", got '", cfg_.arch, "'");
  const ModelConfig& c = cfg_;
  Impl& m = *impl_;
  m.tok_embeddings = make_param("tok_embeddings", ParamKind::embedding, {c.vocab_size, c.dim}, dtype);
  for (int64_t l = 0; l < c.n_layers; ++l)
    m.layers.emplace_back("layers." + std::to_string(l) + ".", c.layer_ratio(l), c.layer_is_hash(l), c, dtype);
  m.head.emplace("", c, dtype);
  m.output = make_param("output", ParamKind::head, {c.vocab_size, c.dim}, dtype);
  if (c.mtp_depth == 1) {
    m.e_norm = make_param("mtp.e_norm", ParamKind::vector, {c.dim}, dtype);
    m.h_norm = make_param("mtp.h_norm", ParamKind::vector, {c.dim}, dtype);
    m.e_proj = make_param("mtp.e_proj", ParamKind::matrix, {c.dim, c.dim}, dtype);
    m.h_proj = make_param("mtp.h_proj", ParamKind::matrix, {c.dim, c.dim}, dtype);
    m.mtp_block.emplace("mtp.block.", 0, false, c, dtype);
    m.mtp_head.emplace("mtp.", c, dtype);
  }
  expert_load_.assign(c.n_layers + (c.mtp_depth == 1 ? 1 : 0), std::vector<int64_t>(c.n_routed_experts, 0));
  m.end = c.n_layers;
}

void V4Model::set_pipeline_stage(int stage, const std::vector<int64_t>& layers_per_stage) {
  const int n_stages = int(layers_per_stage.size());
  TS_CHECK(n_stages >= 1 && stage >= 0 && stage < n_stages, "set_pipeline_stage: stage ", stage, " of ", n_stages);
  int64_t total = 0, first = 0;
  for (int s = 0; s < n_stages; ++s) {
    TS_CHECK(layers_per_stage[s] >= 1, "pipeline parallelism: every stage holds at least one layer");
    total += layers_per_stage[s];
    if (s < stage) first += layers_per_stage[s];
  }
  TS_CHECK(total == cfg_.n_layers, "pipeline parallelism: the stages hold ", total, " layers, the model has ",
           cfg_.n_layers);
  Impl& m = *impl_;
  stage_ = stage, n_stages_ = n_stages;
  m.first = first, m.end = first + layers_per_stage[stage];
  m.first_stage = stage == 0, m.last_stage = stage == n_stages - 1;
  // What other stages hold is dropped: layers outside [first, end), the embedding unless first, the head and the
  // MTP module unless last.
  auto drop = [](Param* p) { p->value = p->grad = Tensor(); };
  for (int64_t l = 0; l < cfg_.n_layers; ++l)
    if (l < m.first || l >= m.end) {
      for (Param* p : m.layers[l].params()) drop(p);
      for (Param* p : m.layers[l].ffn.buffers()) drop(p);
    }
  if (!m.first_stage) drop(&m.tok_embeddings);
  if (!m.last_stage) {
    for (Param* p : m.head->params()) drop(p);
    drop(&m.output);
    if (m.mtp_block) {
      for (Param* p : {&m.e_norm, &m.h_norm, &m.e_proj, &m.h_proj}) drop(p);
      for (Param* p : m.mtp_block->params()) drop(p);
      for (Param* p : m.mtp_block->ffn.buffers()) drop(p);
      for (Param* p : m.mtp_head->params()) drop(p);
    }
  }
}

int64_t V4Model::first_layer() const { return impl_->first; }
int64_t V4Model::end_layer() const { return impl_->end; }
int64_t V4Model::activation_width() const { return cfg_.hc_mult * cfg_.dim + (cfg_.mtp_depth == 1 ? cfg_.dim : 0); }

V4Model::~V4Model() = default;

ParamList V4Model::params() {
  Impl& m = *impl_;
  ParamList ps;
  if (m.first_stage) ps.push_back(&m.tok_embeddings);
  for (int64_t l = m.first; l < m.end; ++l)
    for (Param* p : m.layers[l].params()) ps.push_back(p);
  if (!m.last_stage) return ps;
  for (Param* p : m.head->params()) ps.push_back(p);
  ps.push_back(&m.output);
  if (m.mtp_block) {
    for (Param* p : {&m.e_norm, &m.h_norm, &m.e_proj, &m.h_proj}) ps.push_back(p);
    for (Param* p : m.mtp_block->params()) ps.push_back(p);
    for (Param* p : m.mtp_head->params()) ps.push_back(p);
  }
  return ps;
}

ParamList V4Model::buffers() {
  Impl& m = *impl_;
  ParamList ps;
  for (int64_t l = m.first; l < m.end; ++l)
    for (Param* p : m.layers[l].ffn.buffers()) ps.push_back(p);
  if (m.mtp_block && m.last_stage)
    for (Param* p : m.mtp_block->ffn.buffers()) ps.push_back(p);
  return ps;
}

void V4Model::init(uint64_t seed) {
  DeviceScope on_model_device(device_);  // values are drawn on the host and copied to the model's device
  const double residual_std = cfg_.init_std / std::sqrt(2.0 * cfg_.n_layers);
  for (Param* p : params()) {
    const string& n = p->name;
    if (p->kind == ParamKind::vector) {
      // Norm weights 1; hyper-connection gating factors 0.01 (mHC paper); biases, sinks, positional biases 0.
      double v = n.ends_with("norm") ? 1.0 : n.ends_with(".scale") ? 0.01 : 0.0;
      ops::fill(p->value, v);
      continue;
    }
    bool residual = n.ends_with("attn.wo_b") || n.ends_with("experts.w2") || n.ends_with("shared.w2");
    // A shard (expert parallelism) draws the whole tensor and keeps its rows: the values of one process.
    Tensor f32 = Tensor::empty(p->logical_shape(), DType::f32, Device::cpu);
    Rng{seed, stream_id(n.c_str())}.fill_normal(f32.data<float>(), f32.numel(), 0.0,
                                                residual ? residual_std : cfg_.init_std);
    p->value.copy_from(p->slice_of(f32).to(dtype_));
  }
  // Buffers: no balancing bias yet; the hash table is a fixed function of (layer, token) - k distinct experts by a
  // partial Fisher-Yates shuffle on a Philox stream named after the table (independent of the training seed).
  const int64_t E = cfg_.n_routed_experts, k = cfg_.n_activated_experts;
  for (Param* p : buffers()) {
    if (p->value.dtype() != DType::i32) {
      ops::zero(p->value);
      continue;
    }
    Rng rng{0, stream_id(p->name.c_str())};
    std::vector<int32_t> perm(E);
    Tensor table = on_host(p->value);  // p->value itself on a CPU model
    int32_t* t = table.data<int32_t>();
    for (int64_t v = 0; v < cfg_.vocab_size; ++v) {
      for (int64_t e = 0; e < E; ++e) perm[e] = int32_t(e);
      for (int64_t j = 0; j < k; ++j) {
        int64_t pick = j + int64_t(rng.below(uint64_t(v * k + j), uint64_t(E - j)));
        std::swap(perm[j], perm[pick]);
        t[v * k + j] = perm[j];
      }
    }
    if (p->value.device() != Device::cpu) p->value.copy_from(table);
  }
}

Tensor V4Model::last_mtp_logits() const { return impl_->mtp_logits; }

void V4Model::set_expert_parallel(Communicator& group) {
  TS_CHECK(!ep_, "set_expert_parallel: already set");
  TS_CHECK(group.device() == device_, "expert parallelism: the ", group.backend(), " communicator works on ",
           device_name(group.device()), " tensors, the model is on ", device_name(device_));
  TS_CHECK(cfg_.n_routed_experts % group.size() == 0, "expert parallelism: model.n_routed_experts (",
           cfg_.n_routed_experts, ") must be a multiple of parallel.ep (", group.size(), ")");
  DeviceScope on_model_device(device_);
  ep_ = &group;
  for (MoE* f : impl_->moes()) f->shard_experts(group);
}

void V4Model::set_tensor_parallel(Communicator& group) {
  TS_CHECK(!tp_, "set_tensor_parallel: already set");
  TS_CHECK(device_ == Device::cpu, "tensor parallelism runs on host tensors; the model is on ", device_name(device_));
  const ModelConfig& c = cfg_;
  const int64_t P = group.size();
  for (auto [key, n] : {std::pair{"n_heads", c.n_heads}, std::pair{"o_groups", c.o_groups},
                        std::pair{"index_n_heads", c.has_csa_layers() ? c.index_n_heads : P},
                        std::pair{"n_shared_experts x moe_inter_dim", c.n_shared_experts * c.moe_inter_dim},
                        std::pair{"vocab_size", c.vocab_size}})
    if (n % P != 0)
      TS_FAIL("tensor parallelism: model.", key, " (", n, ") must be a multiple of parallel.tp (", P,
              "): each tp rank holds an equal part");
  tp_ = &group;
  v0_ = group.rank() * (c.vocab_size / P);
  Impl& m = *impl_;
  split_param(m.tok_embeddings, 0, group);
  split_param(m.output, 0, group);
  // Column-parallel (rows: outputs) for wq_b, the sinks, the indexer's query and weights and the shared expert's
  // w1 / w3; wo_a by whole output groups; row-parallel (columns: inputs) for wo_b and the shared w2.
  auto split_block = [&](Block& b) {
    Attention& a = b.attn;
    for (Param* p : {&a.wq_b, &a.sink, &a.wo_a}) split_param(*p, 0, group);
    split_param(a.wo_b, 1, group);
    if (a.csa)
      for (Param* p : {&a.iwq_b, &a.iweights}) split_param(*p, 0, group);
    MoE& f = b.ffn;
    if (f.has_shared()) {
      for (Param* p : {&f.sw1, &f.sw3}) split_param(*p, 0, group);
      split_param(f.sw2, 1, group);
    }
  };
  for (Block& b : m.layers) split_block(b);
  if (m.mtp_block) split_block(*m.mtp_block);
}

void V4Model::embed(const Tensor& ids, const Tensor& out) {
  if (tp_) vocab_parallel_embedding_forward(ids, impl_->tok_embeddings.value, v0_, out, *tp_);
  else ops::embedding_forward(ids, impl_->tok_embeddings.value, out);
}

void V4Model::embed_backward(const Tensor& ids, const Tensor& dout) {
  if (tp_) vocab_parallel_embedding_backward(ids, dout, v0_, impl_->tok_embeddings.grad);
  else ops::embedding_backward(ids, dout, impl_->tok_embeddings.grad);
}

void V4Model::cross_entropy(const Tensor& logits, const Tensor& targets, const Tensor& losses, double loss_scale,
                            const Tensor& dlogits) {
  if (tp_) vocab_parallel_cross_entropy(logits, targets, v0_, *tp_, losses, loss_scale, dlogits);
  else ops::cross_entropy(logits, targets, losses, loss_scale, dlogits);
}

void V4Model::max_over_tp(std::vector<double>& v) {
  Tensor t = Tensor::empty({int64_t(v.size())}, DType::f64, Device::cpu);
  std::copy(v.begin(), v.end(), t.data<double>());
  tp_->all_reduce(t, ReduceOp::max);
  std::copy(t.data<double>(), t.data<double>() + v.size(), v.begin());
}

std::vector<Tensor> V4Model::gradient_accumulators() {
  std::vector<Tensor> out;
  std::vector<MoE*> moes = impl_->moes();
  for (Param* p : params()) {
    Tensor t = p->grad;
    if (ep_)
      for (MoE* f : moes)
        if (p == &f->w1 || p == &f->w2 || p == &f->w3) t = f->by_source(p);
    out.push_back(t);
  }
  return out;
}

void V4Model::finish_gradients() {
  if (!ep_) return;
  // grad = the pairwise sum over source ranks [lo, hi): the tree the data-parallel all-reduce sums ranks in.
  std::function<void(const Tensor&, int64_t, int64_t, const Tensor&)> fold = [&](const Tensor& src, int64_t lo,
                                                                               int64_t hi, const Tensor& out) {
    if (hi - lo == 1) {
      ops::copy(src.slice(lo, 1).reshape(out.shape()), out);
      return;
    }
    const int64_t mid = (lo + hi) / 2;
    fold(src, lo, mid, out);
    Tensor right = Tensor::empty(out.shape(), out.dtype(), out.device());
    fold(src, mid, hi, right);
    ops::axpy(1.0, right, out);
  };
  for (MoE* f : impl_->moes())
    for (Param* w : {&f->w1, &f->w2, &f->w3}) fold(f->by_source(w), 0, ep_->size(), w->grad);
}

void V4Model::reset_expert_load() {
  for (auto& l : expert_load_) std::fill(l.begin(), l.end(), 0);
}

void V4Model::update_routing_bias(double speed) {
  Impl& m = *impl_;
  auto update = [&](MoE& ffn, const std::vector<int64_t>& load) {
    if (ffn.hash) return;
    double mean = 0;
    for (int64_t v : load) mean += double(v);
    mean /= double(load.size());
    Tensor b = on_host(ffn.bias.value).to(DType::f64);
    for (size_t e = 0; e < load.size(); ++e)
      b.data<double>()[e] += speed * (double(load[e]) < mean ? 1.0 : double(load[e]) > mean ? -1.0 : 0.0);
    ffn.bias.value.copy_from(b.to(ffn.bias.value.dtype()));
  };
  for (int64_t l = m.first; l < m.end; ++l) update(m.layers[l].ffn, expert_load_[l]);
  if (m.mtp_block && m.last_stage) update(m.mtp_block->ffn, expert_load_.back());
  reset_expert_load();
}

int64_t V4Model::n_score_routed_layers() const { return int64_t(impl_->routed().size()); }

std::vector<Tensor> V4Model::routing_indices() const {
  TS_CHECK(impl_->ran, "routing_indices: no forward has run");
  std::vector<Tensor> out;
  for (MoE* f : impl_->routed()) out.push_back(f->idx_host.clone());
  return out;
}

void V4Model::set_routing_override(std::vector<Tensor> idx) {
  std::vector<MoE*> r = impl_->routed();
  TS_CHECK(idx.size() == r.size(), "set_routing_override: ", idx.size(), " index tensors for ", r.size(),
           " score-routed MoE layers");
  for (size_t i = 0; i < r.size(); ++i) {
    TS_CHECK(idx[i].defined() && idx[i].dtype() == DType::i32 && idx[i].ndim() == 2 &&
                 idx[i].size(1) == cfg_.n_activated_experts,
             "set_routing_override: tensor ", i, " (", r[i]->gate.name, ") must be (N, ", cfg_.n_activated_experts,
             ") i32, got ", idx[i].defined() ? idx[i].str() : std::string("undefined"));
    r[i]->override_idx = std::move(idx[i]);
  }
}

void V4Model::clear_routing_override() {
  for (MoE* f : impl_->routed()) f->override_idx = Tensor();
}

bool V4Model::has_routing_override() const {
  std::vector<MoE*> r = impl_->routed();
  return !r.empty() && r.front()->override_idx.defined();
}

std::vector<Tensor> V4Model::routing_lookahead(const TokenBatch& batch) {
  std::vector<MoE*> r = impl_->routed();
  std::vector<Tensor> saved_override;
  for (MoE* f : r) saved_override.push_back(f->override_idx), f->override_idx = Tensor();
  const std::vector<std::vector<int64_t>> saved_load = expert_load_;
  const Stats saved_stats = stats_;
  TS_CHECK(n_stages_ == 1, "routing_lookahead: not with pipeline parallelism");
  run_forward(batch, false, 0.0, Tensor(), Tensor(), nullptr, nullptr);
  std::vector<Tensor> idx = routing_indices();
  for (size_t i = 0; i < r.size(); ++i) r[i]->override_idx = saved_override[i];
  expert_load_ = saved_load;
  stats_ = saved_stats;
  return idx;
}

double V4Model::forward(const TokenBatch& batch, Tensor* logits) {
  TS_CHECK(n_stages_ == 1, "V4Model::forward: a pipeline stage runs stage_forward");
  TS_CHECK(!logits || !tp_, "V4Model::forward: under tensor parallelism each rank holds a part of the logits");
  return run_forward(batch, false, 0.0, Tensor(), Tensor(), logits, nullptr);
}

double V4Model::forward_backward(const TokenBatch& batch, double loss_scale) {
  TS_CHECK(n_stages_ == 1, "V4Model::forward_backward: a pipeline stage runs stage_forward / stage_backward");
  const double loss = run_forward(batch, true, loss_scale, Tensor(), Tensor(), nullptr, nullptr);
  run_backward(Tensor(), Tensor());
  return loss;
}

double V4Model::forward_backward_logits(const TokenBatch& batch, const LogitsGrad& loss_grad) {
  TS_CHECK(n_stages_ == 1 && !tp_, "V4Model::forward_backward_logits: not with pipeline or tensor parallelism");
  // loss_scale 0: the auxiliary losses (MTP, balance, indexer KL) get no gradient; the caller's loss replaces the
  // cross-entropy's gradient.
  const double loss = run_forward(batch, true, 0.0, Tensor(), Tensor(), nullptr, &loss_grad);
  run_backward(Tensor(), Tensor());
  return loss;
}

double V4Model::stage_forward(int64_t slot, const TokenBatch& batch, const Tensor& input, const Tensor& output,
                              double loss_scale) {
  const double loss = run_forward(batch, loss_scale != 0, loss_scale, input, output, nullptr, nullptr);
  live_slot_ = -1;                   // the layers now hold this forward's state
  if (loss_scale == 0) return loss;  // no backward: nothing to keep
  TS_CHECK(!parked_.count(slot), "stage_forward: slot ", slot, " is already waiting for its backward");
  // The forward state of the layers is this micro-batch's until the next forward; for a backward after that, the
  // forward is run again from the kept input (recomputation: deterministic, so the same values).
  parked_[slot] = Parked{input.defined() ? input.clone() : Tensor(), loss_scale};
  live_slot_ = slot;
  return loss;
}

void V4Model::stage_backward(int64_t slot, const TokenBatch& batch, const Tensor& grad_output,
                             const Tensor& grad_input) {
  auto it = parked_.find(slot);
  TS_CHECK(it != parked_.end(), "stage_backward: no forward of slot ", slot, " waits for its backward");
  if (live_slot_ != slot) {  // recompute: the loads and statistics were counted by the first forward
    const std::vector<std::vector<int64_t>> loads = expert_load_;
    const Stats stats = stats_;
    run_forward(batch, true, it->second.loss_scale, it->second.input, Tensor(), nullptr, nullptr);
    expert_load_ = loads;
    stats_ = stats;
  }
  parked_.erase(it);
  live_slot_ = -1;
  run_backward(grad_output, grad_input);
}

// The stage boundary tensor (N, width) as its parts: the n residual streams (N, n, d), then with MTP the raw
// embedding rows of the next tokens (N, d), which the MTP module on the last stage reads.
static std::pair<Tensor, Tensor> boundary_parts(const Tensor& t, int64_t N, int64_t n, int64_t d, bool mtp) {
  Tensor flat = t.reshape({t.numel()});
  return {flat.slice(0, N * n * d).reshape({N, n, d}), mtp ? flat.slice(N * n * d, N * d).reshape({N, d}) : Tensor()};
}

double V4Model::run_forward(const TokenBatch& any_batch, bool backward, double loss_scale, const Tensor& input,
                            const Tensor& output, Tensor* logits_out, const LogitsGrad* loss_grad) {
  DeviceScope on_model_device(device_);  // every tensor of the pass is allocated on the model's device
  Impl& m = *impl_;
  const ModelConfig& c = cfg_;
  const int64_t B = any_batch.batch_size(), T = any_batch.seq_len(), N = B * T, n = c.hc_mult, d = c.dim;
  if (T > c.max_seq_len) TS_FAIL("sequence length ", T, " exceeds model.max_seq_len ", c.max_seq_len);
  const DType dt = dtype_;

  // Per-batch context: the batch on the device (and on the host for the index bookkeeping), positions, block
  // layouts per ratio, constants. Host-built index tensors are copied to the device once each.
  Context& ctx = m.ctx;
  ctx = Context{};
  ctx.device = device_;
  ctx.host_batch = any_batch.on(Device::cpu);
  ctx.batch = any_batch.on(device_);
  const TokenBatch& batch = ctx.batch;
  const TokenBatch& host_batch = ctx.host_batch;
  ctx.B = B, ctx.T = T, ctx.N = N;
  ctx.tp = tp_;
  if (tp_) ctx.tok_begin = tp_->rank() * N / tp_->size(), ctx.tok_end = (tp_->rank() + 1) * N / tp_->size();
  ctx.backward = backward;
  ctx.loss_scale = loss_scale;
  Tensor positions = Tensor::empty({N}, DType::i32, Device::cpu);
  for (int64_t i = 0; i < N; ++i) positions.data<int32_t>()[i] = int32_t(i % T);
  ctx.positions = on_device(positions, device_);
  for (int64_t l = 0; l < c.n_layers; ++l) {
    int64_t r = c.layer_ratio(l);
    bool have = r == 0;
    for (const BlockLayout& L : ctx.layouts) have |= L.m == r;
    if (have) continue;
    BlockLayout HL = make_block_layout(host_batch.doc, B, T, r), DL = HL;
    for (Tensor* t : {&DL.block_start, &DL.prev_start, &DL.no_prev, &DL.positions, &DL.vis_begin, &DL.vis_end})
      *t = on_device(*t, device_);
    ctx.host_layouts.push_back(std::move(HL));
    ctx.layouts.push_back(std::move(DL));
  }
  ctx.k.ones = Tensor::empty({N, n}, dt);
  ops::fill(ctx.k.ones, 1.0);
  ctx.k.zeros_nn = Tensor::zeros({N, n, n}, dt);
  ctx.k.zeros_nd = Tensor::zeros({N, n, d}, dt);
  const int64_t n_targets = host_batch.count_targets();
  ctx.aux_scale = loss_scale * double(n_targets);

  // MTP: position t reads token t+1 and predicts target t+1 (the ids and targets on every stage; the embedding
  // rows on the first, relayed to the last).
  const bool mtp = bool(m.mtp_block);
  if (mtp) {
    m.mtp_ids = Tensor::zeros({N}, DType::i32, Device::cpu);
    m.mtp_targets = Tensor::empty({N}, DType::i32, Device::cpu);
    const int32_t *ids = host_batch.ids.data<int32_t>(), *tg = host_batch.targets.data<int32_t>();
    const int32_t* doc = host_batch.doc.defined() ? host_batch.doc.data<int32_t>() : nullptr;
    m.mtp_target_count = 0;
    for (int64_t i = 0; i < N; ++i) {
      bool next = i % T + 1 < T && (!doc || doc[i + 1] == doc[i]);
      m.mtp_ids.data<int32_t>()[i] = i % T + 1 < T ? ids[i + 1] : 0;
      m.mtp_targets.data<int32_t>()[i] = next && tg[i + 1] >= 0 ? tg[i + 1] : -1;
      m.mtp_target_count += next && tg[i + 1] >= 0;
    }
    m.mtp_ids = on_device(m.mtp_ids, device_);
    m.mtp_targets = on_device(m.mtp_targets, device_);
  }
  stats_ = Stats{};
  Tensor X;
  if (m.first_stage) {  // the embedding, copied into the n streams
    m.emb = Tensor::empty({N, d}, dt);
    embed(batch.ids.reshape({N}), m.emb);
    m.X0 = Tensor::empty({N, n, d}, dt);
    ops::hc_expand_forward(ctx.k.zeros_nd, m.emb, ctx.k.ones, ctx.k.zeros_nn, m.X0);
    X = m.X0;
    if (mtp) {
      m.e_raw = Tensor::empty({N, d}, dt);
      embed(m.mtp_ids, m.e_raw);
    }
  } else {
    auto [x_in, e_in] = boundary_parts(input, N, n, d, mtp);
    X = x_in.clone();
    if (mtp) m.e_raw = e_in.clone();
  }
  m.X_in.clear();
  for (int64_t l = m.first; l < m.end; ++l) {
    m.X_in.push_back(X);
    X = m.layers[l].forward(ctx, X, expert_load_[l]);
  }
  m.X_final = X;
  // Per MoE layer; those of other pipeline stages -inf (the trainer takes the maximum over the stages).
  const int64_t n_moe = int64_t(expert_load_.size());
  stats_.swiglu_input_max_abs.assign(n_moe, -std::numeric_limits<double>::infinity());
  stats_.router_logit_max.assign(n_moe, -std::numeric_limits<double>::infinity());
  auto record = [&](int64_t i, const MoE& f) {
    stats_.swiglu_input_max_abs[i] = f.preact_max_abs, stats_.router_logit_max[i] = f.logit_max;
  };
  for (int64_t l = m.first; l < m.end; ++l) record(l, m.layers[l].ffn);
  stats_.balance_loss = ctx.balance_loss;
  stats_.indexer_kl_sum = ctx.indexer_kl_sum;
  m.ran = true;
  if (!m.last_stage) {
    if (tp_) max_over_tp(stats_.swiglu_input_max_abs);
    if (output.defined()) {
      auto [x_out, e_out] = boundary_parts(output, N, n, d, mtp);
      ops::copy(X, x_out);
      if (mtp) ops::copy(m.e_raw, e_out);
    }
    return 0.0;
  }
  m.logits = m.head->forward(X, m.output);
  m.losses = Tensor::empty({N}, dt);
  Tensor targets = batch.targets.reshape({N});
  // With backward, one fused call gives the losses and their gradient (the logits are not needed afterwards).
  m.dlogits = backward ? Tensor::empty(m.logits.shape(), dt) : Tensor();
  cross_entropy(m.logits, targets, m.losses, loss_scale, loss_grad ? Tensor() : m.dlogits);
  if (loss_grad) (*loss_grad)(m.logits, m.dlogits);
  stats_.main_loss_sum = sum_of(m.losses);
  stats_.main_targets = n_targets;
  if (logits_out) *logits_out = m.logits.clone();

  if (mtp) {
    stats_.mtp_targets = m.mtp_target_count;
    m.e_n = Block::norm(m.e_raw, m.e_norm, c.norm_eps, m.e_rstd);
    Tensor ep = linear(m.e_n, m.e_proj);
    m.xs = Block::norm(X.reshape({N * n, d}), m.h_norm, c.norm_eps, m.xs_rstd);
    Tensor hp = linear(m.xs, m.h_proj).reshape({N, n, d});
    ctx.k.eye_nn = Tensor::zeros({N, n, n}, dt);
    Tensor eye64 = Tensor::zeros({N, n, n}, DType::f64, Device::cpu);
    for (int64_t i = 0; i < N; ++i)
      for (int64_t j = 0; j < n; ++j) eye64.data<double>()[(i * n + j) * n + j] = 1.0;
    ctx.k.eye_nn.copy_from(eye64.to(dt));
    m.Xm = Tensor::empty({N, n, d}, dt);
    ops::hc_expand_forward(hp, ep, ctx.k.ones, ctx.k.eye_nn, m.Xm);  // X_k = ep + hp_k
    Tensor Xo = m.mtp_block->forward(ctx, m.Xm, expert_load_.back());
    m.mtp_logits = m.mtp_head->forward(Xo, m.output);
    m.mtp_losses = Tensor::empty({N}, dt);
    m.mtp_dlogits = backward ? Tensor::empty(m.mtp_logits.shape(), dt) : Tensor();
    cross_entropy(m.mtp_logits, m.mtp_targets, m.mtp_losses, loss_scale * c.mtp_loss_weight, m.mtp_dlogits);
    stats_.mtp_loss_sum = sum_of(m.mtp_losses);
    record(n_moe - 1, m.mtp_block->ffn);
  }
  stats_.balance_loss = ctx.balance_loss;
  stats_.indexer_kl_sum = ctx.indexer_kl_sum;
  if (tp_) max_over_tp(stats_.swiglu_input_max_abs);
  stats_.objective = (n_targets > 0 ? (stats_.main_loss_sum + c.mtp_loss_weight * stats_.mtp_loss_sum +
                                       c.indexer_loss_weight * stats_.indexer_kl_sum) /
                                          double(n_targets)
                                    : 0.0) +
                     stats_.balance_loss;
  return stats_.main_loss_sum;
}

void V4Model::run_backward(const Tensor& grad_output, const Tensor& grad_input) {
  DeviceScope on_model_device(device_);
  Impl& m = *impl_;
  Context& ctx = m.ctx;
  const ModelConfig& c = cfg_;
  const int64_t N = ctx.N, n = c.hc_mult, d = c.dim;
  const DType dt = dtype_;
  const bool mtp = bool(m.mtp_block);
  TS_CHECK(ctx.backward, "V4Model: a backward without a training forward");
  Tensor dX = Tensor::zeros({N, n, d}, dt);
  Tensor de;  // d loss / d the MTP's embedding rows (MTP only)
  if (!m.last_stage) {
    auto [dx_out, de_out] = boundary_parts(grad_output, N, n, d, mtp);
    ops::copy(dx_out, dX);
    de = de_out;
  } else {
  const Tensor& X = m.X_final;
  Tensor dXf = m.head->backward(m.dlogits, m.output, ctx.tp);
  ops::axpy(1.0, dXf, dX);
  if (mtp) {
    const Tensor& dml = m.mtp_dlogits;
    Tensor dXo = m.mtp_head->backward(dml, m.output, ctx.tp);
    Tensor dXm = m.mtp_block->backward(ctx, dXo);
    // X_k = e_proj e + h_proj rmsnorm(X_main,k).
    Tensor dep = Tensor::empty({N, d}, dt);
    ops::hc_collapse_forward(dXm, ctx.k.ones, dep);  // sum over streams
    Tensor den = Tensor::empty({N, d}, dt);
    ops::linear_backward(m.e_n, m.e_proj.value, dep, den, m.e_proj.grad);
    de = Tensor::empty({N, d}, dt);
    ops::rmsnorm_backward(m.e_raw, m.e_norm.value, m.e_rstd, den, de, m.e_norm.grad);
    Tensor dxs = Tensor::empty({N * n, d}, dt);
    ops::linear_backward(m.xs, m.h_proj.value, dXm.reshape({N * n, d}), dxs, m.h_proj.grad);
    Tensor dxm = Tensor::empty({N * n, d}, dt);
    ops::rmsnorm_backward(X.reshape({N * n, d}), m.h_norm.value, m.xs_rstd, dxs, dxm, m.h_norm.grad);
    ops::axpy(1.0, dxm.reshape({N, n, d}), dX);
  }
  }
  for (int64_t l = m.end - 1; l >= m.first; --l) dX = m.layers[l].backward(ctx, dX);
  if (!m.first_stage) {
    auto [dx_in, de_in] = boundary_parts(grad_input, N, n, d, mtp);
    ops::copy(dX, dx_in);
    if (mtp) ops::copy(de, de_in);
    return;
  }
  // The embedding's gradient: the MTP's rows first, then the input tokens' (the n copies of the embedding), the
  // order of one process.
  if (mtp) embed_backward(m.mtp_ids, de);
  Tensor demb = Tensor::empty({N, d}, dt);
  ops::hc_collapse_forward(dX, ctx.k.ones, demb);
  embed_backward(ctx.batch.ids.reshape({N}), demb);
}

// ------------------------------------------------------------------------------------------------ anticipatory routing
void RoutingCache::precompute(V4Model& model, int64_t step, const std::vector<TokenBatch>& micro) {
  std::vector<std::vector<Tensor>> sets;
  for (const TokenBatch& b : micro) sets.push_back(model.routing_lookahead(b));
  entries[step] = std::move(sets);
}

bool RoutingCache::apply(V4Model& model, int64_t step, int64_t micro) const {
  auto it = entries.find(step);
  if (it == entries.end() || micro >= int64_t(it->second.size())) {
    model.clear_routing_override();
    return false;
  }
  model.set_routing_override(it->second[micro]);
  return true;
}

void RoutingCache::drop_through(int64_t step) {
  while (!entries.empty() && entries.begin()->first <= step) entries.erase(entries.begin());
}

namespace {
double median_of(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  const size_t n = v.size();
  return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}
}  // namespace

LossSpikeDetector::Check LossSpikeDetector::check(double loss) const {
  Check c;
  c.median = c.mad = c.threshold = std::numeric_limits<double>::quiet_NaN();
  if (int64_t(history.size()) >= window && window > 0) {
    std::vector<double> v(history.begin(), history.end());
    c.median = median_of(v);
    for (double& x : v) x = std::abs(x - c.median);
    c.mad = median_of(v);
    c.threshold = c.median + k * std::max(c.mad, mad_floor);
    c.spike = loss > c.threshold;
  }
  if (!std::isfinite(loss)) c.spike = true;
  return c;
}

void LossSpikeDetector::push(double loss) {
  if (!std::isfinite(loss)) return;
  history.push_back(loss);
  while (int64_t(history.size()) > window) history.pop_front();
}

}  // namespace tessera

// Cached decoding (V4Model::new_cache, V4Model::decode), reusing the layer structs above.
#include "model/v4_decode.inc"
