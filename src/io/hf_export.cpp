#include "io/hf_export.h"

#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <nlohmann/json.hpp>
#include <set>

#include "core/error.h"
#include "io/checkpoint.h"
#include "io/h5.h"
#include "io/safetensors.h"
#include "model/dense.h"

namespace tessera {

std::string hf_llama_name(const std::string& n) {
  static const std::pair<const char*, const char*> kLayer[] = {
      {"attn_norm", "input_layernorm.weight"},   {"ffn_norm", "post_attention_layernorm.weight"},
      {"attn.wq", "self_attn.q_proj.weight"},    {"attn.wk", "self_attn.k_proj.weight"},
      {"attn.wv", "self_attn.v_proj.weight"},    {"attn.wo", "self_attn.o_proj.weight"},
      {"ffn.w1", "mlp.gate_proj.weight"},        {"ffn.w2", "mlp.down_proj.weight"},
      {"ffn.w3", "mlp.up_proj.weight"}};
  if (n == "tok_embeddings") return "model.embed_tokens.weight";
  if (n == "norm") return "model.norm.weight";
  if (n == "output") return "lm_head.weight";
  if (n.starts_with("layers.")) {
    size_t dot = n.find('.', 7);
    std::string layer = n.substr(0, dot), rest = n.substr(dot + 1);
    for (const auto& [ours, theirs] : kLayer)
      if (rest == ours) return "model." + layer + "." + theirs;
  }
  TS_FAIL("no Hugging Face Llama name for parameter '", n, "'");
}

std::string hf_llama_config(const ModelConfig& c, int32_t bos_id, int32_t eos_id) {
  nlohmann::ordered_json j = {
      {"architectures", {"LlamaForCausalLM"}},
      {"model_type", "llama"},
      {"vocab_size", c.vocab_size},
      {"hidden_size", c.dim},
      {"intermediate_size", c.ffn_dim},
      {"num_hidden_layers", c.n_layers},
      {"num_attention_heads", c.n_heads},
      {"num_key_value_heads", c.n_kv_heads},
      {"head_dim", c.attn_head_dim()},
      {"hidden_act", "silu"},
      {"max_position_embeddings", c.max_seq_len},
      {"rms_norm_eps", c.norm_eps},
      {"rope_theta", c.rope_theta},
      {"rope_scaling", nullptr},
      {"attention_bias", false},
      {"mlp_bias", false},
      {"tie_word_embeddings", false},
      {"initializer_range", c.init_std},
      {"torch_dtype", "float32"},
      {"bos_token_id", bos_id},
      {"eos_token_id", eos_id},
  };
  return j.dump(2) + "\n";
}

// ---------------------------------------------------------------------------------------------------------------
// deepseek_v4 -> transformers' DeepseekV4ForCausalLM
namespace {

enum class V4Attn { sliding, csa, hca };

const char* hf_layer_type(V4Attn a) {
  switch (a) {
    case V4Attn::sliding: return "sliding_attention";
    case V4Attn::csa: return "compressed_sparse_attention";
    case V4Attn::hca: return "heavily_compressed_attention";
  }
  return "";
}

struct V4Layout {
  std::vector<V4Attn> attn;  // per main layer (the MTP entry of compress_ratios is dropped)
  int64_t hca_ratio = 128;   // HF's one heavily_compressed_attention rate (128 when no layer is HCA)
};

V4Layout v4_layout(const ModelConfig& c) {
  V4Layout out;
  int64_t hca = 0;
  for (int64_t l = 0; l < c.n_layers; ++l) {
    int64_t m = c.layer_ratio(l);
    V4Attn a = m == 0 ? V4Attn::sliding : c.layer_is_csa(l) ? V4Attn::csa : V4Attn::hca;
    if (a == V4Attn::hca) {
      if (hca != 0 && m != hca)
        TS_FAIL("Hugging Face export: model.compress_ratios has HCA layers with ratios ", hca, " and ", m,
                "; transformers' DeepseekV4 has a single heavily_compressed_attention rate");
      hca = m;
    }
    out.attn.push_back(a);
  }
  if (hca != 0) out.hca_ratio = hca;
  return out;
}

std::string layer(int64_t l) { return cat("layers.", l, "."); }

// A contiguous host f32 copy of a float parameter.
Tensor host_f32(const std::string& name, const Tensor& t) {
  if (t.device() != Device::cpu || !t.is_contiguous())
    TS_FAIL("Hugging Face export: parameter '", name, "' must be a contiguous host tensor, got ", t.str(), " on ",
            device_name(t.device()));
  if (t.dtype() != DType::f32 && t.dtype() != DType::f64 && t.dtype() != DType::bf16)
    TS_FAIL("Hugging Face export: parameter '", name, "' must be a float tensor, got ", t.str());
  return t.to(DType::f32);
}

// Looks Tessera parameters up by name, checks their shapes, and remembers which were used.
class V4Params {
 public:
  explicit V4Params(const NamedTensors& params) {
    for (const auto& [n, t] : params)
      if (!by_name_.emplace(n, t).second) TS_FAIL("Hugging Face export: parameter '", n, "' given twice");
  }
  const Tensor& get(const std::string& name, const Shape& shape) {
    auto it = by_name_.find(name);
    if (it == by_name_.end()) TS_FAIL("Hugging Face export: the checkpoint has no parameter '", name, "'");
    if (it->second.shape() != shape)
      TS_FAIL("Hugging Face export: parameter '", name, "' is ", it->second.str(), ", expected shape ",
              shape_str(shape), " for this model config");
    used_.insert(name);
    return it->second;
  }
  Tensor f32(const std::string& name, const Shape& shape) { return host_f32(name, get(name, shape)); }
  // Everything not used must be deliberately left out (MTP, the hash layers' unused bias).
  void check_all_used(const ModelConfig& c) const {
    std::vector<std::string> stray;
    for (const auto& [n, t] : by_name_) {
      if (used_.count(n) || n.starts_with("mtp.")) continue;
      bool hash_bias = false;
      for (int64_t l = 0; l < c.n_layers && !hash_bias; ++l)
        hash_bias = c.layer_is_hash(l) && n == layer(l) + "ffn.gate.bias";
      if (!hash_bias) stray.push_back(n);
    }
    if (!stray.empty()) {
      std::string list;
      for (const auto& n : stray) list += (list.empty() ? "'" : ", '") + n + "'";
      TS_FAIL("Hugging Face export: no DeepseekV4ForCausalLM counterpart for parameter(s) ", list);
    }
  }

 private:
  std::map<std::string, Tensor> by_name_;
  std::set<std::string> used_;
};

// One entry of the HF state dict: name, shape and how to build it from the Tessera parameters.
struct HfEntry {
  std::string name;
  Shape shape;
  std::function<Tensor(V4Params&)> make;
};

std::vector<HfEntry> v4_entries(const ModelConfig& c) {
  check_hf_v4_exportable(c);
  const V4Layout lay = v4_layout(c);
  const int64_t V = c.vocab_size, d = c.dim, n = c.hc_mult, H = c.n_heads, hd = c.head_dim, dc = c.q_lora_rank;
  const int64_t g = c.o_groups, dg = c.o_lora_rank, E = c.n_routed_experts, F = c.moe_inter_dim,
                k = c.n_activated_experts, HI = c.index_n_heads, cI = c.index_head_dim, mix = 2 * n + n * n;
  std::vector<HfEntry> out;
  auto direct = [&](const std::string& hf, const std::string& ours, Shape shape) {
    out.push_back({hf, shape, [ours, shape](V4Params& p) { return p.f32(ours, shape); }});
  };

  direct("model.embed_tokens.weight", "tok_embeddings", {V, d});
  for (int64_t l = 0; l < c.n_layers; ++l) {
    const std::string T = layer(l), P = "model.layers." + std::to_string(l) + ".";
    const std::string A = P + "self_attn.";
    direct(A + "sinks", T + "attn.sink", {H});
    direct(A + "q_a_proj.weight", T + "attn.wq_a", {dc, d});
    direct(A + "q_a_norm.weight", T + "attn.q_norm", {dc});
    direct(A + "q_b_proj.weight", T + "attn.wq_b", {H * hd, dc});
    direct(A + "kv_proj.weight", T + "attn.wkv", {hd, d});
    direct(A + "kv_norm.weight", T + "attn.kv_norm", {hd});
    // Tessera (g, d_g, H c / g) is HF's GroupedLinear weight (g d_g, H c / g) viewed per group: same bytes.
    out.push_back({A + "o_a_proj.weight", {g * dg, H * hd / g}, [=](V4Params& p) {
                     return p.f32(T + "attn.wo_a", {g, dg, H * hd / g}).reshape({g * dg, H * hd / g});
                   }});
    direct(A + "o_b_proj.weight", T + "attn.wo_b", {d, g * dg});
    if (lay.attn[l] != V4Attn::sliding) {
      // Same channel layout on both sides: rows [0, c) are the half the next block uses, [c, 2c) the block's own.
      const bool csa = lay.attn[l] == V4Attn::csa;
      const int64_t S = csa ? 2 : 1, m = csa ? c.csa_ratio : lay.hca_ratio;
      const std::string C = A + "compressor.", TC = T + "attn.compressor.";
      direct(C + "position_bias", TC + "ape", {m, S * hd});
      direct(C + "kv_proj.weight", TC + "wkv", {S * hd, d});
      direct(C + "gate_proj.weight", TC + "wgate", {S * hd, d});
      direct(C + "kv_norm.weight", TC + "norm", {hd});
      if (csa) {
        const std::string I = C + "indexer.", TI = T + "attn.indexer.";
        direct(I + "position_bias", TI + "compressor.ape", {m, 2 * cI});
        direct(I + "kv_proj.weight", TI + "compressor.wkv", {2 * cI, d});
        direct(I + "gate_proj.weight", TI + "compressor.wgate", {2 * cI, d});
        direct(I + "kv_norm.weight", TI + "compressor.norm", {cI});
        direct(I + "q_b_proj.weight", TI + "wq_b", {HI * cI, dc});
        direct(I + "scorer.weights_proj.weight", TI + "weights_proj", {HI, d});
      }
    }
    const std::string M = P + "mlp.";
    direct(M + "gate.weight", T + "ffn.gate.weight", {E, d});
    if (c.layer_is_hash(l)) {
      out.push_back({M + "gate.tid2eid", {V, k}, [=](V4Params& p) {
                       const std::string name = T + "ffn.gate.tid2eid";
                       const Tensor& t = p.get(name, {V, k});
                       if (t.dtype() != DType::i32 && t.dtype() != DType::i64)
                         TS_FAIL("Hugging Face export: parameter '", name, "' must be i32 or i64, got ", t.str());
                       if (t.device() != Device::cpu || !t.is_contiguous())
                         TS_FAIL("Hugging Face export: parameter '", name, "' must be a contiguous host tensor");
                       Tensor o = Tensor::empty({V, k}, DType::i64);
                       for (int64_t i = 0; i < V * k; ++i) {
                         int64_t e = t.dtype() == DType::i32 ? t.data<int32_t>()[i] : t.data<int64_t>()[i];
                         if (e < 0 || e >= E)
                           TS_FAIL("Hugging Face export: parameter '", name, "' holds expert ", e, " at element ", i,
                                   ", outside [0, ", E, ")");
                         o.data<int64_t>()[i] = e;
                       }
                       return o;
                     }});
    } else {
      direct(M + "gate.e_score_correction_bias", T + "ffn.gate.bias", {E});
    }
    // HF packs each expert's gate and up projections as gate_up_proj[e] = [w1[e]; w3[e]] (chunk(2) order).
    out.push_back({M + "experts.gate_up_proj", {E, 2 * F, d}, [=](V4Params& p) {
                     Tensor w1 = p.f32(T + "ffn.experts.w1", {E, F, d}), w3 = p.f32(T + "ffn.experts.w3", {E, F, d});
                     Tensor o = Tensor::empty({E, 2 * F, d}, DType::f32);
                     const size_t block = static_cast<size_t>(F * d) * sizeof(float);
                     for (int64_t e = 0; e < E; ++e) {
                       std::memcpy(o.data<float>() + (2 * e) * F * d, w1.data<float>() + e * F * d, block);
                       std::memcpy(o.data<float>() + (2 * e + 1) * F * d, w3.data<float>() + e * F * d, block);
                     }
                     return o;
                   }});
    direct(M + "experts.down_proj", T + "ffn.experts.w2", {E, d, F});
    direct(M + "shared_experts.gate_proj.weight", T + "ffn.shared.w1", {F, d});
    direct(M + "shared_experts.up_proj.weight", T + "ffn.shared.w3", {F, d});
    direct(M + "shared_experts.down_proj.weight", T + "ffn.shared.w2", {d, F});
    direct(P + "input_layernorm.weight", T + "attn_norm", {d});
    direct(P + "post_attention_layernorm.weight", T + "ffn_norm", {d});
    for (const char* site : {"attn", "ffn"}) {
      direct(P + site + "_hc.fn", T + "hc_" + site + ".fn", {mix, n * d});
      direct(P + site + "_hc.base", T + "hc_" + site + ".base", {mix});
      direct(P + site + "_hc.scale", T + "hc_" + site + ".scale", {3});
    }
  }
  direct("model.norm.weight", "norm", {d});
  direct("model.hc_head.hc_fn", "hc_head.fn", {n, n * d});
  direct("model.hc_head.hc_base", "hc_head.base", {n});
  direct("model.hc_head.hc_scale", "hc_head.scale", {1});
  direct("lm_head.weight", "output", {V, d});
  return out;
}

void write_text_atomic(const std::string& path, const std::string& text) {
  std::string tmp = path + ".tmp";
  {
    std::ofstream out(tmp);
    out << text;
    if (!out) TS_FAIL("cannot write '", tmp, "'");
  }
  std::filesystem::rename(tmp, path);
}

}  // namespace

void check_hf_v4_exportable(const ModelConfig& c) {
  if (!c.is_v4()) TS_FAIL("Hugging Face DeepseekV4 export: model.arch is '", c.arch, "', not deepseek_v4");
  c.validate();
  if (c.score_func == "softmax")
    TS_FAIL("Hugging Face export: model.score_func = \"softmax\" cannot be expressed: transformers' DeepseekV4 has no "
            "softmax scorer and normalises the top-k weights of every scorer (Tessera, like the official code, does "
            "not normalise softmax weights); use sqrtsoftplus or sigmoid");
  if (c.n_shared_experts != 1)
    TS_FAIL("Hugging Face export: model.n_shared_experts = ", c.n_shared_experts,
            " cannot be expressed: transformers' DeepseekV4 has exactly one shared expert of width moe_inter_dim");
  double prf = double(c.rope_dim) / double(c.head_dim);
  if (static_cast<int64_t>(double(c.head_dim) * prf) != c.rope_dim)
    TS_FAIL("Hugging Face export: model.rope_dim / model.head_dim = ", c.rope_dim, " / ", c.head_dim,
            " does not round-trip through transformers' partial_rotary_factor");
  v4_layout(c);
}

std::string hf_v4_config(const ModelConfig& c, int32_t bos_id, int32_t eos_id) {
  check_hf_v4_exportable(c);
  const V4Layout lay = v4_layout(c);
  nlohmann::ordered_json layer_types = nlohmann::ordered_json::array(),
                         mlp_types = nlohmann::ordered_json::array();
  for (int64_t l = 0; l < c.n_layers; ++l) {
    layer_types.push_back(hf_layer_type(lay.attn[l]));
    mlp_types.push_back(c.layer_is_hash(l) ? "hash_moe" : "moe");
  }
  const double prf = double(c.rope_dim) / double(c.head_dim);
  nlohmann::ordered_json main_rope = {{"rope_type", "default"}, {"rope_theta", c.rope_theta},
                                      {"partial_rotary_factor", prf}};
  nlohmann::ordered_json compress_rope = {{"rope_type", "default"}, {"rope_theta", c.compress_rope_theta},
                                          {"partial_rotary_factor", prf}};
  if (c.yarn_factor > 1.0) {
    // attention_factor 1: V4 does not scale cos/sin by YaRN's mscale (HF would derive 0.1 ln(factor) + 1 when
    // the key is absent from an already nested rope_parameters).
    compress_rope = {{"rope_type", "yarn"},
                     {"rope_theta", c.compress_rope_theta},
                     {"partial_rotary_factor", prf},
                     {"factor", c.yarn_factor},
                     {"original_max_position_embeddings", c.yarn_original_len},
                     {"beta_fast", c.yarn_beta_fast},
                     {"beta_slow", c.yarn_beta_slow},
                     {"attention_factor", 1.0}};
  }
  nlohmann::ordered_json j = {
      {"architectures", {"DeepseekV4ForCausalLM"}},
      {"model_type", "deepseek_v4"},
      {"vocab_size", c.vocab_size},
      {"hidden_size", c.dim},
      {"num_hidden_layers", c.n_layers},
      {"num_attention_heads", c.n_heads},
      {"num_key_value_heads", 1},
      {"head_dim", c.head_dim},
      {"partial_rotary_factor", prf},
      {"q_lora_rank", c.q_lora_rank},
      {"o_groups", c.o_groups},
      {"o_lora_rank", c.o_lora_rank},
      {"sliding_window", c.window},
      {"layer_types", layer_types},
      {"compress_rates",
       {{"compressed_sparse_attention", c.csa_ratio}, {"heavily_compressed_attention", lay.hca_ratio}}},
      {"index_n_heads", c.index_n_heads},
      {"index_head_dim", c.index_head_dim},
      {"index_topk", c.index_topk},
      {"rope_theta", c.rope_theta},
      {"compress_rope_theta", c.compress_rope_theta},
      {"rope_parameters", {{"main", main_rope}, {"compress", compress_rope}}},
      {"max_position_embeddings", c.max_seq_len},
      {"n_routed_experts", c.n_routed_experts},
      {"n_shared_experts", c.n_shared_experts},
      {"num_experts_per_tok", c.n_activated_experts},
      {"moe_intermediate_size", c.moe_inter_dim},
      {"mlp_layer_types", mlp_types},
      {"scoring_func", c.score_func},
      {"norm_topk_prob", true},
      {"routed_scaling_factor", c.route_scale},
      // 0 = no clamp in Tessera; HF always clamps, so a limit no fp32 activation reaches.
      {"swiglu_limit", c.swiglu_limit > 0 ? c.swiglu_limit : 1e30},
      {"hidden_act", "silu"},
      {"hc_mult", c.hc_mult},
      {"hc_sinkhorn_iters", c.hc_sinkhorn_iters},
      {"hc_eps", c.hc_eps},
      {"rms_norm_eps", c.norm_eps},
      // The MTP block is not exported: the HF port does not instantiate it.
      {"num_nextn_predict_layers", 0},
      {"attention_bias", false},
      {"mlp_bias", false},
      {"attention_dropout", 0.0},
      {"tie_word_embeddings", false},
      {"initializer_range", c.init_std},
      {"dtype", "float32"},
      {"bos_token_id", bos_id},
      {"eos_token_id", eos_id},
  };
  return j.dump(2) + "\n";
}

std::vector<std::pair<std::string, Shape>> hf_v4_param_shapes(const ModelConfig& cfg) {
  std::vector<std::pair<std::string, Shape>> out;
  for (const HfEntry& e : v4_entries(cfg)) out.emplace_back(e.name, e.shape);
  return out;
}

NamedTensors hf_v4_tensors(const ModelConfig& cfg, const NamedTensors& params) {
  V4Params p(params);
  NamedTensors out;
  for (const HfEntry& e : v4_entries(cfg)) {
    Tensor t = e.make(p);
    TS_CHECK(t.shape() == e.shape, e.name, " built as ", t.str(), ", expected ", shape_str(e.shape));
    out.emplace_back(e.name, std::move(t));
  }
  p.check_all_used(cfg);
  return out;
}

void write_hf_v4(const ModelConfig& cfg, const NamedTensors& params, const std::string& out_dir, int32_t bos_id,
                 int32_t eos_id) {
  NamedTensors tensors = hf_v4_tensors(cfg, params);
  std::string config = hf_v4_config(cfg, bos_id, eos_id);
  std::filesystem::create_directories(out_dir);
  io::write_safetensors(out_dir + "/model.safetensors", tensors, {{"format", "pt"}});
  write_text_atomic(out_dir + "/config.json", config);
}

void export_hf(const std::string& checkpoint, const std::string& out_dir, int32_t bos_id, int32_t eos_id) {
  ModelConfig cfg = checkpoint_model_config(checkpoint);
  if (cfg.is_v4()) {
    // Every weight under model/ by its checkpoint key (docs/model.md names); the mapping checks names and shapes.
    io::H5Reader r(checkpoint);
    NamedTensors params;
    for (const std::string& full : r.tensor_names("model")) {
      std::string name = full.starts_with("model/") ? full.substr(6) : full;
      params.emplace_back(name, r.read_tensor(full));
    }
    write_hf_v4(cfg, params, out_dir, bos_id, eos_id);
    return;
  }
  if (cfg.arch != "dense") TS_FAIL("checkpoint '", checkpoint, "': Hugging Face export supports dense and deepseek_v4 models, not ", cfg.arch);
  DenseModel model(cfg);
  load_checkpoint(checkpoint, cfg, model.params(), nullptr);
  std::vector<std::pair<std::string, Tensor>> tensors;
  for (const Param* p : model.params()) tensors.emplace_back(hf_llama_name(p->name), p->value);
  std::filesystem::create_directories(out_dir);
  io::write_safetensors(out_dir + "/model.safetensors", tensors, {{"format", "pt"}});
  write_text_atomic(out_dir + "/config.json", hf_llama_config(cfg, bos_id, eos_id));
}

}  // namespace tessera
