#include "parallel/data_parallel.h"

#include "model/model.h"
#include "model/v4.h"
#include "ops/ops.h"

namespace tessera {

static void pairwise(Model& model, const std::vector<Tensor>& grads, int64_t lo, int64_t hi, size_t depth,
                     GradientStack& stack, const std::function<void(int64_t)>& run) {
  if (hi - lo == 1) {
    model.zero_grad();
    run(lo);
    return;
  }
  const int64_t mid = (lo + hi) / 2;
  pairwise(model, grads, lo, mid, depth + 1, stack, run);
  std::vector<Tensor>& left = stack.levels.at(depth);
  if (left.size() != grads.size()) {
    left.clear();
    for (const Tensor& g : grads) left.push_back(Tensor::empty(g.shape(), g.dtype(), g.device()));
  }
  for (size_t i = 0; i < grads.size(); ++i) ops::copy(grads[i], left[i]);
  pairwise(model, grads, mid, hi, depth + 1, stack, run);
  // levels was sized up front: `left` still refers to it (a right subtree deeper than the left would otherwise
  // reallocate it under the reference).
  for (size_t i = 0; i < grads.size(); ++i) ops::axpy(1.0, left[i], grads[i]);  // right + left
}

void pairwise_gradients(Model& model, int64_t lo, int64_t hi, GradientStack& stack,
                        const std::function<void(int64_t)>& run) {
  TS_CHECK(hi > lo, "pairwise_gradients: empty range [", lo, ", ", hi, ")");
  if (stack.levels.size() < 64) stack.levels.resize(64);  // deeper than any tree of int64 leaves
  pairwise(model, model.gradient_accumulators(), lo, hi, 0, stack, run);
  model.finish_gradients();
}

GradientBuckets::GradientBuckets(Communicator& group, const ParamList& params, size_t bucket_bytes) : group_(group) {
  Bucket current;
  size_t bytes = 0;
  auto close = [&] {
    if (current.params.empty()) return;
    int64_t n = 0;
    for (Param* p : current.params) n += p->grad.numel();
    current.flat = Tensor::empty({n}, current.params.front()->grad.dtype(), current.params.front()->grad.device());
    buckets_.push_back(std::move(current));
    current = Bucket{};
    bytes = 0;
  };
  for (Param* p : params) {
    TS_CHECK(p->grad.is_contiguous(), "GradientBuckets: gradient of ", p->name, " is not contiguous");
    if (!current.params.empty() &&
        (bytes + p->grad.nbytes() > bucket_bytes || p->grad.dtype() != current.params.front()->grad.dtype()))
      close();
    current.params.push_back(p);
    bytes += p->grad.nbytes();
  }
  close();
}

void GradientBuckets::all_reduce() {
  if (group_.size() == 1) return;
  for (Bucket& b : buckets_) {
    int64_t at = 0;
    for (Param* p : b.params) {
      const int64_t n = p->grad.numel();
      ops::copy(p->grad.reshape({n}), b.flat.slice(at, n));
      at += n;
    }
    group_.all_reduce(b.flat, ReduceOp::sum);
    at = 0;
    for (Param* p : b.params) {
      const int64_t n = p->grad.numel();
      ops::copy(b.flat.slice(at, n), p->grad.reshape({n}));
      at += n;
    }
  }
}

void all_reduce_expert_load(V4Model& model, Communicator& group) {
  std::vector<std::vector<int64_t>> loads = model.expert_load();
  int64_t n = 0;
  for (const auto& l : loads) n += int64_t(l.size());
  Tensor t = Tensor::empty({n}, DType::i64, Device::cpu);
  int64_t at = 0;
  for (const auto& l : loads)
    for (int64_t x : l) t.data<int64_t>()[at++] = x;
  group.all_reduce(t, ReduceOp::sum);
  at = 0;
  for (auto& l : loads)
    for (int64_t& x : l) x = t.data<int64_t>()[at++];
  model.set_expert_load(std::move(loads));
}

}  // namespace tessera
