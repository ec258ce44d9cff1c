// `tessera pipeline PIPELINE.toml [--dry-run] [--from STAGE]`: runs a sequence (or a DAG) of stages, each a
// training recipe (run in-process by run_train: pretrain, sft, grpo) or a tessera subcommand (data preparation,
// evaluation), skipping the stages whose outputs exist and whose inputs did not change (docs/recipes.md,
// "Pipelines").
//
//   name = "grpo-quickstart"                 # optional; default: the file's stem
//   [[stage]]
//   name = "prompts"
//   command = ["data", "prompts", "--task", "arithmetic", "--n", "1000", "--out", "runs/data/p.jsonl"]
//   outputs = ["runs/data/p.jsonl"]          # what the command writes (checked after it ran)
//   [[stage]]
//   name = "sft"
//   recipe = "recipes/sft/arithmetic.toml"
//   set = ["training.steps=100"]             # --set overrides
//   after = ["prompts"]                      # dependencies; default: the stage before it in the file
//
// Paths (recipes, outputs, stdout, and the arguments of commands) are relative to the directory tessera runs in.
// A stage is up to date when its stamp (runs/pipelines/<name>/<stage>.stamp) records the same configuration
// (a hash of the command line, or of the recipe file with every file it inherits and the --set list), its outputs
// exist (a training stage's: RUN_DIR/checkpoints/step_<training.steps>.h5), and each dependency's stamp is the one
// it ran after. Anything else reruns the stage, and so every stage that depends on it.
#pragma once
#include <string>
#include <vector>

namespace tessera {

class Communicator;

struct PipelineStage {
  std::string name;
  int64_t line = 0;                   // of its [[stage]] header, for messages
  std::string recipe;                 // a training stage ...
  std::vector<std::string> set;
  std::vector<std::string> command;   // ... or a command stage: tessera's arguments
  std::vector<std::string> outputs;   // command stage: files it writes
  std::string stdout_path;            // command stage: its standard output goes here (an output too)
  std::vector<std::string> after;     // dependencies (names)
};

struct Pipeline {
  std::string path, name;
  std::vector<PipelineStage> stages;  // in file order
  std::vector<size_t> order;          // a topological order (file order among ready stages)
};

// Reads and checks a pipeline file: unknown keys, wrong types, duplicate or unknown stage names, stages that are
// both or neither kind, cycles; errors name the file, the line and the key.
Pipeline load_pipeline(const std::string& path);

struct PipelineOptions {
  std::string path;
  bool dry_run = false;   // print what would run and why; run nothing
  std::string from;       // rerun this stage even if it is up to date (and so every stage that depends on it)
  std::string exe = "/proc/self/exe";  // the tessera binary command stages run
};

// Runs the pipeline; throws tessera::Error "stage X failed: <reason>" when a stage fails (the stages finished
// before it keep their outputs and stamps). world: under mpirun, training stages run on every rank; command stages
// on rank 0, followed by a barrier.
int run_pipeline(const PipelineOptions& opts, Communicator* world = nullptr);

}  // namespace tessera
