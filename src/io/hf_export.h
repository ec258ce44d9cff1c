// Export of a dense checkpoint to the Hugging Face Llama layout: model.safetensors + config.json that
// transformers' LlamaForCausalLM loads as it would any Llama model.
#pragma once
#include <string>

#include "model/config.h"

namespace tessera {

// Hugging Face name of a Tessera dense parameter ("layers.0.attn.wq" -> "model.layers.0.self_attn.q_proj.weight").
std::string hf_llama_name(const std::string& tessera_name);
// The config.json text for a dense model.
std::string hf_llama_config(const ModelConfig& cfg, int32_t bos_id, int32_t eos_id);
// Reads a checkpoint, writes OUT_DIR/model.safetensors and OUT_DIR/config.json (fp32); bos_id and eos_id are
// the run's tokenizer's.
void export_hf(const std::string& checkpoint, const std::string& out_dir, int32_t bos_id, int32_t eos_id);

}  // namespace tessera
