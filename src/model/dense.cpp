#include "model/dense.h"

#include <cmath>
#include <utility>

#include "core/rng.h"
#include "model/vocab_parallel.h"
#include "ops/ops.h"
#include "parallel/communicator.h"

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
  last_layer_ = cfg.n_layers;
  H_ = cfg.n_heads, KH_ = cfg.n_kv_heads, F_ = cfg.ffn_dim, V_ = cfg.vocab_size;
}

void DenseModel::set_tensor_parallel(Communicator& group) {
  TS_CHECK(!tp_, "set_tensor_parallel: already set");
  TS_CHECK(device_ == Device::cpu, "tensor parallelism runs on host tensors; the model is on ", device_name(device_));
  const int64_t P = group.size();
  for (auto [key, n] : {std::pair{"n_heads", cfg_.n_heads}, std::pair{"n_kv_heads", cfg_.n_kv_heads},
                        std::pair{"ffn_dim", cfg_.ffn_dim}, std::pair{"vocab_size", cfg_.vocab_size}})
    if (n % P != 0)
      TS_FAIL("tensor parallelism: model.", key, " (", n, ") must be a multiple of parallel.tp (", P,
              "): each tp rank holds an equal part");
  tp_ = &group;
  H_ = cfg_.n_heads / P, KH_ = cfg_.n_kv_heads / P, F_ = cfg_.ffn_dim / P, V_ = cfg_.vocab_size / P;
  v0_ = group.rank() * V_;
  // Megatron's layout: q/k/v, w1/w3 and the vocabulary rows column-parallel (split along dim 0, their outputs),
  // wo and w2 row-parallel (along dim 1, their inputs), so each attention head and each hidden unit of the MLP
  // lives on one rank and a layer needs one all-reduce after attention and one after the MLP.
  split_param(tok_embeddings_, 0, group);
  split_param(output_, 0, group);
  for (Layer& l : layers_) {
    for (Param* p : {&l.wq, &l.wk, &l.wv, &l.w1, &l.w3}) split_param(*p, 0, group);
    for (Param* p : {&l.wo, &l.w2}) split_param(*p, 1, group);
  }
  B_ = T_ = 0;
}

void DenseModel::set_pipeline_stage(int stage, int n_stages) {
  TS_CHECK(n_stages >= 1 && n_stages <= cfg_.n_layers, "pipeline parallelism: parallel.pp (", n_stages,
           ") must not exceed model.n_layers (", cfg_.n_layers, "): each stage holds at least one layer");
  std::vector<int64_t> layers;
  for (int s = 0; s < n_stages; ++s) layers.push_back((s + 1) * cfg_.n_layers / n_stages - s * cfg_.n_layers / n_stages);
  set_pipeline_stage(stage, layers);
}

void DenseModel::set_pipeline_stage(int stage, const std::vector<int64_t>& layers_per_stage) {
  const int n_stages = int(layers_per_stage.size());
  TS_CHECK(n_stages >= 1 && stage >= 0 && stage < n_stages, "set_pipeline_stage: stage ", stage, " of ", n_stages);
  int64_t total = 0;
  for (int64_t n : layers_per_stage) {
    TS_CHECK(n >= 1, "pipeline parallelism: every stage holds at least one layer, got ", n);
    total += n;
  }
  TS_CHECK(total == cfg_.n_layers, "pipeline parallelism: the stages hold ", total, " layers, the model has ",
           cfg_.n_layers);
  stage_ = stage, n_stages_ = n_stages;
  first_layer_ = 0;
  for (int s = 0; s < stage; ++s) first_layer_ += layers_per_stage[s];
  last_layer_ = first_layer_ + layers_per_stage[stage];
  // What other stages hold is dropped.
  auto drop = [](Param& p) { p.value = p.grad = Tensor(); };
  for (int64_t l = 0; l < cfg_.n_layers; ++l)
    if (l < first_layer_ || l >= last_layer_)
      for (Param* p : {&layers_[l].attn_norm, &layers_[l].wq, &layers_[l].wk, &layers_[l].wv, &layers_[l].wo,
                       &layers_[l].ffn_norm, &layers_[l].w1, &layers_[l].w2, &layers_[l].w3})
        drop(*p);
  if (!first_stage()) drop(tok_embeddings_);
  if (!last_stage()) drop(norm_), drop(output_);
  B_ = T_ = 0;
}

ParamList DenseModel::params() {
  ParamList ps;
  if (first_stage()) ps.push_back(&tok_embeddings_);
  for (int64_t i = first_layer_; i < last_layer_; ++i) {
    Layer& l = layers_[i];
    for (Param* p : {&l.attn_norm, &l.wq, &l.wk, &l.wv, &l.wo, &l.ffn_norm, &l.w1, &l.w2, &l.w3}) ps.push_back(p);
  }
  if (last_stage()) {
    ps.push_back(&norm_);
    ps.push_back(&output_);
  }
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
    // A shard (tensor parallelism) draws the whole tensor and keeps its part: the values of one process.
    Tensor f32 = Tensor::empty(p->logical_shape(), DType::f32, Device::cpu);
    Rng{seed, stream_id(p->name.c_str())}.fill_normal(f32.data<float>(), f32.numel(), 0.0,
                                                       residual ? residual_std : cfg_.init_std);
    p->value.copy_from(p->slice_of(f32).to(dtype_));
  }
}

DenseModel::Activations DenseModel::new_activations() const {
  DeviceScope on_device(device_);
  const int64_t B = B_, T = T_, N = B * T, C = cfg_.dim, F = F_, H = H_, KH = KH_, hd = cfg_.attn_head_dim(), V = V_;
  auto buf = [&](const Shape& s) { return Tensor::empty(s, dtype_); };
  Activations a;
  for (int64_t l = first_layer_; l < last_layer_; ++l)
    a.layers.push_back(LayerActs{buf({N, C}), buf({N, C}), buf({N}), buf({B, T, H, hd}), buf({B, T, KH, hd}),
                                 buf({B, T, KH, hd}), buf({B, T, H, hd}), buf({B, H, T}), buf({N, C}), buf({N, C}),
                                 buf({N}), buf({N, F}), buf({N, F}), buf({N, F})});
  a.x_final = buf({N, C});
  if (last_stage()) {
    a.h_final = buf({N, C});
    a.rstd_final = buf({N});
    a.logits = buf({N, V});
    a.losses = buf({N});
  }
  return a;
}

void DenseModel::ensure_buffers(int64_t B, int64_t T) {
  if (B == B_ && T == T_) return;
  if (T > cfg_.max_seq_len) TS_FAIL("sequence length ", T, " exceeds model.max_seq_len ", cfg_.max_seq_len);
  TS_CHECK(parked_.empty(), "DenseModel: the batch shape changed with micro-batches waiting for their backward");
  B_ = B, T_ = T;
  DeviceScope on_device(device_);
  const int64_t N = B * T, C = cfg_.dim, F = F_, H = H_, KH = KH_, hd = cfg_.attn_head_dim();
  auto buf = [&](const Shape& s) { return Tensor::empty(s, dtype_); };
  cur_ = new_activations();
  spare_.clear();
  Tensor positions = Tensor::empty({N}, DType::i32, Device::cpu);
  for (int64_t i = 0; i < N; ++i) positions.data<int32_t>()[i] = static_cast<int32_t>(i % T);
  positions_ = positions.to_device(device_);
  dx_ = buf({N, C}), dx2_ = buf({N, C}), dh_ = buf({N, C}), dtmp_ = buf({N, C});
  dq_ = buf({B, T, H, hd}), dk_ = buf({B, T, KH, hd}), dv_ = buf({B, T, KH, hd}), datt_ = buf({B, T, H, hd});
  dg_ = buf({N, F}), du_ = buf({N, F}), ds_ = buf({N, F});
}

void DenseModel::run_forward(const TokenBatch& batch, const Tensor& input) {
  TS_CHECK(batch.ids.device() == device_, "run_forward: batch on ", device_name(batch.ids.device()));
  const int64_t B = batch.batch_size(), T = batch.seq_len();
  ensure_buffers(B, T);
  const int64_t N = B * T, H = H_, KH = KH_, hd = cfg_.attn_head_dim();
  const double scale = 1.0 / std::sqrt(double(hd));
  std::vector<LayerActs>& acts = cur_.layers;
  const Tensor first_x = acts.empty() ? cur_.x_final : acts[0].x;
  if (!first_stage()) ops::copy(input, first_x);
  else if (tp_) vocab_parallel_embedding_forward(batch.ids.reshape({N}), tok_embeddings_.value, v0_, first_x, *tp_);
  else ops::embedding_forward(batch.ids.reshape({N}), tok_embeddings_.value, first_x);
  for (size_t i = 0; i < acts.size(); ++i) {
    Layer& w = layers_[first_layer_ + int64_t(i)];
    LayerActs& a = acts[i];
    Tensor out = i + 1 < acts.size() ? acts[i + 1].x : cur_.x_final;  // (N, C) residual stream
    ops::rmsnorm_forward(a.x, w.attn_norm.value, cfg_.norm_eps, a.h1, a.rstd1);
    ops::linear_forward(a.h1, w.wq.value, a.q.reshape({N, H * hd}));
    ops::linear_forward(a.h1, w.wk.value, a.k.reshape({N, KH * hd}));
    ops::linear_forward(a.h1, w.wv.value, a.v.reshape({N, KH * hd}));
    ops::rope_forward(a.q, positions_, cfg_.rope_theta, hd, false, a.q);  // in place
    ops::rope_forward(a.k, positions_, cfg_.rope_theta, hd, false, a.k);
    ops::attention_forward(a.q, a.k, a.v, batch.doc, scale, a.att, a.lse);
    add_row_parallel(a.att.reshape({N, H * hd}), w.wo.value, a.x, a.x2);  // x2 = x + att wo^T
    ops::rmsnorm_forward(a.x2, w.ffn_norm.value, cfg_.norm_eps, a.h2, a.rstd2);
    ops::linear_forward(a.h2, w.w1.value, a.g);
    ops::linear_forward(a.h2, w.w3.value, a.u);
    ops::swiglu_forward(a.g, a.u, a.s);
    add_row_parallel(a.s, w.w2.value, a.x2, out);  // out = x2 + s w2^T
  }
  if (!last_stage()) return;
  ops::rmsnorm_forward(cur_.x_final, norm_.value, cfg_.norm_eps, cur_.h_final, cur_.rstd_final);
  ops::linear_forward(cur_.h_final, output_.value, cur_.logits);
}

void DenseModel::add_row_parallel(const Tensor& in, const Tensor& w, const Tensor& residual, const Tensor& out) {
  if (!tp_) {
    ops::copy(residual, out);
    ops::gemm(in, false, w, true, out, 1.0, 1.0);
    return;
  }
  ops::gemm(in, false, w, true, out);  // this rank's part of in w^T
  tp_->all_reduce(out);
  ops::axpy(1.0, residual, out);
}

void DenseModel::cross_entropy(const TokenBatch& batch, double loss_scale, const Tensor& dlogits) {
  const Tensor targets = batch.targets.reshape({B_ * T_});
  if (tp_) vocab_parallel_cross_entropy(cur_.logits, targets, v0_, *tp_, cur_.losses, loss_scale, dlogits);
  else ops::cross_entropy(cur_.logits, targets, cur_.losses, loss_scale, dlogits);
}

static double sum_losses(const Tensor& device_losses) {
  Tensor losses = device_losses.device() == Device::cpu ? device_losses : device_losses.to_device(Device::cpu);
  double total = 0;  // in order: deterministic
  for (int64_t i = 0; i < losses.numel(); ++i)
    total += losses.dtype() == DType::f32 ? losses.data<float>()[i] : losses.data<double>()[i];
  return total;
}

double DenseModel::forward(const TokenBatch& host_batch, Tensor* logits) {
  TS_CHECK(n_stages_ == 1, "DenseModel::forward: a pipeline stage runs stage_forward");
  const TokenBatch batch = host_batch.on(device_);
  TS_CHECK(!logits || !tp_, "DenseModel::forward: under tensor parallelism each rank holds a part of the logits");
  run_forward(batch);
  if (logits) *logits = cur_.logits.clone();
  cross_entropy(batch, 1.0, Tensor());
  return sum_losses(cur_.losses);
}

double DenseModel::forward_backward(const TokenBatch& host_batch, double loss_scale) {
  TS_CHECK(n_stages_ == 1, "DenseModel::forward_backward: a pipeline stage runs stage_forward / stage_backward");
  const TokenBatch batch = host_batch.on(device_);
  run_forward(batch);
  // The fused cross-entropy overwrites the logits with their gradient.
  cross_entropy(batch, loss_scale, cur_.logits);
  const double loss = sum_losses(cur_.losses);
  run_backward(batch, cur_.logits);
  return loss;
}

double DenseModel::forward_backward_logits(const TokenBatch& host_batch, const LogitsGrad& loss_grad) {
  TS_CHECK(n_stages_ == 1 && !tp_, "DenseModel::forward_backward_logits: not with pipeline or tensor parallelism");
  const TokenBatch batch = host_batch.on(device_);
  run_forward(batch);
  cross_entropy(batch, 1.0, Tensor());
  const double loss = sum_losses(cur_.losses);
  Tensor dlogits = Tensor::empty(cur_.logits.shape(), cur_.logits.dtype(), cur_.logits.device());
  loss_grad(cur_.logits, dlogits);
  run_backward(batch, dlogits);
  return loss;
}

double DenseModel::stage_forward(int64_t slot, const TokenBatch& host_batch, const Tensor& input,
                                 const Tensor& output, double loss_scale) {
  const TokenBatch batch = host_batch.on(device_);
  run_forward(batch, input);
  double loss = 0;
  if (last_stage()) {
    // With a backward to follow, the fused cross-entropy leaves the logits' gradient in their place.
    cross_entropy(batch, loss_scale, loss_scale != 0 ? cur_.logits : Tensor());
    loss = sum_losses(cur_.losses);
  } else {
    ops::copy(cur_.x_final, output);
  }
  if (loss_scale == 0) return loss;  // no backward: nothing to keep
  TS_CHECK(!parked_.count(slot), "stage_forward: slot ", slot, " is already waiting for its backward");
  Activations next;
  if (!spare_.empty()) {
    next = std::move(spare_.back());
    spare_.pop_back();
  } else {
    next = new_activations();
  }
  parked_[slot] = std::exchange(cur_, std::move(next));
  return loss;
}

void DenseModel::stage_backward(int64_t slot, const TokenBatch& host_batch, const Tensor& grad_output,
                                const Tensor& grad_input) {
  auto it = parked_.find(slot);
  TS_CHECK(it != parked_.end(), "stage_backward: no forward of slot ", slot, " waits for its backward");
  const TokenBatch batch = host_batch.on(device_);
  spare_.push_back(std::exchange(cur_, std::move(it->second)));
  parked_.erase(it);
  run_backward(batch, last_stage() ? cur_.logits : grad_output);
  if (!first_stage()) ops::copy(dx_, grad_input);
}

void DenseModel::run_backward(const TokenBatch& batch, const Tensor& dlogits) {
  const int64_t B = B_, T = T_, N = B * T, H = H_, KH = KH_, hd = cfg_.attn_head_dim();
  const double scale = 1.0 / std::sqrt(double(hd));

  if (last_stage()) {
    ops::linear_backward(cur_.h_final, output_.value, dlogits, dh_, output_.grad);
    if (tp_) tp_->all_reduce(dh_);  // each rank's vocabulary part of d h_final
    ops::rmsnorm_backward(cur_.x_final, norm_.value, cur_.rstd_final, dh_, dx_, norm_.grad);
  } else {
    ops::copy(dlogits, dx_);  // d output, from the next stage
  }
  std::vector<LayerActs>& acts = cur_.layers;
  for (int64_t i = int64_t(acts.size()) - 1; i >= 0; --i) {
    Layer& w = layers_[first_layer_ + i];
    LayerActs& a = acts[i];
    // out = x2 + swiglu(h2 w1^T, h2 w3^T) w2^T; dx_ holds d out.
    ops::linear_backward(a.s, w.w2.value, dx_, ds_, w.w2.grad);
    ops::swiglu_backward(a.g, a.u, ds_, dg_, du_);
    ops::linear_backward(a.h2, w.w1.value, dg_, dh_, w.w1.grad);
    ops::gemm(du_, false, w.w3.value, false, dh_, 1.0, 1.0);
    ops::gemm(du_, true, a.h2, false, w.w3.grad, 1.0, 1.0);
    if (tp_) tp_->all_reduce(dh_);  // each rank's hidden units' part of d h2
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
    if (tp_) tp_->all_reduce(dh_);  // each rank's heads' part of d h1
    ops::rmsnorm_backward(a.x, w.attn_norm.value, a.rstd1, dh_, dtmp_, w.attn_norm.grad);
    ops::copy(dx2_, dx_);
    ops::axpy(1.0, dtmp_, dx_);
  }
  if (!first_stage()) return;
  if (tp_) vocab_parallel_embedding_backward(batch.ids.reshape({N}), dx_, v0_, tok_embeddings_.grad);
  else ops::embedding_backward(batch.ids.reshape({N}), dx_, tok_embeddings_.grad);
}

}  // namespace tessera
