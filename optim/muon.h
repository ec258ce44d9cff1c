// Muon (DeepSeek-V4 Algorithm 1): Nesterov momentum, Newton-Schulz orthogonalisation of the update, an RMS
// rescaling by update_rms * sqrt(max(n, m)) and decoupled weight decay. Applies to 2-D matrices (n, m) and to
// expert stacks (E, n, m), which are E independent matrices orthogonalised as one batch. A tensor-parallel shard
// (Param::splits_matrix) is orthogonalised as the whole matrix: gathered over its shard group, orthogonalised by one
// rank of the group in turn (round-robin over the step's split matrices) and broadcast; each rank keeps its slice.
#pragma once
#include <array>
#include <vector>

#include "model/param.h"

namespace tessera {

// Newton-Schulz coefficient schedules: each step is X <- a X + (b A + c A^2) X with A = X X^T.
enum class NsSchedule {
  v4,        // DeepSeek-V4: 8 x (3.4445, -4.7750, 2.0315), then 2 x (2, -1.5, 0.5)
  original,  // KellerJordan/Muon: 5 x (3.4445, -4.7750, 2.0315)
};
const char* ns_schedule_name(NsSchedule s);
std::vector<std::array<double, 3>> ns_coefficients(NsSchedule s);

struct MuonConfig {
  double lr = 2.7e-4;         // the step's lr argument is what is applied; this is the recipe's base value
  double momentum = 0.95;     // mu
  bool nesterov = true;       // U = mu M + G (false: U = M)
  double weight_decay = 0.1;  // lambda, decoupled: W <- W (1 - lr lambda)
  NsSchedule ns_schedule = NsSchedule::v4;
  double update_rms = 0.18;  // O = orthogonalised * update_rms * sqrt(max(n, m)); Moonlight uses 0.2
  // Store the Newton-Schulz iterate in bf16 (simulated: rounded after every step).
  bool bf16_iterations = false;
};

// Frobenius norm guard of the normalisation X / (||X||_F + eps), as KellerJordan/Muon.
inline constexpr double kMuonNormEps = 1e-7;

// The orthogonalised form of x: (n, m) or a batch (E, n, m) of independent matrices. Each matrix is divided
// by its Frobenius norm (+ kMuonNormEps), then iterated with `schedule`. Tall matrices (n > m) iterate in the
// wide form: X <- a X + X (b A + c A^2) with A = X^T X (m x m), which is exactly the transpose of iterating
// X^T. With bf16, the iterate is rounded to bf16 on entry and after every step (products stay fp32); host
// only. Returns a new tensor of x's shape and dtype (f32 or f64); x is not modified.
Tensor newton_schulz(const Tensor& x, NsSchedule schedule, bool bf16 = false);

class Muon {
 public:
  // Every parameter must be 2-D or 3-D (a stack of experts); anything else is an error naming it.
  Muon(ParamList params, const MuonConfig& cfg);
  // One update of every parameter with learning rate lr; increments the step count first (it counts from 1).
  void step(double lr);
  int64_t steps_taken() const { return step_; }
  void set_steps_taken(int64_t s) { step_ = s; }
  const MuonConfig& config() const { return cfg_; }
  const ParamList& params() const { return params_; }
  // Momentum buffers M, in the order of the parameter list (for checkpoints).
  const std::vector<Tensor>& momenta() const { return m_; }
  // The factor applied to the orthogonalised update of p: update_rms * sqrt(max(n, m)).
  double update_scale(const Param& p) const;

 private:
  ParamList params_;
  MuonConfig cfg_;
  std::vector<Tensor> m_;
  int64_t step_ = 0;
};

}  // namespace tessera
