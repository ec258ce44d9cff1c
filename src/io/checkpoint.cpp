#include "io/checkpoint.h"

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <vector>

#include "core/error.h"
#include "io/h5.h"

namespace tessera {
namespace fs = std::filesystem;
namespace {

constexpr const char* kFormat = "tessera-checkpoint-1";

// The model config as (key, value) pairs in one place, so save, load and the mismatch report agree.
std::vector<std::pair<std::string, std::string>> config_fields(const ModelConfig& c) {
  auto d = [](double v) { return cat(v); };
  return {{"arch", c.arch},
          {"vocab_size", cat(c.vocab_size)},
          {"dim", cat(c.dim)},
          {"n_layers", cat(c.n_layers)},
          {"n_heads", cat(c.n_heads)},
          {"n_kv_heads", cat(c.n_kv_heads)},
          {"ffn_dim", cat(c.ffn_dim)},
          {"max_seq_len", cat(c.max_seq_len)},
          {"rope_theta", d(c.rope_theta)},
          {"norm_eps", d(c.norm_eps)}};
}

void write_config(io::H5Writer& w, const ModelConfig& c) {
  w.write_attr("model.arch", c.arch);
  w.write_attr("model.vocab_size", c.vocab_size);
  w.write_attr("model.dim", c.dim);
  w.write_attr("model.n_layers", c.n_layers);
  w.write_attr("model.n_heads", c.n_heads);
  w.write_attr("model.n_kv_heads", c.n_kv_heads);
  w.write_attr("model.ffn_dim", c.ffn_dim);
  w.write_attr("model.max_seq_len", c.max_seq_len);
  w.write_attr("model.rope_theta", c.rope_theta);
  w.write_attr("model.norm_eps", c.norm_eps);
  w.write_attr("model.init_std", c.init_std);
}

ModelConfig read_config(const io::H5Reader& r) {
  ModelConfig c;
  c.arch = r.attr_string("model.arch");
  c.vocab_size = r.attr_int("model.vocab_size");
  c.dim = r.attr_int("model.dim");
  c.n_layers = r.attr_int("model.n_layers");
  c.n_heads = r.attr_int("model.n_heads");
  c.n_kv_heads = r.attr_int("model.n_kv_heads");
  c.ffn_dim = r.attr_int("model.ffn_dim");
  c.max_seq_len = r.attr_int("model.max_seq_len");
  c.rope_theta = r.attr_double("model.rope_theta");
  c.norm_eps = r.attr_double("model.norm_eps");
  c.init_std = r.attr_double("model.init_std");
  return c;
}

void check_format(const io::H5Reader& r, const std::string& path) {
  if (!r.has_attr("format") || r.attr_string("format") != kFormat)
    TS_FAIL("'", path, "' is not a Tessera checkpoint (no format attribute '", kFormat, "')");
}

// Weights and moments are finite by construction; a non-finite value means damage the HDF5 checksum missed
// (Fletcher-32 cannot tell 0x0000 from 0xFFFF).
void read_finite(const io::H5Reader& r, const std::string& path, const std::string& name, const Tensor& dst) {
  r.read_into(name, dst);
  const float* p = dst.dtype() == DType::f32 ? dst.data<float>() : nullptr;
  for (int64_t i = 0; p && i < dst.numel(); ++i)
    if (!std::isfinite(p[i]))
      TS_FAIL("checkpoint '", path, "': tensor '", name, "' holds a non-finite value at element ", i,
              "; the file is corrupted");
}

}  // namespace

void save_checkpoint(const std::string& path, const ModelConfig& cfg, const ParamList& params, const AdamW* opt,
                     const CheckpointMeta& meta) {
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
  for (const Param* p : params) w.write_tensor("model/" + p->name, p->value);
  if (opt) {
    w.write_attr("optim.name", std::string("adamw"));
    w.write_attr("optim.steps", opt->steps_taken());
    for (size_t i = 0; i < params.size(); ++i) {
      w.write_tensor("optim/adamw/m/" + params[i]->name, opt->first_moments()[i]);
      w.write_tensor("optim/adamw/v/" + params[i]->name, opt->second_moments()[i]);
    }
  }
  w.commit();
}

ModelConfig checkpoint_model_config(const std::string& path) {
  io::H5Reader r(path);
  check_format(r, path);
  return read_config(r);
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
                               AdamW* opt) {
  CheckpointMeta meta = checkpoint_meta(path);
  io::H5Reader r(path);
  auto saved = config_fields(read_config(r)), want = config_fields(cfg);
  std::string diff;
  for (size_t i = 0; i < saved.size(); ++i)
    if (saved[i].second != want[i].second)
      diff += cat(diff.empty() ? " " : "; ", "model.", saved[i].first, " is ", saved[i].second,
                  " in the checkpoint, ", want[i].second, " in the recipe");
  if (!diff.empty()) TS_FAIL("checkpoint '", path, "' does not match the model of the recipe:", diff);
  for (const Param* p : params) read_finite(r, path, "model/" + p->name, p->value);
  if (opt) {
    if (!r.has_attr("optim.name")) TS_FAIL("checkpoint '", path, "' has no optimizer state to resume from");
    for (size_t i = 0; i < params.size(); ++i) {
      read_finite(r, path, "optim/adamw/m/" + params[i]->name, opt->first_moments()[i]);
      read_finite(r, path, "optim/adamw/v/" + params[i]->name, opt->second_moments()[i]);
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
