// The dense Llama-layout model with explicit forward and backward:
//   tok_embeddings -> n_layers x [RMSNorm, causal GQA attention with RoPE, residual, RMSNorm, SwiGLU MLP,
//   residual] -> RMSNorm -> untied output head.
#pragma once
#include <memory>
#include <vector>

#include "core/batch.h"
#include "model/model.h"

namespace tessera {

class DenseModel final : public Model {
 public:
  // Parameters, activations and gradients live on `device`.
  explicit DenseModel(const ModelConfig& cfg, DType dtype = DType::f32, Device device = Device::cpu);

  const ModelConfig& config() const override { return cfg_; }
  ParamList params() override;
  // Normal(0, init_std) for every matrix, with the residual projections (wo, w2) scaled by 1/sqrt(2 n_layers);
  // norm weights 1. Each parameter draws from its own named Philox stream: independent of thread count.
  void init(uint64_t seed) override;

  // Sum of token losses over positions with a target. If logits is non-null it receives (B*T, V) logits.
  double forward(const TokenBatch& batch, Tensor* logits = nullptr) override;
  // Forward, then backward of loss_scale * (sum of token losses); parameter gradients accumulate (+=).
  // Returns the sum of token losses.
  double forward_backward(const TokenBatch& batch, double loss_scale) override;
  double forward_backward_logits(const TokenBatch& batch, const LogitsGrad& loss_grad) override;
  // Cached decoding (dense_decode.cpp): a per-layer K/V cache.
  std::unique_ptr<DecodeCache> new_cache(int64_t batch, int64_t capacity) override;
  void decode(const Tensor& ids, DecodeCache& cache, const Tensor& logits_out) override;

 private:
  struct Layer {
    Param attn_norm, wq, wk, wv, wo, ffn_norm, w1, w2, w3;
  };
  // Activations of one layer, kept for its backward.
  struct LayerActs {
    Tensor x, h1, rstd1, q, k, v, att, lse, x2, h2, rstd2, g, u, s;
  };
  void ensure_buffers(int64_t B, int64_t T);
  void run_forward(const TokenBatch& batch);
  void run_backward(const TokenBatch& batch, const Tensor& dlogits);  // after run_forward on the same batch

  ModelConfig cfg_;
  Device device_;
  DType dtype_;
  Param tok_embeddings_, norm_, output_;
  std::vector<Layer> layers_;

  // Buffers, (re)allocated when the batch shape changes.
  int64_t B_ = 0, T_ = 0;
  std::vector<LayerActs> acts_;
  Tensor positions_, x_final_, h_final_, rstd_final_, logits_, losses_;
  Tensor dx_, dx2_, dh_, dtmp_, dq_, dk_, dv_, datt_, dg_, du_, ds_;
};

}  // namespace tessera
