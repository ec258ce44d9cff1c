// Tensor parallelism on the tiny V4 model, under mpirun (-np 4 in ctest): tp groups of 2 and of 4 ranks, tp 2 with
// expert parallelism over the same ranks, and tp 2 x pp 2; every rank also builds the whole model in-process as
// the reference. Split heads, indexer heads, shared-expert hidden units and vocabulary, replicated mHC, and routed
// experts that compute a slice of the tokens on each rank must give the single-process losses, statistics and
// expert loads and, for each rank's part of every parameter, its gradient (the routed experts' summed over the
// ranks, as the trainer's expert-data-parallel all-reduce does). In f64: split sums are summed in another order than
// one GEMM sums them, and some gradients (the mHC gates') are small sums of large terms, whose f32 rounding alone
// reaches 5e-5 of them; in f64 the check is 1e-9, far below any real error (a missing all-reduce or a shard at
// the wrong offset is off by O(1)).
#include <gtest/gtest.h>

#include <cstring>
#include <map>
#include <memory>

#include "core/error.h"
#include "parallel/mpi_communicator.h"
#include "parallel/pipeline_parallel.h"
#include "tests/parallel/shard_checks.h"
#include "tests/unit/v4_test_model.h"

namespace tessera {
Communicator* g_world = nullptr;
namespace {

// The tiny V4 model with every split dimension divisible by 4 (and the indexer still selecting 3 of the visible
// entries, so that the top-k runs on the scores summed over the ranks).
ModelConfig config() {
  ModelConfig c = testing::tiny_v4_config();
  c.vocab_size = 64;
  c.o_groups = 4;
  c.index_n_heads = 4;
  c.n_routed_experts = 8;
  return c;
}

// The reference's values (parameters and buffers) in the split model: each rank its part.
void copy_values(V4Model& from, V4Model& to) {
  std::map<std::string, Param*> ref = testing::by_name(from.saved_tensors());
  for (Param* p : to.saved_tensors()) p->value.copy_from(p->slice_of(ref.at(p->name)->value));
}

struct TrainedRun {
  std::vector<double> losses;
  V4Model::Stats stats;  // of the last micro-batch
  std::vector<std::vector<int64_t>> loads;
};

// Losses and gradients (pairwise over the micro-batches, as the trainer sums them) of micro-batches [0, M).
TrainedRun train(V4Model& model, const std::vector<TokenBatch>& micro, double scale) {
  TrainedRun r;
  GradientStack stack;
  pairwise_gradients(model, 0, int64_t(micro.size()), stack, [&](int64_t m) {
    r.losses.push_back(model.forward_backward(micro[m], scale));
    r.stats = model.last_stats();
  });
  r.loads = model.expert_load();
  return r;
}

std::vector<TokenBatch> batches(const ModelConfig& cfg, int64_t M, uint64_t seed, double& scale) {
  int64_t n_targets = 0;
  std::vector<TokenBatch> micro = testing::micro_batches(
      M, [&](int64_t m) { return testing::tiny_v4_batch(cfg.vocab_size, seed + uint64_t(m)); }, n_targets);
  scale = 1.0 / double(n_targets);
  return micro;
}

void expect_same_run(const TrainedRun& got, const TrainedRun& want, const std::string& where) {
  ASSERT_EQ(got.losses.size(), want.losses.size());
  for (size_t m = 0; m < got.losses.size(); ++m)
    EXPECT_NEAR(got.losses[m], want.losses[m], 1e-9 * std::abs(want.losses[m])) << "micro-batch " << m << where;
  const V4Model::Stats &a = got.stats, &b = want.stats;
  EXPECT_NEAR(a.mtp_loss_sum, b.mtp_loss_sum, 1e-9 * std::abs(b.mtp_loss_sum)) << where;
  EXPECT_NEAR(a.balance_loss, b.balance_loss, 1e-9 * std::abs(b.balance_loss)) << where;
  EXPECT_NEAR(a.indexer_kl_sum, b.indexer_kl_sum, 1e-9 * std::abs(b.indexer_kl_sum)) << where;
  ASSERT_EQ(a.swiglu_input_max_abs.size(), b.swiglu_input_max_abs.size());
  for (size_t l = 0; l < a.swiglu_input_max_abs.size(); ++l) {
    EXPECT_NEAR(a.swiglu_input_max_abs[l], b.swiglu_input_max_abs[l], 1e-9 * b.swiglu_input_max_abs[l])
        << "SwiGLU input maximum of MoE layer " << l << where;
    EXPECT_NEAR(a.router_logit_max[l], b.router_logit_max[l], 1e-9 * std::abs(b.router_logit_max[l]))
        << "router logit maximum of MoE layer " << l << where;
  }
  EXPECT_EQ(got.loads, want.loads) << where;
}

// The gradients of the replicated parameters are bitwise the same on every rank of `tp`: nothing re-synchronises
// them, so any difference would grow step by step (the routed experts' partial sums over token slices excepted).
void expect_replicated_gradients_equal(V4Model& part, Communicator& tp, const std::string& where) {
  for (Param* p : part.params()) {
    if (p->sharded() || p->routed_expert) continue;
    const int64_t n = p->grad.numel();
    Tensor all = Tensor::empty({tp.size() * n}, p->grad.dtype());
    tp.all_gather(p->grad.reshape({n}), all);
    const size_t bytes = size_t(n) * dtype_size(p->grad.dtype());
    for (int r = 0; r < tp.size(); ++r)
      EXPECT_EQ(std::memcmp(static_cast<const char*>(all.raw()) + r * bytes, p->grad.raw(), bytes), 0)
          << p->name << " differs between tp ranks " << r << " and " << tp.rank() << where;
  }
}

// Each rank's part of every gradient against the whole model's; the routed experts' gradients first summed over
// `expert_sum` (the ranks that computed other tokens for the same experts), when given.
void expect_shard_gradients(V4Model& part, V4Model& whole, Communicator* expert_sum, double tolerance,
                            const std::string& where) {
  std::map<std::string, Param*> ref = testing::by_name(whole.params());
  int split = 0;
  for (Param* p : part.params()) {
    split += p->sharded();
    if (p->routed_expert && expert_sum) expert_sum->all_reduce(p->grad);
    EXPECT_LT(testing::relative_error(p->grad, p->slice_of(ref.at(p->name)->grad)), tolerance) << p->name << where;
  }
  EXPECT_GT(split, 0);
}

// tp over consecutive blocks of tp_size ranks; with_ep: expert parallelism over the same ranks.
void check_tensor_parallel(int tp_size, bool with_ep) {
  ASSERT_TRUE(g_world) << "run under mpirun";
  Communicator& world = *g_world;
  std::unique_ptr<Communicator> tp = world.split(world.rank() / tp_size, world.rank());
  std::unique_ptr<Communicator> ep = with_ep ? world.split(world.rank() / tp_size, world.rank()) : nullptr;
  const ModelConfig cfg = config();
  double scale = 0;
  const std::vector<TokenBatch> micro = batches(cfg, 2, 40, scale);
  const std::string where = cat(" at tp ", tp_size, with_ep ? " with ep over the same ranks" : "");

  V4Model whole(cfg, DType::f64);
  testing::randomize_v4(whole, 7);
  const TrainedRun want = train(whole, micro, scale);

  V4Model part(cfg, DType::f64);
  part.set_tensor_parallel(*tp);
  if (ep) part.set_expert_parallel(*ep);
  copy_values(whole, part);
  const TrainedRun got = train(part, micro, scale);
  expect_same_run(got, want, where);
  expect_replicated_gradients_equal(part, *tp, where);
  // Without expert parallelism every rank holds every expert and computed its slice of the tokens.
  expect_shard_gradients(part, whole, ep ? nullptr : tp.get(), 1e-9, where);
  // Evaluation (no backward) agrees too.
  EXPECT_NEAR(part.forward(micro[0]), whole.forward(micro[0]), 1e-9 * std::abs(want.losses[0])) << where;

  testing::expect_clipping_and_muon_on_parts(part.params(), whole.params(), 1e-9, where);
}

TEST(TensorParallelV4, TwoRanks) { check_tensor_parallel(2, false); }
TEST(TensorParallelV4, FourRanks) { check_tensor_parallel(4, false); }
TEST(TensorParallelV4, TwoRanksWithExpertParallelism) { check_tensor_parallel(2, true); }

// tp 2 x pp 2: rank = tp + 2 pp; each stage's parts against the whole model, through the 1F1B schedule (the V4
// stages recompute a forward whose backward comes later). The stages exchange f32 tensors, so this case runs in
// f32, where the mHC gates' gradients carry rounding up to 5e-5 of their largest value: checked within 1e-4.
TEST(TensorParallelV4, WithPipelineStages) {
  ASSERT_TRUE(g_world && g_world->size() == 4) << "run under mpirun -np 4";
  Communicator& world = *g_world;
  std::unique_ptr<Communicator> tp = world.split(world.rank() / 2, world.rank());
  std::unique_ptr<Communicator> pp = world.split(world.rank() % 2, world.rank());
  const ModelConfig cfg = config();
  double scale = 0;
  const std::vector<TokenBatch> micro = batches(cfg, 4, 70, scale);
  V4Model whole(cfg);
  testing::randomize_v4(whole, 7);
  const TrainedRun want = train(whole, micro, scale);

  V4Model stage(cfg);
  stage.set_pipeline_stage(pp->rank(), {2, 2});
  stage.set_tensor_parallel(*tp);
  copy_values(whole, stage);
  OneFOneB schedule(stage, *pp, micro, 0, 4, scale);
  for (int64_t m = 0; m < 4; ++m) schedule.run_through_backward(m);
  if (pp->rank() == 1) {
    double whole_sum = 0;
    for (double l : want.losses) whole_sum += l;
    EXPECT_NEAR(schedule.loss_sum(), whole_sum, 1e-6 * std::abs(whole_sum));
  }
  expect_replicated_gradients_equal(stage, *tp, cat(" at tp 2 x pp 2, stage ", pp->rank()));
  expect_shard_gradients(stage, whole, tp.get(), 1e-4, cat(" at tp 2 x pp 2, stage ", pp->rank()));
}

TEST(TensorParallelV4, IndivisibleGroupsAreAnError) {
  ASSERT_TRUE(g_world) << "run under mpirun";
  std::unique_ptr<Communicator> tp = g_world->split(0, g_world->rank());  // all 4 ranks
  ModelConfig cfg = config();
  cfg.o_groups = 2;
  V4Model m(cfg);
  EXPECT_NE(testing::error_of([&] { m.set_tensor_parallel(*tp); })
                .find("model.o_groups (2) must be a multiple of parallel.tp (4)"),
            std::string::npos);
}

}  // namespace
}  // namespace tessera

#include "tests/parallel/mpi_gtest_main.h"
