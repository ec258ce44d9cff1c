#include "parallel/topology.h"

namespace tessera {

namespace {
std::string fields(const ParallelConfig& c) {
  return cat("dp=", c.dp, " tp=", c.tp, " pp=", c.pp, " ep=", c.ep);
}
}  // namespace

Topology Topology::make(const ParallelConfig& cfg, int world_size) {
  const std::string where = cat("parallel config ", fields(cfg), " on world size ", world_size, ": ");
  if (world_size < 1) TS_FAIL(where, "the world size must be at least 1");
  struct Field {
    const char* name;
    int value;
  };
  const Field all[] = {{"dp", cfg.dp}, {"tp", cfg.tp}, {"pp", cfg.pp}, {"ep", cfg.ep}};
  for (const Field& f : all)
    if (f.value == 0 || f.value < -1) TS_FAIL(where, f.name, "=", f.value, " must be a positive degree or -1 (the remaining ranks)");
  std::string unknown;
  int known = 1;
  for (int i = 0; i < 3; ++i) {
    if (all[i].value == -1) {
      if (!unknown.empty()) TS_FAIL(where, "both ", unknown, " and ", all[i].name, " are -1 (at most one of dp, tp, pp may be)");
      unknown = all[i].name;
    } else {
      known *= all[i].value;
    }
  }
  Topology t;
  t.world_ = world_size;
  if (!unknown.empty()) {
    if (world_size % known != 0) {
      std::string product;
      for (int i = 0; i < 3; ++i)
        if (all[i].value != -1) product += cat(product.empty() ? "" : "*", all[i].name);
      TS_FAIL(where, product, " = ", known, " does not divide the world size ", world_size, " (", unknown, " = -1 takes the rest)");
    }
    const int rest = world_size / known;
    t.dp_ = cfg.dp == -1 ? rest : cfg.dp;
    t.tp_ = cfg.tp == -1 ? rest : cfg.tp;
    t.pp_ = cfg.pp == -1 ? rest : cfg.pp;
  } else {
    if (known != world_size)
      TS_FAIL(where, "dp*tp*pp = ", cfg.dp, "*", cfg.tp, "*", cfg.pp, " = ", known, " does not equal the world size ",
              world_size, " (set one of them to -1 to take the remaining ranks)");
    t.dp_ = cfg.dp;
    t.tp_ = cfg.tp;
    t.pp_ = cfg.pp;
  }
  const int plane = t.dp_ * t.tp_;
  t.ep_ = cfg.ep == -1 ? plane : cfg.ep;
  if (plane % t.ep_ != 0)
    TS_FAIL(where, "ep=", t.ep_, " does not divide dp*tp = ", t.dp_, "*", t.tp_, " = ", plane,
            " (expert parallel groups are carved from the dp x tp ranks of a pipeline stage)");
  return t;
}

RankCoords Topology::coords(int rank) const {
  TS_CHECK(rank >= 0 && rank < world_, "rank ", rank, " outside world size ", world_);
  RankCoords c;
  c.tp = rank % tp_;
  c.dp = (rank / tp_) % dp_;
  c.pp = rank / (tp_ * dp_);
  const int plane = c.tp + tp_ * c.dp;
  c.ep = plane % ep_;
  c.edp = plane / ep_;
  return c;
}

std::vector<int> Topology::dp_group(int rank) const {
  RankCoords c = coords(rank);
  std::vector<int> g;
  for (int d = 0; d < dp_; ++d) g.push_back(rank_of(d, c.tp, c.pp));
  return g;
}

std::vector<int> Topology::tp_group(int rank) const {
  RankCoords c = coords(rank);
  std::vector<int> g;
  for (int t = 0; t < tp_; ++t) g.push_back(rank_of(c.dp, t, c.pp));
  return g;
}

std::vector<int> Topology::pp_group(int rank) const {
  RankCoords c = coords(rank);
  std::vector<int> g;
  for (int p = 0; p < pp_; ++p) g.push_back(rank_of(c.dp, c.tp, p));
  return g;
}

std::vector<int> Topology::ep_group(int rank) const {
  RankCoords c = coords(rank);
  const int base = c.pp * dp_ * tp_ + c.edp * ep_;
  std::vector<int> g;
  for (int e = 0; e < ep_; ++e) g.push_back(base + e);
  return g;
}

std::vector<int> Topology::edp_group(int rank) const {
  RankCoords c = coords(rank);
  const int base = c.pp * dp_ * tp_ + c.ep;
  std::vector<int> g;
  for (int k = 0; k < edp(); ++k) g.push_back(base + k * ep_);
  return g;
}

std::string Topology::str() const {
  return cat("dp=", dp_, " tp=", tp_, " pp=", pp_, " ep=", ep_, " (world ", world_, ")");
}

ProcessGroups ProcessGroups::build(const Topology& topo, Communicator& world) {
  if (world.size() != topo.world_size())
    TS_FAIL("process groups for ", topo.str(), ": the world communicator has ", world.size(), " ranks");
  ProcessGroups g;
  g.topo = topo;
  g.rank = world.rank();
  g.coords = topo.coords(g.rank);
  const RankCoords& c = g.coords;
  const int plane = topo.dp() * topo.tp();
  // Colors name the group; keys are the coordinate along it (so group rank == coordinate).
  g.dp = world.split(c.pp * topo.tp() + c.tp, c.dp);
  g.tp = world.split(c.pp * topo.dp() + c.dp, c.tp);
  g.pp = world.split(c.tp + topo.tp() * c.dp, c.pp);
  g.ep = world.split(c.pp * (plane / topo.ep()) + c.edp, c.ep);
  g.edp = world.split(c.pp * topo.ep() + c.ep, c.edp);
  return g;
}

}  // namespace tessera
