// AdamW with decoupled weight decay and bias correction (torch.optim.AdamW's update), the learning-rate
// schedule and global gradient-norm clipping.
#pragma once
#include <vector>

#include "model/param.h"

namespace tessera {

struct AdamWConfig {
  double lr = 1e-3;
  double beta1 = 0.9;
  double beta2 = 0.95;
  double eps = 1e-8;
  double weight_decay = 0.1;  // applied to matrices, the embedding and the head; never to vectors (norms)
};

class AdamW {
 public:
  AdamW(ParamList params, const AdamWConfig& cfg);
  // One update of every parameter with learning rate lr; increments the step count first (it counts from 1).
  void step(double lr);
  int64_t steps_taken() const { return step_; }
  void set_steps_taken(int64_t s) { step_ = s; }
  const AdamWConfig& config() const { return cfg_; }
  const ParamList& params() const { return params_; }
  // Moment tensors, in the order of the parameter list (for checkpoints).
  const std::vector<Tensor>& first_moments() const { return m_; }
  const std::vector<Tensor>& second_moments() const { return v_; }
  static bool decays(const Param& p) { return p.kind != ParamKind::vector; }

 private:
  ParamList params_;
  AdamWConfig cfg_;
  std::vector<Tensor> m_, v_;
  int64_t step_ = 0;
};

// Linear warmup over warmup_steps, constant, then cosine decay to min_lr_ratio * lr over the last decay_steps
// (DeepSeek-V4: warmup, constant, cosine to 10%). decay_steps = 0 means no decay.
struct LrSchedule {
  double lr = 1e-3;
  int64_t warmup_steps = 0;
  int64_t total_steps = 1;
  int64_t decay_steps = 0;
  double min_lr_ratio = 0.1;
  double at(int64_t step) const;  // step counts from 0
};

// Global L2 norm of all gradients (summed in a fixed order; a stack of matrices as the sum over its matrices); if
// max_norm > 0 and the norm exceeds it, scales all gradients by max_norm / norm (as
// torch.nn.utils.clip_grad_norm_, with its 1e-6). Returns the norm before. A sharded parameter's sums are
// gathered over its shard_group (a collective): for expert shards, which hold whole matrices, the norm is bitwise
// what one process computes; a tensor-parallel shard adds its part of the matrix's sum. `stage_group`: the
// pipeline group, whose stages hold consecutive runs of the model's parameters (a collective: the norm over all
// stages, in parameter order). chunk_sizes: with an interleaved pipeline, params is the rank's chunks one after the
// other (these many parameters each), and chunk c of every rank comes before chunk c + 1 of any.
class Communicator;
double clip_grad_norm(const ParamList& params, double max_norm, Communicator* stage_group = nullptr,
                      const std::vector<size_t>& chunk_sizes = {});

}  // namespace tessera
