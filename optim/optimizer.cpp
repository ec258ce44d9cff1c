#include "optim/optimizer.h"

#include "core/error.h"

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
}  // namespace

Optimizer::Optimizer(ParamList params, const OptimizerConfig& cfg)
    : cfg_(cfg),
      adamw_list_(pick(params, cfg, false)),
      muon_list_(pick(params, cfg, true)),
      adamw_(adamw_list_, cfg.adamw),
      muon_(muon_list_, cfg.muon) {}

void Optimizer::step(double lr) {
  adamw_.step(lr);
  muon_.step(lr);
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
  std::vector<State> s;
  for (size_t i = 0; i < adamw_list_.size(); ++i) {
    s.push_back({"adamw/m/" + adamw_list_[i]->name, adamw_.first_moments()[i]});
    s.push_back({"adamw/v/" + adamw_list_[i]->name, adamw_.second_moments()[i]});
  }
  for (size_t i = 0; i < muon_list_.size(); ++i) s.push_back({"muon/m/" + muon_list_[i]->name, muon_.momenta()[i]});
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
