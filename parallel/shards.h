// Sharded parameters (Param::sharded): expert parallelism splits the routed expert stacks by whole experts over
// the ep group (V4Model::set_expert_parallel), tensor parallelism splits matrices by rows or columns over the tp
// group (DenseModel::set_tensor_parallel, V4Model::set_tensor_parallel). What the trainer and the optimizer need around that: the logical
// tensors, gathered from the shards over each parameter's shard_group.
#pragma once
#include <deque>
#include <vector>

#include "model/param.h"
#include "optim/optimizer.h"
#include "parallel/communicator.h"

namespace tessera {

// The logical tensor of `local` (p's shard, or a tensor shaped like it: its gradient, its optimizer state),
// gathered over p.shard_group: a collective over that group. `local` itself if p is not sharded.
Tensor gather_shard(const Param& p, const Tensor& local);

// `params` with every shard replaced by its logical tensor (a collective over each shard group: every rank of a
// group calls it with the same list). The gathered Params live in `storage`.
ParamList gather_shards(const ParamList& params, std::deque<Param>& storage);

// Optimizer state with the entries of sharded parameters (keys RULE/MOMENT/NAME) gathered likewise; undefined
// entries (a sharded optimizer keeps each entry on one rank of its group: Optimizer::gather_state) stay undefined.
// The ranks of a shard group hold the same entries (they share the data-parallel or expert-data-parallel
// coordinate that decides where an entry lives), so each gather is entered by the whole group.
std::vector<Optimizer::State> gather_state_shards(const std::vector<Optimizer::State>& state, const ParamList& params);

}  // namespace tessera
