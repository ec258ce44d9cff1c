// On-policy distillation losses (spec/post-training.md §3, spec/deepseek-v4.md §13 "OPD"): the student
// samples the responses, a teacher scores them, and the student is trained towards the teacher per token.
// Pure functions on host tensors in the style of rl/grpo.h: f32 and f64 tensors are accepted, everything is
// computed in f64, and every normaliser is a GLOBAL count supplied by the caller, so the parts of a batch
// (micro-batches, data-parallel ranks) add up to the loss and gradient of the whole batch.
//
// Two forms:
//  * full vocabulary (V4's OPD): a divergence between the student's and the teacher's whole next-token
//    distributions at every response position, with its exact gradient with respect to the student logits.
//    Modes: reverse KL(student || teacher) (V4), forward KL(teacher || student), and GKD's generalised JSD.
//    The whole vocabulary is used on purpose: truncating to the student's top-k tokens changes the gradient
//    (it cannot see, and so cannot correct, the mass the student puts outside the top-k set; verl PR 5041).
//  * sampled token (tinker-cookbook, NeMo-RL, prime-rl): a policy gradient with the detached per-token
//    advantage A_t = -(log pi_s(x_t) - log pi_T(x_t)) at the sampled token only. V4 rejected it as
//    high-variance; it needs only the two log-probabilities of the sampled tokens.
//
// Teacher and student must share the vocabulary (the same tokenizer): a different vocabulary size is an
// error.
#pragma once
#include <cstdint>
#include <string>

#include "core/tensor.h"

namespace tessera::rl {

enum class DistillDivergence {
  // KL(p_s || p_t) = sum_v p_s (log p_s - log p_t). V4's OPD (mode-seeking).
  reverse_kl,
  // KL(p_t || p_s) = sum_v p_t (log p_t - log p_s) (mean-covering; supervised KD on the student's samples).
  forward_kl,
  // GKD's generalised JSD as TRL's generalized_jsd_loss computes it: M = (1 - beta) p_s + beta p_t,
  // J = beta KL(p_t || M) + (1 - beta) KL(p_s || M). TRL's special cases are kept: beta == 0 is exactly
  // forward_kl and beta == 1 exactly reverse_kl. NOTE: J itself goes to 0 at both ends (J ~ beta KL(p_t ||
  // p_s)
  // as beta -> 0 and J ~ (1 - beta) KL(p_s || p_t) as beta -> 1), so the special cases are a jump in scale;
  // J / beta and J / (1 - beta) are what approach the forward and reverse KL.
  jsd,
};
// "reverse_kl" | "forward_kl" | "jsd"; tessera::Error listing the known names otherwise.
DistillDivergence parse_distill_divergence(const std::string& name);
const char* distill_divergence_name(DistillDivergence d);

struct DistillConfig {
  DistillDivergence divergence = DistillDivergence::reverse_kl;
  double beta = 0.5;         // jsd only: in [0, 1] (0 = forward KL, 1 = reverse KL, as TRL)
  double temperature = 1.0;  // > 0: both logits are divided by it (as the GRPO stage does with the sampling
                             // temperature); the gradient carries the chain-rule factor 1 / temperature. No
                             // temperature^2 rescaling (TRL does none either).
  void validate() const;     // tessera::Error naming the bad field
};

// Per-token divergence statistics over the weighted rows of one part; parts add with +=. For the
// full-vocabulary form the divergence is the configured mode's (before weights, after the temperature); for
// the sampled-token form it is the sampled log-ratio log pi_s(x_t) - log pi_T(x_t) (the k1 estimate of the
// reverse KL).
struct DistillMetrics {
  double divergence_sum = 0;  // sum over weighted rows of the per-token divergence
  int64_t tokens = 0;         // rows with a non-zero weight
  double divergence_max = 0;  // max over weighted rows (0 when there are none; -inf never appears)
  double divergence_mean() const { return tokens ? divergence_sum / double(tokens) : 0.0; }
  DistillMetrics& operator+=(const DistillMetrics& o);
};

struct DistillLossResult {
  double loss = 0;  // this part's share of the global loss
  DistillMetrics metrics;
};

// The number of rows with a non-zero weight (the usual global normaliser, summed over all parts / ranks).
// weights: any shape of f32/f64, values finite and >= 0.
int64_t count_distill_tokens(const Tensor& weights);

// Full-vocabulary distillation loss on one part of the batch:
//   loss = sum_i w_i D(p_s,i, p_t,i) / normalizer,   p_x,i = softmax(logits_x[i] / temperature)
// student (N, V) and teacher (N, V) logits (f32/f64, host, contiguous; the teacher's dtype may differ);
// weights (N): w_i >= 0, finite, the per-teacher weight times the mask. A row with w_i == 0 is skipped
// entirely (its logits may be garbage, even NaN) and gets a zero gradient. Logits of weighted rows may be
// -inf (a token that cannot occur: padded vocabulary) but not NaN or +inf, and each row needs one finite
// logit. normalizer: the global count of weighted rows (count_distill_tokens over the whole batch); > 0
// whenever this part has a weighted row. dstudent (N, V), student's dtype: ASSIGNED d loss / d student logits
// (the teacher gets no gradient):
//   reverse_kl  p_s (r - KL), r = log p_s - log p_t
//   forward_kl  p_s - p_t
//   jsd         p_s (g - sum_v p_s g), g = (1 - beta) (log p_s - log M)
// each times w_i / (normalizer * temperature). Terms with a zero probability contribute exactly 0 (no NaN
// from 0 * log 0). An infinite divergence is an error naming the row and token: a reverse KL where the
// teacher's logit is -inf at a token the student can emit, or a forward KL where the student's is -inf at a
// token the teacher can emit (the JSD is always finite).
DistillLossResult distill_loss(const Tensor& student_logits, const Tensor& teacher_logits,
                               const Tensor& weights, double normalizer, const DistillConfig& cfg,
                               const Tensor& dstudent);

// Sampled-token form on one part: logp_student, logp_teacher and weights of the same shape (any: (N) or (B,
// T)), log-probabilities of the SAMPLED tokens under each model (at the same temperature; the caller applies
// it).
//   A_t = -(logp_s - logp_t)  (detached),   loss = -sum_t w_t A_t logp_s / normalizer
//   d loss / d logp_s = -w_t A_t / normalizer
// The loss value is the surrogate whose gradient is the policy gradient (its value is not a divergence; the
// metrics carry the per-token log-ratio). Unweighted entries are skipped (may be NaN) and get 0.
struct SampledDistillResult {
  double loss = 0;
  Tensor dlogp;  // logp_student's shape and dtype; turn into d logits with rl::token_logprobs_backward
  DistillMetrics metrics;
};
SampledDistillResult sampled_distill_loss(const Tensor& logp_student, const Tensor& logp_teacher,
                                          const Tensor& weights, double normalizer);

// The per-token advantages A_t = logp_t - logp_s of the sampled-token form (0 where the weight is 0), in
// logp_student's dtype: for logging or for feeding the GRPO policy loss instead.
Tensor sampled_distill_advantages(const Tensor& logp_student, const Tensor& logp_teacher,
                                  const Tensor& weights);

}  // namespace tessera::rl
