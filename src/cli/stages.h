// `tessera train RECIPE`: the recipe's top-level `stage` key picks the loop ("pretrain" and "sft":
// cli/pretrain.h; "grpo" and "opd": cli/rl_stage.h).
#pragma once
#include <string>

#include "cli/pretrain.h"

namespace tessera {

class Communicator;

// The stage a recipe (or, with --resume, the run directory's recipe.toml) names, after --set overrides.
std::string recipe_stage(const TrainOptions& opts);

// The recipe a training run reads: opts.recipe_path, or with --resume RUN_DIR that directory's recipe.toml
// (errors for both, for --resume with --run-dir, and for a run directory without recipe.toml).
std::string train_recipe_path(const TrainOptions& opts);

// With resuming: the run directory's latest checkpoint (an error when there is none). Otherwise "", after
// checking that the run directory holds no checkpoints (a new run never mixes with an old one).
std::string checkpoint_to_resume(const std::string& run_dir, bool resuming);

// The run directory's metrics.jsonl and recipe.toml, by the writing rank: a new run creates the directory and
// an empty metrics file; a resumed run keeps the metrics lines up to resumed_step. recipe.toml is (re)written.
void prepare_run_directory(const std::string& run_dir, bool resumed, int64_t resumed_step,
                           const std::string& recipe_toml);

// The `stage` key of a loaded recipe ("pretrain" when absent).
std::string recipe_stage_of(Recipe& r);

// Runs that stage. world: the MPI world under mpirun/srun (nullptr: one process).
int run_train(const TrainOptions& opts, Communicator* world = nullptr);

}  // namespace tessera
