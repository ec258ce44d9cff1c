// Data parallelism: a step's global batch is grad_accum micro-batches; each rank of a data-parallel group of
// size dp trains on a contiguous share of grad_accum / dp of them, and the gradients are summed over the group
// before the optimizer step, so every rank applies the update of the whole global batch (DESIGN.md §3: the
// single-process result on the same global batch).
//
// Exactness: gradients of the micro-batches [lo, hi) are summed as a pairwise tree, sum(lo, mid) + sum(mid, hi)
// with mid = (lo + hi) / 2, in one process and within each rank, and the MPI communicator sums over ranks in the
// same tree. With dp a power of two, each rank's share is a subtree of the single-process tree, so data
// parallelism reproduces the one-process gradients bitwise (every micro-batch's own forward and backward are the
// same computation wherever they run).
#pragma once
#include <functional>
#include <vector>

#include "core/batch.h"
#include "model/param.h"
#include "parallel/communicator.h"

namespace tessera {

class V4Model;
// The V4 expert loads summed over the group's ranks (before update_routing_bias, so every rank applies the bias
// update of the whole global batch).
void all_reduce_expert_load(V4Model& model, Communicator& group);

// Saved partial sums of a pairwise gradient sum, one set per tree level, reused from step to step.
struct GradientStack {
  std::vector<std::vector<Tensor>> levels;
};

// The pairwise sum over micro-batches [lo, hi) of some gradients, with the leaves arriving one at a time in order:
// begin_leaf(m) zeroes the gradients, the caller accumulates micro-batch m into them, end_leaf folds it into the
// tree (sum(lo, mid) + sum(mid, hi), mid = (lo + hi) / 2). After the last leaf the gradients hold the sum. The
// saved partial sums live in `storage` (reused from step to step). Driven from outside so that an interleaved
// pipeline, whose chunks' backwards interleave, can keep one tree per chunk.
class PairwiseAccumulator {
 public:
  PairwiseAccumulator(std::vector<Tensor> grads, int64_t lo, int64_t hi, GradientStack& storage);
  void begin_leaf(int64_t m);
  void end_leaf();

 private:
  struct Op {
    enum Kind { leaf, save, add } kind;
    int64_t arg;  // leaf: its micro-batch; save/add: the tree depth
  };
  void plan(int64_t lo, int64_t hi, size_t depth);
  std::vector<Tensor> grads_;
  GradientStack& saved_;  // per depth: a left subtree's sum
  std::vector<Op> ops_;
  size_t next_ = 0;
};

// Leaves the pairwise sum of the gradients of micro-batches [lo, hi) in the model's parameter gradients:
// run(m) must run micro-batch m's forward and backward (accumulating into the gradients, which this zeroes
// before each leaf). One micro-batch costs no copy; k micro-batches keep about log2(k) gradient copies.
class Model;
void pairwise_gradients(Model& model, int64_t lo, int64_t hi, GradientStack& stack,
                        const std::function<void(int64_t)>& run);

// Sums the gradients of `params` over a data-parallel group in buckets: consecutive gradients (in parameter
// order) are packed into one flat buffer of at most `bucket_bytes` (a larger gradient gets a bucket of its own),
// so a step makes a few large all-reduces rather than one per parameter. The MPI communicator's sums are in one
// fixed (pairwise) order on every rank, so all ranks hold bitwise-identical gradients afterwards.
class GradientBuckets {
 public:
  GradientBuckets(Communicator& group, const ParamList& params, size_t bucket_bytes = size_t(32) << 20);
  void all_reduce();
  size_t n_buckets() const { return buckets_.size(); }

 private:
  struct Bucket {
    std::vector<Param*> params;
    Tensor flat;
  };
  Communicator& group_;
  std::vector<Bucket> buckets_;
};

}  // namespace tessera
