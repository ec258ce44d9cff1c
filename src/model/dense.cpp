#include "model/dense.h"

#include <cmath>

#include "core/rng.h"
#include "ops/ops.h"

namespace tessera {

DenseModel::DenseModel(const ModelConfig& cfg, DType dtype, Device device) : cfg_(cfg), device_(device), dtype_(dtype) {
  cfg_.validate();
  DeviceScope on_device(device_);  // every tensor below (and in ensure_buffers) is allocated on the model's device
  const int64_t C = cfg.dim, V = cfg.vocab_size, F = cfg.ffn_dim, hd = cfg.attn_head_dim();
  tok_embeddings_ = make_param("tok_embeddings", ParamKind::embedding, {V, C}, dtype);
  for (int64_t l = 0; l < cfg.n_layers; ++l) {
    std::string p = "layers." + std::to_string(l) + ".";
    layers_.push_back(Layer{
        make_param(p + "attn_norm", ParamKind::vector, {C}, dtype),
        make_param(p + "attn.wq", ParamKind::matrix, {cfg.n_heads * hd, C}, dtype),
        make_param(p + "attn.wk", ParamKind::matrix, {cfg.n_kv_heads * hd, C}, dtype),
        make_param(p + "attn.wv", ParamKind::matrix, {cfg.n_kv_heads * hd, C}, dtype),
        make_param(p + "attn.wo", ParamKind::matrix, {C, cfg.n_heads * hd}, dtype),
        make_param(p + "ffn_norm", ParamKind::vector, {C}, dtype),
        make_param(p + "ffn.w1", ParamKind::matrix, {F, C}, dtype),
        make_param(p + "ffn.w2", ParamKind::matrix, {C, F}, dtype),
        make_param(p + "ffn.w3", ParamKind::matrix, {F, C}, dtype),
    });
  }
  norm_ = make_param("norm", ParamKind::vector, {C}, dtype);
  output_ = make_param("output", ParamKind::head, {V, C}, dtype);
}

ParamList DenseModel::params() {
  ParamList ps{&tok_embeddings_};
  for (Layer& l : layers_)
    for (Param* p : {&l.attn_norm, &l.wq, &l.wk, &l.wv, &l.wo, &l.ffn_norm, &l.w1, &l.w2, &l.w3}) ps.push_back(p);
  ps.push_back(&norm_);
  ps.push_back(&output_);
  return ps;
}

void DenseModel::init(uint64_t seed) {
  const double residual_std = cfg_.init_std / std::sqrt(2.0 * cfg_.n_layers);
  for (Param* p : params()) {
    if (p->kind == ParamKind::vector) {
      ops::fill(p->value, 1.0);
      continue;
    }
    bool residual = p->name.ends_with(".wo") || p->name.ends_with(".w2");
    Tensor f32 = Tensor::empty(p->value.shape(), DType::f32, Device::cpu);
    Rng{seed, stream_id(p->name.c_str())}.fill_normal(f32.data<float>(), f32.numel(), 0.0,
                                                       residual ? residual_std : cfg_.init_std);
    p->value.copy_from(f32.to(dtype_));
  }
}

void DenseModel::ensure_buffers(int64_t B, int64_t T) {
  if (B == B_ && T == T_) return;
  if (T > cfg_.max_seq_len) TS_FAIL("sequence length ", T, " exceeds model.max_seq_len ", cfg_.max_seq_len);
  B_ = B, T_ = T;
  DeviceScope on_device(device_);
  const int64_t N = B * T, C = cfg_.dim, F = cfg_.ffn_dim, H = cfg_.n_heads, KH = cfg_.n_kv_heads;
  const int64_t hd = cfg_.attn_head_dim(), V = cfg_.vocab_size;
  auto buf = [&](const Shape& s) { return Tensor::empty(s, dtype_); };
  acts_.clear();
  for (int64_t l = 0; l < cfg_.n_layers; ++l)
    acts_.push_back(LayerActs{buf({N, C}), buf({N, C}), buf({N}), buf({B, T, H, hd}), buf({B, T, KH, hd}),
                              buf({B, T, KH, hd}), buf({B, T, H, hd}), buf({B, H, T}), buf({N, C}), buf({N, C}),
                              buf({N}), buf({N, F}), buf({N, F}), buf({N, F})});
  Tensor positions = Tensor::empty({N}, DType::i32, Device::cpu);
  for (int64_t i = 0; i < N; ++i) positions.data<int32_t>()[i] = static_cast<int32_t>(i % T);
  positions_ = positions.to_device(device_);
  x_final_ = buf({N, C});
  h_final_ = buf({N, C});
  rstd_final_ = buf({N});
  logits_ = buf({N, V});
  losses_ = buf({N});
  dx_ = buf({N, C}), dx2_ = buf({N, C}), dh_ = buf({N, C}), dtmp_ = buf({N, C});
  dq_ = buf({B, T, H, hd}), dk_ = buf({B, T, KH, hd}), dv_ = buf({B, T, KH, hd}), datt_ = buf({B, T, H, hd});
  dg_ = buf({N, F}), du_ = buf({N, F}), ds_ = buf({N, F});
}

void DenseModel::run_forward(const TokenBatch& batch) {
  TS_CHECK(batch.ids.device() == device_, "run_forward: batch on ", device_name(batch.ids.device()));
  const int64_t B = batch.batch_size(), T = batch.seq_len();
  ensure_buffers(B, T);
  const int64_t N = B * T, H = cfg_.n_heads, KH = cfg_.n_kv_heads, hd = cfg_.attn_head_dim();
  const double scale = 1.0 / std::sqrt(double(hd));
  Tensor ids = batch.ids.reshape({N});
  ops::embedding_forward(ids, tok_embeddings_.value, acts_.empty() ? x_final_ : acts_[0].x);
  for (size_t l = 0; l < layers_.size(); ++l) {
    Layer& w = layers_[l];
    LayerActs& a = acts_[l];
    Tensor out = l + 1 < layers_.size() ? acts_[l + 1].x : x_final_;  // (N, C) residual stream
    ops::rmsnorm_forward(a.x, w.attn_norm.value, cfg_.norm_eps, a.h1, a.rstd1);
    ops::linear_forward(a.h1, w.wq.value, a.q.reshape({N, H * hd}));
    ops::linear_forward(a.h1, w.wk.value, a.k.reshape({N, KH * hd}));
    ops::linear_forward(a.h1, w.wv.value, a.v.reshape({N, KH * hd}));
    ops::rope_forward(a.q, positions_, cfg_.rope_theta, hd, false, a.q);  // in place
    ops::rope_forward(a.k, positions_, cfg_.rope_theta, hd, false, a.k);
    ops::attention_forward(a.q, a.k, a.v, batch.doc, scale, a.att, a.lse);
    ops::copy(a.x, a.x2);
    ops::gemm(a.att.reshape({N, H * hd}), false, w.wo.value, true, a.x2, 1.0, 1.0);  // x2 = x + att wo^T
    ops::rmsnorm_forward(a.x2, w.ffn_norm.value, cfg_.norm_eps, a.h2, a.rstd2);
    ops::linear_forward(a.h2, w.w1.value, a.g);
    ops::linear_forward(a.h2, w.w3.value, a.u);
    ops::swiglu_forward(a.g, a.u, a.s);
    ops::copy(a.x2, out);
    ops::gemm(a.s, false, w.w2.value, true, out, 1.0, 1.0);  // out = x2 + s w2^T
  }
  ops::rmsnorm_forward(x_final_, norm_.value, cfg_.norm_eps, h_final_, rstd_final_);
  ops::linear_forward(h_final_, output_.value, logits_);
}

static double sum_losses(const Tensor& device_losses) {
  Tensor losses = device_losses.device() == Device::cpu ? device_losses : device_losses.to_device(Device::cpu);
  double total = 0;  // in order: deterministic
  for (int64_t i = 0; i < losses.numel(); ++i)
    total += losses.dtype() == DType::f32 ? losses.data<float>()[i] : losses.data<double>()[i];
  return total;
}

double DenseModel::forward(const TokenBatch& host_batch, Tensor* logits) {
  const TokenBatch batch = host_batch.on(device_);
  run_forward(batch);
  if (logits) *logits = logits_.clone();
  ops::cross_entropy(logits_, batch.targets.reshape({B_ * T_}), losses_, 1.0, Tensor());
  return sum_losses(losses_);
}

double DenseModel::forward_backward(const TokenBatch& host_batch, double loss_scale) {
  const TokenBatch batch = host_batch.on(device_);
  run_forward(batch);
  // The fused cross-entropy overwrites the logits with their gradient.
  ops::cross_entropy(logits_, batch.targets.reshape({B_ * T_}), losses_, loss_scale, logits_);
  const double loss = sum_losses(losses_);
  run_backward(batch, logits_);
  return loss;
}

double DenseModel::forward_backward_logits(const TokenBatch& host_batch, const LogitsGrad& loss_grad) {
  const TokenBatch batch = host_batch.on(device_);
  run_forward(batch);
  ops::cross_entropy(logits_, batch.targets.reshape({B_ * T_}), losses_, 1.0, Tensor());
  const double loss = sum_losses(losses_);
  Tensor dlogits = Tensor::empty(logits_.shape(), logits_.dtype(), logits_.device());
  loss_grad(logits_, dlogits);
  run_backward(batch, dlogits);
  return loss;
}

void DenseModel::run_backward(const TokenBatch& batch, const Tensor& dlogits) {
  const int64_t B = B_, T = T_, N = B * T, H = cfg_.n_heads, KH = cfg_.n_kv_heads, hd = cfg_.attn_head_dim();
  const double scale = 1.0 / std::sqrt(double(hd));

  ops::linear_backward(h_final_, output_.value, dlogits, dh_, output_.grad);
  ops::rmsnorm_backward(x_final_, norm_.value, rstd_final_, dh_, dx_, norm_.grad);
  for (int64_t l = cfg_.n_layers - 1; l >= 0; --l) {
    Layer& w = layers_[l];
    LayerActs& a = acts_[l];
    // out = x2 + swiglu(h2 w1^T, h2 w3^T) w2^T; dx_ holds d out.
    ops::linear_backward(a.s, w.w2.value, dx_, ds_, w.w2.grad);
    ops::swiglu_backward(a.g, a.u, ds_, dg_, du_);
    ops::linear_backward(a.h2, w.w1.value, dg_, dh_, w.w1.grad);
    ops::gemm(du_, false, w.w3.value, false, dh_, 1.0, 1.0);
    ops::gemm(du_, true, a.h2, false, w.w3.grad, 1.0, 1.0);
    ops::rmsnorm_backward(a.x2, w.ffn_norm.value, a.rstd2, dh_, dtmp_, w.ffn_norm.grad);
    ops::copy(dx_, dx2_);
    ops::axpy(1.0, dtmp_, dx2_);
    // x2 = x + attention(rope(h1 wq^T), rope(h1 wk^T), h1 wv^T) wo^T.
    ops::linear_backward(a.att.reshape({N, H * hd}), w.wo.value, dx2_, datt_.reshape({N, H * hd}), w.wo.grad);
    ops::attention_backward(a.q, a.k, a.v, batch.doc, scale, a.att, a.lse, datt_, dq_, dk_, dv_);
    ops::rope_backward(dq_, positions_, cfg_.rope_theta, hd, false, dq_);
    ops::rope_backward(dk_, positions_, cfg_.rope_theta, hd, false, dk_);
    Tensor dq2 = dq_.reshape({N, H * hd}), dk2 = dk_.reshape({N, KH * hd}), dv2 = dv_.reshape({N, KH * hd});
    ops::linear_backward(a.h1, w.wq.value, dq2, dh_, w.wq.grad);
    ops::gemm(dk2, false, w.wk.value, false, dh_, 1.0, 1.0);
    ops::gemm(dk2, true, a.h1, false, w.wk.grad, 1.0, 1.0);
    ops::gemm(dv2, false, w.wv.value, false, dh_, 1.0, 1.0);
    ops::gemm(dv2, true, a.h1, false, w.wv.grad, 1.0, 1.0);
    ops::rmsnorm_backward(a.x, w.attn_norm.value, a.rstd1, dh_, dtmp_, w.attn_norm.grad);
    ops::copy(dx2_, dx_);
    ops::axpy(1.0, dtmp_, dx_);
  }
  ops::embedding_backward(batch.ids.reshape({N}), dx_, tok_embeddings_.grad);
}

}  // namespace tessera
