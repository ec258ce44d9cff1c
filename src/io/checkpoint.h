// Training checkpoints in HDF5 (layout in docs/checkpoint.md): weights under model/<name> with logical shapes,
// optimizer state under optim/<rule>/<moment>/<name>, and the step, seed, data cursor, model config and the
// effective recipe as root attributes. Writes are atomic (H5Writer).
#pragma once
#include <string>
#include <vector>

#include "model/config.h"
#include "model/param.h"
#include "optim/optimizer.h"

namespace tessera {

struct CheckpointMeta {
  int64_t step = 0;                // optimizer steps completed; also the data cursor (the loader is stateless)
  uint64_t seed = 0;               // the run's seed: with step, the whole RNG state (Philox is counter based)
  uint64_t data_fingerprint = 0;   // of the training token stream, to refuse resuming on changed data
  std::string recipe;              // effective recipe (TOML)
  std::string tokenizer = "byte";
  uint64_t tokenizer_hash = 0;     // checked when the tokenizer is loaded again (eval, sample, export, resume)
};

// `params` are every saved tensor: a model's trainable parameters and its buffers (Model::saved_tensors()), whole
// (shards gathered first: parallel/shards.h).
// `opt_state`, if given, is written instead of opt->state() (a sharded optimizer's gather_state()).
void save_checkpoint(const std::string& path, const ModelConfig& cfg, const ParamList& params, const Optimizer* opt,
                     const CheckpointMeta& meta, const std::vector<Optimizer::State>* opt_state = nullptr);

// The model config a checkpoint was saved with.
ModelConfig checkpoint_model_config(const std::string& path);
CheckpointMeta checkpoint_meta(const std::string& path);

// Loads weights (and optimizer state if opt is non-null); a sharded parameter reads its rows of the stored tensor,
// its optimizer state likewise. The checkpoint's model config must equal `cfg`;
// otherwise an error names the file and each differing field.
CheckpointMeta load_checkpoint(const std::string& path, const ModelConfig& cfg, const ParamList& params,
                               Optimizer* opt);

// Checkpoint files of a run directory: RUN/checkpoints/step_XXXXXXXX.h5. latest_checkpoint returns "" if none.
std::string checkpoint_path(const std::string& run_dir, int64_t step);
std::string latest_checkpoint(const std::string& run_dir);
std::vector<std::string> list_checkpoints(const std::string& run_dir);  // oldest first
// A path that is a run directory resolves to its latest checkpoint; a file is returned as is.
std::string resolve_checkpoint(const std::string& path_or_run_dir);

}  // namespace tessera
