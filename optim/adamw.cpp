#include "optim/adamw.h"

#include <cmath>

#include "ops/ops.h"

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

double clip_grad_norm(const ParamList& params, double max_norm) {
  double ss = 0;
  for (const Param* p : params) ss += ops::sum_squares(p->grad);
  double norm = std::sqrt(ss);
  double factor = max_norm / (norm + 1e-6);
  if (max_norm > 0 && factor < 1.0)
    for (const Param* p : params) ops::scale(p->grad, factor);
  return norm;
}

}  // namespace tessera
