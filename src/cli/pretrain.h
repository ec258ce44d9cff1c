// The pretraining stage: `tessera train RECIPE` with a [model], [data], [training], [optimizer], [lr_scheduler],
// [eval], [checkpoint] and [metrics] recipe (docs/recipes.md).
#pragma once
#include <string>
#include <vector>

#include "cli/recipe.h"
#include "data/text_corpus.h"
#include "data/token_dataset.h"
#include "model/config.h"
#include "optim/optimizer.h"
#include "parallel/topology.h"

namespace tessera {

// Anticipatory routing and the loss-spike detector ([routing]; read for model.arch = "deepseek_v4" only;
// docs/recipes.md, docs/model.md "Anticipatory routing").
struct RoutingConfig {
  std::string anticipatory = "off";  // "off", "always" or "on_spike"
  int64_t dt = 1;                    // the routing of step t comes from the parameters of step t - dt
  int64_t ar_steps = 100;            // on_spike: steps of anticipatory routing after a rollback
  int64_t snapshot_every = 10;       // on_spike: in-memory snapshot cadence (steps)
  int64_t spike_window = 50;         // W: losses the detector's median and MAD are taken over
  double spike_k = 6.0;              // spike: loss > median + k * max(MAD, mad_floor)
  double spike_mad_floor = 0.01;     // nats
  int64_t force_spike_at = 0;        // tests: the detector fires at this step (1-based) the first time; 0 = never
};

// What every training stage reads the same way: [job], [tokenizer] and [model].
struct RunKeys {
  std::string name;     // job.name (default: the recipe file's stem)
  std::string run_dir;  // job.run_dir (default: runs/<name>)
  uint64_t seed = 0;    // job.seed
  std::string tokenizer_kind = "byte", tokenizer_model;
  ModelConfig model;
};
RunKeys run_keys_from_recipe(Recipe& r);

struct PretrainConfig : RunKeys {
  std::string stage = "pretrain";  // "pretrain", or "sft": the same loop on a chat dataset from init_checkpoint
  std::string init_checkpoint;     // init.checkpoint: start from these weights (not its optimizer state)
  TextCorpusConfig data;  // text files tokenized at start (data.train) ...
  std::string dataset;    // ... or an HDF5 token dataset made by `tessera data prepare` (data.dataset)
  bool document_mask = true;
  int64_t steps = 0, batch_size = 0, seq_len = 0, grad_accum = 1;
  double grad_clip = 1.0;
  Device device = Device::cpu;           // training.device: where the model, gradients and optimizer state live
  bool bf16_matmuls = false;             // training.matmul_precision = "bf16": tensor-core products (GPU only)
  std::string qat = "off";               // training.qat: "off", "fp8" or "fp4_fp8" (model/qat.h; QAT)
  ParallelConfig parallel;                // [parallel]: dp x tp x pp (+ ep) over the MPI world
  bool zero1 = false;                     // parallel.zero1: shard the optimizer state over the dp ranks
  // parallel.pp_layers: layers per pipeline stage, or per virtual stage with vpp > 1 (empty: balanced by FLOPs,
  // parallel/pipeline_parallel.h).
  std::vector<int64_t> pp_layers;
  int vpp = 1;  // parallel.vpp: virtual pipeline stages per rank (> 1: the interleaved 1F1B schedule)
  RoutingConfig routing;
  OptimizerConfig optimizer;
  LrSchedule schedule;
  int64_t eval_every = 0, eval_batches = 0;
  int64_t checkpoint_every = 0, checkpoint_keep = 0;
  int64_t log_every = 1;
  double peak_flops = 0;  // 0: measure the GEMM peak at start
  std::string recipe_toml;  // effective recipe, written to the run directory and into checkpoints
};

// The tokenizer and the train / held-out token stores of a run.
struct TrainingData {
  std::unique_ptr<Tokenizer> tokenizer;
  TextCorpus corpus;
  TokenDataset dataset;
  uint64_t fingerprint = 0;  // stored in checkpoints: resuming on other data is an error
  const TokenStore* train() const {
    return dataset.train ? static_cast<const TokenStore*>(dataset.train.get()) : &corpus.train;
  }
  const TokenStore* val() const {
    return dataset.val ? static_cast<const TokenStore*>(dataset.val.get()) : &corpus.val;
  }
  static TrainingData load(const PretrainConfig& cfg);
};

// The tokenizer must be the one the checkpoint was trained with (kind and hash).
struct CheckpointMeta;
void check_tokenizer(const Tokenizer& tok, const CheckpointMeta& meta, const std::string& ckpt);

// Reads and validates every key; unknown keys are errors naming file, line and key.
ModelConfig model_config_from_recipe(Recipe& r, int64_t tokenizer_vocab);
PretrainConfig pretrain_config_from_recipe(Recipe& r);
// [optimizer] and [lr_scheduler], shared by the training stages; `steps`: the stage's optimizer steps.
void optimizer_from_recipe(Recipe& r, int64_t steps, OptimizerConfig& optimizer, LrSchedule& schedule);

struct TrainOptions {
  std::string recipe_path;
  std::vector<std::string> overrides;
  std::string resume_dir;  // resume the run in this directory (its recipe.toml, latest checkpoint)
  std::string run_dir;     // overrides job.run_dir
  int64_t stop_after = -1;  // stop (without a final checkpoint) after this many steps: for tests of resume
};

// world: the MPI world when launched by mpirun/srun (nullptr: one process). Only rank 0 writes files and logs.
class Communicator;
int run_pretrain(const TrainOptions& opts, Communicator* world = nullptr);

// Mean loss over the first max_batches held-out batches (consecutive windows), per target token and per byte
// of the text the targets stand for (comparable across tokenizers).
class Model;
struct EvalResult {
  double nats_per_token = 0, nats_per_byte = 0;
};
// Under pipeline parallelism (`pp`: the model is a stage) every stage calls it and gets the pipeline's loss.
class Communicator;
EvalResult evaluate_loss(Model& model, const PackedLoader& loader, const Tokenizer& tok, int64_t batch_size,
                         int64_t max_batches, Communicator* pp = nullptr);

// Measured fp32 GEMM rate of this machine (FLOP/s), the CPU's MFU denominator.
double measure_gemm_peak();

}  // namespace tessera
