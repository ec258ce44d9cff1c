// The interface the trainer and tools use for any architecture (dense Llama layout, DeepSeek-V4).
#pragma once
#include <functional>
#include <memory>
#include <vector>

#include "core/batch.h"
#include "model/config.h"
#include "model/param.h"

namespace tessera {

// A model's KV cache for decoding (model/decode.h); each architecture derives its own.
struct DecodeCache;

class Model {
 public:
  virtual ~Model() = default;
  virtual const ModelConfig& config() const = 0;
  // Trainable parameters, in a fixed order (the checkpoint and optimizer order).
  virtual ParamList params() = 0;
  // State saved with the weights but not trained by an optimizer (V4's balancing bias, hash tables).
  virtual ParamList buffers() { return {}; }
  // What a checkpoint holds: params() then buffers().
  ParamList saved_tensors();
  // Deterministic initialisation from `seed` (each parameter from its own named Philox stream).
  virtual void init(uint64_t seed) = 0;
  // The tensors a backward accumulates parameter gradients into, in params() order: each gradient itself, or
  // (V4 under expert parallelism) a gradient per source rank, which finish_gradients folds into the parameter's.
  // Micro-batch sums (parallel/data_parallel.h) sum these, then call finish_gradients.
  virtual std::vector<Tensor> gradient_accumulators();
  virtual void finish_gradients() {}
  void zero_grad();  // zeroes gradient_accumulators()
  // Sum of the main next-token losses over positions with a target; logits (B*T, V) if requested.
  virtual double forward(const TokenBatch& batch, Tensor* logits = nullptr) = 0;
  // Forward, then backward of loss_scale * (the model's objective summed over the batch's targets);
  // parameter gradients accumulate (+=). Returns the sum of the main next-token losses.
  virtual double forward_backward(const TokenBatch& batch, double loss_scale) = 0;
  // d loss / d logits for a loss the model does not know (GRPO's policy loss): called with the main head's logits
  // (B*T, V) and a tensor of the same shape, dtype and device to ASSIGN the gradient to.
  using LogitsGrad = std::function<void(const Tensor& logits, const Tensor& dlogits)>;
  // Forward, then backward of the caller's loss alone: only the main head's logits carry a gradient (V4's MTP,
  // balance and indexer losses contribute none; the batch's targets only feed the returned loss). Parameter
  // gradients accumulate (+=). Returns the sum of the main next-token losses, as forward does.
  virtual double forward_backward_logits(const TokenBatch& batch, const LogitsGrad& loss_grad) = 0;

  // Decoding (forward only; V4's MTP block is not used). A cache for `batch` rows of at most `capacity` tokens.
  // The defaults fail: the architecture does not support cached decoding.
  virtual std::unique_ptr<DecodeCache> new_cache(int64_t batch, int64_t capacity);
  // Appends new tokens to each row of the cache and gives their logits. ids (B, t) i32 host: row b's new tokens
  // are its leading non-negative entries (-1 pads the rest; a row may have none), at the positions continuing the
  // row's cache (a prompt's prefill, then one token per step). logits_out (B*t, V) f32 host: row b*t + i gets the
  // logits after token i of row b (rows of padding entries are unspecified).
  virtual void decode(const Tensor& ids, DecodeCache& cache, const Tensor& logits_out);
};

// A model that can run as one stage of a pipeline (docs/parallelism.md "Pipeline parallelism"): it holds
// consecutive layers [first_layer(), end_layer()), the embedding on the first stage and the head on the last, and
// runs micro-batches through them for a schedule (parallel/pipeline_parallel.h). Stages exchange (N, width) f32
// tensors per micro-batch of N tokens: the stage's output forward, its gradient back.
class PipelineStageModel {
 public:
  virtual ~PipelineStageModel() = default;
  // Keeps stage `stage`, with layers_per_stage[s] consecutive layers on stage s (each >= 1, summing to n_layers);
  // params() and buffers() list only what the stage holds (call before init or loading weights).
  virtual void set_pipeline_stage(int stage, const std::vector<int64_t>& layers_per_stage) = 0;
  virtual int pipeline_stage() const = 0;
  virtual int pipeline_stages() const = 0;
  virtual int64_t first_layer() const = 0;
  virtual int64_t end_layer() const = 0;
  // Elements per token of the tensors the stages exchange.
  virtual int64_t activation_width() const = 0;
  // One micro-batch through this stage. `input`: the previous stage's output, ignored on the first stage; `output`
  // receives this stage's, except on the last, which computes the head and the loss (returned, 0 elsewhere) and,
  // if loss_scale != 0, what the backward of loss_scale x (the model's objective) needs. `slot` names the
  // micro-batch until stage_backward(slot) (several may be in flight).
  virtual double stage_forward(int64_t slot, const TokenBatch& batch, const Tensor& input, const Tensor& output,
                               double loss_scale) = 0;
  // The backward of micro-batch `slot`: `grad_output` is d loss / d output (ignored on the last stage); grad_input
  // receives d loss / d input (ignored on the first). Parameter gradients accumulate.
  virtual void stage_backward(int64_t slot, const TokenBatch& batch, const Tensor& grad_output,
                              const Tensor& grad_input) = 0;
};

// The model a config describes (arch "dense" or "deepseek_v4"), its tensors on `device`. Host batches are
// copied to the model's device by forward and forward_backward.
std::unique_ptr<Model> make_model(const ModelConfig& cfg, DType dtype = DType::f32, Device device = Device::cpu);

}  // namespace tessera
