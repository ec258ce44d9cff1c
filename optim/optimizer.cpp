#include "optim/optimizer.h"

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

// Owner of each parameter: the least-loaded rank so far (by elements; ties to the lowest rank), in order.
std::vector<int> assign_owners(const ParamList& ps, int ranks) {
  std::vector<int64_t> load(ranks, 0);
  std::vector<int> owner;
  for (const Param* p : ps) {
    int best = 0;
    for (int r = 1; r < ranks; ++r)
      if (load[r] < load[best]) best = r;
    owner.push_back(best);
    load[best] += p->value.numel();
  }
  return owner;
}

ParamList concat(const ParamList& a, const ParamList& b) {
  ParamList out = a;
  out.insert(out.end(), b.begin(), b.end());
  return out;
}

// The entries of `list` (a part of all) whose owner (by position in all) is `rank`.
ParamList owned(const ParamList& list, const ParamList& all, const std::vector<int>& owner, int rank) {
  ParamList out;
  for (Param* p : list)
    for (size_t i = 0; i < all.size(); ++i)
      if (all[i] == p && owner[i] == rank) out.push_back(p);
  return out;
}
}  // namespace

Optimizer::Optimizer(ParamList params, const OptimizerConfig& cfg, Communicator* shard_group)
    : cfg_(cfg),
      group_(shard_group && shard_group->size() > 1 ? shard_group : nullptr),
      adamw_list_(pick(params, cfg, false)),
      muon_list_(pick(params, cfg, true)),
      owner_(group_ ? assign_owners(concat(adamw_list_, muon_list_), group_->size())
                    : std::vector<int>(adamw_list_.size() + muon_list_.size(), 0)),
      all_params_(concat(adamw_list_, muon_list_)),
      adamw_(owned(adamw_list_, all_params_, owner_, group_ ? group_->rank() : 0), cfg.adamw),
      muon_(owned(muon_list_, all_params_, owner_, group_ ? group_->rank() : 0), cfg.muon) {}

void Optimizer::step(double lr) {
  adamw_.step(lr);
  muon_.step(lr);
  if (group_) broadcast_updates();
}

// Every owner's new values to every rank: one flat buffer per owner, in parameter order.
void Optimizer::broadcast_updates() {
  for (int o = 0; o < group_->size(); ++o) {
    int64_t n = 0;
    for (size_t i = 0; i < all_params_.size(); ++i)
      if (owner_[i] == o) n += all_params_[i]->value.numel();
    if (n == 0) continue;
    const Param* first = all_params_.front();
    Tensor flat = Tensor::empty({n}, first->value.dtype(), first->value.device());
    auto walk = [&](bool pack) {
      int64_t at = 0;
      for (size_t i = 0; i < all_params_.size(); ++i) {
        if (owner_[i] != o) continue;
        const Tensor& v = all_params_[i]->value;
        TS_CHECK(v.dtype() == flat.dtype(), "sharded optimizer: parameters of mixed dtypes");
        Tensor part = flat.slice(at, v.numel());
        if (pack) part.copy_from(v.reshape({v.numel()}));
        else v.reshape({v.numel()}).copy_from(part);
        at += v.numel();
      }
    };
    if (group_->rank() == o) walk(true);
    group_->broadcast(flat, o);
    if (group_->rank() != o) walk(false);
  }
}

int64_t Optimizer::state_elements() const {
  int64_t n = 0;
  for (const State& s : state()) n += s.tensor.numel();
  return n;
}

std::vector<Optimizer::State> Optimizer::gather_state() const {
  if (!group_) return state();
  // The unsharded list, in state()'s order: (key, owner, shape) per entry.
  struct Entry {
    std::string key;
    int owner;
    const Param* p;
  };
  std::vector<Entry> entries;
  for (size_t i = 0; i < adamw_list_.size(); ++i) {
    entries.push_back({"adamw/m/" + adamw_list_[i]->name, owner_[i], adamw_list_[i]});
    entries.push_back({"adamw/v/" + adamw_list_[i]->name, owner_[i], adamw_list_[i]});
  }
  for (size_t i = 0; i < muon_list_.size(); ++i)
    entries.push_back({"muon/m/" + muon_list_[i]->name, owner_[adamw_list_.size() + i], muon_list_[i]});
  std::vector<State> mine = state(), out;
  const int me = group_->rank();
  size_t next_mine = 0;
  for (const Entry& e : entries) {
    Tensor t;
    if (e.owner == me) t = mine.at(next_mine++).tensor;
    if (e.owner != 0) {  // owners other than rank 0 send their entries to rank 0 (in this fixed order)
      if (me == e.owner) group_->send(t, 0);
      if (me == 0) {
        t = Tensor::empty(e.p->value.shape(), e.p->value.dtype(), e.p->value.device());
        group_->recv(t, e.owner);
      }
    }
    if (me == 0) out.push_back({e.key, t});
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
