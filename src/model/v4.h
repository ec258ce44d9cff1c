// The DeepSeek-V4 model (docs/model.md, ../shared/spec/deepseek-v4.md): mHC residual streams, CSA / HCA /
// window-only attention with a shared-KV head, a learned sink and grouped output, the lightning indexer, MoE with
// routed + shared experts and hash layers, and depth-1 MTP. Explicit forward and backward on src/ops.
#pragma once
#include <optional>
#include <vector>

#include "model/model.h"

namespace tessera {

// Where a row's compressed blocks lie (one layout per compression ratio m): documents are compressed
// separately and trailing tokens short of m are dropped. Host-side integer bookkeeping.
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

class V4Model final : public Model {
 public:
  explicit V4Model(const ModelConfig& cfg, DType dtype = DType::f32);
  ~V4Model() override;

  const ModelConfig& config() const override { return cfg_; }
  ParamList params() override;
  ParamList buffers() override;
  void init(uint64_t seed) override;
  double forward(const TokenBatch& batch, Tensor* logits = nullptr) override;
  double forward_backward(const TokenBatch& batch, double loss_scale) override;

  // Extra outputs of the last forward: MTP logits (B*T, V) and losses, the objective J of docs/model.md.
  struct Stats {
    double main_loss_sum = 0, mtp_loss_sum = 0, balance_loss = 0, indexer_kl_sum = 0, objective = 0;
    int64_t main_targets = 0, mtp_targets = 0;
  };
  const Stats& last_stats() const { return stats_; }
  Tensor last_mtp_logits() const;

  // Tokens routed to each expert, per MoE layer (the MTP block last), accumulated over forward passes since the
  // last call to update_routing_bias / reset_expert_load.
  const std::vector<std::vector<int64_t>>& expert_load() const { return expert_load_; }
  void reset_expert_load();
  // The aux-loss-free balancing rule (spec §7): bias_i += speed * sign(mean load - load_i) for score-routed layers,
  // from the accumulated loads; then resets them.
  void update_routing_bias(double speed);

  struct Impl;

 private:
  double run(const TokenBatch& batch, bool backward, double loss_scale, Tensor* logits);

  ModelConfig cfg_;
  DType dtype_;
  std::unique_ptr<Impl> impl_;
  Stats stats_;
  std::vector<std::vector<int64_t>> expert_load_;
};

}  // namespace tessera
