// Export of a checkpoint to Hugging Face transformers: model.safetensors + config.json (fp32) that
// - a dense checkpoint: LlamaForCausalLM loads as it would any Llama model;
// - a deepseek_v4 checkpoint: DeepseekV4ForCausalLM (model_type "deepseek_v4") loads with no missing or unexpected
//   keys. The MTP block is not exported (the HF port does not instantiate it). The name and layout mapping and
//   every known difference between the HF port and docs/model.md are in docs/model.md ("Hugging Face export").
#pragma once
#include <string>
#include <utility>
#include <vector>

#include "core/tensor.h"
#include "model/config.h"

namespace tessera {

using NamedTensors = std::vector<std::pair<std::string, Tensor>>;

// Hugging Face name of a Tessera dense parameter ("layers.0.attn.wq" -> "model.layers.0.self_attn.q_proj.weight").
std::string hf_llama_name(const std::string& tessera_name);
// The config.json text for a dense model.
std::string hf_llama_config(const ModelConfig& cfg, int32_t bos_id, int32_t eos_id);

// ---- deepseek_v4 ----
// Throws tessera::Error naming the field if transformers' DeepseekV4 cannot express this model: score_func
// "softmax" (HF has no softmax scorer and normalises the top-k weights of every scorer), n_shared_experts != 1
// (HF's shared expert is one SwiGLU of width moe_inter_dim), HCA layers with different ratios (HF has one
// heavily_compressed_attention rate), rope_dim / head_dim not round-tripping through a double.
void check_hf_v4_exportable(const ModelConfig& cfg);
// The config.json text (layer_types, mlp_layer_types, compress_rates, rope_parameters {main, compress} with YaRN
// when yarn_factor > 1, ...).
std::string hf_v4_config(const ModelConfig& cfg, int32_t bos_id, int32_t eos_id);
// Every tensor DeepseekV4ForCausalLM's state_dict holds, in its order, with its shape. All are F32 but the
// hash layers' mlp.gate.tid2eid (I64).
std::vector<std::pair<std::string, Shape>> hf_v4_param_shapes(const ModelConfig& cfg);
// Tessera V4 parameters (the names and shapes of docs/model.md; contiguous host tensors in f32, f64 or bf16,
// tid2eid i32) -> the HF tensors of hf_v4_param_shapes (f32 copies; tid2eid i64). mtp.* and the hash layers'
// unused ffn.gate.bias are left out; a missing parameter, a wrong shape or a parameter with no HF counterpart
// is an error naming it.
NamedTensors hf_v4_tensors(const ModelConfig& cfg, const NamedTensors& params);
// hf_v4_tensors + hf_v4_config written to OUT_DIR/model.safetensors and OUT_DIR/config.json (for tools that hold
// a model in memory, e.g. the reference dump).
void write_hf_v4(const ModelConfig& cfg, const NamedTensors& params, const std::string& out_dir, int32_t bos_id,
                 int32_t eos_id);

// Reads a checkpoint, writes OUT_DIR/model.safetensors and OUT_DIR/config.json (fp32); bos_id and eos_id are
// the run's tokenizer's. Dispatches on the checkpoint's model.arch (dense -> Llama, deepseek_v4 -> DeepseekV4).
void export_hf(const std::string& checkpoint, const std::string& out_dir, int32_t bos_id, int32_t eos_id);

}  // namespace tessera
