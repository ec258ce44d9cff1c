#include "cli/pretrain.h"

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <deque>
#include <filesystem>
#include <fstream>
#include <optional>
#include <sstream>

#include "backend/backend.h"
#include "cli/model_recipe.h"
#include "cli/run_files.h"
#include "cli/stages.h"
#include "core/log.h"
#include "data/byte_tokenizer.h"
#include "io/checkpoint.h"
#include "model/model.h"
#include "model/qat.h"
#include "model/v4.h"
#include "ops/ops.h"
#include "parallel/data_parallel.h"
#include "model/dense.h"
#include "model/inspect.h"
#include "parallel/pipeline_parallel.h"
#include "parallel/shards.h"

namespace tessera {
namespace fs = std::filesystem;

RunKeys run_keys_from_recipe(Recipe& r) {
  RunKeys k;
  k.name = r.get_string("job.name", fs::path(r.path()).stem().string());
  k.run_dir = r.get_string("job.run_dir", "runs/" + k.name);
  k.seed = static_cast<uint64_t>(r.get_int("job.seed", 0, 0));
  k.tokenizer_kind = r.get_string("tokenizer.kind", "byte", {"byte", "sentencepiece"});
  k.tokenizer_model = r.get_string("tokenizer.model", "");
  if (k.tokenizer_kind == "sentencepiece" && k.tokenizer_model.empty())
    TS_FAIL(r.path(), ": tokenizer.kind = \"sentencepiece\" needs tokenizer.model (a .model file)");
  k.model = model_config_from_recipe(r, load_tokenizer(k.tokenizer_kind, k.tokenizer_model)->vocab_size());
  return k;
}

// [optimizer] and [lr_scheduler] (docs/recipes.md), for a stage of `steps` optimizer steps.
void optimizer_from_recipe(Recipe& r, int64_t steps, OptimizerConfig& o, LrSchedule& s) {
  o.name = r.get_string("optimizer.name", "adamw", {"adamw", "muon"});
  o.adamw.lr = r.require_double("optimizer.lr", 0.0, 10.0);
  o.adamw.beta1 = r.get_double("optimizer.beta1", o.adamw.beta1, 0.0, 1.0);
  o.adamw.beta2 = r.get_double("optimizer.beta2", o.adamw.beta2, 0.0, 1.0);
  o.adamw.eps = r.get_double("optimizer.eps", o.adamw.eps, 0.0, 1.0);
  o.adamw.weight_decay = r.get_double("optimizer.weight_decay", o.adamw.weight_decay, 0.0, 10.0);
  // Muon (optimizer.name = "muon"): V4's Algorithm 1 on the hidden matrices, AdamW above on the rest.
  o.muon.lr = o.adamw.lr;
  o.muon.momentum = r.get_double("optimizer.muon.momentum", o.muon.momentum, 0.0, 1.0);
  o.muon.nesterov = r.get_bool("optimizer.muon.nesterov", o.muon.nesterov);
  o.muon.weight_decay = r.get_double("optimizer.muon.weight_decay", o.adamw.weight_decay, 0.0, 10.0);
  o.muon.ns_schedule = r.get_string("optimizer.muon.ns_schedule", "v4", {"v4", "original"}) == "v4"
                           ? NsSchedule::v4
                           : NsSchedule::original;
  o.muon.update_rms = r.get_double("optimizer.muon.update_rms", o.muon.update_rms, 0.0, 10.0);
  o.muon.bf16_iterations = r.get_bool("optimizer.muon.bf16", o.muon.bf16_iterations);
  o.adamw_params = r.get_string_list("optimizer.adamw_params", {});

  s.lr = o.adamw.lr;
  s.total_steps = steps;
  s.warmup_steps = r.get_int("lr_scheduler.warmup_steps", 0, 0, steps);
  // -1: decay over every step after warmup (kept as -1 in the effective recipe, so extending a run extends it).
  s.decay_steps = r.get_int("lr_scheduler.decay_steps", -1, -1, steps);
  if (s.decay_steps < 0) s.decay_steps = steps - s.warmup_steps;
  s.min_lr_ratio = r.get_double("lr_scheduler.min_lr_ratio", 0.1, 0.0, 1.0);
}

PretrainConfig pretrain_config_from_recipe(Recipe& r) {
  PretrainConfig c;
  // sft: supervised fine-tuning is this loop on a chat dataset (its loss mask keeps the assistant tokens only),
  // starting from a pretrained checkpoint's weights.
  c.stage = r.get_string("stage", "pretrain", {"pretrain", "sft"});
  c.init_checkpoint = r.get_string("init.checkpoint", "");
  if (c.stage == "sft" && c.init_checkpoint.empty())
    TS_FAIL(r.path(), ": stage = \"sft\" needs init.checkpoint (the pretrained run directory or checkpoint file)");
  static_cast<RunKeys&>(c) = run_keys_from_recipe(r);

  c.data.files = r.get_string_list("data.train", {});
  c.dataset = r.get_string("data.dataset", "");
  if (c.data.files.empty() == c.dataset.empty())
    TS_FAIL(r.path(), ": give either data.train (text files) or data.dataset (an HDF5 token dataset)");
  c.data.separator = r.get_string("data.separator", "");
  c.data.val_fraction = r.get_double("data.val_fraction", 0.1, 0.0, 0.9);
  c.data.split_seed = static_cast<uint64_t>(r.get_int("data.split_seed", 0, 0));
  c.document_mask = r.get_bool("data.document_mask", true);

  c.steps = r.require_int("training.steps", 1);
  c.batch_size = r.require_int("training.batch_size", 1);
  c.seq_len = r.require_int("training.seq_len", 1, c.model.max_seq_len);
  c.grad_accum = r.get_int("training.grad_accum", 1, 1);
  c.grad_clip = r.get_double("training.grad_clip", 1.0, 0.0);
  c.device = r.get_string("training.device", "cpu", {"cpu", "cuda"}) == "cuda" ? Device::cuda : Device::cpu;
  c.bf16_matmuls = r.get_string("training.matmul_precision", "fp32", {"fp32", "bf16"}) == "bf16";
  c.qat = r.get_string("training.qat", "off", {"off", "fp8", "fp4_fp8"});  // QAT: model/qat.h
  if (c.device == Device::cuda && !device_available(Device::cuda))
    TS_FAIL(r.path(), ": training.device = \"cuda\" but this build has no CUDA backend or no GPU is present ",
            "(build with the cuda preset: launch/build-cuda.sh)");
  if (c.bf16_matmuls && c.device != Device::cuda)
    TS_FAIL(r.path(), ": training.matmul_precision = \"bf16\" needs training.device = \"cuda\"");
  // [parallel]: degrees of data, tensor, pipeline and expert parallelism; -1 = the remaining ranks. Checked
  // against the world size at start (Topology::make).
  c.parallel.dp = int(r.get_int("parallel.dp", -1, -1, 1 << 20));
  c.parallel.tp = int(r.get_int("parallel.tp", 1, -1, 1 << 20));
  c.parallel.pp = int(r.get_int("parallel.pp", 1, -1, 1 << 20));
  c.parallel.ep = int(r.get_int("parallel.ep", 1, -1, 1 << 20));
  c.zero1 = r.get_bool("parallel.zero1", false);
  c.pp_layers = r.get_int_list("parallel.pp_layers", {}, 1);
  c.vpp = int(r.get_int("parallel.vpp", 1, 1, 64));

  if (c.model.is_v4()) {  // [routing]: anticipatory routing and the loss-spike detector (MoE models only)
    RoutingConfig& a = c.routing;
    a.anticipatory = r.get_string("routing.anticipatory", a.anticipatory, {"off", "always", "on_spike"});
    a.dt = r.get_int("routing.dt", a.dt, 1, 1 << 20);
    a.ar_steps = r.get_int("routing.ar_steps", a.ar_steps, 1);
    a.snapshot_every = r.get_int("routing.snapshot_every", a.snapshot_every, 1);
    a.spike_window = r.get_int("routing.spike_window", a.spike_window, 1);
    a.spike_k = r.get_double("routing.spike_k", a.spike_k, 0.0);
    a.spike_mad_floor = r.get_double("routing.spike_mad_floor", a.spike_mad_floor, 0.0);
    a.force_spike_at = r.get_int("routing.force_spike_at", a.force_spike_at, 0);
    if (a.anticipatory == "on_spike" && a.snapshot_every < a.dt)
      TS_FAIL(r.path(), ": routing.snapshot_every (", a.snapshot_every, ") must be >= routing.dt (", a.dt,
              ") for routing.anticipatory = \"on_spike\": a rollback must reach at least dt steps back");
  }

  optimizer_from_recipe(r, c.steps, c.optimizer, c.schedule);

  c.eval_every = r.get_int("eval.every", 100, 0);
  c.eval_batches = r.get_int("eval.batches", 8, 1);
  c.checkpoint_every = r.get_int("checkpoint.every", 0, 0);
  c.checkpoint_keep = r.get_int("checkpoint.keep", 3, 0);
  c.log_every = r.get_int("metrics.log_every", 10, 1);
  c.peak_flops = r.get_double("metrics.peak_flops", 0.0, 0.0);
  r.check_no_unknown_keys();
  c.recipe_toml = r.effective_toml();
  return c;
}

// Per-layer cost for balancing pipeline stages: a layer's forward FLOPs per token (at half the sequence: the
// average context; V4's layer types averaged), the output head's and V4's MTP module's added to the last layer
// (the embedding is a lookup).
static std::vector<double> layer_costs(const ModelConfig& m, int64_t seq_len) {
  const int64_t context = std::max<int64_t>(seq_len / 2, 1);
  const double head = 2.0 * double(m.dim) * double(m.vocab_size);
  const double main = count_flops(m, context, false).total();
  const double mtp = count_flops(m, context, true).total() - main;
  std::vector<double> cost(size_t(m.n_layers), (main - head) / double(m.n_layers));
  cost.back() += head + mtp;
  return cost;
}

EvalResult evaluate_loss(Model& model, const PackedLoader& loader, const Tokenizer& tok, int64_t batch_size,
                         int64_t max_batches, Communicator* pp) {
  std::vector<int64_t> bytes(tok.vocab_size());
  for (int32_t id = 0; id < tok.vocab_size(); ++id) bytes[id] = tok.token_bytes(id);
  int64_t windows = loader.eval_windows();
  int64_t bs = std::min(batch_size, windows);  // a held-out split smaller than one batch: one short batch
  int64_t batches = std::min(max_batches, windows / bs);
  double total = 0;
  int64_t count = 0, n_bytes = 0;
  for (int64_t i = 0; i < batches; ++i) {
    TokenBatch b = loader.eval_batch(i * bs, bs);
    if (!pp) total += model.forward(b);
    else if (auto* chunks = dynamic_cast<InterleavedStages*>(&model)) total += interleaved_forward_loss(*chunks, *pp, b);
    else total += pipeline_forward_loss(dynamic_cast<PipelineStageModel&>(model), *pp, b);
    count += b.count_targets();
    const int32_t* t = b.targets.data<int32_t>();
    for (int64_t k = 0; k < b.targets.numel(); ++k)
      if (t[k] >= 0) n_bytes += bytes[t[k]];
  }
  return {total / double(count), total / double(std::max<int64_t>(n_bytes, 1))};
}

void check_tokenizer(const Tokenizer& tok, const CheckpointMeta& meta, const std::string& ckpt) {
  if (tok.kind() != meta.tokenizer || tok.hash() != meta.tokenizer_hash)
    TS_FAIL("checkpoint '", ckpt, "' was trained with another tokenizer (", meta.tokenizer, ", hash ",
            meta.tokenizer_hash, ") than the one the recipe loads now (", tok.kind(), ", hash ", tok.hash(), ")");
}

TrainingData TrainingData::load(const PretrainConfig& cfg) {
  TrainingData d;
  d.tokenizer = load_tokenizer(cfg.tokenizer_kind, cfg.tokenizer_model);
  if (!cfg.dataset.empty()) {
    d.dataset = TokenDataset::open(cfg.dataset, d.tokenizer.get());
    // The tokenizer, split sizes and document starts: cheap at any corpus size (tokens are not hashed, so a
    // re-preparation with the same tokenizer and document lengths goes unnoticed).
    uint64_t h = d.tokenizer->hash();
    for (const TokenStore* s : {d.train(), d.val()}) {
      h = (h ^ uint64_t(s->size())) * 1099511628211ull;
      for (int64_t x : s->doc_starts()) h = (h ^ uint64_t(x)) * 1099511628211ull;
    }
    d.fingerprint = h;
  } else {
    d.corpus = TextCorpus::load(cfg.data, *d.tokenizer);
    d.fingerprint = d.corpus.fingerprint;
  }
  if (cfg.stage == "sft" && !d.train()->has_loss_mask())
    TS_FAIL("stage = \"sft\" needs a chat dataset with a loss mask (data.dataset prepared with `tessera data prepare ",
            "--format chat`); ", cfg.dataset.empty() ? "data.train text files have none" : cfg.dataset + " has none");
  if (d.val()->size() < cfg.seq_len + 1)
    TS_FAIL("data: the held-out split has ", d.val()->size(), " tokens, fewer than one sequence of ", cfg.seq_len + 1,
            cfg.dataset.empty() ? "; raise data.val_fraction or use more data"
                                : "; prepare the dataset with a larger --val-fraction");
  return d;
}

double measure_gemm_peak() {
  const int64_t n = 768;
  Tensor a = Tensor::zeros({n, n}, DType::f32), b = Tensor::zeros({n, n}, DType::f32), c = Tensor::zeros({n, n}, DType::f32);
  ops::fill(a, 0.5), ops::fill(b, 0.25);
  ops::gemm(a, false, b, false, c);  // warm up threads and caches
  double best = 1e30;
  for (int rep = 0; rep < 5; ++rep) {
    double t0 = now_seconds();
    ops::gemm(a, false, b, false, c);
    best = std::min(best, now_seconds() - t0);
  }
  return 2.0 * n * n * n / best;
}

namespace {




// ------------------------------------------------------------------------ anticipatory routing state on disk
// Beside each checkpoint step_N.h5 of a V4 run with routing.anticipatory != "off", step_N.routing holds what the
// checkpoint lacks to continue exactly: the look-ahead cache (indices computed before the last updates, with
// parameters the checkpoint no longer has), the on_spike state and the detector's window. Text header lines,
// then per cached tensor a line "tensor N k" followed by N*k raw little-endian i32 and a newline.
struct RoutingState {
  int64_t step = 0, dt = 0, ar_until = 0, last_rollback_to = -1;
  uint64_t params_hash = 0;  // of the checkpoint's parameters and buffers: pairs the file with its checkpoint
  std::string mode;
  bool forced_fired = false;
  std::vector<double> window;
  RoutingCache cache;
};

// FNV-1a over the bytes of every value: identifies the state a routing state file was written with (a rollback
// can write a checkpoint of the same step again, and a kill may land between the two files).
// `, "comm_bytes": N, "comm": {"all_reduce": [calls, bytes], ...}` for the collectives between two readings of a
// communicator's counters (kinds with no call left out).
std::string comm_metrics(const CommStats& before, const CommStats& after) {
  std::string kinds;
  auto add = [&](const char* name, const CommCounter& a, const CommCounter& b) {
    if (b.calls == a.calls) return;
    kinds += cat(kinds.empty() ? "" : ", ", "\"", name, "\": [", b.calls - a.calls, ", ", b.bytes - a.bytes, "]");
  };
  add("all_reduce", before.all_reduce, after.all_reduce);
  add("reduce_scatter", before.reduce_scatter, after.reduce_scatter);
  add("all_gather", before.all_gather, after.all_gather);
  add("all_to_all", before.all_to_all, after.all_to_all);
  add("send", before.send, after.send);
  add("recv", before.recv, after.recv);
  add("broadcast", before.broadcast, after.broadcast);
  add("barrier", before.barrier, after.barrier);
  return cat(", \"comm_bytes\": ", after.total_bytes() - before.total_bytes(), ", \"comm\": {", kinds, "}");
}

uint64_t hash_values(const ParamList& ps) {
  uint64_t h = 1469598103934665603ull;
  for (const Param* p : ps) {
    const Tensor host = p->value.device() == Device::cpu ? p->value : p->value.to_device(Device::cpu);
    const unsigned char* b = static_cast<const unsigned char*>(host.raw());
    for (size_t i = 0; i < host.nbytes(); ++i) h = (h ^ b[i]) * 1099511628211ull;
  }
  return h;
}

fs::path routing_state_path(const std::string& checkpoint) {
  fs::path p(checkpoint);
  p.replace_extension(".routing");
  return p;
}

void save_routing_state(const fs::path& path, const RoutingState& st) {
  std::ostringstream out;
  out << "tessera-routing-state 1\nstep " << st.step << "\nparams_hash " << st.params_hash << "\nmode " << st.mode << "\ndt " << st.dt << "\nar_until "
      << st.ar_until << "\nlast_rollback_to " << st.last_rollback_to << "\nforced_fired " << int(st.forced_fired)
      << "\nwindow " << st.window.size();
  for (double x : st.window) {
    char buf[40];
    std::snprintf(buf, sizeof buf, " %a", x);  // hexadecimal: exact
    out << buf;
  }
  out << "\nentries " << st.cache.entries.size() << "\n";
  for (const auto& [step, micro] : st.cache.entries) {
    out << "entry " << step << " " << micro.size() << " " << (micro.empty() ? 0 : micro[0].size()) << "\n";
    for (const auto& layers : micro)
      for (const Tensor& t : layers) {
        out << "tensor " << t.size(0) << " " << t.size(1) << "\n";
        out.write(reinterpret_cast<const char*>(t.data<int32_t>()), std::streamsize(t.numel() * sizeof(int32_t)));
        out << "\n";
      }
  }
  write_atomically(path, out.str());
}

// False when the file does not exist; a malformed file is an error naming it.
bool load_routing_state(const fs::path& path, RoutingState& st) {
  if (!fs::exists(path)) return false;
  std::ifstream in(path, std::ios::binary);
  auto bad = [&](const std::string& what) -> void { TS_FAIL("'", path.string(), "': malformed routing state (", what, ")"); };
  auto word = [&](const char* w) {
    std::string got;
    if (!(in >> got) || got != w) bad(cat("expected '", w, "'"));
  };
  auto integer = [&](const char* w) {
    word(w);
    long long v = 0;
    if (!(in >> v)) bad(cat("no value after '", w, "'"));
    return int64_t(v);
  };
  word("tessera-routing-state");
  word("1");
  st.step = integer("step");
  word("params_hash");
  if (!(in >> st.params_hash)) bad("params_hash");
  word("mode");
  in >> st.mode;
  st.dt = integer("dt");
  st.ar_until = integer("ar_until");
  st.last_rollback_to = integer("last_rollback_to");
  st.forced_fired = integer("forced_fired") != 0;
  const int64_t nw = integer("window");
  for (int64_t i = 0; i < nw; ++i) {
    std::string x;
    in >> x;
    char* end = nullptr;
    st.window.push_back(std::strtod(x.c_str(), &end));
    if (x.empty() || *end) bad("window value");
  }
  const int64_t ne = integer("entries");
  for (int64_t e = 0; e < ne; ++e) {
    const int64_t step = integer("entry");
    long long n_micro = 0, n_layers = 0;
    if (!(in >> n_micro >> n_layers) || n_micro < 0 || n_layers < 0) bad("entry sizes");
    auto& micro = st.cache.entries[step];
    micro.resize(size_t(n_micro));
    for (auto& layers : micro)
      for (long long l = 0; l < n_layers; ++l) {
        const int64_t N = integer("tensor");
        long long k = 0;
        if (!(in >> k) || N < 0 || k < 0 || in.get() != '\n') bad("tensor shape");
        Tensor t = Tensor::empty({N, int64_t(k)}, DType::i32);
        if (!in.read(reinterpret_cast<char*>(t.data<int32_t>()), std::streamsize(t.numel() * sizeof(int32_t))))
          bad("truncated tensor");
        layers.push_back(t);
      }
  }
  return true;
}

std::string join_paths(const std::vector<std::string>& files) {
  std::string out;
  for (const std::string& f : files) out += (out.empty() ? "" : ", ") + f;
  return out;
}



// Resuming must continue the same data stream: the settings that decide which windows a step trains on have to
// match the checkpoint's run. The rows of a step depend on the global batch only (batch_size x grad_accum, and
// the DP size once there is one), so re-splitting the same global batch is an exact re-shard and allowed.
void check_same_data_stream(const PretrainConfig& now, const CheckpointMeta& meta, const std::string& ckpt) {
  Recipe saved_recipe = Recipe::parse(meta.recipe, ckpt + ":recipe");
  PretrainConfig was = pretrain_config_from_recipe(saved_recipe);
  std::string diff;
  auto compare = [&](const char* key, auto a, auto b) {
    if (a != b) diff += cat("; ", key, " was ", a, ", now ", b);
  };
  compare("job.seed", was.seed, now.seed);
  compare("the global batch (training.batch_size x training.grad_accum)", was.batch_size * was.grad_accum,
          now.batch_size * now.grad_accum);
  compare("training.seq_len", was.seq_len, now.seq_len);
  compare("data.separator", was.data.separator, now.data.separator);
  compare("data.val_fraction", was.data.val_fraction, now.data.val_fraction);
  compare("data.split_seed", was.data.split_seed, now.data.split_seed);
  compare("data.document_mask", was.document_mask, now.document_mask);
  compare("tokenizer.kind", was.tokenizer_kind, now.tokenizer_kind);
  if (!diff.empty())
    TS_FAIL("cannot resume from '", ckpt, "' with a different data stream", diff,
            " (start a new run to change these)");
}

}  // namespace

int run_pretrain(const TrainOptions& opts, Communicator* world) {
  const bool resuming = !opts.resume_dir.empty();
  Recipe recipe = Recipe::load(train_recipe_path(opts), opts.overrides);
  PretrainConfig cfg = pretrain_config_from_recipe(recipe);
  if (resuming) cfg.run_dir = opts.resume_dir;
  if (!opts.run_dir.empty()) cfg.run_dir = opts.run_dir;

  // Parallel layout: validated against the world size, and the combinations not built yet refused.
  const int world_size = world ? world->size() : 1;
  const Topology topo = Topology::make(cfg.parallel, world_size);
  if (topo.tp() > 1) {
    auto refuse = [&](const std::string& key, const std::string& why) {
      TS_FAIL(recipe.path(), ": parallel.tp = ", topo.tp(), " does not work with ", key, " yet (", why, ")");
    };
    if (cfg.device != Device::cpu) refuse("training.device = cuda", "the MPI communicator moves host tensors");
    if (cfg.qat != "off") refuse("training.qat", "the 128 x 128 quantisation blocks would cut across the shards");
  }
  if (topo.pp() > 1) {
    auto refuse = [&](const std::string& key, const std::string& why) {
      TS_FAIL(recipe.path(), ": parallel.pp = ", topo.pp(), " does not work with ", key, " yet (", why, ")");
    };
    if (cfg.model.is_v4() && cfg.routing.anticipatory != "off")
      refuse("routing.anticipatory = \"" + cfg.routing.anticipatory + "\"",
             "the look-ahead routing pass is not pipelined");
    if (cfg.device != Device::cpu) refuse("training.device = cuda", "the MPI communicator moves host tensors");
    if (cfg.model.n_layers < topo.pp())
      TS_FAIL(recipe.path(), ": parallel.pp (", topo.pp(), ") must not exceed model.n_layers (", cfg.model.n_layers,
              "): each stage holds at least one layer");
    if (cfg.vpp > 1 && cfg.model.is_v4())
      TS_FAIL(recipe.path(), ": parallel.vpp = ", cfg.vpp, " does not work with model.arch = \"deepseek_v4\" yet (the ",
              "trainer keeps V4's statistics and routing for one model, not per chunk)");
    if (cfg.model.n_layers < topo.pp() * cfg.vpp)
      TS_FAIL(recipe.path(), ": parallel.pp x parallel.vpp (", topo.pp(), " x ", cfg.vpp,
              ") must not exceed model.n_layers (", cfg.model.n_layers, "): each virtual stage holds at least one layer");
    if (!cfg.pp_layers.empty()) {
      int64_t total = 0;
      for (int64_t n : cfg.pp_layers) total += n;
      if (int64_t(cfg.pp_layers.size()) != topo.pp() * cfg.vpp || total != cfg.model.n_layers)
        TS_FAIL(recipe.path(), ": parallel.pp_layers has ", cfg.pp_layers.size(), " stage(s) of ", total,
                " layers in all; it needs ", cfg.vpp > 1 ? "parallel.pp x parallel.vpp" : "parallel.pp", " (",
                topo.pp() * cfg.vpp, ") entries summing to model.n_layers (", cfg.model.n_layers, ")");
    }
  } else if (!cfg.pp_layers.empty() || cfg.vpp > 1) {
    TS_FAIL(recipe.path(), ": parallel.", cfg.vpp > 1 ? "vpp" : "pp_layers", " is set but parallel.pp = 1");
  }
  if (topo.ep() > 1) {
    auto refuse = [&](const std::string& key, const std::string& why) {
      TS_FAIL(recipe.path(), ": parallel.ep = ", topo.ep(), " does not work with ", key, " yet (", why, ")");
    };
    if (!cfg.model.is_v4()) refuse("model.arch = \"" + cfg.model.arch + "\"", "it has no routed experts");
    if (cfg.device != Device::cpu) refuse("training.device = cuda", "the MPI communicator moves host tensors");
    if (cfg.model.n_routed_experts % topo.ep() != 0)
      TS_FAIL(recipe.path(), ": model.n_routed_experts (", cfg.model.n_routed_experts,
              ") must be a multiple of parallel.ep (", topo.ep(), "): each ep rank holds whole experts");
  }
  std::unique_ptr<ProcessGroups> groups;
  Communicator* dp = nullptr;  // the data-parallel group, when there is more than one rank
  Communicator* ep = nullptr;  // the expert-parallel group, when parallel.ep > 1
  Communicator* pp = nullptr;  // the pipeline group, when parallel.pp > 1
  Communicator* tp = nullptr;  // the tensor-parallel group, when parallel.tp > 1
  if (world && world_size > 1) {
    groups = std::make_unique<ProcessGroups>(ProcessGroups::build(topo, *world));
    dp = groups->dp.get();
    if (topo.ep() > 1) ep = groups->ep.get();
    if (topo.pp() > 1) pp = groups->pp.get();
    if (topo.tp() > 1) tp = groups->tp.get();
    if (cfg.grad_accum % dp->size() != 0)
      TS_FAIL(recipe.path(), ": training.grad_accum (", cfg.grad_accum, ") must be a multiple of parallel.dp (",
              dp->size(), "): each data-parallel rank trains on grad_accum / dp of the step's micro-batches");
    if (cfg.vpp > 1 && (cfg.grad_accum / dp->size()) % topo.pp() != 0)
      TS_FAIL(recipe.path(), ": training.grad_accum / parallel.dp (", cfg.grad_accum / dp->size(),
              " micro-batches per pipeline) must be a multiple of parallel.pp (", topo.pp(),
              ") for the interleaved schedule (parallel.vpp = ", cfg.vpp, ")");
  }
  const bool writer = !world || world->rank() == 0;  // only rank 0 writes the run directory

  const std::string resume_from = checkpoint_to_resume(cfg.run_dir, resuming);

  TrainingData data = TrainingData::load(cfg);
  PackedLoader train_loader(data.train(), cfg.seq_len, cfg.seed, cfg.document_mask);
  PackedLoader val_loader(data.val(), cfg.seq_len, cfg.seed, cfg.document_mask);

  // The model: the whole of it, one pipeline stage, or with parallel.vpp > 1 this rank's chunks of an interleaved
  // pipeline (virtual stages c pp + rank, c < vpp).
  std::unique_ptr<Model> model_ptr;
  InterleavedStages* interleaved = nullptr;
  const int virtual_stages = pp ? pp->size() * cfg.vpp : 1;
  const std::vector<int64_t> stage_layers =
      !pp                      ? std::vector<int64_t>{}
      : cfg.pp_layers.empty() ? balance_pipeline_stages(layer_costs(cfg.model, cfg.seq_len), virtual_stages)
                              : cfg.pp_layers;
  if (pp && cfg.vpp > 1) {
    std::vector<std::unique_ptr<Model>> chunks;
    std::string held;
    for (int c = 0; c < cfg.vpp; ++c) {
      std::unique_ptr<Model> chunk = make_model(cfg.model, DType::f32, cfg.device);
      auto& stage = dynamic_cast<PipelineStageModel&>(*chunk);
      stage.set_pipeline_stage(c * pp->size() + pp->rank(), stage_layers);
      held += cat(c ? " " : "", "[", stage.first_layer(), ", ", stage.end_layer(), ")");
      chunks.push_back(std::move(chunk));
    }
    auto stages = std::make_unique<InterleavedStages>(std::move(chunks));
    interleaved = stages.get();
    model_ptr = std::move(stages);
    log_info(cat("pipeline over ", pp->size(), " stages x ", cfg.vpp, " virtual stages, interleaved 1F1B",
                 cfg.pp_layers.empty() ? " (balanced by FLOPs)" : "", ": rank ", pp->rank(), " holds layers ", held,
                 pp->rank() == 0 ? " and the embedding" : "", pp->rank() == pp->size() - 1 ? " and the head" : ""));
  } else {
    model_ptr = make_model(cfg.model, DType::f32, cfg.device);
  }
  backend_for(cfg.device).set_matmul_precision(cfg.bf16_matmuls ? MatmulPrecision::bf16 : MatmulPrecision::fp32);
  Model& model = *model_ptr;
  V4Model* v4 = dynamic_cast<V4Model*>(&model);
  if (ep) {
    v4->set_expert_parallel(*ep);
    log_info(cat("expert parallel over ", ep->size(), " ranks: this rank holds ", cfg.model.n_routed_experts / ep->size(),
                 " of the ", cfg.model.n_routed_experts, " routed experts of each MoE layer"));
  }
  PipelineStageModel* stage_model = pp && !interleaved ? dynamic_cast<PipelineStageModel*>(&model) : nullptr;
  if (stage_model) {
    stage_model->set_pipeline_stage(pp->rank(), stage_layers);
    log_info(cat("pipeline over ", pp->size(), " stages, 1F1B", cfg.pp_layers.empty() ? " (balanced by FLOPs)" : "",
                 ": stage ", pp->rank(), " holds layers [", stage_model->first_layer(), ", ",
                 stage_model->end_layer(), ")", pp->rank() == 0 ? " and the embedding" : "",
                 pp->rank() == pp->size() - 1 ? " and the head" : ""));
  }
  if (tp) {
    try {
      if (v4) v4->set_tensor_parallel(*tp);
      else if (!interleaved) dynamic_cast<DenseModel&>(model).set_tensor_parallel(*tp);
      for (size_t c = 0; interleaved && c < interleaved->n_chunks(); ++c)
        dynamic_cast<DenseModel&>(interleaved->chunk(c)).set_tensor_parallel(*tp);
    } catch (const Error& e) {
      TS_FAIL(recipe.path(), ": ", e.what());
    }
    const int64_t P = tp->size();
    const ModelConfig& mc = cfg.model;
    const std::string indexer =
        mc.has_csa_layers() ? cat(mc.index_n_heads / P, " of the ", mc.index_n_heads, " indexer heads, ") : "";
    log_info(v4 ? cat("tensor parallel over ", P, " ranks: this rank holds ", mc.n_heads / P, " of the ", mc.n_heads,
                      " attention heads, ", indexer,
                      mc.n_shared_experts * mc.moe_inter_dim / P, " of the ", mc.n_shared_experts * mc.moe_inter_dim,
                      " shared-expert hidden units and ", mc.vocab_size / P, " of the ", mc.vocab_size,
                      " vocabulary rows; its routed experts compute 1/", P, " of the tokens")
                : cat("tensor parallel over ", P, " ranks: this rank holds ", mc.n_heads / P, " of the ", mc.n_heads,
                      " attention heads, ", mc.ffn_dim / P, " of the ", mc.ffn_dim, " MLP hidden units and ",
                      mc.vocab_size / P, " of the ", mc.vocab_size, " vocabulary rows"));
  }
  // Under expert or tensor parallelism the routed experts' gradients are summed over the expert-data-parallel
  // group (dp x tp / ep ranks holding the same experts, each having computed other tokens for them), the rest over
  // the data-parallel group.
  Communicator* edp = v4 && (ep || tp) ? groups->edp.get() : nullptr;
  ParamList params = model.params(), saved = model.saved_tensors();
  model.init(cfg.seed);
  if (!cfg.init_checkpoint.empty() && !resuming) {
    // Weights (and buffers) from another run; its optimizer state is not carried over (a new stage).
    const std::string from = resolve_checkpoint(cfg.init_checkpoint);
    CheckpointMeta init_meta = load_checkpoint(from, cfg.model, saved, nullptr);
    check_tokenizer(*data.tokenizer, init_meta, from);
    log_info(cat("initial weights from ", from, " (step ", init_meta.step, ")"));
  }
  // ZeRO-1: the state of replicated parameters sharded over the data-parallel group, that of expert shards over
  // the ranks holding the same experts.
  Optimizer opt(params, cfg.optimizer, cfg.zero1 ? dp : nullptr, cfg.zero1 ? edp : nullptr);
  const qat::Mode qat_mode = qat::parse_mode(cfg.qat);  // QAT (training.qat)
  if (qat_mode != qat::Mode::off) {
    const qat::FakeQuantWeights probe(params, qat_mode);
    const qat::Stats& qs = probe.stats();
    log_info(cat("quantisation-aware training (training.qat = \"", cfg.qat, "\"): ", qs.fp4_tensors,
                 " routed-expert weights in FP4 (1x32 blocks, requantised to FP8 128x128), ", qs.fp8_tensors,
                 " matrices in FP8 (128x128 blocks); fp32 master weights, straight-through gradients"));
  }
  log_info(cat("optimizer groups (", cfg.optimizer.name, "):\n", opt.describe_groups()));
  if (opt.sharded())
    log_info(cat("optimizer state sharded (parallel.zero1) over the ", dp->size(), " data-parallel ranks",
                 edp ? cat(", the routed experts' over the ", edp->size(), " expert-data-parallel ranks") : "",
                 ": rank 0 holds ", opt.state_elements(), " elements"));
  int64_t start_step = 0;
  fs::path metrics_path = fs::path(cfg.run_dir) / "metrics.jsonl";
  if (!resume_from.empty()) {
    CheckpointMeta meta = load_checkpoint(resume_from, cfg.model, saved, &opt);
    check_same_data_stream(cfg, meta, resume_from);
    check_tokenizer(*data.tokenizer, meta, resume_from);
    if (meta.data_fingerprint != data.fingerprint)
      TS_FAIL("checkpoint '", resume_from, "' was trained on different data than data.train / data.dataset (",
              cfg.dataset.empty() ? join_paths(cfg.data.files) : cfg.dataset, ") now holds (the token stream's fingerprint differs); resuming would not ",
              "continue the same run");
    start_step = meta.step;
    log_info(cat("resuming from ", resume_from, " at step ", start_step));
  }
  if (writer) prepare_run_directory(cfg.run_dir, !resume_from.empty(), start_step, cfg.recipe_toml);
  if (dp)
    log_info(cat("data parallel over ", dp->size(), " ranks (", topo.str(), "): ", cfg.grad_accum / dp->size(),
                 " micro-batch(es) of ", cfg.batch_size, " rows per rank and step, gradients summed in buckets"));
  // Gradients summed over the data-parallel group (tensor-parallel shards too: a rank's shard is the same part on
  // every data-parallel rank); with `edp` the routed experts' over the ranks holding the same experts (the
  // expert-data-parallel group), their sum over the ep group done by the model.
  ParamList dense_params, expert_params;
  for (Param* p : params) (edp && p->routed_expert ? expert_params : dense_params).push_back(p);
  std::unique_ptr<GradientBuckets> grad_buckets =
      dp ? std::make_unique<GradientBuckets>(*dp, dense_params) : nullptr;
  // This rank's collectives over all its groups, for the metrics.
  auto comm_stats = [&] {
    CommStats s = dp ? dp->stats() : CommStats{};
    if (ep) s += ep->stats();
    if (edp && edp->size() > 1) s += edp->stats();
    if (pp) s += pp->stats();
    if (tp) s += tp->stats();
    return s;
  };
  std::unique_ptr<GradientBuckets> expert_buckets =
      edp && edp->size() > 1 ? std::make_unique<GradientBuckets>(*edp, expert_params) : nullptr;
  GradientStack grad_stack;

  // On a GPU the reference is the H100/H200 dense bf16 peak (989 TFLOP/s); on the CPU the measured fp32 GEMM rate.
  const double peak = cfg.peak_flops > 0                ? cfg.peak_flops
                      : cfg.device == Device::cuda ? 989e12
                                                        : measure_gemm_peak();
  const int64_t tokens_per_step = cfg.batch_size * cfg.grad_accum * cfg.seq_len;
  const double flops_per_token = cfg.model.train_flops_per_token(cfg.seq_len);
  log_info(cat("model: ", count_elements(params), " parameters", pp ? " on this pipeline stage" : "", "; ", cfg.steps,
               " steps of ", tokens_per_step, " tokens; MFU against ", peak / 1e9, " GFLOP/s (",
               cfg.peak_flops > 0                ? "metrics.peak_flops"
               : cfg.device == Device::cuda ? "H100/H200 dense bf16 peak"
                                                 : "measured fp32 GEMM",
               ")"));

  // Anticipatory routing (V4 only; docs/model.md "Anticipatory routing"): the look-ahead cache, the on_spike
  // state, the loss-spike detector (it runs, and flags spikes in metrics.jsonl, in every mode) and the snapshots.
  const RoutingConfig& rc = cfg.routing;
  const bool ar_always = v4 && rc.anticipatory == "always", on_spike = v4 && rc.anticipatory == "on_spike";
  RoutingCache cache;
  LossSpikeDetector detector;
  detector.window = rc.spike_window, detector.k = rc.spike_k, detector.mad_floor = rc.spike_mad_floor;
  int64_t ar_until = 0;           // on_spike: anticipatory routing for the 0-based steps < ar_until
  int64_t last_rollback_to = -1;  // a snapshot serves at most one rollback, and later ones go to newer snapshots
  bool forced_fired = false;      // routing.force_spike_at fires once
  auto ar_active = [&](int64_t s) { return ar_always || (on_spike && s < ar_until); };
  struct Snapshot {
    int64_t step = 0;             // steps completed when it was taken
    std::vector<Tensor> tensors;  // the values of `saved`: parameters and buffers (the balancing bias)
    Optimizer::Snapshot opt;
  };
  std::deque<Snapshot> snapshots;  // on_spike: the newest two, oldest first
  // The hash of the saved tensors as a checkpoint holds them (shards gathered: a collective over their groups).
  auto saved_hash = [&](const ParamList& tensors) {
    std::deque<Param> whole;
    return hash_values(gather_shards(tensors, whole));
  };
  if (v4 && rc.anticipatory != "off" && !resume_from.empty()) {
    const uint64_t params_hash = saved_hash(saved);
    RoutingState st;
    const fs::path sp = routing_state_path(resume_from);
    if (!load_routing_state(sp, st)) {
      log_info(cat("anticipatory routing: no ", sp.string(), "; the first ", rc.dt,
                   " step(s) route with the current parameters"));
    } else if (st.step != start_step || st.mode != rc.anticipatory || st.dt != rc.dt ||
               st.params_hash != params_hash) {
      log_info(cat("anticipatory routing: ", sp.string(), " (step ", st.step, ", anticipatory = ", st.mode, ", dt = ",
                   st.dt, st.params_hash != params_hash ? ", written with other parameters" : "",
                   ") does not match this run (step ", start_step, ", anticipatory = ", rc.anticipatory, ", dt = ",
                   rc.dt, "), ignored; the first ", rc.dt, " step(s) route with the current parameters"));
    } else {
      bool same_split = true;  // the global batch may be re-split on resume: then the cache does not fit
      for (const auto& [s, micro] : st.cache.entries) {
        same_split &= int64_t(micro.size()) == cfg.grad_accum;
        for (const auto& layers : micro) {
          same_split &= int64_t(layers.size()) == v4->n_score_routed_layers();
          for (const Tensor& t : layers) same_split &= t.size(0) == cfg.batch_size * cfg.seq_len;
        }
      }
      if (same_split) cache = std::move(st.cache);
      ar_until = st.ar_until, last_rollback_to = st.last_rollback_to, forced_fired = st.forced_fired;
      for (double x : st.window) detector.push(x);
      log_info(cat("anticipatory routing: state restored from ", sp.string(), " (", cache.entries.size(),
                   " cached step(s)", same_split ? "" : "; the cache was for another micro-batch split, dropped",
                   ")"));
    }
  }

  std::ofstream metrics;
  if (writer) metrics.open(metrics_path, std::ios::app);
  const double t_start = now_seconds();
  double window_compute = 0;  // training-step time since the last progress line (evals and checkpoints excluded)
  int64_t window_steps = 0;
  bool ar_was = false;
  for (int64_t step = start_step; step < cfg.steps; ++step) {
    if (opts.stop_after >= 0 && step >= start_step + opts.stop_after) break;
    const double t_step = now_seconds();
    const CommStats comm_before = comm_stats();  // this step's collectives, for comm_bytes
    const double lr = cfg.schedule.at(step);
    if (on_spike && (snapshots.empty() || (step % rc.snapshot_every == 0 && snapshots.back().step != step))) {
      Snapshot snap{step, {}, opt.snapshot()};
      for (Param* p : saved) snap.tensors.push_back(p->value.clone());
      snapshots.push_back(std::move(snap));
      if (snapshots.size() > 2) snapshots.pop_front();
    }
    const bool ar = ar_active(step), cached = ar && cache.has(step);
    if (v4 && ar != ar_was)
      log_info(ar ? cat("anticipatory routing on from step ", step + 1, " (dt = ", rc.dt, ")")
                  : cat("anticipatory routing off from step ", step + 1, " (back to TopK(scores + bias))"));
    ar_was = ar;
    std::vector<TokenBatch> micro;
    int64_t n_targets = 0;
    for (int64_t m = 0; m < cfg.grad_accum; ++m) {
      micro.push_back(train_loader.train_batch(step, m, cfg.grad_accum, cfg.batch_size));
      n_targets += micro.back().count_targets();
    }
    double loss_sum = 0, mtp_sum = 0, balance = 0;
    int64_t mtp_targets = 0;
    std::vector<double> swiglu_max, logit_max;  // per MoE layer, max over the micro-batches
    // This rank's micro-batches: all of them, or its contiguous share under data parallelism. Their gradients are
    // summed pairwise (parallel/data_parallel.h), which the group's all-reduce continues over the ranks.
    const int64_t per_rank = cfg.grad_accum / (dp ? dp->size() : 1), first = (dp ? dp->rank() : 0) * per_rank;
    bool first_stats = true;
    // QAT (training.qat): the micro-batches' forward/backward at the quantised weights; the masters are back
    // (bitwise) when the scope ends, before clipping and the optimizer step (straight-through estimator).
    std::optional<qat::FakeQuantWeights> qat_scope;
    if (qat_mode != qat::Mode::off) qat_scope.emplace(params, qat_mode);
    // Pipeline parallelism: the 1F1B schedule of this rank's micro-batches; each leaf of the gradient tree runs it
    // through that micro-batch's backward.
    std::optional<OneFOneB> schedule;
    // V4's statistics of each micro-batch's forward (under pipeline parallelism this stage's part of them).
    auto add_v4_stats = [&] {
      const V4Model::Stats& st = v4->last_stats();
      mtp_sum += st.mtp_loss_sum;
      mtp_targets += st.mtp_targets;
      balance += st.balance_loss / double(micro.size());
      if (first_stats) swiglu_max = st.swiglu_input_max_abs, logit_max = st.router_logit_max;
      first_stats = false;
      for (size_t l = 0; l < swiglu_max.size(); ++l) {
        swiglu_max[l] = std::max(swiglu_max[l], st.swiglu_input_max_abs[l]);
        logit_max[l] = std::max(logit_max[l], st.router_logit_max[l]);
      }
    };
    if (stage_model) schedule.emplace(*stage_model, *pp, micro, first, first + per_rank, 1.0 / double(n_targets),
                             [&](int64_t) {
                               if (v4) add_v4_stats();
                             });
    // The interleaved schedule sums each chunk's gradients in the pairwise tree itself.
    std::optional<InterleavedOneFOneB> interleaved_schedule;
    if (interleaved) {
      interleaved_schedule.emplace(*interleaved, *pp, micro, first, first + per_rank, 1.0 / double(n_targets));
      interleaved_schedule->run();
    } else {
      pairwise_gradients(model, first, first + per_rank, grad_stack, [&](int64_t mi) {
        if (schedule) {
          schedule->run_through_backward(mi);
          return;
        }
        if (v4) {
          if (cached) cache.apply(*v4, step, mi);  // indices from the parameters of step - dt
          else v4->clear_routing_override();
        }
        // n_targets counts every micro-batch of the global batch: exact normalisation on every rank.
        loss_sum += model.forward_backward(micro[mi], 1.0 / double(n_targets));
        if (v4) add_v4_stats();
      });
    }
    qat_scope.reset();  // QAT: master weights back
    if (pp) {
      // The losses are the last stage's: every stage gets their sum (the others add zeros: exact). V4: the MTP's
      // sums likewise, the balance loss summed over the stages' layers, the per-layer maxima and the expert loads
      // (each stage's layers, zeros elsewhere) combined.
      Tensor t = Tensor::empty({4}, DType::f64, Device::cpu);
      double* sums = t.data<double>();
      sums[0] = schedule ? schedule->loss_sum() : interleaved_schedule->loss_sum();
      sums[1] = mtp_sum, sums[2] = double(mtp_targets), sums[3] = balance;
      pp->all_reduce(t, ReduceOp::sum);
      loss_sum = sums[0], mtp_sum = sums[1], mtp_targets = int64_t(sums[2]), balance = sums[3];
      if (v4) {
        for (std::vector<double>* v : {&swiglu_max, &logit_max}) {
          Tensor m = Tensor::empty({int64_t(v->size())}, DType::f64, Device::cpu);
          std::copy(v->begin(), v->end(), m.data<double>());
          pp->all_reduce(m, ReduceOp::max);
          std::copy(m.data<double>(), m.data<double>() + v->size(), v->begin());
        }
        all_reduce_expert_load(*v4, *pp);
      }
    }
    if (v4) v4->clear_routing_override();
    if (dp) {
      // The global step: gradients, loss sums, V4 statistics and expert loads over the data-parallel group.
      grad_buckets->all_reduce();
      if (expert_buckets) expert_buckets->all_reduce();
      Tensor sums = Tensor::empty({4}, DType::f64, Device::cpu);
      double* sp = sums.data<double>();
      sp[0] = loss_sum, sp[1] = mtp_sum, sp[2] = double(mtp_targets), sp[3] = balance;
      dp->all_reduce(sums, ReduceOp::sum);
      loss_sum = sp[0], mtp_sum = sp[1], mtp_targets = int64_t(sp[2]);
      balance = sp[3];  // each rank added balance / grad_accum for its micro-batches
      if (v4) {
        auto max_over_ranks = [&](std::vector<double>& v) {
          if (v.empty()) return;
          Tensor t = Tensor::empty({int64_t(v.size())}, DType::f64, Device::cpu);
          std::copy(v.begin(), v.end(), t.data<double>());
          dp->all_reduce(t, ReduceOp::max);
          std::copy(t.data<double>(), t.data<double>() + v.size(), v.begin());
        };
        max_over_ranks(swiglu_max);
        max_over_ranks(logit_max);
        all_reduce_expert_load(*v4, *dp);  // the bias update sees the loads of the whole global batch
      }
    }
    const double loss = loss_sum / double(n_targets);

    // The spike detector, against the losses of the previous steps.
    LossSpikeDetector::Check sc;
    if (v4) sc = detector.check(loss);
    const bool forced = v4 && !forced_fired && rc.force_spike_at == step + 1;
    forced_fired |= forced;
    const bool spike = sc.spike || forced;
    // on_spike: the newest snapshot at least dt steps old (so that the spiking step is replayed with looked-ahead
    // indices) that no earlier rollback used.
    const Snapshot* back_to = nullptr;
    if (on_spike && spike)
      for (auto it = snapshots.rbegin(); it != snapshots.rend() && !back_to; ++it)
        if (it->step <= step - rc.dt && it->step > last_rollback_to) back_to = &*it;
    if (!std::isfinite(loss) && !back_to)
      TS_FAIL("training loss is ", loss, " at step ", step + 1, "; the last checkpoint in ", cfg.run_dir,
              " is intact (lower optimizer.lr or training.grad_clip?)");
    const double grad_norm =
        clip_grad_norm(params, cfg.grad_clip, pp, interleaved ? interleaved->chunk_sizes() : std::vector<size_t>{});
    std::string moe_metrics, routing_metrics;
    if (v4) {
      // Expert load of this step (max over mean per MoE layer) and the spike instrumentation.
      moe_metrics = cat(", \"mtp_loss\": ", json_number(mtp_targets ? mtp_sum / double(mtp_targets) : NAN),
                        ", \"balance_loss\": ", json_number(balance), ", \"expert_load_max_over_mean\": [");
      const auto& loads = v4->expert_load();
      for (size_t l = 0; l < loads.size(); ++l) {
        double total = 0, top = 0;
        for (int64_t x : loads[l]) total += double(x), top = std::max(top, double(x));
        moe_metrics += cat(l ? ", " : "", json_number(total > 0 ? top * double(loads[l].size()) / total : NAN));
      }
      auto list = [](const std::vector<double>& v) {
        std::string out = "[";
        for (size_t i = 0; i < v.size(); ++i) out += cat(i ? ", " : "", json_number(v[i]));
        return out + "]";
      };
      moe_metrics += cat("], \"swiglu_input_max_abs\": ", list(swiglu_max), ", \"router_logit_max\": ", list(logit_max));
      routing_metrics = cat(", \"spike\": ", spike ? "true" : "false", ", \"anticipatory_routing\": ",
                            ar ? "true" : "false");
      if (ar) routing_metrics += cat(", \"routing_lag\": ", cached ? rc.dt : 0);
    }
    auto write_metrics = [&](int64_t done, double step_time, const std::string& extra) {
      const double tokens_per_s = double(tokens_per_step) / step_time;
      metrics << "{\"step\": " << done << ", \"loss\": " << json_number(loss) << ", \"lr\": " << json_number(lr)
              << ", \"grad_norm\": " << json_number(grad_norm) << ", \"tokens\": " << done * tokens_per_step
              << ", \"tokens_per_s\": " << json_number(tokens_per_s)
              << ", \"mfu\": " << json_number(tokens_per_s * flops_per_token / peak)
              << ", \"elapsed_s\": " << json_number(now_seconds() - t_start)
              << (dp ? comm_metrics(comm_before, comm_stats()) : std::string()) << moe_metrics
              << routing_metrics << extra
              << "}\n"
              << std::flush;
    };
    if (spike) {
      std::string why = forced ? std::string("routing.force_spike_at")
                        : !std::isfinite(loss)
                            ? std::string("a non-finite loss")
                            : cat("> ", sc.threshold, " = median ", sc.median, " + ", rc.spike_k, " x max(MAD ", sc.mad,
                                  ", ", rc.spike_mad_floor, ") of the last ", rc.spike_window, " steps");
      if (back_to) {
        // Roll back: the update of this step is not applied; training continues at step S + 1 on the same batches
        // (the loader is stateless), with anticipatory routing through the spiking step and ar_steps from S.
        const int64_t S = back_to->step;
        const double step_time = now_seconds() - t_step;
        window_compute += step_time;
        ++window_steps;
        write_metrics(step + 1, step_time, cat(", \"rollback_to\": ", S));
        ar_until = std::max(S + rc.ar_steps, step + 1);
        log_warn(cat("loss spike at step ", step + 1, ": loss ", loss, " (", why, "); rolling back to step ", S, " (",
                     step + 1 - S, " step(s) lost), anticipatory routing (dt = ", rc.dt, ") for steps ", S + 1, "-",
                     ar_until));
        for (size_t i = 0; i < saved.size(); ++i) saved[i]->value.copy_from(back_to->tensors[i]);
        opt.restore(back_to->opt);
        v4->reset_expert_load();
        cache.clear();
        detector.clear();
        last_rollback_to = S;
        while (snapshots.back().step > S) snapshots.pop_back();  // taken on the abandoned steps
        step = S - 1;
        continue;
      }
      if (on_spike) {
        ar_until = std::max(ar_until, step + 1 + rc.ar_steps);
        log_warn(cat("loss spike at step ", step + 1, ": loss ", loss, " (", why, "); no snapshot at least ", rc.dt,
                     " step(s) old that no rollback used yet, so no rollback; anticipatory routing (dt = ", rc.dt,
                     ") for steps ", step + 2, "-", ar_until));
      } else {
        log_warn(cat("loss spike at step ", step + 1, ": loss ", loss, " (", why, "); routing.anticipatory = \"",
                     rc.anticipatory, "\": flagged only"));
      }
    }
    if (v4) detector.push(loss);
    // Look-ahead (anticipatory routing): the indices of step + dt from the parameters of this step, i.e. after its
    // backward and before its update. Computed past the last step too, so that an extended run continues exactly.
    const int64_t ahead = step + rc.dt;
    if (v4 && ar_active(ahead) && !cache.has(ahead)) {
      std::vector<TokenBatch> next;
      for (int64_t m = 0; m < cfg.grad_accum; ++m)
        next.push_back(train_loader.train_batch(ahead, m, cfg.grad_accum, cfg.batch_size));
      cache.precompute(*v4, ahead, next);
    }
    opt.step(lr);
    if (v4) {
      v4->update_routing_bias(cfg.model.bias_update_speed);  // the aux-loss-free rule, from this step's loads
      cache.drop_through(step);
    }
    const double step_time = now_seconds() - t_step;
    window_compute += step_time;
    ++window_steps;

    const int64_t done = step + 1;
    const bool last = done == cfg.steps;
    double val_loss = NAN, val_per_byte = NAN;
    if ((cfg.eval_every > 0 && done % cfg.eval_every == 0) || last) {
      EvalResult ev = evaluate_loss(model, val_loader, *data.tokenizer, cfg.batch_size, cfg.eval_batches, pp);
      val_loss = ev.nats_per_token, val_per_byte = ev.nats_per_byte;
      if (v4) v4->reset_expert_load();  // held-out batches do not count towards the next bias update
    }
    write_metrics(done, step_time,
                  std::isnan(val_loss) ? std::string()
                                       : cat(", \"val_loss\": ", json_number(val_loss),
                                             ", \"val_nats_per_byte\": ", json_number(val_per_byte)));

    if (done % cfg.log_every == 0 || last || !std::isnan(val_loss)) {
      const double window_tps = double(tokens_per_step * window_steps) / window_compute;
      const double eta = (now_seconds() - t_start) / double(done - start_step) * double(cfg.steps - done);
      char val[32] = "";
      if (!std::isnan(val_loss)) std::snprintf(val, sizeof val, " | val %.4f", val_loss);
      char buf[320];
      std::snprintf(buf, sizeof buf,
                    "step %6lld/%lld | loss %.4f%s | lr %.2e | gnorm %.3f | %.0f tok/s | MFU %.1f%% | ETA %s",
                    (long long)done, (long long)cfg.steps, loss, val, lr, grad_norm, window_tps,
                    100 * window_tps * flops_per_token / peak, format_duration(eta).c_str());
      log_info(buf);
      window_compute = 0;
      window_steps = 0;
    }
    const bool save = (cfg.checkpoint_every > 0 && done % cfg.checkpoint_every == 0) || last;
    // A sharded optimizer's state is gathered to rank 0 (a collective: every rank takes part).
    std::vector<Optimizer::State> opt_state = save ? opt.gather_state() : std::vector<Optimizer::State>{};
    // Expert and tensor parallelism: the checkpoint holds the logical tensors, gathered over each shard's group (a
    // collective).
    std::deque<Param> gathered;
    const ParamList to_save = save ? gather_shards(saved, gathered) : saved;
    // The optimizer state's shard entries, gathered on every rank that holds them (all ranks, or under zero1 the
    // expert-data-parallel rank 0 for the routed experts and the data-parallel rank 0 for the rest): the ranks of a
    // shard group hold the same entries, so each gather is entered by its whole group.
    if (save && (ep || tp)) opt_state = gather_state_shards(opt_state, params);
    // Pipeline parallelism: every stage's tensors go to the first stage of data-parallel replica 0 (rank 0).
    std::deque<Param> received;
    PipelineGathered stages;
    const bool gather_stages = save && pp && groups->coords.dp == 0 && groups->coords.tp == 0;
    if (gather_stages) stages = gather_pipeline_stages(to_save, opt_state, *pp, received);
    if (writer && save) {
      CheckpointMeta meta{done, cfg.seed, data.fingerprint, cfg.recipe_toml, cfg.tokenizer_kind,
                          data.tokenizer->hash()};
      const std::string path = checkpoint_path(cfg.run_dir, done);
      if (v4 && rc.anticipatory != "off") {  // written first: a checkpoint file always has its routing state
        RoutingState st;
        st.step = done, st.mode = rc.anticipatory, st.dt = rc.dt, st.ar_until = ar_until;
        st.params_hash = hash_values(to_save);
        st.last_rollback_to = last_rollback_to, st.forced_fired = forced_fired;
        st.window.assign(detector.history.begin(), detector.history.end());
        st.cache = cache;
        fs::create_directories(fs::path(path).parent_path());
        save_routing_state(routing_state_path(path), st);
      }
      if (gather_stages) save_checkpoint(path, cfg.model, stages.params, &opt, meta, &stages.state);
      else save_checkpoint(path, cfg.model, to_save, &opt, meta, &opt_state);
      if (cfg.checkpoint_keep > 0) {
        std::vector<std::string> all = list_checkpoints(cfg.run_dir);
        for (size_t i = 0; i + cfg.checkpoint_keep < all.size(); ++i) {
          fs::remove(all[i]);
          fs::remove(routing_state_path(all[i]));
        }
      }
    }
  }
  if (dp) dp->barrier();  // the last checkpoint is on disk before any rank exits
  if (!writer) return 0;
  bool plotted = plot_metrics(cfg.run_dir, {}, "loss plot");
  log_info(cat("run directory: ", cfg.run_dir, " (metrics.jsonl, recipe.toml, checkpoints/",
               plotted ? ", loss.png" : "", ")"));
  return 0;
}

}  // namespace tessera
