// The training optimizer: AdamW alone, or V4's hybrid of Muon for the hidden matrices and AdamW for the rest.
// Group rule (docs/optimizer.md): a parameter of kind `matrix` (2-D matrices, and 3-D stacks of independent
// matrices: routed experts, grouped output projections) goes to Muon; the embedding, the output head and every
// vector (norm weights, mHC biases and gating factors, attention sinks, compressor positional biases) to AdamW.
// `adamw_params` in the recipe moves matching matrices (by name substring) to AdamW.
#pragma once
#include <string>
#include <vector>

#include "optim/adamw.h"
#include "optim/muon.h"

namespace tessera {

struct OptimizerConfig {
  std::string name = "adamw";  // "adamw" (every parameter) or "muon" (the hybrid)
  AdamWConfig adamw;
  MuonConfig muon;
  std::vector<std::string> adamw_params;  // name substrings that stay on AdamW under "muon"
};

class Communicator;

// Sharded mode (ZeRO-1 with whole parameters as the unit; docs/parallelism.md): given a data-parallel group,
// each parameter gets one owner rank (greedy by size, in parameter order, the same on every rank); a rank keeps
// optimizer state only for the parameters it owns and updates only those, so Muon's whole-matrix Newton-Schulz
// work is spread over the ranks too (distributed Muon), and every rank then receives the owners' new values
// (one broadcast per owner). Each parameter's update is the same computation as unsharded: bitwise identical.
class Optimizer {
 public:
  // `expert_group`: with sharding under expert or tensor parallelism, the group that shards the state of the routed
  // experts (Param::routed_expert): the ranks holding the same experts (the expert-data-parallel group).
  Optimizer(ParamList params, const OptimizerConfig& cfg, Communicator* shard_group = nullptr,
            Communicator* expert_group = nullptr);
  // One update of every parameter at learning rate lr (Muon uses the same lr, as V4's Algorithm 1). Sharded: a
  // collective over the group.
  void step(double lr);
  int64_t steps_taken() const { return adamw_.steps_taken(); }
  void set_steps_taken(int64_t s);
  const OptimizerConfig& config() const { return cfg_; }
  // Which parameters each rule updates, for the start-of-run log: "muon: 12 tensors (1.2M) ...".
  std::string describe_groups() const;
  bool uses_muon(const Param& p) const;

  // Optimizer state for checkpoints: (key, tensor) with keys "adamw/m/<name>", "adamw/v/<name>",
  // "muon/m/<name>". Sharded: the entries of this rank's parameters only (loading a checkpoint reads those).
  struct State {
    std::string key;
    Tensor tensor;
  };
  std::vector<State> state() const;
  // The whole state in unsharded order, for saving: a collective over the groups when sharded, which gives each
  // entry to its group's rank 0 (other ranks get the entry with an undefined tensor); otherwise state().
  std::vector<State> gather_state() const;
  bool sharded() const { return group_ != nullptr || expert_group_ != nullptr; }
  // Elements of optimizer state this rank holds (the memory ZeRO-1 saves is the rest).
  int64_t state_elements() const;

  // An in-memory copy of the whole optimizer state (every tensor of state() and the step counts), for the
  // trainer's rollback on a loss spike: restore(snapshot()) puts the optimizer back exactly.
  struct Snapshot {
    std::vector<Tensor> tensors;  // in the order of state()
    int64_t adamw_steps = 0, muon_steps = 0;
  };
  Snapshot snapshot() const;
  void restore(const Snapshot& s);

 private:
  OptimizerConfig cfg_;
  Communicator* group_ = nullptr;         // shards the state of replicated parameters
  Communicator* expert_group_ = nullptr;  // shards the state of the routed experts
  bool experts_apart_ = false;            // an expert group was given (even of one rank): experts use it
  ParamList adamw_list_, muon_list_;  // every parameter (the logical groups)
  ParamList all_params_;              // adamw_list_ then muon_list_
  std::vector<int> owner_;            // per parameter of all_params_: its owner's rank in group_for(it)
  AdamW adamw_;                       // over the adamw_list_ entries this rank owns
  Muon muon_;                         // likewise for muon_list_
  void broadcast_updates();
  Communicator* group_for(const Param* p) const;  // nullptr: this rank keeps the parameter's whole state
  std::vector<int> assign_owners() const;
  bool owns(size_t i) const;  // of all_params_
  ParamList owned(const ParamList& list) const;
};

// Splits params by the rule above.
void split_param_groups(const ParamList& params, const OptimizerConfig& cfg, ParamList& adamw, ParamList& muon);

}  // namespace tessera
