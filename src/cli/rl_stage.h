// The on-policy post-training stages: `tessera train RECIPE` with stage = "grpo" or "opd" (docs/post-training.md).
// Both sample grpo.prompts_per_step prompts per step and grpo.group_size responses per prompt with the generation
// engine, score them with rule-based rewards, and take grpo.epochs x grpo.mini_batches optimizer steps on them:
//   grpo  group advantages and the clipped surrogate with an optional KL to a frozen reference (rl/grpo.h);
//   opd   on-policy distillation: each prompt's domain names a teacher checkpoint, whose per-token distribution
//         the student is trained towards (full-vocabulary reverse KL by default; rl/distill.h).
// Rollouts are spread over the data-parallel ranks, prompt by prompt.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "cli/pretrain.h"
#include "data/chat.h"
#include "rl/distill.h"
#include "rl/grpo.h"
#include "rl/rewards.h"

namespace tessera {

// A prompt set with its rewards and reasoning mode (and, for OPD, its teacher). A recipe has one, from [prompts]
// and [rewards], or several: `domains = ["arithmetic", "countdown"]` with a [domain.NAME] table each.
struct RlDomain {
  std::string name = "default";
  std::string train, eval;  // prompt-set JSONL files (eval optional)
  int64_t eval_limit = 64;  // the first N held-out prompts
  ReasoningMode mode = ReasoningMode::non_thinking;
  int64_t max_new_tokens = 0;  // the response budget of this set (think_max: a larger one); 0 = sampling.max_new_tokens
  std::vector<rl::RewardTerm> rewards;
  std::string teacher;  // opd: checkpoint or run directory
  double weight = 1.0;  // opd: the teacher's loss weight
};

struct RlConfig : RunKeys {
  std::string stage = "grpo";  // "grpo" or "opd"
  std::string init_checkpoint;  // init.checkpoint: the policy's (student's) starting weights (required)
  std::string reference;        // init.reference: the frozen KL reference (grpo; default: init.checkpoint)
  std::vector<RlDomain> domains;

  int64_t steps = 0;            // training.steps: rollout steps
  double grad_clip = 1.0;       // training.grad_clip
  std::string qat = "off";      // training.qat: "off", "fp8" or "fp4_fp8" (model/qat.h; rollouts use them too)
  Device device = Device::cpu;  // training.device
  int dp = -1;                  // parallel.dp (-1: every rank)

  // [grpo] (the batch keys apply to opd too)
  int64_t prompts_per_step = 8, group_size = 8;
  int64_t epochs = 1, mini_batches = 1;  // optimizer steps per rollout batch: epochs x mini_batches
  int64_t micro_batch_rows = 8;          // responses per forward/backward
  rl::AdvantageEstimator advantage = rl::AdvantageEstimator::group_norm;
  rl::PolicyLossConfig loss;
  bool dynamic_sampling = false;  // drop groups whose rewards are all equal from the update (DAPO's filter)
  int64_t overlong_buffer = 0;    // DAPO overlong shaping over the last N tokens of max_new_tokens (0: off)
  double overlong_factor = 1.0;
  bool mask_truncated = false;    // truncated responses get no loss (DAPO)
  double offpolicy_delta = 0.0;   // DeepSeek-V3.2 off-policy sequence masking threshold (0: off)

  // [opd]
  rl::DistillConfig distill;  // divergence and beta; its temperature is the sampling temperature
  bool sampled_token = false;  // opd.form = "sampled_token": the per-token advantage form instead of full vocabulary

  // [sampling]
  int64_t max_new_tokens = 64;
  double temperature = 1.0, top_p = 1.0;
  int64_t top_k = 0;

  // [eval]: held-out reward (greedy) every N steps and at the end
  int64_t eval_every = 0;
  int64_t eval_max_new_tokens = 0;  // 0: each prompt set's response budget

  OptimizerConfig optimizer;
  LrSchedule schedule;
  int64_t checkpoint_every = 0, checkpoint_keep = 3, log_every = 1;
  std::string recipe_toml;
};

// Reads and validates every key of a stage = "grpo" or "opd" recipe; unknown keys are errors naming file, line
// and key.
RlConfig rl_config_from_recipe(Recipe& r);

class Communicator;
int run_rl_stage(const TrainOptions& opts, Communicator* world = nullptr);

}  // namespace tessera
