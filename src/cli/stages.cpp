#include "cli/stages.h"

#include <filesystem>

#include "cli/rl_stage.h"
#include "cli/run_files.h"
#include "core/error.h"
#include "io/checkpoint.h"

namespace tessera {
namespace fs = std::filesystem;

std::string train_recipe_path(const TrainOptions& opts) {
  if (opts.resume_dir.empty()) {
    if (opts.recipe_path.empty()) TS_FAIL("train: give a recipe or --resume RUN_DIR");
    return opts.recipe_path;
  }
  if (!opts.recipe_path.empty()) TS_FAIL("give either a recipe or --resume RUN_DIR, not both");
  if (!opts.run_dir.empty()) TS_FAIL("--resume continues a run in its own directory; --run-dir cannot be combined with it");
  const std::string path = (fs::path(opts.resume_dir) / "recipe.toml").string();
  if (!fs::exists(path)) TS_FAIL("--resume ", opts.resume_dir, ": no recipe.toml in that run directory");
  return path;
}

std::string checkpoint_to_resume(const std::string& run_dir, bool resuming) {
  const std::string latest = latest_checkpoint(run_dir);
  if (resuming && latest.empty()) TS_FAIL("--resume ", run_dir, ": no checkpoint to resume from in ", run_dir, "/checkpoints");
  if (!resuming && !latest.empty())
    TS_FAIL("run directory '", run_dir, "' already holds checkpoints; continue it with `tessera train --resume ", run_dir,
            "` or choose another job.run_dir");
  return resuming ? latest : std::string();
}

void prepare_run_directory(const std::string& run_dir, bool resumed, int64_t resumed_step,
                           const std::string& recipe_toml) {
  const fs::path metrics = fs::path(run_dir) / "metrics.jsonl";
  if (resumed) {
    truncate_metrics(metrics, resumed_step);
  } else {
    fs::create_directories(run_dir);
    write_atomically(metrics, "");
  }
  write_atomically(fs::path(run_dir) / "recipe.toml", recipe_toml);
}

std::string recipe_stage(const TrainOptions& opts) {
  Recipe r = Recipe::load(train_recipe_path(opts), opts.overrides);
  return recipe_stage_of(r);
}

std::string recipe_stage_of(Recipe& r) { return r.get_string("stage", "pretrain", {"pretrain", "sft", "grpo", "opd"}); }

int run_train(const TrainOptions& opts, Communicator* world) {
  const std::string stage = recipe_stage(opts);
  if (stage == "grpo" || stage == "opd") return run_rl_stage(opts, world);
  return run_pretrain(opts, world);
}

}  // namespace tessera
