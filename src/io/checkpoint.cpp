#include "io/checkpoint.h"

#include <map>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <map>
#include <type_traits>
#include <variant>
#include <vector>

#include "core/error.h"
#include "io/h5.h"

namespace tessera {
namespace fs = std::filesystem;
namespace {

constexpr const char* kFormat = "tessera-checkpoint-1";

// Every ModelConfig field in one place, saved as the root attribute `model.<key>`, so save, load and the
// mismatch report agree. `required`: present in every checkpoint (the fields older than the V4 ones); an
// optional field missing from an older checkpoint keeps ModelConfig's default. `compared`: a difference to the
// recipe is an error on load; the fields that only shape initialisation or the training objective
// (init_std, loss weights, the balancing bias speed) may change on resume.
using FieldPtr = std::variant<int64_t ModelConfig::*, double ModelConfig::*, bool ModelConfig::*,
                              std::string ModelConfig::*, std::vector<int64_t> ModelConfig::*>;
struct ConfigField {
  const char* key;
  FieldPtr ptr;
  bool required;
  bool compared;
};

const std::vector<ConfigField>& config_table() {
  using M = ModelConfig;
  static const std::vector<ConfigField> t = {
      {"arch", &M::arch, true, true},
      {"vocab_size", &M::vocab_size, true, true},
      {"dim", &M::dim, true, true},
      {"n_layers", &M::n_layers, true, true},
      {"n_heads", &M::n_heads, true, true},
      {"n_kv_heads", &M::n_kv_heads, true, true},
      {"ffn_dim", &M::ffn_dim, true, true},
      {"max_seq_len", &M::max_seq_len, true, true},
      {"rope_theta", &M::rope_theta, true, true},
      {"norm_eps", &M::norm_eps, true, true},
      {"init_std", &M::init_std, true, false},
      // deepseek_v4
      {"head_dim", &M::head_dim, false, true},
      {"rope_dim", &M::rope_dim, false, true},
      {"q_lora_rank", &M::q_lora_rank, false, true},
      {"o_groups", &M::o_groups, false, true},
      {"o_lora_rank", &M::o_lora_rank, false, true},
      {"window", &M::window, false, true},
      {"compress_ratios", &M::compress_ratios, false, true},
      {"csa_ratio", &M::csa_ratio, false, true},
      {"compress_rope_theta", &M::compress_rope_theta, false, true},
      {"yarn_factor", &M::yarn_factor, false, true},
      {"yarn_original_len", &M::yarn_original_len, false, true},
      {"yarn_beta_fast", &M::yarn_beta_fast, false, true},
      {"yarn_beta_slow", &M::yarn_beta_slow, false, true},
      {"index_n_heads", &M::index_n_heads, false, true},
      {"index_head_dim", &M::index_head_dim, false, true},
      {"index_topk", &M::index_topk, false, true},
      {"indexer_fp4", &M::indexer_fp4, false, true},
      {"kv_fp8", &M::kv_fp8, false, true},
      {"indexer_loss_weight", &M::indexer_loss_weight, false, false},
      {"n_routed_experts", &M::n_routed_experts, false, true},
      {"n_shared_experts", &M::n_shared_experts, false, true},
      {"n_activated_experts", &M::n_activated_experts, false, true},
      {"moe_inter_dim", &M::moe_inter_dim, false, true},
      {"n_hash_layers", &M::n_hash_layers, false, true},
      {"route_scale", &M::route_scale, false, true},
      {"score_func", &M::score_func, false, true},
      {"swiglu_limit", &M::swiglu_limit, false, true},
      {"balance_loss_weight", &M::balance_loss_weight, false, false},
      {"bias_update_speed", &M::bias_update_speed, false, false},
      {"hc_mult", &M::hc_mult, false, true},
      {"hc_sinkhorn_iters", &M::hc_sinkhorn_iters, false, true},
      {"hc_eps", &M::hc_eps, false, true},
      {"mtp_depth", &M::mtp_depth, false, true},
      {"mtp_loss_weight", &M::mtp_loss_weight, false, false},
      // deepseek_v32 (inspect only, but a config is a config)
      {"kv_lora_rank", &M::kv_lora_rank, false, true},
      {"qk_nope_head_dim", &M::qk_nope_head_dim, false, true},
      {"qk_rope_head_dim", &M::qk_rope_head_dim, false, true},
      {"v_head_dim", &M::v_head_dim, false, true},
      {"n_dense_layers", &M::n_dense_layers, false, true},
  };
  return t;
}

// An int list is stored as its comma-separated text ("0,0,4,128"; "" when empty).
std::string list_text(const std::vector<int64_t>& v) {
  std::string s;
  for (size_t i = 0; i < v.size(); ++i) {
    if (i) s += ',';
    s += std::to_string(v[i]);
  }
  return s;
}

std::vector<int64_t> parse_list(const std::string& s, const std::string& path, const std::string& key) {
  std::vector<int64_t> v;
  size_t pos = 0;
  while (pos < s.size()) {
    size_t comma = s.find(',', pos);
    std::string item = s.substr(pos, comma == std::string::npos ? std::string::npos : comma - pos);
    char* end = nullptr;
    long long x = std::strtoll(item.c_str(), &end, 10);
    if (item.empty() || *end != '\0')
      TS_FAIL("checkpoint '", path, "': attribute '", key, "' is not a comma-separated integer list: '", s, "'");
    v.push_back(x);
    if (comma == std::string::npos) break;
    pos = comma + 1;
  }
  return v;
}

// The model config as (key, value text) pairs, in config_table() order: for the mismatch report.
std::vector<std::pair<std::string, std::string>> config_fields(const ModelConfig& c) {
  std::vector<std::pair<std::string, std::string>> out;
  for (const ConfigField& f : config_table()) {
    if (!f.compared) continue;
    std::string text = std::visit(
        [&](auto p) -> std::string {
          using T = std::decay_t<decltype(c.*p)>;
          if constexpr (std::is_same_v<T, std::string>) return c.*p;
          else if constexpr (std::is_same_v<T, std::vector<int64_t>>) return cat("[", list_text(c.*p), "]");
          else if constexpr (std::is_same_v<T, bool>) return c.*p ? "true" : "false";
          else return cat(c.*p);
        },
        f.ptr);
    out.emplace_back(f.key, std::move(text));
  }
  return out;
}

void write_config(io::H5Writer& w, const ModelConfig& c) {
  for (const ConfigField& f : config_table()) {
    std::string key = std::string("model.") + f.key;
    std::visit(
        [&](auto p) {
          using T = std::decay_t<decltype(c.*p)>;
          if constexpr (std::is_same_v<T, std::vector<int64_t>>) w.write_attr(key, list_text(c.*p));
          else if constexpr (std::is_same_v<T, bool>) w.write_attr(key, int64_t(c.*p ? 1 : 0));
          else w.write_attr(key, c.*p);
        },
        f.ptr);
  }
}

ModelConfig read_config(const io::H5Reader& r, const std::string& path) {
  ModelConfig c;
  for (const ConfigField& f : config_table()) {
    std::string key = std::string("model.") + f.key;
    if (!f.required && !r.has_attr(key)) continue;  // older checkpoint: the default
    std::visit(
        [&](auto p) {
          using T = std::decay_t<decltype(c.*p)>;
          if constexpr (std::is_same_v<T, std::string>) c.*p = r.attr_string(key);
          else if constexpr (std::is_same_v<T, std::vector<int64_t>>) c.*p = parse_list(r.attr_string(key), path, key);
          else if constexpr (std::is_same_v<T, bool>) c.*p = r.attr_int(key) != 0;
          else if constexpr (std::is_same_v<T, double>) c.*p = r.attr_double(key);
          else c.*p = r.attr_int(key);
        },
        f.ptr);
  }
  return c;
}

void check_format(const io::H5Reader& r, const std::string& path) {
  if (!r.has_attr("format") || r.attr_string("format") != kFormat)
    TS_FAIL("'", path, "' is not a Tessera checkpoint (no format attribute '", kFormat, "')");
}

// Weights and moments are finite by construction; a non-finite value means damage the HDF5 checksum missed
// (Fletcher-32 cannot tell 0x0000 from 0xFFFF).
// A shard (`shard` non-null) reads its slice of the stored logical tensor.
void read_finite(const io::H5Reader& r, const std::string& path, const std::string& name, const Tensor& dst,
                 const Param* shard = nullptr) {
  Tensor host = dst.device() == Device::cpu ? dst : Tensor::empty(dst.shape(), dst.dtype(), Device::cpu);
  if (shard) r.read_slice(name, shard->shard_dim, shard->shard_offset, host);
  else r.read_into(name, host);
  if (dst.device() != Device::cpu) dst.copy_from(host);
  const float* p = host.dtype() == DType::f32 ? host.data<float>() : nullptr;
  for (int64_t i = 0; p && i < host.numel(); ++i)
    if (!std::isfinite(p[i]))
      TS_FAIL("checkpoint '", path, "': tensor '", name, "' holds a non-finite value at element ", i,
              "; the file is corrupted");
}

}  // namespace

void save_checkpoint(const std::string& path, const ModelConfig& cfg, const ParamList& params, const Optimizer* opt,
                     const CheckpointMeta& meta, const std::vector<Optimizer::State>* opt_state) {
  fs::create_directories(fs::path(path).parent_path());
  io::H5Writer w(path);
  w.write_attr("format", std::string(kFormat));
  w.write_attr("step", meta.step);
  w.write_attr("seed", static_cast<int64_t>(meta.seed));
  w.write_attr("data.cursor_step", meta.step);
  w.write_attr("data.fingerprint", static_cast<int64_t>(meta.data_fingerprint));
  w.write_attr("tokenizer", meta.tokenizer);
  w.write_attr("tokenizer.hash", static_cast<int64_t>(meta.tokenizer_hash));
  w.write_attr("recipe", meta.recipe);
  write_config(w, cfg);
  for (const Param* p : params) {
    TS_CHECK(!p->sharded(), "save_checkpoint: ", p->name, " is a shard; gather the logical tensor first");
    w.write_tensor("model/" + p->name, p->value);
  }
  if (opt) {
    w.write_attr("optim.name", opt->config().name);
    w.write_attr("optim.steps", opt->steps_taken());
    for (const Optimizer::State& s : opt_state ? *opt_state : opt->state()) w.write_tensor("optim/" + s.key, s.tensor);
  }
  w.commit();
}

ModelConfig checkpoint_model_config(const std::string& path) {
  io::H5Reader r(path);
  check_format(r, path);
  return read_config(r, path);
}

CheckpointMeta checkpoint_meta(const std::string& path) {
  io::H5Reader r(path);
  check_format(r, path);
  CheckpointMeta m;
  m.step = r.attr_int("step");
  m.seed = static_cast<uint64_t>(r.attr_int("seed"));
  m.data_fingerprint = static_cast<uint64_t>(r.attr_int("data.fingerprint"));
  m.recipe = r.attr_string("recipe");
  m.tokenizer = r.attr_string("tokenizer");
  m.tokenizer_hash = static_cast<uint64_t>(r.attr_int("tokenizer.hash"));
  return m;
}

CheckpointMeta load_checkpoint(const std::string& path, const ModelConfig& cfg, const ParamList& params,
                               Optimizer* opt) {
  CheckpointMeta meta = checkpoint_meta(path);
  io::H5Reader r(path);
  auto saved = config_fields(read_config(r, path)), want = config_fields(cfg);
  std::string diff;
  for (size_t i = 0; i < saved.size(); ++i)
    if (saved[i].second != want[i].second)
      diff += cat(diff.empty() ? " " : "; ", "model.", saved[i].first, " is ", saved[i].second,
                  " in the checkpoint, ", want[i].second, " in the recipe");
  if (!diff.empty()) TS_FAIL("checkpoint '", path, "' does not match the model of the recipe:", diff);
  std::map<std::string, const Param*> by_name;
  for (const Param* p : params) {
    read_finite(r, path, "model/" + p->name, p->value, p->sharded() ? p : nullptr);
    by_name[p->name] = p;
  }
  if (opt) {
    if (!r.has_attr("optim.name")) TS_FAIL("checkpoint '", path, "' has no optimizer state to resume from");
    if (r.attr_string("optim.name") != opt->config().name)
      TS_FAIL("checkpoint '", path, "' was trained with optimizer.name = \"", r.attr_string("optim.name"),
              "\", the recipe asks for \"", opt->config().name, "\"; its optimizer state cannot be resumed");
    for (const Optimizer::State& s : opt->state()) {
      if (!r.has_tensor("optim/" + s.key))
        TS_FAIL("checkpoint '", path, "' has no optimizer state 'optim/", s.key,
                "' (was optimizer.adamw_params changed?)");
      // Keys are RULE/MOMENT/NAME; a sharded parameter's state is sharded as it is.
      auto p = by_name.find(s.key.substr(s.key.rfind('/') + 1));
      const bool shard = p != by_name.end() && p->second->sharded();
      read_finite(r, path, "optim/" + s.key, s.tensor, shard ? p->second : nullptr);
    }
    opt->set_steps_taken(r.attr_int("optim.steps"));
  }
  return meta;
}

std::string checkpoint_path(const std::string& run_dir, int64_t step) {
  char name[32];
  std::snprintf(name, sizeof name, "step_%08lld.h5", static_cast<long long>(step));
  return (fs::path(run_dir) / "checkpoints" / name).string();
}

// step_XXXXXXXX.h5 files by step number (other files in checkpoints/ are left alone).
std::vector<std::string> list_checkpoints(const std::string& run_dir) {
  fs::path dir = fs::path(run_dir) / "checkpoints";
  std::vector<std::pair<long long, std::string>> found;
  if (fs::is_directory(dir))
    for (const auto& e : fs::directory_iterator(dir)) {
      std::string n = e.path().filename().string();
      char* end = nullptr;
      long long step = n.starts_with("step_") ? std::strtoll(n.c_str() + 5, &end, 10) : -1;
      if (step >= 0 && end && std::string(end) == ".h5") found.emplace_back(step, e.path().string());
    }
  std::sort(found.begin(), found.end());
  std::vector<std::string> paths;
  for (auto& f : found) paths.push_back(std::move(f.second));
  return paths;
}

std::string latest_checkpoint(const std::string& run_dir) {
  std::vector<std::string> all = list_checkpoints(run_dir);
  return all.empty() ? "" : all.back();
}

std::string resolve_checkpoint(const std::string& p) {
  if (!fs::exists(p)) TS_FAIL("checkpoint '", p, "' not found");
  if (!fs::is_directory(p)) return p;
  std::string c = latest_checkpoint(p);
  if (c.empty()) TS_FAIL("run directory '", p, "' has no checkpoints (looked in ", p, "/checkpoints)");
  return c;
}

}  // namespace tessera
