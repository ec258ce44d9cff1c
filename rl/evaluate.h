// Held-out reward evaluation of RL stages (spec/post-training.md §5): the mean reward of a model on a prompt set,
// under the same chat encoding, stop rule and reward functions as the GRPO stage's rollouts. `tessera eval-rewards`
// prints it; the GRPO stage logs it on its held-out prompts.
#pragma once
#include <cstdint>
#include <vector>

#include "data/chat.h"
#include "data/prompts.h"
#include "data/tokenizer.h"
#include "model/model.h"
#include "rl/rewards.h"

namespace tessera {
class Communicator;
}

namespace tessera::rl {

struct RewardEvalOptions {
  int64_t max_new_tokens = 64;
  double temperature = 0.0;  // 0: greedy
  double top_p = 1.0;
  int64_t top_k = 0;
  int64_t samples_per_prompt = 1;
  uint64_t seed = 0;  // request seeds derive from (seed, prompt index, sample index): eval_request_seed
  ReasoningMode mode = ReasoningMode::non_thinking;
  int64_t max_batch = 64;  // GenerateOptions::max_batch
};

struct RewardEvalResult {
  int64_t responses = 0;
  double reward_mean = 0;            // mean of CompositeReward::score().total
  std::vector<double> term_means;    // per CompositeReward term, unweighted
  double response_length_mean = 0;   // generated tokens, the EOS included when sampled
  double frac_truncated = 0;         // finish == length
};

// Prompts are encoded with data/chat.h encode_prompt(tok, {{"user", question}}, mode), generation stops at the
// tokenizer's EOS, responses are decoded with tok.decode and scored by `reward` (rl/rewards.h) with
// RewardContext{mode}. Every prompt gets samples_per_prompt responses.
// dp: optional data-parallel group; rank r evaluates prompts r, r+dp, ... and the sums are all-reduced, so every
// rank returns the same result, equal (up to the order of floating-point sums) to one process's.
// An empty prompt set, samples_per_prompt < 1 or max_new_tokens < 1 is an error.
RewardEvalResult evaluate_rewards(Model& model, const Tokenizer& tok, const std::vector<Prompt>& prompts,
                                  const CompositeReward& reward, const RewardEvalOptions& opt,
                                  Communicator* dp = nullptr);

// The generation prompt of a prompt-set entry: encode_prompt(tok, {{"user", p.question}}, mode).
std::vector<int32_t> prompt_tokens(const Tokenizer& tok, const Prompt& p, ReasoningMode mode);

// The sampling seed of prompt `prompt_index`'s `sample`-th response: Philox(seed, stream "eval-rewards", ...), so
// it does not depend on the batch, the data-parallel split or the number of prompts.
uint64_t eval_request_seed(uint64_t seed, int64_t prompt_index, int64_t sample);

}  // namespace tessera::rl
