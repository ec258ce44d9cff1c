// A trainable parameter: its name (the checkpoint key), value, gradient and optimizer group.
#pragma once
#include <string>
#include <vector>

#include "core/tensor.h"

namespace tessera {

class Communicator;

// Which optimizer rule applies: matrices inside the network, the embedding, the output head, and vectors
// (norm weights, biases, gates). The optimizer maps groups to Muon or AdamW and to weight decay.
enum class ParamKind { matrix, embedding, head, vector };
const char* param_kind_name(ParamKind k);

struct Param {
  std::string name;  // e.g. "layers.3.attn.wq"; weights are [out, in]
  ParamKind kind = ParamKind::matrix;
  Tensor value;
  Tensor grad;
  // A shard of a logical tensor: value holds indices [shard_offset, shard_offset + value.size(shard_dim)) along
  // dimension shard_dim of a logical tensor of shard_size there; the ranks of shard_group hold the other shards,
  // consecutive in rank order. Expert parallelism shards stacks (E, n, m) by whole experts (dim 0); tensor
  // parallelism splits a matrix (n, m) by rows (column-parallel, dim 0) or columns (row-parallel, dim 1).
  // Checkpoints store the logical tensor (gathered on save, each rank reading its slice on load).
  Communicator* shard_group = nullptr;
  int shard_dim = 0;
  int64_t shard_offset = 0, shard_size = 0;  // shard_size 0: not sharded
  bool sharded() const { return shard_size > 0; }
  // A routed expert's weights (V4's experts.w1/w2/w3 stacks). Under expert or tensor parallelism each rank computes
  // them on its own tokens only, so their gradients are summed over the expert-data-parallel group
  // (parallel/topology.h), the other parameters' over the data-parallel group.
  bool routed_expert = false;
  // A shard that cuts through matrices (tensor parallelism), so that Muon has to gather it to orthogonalise the
  // whole matrix; expert shards hold whole matrices.
  bool splits_matrix() const { return sharded() && shard_dim >= value.ndim() - 2; }
  Shape logical_shape() const;
  // This shard's part of a logical host tensor (a contiguous host copy); the tensor itself if not sharded.
  Tensor slice_of(const Tensor& logical) const;
};

using ParamList = std::vector<Param*>;

// A zero-initialised parameter (value and gradient) of the given shape.
Param make_param(const std::string& name, ParamKind kind, const Shape& shape, DType dtype);

// Makes `p` this rank's part of its logical tensor: an equal part along dimension `dim` for each rank of `group`,
// in rank order (values zeroed, to be set by init or a checkpoint). Nothing to do for a parameter another pipeline
// stage holds (undefined value).
void split_param(Param& p, int dim, Communicator& group);

// Between two contiguous host tensors that agree in every dimension but `dim`: copies `small` into indices
// [offset, offset + small.size(dim)) along dim of `big` (into_big), or that part of `big` into `small`. What
// shards are cut from and joined into (parallel/shards.h).
void copy_along(const Tensor& big, int dim, int64_t offset, const Tensor& small, bool into_big);

int64_t count_elements(const ParamList& params);  // of the logical tensors (shards count whole)

}  // namespace tessera
