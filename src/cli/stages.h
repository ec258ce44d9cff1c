// `tessera train RECIPE`: the recipe's top-level `stage` key picks the loop ("pretrain" and "sft":
// cli/pretrain.h; "grpo" and "opd": cli/rl_stage.h).
#pragma once
#include <string>

#include "cli/pretrain.h"

namespace tessera {

class Communicator;

// The stage a recipe (or, with --resume, the run directory's recipe.toml) names, after --set overrides.
std::string recipe_stage(const TrainOptions& opts);

// The `stage` key of a loaded recipe ("pretrain" when absent).
std::string recipe_stage_of(Recipe& r);

// Runs that stage. world: the MPI world under mpirun/srun (nullptr: one process).
int run_train(const TrainOptions& opts, Communicator* world = nullptr);

}  // namespace tessera
