// Pipeline parallelism on a 4-layer dense model, under mpirun (-np 4 in ctest): the ranks are the stages of one
// pipeline (pp = 4), or two pipelines of 2 stages; every rank also builds the whole model in-process as the
// reference. The 1F1B schedule over M micro-batches (more than the stages, and fewer) must give each stage's
// parameter gradients and the loss bitwise equal to the single-process pairwise sum, and a forward-only pass the
// same loss.
#include <gtest/gtest.h>

#include <memory>

#include "core/error.h"
#include "model/dense.h"
#include "model/v4.h"
#include "optim/adamw.h"
#include "parallel/data_parallel.h"
#include "parallel/mpi_communicator.h"
#include "parallel/pipeline_parallel.h"
#include "tests/unit/test_util.h"
#include "tests/unit/v4_test_model.h"

namespace tessera {
Communicator* g_world = nullptr;
namespace {


ModelConfig four_layers() { return testing::dense_test_config(23, 16, 4, 24, 16); }

// Every gradient of the stage's parameters bitwise equal to the whole model's of the same name; the stage holds
// fewer parameters than the whole model.
void expect_stage_gradients(Model& stage, Model& whole, int rank) {
  std::map<std::string, Param*> ref;
  for (Param* p : whole.params()) ref[p->name] = p;
  ParamList mine = stage.params();
  EXPECT_LT(mine.size(), ref.size());
  for (Param* p : mine) {
    std::vector<double> got = testing::values_of(p->grad), want = testing::values_of(ref.at(p->name)->grad);
    ASSERT_EQ(got.size(), want.size()) << p->name;
    int64_t diff = 0;
    for (size_t k = 0; k < got.size(); ++k) diff += got[k] != want[k];
    EXPECT_EQ(diff, 0) << p->name << " on stage " << rank << ": " << diff << " elements differ";
  }
}

// The single-process reference: the model initialised from seed 3, its gradients summed over `micro` in the
// pairwise tree; returns the loss sum.
double one_process_gradients(DenseModel& whole, const std::vector<TokenBatch>& micro, double scale) {
  whole.init(3);
  GradientStack stack;
  double loss = 0;
  pairwise_gradients(whole, 0, int64_t(micro.size()), stack,
                     [&](int64_t m) { loss += whole.forward_backward(micro[size_t(m)], scale); });
  return loss;
}

void check_against_one_process(int stages, int64_t M) {
  ASSERT_TRUE(g_world) << "run under mpirun";
  Communicator& world = *g_world;
  std::unique_ptr<Communicator> pp = world.split(world.rank() / stages, world.rank());
  const ModelConfig cfg = four_layers();
  int64_t n_targets = 0;
  const std::vector<TokenBatch> micro =
      testing::micro_batches(
          M, [&](int64_t m) { return testing::random_token_batch(2, 12, cfg.vocab_size, 40 + uint64_t(m)); }, n_targets);
  const double scale = 1.0 / double(n_targets);

  DenseModel whole(cfg);
  const double whole_loss = one_process_gradients(whole, micro, scale);

  DenseModel stage(cfg);
  stage.set_pipeline_stage(pp->rank(), pp->size());
  stage.init(3);
  OneFOneB schedule(stage, *pp, micro, 0, M, scale);
  GradientStack stack2;
  pairwise_gradients(stage, 0, M, stack2, [&](int64_t m) { schedule.run_through_backward(m); });
  if (pp->rank() == pp->size() - 1) EXPECT_EQ(schedule.loss_sum(), whole_loss);
  else EXPECT_EQ(schedule.loss_sum(), 0.0);

  expect_stage_gradients(stage, whole, pp->rank());
  EXPECT_EQ(pipeline_forward_loss(stage, *pp, micro[0]), whole.forward(micro[0]));
}

TEST(PipelineParallel, FourStagesSixMicroBatches) { check_against_one_process(4, 6); }
TEST(PipelineParallel, FourStagesTwoMicroBatches) { check_against_one_process(4, 2); }  // all warm-up, no steady
TEST(PipelineParallel, TwoStagesFourMicroBatches) { check_against_one_process(2, 4); }

// Every split of L layers into P non-empty consecutive stages, by brute force: the smallest costliest stage and,
// among those, the smallest sum of squared stage costs.
std::pair<double, double> best_split_by_enumeration(const std::vector<double>& cost, int P) {
  const int L = int(cost.size());
  std::pair<double, double> best{1e300, 1e300};
  for (uint32_t cuts = 0; cuts < (1u << (L - 1)); ++cuts) {  // bit i: a stage ends after layer i
    if (__builtin_popcount(cuts) != P - 1) continue;
    double worst = 0, squares = 0, run = 0;
    for (int l = 0; l < L; ++l) {
      run += cost[l];
      if (l == L - 1 || (cuts >> l & 1)) worst = std::max(worst, run), squares += run * run, run = 0;
    }
    best = std::min(best, std::pair{worst, squares});
  }
  return best;
}

TEST(PipelineParallel, StagesBalancedByCost) {
  // Hand-worked: equal layers split equally; a head costing 2.5 layers leaves the last stage one layer.
  EXPECT_EQ(balance_pipeline_stages({1, 1, 1, 1}, 2), (std::vector<int64_t>{2, 2}));
  EXPECT_EQ(balance_pipeline_stages({1, 1, 1, 3.5}, 2), (std::vector<int64_t>{3, 1}));
  EXPECT_EQ(balance_pipeline_stages({1, 1, 1, 1, 1, 1, 1, 2}, 4), (std::vector<int64_t>{2, 2, 2, 2}));
  EXPECT_EQ(balance_pipeline_stages({1, 1, 1, 1, 1, 1, 2}, 4), (std::vector<int64_t>{2, 2, 2, 1}));
  EXPECT_EQ(balance_pipeline_stages({5, 1, 1, 1, 1, 1}, 2), (std::vector<int64_t>{1, 5}));
  // Random costs against enumeration: every stage non-empty, all layers placed, the optimum reached.
  uint64_t state = 12345;
  for (int trial = 0; trial < 200; ++trial) {
    const int L = 1 + int(trial % 10), P = 1 + int(trial / 10 % L);
    std::vector<double> cost;
    for (int l = 0; l < L; ++l) {
      state = state * 6364136223846793005ull + 1442695040888963407ull;
      cost.push_back(double(state >> 40 & 1023) + 1);
    }
    const std::vector<int64_t> layers = balance_pipeline_stages(cost, P);
    ASSERT_EQ(int(layers.size()), P);
    double worst = 0, squares = 0;
    int64_t at = 0;
    for (int64_t n : layers) {
      ASSERT_GE(n, 1);
      double run = 0;
      for (int64_t l = at; l < at + n; ++l) run += cost[l];
      worst = std::max(worst, run), squares += run * run, at += n;
    }
    EXPECT_EQ(at, L);
    EXPECT_EQ(std::pair(worst, squares), best_split_by_enumeration(cost, P)) << "trial " << trial;
  }
  EXPECT_NE(testing::error_of([] { balance_pipeline_stages({1, 1}, 3); })
                .find("parallel.pp (3) must not exceed model.n_layers (2)"),
            std::string::npos);
}

// An uneven split (3 + 1 layers) through 1F1B: bitwise the single process as the equal split.
TEST(PipelineParallel, UnevenStages) {
  ASSERT_TRUE(g_world && g_world->size() == 4) << "run under mpirun -np 4";
  std::unique_ptr<Communicator> pp = g_world->split(g_world->rank() / 2, g_world->rank());
  const ModelConfig cfg = four_layers();
  int64_t n_targets = 0;
  const std::vector<TokenBatch> micro =
      testing::micro_batches(
          3, [&](int64_t m) { return testing::random_token_batch(2, 12, cfg.vocab_size, 90 + uint64_t(m)); }, n_targets);
  DenseModel whole(cfg);
  one_process_gradients(whole, micro, 1.0 / double(n_targets));
  DenseModel stage(cfg);
  stage.set_pipeline_stage(pp->rank(), std::vector<int64_t>{3, 1});
  EXPECT_EQ(stage.end_layer() - stage.first_layer(), pp->rank() == 0 ? 3 : 1);
  stage.init(3);
  OneFOneB schedule(stage, *pp, micro, 0, 3, 1.0 / double(n_targets));
  GradientStack stack2;
  pairwise_gradients(stage, 0, 3, stack2, [&](int64_t m) { schedule.run_through_backward(m); });
  expect_stage_gradients(stage, whole, pp->rank());
}

// The tiny V4 model (4 layers of every attention type, hash and score-routed MoE, mHC, MTP) through 1F1B: the
// stages exchange the residual streams and the MTP's embedding rows, recompute the forward of a micro-batch whose
// backward comes after another forward, and must give the single-process gradients, losses and expert loads
// bitwise (the recomputation counting no load).
void check_v4_against_one_process(int stages, int64_t M) {
  ASSERT_TRUE(g_world) << "run under mpirun";
  std::unique_ptr<Communicator> pp = g_world->split(g_world->rank() / stages, g_world->rank());
  const ModelConfig cfg = testing::tiny_v4_config();
  int64_t n_targets = 0;
  const std::vector<TokenBatch> micro =
      testing::micro_batches(
          M, [&](int64_t m) { return testing::tiny_v4_batch(cfg.vocab_size, 100 + uint64_t(m)); }, n_targets);
  const double scale = 1.0 / double(n_targets);
  V4Model whole(cfg);
  testing::randomize_v4(whole, 7);
  GradientStack stack;
  double whole_loss = 0, whole_mtp = 0;
  pairwise_gradients(whole, 0, M, stack, [&](int64_t m) {
    whole_loss += whole.forward_backward(micro[m], scale);
    whole_mtp += whole.last_stats().mtp_loss_sum;
  });

  V4Model stage(cfg);
  std::vector<int64_t> layers(stages, cfg.n_layers / stages);
  stage.set_pipeline_stage(pp->rank(), layers);
  testing::randomize_v4(stage, 7);
  double mtp = 0;
  OneFOneB schedule(stage, *pp, micro, 0, M, scale, [&](int64_t) { mtp += stage.last_stats().mtp_loss_sum; });
  GradientStack stack2;
  pairwise_gradients(stage, 0, M, stack2, [&](int64_t m) { schedule.run_through_backward(m); });
  const bool last = pp->rank() == pp->size() - 1;
  EXPECT_EQ(schedule.loss_sum(), last ? whole_loss : 0.0);
  EXPECT_EQ(mtp, last ? whole_mtp : 0.0);
  expect_stage_gradients(stage, whole, pp->rank());
  for (int64_t l = stage.first_layer(); l < stage.end_layer(); ++l)
    EXPECT_EQ(stage.expert_load()[l], whole.expert_load()[l]) << "layer " << l;
  if (last) {
    EXPECT_EQ(stage.expert_load().back(), whole.expert_load().back()) << "MTP block";
  }
  EXPECT_EQ(pipeline_forward_loss(stage, *pp, micro[0]), whole.forward(micro[0]));
}

TEST(PipelineParallel, V4FourStagesSixMicroBatches) { check_v4_against_one_process(4, 6); }
TEST(PipelineParallel, V4TwoStagesFourMicroBatches) { check_v4_against_one_process(2, 4); }

// The interleaved schedule: V chunks per rank (virtual stages c P + rank of an 8-layer model), the chunks'
// backwards interleaved; every gradient, the loss, the clipping norm (summed virtual stage by virtual stage) and a
// forward-only pass bitwise equal to one process.
void check_interleaved(int stages, int chunks, int64_t M) {
  ASSERT_TRUE(g_world) << "run under mpirun";
  std::unique_ptr<Communicator> pp = g_world->split(g_world->rank() / stages, g_world->rank());
  const ModelConfig cfg = testing::dense_test_config(23, 16, 8, 24, 16);
  int64_t n_targets = 0;
  const std::vector<TokenBatch> micro = testing::micro_batches(
      M, [&](int64_t m) { return testing::random_token_batch(2, 12, cfg.vocab_size, 60 + uint64_t(m)); }, n_targets);
  const double scale = 1.0 / double(n_targets);
  DenseModel whole(cfg);
  const double whole_loss = one_process_gradients(whole, micro, scale);

  std::vector<std::unique_ptr<Model>> parts;
  const std::vector<int64_t> layers(size_t(stages * chunks), cfg.n_layers / (stages * chunks));
  for (int c = 0; c < chunks; ++c) {
    auto part = std::make_unique<DenseModel>(cfg);
    part->set_pipeline_stage(c * stages + pp->rank(), layers);
    parts.push_back(std::move(part));
  }
  InterleavedStages model(std::move(parts));
  model.init(3);
  InterleavedOneFOneB schedule(model, *pp, micro, 0, M, scale);
  schedule.run();
  EXPECT_EQ(schedule.loss_sum(), pp->rank() == stages - 1 ? whole_loss : 0.0);
  expect_stage_gradients(model, whole, pp->rank());
  EXPECT_EQ(clip_grad_norm(model.params(), 0.0, pp.get(), model.chunk_sizes()), clip_grad_norm(whole.params(), 0.0));
  EXPECT_EQ(interleaved_forward_loss(model, *pp, micro[0]), whole.forward(micro[0]));
}

TEST(PipelineParallel, InterleavedTwoStagesTwoChunks) { check_interleaved(2, 2, 4); }
TEST(PipelineParallel, InterleavedTwoStagesFourChunksTwoMicroBatches) { check_interleaved(2, 4, 2); }
TEST(PipelineParallel, InterleavedFourStagesTwoChunks) { check_interleaved(4, 2, 8); }

TEST(PipelineParallel, InterleavedNeedsMicroBatchesByStages) {
  ASSERT_TRUE(g_world) << "run under mpirun";
  std::unique_ptr<Communicator> pp = g_world->split(g_world->rank() / 2, g_world->rank());
  const ModelConfig cfg = testing::dense_test_config(23, 16, 4, 24, 16);
  std::vector<std::unique_ptr<Model>> parts;
  for (int c = 0; c < 2; ++c) {
    auto part = std::make_unique<DenseModel>(cfg);
    part->set_pipeline_stage(c * 2 + pp->rank(), 4);
    parts.push_back(std::move(part));
  }
  InterleavedStages model(std::move(parts));
  int64_t n = 0;
  const std::vector<TokenBatch> micro =
      testing::micro_batches(3, [&](int64_t m) { return testing::random_token_batch(2, 12, 23, uint64_t(m)); }, n);
  EXPECT_NE(testing::error_of([&] { InterleavedOneFOneB(model, *pp, micro, 0, 3, 1.0); })
                .find("the micro-batches per data-parallel rank (3) must be a multiple of parallel.pp (2)"),
            std::string::npos);
}

TEST(PipelineParallel, MoreStagesThanLayersIsAnError) {
  DenseModel m(four_layers());
  try {
    m.set_pipeline_stage(0, 5);
    FAIL() << "no error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("parallel.pp (5) must not exceed model.n_layers (4)"), std::string::npos)
        << e.what();
  }
}

}  // namespace
}  // namespace tessera

#include "tests/parallel/mpi_gtest_main.h"
