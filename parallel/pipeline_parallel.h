// Pipeline parallelism (docs/parallelism.md "Pipeline parallelism"): the layers split into stages over the pp
// group (PipelineStageModel::set_pipeline_stage), micro-batches flowing through them in a 1F1B schedule. Every micro-batch's
// forward and backward are the computations of one process, split at a layer boundary, so a stage's parameter
// gradients are bitwise those of one process when summed in the same micro-batch tree.
#pragma once
#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <vector>

#include "core/batch.h"
#include "model/model.h"
#include "model/param.h"
#include "optim/optimizer.h"
#include "parallel/communicator.h"
#include "parallel/data_parallel.h"

namespace tessera {

class PipelineStageModel;

// Layers per stage for P pipeline stages: consecutive runs of at least one layer each, minimising the costliest
// stage, where cost[l] is layer l's cost with the embedding's added to the first layer and the head's (output
// projection and loss) to the last (what Megatron's pipeline_model_parallel_layout sets by hand), then the sum of
// squared stage costs (the most even of the optimal splits). An error if P exceeds the layers.
std::vector<int64_t> balance_pipeline_stages(const std::vector<double>& cost, int P);

// The 1F1B schedule (PipeDream-flush, as Megatron's non-interleaved schedule) of micro-batches [lo, hi) on this
// stage: min(P - 1 - stage, n) warm-up forwards, then one forward and one backward in turn, then the remaining
// backwards; so at most P - stage micro-batches keep activations at once. Activations go to the next stage, their
// gradients back, paired as send_recv where two stages exchange in both directions (no deadlock).
class OneFOneB {
 public:
  // `micro` outlives the schedule; loss_scale multiplies each micro-batch's loss (the global normalisation).
  // on_forward (if set) is called after each micro-batch's forward on this stage, in micro-batch order (the
  // trainer reads the model's per-forward statistics there).
  OneFOneB(PipelineStageModel& model, Communicator& pp, const std::vector<TokenBatch>& micro, int64_t lo, int64_t hi,
           double loss_scale, std::function<void(int64_t)> on_forward = {});
  // Runs the schedule up to and including the backward of micro-batch m; call with m = lo, lo + 1, ... in order
  // (pairwise_gradients' run: each leaf's gradients are exactly its backward's).
  void run_through_backward(int64_t m);
  // The sum of the losses of the micro-batches run so far: on the last stage; 0 on the others.
  double loss_sum() const { return loss_sum_; }

 private:
  struct Op {
    bool forward;
    int64_t m;
  };
  void forward(int64_t m, bool steady);
  void backward(int64_t m, bool steady, bool last_steady);
  Tensor activation() const;

  PipelineStageModel& model_;
  Communicator& pp_;
  const std::vector<TokenBatch>& micro_;
  double loss_scale_;
  std::function<void(int64_t)> on_forward_;
  int stage_, n_stages_;
  std::vector<Op> ops_;
  size_t next_ = 0;
  int64_t steady_begin_ = 0, steady_end_ = 0;  // ops_ indices of the steady phase
  Tensor input_;   // the next forward's input, when received ahead (1F1B's send_backward_recv_forward)
  Tensor dy_;      // the next backward's output gradient, received with the forward's send
  double loss_sum_ = 0;
};

// A rank's V model chunks of an interleaved pipeline (virtual stages): chunk c is virtual stage c P + rank of
// P V, a model of its own (set_pipeline_stage on it). As one Model: the chunks' parameters in chunk order.
class InterleavedStages final : public Model {
 public:
  explicit InterleavedStages(std::vector<std::unique_ptr<Model>> chunks);
  const ModelConfig& config() const override { return chunks_.front()->config(); }
  ParamList params() override;
  ParamList buffers() override;
  void init(uint64_t seed) override;
  std::vector<Tensor> gradient_accumulators() override;
  void finish_gradients() override;
  double forward(const TokenBatch&, Tensor*) override;
  double forward_backward(const TokenBatch&, double) override;
  double forward_backward_logits(const TokenBatch&, const LogitsGrad&) override;
  Model& chunk(size_t c) { return *chunks_[c]; }
  PipelineStageModel& stage(size_t c) { return dynamic_cast<PipelineStageModel&>(*chunks_[c]); }
  size_t n_chunks() const { return chunks_.size(); }
  // The number of parameters of each chunk, in order (the clipping norm sums them virtual stage by virtual stage).
  std::vector<size_t> chunk_sizes();

 private:
  std::vector<std::unique_ptr<Model>> chunks_;
};

// The interleaved 1F1B schedule (Megatron's interleaved schedule) of micro-batches [lo, hi) over the P ranks of
// `pp`, each holding V chunks: forward k runs chunk (k / P) % V of micro-batch lo + (k / (P V)) P + k % P,
// backward k the chunk V - 1 - (k / P) % V of the same micro-batch; (P - 1 - rank) 2 + (V - 1) P warm-up forwards,
// then one forward and one backward in turn, then the remaining backwards. The pipeline bubble shrinks by V against
// 1F1B for V times the point-to-point traffic. Activations go on from the last rank to the first between chunks.
// Sends are non-blocking (Communicator::isend), so only receives wait. Each chunk's gradients are summed over the
// micro-batches in the single-process pairwise tree (PairwiseAccumulator): bitwise the one-process gradients.
// hi - lo must be a multiple of P.
class InterleavedOneFOneB {
 public:
  InterleavedOneFOneB(InterleavedStages& model, Communicator& pp, const std::vector<TokenBatch>& micro, int64_t lo,
                      int64_t hi, double loss_scale);
  // Runs every forward and backward; leaves each chunk's summed gradients in its parameters.
  void run();
  double loss_sum() const { return loss_sum_; }  // on the rank holding the last virtual stage; 0 elsewhere

 private:
  void forward(int64_t k);
  void backward(int64_t k);
  Tensor activation() const;

  InterleavedStages& model_;
  Communicator& pp_;
  const std::vector<TokenBatch>& micro_;
  int64_t lo_, n_;
  double loss_scale_;
  int rank_, P_, V_;
  std::vector<GradientStack> stacks_;        // per chunk: its tree's saved partial sums
  std::vector<PairwiseAccumulator> trees_;  // per chunk
  double loss_sum_ = 0;
};

// The held-out loss sum of `batch` through an interleaved pipeline: the virtual stages in order, the last one's
// loss given to every rank.
double interleaved_forward_loss(InterleavedStages& model, Communicator& pp, const TokenBatch& batch);

// The held-out loss sum of a forward-only pass of `batch` through the pipeline (every stage calls it): the last
// stage's loss, given to every stage.
double pipeline_forward_loss(PipelineStageModel& model, Communicator& pp, const TokenBatch& batch);

// What a checkpoint needs from every stage, on the pp group's rank 0 (a collective over the group; the other
// ranks get empty lists): the parameters and buffers of every stage (`storage` holds those received), then the
// optimizer state entries.
struct PipelineGathered {
  ParamList params;
  std::vector<Optimizer::State> state;
};
PipelineGathered gather_pipeline_stages(const ParamList& saved, const std::vector<Optimizer::State>& state,
                                        Communicator& pp, std::deque<Param>& storage);

}  // namespace tessera
