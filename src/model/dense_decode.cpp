// Cached decoding for the dense model: a K/V cache per layer, (B, capacity + 1, KH, hd) on the model's device. Slot
// `capacity` of each row is scratch: padding tokens write their (unused) K/V there. New tokens are appended at
// their positions by scatter_add_rows into zero-initialised slots (each slot is written once), then attend the
// cache with ops::attention_decode.
#include <cmath>

#include "model/decode.h"
#include "model/dense.h"
#include "ops/ops.h"
#include "ops/v4_ops.h"

namespace tessera {

namespace {
struct DenseCache final : DecodeCache {
  std::vector<Tensor> k, v;  // per layer (B, capacity + 1, KH, hd)
};
}  // namespace

std::unique_ptr<DecodeCache> DenseModel::new_cache(int64_t batch, int64_t capacity) {
  TS_CHECK(batch > 0 && capacity > 0, "new_cache: batch ", batch, " and capacity ", capacity, " must be positive");
  TS_CHECK(n_stages_ == 1 && !tp_, "cached decoding with pipeline or tensor parallelism is not supported: load the checkpoint in one process");
  DeviceScope on_device(device_);
  auto c = std::make_unique<DenseCache>();
  c->batch = batch, c->capacity = capacity;
  c->len.assign(batch, 0);
  const int64_t KH = cfg_.n_kv_heads, hd = cfg_.attn_head_dim();
  for (int64_t l = 0; l < cfg_.n_layers; ++l) {
    c->k.push_back(Tensor::zeros({batch, capacity + 1, KH, hd}, dtype_));
    c->v.push_back(Tensor::zeros({batch, capacity + 1, KH, hd}, dtype_));
  }
  return c;
}

void DenseModel::decode(const Tensor& ids, DecodeCache& base, const Tensor& logits_out) {
  auto* cache = dynamic_cast<DenseCache*>(&base);
  TS_CHECK(cache, "DenseModel::decode: the cache was not made by a dense model");
  DecodePlan p = plan_decode(ids, *cache, cfg_.vocab_size);
  const int64_t B = p.B, t = p.t, N = B * t, C = cfg_.dim, F = cfg_.ffn_dim, H = cfg_.n_heads,
                KH = cfg_.n_kv_heads, hd = cfg_.attn_head_dim(), V = cfg_.vocab_size, S = cache->capacity + 1;
  TS_CHECK(logits_out.dtype() == DType::f32 && logits_out.device() == Device::cpu &&
               logits_out.shape() == Shape({N, V}),
           "DenseModel::decode: logits_out must be host f32 (", N, ", ", V, "), got ", logits_out.str());
  if (N == 0) return;
  DeviceScope on_device(device_);
  const double scale = 1.0 / std::sqrt(double(hd));
  // Cache rows (flattened (B*S)) the new tokens' K/V go to.
  Tensor slots = Tensor::empty({N}, DType::i32, Device::cpu);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t i = 0; i < t; ++i) {
      int32_t pos = p.pos[b * t + i];
      slots.data<int32_t>()[b * t + i] = int32_t(b * S + (pos < 0 ? S - 1 : pos));
    }
  Tensor ids_d = p.ids.to_device(device_), rope_d = p.rope_pos.to_device(device_),
         qpos_d = p.q_pos.to_device(device_), slots_d = slots.to_device(device_);
  auto buf = [&](const Shape& s) { return Tensor::empty(s, dtype_); };
  Tensor x = buf({N, C}), x2 = buf({N, C}), h = buf({N, C}), rstd = buf({N});
  Tensor q = buf({B, t, H, hd}), k = buf({B, t, KH, hd}), v = buf({B, t, KH, hd}), att = buf({B, t, H, hd});
  Tensor g = buf({N, F}), u = buf({N, F}), s = buf({N, F}), logits = buf({N, V});
  ops::embedding_forward(ids_d, tok_embeddings_.value, x);
  for (size_t l = 0; l < layers_.size(); ++l) {
    Layer& w = layers_[l];
    ops::rmsnorm_forward(x, w.attn_norm.value, cfg_.norm_eps, h, rstd);
    ops::linear_forward(h, w.wq.value, q.reshape({N, H * hd}));
    ops::linear_forward(h, w.wk.value, k.reshape({N, KH * hd}));
    ops::linear_forward(h, w.wv.value, v.reshape({N, KH * hd}));
    ops::rope_forward(q, rope_d, cfg_.rope_theta, hd, false, q);
    ops::rope_forward(k, rope_d, cfg_.rope_theta, hd, false, k);
    ops::scatter_add_rows(k.reshape({N, KH * hd}), slots_d, Tensor(), cache->k[l].reshape({B * S, KH * hd}));
    ops::scatter_add_rows(v.reshape({N, KH * hd}), slots_d, Tensor(), cache->v[l].reshape({B * S, KH * hd}));
    ops::attention_decode(q, cache->k[l], cache->v[l], qpos_d, scale, att);
    ops::copy(x, x2);
    ops::gemm(att.reshape({N, H * hd}), false, w.wo.value, true, x2, 1.0, 1.0);
    ops::rmsnorm_forward(x2, w.ffn_norm.value, cfg_.norm_eps, h, rstd);
    ops::linear_forward(h, w.w1.value, g);
    ops::linear_forward(h, w.w3.value, u);
    ops::swiglu_forward(g, u, s);
    ops::copy(x2, x);
    ops::gemm(s, false, w.w2.value, true, x, 1.0, 1.0);
  }
  ops::rmsnorm_forward(x, norm_.value, cfg_.norm_eps, h, rstd);
  ops::linear_forward(h, output_.value, logits);
  Tensor host = logits.device() == Device::cpu ? logits : logits.to_device(Device::cpu);
  logits_out.copy_from(host.dtype() == DType::f32 ? host : host.to(DType::f32));
  for (int64_t b = 0; b < B; ++b) cache->len[b] += p.n_new[b];
}

}  // namespace tessera
