// Tensor parallelism on a dense model, under mpirun (-np 4 in ctest): tp groups of 2 and of 4 ranks (and tp 2 x
// pp 2); every rank also builds the whole model in-process as the reference. Sharded forward and backward must give
// the single-process loss and, for each rank's part of every parameter, its gradient; Muon on a shard must give
// the shard of the whole matrix's update; the clipping norm the whole model's. Split sums are summed in another
// order than one GEMM sums them, so the check is a tolerance far below any real error: a missing all-reduce or
// a shard at the wrong offset is off by O(1).
#include <gtest/gtest.h>

#include <cmath>
#include <map>
#include <memory>

#include "core/error.h"
#include "model/dense.h"
#include "parallel/mpi_communicator.h"
#include "parallel/pipeline_parallel.h"
#include "tests/parallel/shard_checks.h"

namespace tessera {
Communicator* g_world = nullptr;
namespace {

ModelConfig config() {
  ModelConfig c = testing::dense_test_config(24, 16, 4, 24, 16);
  c.n_kv_heads = 4;  // so that 4 ranks can split them
  return c;
}

// The whole model's gradients of loss/targets over `micro`, and the loss sum.
double whole_model_gradients(DenseModel& whole, const std::vector<TokenBatch>& micro, double scale) {
  whole.init(3);
  double loss = 0;
  for (const TokenBatch& b : micro) loss += whole.forward_backward(b, scale);
  return loss;
}

void expect_shard_gradients(DenseModel& part, DenseModel& whole, const std::string& where) {
  const std::map<std::string, Param*> ref = testing::by_name(whole.params());
  int sharded = 0;
  for (Param* p : part.params()) {
    sharded += p->sharded();
    EXPECT_LT(testing::relative_error(p->grad, p->slice_of(ref.at(p->name)->grad)), 1e-5) << p->name << " " << where;
  }
  EXPECT_GT(sharded, 0);
}

void check_tensor_parallel(int tp_size) {
  ASSERT_TRUE(g_world) << "run under mpirun";
  Communicator& world = *g_world;
  std::unique_ptr<Communicator> tp = world.split(world.rank() / tp_size, world.rank());
  const ModelConfig cfg = config();
  int64_t n_targets = 0;
  const std::vector<TokenBatch> micro =
      testing::micro_batches(
          2, [&](int64_t m) { return testing::random_token_batch(2, 12, cfg.vocab_size, 40 + uint64_t(m)); }, n_targets);
  const double scale = 1.0 / double(n_targets);
  DenseModel whole(cfg);
  const double whole_loss = whole_model_gradients(whole, micro, scale);

  DenseModel part(cfg);
  part.set_tensor_parallel(*tp);
  part.init(3);
  const std::map<std::string, Param*> ref = testing::by_name(whole.params());
  for (Param* p : part.params())  // init draws the whole tensor and keeps this rank's part
    EXPECT_EQ(testing::relative_error(p->value, p->slice_of(ref.at(p->name)->value)), 0.0) << p->name;
  double loss = 0;
  for (const TokenBatch& b : micro) loss += part.forward_backward(b, scale);
  EXPECT_NEAR(loss, whole_loss, 1e-5 * std::abs(whole_loss));
  EXPECT_NEAR(part.forward(micro[0]), whole.forward(micro[0]), 1e-5 * std::abs(whole_loss));
  expect_shard_gradients(part, whole, "at tp " + std::to_string(tp_size));

  testing::expect_clipping_and_muon_on_parts(part.params(), whole.params(), 1e-5, "");
}

TEST(TensorParallel, TwoRanks) { check_tensor_parallel(2); }
TEST(TensorParallel, FourRanks) { check_tensor_parallel(4); }

// tp 2 x pp 2: rank = tp + 2 pp; each stage's shards against the whole model, through the 1F1B schedule.
TEST(TensorParallel, WithPipelineStages) {
  ASSERT_TRUE(g_world && g_world->size() == 4) << "run under mpirun -np 4";
  Communicator& world = *g_world;
  std::unique_ptr<Communicator> tp = world.split(world.rank() / 2, world.rank());
  std::unique_ptr<Communicator> pp = world.split(world.rank() % 2, world.rank());
  const ModelConfig cfg = config();
  int64_t n_targets = 0;
  const std::vector<TokenBatch> micro =
      testing::micro_batches(
          4, [&](int64_t m) { return testing::random_token_batch(2, 12, cfg.vocab_size, 70 + uint64_t(m)); }, n_targets);
  const double scale = 1.0 / double(n_targets);
  DenseModel whole(cfg);
  const double whole_loss = whole_model_gradients(whole, micro, scale);

  DenseModel stage(cfg);
  stage.set_pipeline_stage(pp->rank(), pp->size());
  stage.set_tensor_parallel(*tp);
  stage.init(3);
  OneFOneB schedule(stage, *pp, micro, 0, 4, scale);
  for (int64_t m = 0; m < 4; ++m) schedule.run_through_backward(m);
  if (pp->rank() == 1) {
    EXPECT_NEAR(schedule.loss_sum(), whole_loss, 1e-5 * std::abs(whole_loss));
  }
  expect_shard_gradients(stage, whole, "at tp 2 x pp 2, stage " + std::to_string(pp->rank()));
}

TEST(TensorParallel, IndivisibleHeadsAreAnError) {
  ASSERT_TRUE(g_world) << "run under mpirun";
  std::unique_ptr<Communicator> tp = g_world->split(0, g_world->rank());  // all 4 ranks
  ModelConfig cfg = config();
  cfg.n_kv_heads = 2;
  DenseModel m(cfg);
  EXPECT_NE(testing::error_of([&] { m.set_tensor_parallel(*tp); })
                .find("model.n_kv_heads (2) must be a multiple of parallel.tp (4)"),
            std::string::npos);
}

}  // namespace
}  // namespace tessera

#include "tests/parallel/mpi_gtest_main.h"
