#include "parallel/expert_parallel.h"

#include <map>
#include <string>

namespace tessera {

// The logical tensor of a shard: the group's shards are consecutive row blocks in rank order.
static Tensor gather_rows(const Tensor& shard, Communicator& group) {
  Shape shape = shard.shape();
  shape[0] *= group.size();
  Tensor whole = Tensor::empty(shape, shard.dtype(), shard.device());
  TS_CHECK(shard.is_contiguous(), "gather_shards: a shard must be contiguous");
  group.all_gather(shard, whole);
  return whole;
}

ParamList gather_shards(const ParamList& params, Communicator& group, std::deque<Param>& storage) {
  ParamList out;
  for (Param* p : params) {
    if (!p->sharded()) {
      out.push_back(p);
      continue;
    }
    TS_CHECK(p->value.size(0) * group.size() == p->shard_rows, "gather_shards: ", p->name, " has ",
             p->value.size(0), " of ", p->shard_rows, " rows on each of ", group.size(), " ranks");
    Param whole;
    whole.name = p->name;
    whole.kind = p->kind;
    whole.value = gather_rows(p->value, group);
    storage.push_back(std::move(whole));
    out.push_back(&storage.back());
  }
  return out;
}

std::vector<Optimizer::State> gather_state_shards(const std::vector<Optimizer::State>& state, const ParamList& params,
                                                  Communicator& group) {
  std::map<std::string, const Param*> by_name;
  for (const Param* p : params) by_name[p->name] = p;
  std::vector<Optimizer::State> out;
  for (const Optimizer::State& s : state) {
    auto p = by_name.find(s.key.substr(s.key.rfind('/') + 1));
    const bool shard = p != by_name.end() && p->second->sharded();
    out.push_back({s.key, shard ? gather_rows(s.tensor, group) : s.tensor});
  }
  return out;
}

}  // namespace tessera
