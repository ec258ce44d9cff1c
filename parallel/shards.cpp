#include "parallel/shards.h"

#include <map>
#include <string>

namespace tessera {

Tensor gather_shard(const Param& p, const Tensor& local) {
  if (!p.sharded()) return local;
  Communicator& group = *p.shard_group;
  const int64_t P = group.size();
  TS_CHECK(local.is_contiguous() && local.shape() == p.value.shape() && local.size(p.shard_dim) * P == p.shard_size,
           "gather_shard: ", p.name, ": ", local.str(), " is not one of ", P, " equal shards of ",
           shape_str(p.logical_shape()));
  // The group's shards stacked in rank order (P, shard...), which along dim 0 is the logical tensor itself.
  Shape stacked = local.shape();
  stacked.insert(stacked.begin(), P);
  Tensor all = Tensor::empty(stacked, local.dtype(), local.device());
  group.all_gather(local, all);
  if (p.shard_dim == 0) return all.reshape(p.logical_shape());
  TS_CHECK(all.device() == Device::cpu, "gather_shard: ", p.name, " is split along dimension ", p.shard_dim,
           "; joining such shards is done on the host");
  Tensor whole = Tensor::empty(p.logical_shape(), local.dtype(), Device::cpu);
  const int64_t part = local.size(p.shard_dim);
  for (int64_t r = 0; r < P; ++r) copy_along(whole, p.shard_dim, r * part, all.slice(r, 1).reshape(local.shape()), true);
  return whole;
}

ParamList gather_shards(const ParamList& params, std::deque<Param>& storage) {
  ParamList out;
  for (Param* p : params) {
    if (!p->sharded()) {
      out.push_back(p);
      continue;
    }
    Param whole;
    whole.name = p->name;
    whole.kind = p->kind;
    whole.value = gather_shard(*p, p->value);
    storage.push_back(std::move(whole));
    out.push_back(&storage.back());
  }
  return out;
}

std::vector<Optimizer::State> gather_state_shards(const std::vector<Optimizer::State>& state, const ParamList& params) {
  std::map<std::string, const Param*> by_name;
  for (const Param* p : params) by_name[p->name] = p;
  std::vector<Optimizer::State> out;
  for (const Optimizer::State& s : state) {
    auto p = by_name.find(s.key.substr(s.key.rfind('/') + 1));
    const bool gather = p != by_name.end() && s.tensor.defined();
    out.push_back({s.key, gather ? gather_shard(*p->second, s.tensor) : s.tensor});
  }
  return out;
}

}  // namespace tessera
