// The pretraining stage: `tessera train RECIPE` with a [model], [data], [training], [optimizer], [lr_scheduler],
// [eval], [checkpoint] and [metrics] recipe (docs/recipes.md).
#pragma once
#include <string>
#include <vector>

#include "cli/recipe.h"
#include "data/text_corpus.h"
#include "model/config.h"
#include "optim/adamw.h"

namespace tessera {

struct PretrainConfig {
  std::string name;
  std::string run_dir;
  uint64_t seed = 0;
  ModelConfig model;
  TextCorpusConfig data;
  bool document_mask = true;
  int64_t steps = 0, batch_size = 0, seq_len = 0, grad_accum = 1;
  double grad_clip = 1.0;
  AdamWConfig adamw;
  LrSchedule schedule;
  int64_t eval_every = 0, eval_batches = 0;
  int64_t checkpoint_every = 0, checkpoint_keep = 0;
  int64_t log_every = 1;
  double peak_flops = 0;  // 0: measure the GEMM peak at start
  std::string recipe_toml;  // effective recipe, written to the run directory and into checkpoints
};

// Reads and validates every key; unknown keys are errors naming file, line and key.
ModelConfig model_config_from_recipe(Recipe& r, int64_t tokenizer_vocab);
PretrainConfig pretrain_config_from_recipe(Recipe& r);

struct TrainOptions {
  std::string recipe_path;
  std::vector<std::string> overrides;
  std::string resume_dir;  // resume the run in this directory (its recipe.toml, latest checkpoint)
  std::string run_dir;     // overrides job.run_dir
  int64_t stop_after = -1;  // stop (without a final checkpoint) after this many steps: for tests of resume
};

int run_pretrain(const TrainOptions& opts);

// Mean loss per target token over the first max_batches held-out batches (consecutive windows).
class DenseModel;
double evaluate_loss(DenseModel& model, const PackedLoader& loader, int64_t batch_size, int64_t max_batches);

// Measured fp32 GEMM rate of this machine (FLOP/s), the CPU's MFU denominator.
double measure_gemm_peak();

}  // namespace tessera
