// Process groups for DP x PP x TP, with EP carved from the DP x TP ranks of each pipeline stage (Megatron's
// "parallel folding").
//
// Rank order: tp fastest, then dp, then pp:  rank = tp + TP * (dp + DP * pp).
// The DP x TP plane of stage pp holds the TP*DP consecutive ranks [pp*DP*TP, (pp+1)*DP*TP); a rank's position
// in it is plane = tp + TP * dp. EP groups are consecutive blocks of `ep` ranks of the plane: ep group
// plane / EP, index in it (the "ep rank", which decides the experts a rank holds) plane % EP. The expert data
// parallel group (EDP, size DP*TP/EP) is the ranks of one stage with the same ep rank: they hold the same
// experts and average those experts' gradients.
//
// Every group's communicator orders its ranks by global rank, so a rank's rank in its dp / tp / pp / ep / edp
// group is its dp / tp / pp / ep / edp coordinate.
#pragma once
#include <memory>
#include <string>
#include <vector>

#include "parallel/communicator.h"

namespace tessera {

// -1 = "the remaining ranks": at most one of dp, tp, pp may be -1 (it becomes world / product of the others);
// ep = -1 means the whole DP x TP plane (ep = dp * tp).
struct ParallelConfig {
  int dp = -1, tp = 1, pp = 1, ep = 1;
};

struct RankCoords {
  int dp = 0, tp = 0, pp = 0;
  int ep = 0;   // index within the ep group (which experts)
  int edp = 0;  // index of the ep group within the stage's plane (= rank in the expert data parallel group)
};

class Topology {
 public:
  // Resolves -1 and validates: every degree >= 1 (or -1), at most one -1 among dp/tp/pp, dp*tp*pp == world
  // size, ep divides dp*tp. Throws tessera::Error naming the offending fields and the world size.
  static Topology make(const ParallelConfig& cfg, int world_size);

  int world_size() const { return world_; }
  int dp() const { return dp_; }
  int tp() const { return tp_; }
  int pp() const { return pp_; }
  int ep() const { return ep_; }
  int edp() const { return dp_ * tp_ / ep_; }  // size of an expert data parallel group

  int rank_of(int dp, int tp, int pp) const { return tp + tp_ * (dp + dp_ * pp); }
  RankCoords coords(int rank) const;

  // The global ranks of `rank`'s groups, ascending.
  std::vector<int> dp_group(int rank) const;
  std::vector<int> tp_group(int rank) const;
  std::vector<int> pp_group(int rank) const;
  std::vector<int> ep_group(int rank) const;
  std::vector<int> edp_group(int rank) const;

  std::string str() const;  // "dp=2 tp=2 pp=2 ep=2 (world 8)"

 private:
  int world_ = 1, dp_ = 1, tp_ = 1, pp_ = 1, ep_ = 1;
};

// This rank's communicators for a topology, split from the world (a collective: every rank calls it).
struct ProcessGroups {
  Topology topo;
  int rank = 0;  // in the world
  RankCoords coords;
  std::unique_ptr<Communicator> dp, tp, pp, ep, edp;

  static ProcessGroups build(const Topology& topo, Communicator& world);
};

}  // namespace tessera
