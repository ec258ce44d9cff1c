#include "io/hf_export.h"

#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

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

void export_hf(const std::string& checkpoint, const std::string& out_dir, int32_t bos_id, int32_t eos_id) {
  ModelConfig cfg = checkpoint_model_config(checkpoint);
  if (cfg.arch != "dense") TS_FAIL("checkpoint '", checkpoint, "': Hugging Face export supports dense models, not ", cfg.arch);
  DenseModel model(cfg);
  load_checkpoint(checkpoint, cfg, model.params(), nullptr);
  std::vector<std::pair<std::string, Tensor>> tensors;
  for (const Param* p : model.params()) tensors.emplace_back(hf_llama_name(p->name), p->value);
  std::filesystem::create_directories(out_dir);
  io::write_safetensors(out_dir + "/model.safetensors", tensors, {{"format", "pt"}});
  std::string tmp = out_dir + "/config.json.tmp";
  {
    std::ofstream out(tmp);
    out << hf_llama_config(cfg, bos_id, eos_id);
    if (!out) TS_FAIL("cannot write '", tmp, "'");
  }
  std::filesystem::rename(tmp, out_dir + "/config.json");
}

}  // namespace tessera
