#include "parallel/data_parallel.h"

#include "model/model.h"
#include "model/v4.h"
#include "ops/ops.h"

namespace tessera {

PairwiseAccumulator::PairwiseAccumulator(std::vector<Tensor> grads, int64_t lo, int64_t hi, GradientStack& storage)
    : grads_(std::move(grads)), saved_(storage) {
  TS_CHECK(hi > lo, "pairwise gradient sum: empty range [", lo, ", ", hi, ")");
  plan(lo, hi, 0);
}

// The steps of the recursion: a node sums its left subtree into the gradients, saves it, sums its right subtree
// into the gradients (its first leaf zeroes them) and adds the saved left.
void PairwiseAccumulator::plan(int64_t lo, int64_t hi, size_t depth) {
  if (hi - lo == 1) {
    ops_.push_back({Op::leaf, lo});
    return;
  }
  const int64_t mid = (lo + hi) / 2;
  plan(lo, mid, depth + 1);
  ops_.push_back({Op::save, int64_t(depth)});
  plan(mid, hi, depth + 1);
  ops_.push_back({Op::add, int64_t(depth)});
}

void PairwiseAccumulator::begin_leaf(int64_t m) {
  TS_CHECK(next_ < ops_.size() && ops_[next_].kind == Op::leaf && ops_[next_].arg == m,
           "pairwise gradient sum: micro-batch ", m, " is not the next leaf");
  ++next_;
  for (const Tensor& g : grads_) ops::zero(g);
}

void PairwiseAccumulator::end_leaf() {
  while (next_ < ops_.size() && ops_[next_].kind != Op::leaf) {
    const Op op = ops_[next_++];
    if (saved_.levels.size() <= size_t(op.arg)) saved_.levels.resize(size_t(op.arg) + 1);
    std::vector<Tensor>& left = saved_.levels[size_t(op.arg)];
    if (op.kind == Op::save) {
      if (left.size() != grads_.size()) {
        left.clear();
        for (const Tensor& g : grads_) left.push_back(Tensor::empty(g.shape(), g.dtype(), g.device()));
      }
      for (size_t i = 0; i < grads_.size(); ++i) ops::copy(grads_[i], left[i]);
    } else {
      for (size_t i = 0; i < grads_.size(); ++i) ops::axpy(1.0, left[i], grads_[i]);  // right + left
    }
  }
}

void pairwise_gradients(Model& model, int64_t lo, int64_t hi, GradientStack& stack,
                        const std::function<void(int64_t)>& run) {
  PairwiseAccumulator sum(model.gradient_accumulators(), lo, hi, stack);
  for (int64_t m = lo; m < hi; ++m) {
    sum.begin_leaf(m);
    run(m);
    sum.end_leaf();
  }
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
