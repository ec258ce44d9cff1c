// A trainable parameter: its name (the checkpoint key), value, gradient and optimizer group.
#pragma once
#include <string>
#include <vector>

#include "core/tensor.h"

namespace tessera {

// Which optimizer rule applies: matrices inside the network, the embedding, the output head, and vectors
// (norm weights, biases, gates). The optimizer maps groups to Muon or AdamW and to weight decay.
enum class ParamKind { matrix, embedding, head, vector };
const char* param_kind_name(ParamKind k);

struct Param {
  std::string name;  // e.g. "layers.3.attn.wq"; weights are [out, in]
  ParamKind kind = ParamKind::matrix;
  Tensor value;
  Tensor grad;
};

using ParamList = std::vector<Param*>;

// A zero-initialised parameter (value and gradient) of the given shape.
Param make_param(const std::string& name, ParamKind kind, const Shape& shape, DType dtype);

int64_t count_elements(const ParamList& params);

}  // namespace tessera
