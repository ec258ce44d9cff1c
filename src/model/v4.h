// The DeepSeek-V4 model (docs/model.md, ../shared/spec/deepseek-v4.md): mHC residual streams, CSA / HCA /
// window-only attention with a shared-KV head, a learned sink and grouped output, the lightning indexer, MoE with
// routed + shared experts and hash layers, and depth-1 MTP. Explicit forward and backward on src/ops.
#pragma once
#include <cstdint>
#include <deque>
#include <map>
#include <optional>
#include <vector>

#include "model/model.h"

namespace tessera {

class Communicator;

// Where a row's compressed blocks lie (one layout per compression ratio m): documents are compressed
// separately and trailing tokens short of m are dropped. Host-side integer bookkeeping: make_block_layout builds
// host tensors (from `doc` on any device); the model copies them to its device once per batch.
struct BlockLayout {
  int64_t m = 0, NB = 0;     // ratio; blocks per row (the maximum over rows, at least 1)
  Tensor block_start;        // (B, NB) i32: first token of each block, -1 = padding
  Tensor prev_start;         // (B, NB) i32: first token of the previous block of the same document, or -1
  Tensor no_prev;            // (B, NB) i32: all -1, for the non-overlapping (HCA) compressor
  Tensor positions;          // (B*NB) i32: RoPE position of each block (its first token; 0 for padding)
  Tensor vis_begin, vis_end; // (B, T) i32: the blocks query t may see are [vis_begin, vis_end)
  int64_t max_visible = 0;   // the largest vis_end - vis_begin
};
BlockLayout make_block_layout(const Tensor& doc, int64_t B, int64_t T, int64_t m);

// The inverse RoPE frequencies of a V4 layer: window-only layers use rope_theta; layers with a compressor use
// compress_rope_theta with YaRN when yarn_factor > 1 (no attention factor on cos/sin, as the official code).
Tensor v4_inv_freq(const ModelConfig& c, bool compressed);

class V4Model final : public Model, public PipelineStageModel {
 public:
  // Parameters, buffers, activations and gradients live on `device`; host batches are copied there by the forward.
  explicit V4Model(const ModelConfig& cfg, DType dtype = DType::f32, Device device = Device::cpu);
  ~V4Model() override;

  const ModelConfig& config() const override { return cfg_; }
  ParamList params() override;
  ParamList buffers() override;
  void init(uint64_t seed) override;
  double forward(const TokenBatch& batch, Tensor* logits = nullptr) override;
  double forward_backward(const TokenBatch& batch, double loss_scale) override;
  double forward_backward_logits(const TokenBatch& batch, const LogitsGrad& loss_grad) override;
  // Expert parallelism over `group` (kept by reference; call before init or loading weights): this rank keeps
  // experts [rank * E / P, (rank + 1) * E / P) of every routed stack (sharded Params, checkpoints hold the whole
  // stacks), and each MoE layer's forward and backward exchange rows with the group by all_to_all_v, so every rank
  // of the group must run the same sequence of forward/backward calls. Each expert computes each source rank's rows
  // apart and keeps a weight gradient per source (gradient_accumulators), which finish_gradients sums in the
  // data-parallel tree: the result of one process (docs/parallelism.md "Expert parallelism").
  void set_expert_parallel(Communicator& group);
  // Tensor parallelism over `group` (kept by reference; host tensors; call before init or loading weights;
  // docs/parallelism.md "Tensor parallelism of the V4 model"): each rank holds n_heads / P query heads (wq_b rows,
  // sinks) with their output groups (wo_a, and wo_b's columns: one all-reduce after attention), index_n_heads / P
  // indexer heads (the scores summed over the group before the top-k), a 1 / P part of the shared expert's hidden
  // units and of the vocabulary (embedding and head rows; vocab-parallel cross-entropy for the main and MTP heads).
  // The hyper-connections, norms, the low-rank query, the shared key/value head, the compressors, the router and the
  // MTP projections are replicated. The routed experts compute the rows of a 1 / P slice of the tokens on each rank,
  // so their gradients are partial sums over tokens, completed over the expert-data-parallel group (dp x tp / ep
  // ranks; with ep = tp the ep exchange itself brings each expert both slices); the MoE's output is one all-reduce,
  // with the shared expert's. Every rank of the group must run the same calls.
  void set_tensor_parallel(Communicator& group);
  Communicator* tensor_parallel() const { return tp_; }
  // Pipeline parallelism (PipelineStageModel; docs/parallelism.md "Pipeline parallelism"): the embedding on the first
  // stage, the head and the MTP module on the last. The stages exchange the n residual streams and, with MTP, the
  // embedding rows of the next tokens (width hc_mult * dim + dim), whose gradient comes back to the embedding. A
  // stage keeps only the input of a micro-batch waiting for its backward and recomputes its forward there when
  // another forward ran in between (deterministic: the same values); the recomputation counts no expert load.
  void set_pipeline_stage(int stage, const std::vector<int64_t>& layers_per_stage) override;
  int pipeline_stage() const override { return stage_; }
  int pipeline_stages() const override { return n_stages_; }
  int64_t first_layer() const override;
  int64_t end_layer() const override;
  int64_t activation_width() const override;
  double stage_forward(int64_t slot, const TokenBatch& batch, const Tensor& input, const Tensor& output,
                       double loss_scale) override;
  void stage_backward(int64_t slot, const TokenBatch& batch, const Tensor& grad_output,
                      const Tensor& grad_input) override;
  Communicator* expert_parallel() const { return ep_; }
  std::vector<Tensor> gradient_accumulators() override;
  void finish_gradients() override;
  // Cached decoding (v4_decode.inc): window, compressed (CSA / HCA) and indexer caches; MTP unused.
  std::unique_ptr<DecodeCache> new_cache(int64_t batch, int64_t capacity) override;
  void decode(const Tensor& ids, DecodeCache& cache, const Tensor& logits_out) override;

  // Extra outputs of the last forward: MTP logits (B*T, V) and losses, the objective J of docs/model.md, and the
  // spike instrumentation, one entry per MoE layer (the MTP block last, hash layers included):
  // swiglu_input_max_abs is max |x| over the SwiGLU inputs (x W1 and x W3, routed and shared experts, before the
  // clamp), router_logit_max the largest router logit h . e_i (before the score function).
  struct Stats {
    double main_loss_sum = 0, mtp_loss_sum = 0, balance_loss = 0, indexer_kl_sum = 0, objective = 0;
    int64_t main_targets = 0, mtp_targets = 0;
    std::vector<double> swiglu_input_max_abs, router_logit_max;
  };
  const Stats& last_stats() const { return stats_; }
  Tensor last_mtp_logits() const;

  // Tokens routed to each expert, per MoE layer (the MTP block last), accumulated over forward passes since the
  // last call to update_routing_bias / reset_expert_load.
  const std::vector<std::vector<int64_t>>& expert_load() const { return expert_load_; }
  void reset_expert_load();
  // Replaces the counts (data parallelism: the loads summed over the ranks, before update_routing_bias).
  void set_expert_load(std::vector<std::vector<int64_t>> load) { expert_load_ = std::move(load); }
  // The aux-loss-free balancing rule (spec §7): bias_i += speed * sign(mean load - load_i) for score-routed layers,
  // from the accumulated loads; then resets them.
  void update_routing_bias(double speed);

  // Anticipatory routing (spec §11, docs/model.md "Anticipatory routing"). The score-routed MoE layers are the
  // main layers from n_hash_layers on, then the MTP block; hash layers are never overridden.
  int64_t n_score_routed_layers() const;
  // The (N, k) i32 expert indices each score-routed layer applied in the last forward, in layer order (host
  // copies, whatever the model's device).
  std::vector<Tensor> routing_indices() const;
  // Use these indices instead of TopK(scores + bias) in every following forward until cleared: one (N, k) i32
  // tensor per score-routed layer (on any device), in the order of routing_indices(), entries in [0, E) or -1 (an
  // empty slot).
  // The gate weights are still the current router scores at these indices (so the router keeps its gradient);
  // the balance loss and the expert loads count the indices applied.
  void set_routing_override(std::vector<Tensor> idx);
  void clear_routing_override();
  bool has_routing_override() const;
  // A no-grad forward on `batch` with the current parameters and balancing bias, ignoring any override; returns
  // its routing_indices(). The expert loads, last_stats() and the override are left as they were; the forward
  // state is replaced (call it after the backward of the step that needed it).
  std::vector<Tensor> routing_lookahead(const TokenBatch& batch);

  struct Impl;

 private:
  // This stage's forward (the whole model without pipeline parallelism): from the embedding or `input`, into
  // `output` or, on the last stage, the head and the losses (returned: the main loss sum). `backward`: keep what
  // run_backward needs. loss_grad replaces the cross-entropy's gradient (forward_backward_logits).
  double run_forward(const TokenBatch& batch, bool backward, double loss_scale, const Tensor& input,
                     const Tensor& output, Tensor* logits, const LogitsGrad* loss_grad);
  // The backward of the last run_forward: from its losses on the last stage, else from grad_output; into the
  // embedding on the first stage, else grad_input.
  void run_backward(const Tensor& grad_output, const Tensor& grad_input);

  // The embedding lookup, its backward and the cross-entropy: vocab-parallel under tensor parallelism.
  void embed(const Tensor& ids, const Tensor& out);
  void embed_backward(const Tensor& ids, const Tensor& dout);
  void cross_entropy(const Tensor& logits, const Tensor& targets, const Tensor& losses, double loss_scale,
                     const Tensor& dlogits);
  void max_over_tp(std::vector<double>& v);

  ModelConfig cfg_;
  DType dtype_;
  Device device_;
  std::unique_ptr<Impl> impl_;
  Stats stats_;
  std::vector<std::vector<int64_t>> expert_load_;
  Communicator* ep_ = nullptr;
  Communicator* tp_ = nullptr;
  int64_t v0_ = 0;  // the first vocabulary row this rank holds (tensor parallelism)
  int stage_ = 0, n_stages_ = 1;
  struct Parked {
    Tensor input;  // the stage's input (undefined on the first stage)
    double loss_scale = 0;
  };
  std::map<int64_t, Parked> parked_;  // micro-batches waiting for their backward, by slot
  int64_t live_slot_ = -1;            // the slot whose forward state the layers hold
};

// The look-ahead cache of anticipatory routing: for a future step, one set of routing indices per micro-batch,
// computed by V4Model::routing_lookahead with the parameters current when precompute ran.
struct RoutingCache {
  // step -> micro-batch -> score-routed layer -> (N, k) i32
  std::map<int64_t, std::vector<std::vector<Tensor>>> entries;

  // Computes and stores the indices of `step`'s micro-batches with the model's current parameters.
  void precompute(V4Model& model, int64_t step, const std::vector<TokenBatch>& micro);
  // Sets the model's override to the cached indices of (step, micro) and returns true; without an entry, clears
  // the override (TopK with the current parameters, the same indices as computing them now) and returns false.
  bool apply(V4Model& model, int64_t step, int64_t micro) const;
  bool has(int64_t step) const { return entries.count(step) > 0; }
  void drop_through(int64_t step);  // forgets the entries of steps <= step
  void clear() { entries.clear(); }
};

// The loss-spike detector of anticipatory routing's on_spike mode: a loss is a spike when the window holds
// `window` earlier losses and loss > median + k * max(MAD, mad_floor), MAD = median(|x - median|) over the window
// (no 1.4826 factor); a non-finite loss is always a spike.
struct LossSpikeDetector {
  int64_t window = 50;
  double k = 6.0, mad_floor = 0.01;
  std::deque<double> history;  // the last `window` losses, oldest first

  struct Check {
    bool spike = false;
    double median = 0, mad = 0, threshold = 0;  // of the window (NaN while it is not full)
  };
  Check check(double loss) const;  // against the current window; does not add `loss`
  void push(double loss);          // adds a finite loss, dropping the oldest beyond `window`
  void clear() { history.clear(); }
};

}  // namespace tessera
