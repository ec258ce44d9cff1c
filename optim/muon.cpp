#include "optim/muon.h"

#include <cmath>
#include <utility>

#include "ops/ops.h"
#include "parallel/shards.h"

namespace tessera {

const char* ns_schedule_name(NsSchedule s) {
  switch (s) {
    case NsSchedule::v4:
      return "v4";
    case NsSchedule::original:
      return "original";
  }
  return "?";
}

std::vector<std::array<double, 3>> ns_coefficients(NsSchedule s) {
  constexpr std::array<double, 3> fast{3.4445, -4.7750, 2.0315}, settle{2.0, -1.5, 0.5};
  switch (s) {
    case NsSchedule::v4: {
      std::vector<std::array<double, 3>> c(8, fast);
      c.insert(c.end(), 2, settle);
      return c;
    }
    case NsSchedule::original:
      return std::vector<std::array<double, 3>>(5, fast);
  }
  TS_FAIL("unknown Newton-Schulz schedule ", int(s));
}

namespace {

// Rounds every element to the nearest bf16 (ties to even) in place, as a bf16 tensor would hold it.
void round_to_bf16(const Tensor& x) {
  TS_CHECK(x.device() == Device::cpu && x.is_contiguous(),
           "bf16 Newton-Schulz iterations need host tensors, got ", device_name(x.device()));
  auto round_all = [&]<class T>(T* p) {
    const int64_t n = x.numel();
    for (int64_t i = 0; i < n; ++i) p[i] = static_cast<T>(from_bf16(to_bf16(static_cast<float>(p[i]))));
  };
  if (x.dtype() == DType::f32)
    round_all(x.data<float>());
  else
    round_all(x.data<double>());
}

}  // namespace

Tensor newton_schulz(const Tensor& x, NsSchedule schedule, bool bf16) {
  TS_CHECK(x.ndim() == 2 || x.ndim() == 3, "newton_schulz: needs a matrix or a stack of matrices, got ",
           x.str());
  TS_CHECK(x.dtype() == DType::f32 || x.dtype() == DType::f64, "newton_schulz: f32 or f64, got ", x.str());
  TS_CHECK(x.is_contiguous(), "newton_schulz: needs a contiguous tensor");
  const int64_t E = x.ndim() == 3 ? x.size(0) : 1, n = x.size(-2), m = x.size(-1);
  const bool tall = n > m;
  const int64_t k = tall ? m : n;  // the Gram matrix is k x k: the smaller side
  Tensor X = Tensor::zeros({E, n, m}, x.dtype(), x.device());
  ops::axpy(1.0, x, X);
  for (int64_t e = 0; e < E; ++e) {
    Tensor xe = X.slice(e, 1);
    ops::scale(xe, 1.0 / (std::sqrt(ops::sum_squares(xe)) + kMuonNormEps));
  }
  if (bf16) round_to_bf16(X);
  Tensor A = Tensor::empty({E, k, k}, x.dtype(), x.device());
  Tensor P = Tensor::empty({E, k, k}, x.dtype(), x.device());
  Tensor Y = Tensor::empty({E, n, m}, x.dtype(), x.device());
  for (const auto& [a, b, c] : ns_coefficients(schedule)) {
    // Wide: A = X X^T, Y = a X + (b A + c A^2) X. Tall: the transpose of that on X^T, i.e. A = X^T X and
    // Y = a X + X (b A + c A^2) (A and so P are symmetric).
    if (tall)
      ops::gemm(X, true, X, false, A);
    else
      ops::gemm(X, false, X, true, A);
    ops::gemm(A, false, A, false, P, c);
    ops::axpy(b, A, P);
    if (tall)
      ops::gemm(X, false, P, false, Y);
    else
      ops::gemm(P, false, X, false, Y);
    ops::axpy(a, X, Y);
    std::swap(X, Y);
    if (bf16) round_to_bf16(X);
  }
  return x.ndim() == 3 ? X : X.reshape({n, m});
}

Muon::Muon(ParamList params, const MuonConfig& cfg) : params_(std::move(params)), cfg_(cfg) {
  for (Param* p : params_) {
    if (p->value.ndim() != 2 && p->value.ndim() != 3)
      TS_FAIL("Muon: parameter ", p->name, " is ", p->value.str(),
              "; Muon takes matrices (n, m) and expert stacks (E, n, m) only");
    if (p->value.dtype() != DType::f32 && p->value.dtype() != DType::f64)
      TS_FAIL("Muon: parameter ", p->name, " is ", p->value.str(), "; Muon keeps f32 or f64 master weights");
    m_.push_back(Tensor::zeros(p->value.shape(), p->value.dtype(), p->value.device()));
  }
}

double Muon::update_scale(const Param& p) const {
  const Shape s = p.logical_shape();
  return cfg_.update_rms * std::sqrt(double(std::max(s[s.size() - 2], s.back())));
}

void Muon::step(double lr) {
  ++step_;
  int64_t split_matrices_done = 0;
  for (size_t i = 0; i < params_.size(); ++i) {
    Param* p = params_[i];
    TS_CHECK(p->grad.defined() && p->grad.shape() == p->value.shape() && p->grad.dtype() == p->value.dtype(),
             "Muon: gradient of ", p->name, " is ", (p->grad.defined() ? p->grad.str() : "undefined"),
             ", the parameter ", p->value.str());
    const Tensor& M = m_[i];
    ops::scale(M, cfg_.momentum);  // M = mu M + G
    ops::axpy(1.0, p->grad, M);
    Tensor U = M;
    if (cfg_.nesterov) {  // U = mu M + G
      U = Tensor::zeros(M.shape(), M.dtype(), M.device());
      ops::axpy(1.0, p->grad, U);
      ops::axpy(cfg_.momentum, M, U);
    }
    Tensor O;
    if (p->splits_matrix()) {
      // A tensor-parallel shard: the whole matrix's update is gathered, orthogonalised by one rank of the shard
      // group (round-robin over the split matrices, so the group shares the work), sent to the others, and each
      // keeps its slice.
      Communicator& group = *p->shard_group;
      const Tensor whole = gather_shard(*p, U);
      const int owner = int(split_matrices_done++ % group.size());
      Tensor orthogonal = group.rank() == owner ? newton_schulz(whole, cfg_.ns_schedule, cfg_.bf16_iterations)
                                                : Tensor::empty(whole.shape(), whole.dtype(), whole.device());
      group.broadcast(orthogonal, owner);
      O = p->slice_of(orthogonal);
    } else {
      O = newton_schulz(U, cfg_.ns_schedule, cfg_.bf16_iterations);
    }
    if (cfg_.weight_decay != 0.0) ops::scale(p->value, 1.0 - lr * cfg_.weight_decay);
    ops::axpy(-lr * update_scale(*p), O, p->value);
  }
}

}  // namespace tessera
