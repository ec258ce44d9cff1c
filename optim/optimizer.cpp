#include "optim/optimizer.h"

#include <map>

#include "core/error.h"
#include "parallel/communicator.h"

namespace tessera {

void split_param_groups(const ParamList& params, const OptimizerConfig& cfg, ParamList& adamw, ParamList& muon) {
  if (cfg.name != "adamw" && cfg.name != "muon")
    TS_FAIL("optimizer.name: unknown '", cfg.name, "' (adamw, muon)");
  for (Param* p : params) {
    bool to_muon = cfg.name == "muon" && p->kind == ParamKind::matrix;
    for (const std::string& s : cfg.adamw_params)
      if (p->name.find(s) != std::string::npos) to_muon = false;
    (to_muon ? muon : adamw).push_back(p);
  }
}

namespace {
ParamList pick(const ParamList& params, const OptimizerConfig& cfg, bool muon) {
  ParamList a, m;
  split_param_groups(params, cfg, a, m);
  return muon ? m : a;
}

ParamList concat(const ParamList& a, const ParamList& b) {
  ParamList out = a;
  out.insert(out.end(), b.begin(), b.end());
  return out;
}

}  // namespace

Optimizer::Optimizer(ParamList params, const OptimizerConfig& cfg, Communicator* shard_group,
                     Communicator* expert_group)
    : cfg_(cfg),
      group_(shard_group && shard_group->size() > 1 ? shard_group : nullptr),
      expert_group_(expert_group && expert_group->size() > 1 ? expert_group : nullptr),
      experts_apart_(expert_group != nullptr),
      adamw_list_(pick(params, cfg, false)),
      muon_list_(pick(params, cfg, true)),
      all_params_(concat(adamw_list_, muon_list_)),
      owner_(assign_owners()),
      adamw_(owned(adamw_list_), cfg.adamw),
      muon_(owned(muon_list_), cfg.muon) {}

// Routed experts given an expert group are replicated over it (the ranks holding the same experts; their state
// unsharded when it has one rank); tensor-parallel shards, like whole parameters, over the data-parallel group
// (each tp rank's group owns the same parameters: equal shard sizes).
Communicator* Optimizer::group_for(const Param* p) const {
  return p->routed_expert && experts_apart_ ? expert_group_ : group_;
}

// Owner of each parameter within its group: the least-loaded rank so far (by elements; ties to the lowest rank),
// in parameter order; 0 for a parameter whose state is not sharded.
std::vector<int> Optimizer::assign_owners() const {
  std::map<const Communicator*, std::vector<int64_t>> load;
  std::vector<int> owner;
  for (const Param* p : all_params_) {
    const Communicator* g = group_for(p);
    if (!g) {
      owner.push_back(0);
      continue;
    }
    std::vector<int64_t>& l = load[g];
    l.resize(g->size(), 0);
    int best = 0;
    for (int r = 1; r < g->size(); ++r)
      if (l[r] < l[best]) best = r;
    owner.push_back(best);
    l[best] += p->value.numel();
  }
  return owner;
}

bool Optimizer::owns(size_t i) const {
  const Communicator* g = group_for(all_params_[i]);
  return owner_[i] == (g ? g->rank() : 0);
}

ParamList Optimizer::owned(const ParamList& list) const {
  ParamList out;
  for (Param* p : list)
    for (size_t i = 0; i < all_params_.size(); ++i)
      if (all_params_[i] == p && owns(i)) out.push_back(p);
  return out;
}

void Optimizer::step(double lr) {
  adamw_.step(lr);
  muon_.step(lr);
  if (sharded()) broadcast_updates();
}

// Every owner's new values to every rank of its group: one flat buffer per owner, in parameter order.
void Optimizer::broadcast_updates() {
  for (Communicator* g : {group_, expert_group_}) {
    if (!g) continue;
    for (int o = 0; o < g->size(); ++o) {
      std::vector<size_t> mine;  // the parameters of group g that o owns
      int64_t n = 0;
      for (size_t i = 0; i < all_params_.size(); ++i)
        if (group_for(all_params_[i]) == g && owner_[i] == o) mine.push_back(i), n += all_params_[i]->value.numel();
      if (n == 0) continue;
      const Param* first = all_params_[mine.front()];
      Tensor flat = Tensor::empty({n}, first->value.dtype(), first->value.device());
      auto walk = [&](bool pack) {
        int64_t at = 0;
        for (size_t i : mine) {
          const Tensor& v = all_params_[i]->value;
          TS_CHECK(v.dtype() == flat.dtype(), "sharded optimizer: parameters of mixed dtypes");
          Tensor part = flat.slice(at, v.numel());
          if (pack) part.copy_from(v.reshape({v.numel()}));
          else v.reshape({v.numel()}).copy_from(part);
          at += v.numel();
        }
      };
      if (g->rank() == o) walk(true);
      g->broadcast(flat, o);
      if (g->rank() != o) walk(false);
    }
  }
}

int64_t Optimizer::state_elements() const {
  int64_t n = 0;
  for (const State& s : state()) n += s.tensor.numel();
  return n;
}

std::vector<Optimizer::State> Optimizer::gather_state() const {
  if (!sharded()) return state();
  // The unsharded list, in state()'s order: (key, parameter index) per entry.
  std::vector<std::pair<std::string, size_t>> entries;
  for (size_t i = 0; i < adamw_list_.size(); ++i) {
    entries.push_back({"adamw/m/" + adamw_list_[i]->name, i});
    entries.push_back({"adamw/v/" + adamw_list_[i]->name, i});
  }
  for (size_t i = 0; i < muon_list_.size(); ++i)
    entries.push_back({"muon/m/" + muon_list_[i]->name, adamw_list_.size() + i});
  std::vector<State> mine = state(), out;
  size_t next_mine = 0;
  // Every rank walks the entries in this one order, so the sends to each group's rank 0 pair up in sequence.
  for (const auto& [key, i] : entries) {
    Communicator* g = group_for(all_params_[i]);
    const int me = g ? g->rank() : 0;
    Tensor t;
    if (owner_[i] == me) t = mine.at(next_mine++).tensor;
    if (g && owner_[i] != 0) {  // owners other than the group's rank 0 send their entries to it
      if (me == owner_[i]) g->send(t, 0);
      if (me == 0) {
        const Tensor& v = all_params_[i]->value;
        t = Tensor::empty(v.shape(), v.dtype(), v.device());
        g->recv(t, owner_[i]);
      }
    }
    out.push_back({key, me == 0 ? t : Tensor()});
  }
  return out;
}

void Optimizer::set_steps_taken(int64_t s) {
  adamw_.set_steps_taken(s);
  muon_.set_steps_taken(s);
}

bool Optimizer::uses_muon(const Param& p) const {
  for (const Param* q : muon_list_)
    if (q == &p) return true;
  return false;
}

std::string Optimizer::describe_groups() const {
  auto group = [](const char* name, const ParamList& ps) {
    std::string names;
    for (const Param* p : ps) names += (names.empty() ? "" : ", ") + p->name;
    return cat(name, ": ", ps.size(), " tensors, ", count_elements(ps), " parameters", ps.empty() ? "" : " (",
               names, ps.empty() ? "" : ")");
  };
  return group("muon", muon_list_) + "\n" + group("adamw", adamw_list_);
}

std::vector<Optimizer::State> Optimizer::state() const {
  std::vector<State> s;  // the parameters this rank updates (all of them unsharded), in the logical order
  const ParamList &a = adamw_.params(), &m = muon_.params();
  for (size_t i = 0; i < a.size(); ++i) {
    s.push_back({"adamw/m/" + a[i]->name, adamw_.first_moments()[i]});
    s.push_back({"adamw/v/" + a[i]->name, adamw_.second_moments()[i]});
  }
  for (size_t i = 0; i < m.size(); ++i) s.push_back({"muon/m/" + m[i]->name, muon_.momenta()[i]});
  return s;
}

Optimizer::Snapshot Optimizer::snapshot() const {
  Snapshot s;
  for (const State& st : state()) s.tensors.push_back(st.tensor.clone());
  s.adamw_steps = adamw_.steps_taken();
  s.muon_steps = muon_.steps_taken();
  return s;
}

void Optimizer::restore(const Snapshot& s) {
  std::vector<State> now = state();
  TS_CHECK(now.size() == s.tensors.size(), "optimizer snapshot of ", s.tensors.size(), " tensors, the optimizer has ",
           now.size());
  for (size_t i = 0; i < now.size(); ++i) now[i].tensor.copy_from(s.tensors[i]);  // shares the moment's storage
  adamw_.set_steps_taken(s.adamw_steps);
  muon_.set_steps_taken(s.muon_steps);
}

}  // namespace tessera
