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
  // A shard along dim 0 (expert parallelism: a rank's experts of a stack): value holds rows [shard_offset,
  // shard_offset + value.size(0)) of a logical tensor of shard_rows rows. 0 = not sharded. Checkpoints store the
  // logical tensor (gathered on save, each rank reading its rows on load).
  int64_t shard_offset = 0, shard_rows = 0;
  bool sharded() const { return shard_rows > 0; }
  Shape logical_shape() const;
};

using ParamList = std::vector<Param*>;

// A zero-initialised parameter (value and gradient) of the given shape.
Param make_param(const std::string& name, ParamKind kind, const Shape& shape, DType dtype);

int64_t count_elements(const ParamList& params);  // of the logical tensors (shards count whole)

}  // namespace tessera
