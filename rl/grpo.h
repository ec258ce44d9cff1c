// GRPO math (spec/post-training.md §2): group advantages, the clipped policy-gradient loss with KL to a
// reference policy, and its gradient with respect to the new policy's per-token log-probabilities. Pure
// functions on host tensors and vectors; f32 and f64 tensors are accepted, everything is computed in f64.
//
// Layout: a (micro-)batch is B response rows of T token slots. logp, logp_old, logp_ref and mask are (B, T);
// advantages are (B) (outcome supervision: one value per response) or (B, T) (per-token advantages). A row is
// the unit of splitting: a response is never split across micro-batches or data-parallel ranks.
//
// Gradient path for the trainer: policy_loss gives dloss/dlogp (B, T); token_logprobs_backward turns it into
// dloss/dlogits = dlogp * (onehot - softmax) for the model's backward. (ops::cross_entropy with loss_scale s
// gives s * (softmax - onehot), the gradient of -s * logp: the same thing for a constant dlogp = -s, but GRPO
// needs a different scale per row, which cross_entropy has no argument for.)
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "core/tensor.h"

namespace tessera::rl {

// ---------------------------------------------------------------------------------------------------------
// Advantages
// ---------------------------------------------------------------------------------------------------------

enum class AdvantageEstimator {
  // A_i = (r_i - mean(r)) / (std(r) + eps) with the SAMPLE std (Bessel's n - 1), as verl (torch.std, unbiased
  // by default) and TRL do; the population std would scale every advantage by sqrt(G / (G - 1)).
  group_norm,
  // A_i = r_i - mean(r) (Dr. GRPO, arXiv 2503.20783: no std division).
  dr_grpo,
  // A_i = r_i - mean_{j != i} r_j = G / (G - 1) * (r_i - mean(r)) (RLOO leave-one-out baseline).
  rloo,
};
// "group_norm" | "dr_grpo" | "rloo"; tessera::Error listing the known names otherwise.
AdvantageEstimator parse_advantage_estimator(const std::string& name);
const char* advantage_estimator_name(AdvantageEstimator e);

struct Advantages {
  std::vector<double> values;   // one per response, same order as the rewards
  int64_t groups = 0;
  int64_t zero_std_groups = 0;  // groups whose rewards are all exactly equal (every advantage is 0)
  double frac_reward_zero_std() const { return groups ? double(zero_std_groups) / double(groups) : 0.0; }
};

// rewards: group-major, group g is rewards[g * group_size, (g + 1) * group_size). group_size >= 2 (a group of
// one has no baseline; verl's "mean 0, std 1" convention for it is not followed: it is an error). eps > 0 is
// only used by group_norm (verl's default 1e-6). A zero-std group gets exactly 0 from every estimator.
// Rewards must be finite.
Advantages compute_advantages(const std::vector<double>& rewards, int64_t group_size, AdvantageEstimator estimator,
                              double eps = 1e-6);

// ---------------------------------------------------------------------------------------------------------
// Policy loss
// ---------------------------------------------------------------------------------------------------------

// Per-token KL estimators of d = logp - logp_ref (Schulman's k1, k2, k3).
enum class KlEstimator {
  k1,        // d                                        dk/dlogp = 1
  k2,        // d^2 / 2                                  dk/dlogp = d
  k3,        // exp(-d) + d - 1, clamped to [-10, 10]    dk/dlogp = 1 - exp(-d) (0 where the clamp is active)
             // (as verl's low_var_kl, d is clamped to [-20, 20] before exp; no gradient outside that range)
  k3_ratio,  // rho * k3 (DeepSeek-V3.2: importance-weighted so the estimate is unbiased off-policy). rho is
             // DETACHED: it scales k3's gradient, dk/dlogp = rho * (1 - exp(-d)), and gets no gradient itself.
};
// "k1" | "k2" | "k3" | "k3_ratio".
KlEstimator parse_kl_estimator(const std::string& name);
const char* kl_estimator_name(KlEstimator e);

// How per-token losses L_t = l_t + beta * kl_t become one number. Every denominator is a GLOBAL count (LossCounts
// over the whole global batch: all micro-batches of all data-parallel ranks), so the parts of a batch sum to
// the loss of the whole batch whatever the micro-batch size or the data-parallel layout.
enum class LossAggregation {
  token_mean,               // sum_{b,t} m L / tokens                                (DAPO; verl's default)
  seq_mean_token_mean,      // sum_b [sum_t m L / n_b] / seqs, n_b = tokens of row b (original GRPO)
  seq_mean_token_sum_norm,  // sum_{b,t} m L / (seqs * norm_constant)                (Dr. GRPO: a constant
                            //  replaces each response's length; norm_constant is typically the max response
                            //  length. verl divides the plain sum by the constant; we also take the mean over
                            //  sequences so the loss does not grow with the batch size)
};
// "token-mean" | "seq-mean-token-mean" | "seq-mean-token-sum-norm" (verl's spellings).
LossAggregation parse_loss_aggregation(const std::string& name);
const char* loss_aggregation_name(LossAggregation a);

struct PolicyLossConfig {
  double eps_low = 0.2;   // rho is clipped to [1 - eps_low, 1 + eps_high]; eps_low in [0, 1)
  double eps_high = 0.2;  // DAPO clip-higher: 0.28
  // Dual clip for A < 0: l_t = min(l_t, -A * c). 0 = off (our default); verl's value is 3. Must be > 1 if on.
  double dual_clip_c = 0.0;
  double beta = 0.0;  // KL coefficient (0.04 DeepSeekMath, 0.001 R1-Zero, 0 DAPO / Dr. GRPO)
  KlEstimator kl = KlEstimator::k3;
  LossAggregation aggregation = LossAggregation::token_mean;
  double norm_constant = 0.0;  // seq_mean_token_sum_norm only (> 0 there)
  void validate() const;       // tessera::Error naming the bad field
};

// Global counts (computed before micro-batching and data-parallel splitting, summed over all parts: the
// caller all-reduces them across ranks). A row counts as a sequence iff it has at least one unmasked token,
// so a fully masked response (truncated, off-policy masked, padding row) is in no denominator.
struct LossCounts {
  int64_t tokens = 0;
  int64_t seqs = 0;
  LossCounts& operator+=(const LossCounts& o) {
    tokens += o.tokens;
    seqs += o.seqs;
    return *this;
  }
};
LossCounts count_loss_tokens(const Tensor& mask);  // mask (B, T) of 0/1

struct PolicyLossInputs {
  Tensor logp;        // (B, T) new policy log pi(o_t), the quantity differentiated
  Tensor logp_old;    // (B, T) the policy that sampled the batch (pi_old)
  Tensor logp_ref;    // (B, T) frozen reference policy; may be undefined when beta == 0 (then no KL metric)
  Tensor advantages;  // (B) or (B, T)
  Tensor mask;        // (B, T) 1 on response tokens that train, 0 on prompt, padding and masked tokens
};

// Sums over the unmasked tokens of one part; parts add with +=, and the fractions are read from the sum.
struct PolicyLossStats {
  int64_t tokens = 0;
  int64_t clipped_low = 0;   // A < 0 and rho < 1 - eps_low: the lower clip is active (no gradient)
  int64_t clipped_high = 0;  // A > 0 and rho > 1 + eps_high: the upper clip is active (no gradient)
  int64_t dual_clipped = 0;  // A < 0 and the dual-clip cap -A c is active (no gradient)
  double ratio_sum = 0;      // sum of rho
  double kl_sum = 0;         // sum of the configured estimator's kl_t (0 without logp_ref)
  double pg_loss = 0;        // this part's share of the aggregated policy-gradient loss
  double kl_loss = 0;        // this part's share of the aggregated KL (before beta)
  double clip_frac_low() const { return tokens ? double(clipped_low) / double(tokens) : 0.0; }
  double clip_frac_high() const { return tokens ? double(clipped_high) / double(tokens) : 0.0; }
  double clip_frac() const { return tokens ? double(clipped_low + clipped_high) / double(tokens) : 0.0; }
  double dual_clip_frac() const { return tokens ? double(dual_clipped) / double(tokens) : 0.0; }
  double ratio_mean() const { return tokens ? ratio_sum / double(tokens) : 0.0; }
  double kl_mean() const { return tokens ? kl_sum / double(tokens) : 0.0; }
  PolicyLossStats& operator+=(const PolicyLossStats& o);
};

struct PolicyLossResult {
  double loss = 0;  // this part's share of the global loss: pg_loss + beta * kl_loss
  Tensor dlogp;     // (B, T), logp's dtype: d loss / d logp (0 on masked tokens)
  PolicyLossStats stats;
};

// Per unmasked token, with d_t = logp - logp_old and rho = exp(clamp(d_t, -20, 20)) (rho == 1 exactly when
// logp == logp_old):
//   l_t = max(-A rho, -A clip(rho, 1 - eps_low, 1 + eps_high)); for A < 0 with dual clip on, min(l_t, -A c)
//   L_t = l_t + beta * kl_t
// then aggregated with `global` counts as described at LossAggregation. Gradient conventions at ties: a clip
// is active only strictly beyond its bound (at rho == 1 + eps_high the unclipped branch, and its gradient, is
// taken); rho's clamp passes gradient on [-20, 20] inclusive (as torch.clamp). Masked tokens are skipped
// entirely (their inputs may be garbage, even NaN) and a fully masked row contributes nothing. Mask values
// must be exactly 0 or 1; global counts must cover this part (tokens >= its tokens, seqs >= its seqs).
PolicyLossResult policy_loss(const PolicyLossInputs& in, const PolicyLossConfig& cfg, const LossCounts& global);

// ---------------------------------------------------------------------------------------------------------
// Logits <-> per-token log-probabilities (host tensors)
// ---------------------------------------------------------------------------------------------------------

// logp (N) = log_softmax(logits (N, V))[i, targets_i] in logits' dtype; 0 where targets_i < 0 (ignored rows).
Tensor token_logprobs(const Tensor& logits, const Tensor& targets);
// dlogits (N, V) = dlogp_i * (onehot(targets_i) - softmax(logits_i)), ASSIGNED (activation gradient); rows with
// targets_i < 0 get 0. dlogp (N) f32/f64, dlogits logits' shape and dtype.
void token_logprobs_backward(const Tensor& logits, const Tensor& targets, const Tensor& dlogp, const Tensor& dlogits);

// ---------------------------------------------------------------------------------------------------------
// DAPO and DeepSeek-V3.2 options
// ---------------------------------------------------------------------------------------------------------

// DAPO overlong reward shaping: with expected = max_len - buffer, the penalty added to the reward is
// min(-(len - expected) / buffer * factor, 0): 0 up to `expected`, falling linearly to -factor at max_len
// (and further below beyond max_len, which a generator capped at max_len never produces).
// 0 < buffer <= max_len, factor >= 0, len >= 0.
double overlong_penalty(int64_t response_len, int64_t max_len, int64_t buffer, double factor);

// Truncation masking (DAPO): a copy of mask (B, T) with the rows of truncated responses zeroed.
// truncated has B entries (non-zero = truncated).
Tensor mask_truncated(const Tensor& mask, const std::vector<uint8_t>& truncated);

// DeepSeek-V3.2 off-policy sequence masking: row b is dropped (0) iff A_b < 0 and
// mean over its unmasked tokens of (logp_old - logp) > delta, i.e. the response is a negative sample that the
// current policy has drifted far from. Rows with no unmasked token are kept (1). Returns B flags (1 = keep).
// advantages: one per row.
std::vector<uint8_t> offpolicy_sequence_keep(const Tensor& logp, const Tensor& logp_old, const Tensor& mask,
                                             const std::vector<double>& advantages, double delta);
// A copy of mask (B, T) with the rows whose keep flag is 0 zeroed.
Tensor mask_rows(const Tensor& mask, const std::vector<uint8_t>& keep);

}  // namespace tessera::rl
