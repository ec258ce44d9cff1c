// Expert parallelism (docs/parallelism.md "Expert parallelism"): the routed experts of every MoE layer are split
// by whole experts over an ep group (V4Model::set_expert_parallel), so a rank's expert stacks are shards
// (Param::sharded) of the logical tensors. What the trainer needs around that: the logical tensors for a
// checkpoint, gathered from the group's shards.
#pragma once
#include <deque>
#include <vector>

#include "model/param.h"
#include "optim/optimizer.h"
#include "parallel/communicator.h"

namespace tessera {

// `params` with every shard replaced by its logical tensor, gathered over `group` (a collective: every rank of the
// group calls it, with the same list). The gathered Params live in `storage`.
ParamList gather_shards(const ParamList& params, Communicator& group, std::deque<Param>& storage);

// Optimizer state with the entries of sharded parameters (keys RULE/MOMENT/NAME) gathered likewise.
std::vector<Optimizer::State> gather_state_shards(const std::vector<Optimizer::State>& state, const ParamList& params,
                                                  Communicator& group);

}  // namespace tessera
