// The dense Llama-layout model with explicit forward and backward:
//   tok_embeddings -> n_layers x [RMSNorm, causal GQA attention with RoPE, residual, RMSNorm, SwiGLU MLP,
//   residual] -> RMSNorm -> untied output head.
#pragma once
#include <map>
#include <memory>
#include <vector>

#include "core/batch.h"
#include "model/model.h"

namespace tessera {

class Communicator;

class DenseModel final : public Model, public PipelineStageModel {
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
  // Pipeline parallelism (PipelineStageModel): the embedding on the first stage, the final norm and the head on the
  // last; activations of several micro-batches are kept by slot. The stages exchange the residual stream (width dim).
  // set_pipeline_stage(stage, n_stages): equal layer counts, [stage * L / n_stages, (stage + 1) * L / n_stages).
  void set_pipeline_stage(int stage, int n_stages);
  void set_pipeline_stage(int stage, const std::vector<int64_t>& layers_per_stage) override;
  int pipeline_stage() const override { return stage_; }
  int pipeline_stages() const override { return n_stages_; }
  int64_t first_layer() const override { return first_layer_; }
  int64_t end_layer() const override { return last_layer_; }
  int64_t activation_width() const override { return cfg_.dim; }
  double stage_forward(int64_t slot, const TokenBatch& batch, const Tensor& input, const Tensor& output,
                       double loss_scale) override;
  void stage_backward(int64_t slot, const TokenBatch& batch, const Tensor& grad_output,
                      const Tensor& grad_input) override;
  // Tensor parallelism over `group` (docs/parallelism.md "Tensor parallelism"): rank r keeps heads, MLP hidden
  // units and vocabulary rows [r X / P, (r + 1) X / P) of each (X = n_heads, n_kv_heads, ffn_dim, vocab_size, all
  // multiples of P = group.size()) as shards of the logical tensors; norm weights are replicated and their
  // gradients equal on every rank. Forward and backward are collectives over the group; host tensors only. Call
  // before init or loading weights (with or without set_pipeline_stage, in either order).
  void set_tensor_parallel(Communicator& group);

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
  // What a backward needs of one micro-batch's forward: the stage's layers, its output (the final residual
  // stream), and on the last stage the head's.
  struct Activations {
    std::vector<LayerActs> layers;
    Tensor x_final, h_final, rstd_final, logits, losses;
  };
  bool first_stage() const { return stage_ == 0; }
  bool last_stage() const { return stage_ == n_stages_ - 1; }
  void ensure_buffers(int64_t B, int64_t T);
  Activations new_activations() const;
  // Layers [first_layer_, last_layer_) from `input` (or the embedding on the first stage), then on the last stage
  // the head into cur_.logits.
  void run_forward(const TokenBatch& batch, const Tensor& input = Tensor());
  // out = residual + in w^T, with `in` and w this rank's part of the inner dimension under tensor parallelism
  // (row-parallel: the partial products summed over the group).
  void add_row_parallel(const Tensor& in, const Tensor& w, const Tensor& residual, const Tensor& out);
  // cur_.losses from cur_.logits and the batch's targets; dlogits (if defined) receives loss_scale x their gradient.
  void cross_entropy(const TokenBatch& batch, double loss_scale, const Tensor& dlogits);
  // After run_forward on the same batch: dlogits on the last stage, else d output; leaves d input in dx_.
  void run_backward(const TokenBatch& batch, const Tensor& dlogits);

  ModelConfig cfg_;
  Device device_;
  DType dtype_;
  Param tok_embeddings_, norm_, output_;
  std::vector<Layer> layers_;

  int stage_ = 0, n_stages_ = 1;
  Communicator* tp_ = nullptr;
  int64_t H_ = 0, KH_ = 0, F_ = 0, V_ = 0;  // this rank's heads, kv heads, MLP hidden units, vocabulary rows
  int64_t v0_ = 0;                          // its first vocabulary row
  int64_t first_layer_ = 0, last_layer_ = 0;  // this stage's layers

  // Buffers, (re)allocated when the batch shape changes. cur_ is the micro-batch being computed; a pipeline parks
  // the activations of micro-batches waiting for their backward (by slot) and reuses freed ones.
  int64_t B_ = 0, T_ = 0;
  Activations cur_;
  std::map<int64_t, Activations> parked_;
  std::vector<Activations> spare_;
  Tensor positions_;
  Tensor dx_, dx2_, dh_, dtmp_, dq_, dk_, dv_, datt_, dg_, du_, ds_;
};

}  // namespace tessera
