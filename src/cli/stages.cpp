#include "cli/stages.h"

#include <filesystem>

#include "cli/rl_stage.h"
#include "core/error.h"

namespace tessera {

std::string recipe_stage(const TrainOptions& opts) {
  std::string path = opts.recipe_path;
  if (path.empty() && !opts.resume_dir.empty()) path = (std::filesystem::path(opts.resume_dir) / "recipe.toml").string();
  if (path.empty()) TS_FAIL("train: give a recipe or --resume RUN_DIR");
  if (!std::filesystem::exists(path)) TS_FAIL(opts.recipe_path.empty() ? "--resume " + opts.resume_dir + ": no recipe.toml in that run directory" : "recipe '" + path + "' does not exist");
  Recipe r = Recipe::load(path, opts.overrides);
  return recipe_stage_of(r);
}

std::string recipe_stage_of(Recipe& r) { return r.get_string("stage", "pretrain", {"pretrain", "sft", "grpo", "opd"}); }

int run_train(const TrainOptions& opts, Communicator* world) {
  const std::string stage = recipe_stage(opts);
  if (stage == "grpo" || stage == "opd") return run_rl_stage(opts, world);
  return run_pretrain(opts, world);
}

}  // namespace tessera
