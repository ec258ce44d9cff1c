#include "optim/adamw.h"

#include <algorithm>
#include <cmath>

#include "ops/ops.h"
#include "parallel/communicator.h"

namespace tessera {

AdamW::AdamW(ParamList params, const AdamWConfig& cfg) : params_(std::move(params)), cfg_(cfg) {
  for (Param* p : params_) {
    m_.push_back(Tensor::zeros(p->value.shape(), p->value.dtype(), p->value.device()));
    v_.push_back(Tensor::zeros(p->value.shape(), p->value.dtype(), p->value.device()));
  }
}

void AdamW::step(double lr) {
  ++step_;
  for (size_t i = 0; i < params_.size(); ++i) {
    Param* p = params_[i];
    ops::adamw_update(p->value, p->grad, m_[i], v_[i], lr, cfg_.beta1, cfg_.beta2, cfg_.eps,
                      decays(*p) ? cfg_.weight_decay : 0.0, step_);
  }
}

double LrSchedule::at(int64_t step) const {
  if (step < warmup_steps) return lr * double(step + 1) / double(warmup_steps);
  int64_t decay_start = total_steps - decay_steps;
  if (decay_steps <= 0 || step < decay_start) return lr;
  double progress = std::min(1.0, double(step - decay_start) / double(decay_steps));
  double cosine = 0.5 * (1.0 + std::cos(M_PI * progress));
  return lr * (min_lr_ratio + (1.0 - min_lr_ratio) * cosine);
}

// Sum of squares of a gradient; a stack (3-D) as the sum over its matrices in order: per-matrix sums are what a
// rank holding whole matrices of the stack can compute.
static std::vector<double> matrix_sum_squares(const Tensor& g) {
  if (g.ndim() != 3) return {ops::sum_squares(g)};
  std::vector<double> out;
  for (int64_t e = 0; e < g.size(0); ++e) out.push_back(ops::sum_squares(g.slice(e, 1)));
  return out;
}

double clip_grad_norm(const ParamList& params, double max_norm, Communicator* stage_group,
                      const std::vector<size_t>& chunk_sizes) {
  std::vector<double> per_param;  // each parameter's sum of squares, in order
  for (const Param* p : params) {
    std::vector<double> parts = matrix_sum_squares(p->grad);
    if (p->sharded()) {  // every shard's per-matrix sums (or parts of one), in the logical order
      Communicator* shard_group = p->shard_group;
      Tensor mine = Tensor::empty({int64_t(parts.size())}, DType::f64, Device::cpu);
      Tensor all = Tensor::empty({int64_t(parts.size()) * shard_group->size()}, DType::f64, Device::cpu);
      std::copy(parts.begin(), parts.end(), mine.data<double>());
      shard_group->all_gather(mine, all);
      parts.assign(all.data<double>(), all.data<double>() + all.numel());
    }
    double s = 0;
    for (double x : parts) s += x;
    per_param.push_back(s);
  }
  if (stage_group && stage_group->size() > 1) {  // every stage's sums, stage by stage (the parameter order)
    const std::vector<double> mine_all = std::move(per_param);
    per_param.clear();
    size_t at = 0;
    for (size_t chunk : chunk_sizes.empty() ? std::vector<size_t>{mine_all.size()} : chunk_sizes) {
      Tensor n = Tensor::empty({1}, DType::i64, Device::cpu), counts = Tensor::empty({stage_group->size()}, DType::i64, Device::cpu);
      n.data<int64_t>()[0] = int64_t(chunk);
      stage_group->all_gather(n, counts);
      const int64_t* c = counts.data<int64_t>();
      const int64_t most = *std::max_element(c, c + stage_group->size());
      Tensor mine = Tensor::zeros({most}, DType::f64, Device::cpu), all = Tensor::empty({most * stage_group->size()}, DType::f64, Device::cpu);
      std::copy(mine_all.begin() + at, mine_all.begin() + at + chunk, mine.data<double>());
      at += chunk;
      stage_group->all_gather(mine, all);
      for (int r = 0; r < stage_group->size(); ++r)
        per_param.insert(per_param.end(), all.data<double>() + r * most, all.data<double>() + r * most + c[r]);
    }
  }
  double ss = 0;
  for (double x : per_param) ss += x;
  double norm = std::sqrt(ss);
  double factor = max_norm / (norm + 1e-6);
  if (max_norm > 0 && factor < 1.0)
    for (const Param* p : params) ops::scale(p->grad, factor);
  return norm;
}

}  // namespace tessera
